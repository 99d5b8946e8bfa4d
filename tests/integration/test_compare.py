"""`csmf compare` end to end on the tiny world: 2 methods x 2 seeds through Prefect and MLflow.

Checks the report tables against values recomputed independently from the child MLflow runs'
logged metrics (not from the flow's own records), the method tags, the artifacts, and that a
failing method is reported without stopping the others.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import pytest

import flows.compare as compare
from csmf_core.config import load_config
from csmf_core.synth import generate
from flows.compare import csmf_compare
from flows.compare_render import rebuild_report
from tests.integration.conftest import temporary_api

pytestmark = pytest.mark.integration

OVERRIDES = [
    "model.dim=16",
    "model.hidden=[32]",
    "train.epochs=[1,1,1]",
    "train.batch_size=256",
    "train.threads=1",
    "recover.epochs=1",
    "data.seq_len=5",
    "data.n_req_neg=4",
    "eval.ks=[10,50]",
    "data.val_days=1",  # every method: epochs chosen on the last training day, then a refit
    "data.item_stats=[1]",  # every method reads the item statistics
]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    generate(root / "synth-tiny", "tiny", seed=0)
    mp = pytest.MonkeyPatch()
    mp.setattr(compare, "LATENCY_ITEMS", 2000)  # keep the latency probe small in tests
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'home' / 'mlflow.db'}")
    try:
        with temporary_api():
            out = csmf_compare(
                data=str(root / "synth-tiny"),
                methods="youtubednn_mix,csmf",
                seeds=2,
                overrides=OVERRIDES,
                home=str(root / "home"),
                sweeps="weights",
                report_dir=str(root / "report"),
            )
    finally:
        mp.undo()
    return {"root": root, "out": out, "report": root / "report"}


def _child_metrics(out) -> list[tuple[dict, dict]]:
    client = mlflow.MlflowClient(out["tracking_uri"])
    parent = client.get_run(out["mlflow_run_id"])
    runs = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{out['mlflow_run_id']}'"
    )
    return [(r.data.tags, r.data.metrics) for r in runs if "method" in r.data.tags]


def test_children_tagged_per_method_and_seed(compared):
    kids = _child_metrics(compared["out"])
    got = sorted((t["method"], t["seed"]) for t, _ in kids)
    assert got == [("csmf", "0"), ("csmf", "1"), ("youtubednn_mix", "0"), ("youtubednn_mix", "1")]
    for _, m in kids:
        assert math.isfinite(m["test/click/recall_at_50"]) and m["serving/item_bytes_per_item"] == 64
    assert compared["out"]["runs"] == 4


def test_report_cell_recomputed_from_mlflow(compared):
    md = (compared["report"] / "comparison.md").read_text()
    kids = _child_metrics(compared["out"])
    vals = [
        m["test/conversion/recall_at_50"]
        for t, m in sorted(kids, key=lambda x: x[0]["seed"])
        if t["method"] == "csmf"
    ]
    mean = sum(vals) / 2
    half = 12.706205 * abs(vals[0] - vals[1]) / math.sqrt(2) / math.sqrt(2)  # t_{.975,1} * s / sqrt(n)
    row = next(ln for ln in md.splitlines() if ln.startswith("| csmf | 2 |"))
    assert f"{mean:.4f} ± {half:.4f}" in row
    assert "## Accuracy" in md and "## Serving" in md and "k_click" in md
    assert "## Ablations" not in md  # csmf is the only ablation-family method run: no ablation table
    serving = next(ln for ln in md.splitlines() if ln.startswith("| youtubednn_mix | click,conversion |"))
    assert "| 64 |" in serving  # one 16-d vector shared by click and conversion: 64 bytes per item


def test_report_files_and_mlflow_artifacts(compared):
    rep = compared["report"]
    data = json.loads((rep / "runs.json").read_text())
    assert len(data["runs"]) == 4 and data["meta"]["methods"] == ["youtubednn_mix", "csmf"]
    assert (rep / "figures" / "accuracy.png").stat().st_size > 1000
    assert not (rep / "runs.partial.jsonl").exists()
    client = mlflow.MlflowClient(compared["out"]["tracking_uri"])
    names = {f.path for f in client.list_artifacts(compared["out"]["mlflow_run_id"], "report")}
    assert {"report/comparison.md", "report/runs.json", "report/table2_accuracy.json"} <= names


def test_rebuild_from_partial_runs(compared, tmp_path):
    data = json.loads((compared["report"] / "runs.json").read_text())
    meta = {**data["meta"], "seeds": 3}
    (tmp_path / "meta.partial.json").write_text(json.dumps(meta))
    fail = {"failed": "csmf", "seed": 2, "error": "TrainingDiverged: loss nan"}
    lines = [json.dumps(r) for r in data["runs"]] + [json.dumps(fail)]
    (tmp_path / "runs.partial.jsonl").write_text("\n".join(lines) + "\n")
    md = Path(rebuild_report(tmp_path)).read_text()
    assert "Partial report" in md and "4 of 6 runs finished" in md and "seeds with every method: [0, 1]" in md
    assert "csmf seed 2: TrainingDiverged: loss nan" in md


def test_report_states_one_protocol_for_every_method(compared):
    """Every method was selected on the validation day and refit: the report says so, and each run's
    record carries the epochs it kept (within the caps) and its fused weights."""
    text = (compared["report"] / "comparison.md").read_text()
    assert "- **Protocol**: One protocol for every method (data.val_days=1" in text
    assert "Item statistics: [1] for every method" in text and "No tuning" in text
    assert "is not applied by the comparison" not in text
    runs = json.loads((compared["report"] / "runs.json").read_text())["runs"]
    assert {(r["method"], r["seed"]) for r in runs} == {
        (m, s) for m in ("youtubednn_mix", "csmf") for s in (0, 1)
    }
    for r in runs:
        kept = r["protocol"]["epochs"]
        assert kept and all(0 <= e <= 1 for e in kept.values()), kept
        assert len(r["protocol"]["weights"]) == 3 and r["protocol"]["val_score"] > 0
        assert f"  - {r['method']}: epochs kept" in text


def test_report_has_the_popularity_floor(compared):
    """The popularity ranking on the same split: a row under the methods (no interval), equal to the
    value logged on the parent run, and one sentence per metric placing csmf above or below it."""
    md = (compared["report"] / "comparison.md").read_text()
    client = mlflow.MlflowClient(compared["out"]["tracking_uri"])
    logged = client.get_run(compared["out"]["mlflow_run_id"]).data.metrics
    row = next(ln for ln in md.splitlines() if ln.startswith("| popularity (no training) | – |"))
    cells = [c.strip() for c in row.strip("|").split("|")][2:]  # click R, click N, conversion R, conversion N
    want = [
        logged[f"reference/popularity/{o}/{m}_at_50"]
        for o in ("click", "conversion")
        for m in ("recall", "ndcg")
    ]
    assert cells == [f"{v:.4f}" for v in want]
    csmf = [m["test/click/recall_at_50"] for t, m in _child_metrics(compared["out"]) if t["method"] == "csmf"]
    side = "above" if sum(csmf) / 2 > want[0] else "BELOW"
    assert f"click recall@50: csmf {sum(csmf) / 2:.4f} is {side} popularity {want[0]:.4f}" in md


def test_rerender_a_finished_report(compared, tmp_path):
    """A finished report renders again from its runs.json alone, to the same markdown."""
    (tmp_path / "runs.json").write_text((compared["report"] / "runs.json").read_text())
    md = Path(rebuild_report(tmp_path)).read_text()
    assert md == (compared["report"] / "comparison.md").read_text()
    assert "Partial report" not in md


def test_tune_trials_give_each_method_its_budget_and_the_seeds_train_the_best(tmp_path):
    """`--tune-trials 2`: one `<method>/tune` child run with 2 trials over the method's own space; its
    best score is the best trial's (recomputed from the trials table); the seed run trains exactly the
    base configuration with the best trial's changed keys applied (read back from the seed run's
    logged params); the report states the budget."""
    generate(tmp_path / "synth-tiny", "tiny", seed=0)
    mp = pytest.MonkeyPatch()
    mp.setattr(compare, "LATENCY_ITEMS", 2000)
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")
    overrides = [o for o in OVERRIDES if not o.startswith("data.item_stats")]
    try:
        with temporary_api():
            out = csmf_compare(
                data=str(tmp_path / "synth-tiny"),
                methods="youtubednn_sep",
                seeds=1,
                overrides=overrides,
                home=str(tmp_path / "home"),
                report_dir=str(tmp_path / "report"),
                tune_trials=2,
            )
    finally:
        mp.undo()
    text = (tmp_path / "report" / "comparison.md").read_text()
    assert "Tuning budget: 2 Optuna trials (TPE, seed 0) per method" in text
    client = mlflow.MlflowClient(out["tracking_uri"])
    parent = client.get_run(out["mlflow_run_id"])
    children = {
        r.info.run_name: r
        for r in client.search_runs(
            [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{out['mlflow_run_id']}'"
        )
    }
    tune_run = children["youtubednn_sep/tune"]
    trials_path = client.download_artifacts(tune_run.info.run_id, "tune/trials.json", str(tmp_path / "dl"))
    trials = json.loads(Path(trials_path).read_text())
    rows = [dict(zip(trials["columns"], r)) for r in trials["data"]] if "columns" in trials else trials
    assert len(rows) == 2
    # keys the user fixed with --set (train.epochs, train.batch_size) are never searched (they were,
    # silently: a bound like train.epochs=[1,1,1] was replaced by trials of up to 16 epochs)
    searched = {k for r in rows for k in r if k not in ("trial", "state", "score", "error")}
    assert searched and not [k for k in searched if k.startswith(("train.epochs", "train.batch_size"))]
    done = [r for r in rows if r["state"] == "complete"]
    assert tune_run.data.metrics["tune/complete"] == len(done)
    assert math.isclose(tune_run.data.metrics["tune/best_score"], max(r["score"] for r in done))
    tuned_path = client.download_artifacts(tune_run.info.run_id, "tune/tuned.json", str(tmp_path / "dl2"))
    tuned = json.loads(Path(tuned_path).read_text())
    assert json.loads((tmp_path / "report" / "runs.json").read_text())["meta"]["protocol"]["tuned"] == {
        "youtubednn_sep": tuned
    }
    # the report's item statistics are those the tuned method trained with (it said the base config's)
    stats = tuned.get("data", {}).get("item_stats", [])
    assert f"Item statistics: {list(stats) or 'off'} for every method." in text
    seed_params = children["youtubednn_sep/seed0"].data.params
    base = load_config(None, overrides)
    assert tuned, "two trials over lr, batch size, epochs... changed nothing"
    for section, values in base.to_dict().items():
        for key, value in values.items():
            want = tuned.get(section, {}).get(key, value)
            want = json.dumps(list(want)) if isinstance(want, list | tuple) else str(want)
            assert seed_params[f"{section}.{key}"] == want, (section, key)
