"""Prefect's temporary API launched early by `csmf run` (flows/local_api.py) is the server the flow
uses: a real flow run in a fresh process, no second server started."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, os, sys
import psutil
from flows.env import setup_home
setup_home(sys.argv[1])
from flows.local_api import start_temporary_api
api = start_temporary_api()
api.wait()
from prefect import flow
from prefect.client.orchestration import get_client

from prefect import flow_engine
from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

beats = []
emit = flow_engine.BaseFlowRunEngine._emit_flow_run_heartbeat
def counted(self, *a, **k):
    beats.append(1)
    return emit(self, *a, **k)
flow_engine.BaseFlowRunEngine._emit_flow_run_heartbeat = counted

@flow
def tiny():
    with get_client(sync_client=True) as client:
        return client.api_url, get_current_settings().flows.heartbeat_frequency

with api.use():
    used, beat_setting = tiny()
beats_in_use = len(beats)
with temporary_settings(updates={PREFECT_API_URL: api.api_url}):  # the same server, Prefect's defaults
    _, default_setting = tiny()
beats_default = len(beats) - beats_in_use
servers = [
    " ".join(p.cmdline())
    for p in psutil.Process().children(recursive=True)
    if "prefect.server.api.server:create_app" in " ".join(p.cmdline())
]
print("RESULT " + json.dumps({"launched": api.api_url, "used": str(used), "servers": servers,
                              "port": api.port, "waited": api.seconds_waited,
                              "server_code_here": "prefect.server.api.server" in sys.modules,
                              "beat_setting": beat_setting, "beats_in_use": beats_in_use,
                              "default_setting": default_setting, "beats_default": beats_default}))
"""


def test_the_flow_uses_the_early_launched_server(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "CSMF_"))}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "300"
    res = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "home")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=REPO,
    )
    lines = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
    assert res.returncode == 0 and lines, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads(lines[-1][7:])
    (server,) = out["servers"]  # one temporary API process, the one launched early
    assert f"--port {out['port']}" in server
    assert out["used"].rstrip("/") == out["launched"]  # the flow's client talks to it
    assert "Starting temporary server" not in res.stdout + res.stderr  # Prefect did not start its own
    assert out["server_code_here"] is False  # the Prefect server's modules stayed out of this process
    # no flow-run heartbeats against the temporary API (their thread cost up to 1 s at each run's end);
    # with Prefect's default setting the same flow sends its first one as it starts
    assert out["beat_setting"] is None and out["beats_in_use"] == 0
    assert out["default_setting"] == 180 and out["beats_default"] >= 1


SEEDED = r"""
import json, sqlite3, sys
from flows.env import setup_home
setup_home(sys.argv[1])
import flows.local_api as la
la.template_path = lambda: la.Path(sys.argv[2])
from flows.local_api import default_database, start_temporary_api
api = start_temporary_api()
api.wait()
from prefect import flow, task

@task
def one():
    return 1

@flow
def tiny():
    return one() + one()

with api.use():
    assert tiny() == 2
    # task runs are recorded by the server from queued client events: wait until it has them
    import time
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterStateType
    done = TaskRunFilter(state=dict(type=TaskRunFilterStateType(any_=["COMPLETED"])))
    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        while len(client.read_task_runs(task_run_filter=done)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
print("RESULT " + json.dumps({"db": str(default_database())}))
"""


def _rows(db: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_a_new_home_starts_from_the_migrated_template(tmp_path):
    """build_template runs Prefect's own migrations once; a new home's server starts from a copy of it,
    finds nothing to migrate, and records the flow and task runs in it as usual."""
    from flows.local_api import build_template

    template = build_template(tmp_path / "prefect-template.db")
    (head,) = _rows(template, "SELECT version_num FROM alembic_version")
    assert _rows(template, "SELECT count(*) FROM flow_run") == [(0,)]
    con = sqlite3.connect(template)  # a mark a database migrated by the server itself would not have
    con.execute("PRAGMA user_version = 4242")
    con.close()
    before = template.read_bytes()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "CSMF_"))}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "300"
    res = subprocess.run(
        [sys.executable, "-c", SEEDED, str(tmp_path / "home"), str(template)],
        capture_output=True, text=True, env=env, timeout=600, cwd=REPO,
    )  # fmt: skip
    lines = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
    assert res.returncode == 0 and lines, res.stdout[-3000:] + res.stderr[-3000:]
    db = Path(json.loads(lines[-1][7:])["db"])
    assert db == tmp_path / "home" / "prefect" / "prefect.db"
    assert _rows(db, "PRAGMA user_version") == [(4242,)]  # the copy, not a database of its own
    assert _rows(db, "SELECT version_num FROM alembic_version") == [head]
    assert _rows(db, "SELECT state_type FROM flow_run") == [("COMPLETED",)]
    assert _rows(db, "SELECT count(*) FROM task_run WHERE state_type = 'COMPLETED'") == [(2,)]
    assert template.read_bytes() == before  # the template itself is never written to


SHADOWED = r"""
import sys
sys.path[:] = [p for p in sys.path if p not in ("", ".")]  # this process: the repository's flows
from flows.env import setup_home
setup_home(sys.argv[1])
from flows.local_api import start_temporary_api
api = start_temporary_api()
api.wait()
print("RESULT healthy", api.api_url)
api.stop()
"""


def test_the_server_starts_from_a_folder_with_its_own_flows_package(tmp_path):
    """The temporary API server runs `python -P -m flows.api_server`: a `flows` package in the user's
    working directory (a common name) is not put first on the server's sys.path."""
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "__init__.py").write_text(
        "raise SystemExit('the user folder flows was imported')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "CSMF_"))}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "300"
    res = subprocess.run(
        [sys.executable, "-c", SHADOWED, str(tmp_path / "home")],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0 and "RESULT healthy" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
