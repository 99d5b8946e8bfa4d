"""The deployment loop for real: `make serve`'s stack on loopback, `prefect deployment run`, MLflow.

Runs twice, once per backend of `make serve`:
- sqlite (`make serve`): the Prefect server on SQLite, the flows on MLflow's SQLite file;
- postgres (`make serve BACKEND=postgres`): PostgreSQL (installed with apt-get when missing, as
  root), an MLflow tracking server on it serving the artifacts, the Prefect server on it. Skipped,
  saying why, only when PostgreSQL's binaries are absent and cannot be installed (not root, no apt-get).

python -m flows.deploy up [--backend postgres]  (servers on free 127.0.0.1 ports, process pool,
                             prefect.yaml deployments, worker; all state under a temporary home)
prefect deployment run 'csmf-daily/daily' --param date=2026-01-05 --watch
    -> no champion yet: the daily deployment's train.mode=incremental falls back to a full retrain;
       registry: v1 is champion and challenger, tagged with the date and the flow run
       (postgres: read through the MLflow server, and checked in the databases themselves)
(sqlite only, the rest is store-independent: delete the cache entries of the steps after
 recover_exposure, a run that crashed there)
prefect deployment run 'csmf-daily/adhoc' --param date=2026-01-05 --watch
    -> ingest .. recover_exposure resumed, the rest trained (deterministically: the same model);
       no v2: v1 is reused (identical inputs and model digest), still champion and challenger
prefect deployment run 'csmf-daily/daily' --param date=2026-01-06 --watch   (the next day)
    -> incremental from the champion v1: v2 registered (challenger), tagged train_mode incremental,
       parent v1, last full retrain 2026-01-05; steps select + incremental_*, no cascade from scratch;
       the gate's checks passed (gate/check/* = 1.0); champion as the gate decided (csmf.gate)
(sqlite only) a flow run on the stack's server killed with SIGKILL, no worker watching it
    -> set Crashed by the zombie automation `up` created, 3 heartbeats (90 s at 30 s) after its last
python -m flows.deploy down -> every started process is gone (PostgreSQL too)

The tiny dataset has the partitions 2026-01-01..2026-01-06: the first day is 2026-01-05 so that the
second one, evaluated on its own partition, still has one.

.venv/bin/pytest -m integration tests/integration/test_deployment.py -s [-k postgres]
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import psutil
import pytest

from csmf_core.synth import generate
from flows import automations, deploy, postgres
from flows.env import free_port
from tests.integration.conftest import RUN_TIMEOUT_S, SERVER_STARTUP_S

pytestmark = [pytest.mark.integration, pytest.mark.slow]
HEARTBEAT_S = 30  # the flow runs' heartbeat in these stacks (prefect's minimum)

TINY = """\
model: {dim: 16, hidden: [32]}
train: {epochs: [1, 1, 1], batch_size: 256, threads: 1}
recover: {epochs: 1}
eval: {ks: [10, 50]}
"""
DATE = "2026-01-05"
NEXT_DATE = "2026-01-06"  # the tiny preset's last partition (6 days from 2026-01-01)


def prefect_run(api: str, home: Path, deployment: str, *params: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_API_URL": api, "PREFECT_HOME": str(home / "prefect-server")}
    cmd = [sys.executable, "-m", "prefect", "deployment", "run", deployment]
    for p in params:
        cmd += ["--param", p]
    res = subprocess.run(
        [*cmd, "--watch", "--watch-interval", "2", "--watch-timeout", str(RUN_TIMEOUT_S)],
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S + 60,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "Completed" in out, out[-4000:]
    return out


def api_get(api: str, path: str) -> dict:
    return json.loads(_request(api, path, "GET", None))


def _request(api: str, path: str, method: str, body: bytes | None, deadline_s: float = 120.0) -> bytes:
    """One JSON request to the Prefect API, retried while it answers 503: Prefect's answer when its
    SQLite database is locked for a moment (the scheduler writes the new deployments' runs then)."""
    deadline = time.monotonic() + deadline_s
    while True:
        req = urllib.request.Request(f"{api}{path}", data=body, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.read()
        except urllib.error.HTTPError as exc:
            if exc.code != 503 or time.monotonic() > deadline:
                raise
            print(f"{method} {path}: 503 {exc.read()[:200]!r}; again in 1 s")
        time.sleep(1.0)


def pause_schedules(api: str) -> int:
    """Turn every deployment schedule off (the server deletes the runs it had scheduled): a stack up
    across 03:00 UTC (or Sunday 01:00) would otherwise start an extra run mid-test."""
    paused = 0
    for d in json.loads(_request(api, "/deployments/filter", "POST", b"{}")):
        for sch in d["schedules"]:
            _request(api, f"/deployments/{d['id']}/schedules/{sch['id']}", "PATCH", b'{"active": false}')
            paused += 1
    return paused


def _stack_root(backend: str, tmp_path_factory) -> Path:
    """A fresh directory for the stack. PostgreSQL runs as the `postgres` user when the tests run as
    root, and pytest's base temp (/tmp/pytest-of-root, mode 0700) is closed to it: use a directory
    of its own under the system temp dir, searchable by other users."""
    if backend != "postgres":
        return tmp_path_factory.mktemp("deploy")
    why = postgres.can_install() if postgres.find_binaries() is None else None
    if why is not None:
        pytest.skip(
            "PostgreSQL's server binaries (initdb, pg_ctl, postgres) are absent and cannot be "
            f"installed here ({why}): apt-get install postgresql, or set CSMF_PG_BIN"
        )
    root = Path(tempfile.mkdtemp(prefix="csmf-deploy-pg-"))
    root.chmod(0o755)
    return root


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def stack(request, tmp_path_factory):
    backend = request.param
    root = _stack_root(backend, tmp_path_factory)
    home = root / "home"
    generate(root / "tiny", "tiny", seed=0)
    (root / "tiny.yaml").write_text(TINY)
    t0 = time.perf_counter()
    mp = pytest.MonkeyPatch()
    # the worker (and so every flow run) inherits these: a commit landing in this checkout during
    # the test must not change the code version between the two runs; poll for work every 2 s
    mp.setenv("CSMF_CODE_VERSION", "test-deployment")
    mp.setenv("PREFECT_WORKER_QUERY_SECONDS", "2")
    # prefect's shortest heartbeat: the zombie automation then fires 90 s after a run's last one
    mp.setenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(HEARTBEAT_S))
    mp.delenv("PREFECT_RUNNER_HEARTBEAT_FREQUENCY", raising=False)
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        state = deploy.up(
            home,
            port=free_port(),
            data=root / "tiny",
            config=root / "tiny.yaml",
            backend=backend,
            mlflow_port=free_port(),
            timeout=SERVER_STARTUP_S,
        )
        print(f"\n{backend} stack up in {time.perf_counter() - t0:.1f}s")
        assert pause_schedules(state["api_url"]) == 2  # daily and weekly, as declared
        yield {"home": home, "state": state, "api": state["api_url"], "root": root, "backend": backend}
    finally:
        mp.undo()
        state = deploy.read_state(home)
        t1 = time.perf_counter()
        try:
            deploy.down(home)
            print(f"{backend} stack down in {time.perf_counter() - t1:.1f}s")
            if state:
                for name, entry in state["processes"].items():
                    assert not deploy._alive(entry), f"{name} still running after down()"
                    assert (
                        not psutil.pid_exists(entry["pid"])
                        or psutil.Process(entry["pid"]).status() == "zombie"
                    )
                if backend == "postgres":
                    assert set(state["processes"]) == {"postgres", "mlflow", "server", "worker"}
        finally:
            if backend == "postgres":
                shutil.rmtree(root, ignore_errors=True)


def test_deployments_declared_by_prefect_yaml(stack):
    daily = api_get(stack["api"], "/deployments/name/csmf-daily/daily")
    adhoc = api_get(stack["api"], "/deployments/name/csmf-daily/adhoc")
    crons = [(s["schedule"].get("cron"), s["schedule"].get("timezone")) for s in daily["schedules"]]
    assert crons == [("0 3 * * *", "UTC")] and adhoc["schedules"] == []
    assert [s["active"] for s in daily["schedules"]] == [False]  # declared active, paused by the fixture
    assert daily["parameters"]["data"] == str(stack["root"] / "tiny")
    assert daily["parameters"]["config"] == str(stack["root"] / "tiny.yaml")
    assert daily["parameters"]["train_days"] == 0
    assert daily["work_pool_name"] == adhoc["work_pool_name"] == "csmf-process"
    env = daily["job_variables"]["env"]
    assert (
        env["CSMF_HOME"] == str(stack["home"]) and env["MLFLOW_TRACKING_URI"] == stack["state"]["mlflow_uri"]
    )
    if stack["backend"] == "postgres":  # the flows log to the MLflow server, not to a file of their own
        assert env["MLFLOW_TRACKING_URI"].startswith("http://127.0.0.1:")
    else:
        assert env["MLFLOW_TRACKING_URI"] == f"sqlite:///{stack['home'] / 'mlflow.db'}"
    assert env["OMP_NUM_THREADS"]
    weekly = api_get(stack["api"], "/deployments/name/csmf-tune/weekly")
    crons = [(s["schedule"].get("cron"), s["schedule"].get("timezone")) for s in weekly["schedules"]]
    assert crons == [("0 1 * * 0", "UTC")] and weekly["parameters"]["trials"] == 30
    assert weekly["parameters"]["data"] == str(stack["root"] / "tiny")
    assert weekly["work_pool_name"] == "csmf-process"
    pool = api_get(stack["api"], "/work_pools/csmf-process")
    assert pool["type"] == "process"
    pool_env = pool["base_job_template"]["variables"]["properties"]["env"]["default"]
    assert (
        pool_env["CSMF_HOME"] == str(stack["home"])
        and pool_env["MLFLOW_TRACKING_URI"] == env["MLFLOW_TRACKING_URI"]
    )
    # the flow runs' heartbeat (the worker's environment, which reaches the deployments' runs, and the
    # pool's) and the automation that counts on it (flows/automations.py)
    assert "PREFECT_FLOWS_HEARTBEAT_FREQUENCY" not in env  # prefect.yaml: an unset {{ $VAR }} would be ""
    worker = psutil.Process(stack["state"]["processes"]["worker"]["pid"]).environ()
    assert worker["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == pool_env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]
    assert pool_env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == str(HEARTBEAT_S)
    (zombie,) = zombie_automations(stack["api"])
    trigger = zombie["trigger"]
    assert trigger["posture"] == "Proactive" and trigger["within"] == 3 * HEARTBEAT_S
    assert trigger["after"] == ["prefect.flow-run.heartbeat"] and trigger["expect"] == ["prefect.flow-run.*"]
    assert [(x["type"], x["state"]) for x in zombie["actions"]] == [("change-flow-run-state", "CRASHED")]


def zombie_automations(api: str) -> list[dict]:
    autos = json.loads(_request(api, "/automations/filter", "POST", b"{}"))
    return [a for a in autos if a["name"] == automations.ZOMBIE_AUTOMATION]


SLEEPER = """
import time
from prefect import flow
from prefect.runtime import flow_run

@flow(name="csmf-zombie-check")
def sleeper():
    print("RUN", flow_run.id, flush=True)
    time.sleep(900)

sleeper()
"""


def test_killed_flow_run_is_marked_crashed(stack, tmp_path):
    """A flow run whose process dies without a word (SIGKILL, no worker watching it) is set Crashed by
    the stack's zombie automation three heartbeats after its last one; running `make serve` again would
    update that automation, not add a second (flows/automations.py). sqlite only: store-independent."""
    if stack["backend"] != "sqlite":
        pytest.skip("the automation is the Prefect server's, whatever its database: checked on sqlite")
    api = stack["api"]
    env = dict(os.environ, PREFECT_API_URL=api, PREFECT_HOME=str(tmp_path / "prefect"))
    env |= {
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    out = tmp_path / "sleeper.log"
    with out.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", SLEEPER],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        run_id = None
        while run_id is None:  # the run has started; then its first heartbeat has reached the server
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text()[-3000:]
            lines = [x for x in out.read_text().splitlines() if x.startswith("RUN ")]
            run_id = lines[0].split()[1] if lines else None
            time.sleep(0.5)
        body = {
            "filter": {
                "event": {"name": ["prefect.flow-run.heartbeat"]},
                "resource": {"id": [f"prefect.flow-run.{run_id}"]},
            }
        }
        while not json.loads(_request(api, "/events/filter", "POST", json.dumps(body).encode()))["events"]:
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text()[-3000:]
            time.sleep(1.0)
        assert api_get(api, f"/flow_runs/{run_id}")["state"]["type"] == "RUNNING"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed = time.monotonic()
    while (state := api_get(api, f"/flow_runs/{run_id}")["state"])["type"] == "RUNNING":
        assert time.monotonic() - killed < 3 * HEARTBEAT_S + 120, "still RUNNING"
        time.sleep(2.0)
    waited = time.monotonic() - killed
    print(f"killed flow run set {state['type']} after {waited:.0f} s")
    assert state["type"] == "CRASHED" and "process is gone" in (state["message"] or "")
    assert waited >= 3 * HEARTBEAT_S - HEARTBEAT_S  # not before the window (less one heartbeat's slack)
    # `make serve` again on the same server: the automation is updated, not duplicated
    res = subprocess.run(
        [sys.executable, "-m", "flows.automations", "--heartbeat", str(HEARTBEAT_S)],
        env=env, capture_output=True, text=True, cwd=deploy.PROJECT, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0 and res.stdout.startswith("updated automation"), res.stdout + res.stderr
    assert len(zombie_automations(api)) == 1


def test_daily_run_then_resumed_rerun(stack):
    """Both backends: the daily run through the worker, the registry through MLflow (postgres: and in
    the databases themselves). The resumed re-run that follows does not depend on the stores and
    runs on sqlite only: on postgres it would add about 40% to this test's time in CI."""
    home, api = stack["home"], stack["api"]
    t0 = time.perf_counter()
    prefect_run(api, home, "csmf-daily/daily", f"date={DATE}")
    t1 = time.perf_counter()
    client = mlflow.MlflowClient(stack["state"]["mlflow_uri"])
    v1 = client.get_model_version_by_alias("csmf", "champion")
    assert (
        str(v1.version) == "1" and str(client.get_model_version_by_alias("csmf", "challenger").version) == "1"
    )
    assert v1.tags["csmf.date"] == DATE and v1.tags["csmf.gate"] == "promoted"
    assert v1.tags["csmf.code_version"] == "test-deployment"
    flow_run = api_get(api, f"/flow_runs/{v1.tags['prefect.flow_run_id']}")
    assert flow_run["state"]["type"] == "COMPLETED"
    parent = client.get_run(v1.tags["csmf.parent_run_id"])
    assert parent.data.tags["csmf.resumed_stages"] == "none"

    if stack["backend"] == "postgres":
        check_postgres_stores(stack, client, parent)
        print(f"daily run {t1 - t0:.1f}s")
        return

    # a crash after recover_exposure: only the entries of the stages before it exist
    later = {"finetune_click", "cpp_prune_click", "recover_click", "finetune_conversion"}
    entries = list((home / "cache" / "stages").glob("*.json"))
    dropped = [e for e in entries if json.loads(e.read_text())["stage"] in later]
    assert len(dropped) == len(later) and len(entries) == len(later) + 5  # + ingest, select, 3 exposure steps
    for e in dropped:
        e.unlink()
    prefect_run(api, home, "csmf-daily/adhoc", f"date={DATE}", f"config={stack['root'] / 'tiny.yaml'}")
    t2 = time.perf_counter()
    # identical inputs and (deterministic training) a bit-identical model: v1 is reused, no v2
    assert [str(v.version) for v in client.search_model_versions("name='csmf'")] == ["1"]
    assert str(client.get_model_version_by_alias("csmf", "challenger").version) == "1"
    assert str(client.get_model_version_by_alias("csmf", "champion").version) == "1"
    parents = client.search_runs(
        [parent.info.experiment_id],
        f"tags.`csmf.date` = '{DATE}' and tags.`csmf.model_version` = '1'",
        order_by=["attributes.start_time DESC"],
    )
    parent2 = next(p for p in parents if "mlflow.parentRunId" not in p.data.tags)
    assert parent2.info.run_id != parent.info.run_id
    assert parent2.data.tags["csmf.registered"].startswith("reused v1: identical inputs and bit-identical")
    assert parent2.data.tags["csmf.registered"].endswith(f"registered by MLflow run {parent.info.run_id}")
    assert parent2.data.tags["csmf.gate"] == "promoted"  # "v1 is already champion"
    assert client.get_model_version("csmf", "1").tags["csmf.gate_reason"].startswith("first model")
    resumed = parent2.data.tags["csmf.resumed_stages"].split(",")
    assert sorted(resumed) == sorted(
        ["ingest", "pretrain_exposure", "cpp_prune_exposure", "recover_exposure"]
    )
    children = client.search_runs(
        [parent2.info.experiment_id], f"tags.mlflow.parentRunId = '{parent2.info.run_id}'"
    )
    by_name = {c.info.run_name: c for c in children}
    assert by_name["pretrain_exposure"].data.tags["csmf.resumed_from"] == parent.info.run_id
    assert "csmf.resumed_from" not in by_name["finetune_click"].data.tags
    # resumed steps carry the original per-step metrics, so stage comparisons stay complete
    first = {
        c.info.run_name: c
        for c in client.search_runs(
            [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
        )
    }
    key = "test/by_step/exposure/recall_at_50"
    assert by_name["recover_exposure"].data.metrics[key] == first["recover_exposure"].data.metrics[key]

    # the next day, as the schedule would run it: incremental from the champion v1
    prefect_run(api, home, "csmf-daily/daily", f"date={NEXT_DATE}")
    t3 = time.perf_counter()
    check_incremental_next_day(api, client)
    print(f"daily run {t1 - t0:.1f}s, resumed re-run {t2 - t1:.1f}s, next day (incremental) {t3 - t2:.1f}s")


def check_incremental_next_day(api: str, client) -> None:
    """v2 continues v1 (train.mode=incremental from the champion), the gate verified it, the champion
    alias is where the gate's verdict says, the flow run completed."""
    versions = sorted(int(v.version) for v in client.search_model_versions("name='csmf'"))
    assert versions == [1, 2], versions
    v1 = client.get_model_version("csmf", "1")  # the first day had no champion: a full retrain
    assert v1.tags["csmf.train_mode"] == "full" and v1.tags["csmf.last_full_date"] == DATE
    v2 = client.get_model_version("csmf", "2")
    assert v2.tags["csmf.train_mode"] == "incremental"
    assert v2.tags["csmf.parent_model_version"] == "1"
    assert v2.tags["csmf.date"] == NEXT_DATE and v2.tags["csmf.last_full_date"] == DATE
    assert v2.tags["csmf.code_version"] == "test-deployment"
    assert str(client.get_model_version_by_alias("csmf", "challenger").version) == "2"
    verdict = v2.tags["csmf.gate"]
    assert verdict in ("promoted", "kept"), verdict
    # the checks passed whatever the verdict: train.start_from=line may continue v2
    assert v2.tags["csmf.gate_verified"] == "true" and v1.tags["csmf.gate_verified"] == "true"
    champion = client.get_model_version_by_alias("csmf", "champion")
    assert str(champion.version) == {"promoted": "2", "kept": "1"}[verdict], (
        verdict,
        v2.tags["csmf.gate_reason"],
    )
    flow_run = api_get(api, f"/flow_runs/{v2.tags['prefect.flow_run_id']}")
    assert flow_run["state"]["type"] == "COMPLETED"
    parent = client.get_run(v2.tags["csmf.parent_run_id"])
    assert "mlflow.parentRunId" not in parent.data.tags and parent.data.tags["csmf.date"] == NEXT_DATE
    assert parent.data.tags["csmf.train_mode"] == "incremental" and parent.data.tags["csmf.gate"] == verdict
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    names = {c.info.run_name for c in children}
    steps = {"select", "incremental_exposure", "incremental_click", "incremental_conversion"}
    assert steps <= names, names
    assert not any(n.startswith(("pretrain", "cpp_prune", "recover", "finetune")) for n in names), names
    gate_run = next(c for c in children if c.info.run_name == "gate")
    checks = {k: v for k, v in gate_run.data.metrics.items() if k.startswith("gate/check/")}
    assert checks == {
        "gate/check/exact_fusion": 1.0,
        "gate/check/frozen_parameters": 1.0,
        "gate/check/index_matches_towers": 1.0,
    }, checks


def check_postgres_stores(stack, client, parent) -> None:
    """What the MLflow server answered is what PostgreSQL holds; Prefect's runs are in PostgreSQL;
    the artifacts went through the server; no SQLite store was created on the side."""
    import psycopg2

    home, pg = stack["home"], stack["state"]["postgres"]
    password = Path(pg["password_file"]).read_text().strip()

    def query(db: str, sql: str, *args) -> list[tuple]:
        conn = psycopg2.connect(
            host="127.0.0.1", port=pg["port"], user=pg["user"], password=password, dbname=db
        )
        try:
            with conn.cursor() as cur:
                cur.execute(sql, args)
                return cur.fetchall()
        finally:
            conn.close()

    assert query("mlflow", "SELECT name, version FROM model_versions") == [("csmf", 1)]
    aliases = query("mlflow", "SELECT alias, version FROM registered_model_aliases WHERE name = 'csmf'")
    assert sorted(aliases) == [("challenger", 1), ("champion", 1)]
    runs = {r[0] for r in query("mlflow", "SELECT run_uuid FROM runs")}
    served = {r.info.run_id for r in client.search_runs([parent.info.experiment_id], max_results=1000)}
    assert parent.info.run_id in served and served <= runs  # the parent and its stage child runs
    completed = query(
        "prefect",
        "SELECT d.name, r.id::text FROM flow_run r JOIN deployment d ON d.id = r.deployment_id "
        "WHERE r.state_type = 'COMPLETED'",
    )
    assert completed == [("daily", parent.data.tags["prefect.flow_run_id"])]
    # artifacts: the experiment's location is the server's (mlflow-artifacts:/), the files are in the
    # server's --artifacts-destination, none in the home's local artifact folder
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.artifact_location.startswith("mlflow-artifacts:/"), experiment.artifact_location
    destination = home / "mlflow-server" / "artifacts"
    assert any(p.name == "config.yaml" for p in destination.rglob("*")), f"no artifact under {destination}"
    v1 = client.get_model_version("csmf", "1")
    model_files = client.list_artifacts(parent.info.run_id)
    assert model_files, "the parent run lists no artifacts through the server"
    assert v1.source.startswith(("models:/", "mlflow-artifacts:/")), v1.source
    assert not (home / "mlartifacts").exists() or not any((home / "mlartifacts").rglob("*.*"))
    assert not (home / "mlflow.db").exists() and not (home / "prefect-server" / "prefect.db").exists()
