"""`csmf replay` for real (#16 item 4): two days of the tiny world, both lines, one `csmf run` process
per day and line, as a user runs it (the command in a process of its own, a fresh home).

    day 1 2026-01-05: full line full retrain; incremental line: no champion -> full retrain
    day 2 2026-01-06: full line full retrain; incremental line: continues its v1

The report's figures are checked against what each run logged in its line's MLflow store (read here
with MlflowClient), day 1 of the two lines against each other (the same deterministic full retrain),
and the home's own registry is untouched.

    .venv/bin/pytest -m integration tests/integration/test_replay.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest

from csmf_core.synth import generate
from flows.replay import rebuild
from tests.integration.test_gate_flow import OVERRIDES

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def replayed(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay")
    tiny = generate(root / "tiny", "tiny", seed=0).out_dir
    home, out = root / "home", root / "report"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "CSMF_"))}
    env |= {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "300"  # a loaded machine's API start
    argv = [sys.executable, "-m", "flows.cli", "replay", "--home", str(home), "--data", str(tiny)]
    argv += ["--from", "2026-01-05", "--to", "2026-01-06", "--report-dir", str(out)]
    argv += [a for o in OVERRIDES for a in ("--set", o)]
    proc = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "replay.json").read_text())
    return SimpleNamespace(root=root, home=home, out=out, proc=proc, report=report)


def test_lines_train_as_the_schedule_would(replayed):
    days = [(d["date"], d["line"], d["mode"], d["version"]) for d in replayed.report["days"]]
    assert days == [
        ("2026-01-05", "full", "full", "1"),
        ("2026-01-05", "incremental", "full", "1"),
        ("2026-01-06", "full", "full", "2"),
        ("2026-01-06", "incremental", "incremental", "2"),
    ]
    assert replayed.report["summary"]["days"] == ["2026-01-06"]
    assert "trained as incremental" in replayed.proc.stdout
    assert not (replayed.out / "replay.partial.jsonl").exists()


def test_figures_are_what_each_run_logged(replayed):
    for d in replayed.report["days"]:
        client = mlflow.MlflowClient(f"sqlite:///{Path(d['home']) / 'mlflow.db'}")
        run = client.get_run(d["mlflow_run_id"])
        assert run.data.tags["csmf.date"] == d["date"]
        assert run.data.tags["csmf.train_mode"] == d["mode"]
        logged = run.data.metrics
        for obj in ("exposure", "click", "conversion"):
            assert d["metrics"][f"{obj}/own/recall"] == pytest.approx(
                logged[f"test/{obj}/{obj}/recall_at_50"]
            )
            assert d["metrics"][f"{obj}/fused/ndcg"] == pytest.approx(logged[f"test/{obj}/fused/ndcg_at_50"])
            assert d["metrics"][f"{obj}/popularity/recall"] == pytest.approx(
                logged[f"test/{obj}/popularity/recall_at_50"]
            )
        version = client.get_model_version("csmf", d["version"])
        assert version.tags["csmf.gate"] == ("promoted" if d["promoted"] else "kept")
        assert version.tags["csmf.gate_verified"] == "true"
        names = {
            c.info.run_name
            for c in client.search_runs(
                [run.info.experiment_id], f"tags.mlflow.parentRunId = '{d['mlflow_run_id']}'"
            )
        }
        if d["mode"] == "incremental":
            assert "incremental_click" in names and "pretrain_exposure" not in names
        else:
            assert "pretrain_exposure" in names
    full1, inc1, full2, inc2 = replayed.report["days"]
    assert full1["metrics"] == inc1["metrics"]  # the same deterministic full retrain
    assert 0 < inc2["rows"] < full2["rows"] and inc2["cascade_s"] > 0
    assert inc2["parent"] == "1" and full2["parent"] == "none"


def test_rebuild_reads_the_same_days_back(replayed, tmp_path):
    import shutil

    copy = tmp_path / "report"
    shutil.copytree(replayed.out, copy)
    rebuild(copy)
    assert json.loads((copy / "replay.json").read_text())["days"] == replayed.report["days"]
    assert (copy / "replay.md").read_text() == (replayed.out / "replay.md").read_text()


def test_report_files_and_the_homes_registry(replayed):
    md = (replayed.out / "replay.md").read_text()
    assert "| 2026-01-06 | incremental | incremental |" in md and "## Summary" in md
    assert "training threads per run: 1 (train.threads)" in md  # the runs' threads, not this process's
    assert (replayed.out / "replay.png").stat().st_size > 10_000
    client = mlflow.MlflowClient(f"sqlite:///{replayed.home / 'mlflow.db'}")
    assert client.search_registered_models() == []  # the home's champion line is not touched
    exp = client.get_experiment_by_name("csmf-replay")
    (run,) = client.search_runs([exp.experiment_id])
    assert {f.path for f in client.list_artifacts(run.info.run_id)} == {
        "replay.md",
        "replay.png",
        "replay.json",
    }
    # in the home's artifact store, as every csmf experiment (not ./mlruns of the working directory)
    assert exp.artifact_location == (replayed.home / "mlartifacts").resolve().as_uri()
    assert not (replayed.root / "mlruns").exists()
    history = client.get_metric_history(run.info.run_id, "incremental/click/own/recall_at_50")
    assert [m.step for m in history] == [0, 1]
    assert history[1].value == pytest.approx(replayed.report["days"][3]["metrics"]["click/own/recall"])
