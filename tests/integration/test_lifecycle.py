"""Runs that die, fail or are stopped, for real: `csmf run` in a subprocess with Prefect's temporary
server (no PREFECT_API_URL), kill -9 at a stage, `csmf doctor`; failures on the console; an artifact
store that cannot be written or is full; `csmf ui` stopped by a signal.

    .venv/bin/pytest -m integration tests/integration/test_lifecycle.py
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import psutil
import pytest

from csmf_core.synth import generate
from flows import doctor
from flows.env import free_port
from flows.lock import date_lock, process_alive
from flows.registry import REGISTERED_MODEL, RUN_TAG
from flows.tracking import FAILURE_TAG, ensure_experiment
from tests.integration.conftest import RUN_TIMEOUT_S, temporary_api

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-c", "import sys; from flows.cli import main; sys.exit(main())"]
SMALL = [
    "model.dim=16",
    "model.hidden=[32]",
    "train.batch_size=256",
    "train.threads=1",
    "recover.epochs=1",
    "eval.ks=[10,50]",
]
SETS = [a for o in [*SMALL, "train.epochs=[1,1,1]"] for a in ("--set", o)]
DATE = "2026-01-06"  # the last partition of the tiny data: the default evaluation day


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("data") / "synth-tiny", "tiny", seed=0).out_dir


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory) -> Path:
    """One PREFECT_HOME for every `csmf run` here: the temporary server's database is created once."""
    return tmp_path_factory.mktemp("prefect")


def _env(prefect_home: Path) -> dict[str, str]:
    drop = ("CSMF_HOME", "CSMF_OWNER", "MLFLOW_TRACKING_URI", "PREFECT_API_URL")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env |= {"PREFECT_HOME": str(prefect_home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    # the temporary API's start limit (120 s by default here) is not what these tests are about
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    return env


def _csmf(args: list[str], prefect_home: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, env=_env(prefect_home), cwd=ROOT, timeout=timeout
    )


def _runs(home: Path) -> dict[str, list]:
    """run name -> runs (oldest first) in the home's store."""
    client = mlflow.MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("csmf")
    out: dict[str, list] = {}
    for r in client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"]):
        out.setdefault(r.info.run_name, []).append(r)
    return out


def _wait_for_run(
    db: Path, name: str, proc: subprocess.Popen, log: Path, timeout: float = RUN_TIMEOUT_S
) -> None:
    """Until a run called `name` is RUNNING (read-only SQLite: never races the writer's schema setup)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"csmf run ended early: {log.read_text()[-3000:]}"
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
                found = con.execute(
                    "SELECT 1 FROM runs WHERE name=? AND status='RUNNING'", (name,)
                ).fetchone()
            if found:
                return
        except sqlite3.Error:  # no database or no tables yet, or locked for a moment
            pass
        time.sleep(0.05)
    raise AssertionError(f"no RUNNING run {name!r} within {timeout}s")


def _servers(pid: int) -> list[psutil.Process]:
    """Prefect's temporary API servers among the descendants of `pid`."""
    out = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if doctor.PREFECT_SERVER in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            continue
    return out


# ---- kill -9 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", ["select", "register"])
def test_kill_9_then_doctor_leaves_nothing_running(stage, tiny, prefect_home, tmp_path):
    home = tmp_path / "home"
    epochs = "train.epochs=[300,1,1]" if stage == "select" else "train.epochs=[1,1,1]"
    args = ["run", "--home", str(home), "--data", str(tiny)]
    args += [a for o in [*SMALL, epochs] for a in ("--set", o)]
    log = tmp_path / "run.log"
    with log.open("w") as out:  # a file, not a pipe: nobody reads while it runs
        proc = subprocess.Popen([*CLI, *args], stdout=out, stderr=out, env=_env(prefect_home))
    servers: list[psutil.Process] = []
    try:
        _wait_for_run(home / "mlflow.db", stage, proc, log)
        servers = _servers(proc.pid)
        assert servers, "csmf run without PREFECT_API_URL starts prefect's temporary server"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        runs = _runs(home)
        (parent,) = runs[f"csmf-daily-{DATE}"]
        assert parent.info.status == "RUNNING" and runs[stage][-1].info.status == "RUNNING"
        assert parent.data.tags[doctor.PID_TAG] == str(proc.pid)
        assert all(s.is_running() for s in servers)  # orphaned: kill -9 skips prefect's atexit stop

        res = _csmf(["doctor", "--home", str(home)], prefect_home)
        assert res.returncode == 0, res.stdout + res.stderr
        assert parent.info.run_id in res.stdout and "stopped leftover processes" in res.stdout

        runs = _runs(home)
        assert not [(n, r.info.status) for n, rs in runs.items() for r in rs if r.info.status == "RUNNING"]
        for run in (runs[f"csmf-daily-{DATE}"][0], runs[stage][-1]):
            assert run.info.status == "FAILED"
            assert f"pid {proc.pid} on {socket.gethostname()}" in run.data.tags[FAILURE_TAG]
        assert runs["ingest"][0].info.status == "FINISHED"  # finished work stays as it was
        assert not any(process_alive(s.pid, s.create_time()) for s in servers)
        client = mlflow.MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
        if stage == "register":  # killed before or after the version was created: if it exists, marked
            for v in client.search_model_versions(f"name='{REGISTERED_MODEL}'"):
                assert v.tags[RUN_TAG] == parent.info.run_id and parent.info.run_id in v.tags[FAILURE_TAG]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for s in servers:
            try:
                s.kill()
            except psutil.Error:
                pass


# ---- failures on the console ---------------------------------------------------------------------
def test_a_locked_date_is_one_message_exit_2(tiny, prefect_home, tmp_path):
    home = tmp_path / "home"
    args = ["run", "--home", str(home), "--data", str(tiny), *SETS]
    with date_lock(home, DATE, who="flow run A"):
        quiet = _csmf(args, prefect_home)
        loud = _csmf(["--debug", *args], prefect_home)
    assert quiet.returncode == 2, quiet.stderr
    assert quiet.stderr.count("csmf run: error: another csmf-daily run for 2026-01-06 is training") == 1
    assert "Traceback" not in quiet.stdout + quiet.stderr
    assert "Encountered exception during execution: RunLocked(" in quiet.stderr  # Prefect's line, kept
    assert loud.returncode == 1 and "Traceback" in loud.stderr  # --debug: every traceback


def test_a_diverged_loss_is_one_message_exit_2_and_failed_runs(tiny, prefect_home, tmp_path):
    home = tmp_path / "home"
    res = _csmf(
        ["run", "--home", str(home), "--data", str(tiny), *SETS, "--set", "train.max_loss=0.001"],
        prefect_home,
    )
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    assert res.stderr.count("csmf run: error: pretrain_exposure (train): loss") == 1
    runs = _runs(home)
    for run in (runs[f"csmf-daily-{DATE}"][0], runs["select"][0]):  # the selection pass trains first
        assert run.info.status == "FAILED" and run.data.tags[FAILURE_TAG].startswith("TrainingDiverged: ")


def test_an_unwritable_artifact_store_fails_the_run_not_leaves_it_running(tiny, prefect_home, tmp_path):
    """The experiment's artifact root is a regular file (no one, root included, can write below it):
    the parent run is created, its first artifact fails; it ends FAILED with the reason, exit 2."""
    home = tmp_path / "home"
    home.mkdir()
    ensure_experiment("csmf", home / "mlartifacts", f"sqlite:///{home / 'mlflow.db'}")
    (home / "mlartifacts").rmdir()
    (home / "mlartifacts").write_text("not a directory")
    res = _csmf(["run", "--home", str(home), "--data", str(tiny), *SETS], prefect_home)
    assert res.returncode == 2, res.stderr
    assert (
        "Traceback" not in res.stdout + res.stderr
        and "csmf run: error: [Errno 20] Not a directory" in res.stderr
    )
    assert "free space or fix the permissions" in res.stderr
    (parent,) = _runs(home)[f"csmf-daily-{DATE}"]
    assert parent.info.status == "FAILED"
    assert parent.data.tags[FAILURE_TAG].startswith("NotADirectoryError: [Errno 20] Not a directory")


@pytest.fixture(scope="module")
def harness():
    with temporary_api():
        yield


def test_a_full_disk_during_a_stage_fails_child_and_parent(harness, tiny, tmp_path, monkeypatch):
    """ENOSPC while the first cascade step uploads its checkpoint (the artifact store is full, the
    tracking store still writable): that step's child run and the parent end FAILED with the reason,
    nothing is registered, nothing stays RUNNING."""
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    from flows.pipeline import csmf_daily

    real = LocalArtifactRepository.log_artifacts

    def full(self, local_dir, artifact_path=None):
        if artifact_path == "checkpoint":
            raise OSError(errno.ENOSPC, "No space left on device", str(self.artifact_dir))
        return real(self, local_dir, artifact_path)

    monkeypatch.setattr(LocalArtifactRepository, "log_artifacts", full)
    home = tmp_path / "home"
    uri = f"sqlite:///{home / 'mlflow.db'}"
    for key, value in (("MLFLOW_TRACKING_URI", uri), ("CSMF_HOME", str(home)), ("CSMF_OWNER", "")):
        monkeypatch.setenv(key, value)  # the flow sets these: restored after the test
    monkeypatch.setenv("PREFECT_HOME", str(home / "prefect"))
    try:
        with pytest.raises(OSError) as err:
            csmf_daily(data=str(tiny), home=str(home), overrides=[*SMALL, "train.epochs=[1,1,1]"])
    finally:
        mlflow.set_tracking_uri(None)
    assert err.value.errno == errno.ENOSPC
    runs = _runs(home)
    assert not [n for n, rs in runs.items() for r in rs if r.info.status == "RUNNING"]
    parent, step = runs[f"csmf-daily-{DATE}"][0], runs["pretrain_exposure"][0]
    assert parent.info.status == step.info.status == "FAILED"
    assert step.data.tags[FAILURE_TAG].startswith("OSError: [Errno 28] No space left on device: ")
    assert parent.data.tags[FAILURE_TAG] == step.data.tags[FAILURE_TAG]
    assert runs["ingest"][0].info.status == "FINISHED"
    assert mlflow.MlflowClient(uri).search_model_versions(f"name='{REGISTERED_MODEL}'") == []


# ---- csmf ui ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_ui_stops_mlflow_and_its_workers_on_a_signal(sig, prefect_home, tmp_path):
    port = free_port()
    log = tmp_path / "ui.log"
    (tmp_path / "home").mkdir()  # csmf ui reads a home, it does not make one
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*CLI, "ui", "--home", str(tmp_path / "home"), "--port", str(port)],
            stdout=out,
            stderr=out,
            env=_env(prefect_home),
        )
    family: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow ui did not answer"
            time.sleep(0.5)
        family = psutil.Process(proc.pid).children(recursive=True)
        assert len(family) >= 2  # mlflow ui and the uvicorn server (and its workers)
        proc.send_signal(sig)  # to csmf alone, as a supervisor or `kill PID` does
        assert proc.wait(timeout=60) == 0
        deadline = time.monotonic() + 30
        while any(process_alive(p.pid, p.create_time()) for p in family) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p.pid for p in family if process_alive(p.pid, p.create_time())]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for p in family:
            try:
                p.kill()
            except psutil.Error:
                pass
