"""Crash cleanup: what a csmf process leaves behind when it dies without running its own cleanup.

    csmf doctor [--home DIR]                 # by hand; every csmf-daily and csmf-compare flow runs it first
    from flows.doctor import claim, cleanup
    claim(home)                              # this process owns the runs and processes it starts
    print(cleanup(home).summary())

Why: a process killed with SIGKILL (kill -9, the OOM killer, a lost machine) runs no `except` or
`finally`. Its MLflow parent and child runs stay RUNNING forever, a model version it was registering
may be left without an alias, and the temporary Prefect API server it started keeps running as an
orphan. prefect 3.8.8 starts that server (`prefect.server.api.server.SubprocessASGIServer`) with a
plain `subprocess.Popen([python, "-m", "uvicorn", ..., "prefect.server.api.server:create_app"])` in
the flow's process and stops it only from an `atexit` hook, which SIGKILL skips; prefect has no hook
to make it die with its parent (no preexec_fn, so no PR_SET_PDEATHSIG), so the next csmf process
reaps it instead.

Ownership: a process is (host, pid, start time), because pids are reused. `claim(home)`
- exports CSMF_OWNER=<host>:<pid>:<start time>, so every process started afterwards (the Prefect
  server of `csmf run`, which claims before it calls the flow; torchrun ranks) carries its owner in
  its environment;
- records in `<home>/owners/` the Prefect servers that already are its children without that mark
  (a flow called from Python starts the server before the flow body runs).
The flows tag their MLflow parent run with the owner (`owner_tags`: csmf.owner.host, csmf.owner.pid,
csmf.owner.start_time) when they open it.

`cleanup(home)`, for owners on this host whose process is gone:
1. stops their leftover processes (those whose environment names the dead owner and this home, and
   the recorded Prefect servers): SIGTERM, SIGKILL after 10 s;
2. marks their RUNNING parent runs FAILED, and the RUNNING child runs under them, with the tag
   csmf.failure_reason saying which process ended and when it was noticed;
3. tags every model version of "csmf" registered by a pipeline run that ended FAILED or KILLED and
   never got a gate verdict with csmf.failure_reason (nothing is deleted, no alias is moved).
Runs of live processes are never touched. RUNNING runs of another host, or without an owner tag
(started by an older csmf or another tool), are listed and left as they are: whether their process
still runs cannot be checked from here.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from flows.env import resolve_home, sqlite_path
from flows.env import tracking_uri as default_tracking_uri
from flows.lock import process_alive, process_identity
from flows.names import GATE_TAG, RUN_TAG

OWNER_ENV = "CSMF_OWNER"
HOST_TAG, PID_TAG, START_TAG = "csmf.owner.host", "csmf.owner.pid", "csmf.owner.start_time"
PREFECT_SERVER = "prefect.server.api.server:create_app"  # in the command line of prefect's temporary API
STOP_TIMEOUT = 10.0
_log = logging.getLogger(__name__)


# ---- ownership -------------------------------------------------------------------------------------
def _token(owner: dict) -> str:
    return f"{owner['host']}:{owner['pid']}:{owner['create_time']!r}"


def _parse(token: str | None) -> dict | None:
    """{"host", "pid", "create_time"} from a CSMF_OWNER value (host names hold no ':'), or None."""
    try:
        host, pid, start = (token or "").rsplit(":", 2)
        return {"host": host, "pid": int(pid), "create_time": float(start)}
    except ValueError:
        return None


def owner_tags() -> dict[str, str]:
    """MLflow tags naming this process as the owner of a run (set on the parent run at open)."""
    me = process_identity()
    return {HOST_TAG: me["host"], PID_TAG: str(me["pid"]), START_TAG: repr(me["create_time"])}


def _owner_from_tags(tags: dict) -> dict | None:
    try:
        return {"host": tags[HOST_TAG], "pid": int(tags[PID_TAG]), "create_time": float(tags[START_TAG])}
    except (KeyError, ValueError):
        return None


def claim(home: str | os.PathLike) -> dict:
    """Make this process the owner of what it starts from now on (module docstring); returns its identity."""
    me = process_identity()
    token = _token(me)
    os.environ[OWNER_ENV] = token
    unmarked = []
    try:
        children = psutil.Process(me["pid"]).children(recursive=True)
    except psutil.Error:
        children = []
    for child in children:
        try:
            if PREFECT_SERVER in " ".join(child.cmdline()) and child.environ().get(OWNER_ENV) != token:
                unmarked.append({"pid": child.pid, "create_time": child.create_time()})
        except psutil.Error:
            continue
    if unmarked:
        folder = resolve_home(home) / "owners"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{me['host']}-{me['pid']}-{int(me['create_time'] * 1000)}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"owner": me, "processes": unmarked}))
        os.replace(tmp, path)
    return me


# ---- cleanup ---------------------------------------------------------------------------------------
@dataclass
class Cleanup:
    """What `cleanup` did (each entry one readable line)."""

    home: Path
    store: str | None = None  # the tracking store looked at; None when there is none yet
    stopped: list[str] = field(default_factory=list)
    failed_runs: list[str] = field(default_factory=list)
    tagged_versions: list[str] = field(default_factory=list)
    left_alone: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.stopped or self.failed_runs or self.tagged_versions)

    def summary(self) -> str:
        lines = [f"csmf doctor: home {self.home}, tracking store {self.store or '(none yet)'}"]
        for title, items in (
            ("stopped leftover processes of dead csmf processes", self.stopped),
            ("marked FAILED (tag csmf.failure_reason)", self.failed_runs),
            ("tagged model versions of runs that did not finish (csmf.failure_reason)", self.tagged_versions),
            (
                "RUNNING runs left as they are (their process cannot be checked from this host)",
                self.left_alone,
            ),
            ("could not be cleaned (see the reason; re-run `csmf doctor` once fixed)", self.errors),
        ):
            if items:
                lines += [f"{title}:", *(f"  {item}" for item in items)]
        if not (self.changed or self.left_alone or self.errors):
            lines.append("nothing to clean up: no run or process of a dead csmf process")
        return "\n".join(lines)


def cleanup(home: str | os.PathLike | None = None, tracking_uri: str | None = None) -> Cleanup:
    """Processes, runs and model versions left by dead csmf processes of this home (module docstring)."""
    root = resolve_home(home)
    report = Cleanup(root)
    _stop(_leftover_processes(root), report)
    uri = tracking_uri or default_tracking_uri()
    db = sqlite_path(uri)
    if uri.startswith("sqlite:") and (db is None or not db.is_file()):
        return report  # no store yet: nothing can be RUNNING (and none is created here)
    report.store = uri
    import mlflow

    client = mlflow.MlflowClient(uri)
    failed = _fail_dead_runs(client, uri, report)
    _tag_versions(client, report, failed)
    return report


def _leftover_processes(root: Path) -> list[psutil.Process]:
    """Processes whose owner (CSMF_OWNER in their environment, or a record in <home>/owners) is dead."""
    host, me = socket.gethostname(), os.getpid()
    skip = {me, *(p.pid for p in psutil.Process(me).parents())}
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter():
        if proc.pid in skip:
            continue
        try:
            env = proc.environ()
        except psutil.Error:  # gone, a zombie, or another user's
            continue
        owner = _parse(env.get(OWNER_ENV))
        if owner is None or owner["host"] != host or env.get("CSMF_HOME") != str(root):
            continue
        if not process_alive(owner["pid"], owner["create_time"]):
            found[proc.pid] = proc
    for record in sorted((root / "owners").glob("*.json")):
        try:
            data = json.loads(record.read_text())
            owner = data["owner"]
            if owner["host"] != host or process_alive(owner["pid"], owner["create_time"]):
                continue
            for entry in data["processes"]:
                if process_alive(entry["pid"], entry["create_time"]) and entry["pid"] not in skip:
                    found[entry["pid"]] = psutil.Process(entry["pid"])
            record.unlink()
        except (OSError, ValueError, KeyError, TypeError, psutil.Error):
            continue
    return list(found.values())


def _stop(procs: list[psutil.Process], report: Cleanup) -> None:
    """SIGTERM, then SIGKILL to what still runs after STOP_TIMEOUT seconds. An orphan is not our child:
    once it exits it is gone, or a zombie until its new parent (init) reaps it; both count as stopped."""
    names = {}
    for proc in procs:
        try:
            names[proc.pid] = " ".join(proc.cmdline())[:160]
            proc.terminate()
        except psutil.Error:
            continue
    alive = _wait_gone([p for p in procs if p.pid in names], STOP_TIMEOUT)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    alive = _wait_gone(alive, STOP_TIMEOUT)
    for pid, name in names.items():
        if any(p.pid == pid for p in alive):
            report.errors.append(f"pid {pid} ({name}) still runs after SIGKILL")
        else:
            report.stopped.append(f"pid {pid}: {name}")


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """The processes of `procs` still running (not exited, not a zombie) after up to `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for proc in procs:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.Error:
                continue
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def _reason(owner: dict) -> str:
    started = dt.datetime.fromtimestamp(owner["create_time"], dt.UTC).isoformat(timespec="seconds")
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return (
        f"the process that ran it (pid {owner['pid']} on {owner['host']}, started {started}) ended before "
        f"the run finished: killed (kill -9, out of memory) or crashed; marked FAILED by csmf doctor at "
        f"{now}. Re-run the date: completed stages with identical inputs are resumed."
    )


def _fail_dead_runs(client, uri: str, report: Cleanup) -> dict[str, str]:
    """Mark RUNNING runs of dead owners FAILED; returns {run id: reason} of those marked."""
    from flows.tracking import MlflowTracker

    experiments = [e.experiment_id for e in client.search_experiments()]
    running = []
    for chunk in (experiments[i : i + 100] for i in range(0, len(experiments), 100)):
        token = None
        while True:
            page = client.search_runs(
                chunk, "attributes.status = 'RUNNING'", max_results=1000, page_token=token
            )
            running += list(page)
            token = page.token
            if not token:
                break
    host = socket.gethostname()
    tags_of: dict[str, dict] = {r.info.run_id: r.data.tags for r in running}

    def owner_of(run_id: str, depth: int = 0) -> dict | None:
        if run_id not in tags_of:
            try:
                tags_of[run_id] = client.get_run(run_id).data.tags
            except Exception:  # the parent was deleted
                tags_of[run_id] = {}
        tags = tags_of[run_id]
        owner = _owner_from_tags(tags)
        parent = tags.get("mlflow.parentRunId")
        return owner if owner is not None or not parent or depth > 3 else owner_of(parent, depth + 1)

    failed = {}
    for run in running:
        rid, name = run.info.run_id, run.info.run_name
        owner = owner_of(rid)
        if owner is None:
            report.left_alone.append(f"run {rid} ({name}): no owner recorded (started by an older csmf?)")
            continue
        if owner["host"] != host:
            report.left_alone.append(f"run {rid} ({name}): owned by pid {owner['pid']} on {owner['host']}")
            continue
        if process_alive(owner["pid"], owner["create_time"]):
            continue
        reason = _reason(owner)
        if MlflowTracker.attach(rid, uri).fail(reason):
            failed[rid] = reason
            kind = "child run" if run.data.tags.get("mlflow.parentRunId") else "run"
            report.failed_runs.append(f"{kind} {rid} ({name}) of dead pid {owner['pid']} on {owner['host']}")
        else:
            report.errors.append(f"run {rid} ({name}): the tracking store refused the update (see the log)")
    return failed


def _tag_versions(client, report: Cleanup, failed: dict[str, str]) -> None:
    """Tag versions registered by a pipeline run that ended FAILED/KILLED before the gate's verdict."""
    from mlflow.exceptions import MlflowException

    from flows.registry import REGISTERED_MODEL
    from flows.tracking import FAILURE_TAG

    try:
        versions = client.search_model_versions(f"name='{REGISTERED_MODEL}'")
    except MlflowException:  # no registered model yet
        return
    for v in versions:
        tags = v.tags or {}
        run_id = tags.get(RUN_TAG)
        if not run_id or FAILURE_TAG in tags or GATE_TAG in tags:
            continue
        try:
            run = client.get_run(run_id)
        except MlflowException:
            continue
        if run.info.status not in ("FAILED", "KILLED"):
            continue  # still running, or finished (a verdict is on its way)
        why = failed.get(run_id) or run.data.tags.get(FAILURE_TAG) or "no reason recorded"
        aliases = ", ".join(v.aliases or []) or "none"
        text = (
            f"registered by pipeline run {run_id}, which ended {run.info.status} before the gate decided "
            f"(aliases: {aliases}); that run: {why}"
        )[:5000]
        try:
            client.set_model_version_tag(REGISTERED_MODEL, v.version, FAILURE_TAG, text)
            report.tagged_versions.append(
                f"{REGISTERED_MODEL} version {v.version} (run {run_id}, aliases {aliases})"
            )
        except MlflowException as exc:
            report.errors.append(f"{REGISTERED_MODEL} version {v.version}: {exc}")


# ---- in the flows ----------------------------------------------------------------------------------
def before_run(home: str | os.PathLike, tracking_uri: str | None = None) -> Cleanup | None:
    """What every flow does first: claim this process and clean up after dead ones. Never fails the
    flow: a cleanup that cannot run is a warning (`csmf doctor` shows the details)."""
    log = _run_logger()
    try:
        claim(home)
        report = cleanup(home, tracking_uri)
    except Exception as exc:  # housekeeping must not stop a run
        log.warning("crash cleanup skipped (%s: %s); run `csmf doctor` to see why", type(exc).__name__, exc)
        return None
    if report.changed or report.errors:
        log.warning("crash cleanup of earlier csmf processes that died:\n%s", report.summary())
    return report


def _run_logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # outside a flow run (a flow's .fn called from Python, plain scripts)
        return _log
