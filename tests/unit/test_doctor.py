"""Crash cleanup (flows/doctor.py): what a csmf process killed with SIGKILL leaves behind is found by
its owner (host, pid, start time) and cleaned up by `csmf doctor` and by the next flow, never what a
live process or another host owns. Real MLflow SQLite stores and real processes; no Prefect server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import mlflow
import psutil
import pytest

from flows import cli, doctor
from flows.lock import RunLocked, date_lock, process_alive, process_identity
from flows.registry import REGISTERED_MODEL, RUN_TAG
from flows.tracking import FAILURE_TAG, MlflowTracker

ROOT = Path(__file__).resolve().parents[2]
ENV = (
    "CSMF_HOME",
    "CSMF_OWNER",
    "MLFLOW_TRACKING_URI",
    "PREFECT_HOME",
    "PREFECT_SERVER_ANALYTICS_ENABLED",
    "PREFECT_API_URL",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR",
)


@pytest.fixture
def clean_env(monkeypatch):
    """None of the home variables set (nor CSMF_OWNER, which claim sets); restored afterwards."""
    for k in ENV:
        monkeypatch.setenv(k, "placeholder")
        monkeypatch.delenv(k)


def _dead_identity() -> dict:
    """(host, pid, start time) of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    ident = process_identity(proc.pid)
    proc.stdin.close()
    proc.wait(timeout=30)
    assert not process_alive(ident["pid"], ident["create_time"])
    return ident


def test_process_alive_survives_a_boot_time_second_but_not_another_start():
    """Linux gives the boot time in whole wall-clock seconds: a clock slewed by NTP can move it by one
    between the moment an identity is recorded and the check. Another start time is another process."""
    me = process_identity()
    assert process_alive(me["pid"], me["create_time"])
    assert process_alive(me["pid"], me["create_time"] + 1.0) and process_alive(
        me["pid"], me["create_time"] - 1.0
    )
    assert not process_alive(me["pid"], me["create_time"] + 2.0)
    assert not process_alive(me["pid"], me["create_time"] - 3600.0)


def _tags(owner: dict) -> dict:
    return {
        doctor.HOST_TAG: owner["host"],
        doctor.PID_TAG: str(owner["pid"]),
        doctor.START_TAG: repr(owner["create_time"]),
    }


def test_doctor_fails_the_runs_of_a_dead_process_and_nothing_else(tmp_path, clean_env, capsys):
    home = tmp_path / "home"
    home.mkdir()
    uri = f"sqlite:///{home / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("csmf", artifact_location=(tmp_path / "art").as_uri())
    dead, live = _dead_identity(), process_identity()

    def start(name, owner=None, parent=None):
        return MlflowTracker.start(
            exp, name, tags=_tags(owner) if owner else {}, parent_run_id=parent, tracking_uri=uri
        )

    killed = start("csmf-daily-2026-01-06", dead)  # kill -9 during a cascade step
    step = start("pretrain_exposure", parent=killed.run_id)
    done = start("ingest", parent=killed.run_id)
    done.finish("FINISHED")
    alive = start("csmf-daily-2026-01-07", live)  # this process: running right now
    alive_step = start("pretrain_exposure", parent=alive.run_id)
    remote = start("csmf-daily-2026-01-08", {**dead, "host": "another-host"})
    legacy = start("csmf-daily-2026-01-05")  # no owner recorded (an older csmf)
    gated = start("csmf-daily-2026-01-04", dead)
    gated.fail("TrainingDiverged: earlier")
    client.create_registered_model(REGISTERED_MODEL)

    def version(run):
        return client.create_model_version(
            REGISTERED_MODEL, source=str(tmp_path / "m"), run_id=run.run_id, tags={RUN_TAG: run.run_id}
        ).version

    orphan_version = version(killed)  # kill -9 between register_model and the alias: no alias
    live_version = version(alive)
    kept_version = version(gated)
    client.set_model_version_tag(REGISTERED_MODEL, kept_version, "csmf.gate", "kept")
    status = lambda t: client.get_run(t.run_id).info.status  # noqa: E731
    assert status(killed) == status(step) == "RUNNING"  # what kill -9 leaves behind

    assert cli.main(["doctor", "--home", str(home)]) == 0
    out = capsys.readouterr().out
    for run in (killed, step):
        r = client.get_run(run.run_id)
        assert r.info.status == "FAILED" and r.info.end_time is not None
        reason = r.data.tags[FAILURE_TAG]
        assert f"pid {dead['pid']} on {dead['host']}" in reason and "killed" in reason
        assert run.run_id in out
    assert status(done) == "FINISHED"
    assert status(alive) == status(alive_step) == status(remote) == status(legacy) == "RUNNING"
    assert FAILURE_TAG not in client.get_run(alive.run_id).data.tags
    assert f"run {remote.run_id}" in out and "another-host" in out and f"run {legacy.run_id}" in out

    tags = client.get_model_version(REGISTERED_MODEL, orphan_version).tags
    assert killed.run_id in tags[FAILURE_TAG] and "aliases: none" in tags[FAILURE_TAG]
    assert f"version {orphan_version}" in out
    assert FAILURE_TAG not in client.get_model_version(REGISTERED_MODEL, live_version).tags
    assert FAILURE_TAG not in client.get_model_version(REGISTERED_MODEL, kept_version).tags  # gated
    assert client.get_model_version(REGISTERED_MODEL, orphan_version).aliases == []  # nothing moved

    assert cli.main(["doctor", "--home", str(home)]) == 0  # idempotent: nothing left to do
    again = capsys.readouterr().out
    assert "marked FAILED" not in again and "tagged model versions" not in again


_OWNER = textwrap.dedent(
    """
    import os, subprocess, sys, time
    sys.path.insert(0, sys.argv[1])
    from flows.doctor import PREFECT_SERVER, claim
    sleep = [sys.executable, "-c", "import time; time.sleep(300)"]
    early = subprocess.Popen([*sleep, PREFECT_SERVER])  # like prefect's server: started before the claim
    claim(os.environ["CSMF_HOME"])
    later = subprocess.Popen(sleep)  # started after the claim: carries CSMF_OWNER
    other = subprocess.Popen(sleep, env={**os.environ, "CSMF_HOME": sys.argv[2]})  # another home
    print(early.pid, later.pid, other.pid, flush=True)
    time.sleep(300)
    """
)


def _owner(home: Path, other_home: Path) -> tuple[subprocess.Popen, list[int]]:
    env = {**os.environ, "CSMF_HOME": str(home)}
    env.pop("CSMF_OWNER", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", _OWNER, str(ROOT), str(other_home)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    return proc, [int(x) for x in proc.stdout.readline().split()]


def test_cleanup_stops_what_a_killed_process_left_running(tmp_path):
    home, other_home = tmp_path / "home", tmp_path / "other"
    home.mkdir()
    killed, (early, later, other) = _owner(home, other_home)
    survivor, survivor_children = _owner(home, other_home)  # a live owner of the same home
    children = [psutil.Process(p) for p in (early, later, other, *survivor_children)]
    try:
        assert list((home / "owners").glob("*.json"))  # the server started before claim is recorded
        assert psutil.Process(later).environ()[doctor.OWNER_ENV].split(":")[1] == str(killed.pid)
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        assert all(p.is_running() for p in children)  # orphans: kill -9 ran no cleanup

        report = doctor.cleanup(home, tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
        assert report.store is None  # no tracking store yet: none created
        assert not (home / "mlflow.db").exists()
        assert sorted(int(s.split(":")[0].removeprefix("pid ")) for s in report.stopped) == sorted(
            [early, later]
        )
        assert not any(process_alive(p.pid, p.create_time()) for p in children[:2])
        assert psutil.Process(other).is_running()  # another home's: not this cleanup's business
        assert all(psutil.Process(p).is_running() for p in survivor_children)  # its owner is alive
        assert [json.loads(f.read_text())["owner"]["pid"] for f in (home / "owners").glob("*.json")] == [
            survivor.pid
        ]
    finally:
        for proc in (killed, survivor):
            proc.kill()
            proc.wait(timeout=30)
        for p in children:
            try:
                p.kill()
            except psutil.Error:
                pass


def test_a_failed_store_update_never_hides_the_runs_own_error(tmp_path, monkeypatch):
    """Disk full or a read-only store while failing a run: `fail` reports False and logs, the task's
    own exception is the one that propagates, and the run is left for `csmf doctor`."""
    from flows.runs import child_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("csmf", artifact_location=(tmp_path / "art").as_uri())
    parent = MlflowTracker.start(exp, "p", tracking_uri=uri)
    run = types.SimpleNamespace(parent=lambda: parent)

    def refuse(*args, **kwargs):
        raise mlflow.exceptions.MlflowException("(sqlite3.OperationalError) database or disk is full")

    monkeypatch.setattr(mlflow.MlflowClient, "set_terminated", refuse)
    with pytest.raises(ValueError, match="the step's own error"):
        with child_run(run, "pretrain_exposure"):
            raise ValueError("the step's own error")
    assert parent.fail(ValueError("x")) is False
    monkeypatch.undo()
    (child,) = [
        r for r in client.search_runs([exp]) if r.data.tags.get("mlflow.parentRunId") == parent.run_id
    ]
    assert child.info.status == "RUNNING"  # the store refused: left for csmf doctor
    assert child.data.tags[FAILURE_TAG] == "ValueError: the step's own error"  # the tag got through
    assert parent.fail(KeyboardInterrupt()) is True
    got = client.get_run(parent.run_id)
    assert got.info.status == "FAILED" and got.data.tags[FAILURE_TAG].startswith("KeyboardInterrupt: ")


def test_the_flow_cleans_up_before_it_takes_the_date_lock(tmp_path, monkeypatch):
    """csmf_daily runs the cleanup first thing: a run killed yesterday is FAILED even when today's
    run stops at once because the date is locked."""
    from csmf_core.synth import generate
    from flows.pipeline import csmf_daily

    data = generate(tmp_path / "tiny", "tiny", seed=0).out_dir
    home = tmp_path / "home"
    home.mkdir()
    uri = f"sqlite:///{home / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("csmf", artifact_location=(home / "mlartifacts").as_uri())
    dead = _dead_identity()
    killed = MlflowTracker.start(exp, "csmf-daily-2026-01-04", tags=_tags(dead), tracking_uri=uri)
    for k in ("MLFLOW_TRACKING_URI", "PREFECT_HOME", "CSMF_HOME", "CSMF_OWNER"):
        monkeypatch.setenv(k, "placeholder")  # restored after the test: the flow sets them
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("PREFECT_HOME", str(home / "prefect"))
    monkeypatch.setenv("CSMF_HOME", str(home))
    with date_lock(home, "2026-01-05", who="flow run A"):
        with pytest.raises(RunLocked):
            try:
                csmf_daily.fn(date="2026-01-05", data=str(data), home=str(home))
            finally:
                mlflow.set_tracking_uri(None)
    got = client.get_run(killed.run_id)
    assert got.info.status == "FAILED" and f"pid {dead['pid']}" in got.data.tags[FAILURE_TAG]
    me = process_identity()
    assert os.environ["CSMF_OWNER"] == f"{socket.gethostname()}:{me['pid']}:{me['create_time']!r}"
