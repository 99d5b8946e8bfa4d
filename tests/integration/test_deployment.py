"""The deployment loop for real: `make serve`'s stack on loopback, `prefect deployment run`, MLflow.

python -m flows.deploy up   (Prefect server on a free 127.0.0.1 port, process pool, prefect.yaml
                             deployments, worker; all state under a temporary home)
prefect deployment run 'csmf-daily/daily' --param date=2026-01-06 --watch
    -> registry: v1 is champion and challenger, tagged with the date and the flow run
(delete the cache entries of the steps after recover_exposure: a run that crashed there)
prefect deployment run 'csmf-daily/adhoc' --param date=2026-01-06 --watch
    -> ingest .. recover_exposure resumed, the rest trained (deterministically: the same model);
       no v2: v1 is reused (identical inputs and model digest), still champion and challenger
python -m flows.deploy down -> every started process is gone

.venv/bin/pytest -m integration tests/integration/test_deployment.py -s
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import psutil
import pytest

from csmf_core.synth import generate
from flows import deploy

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = """\
model: {dim: 16, hidden: [32]}
train: {epochs: [1, 1, 1], batch_size: 256, threads: 1}
recover: {epochs: 1}
eval: {ks: [10, 50]}
"""
DATE = "2026-01-06"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefect_run(api: str, home: Path, deployment: str, *params: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_API_URL": api, "PREFECT_HOME": str(home / "prefect-server")}
    cmd = [sys.executable, "-m", "prefect", "deployment", "run", deployment]
    for p in params:
        cmd += ["--param", p]
    res = subprocess.run(
        [*cmd, "--watch", "--watch-interval", "2", "--watch-timeout", "300"],
        env=env,
        capture_output=True,
        text=True,
        timeout=330,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "Completed" in out, out[-4000:]
    return out


def api_get(api: str, path: str) -> dict:
    with urllib.request.urlopen(f"{api}{path}", timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    home = root / "home"
    generate(root / "tiny", "tiny", seed=0)
    (root / "tiny.yaml").write_text(TINY)
    t0 = time.perf_counter()
    mp = pytest.MonkeyPatch()
    # the worker (and so every flow run) inherits these: a commit landing in this checkout during
    # the test must not change the code version between the two runs; poll for work every 2 s
    mp.setenv("CSMF_CODE_VERSION", "test-deployment")
    mp.setenv("PREFECT_WORKER_QUERY_SECONDS", "2")
    try:
        state = deploy.up(home, port=free_port(), data=root / "tiny", config=root / "tiny.yaml")
        print(f"\nstack up in {time.perf_counter() - t0:.1f}s")
        yield {"home": home, "state": state, "api": state["api_url"], "root": root}
    finally:
        mp.undo()
        state = deploy.read_state(home)
        deploy.down(home)
        if state:
            for name, entry in state["processes"].items():
                assert not deploy._alive(entry), f"{name} still running after down()"
                assert (
                    not psutil.pid_exists(entry["pid"]) or psutil.Process(entry["pid"]).status() == "zombie"
                )


def test_deployments_declared_by_prefect_yaml(stack):
    daily = api_get(stack["api"], "/deployments/name/csmf-daily/daily")
    adhoc = api_get(stack["api"], "/deployments/name/csmf-daily/adhoc")
    crons = [(s["schedule"].get("cron"), s["schedule"].get("timezone")) for s in daily["schedules"]]
    assert crons == [("0 3 * * *", "UTC")] and adhoc["schedules"] == []
    assert daily["parameters"]["data"] == str(stack["root"] / "tiny")
    assert daily["parameters"]["config"] == str(stack["root"] / "tiny.yaml")
    assert daily["parameters"]["train_days"] == 0
    assert daily["work_pool_name"] == adhoc["work_pool_name"] == "csmf-process"
    env = daily["job_variables"]["env"]
    assert env["CSMF_HOME"] == str(stack["home"]) and env["MLFLOW_TRACKING_URI"].startswith("sqlite:///")
    assert env["OMP_NUM_THREADS"]
    weekly = api_get(stack["api"], "/deployments/name/csmf-tune/weekly")
    crons = [(s["schedule"].get("cron"), s["schedule"].get("timezone")) for s in weekly["schedules"]]
    assert crons == [("0 1 * * 0", "UTC")] and weekly["parameters"]["trials"] == 30
    assert weekly["parameters"]["data"] == str(stack["root"] / "tiny")
    assert weekly["work_pool_name"] == "csmf-process"
    pool = api_get(stack["api"], "/work_pools/csmf-process")
    assert pool["type"] == "process"
    assert pool["base_job_template"]["variables"]["properties"]["env"]["default"]["CSMF_HOME"] == str(
        stack["home"]
    )


def test_daily_run_then_resumed_rerun(stack):
    home, api = stack["home"], stack["api"]
    t0 = time.perf_counter()
    prefect_run(api, home, "csmf-daily/daily", f"date={DATE}")
    t1 = time.perf_counter()
    client = mlflow.MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
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
    print(f"daily run {t1 - t0:.1f}s, resumed re-run {t2 - t1:.1f}s")
