"""The daily flow for real: Prefect (test harness) + MLflow (SQLite in a tmp home) on tiny data.

One happy-path flow run is shared by the layout/metrics/registry assertions; the bad-data cases
each run the flow on a broken copy of the same data against a second tracking store and must fail
in ingest (or at the first training step for a diverged loss) without registering anything.

    .venv/bin/pytest -m integration tests/integration/test_pipeline.py
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pandas as pd
import polars as pl
import pytest

from csmf_core.cascade import plan
from csmf_core.config import build_config, load_config
from csmf_core.optim import TrainingDiverged
from csmf_core.synth import generate
from data_contracts import ContractError
from flows.names import WORKDIR_TAG
from flows.pipeline import csmf_daily
from flows.registry import REGISTERED_MODEL, load_recommender, resolve_bundle

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

OVERRIDES = [
    "model.dim=16",
    "model.hidden=[32]",
    "train.epochs=[1,1,1]",
    "train.batch_size=256",
    "train.threads=1",  # 2 shared cores: one torch thread is several times faster than two here
    "recover.epochs=1",
    "eval.ks=[10,50]",
    "data.item_stats=[1,2]",  # point-in-time item statistics through every task, the bundle and the gate
]
OBJECTIVES = ["exposure", "click", "conversion"]
STEPS = [s.name for s in plan(OBJECTIVES, build_config(None, OVERRIDES))]
CHILDREN = ["ingest", "select", *STEPS, "build_index", "evaluate", "register", "gate"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "synth-tiny"
    generate(out, "tiny", seed=0)
    return out


@contextmanager
def _store(home: Path) -> Iterator[mlflow.MlflowClient]:
    """Point MLflow and the csmf home variables at `home`; restore both afterwards (the flow calls
    mlflow.set_tracking_uri, a process-wide setting)."""
    uri = f"sqlite:///{home / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("CSMF_HOME", str(home))
        mp.setenv("PREFECT_HOME", str(home / "prefect"))
        try:
            yield mlflow.MlflowClient(uri)
        finally:
            mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def happy(prefect_harness, tiny, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    mlflow_records: list[logging.LogRecord] = []
    mlflow_handler = logging.Handler(logging.WARNING)
    mlflow_handler.emit = mlflow_records.append
    task_log, mlflow_log = logging.getLogger("prefect.task_runs"), logging.getLogger("mlflow")
    task_log.addHandler(handler)
    mlflow_log.addHandler(mlflow_handler)
    with _store(home) as client:
        t0 = time.perf_counter()
        try:
            # by file:// URI: the whole run reads the dataset through csmf_core.fsutil (issue #19)
            result = csmf_daily(data=tiny.as_uri(), home=str(home), overrides=OVERRIDES)
        finally:
            task_log.removeHandler(handler)
            mlflow_log.removeHandler(mlflow_handler)
        seconds = time.perf_counter() - t0
        exp = client.get_experiment_by_name("csmf")
        runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
        parent = next(r for r in runs if r.info.run_id == result["mlflow_run_id"])
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        yield SimpleNamespace(
            result=result,
            client=client,
            home=home,
            parent=parent,
            seconds=seconds,
            children={r.info.run_name: r for r in children},
            order=[r.info.run_name for r in children],
            logs=[r.getMessage() for r in records],
            mlflow_warnings=[r.getMessage() for r in mlflow_records],
        )


def _artifacts(client: mlflow.MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    """Every artifact file path of a run (recursive)."""
    out = set()
    for a in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, a.path) if a.is_dir else {a.path}
    return out


def _by_step(run) -> dict[str, float]:
    return {k: v for k, v in run.data.metrics.items() if k.startswith("test/by_step/")}


# ---- happy path ----------------------------------------------------------------------------------
def test_parent_run_and_one_child_per_step(happy):
    p = happy.parent
    assert p.info.status == "FINISHED" and p.info.run_name == f"csmf-daily-{p.data.tags['csmf.date']}"
    assert p.data.tags["csmf.date"] == "2026-01-06"  # default: the last partition
    for tag in ("csmf.dataset_digest", "csmf.config_digest", "csmf.code_version", "prefect.flow_run_id"):
        assert p.data.tags[tag], tag
    assert p.data.tags["csmf.dataset"] == "synth-tiny"
    assert p.data.tags["csmf.config_digest"] == build_config(None, OVERRIDES).digest()
    assert p.data.params["train.batch_size"] == "256"
    assert happy.order == CHILDREN
    assert all(r.info.status == "FINISHED" for r in happy.children.values())
    r = happy.result
    assert r["experiment"] == "csmf" and r["model_version"] == "1" and r["tracking_uri"].startswith("sqlite:")
    assert Path(r["bundle_dir"], "bundle.json").is_file()
    assert Path(r["workdir"]).parent == happy.home / "runs" / "2026-01-06"
    assert "| conversion | fused |" in r["metrics_table"]
    print(f"happy-path flow run: {happy.seconds:.1f}s")


def test_final_metrics_table_is_not_logged_before_csmf_run_prints_it(happy):
    """`csmf run` prints summary_table once at the end (flows/cli.py summarize_run); the evaluate task
    logs a one-line summary instead of the same table (issue #17: it was printed twice)."""
    from csmf_core.serving import summary_table

    title = summary_table(happy.result["metrics"], 50).splitlines()[0]
    evaluation = [m for m in happy.logs if m.startswith("evaluation:")]
    assert len(evaluation) == 1 and "\n" not in evaluation[0], evaluation
    assert not any(title in m for m in happy.logs)
    fused = {
        r["objective"]: r["recall"]
        for r in happy.result["metrics"]
        if r["scorer"] == "fused" and r["k"] == 50
    }
    assert all(f"{o} fused recall@50 {v:.4f}" in evaluation[0] for o, v in fused.items())


def test_artifacts_where_they_belong(happy):
    c = happy.client
    for name in STEPS:
        files = _artifacts(c, happy.children[name].info.run_id)
        assert {"checkpoint/model.pt", "checkpoint/checkpoint.json", "checkpoint/masks/masks.json"} <= files
        changes_masks = name.startswith("cpp_prune_") or name == STEPS[0]
        assert ("masks/masks.json" in files) == changes_masks, name
        assert ("prune/layers.json" in files) == name.startswith("cpp_prune_"), name
        # drawn by the run's figure process after the gate, logged to the step's own run
        assert ("figures/ownership.png" in files) == name.startswith("cpp_prune_"), name
    assert "validation/report.md" in _artifacts(c, happy.children["ingest"].info.run_id)
    assert {"index/index.faiss", "index/ids.npy"} <= _artifacts(c, happy.children["build_index"].info.run_id)
    expected = {
        "metrics/test_metrics.json",
        "metrics/test_metrics.md",
        "figures/recall_at_k.png",
        "figures/ownership.png",
    }
    assert expected <= _artifacts(c, happy.children["evaluate"].info.run_id)
    assert expected | {"config/config.yaml"} <= _artifacts(c, happy.parent.info.run_id)
    assert not (Path(happy.parent.data.tags[WORKDIR_TAG]) / "figures").exists()  # removed once logged
    prune = happy.children["cpp_prune_exposure"].data.metrics
    assert 0.0 <= prune["prune/mass_share_pruned"] <= 1.0 and prune["prune/units_freed"] > 0
    assert any(k.startswith("prune/user.") and k.endswith("/mass_share_pruned") for k in prune)


def test_stage_metrics_are_comparable(happy):
    ks = (10, 50)
    kept = [int(e) for e in happy.parent.data.tags["csmf.selected_epochs"].split(",")]
    for name in STEPS:
        run = happy.children[name]
        stage = int(run.data.tags["csmf.stage"])
        want = {
            f"test/by_step/{o}/{m}_at_{k}"
            for o in OBJECTIVES[: stage + 1]
            for m in ("recall", "ndcg")
            for k in ks
        }
        assert set(_by_step(run)) == want, name
        if not name.startswith("cpp_prune_"):
            # the mean loss of every 10 steps, at each window's last step (the last window may be short)
            losses = happy.client.get_metric_history(run.info.run_id, "train/loss")
            steps = int(run.data.metrics["train/steps"])
            want = [*range(10, steps + 1, 10), *([steps] if steps % 10 else [])]
            assert sorted(m.step for m in losses) == want
            # the refit trains each train step for the epochs the selection pass kept (0 = its start)
            trained = run.data.metrics["train/steps"] > 0
            assert trained if name.startswith("recover_") else trained == (kept[stage] > 0), (name, kept)
    history = happy.client.get_metric_history(happy.parent.info.run_id, "test/by_step/exposure/recall_at_50")
    assert sorted(m.step for m in history) == list(range(len(STEPS)))
    test = happy.parent.data.metrics
    for o in OBJECTIVES:
        for scorer in (o, "fused", "popularity"):
            assert 0.0 <= test[f"test/{o}/{scorer}/recall_at_50"] <= 1.0
        for m in ("recall", "ndcg"):  # paired model-minus-popularity: the difference of the logged means
            for part, scorer in (("", o), ("fused/", "fused")):
                gap = f"test/{o}/{part}vs_popularity/{m}_at_50"
                want = test[f"test/{o}/{scorer}/{m}_at_50"] - test[f"test/{o}/popularity/{m}_at_50"]
                assert test[gap] == pytest.approx(want, abs=1e-9)
                assert test[f"{gap}/lo"] <= test[gap] <= test[f"{gap}/hi"]
    assert "metrics/vs_popularity.md" in _artifacts(happy.client, happy.children["evaluate"].info.run_id)


def test_later_stages_leave_exposure_untouched(happy):
    after = STEPS[STEPS.index("recover_exposure") :]
    base = {
        k: v for k, v in _by_step(happy.children[after[0]]).items() if k.startswith("test/by_step/exposure/")
    }
    assert base
    for name in after[1:]:
        got = {
            k: v for k, v in _by_step(happy.children[name]).items() if k.startswith("test/by_step/exposure/")
        }
        assert got == base, name


def test_prefect_artifacts(happy):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run_id = happy.parent.data.tags["prefect.flow_run_id"]
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    by_key = {a.key: a for a in arts}
    assert {"csmf-metrics", "csmf-mlflow-run", "csmf-validation", "csmf-summary"} <= set(by_key)
    assert happy.parent.info.run_id in str(by_key["csmf-mlflow-run"].data)


def test_prefect_names_match_mlflow_and_the_flow_run_has_a_summary(happy):
    """Issue #17 item 6: flow run `csmf-daily-<date>` (= the MLflow parent's name), every task run that
    has an MLflow child run named exactly like it, and the summary artifact on the flow run itself."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run_id = happy.parent.data.tags["prefect.flow_run_id"]
    only = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    want = set(CHILDREN) | {"open_run", "retention", "publish"}
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        # task runs are recorded by the server from the client's events, which may still be queued
        # when the flow returns: wait for them (a minute at most), then compare
        deadline = time.monotonic() + 60
        while True:
            names = {t.name for t in client.read_task_runs(flow_run_filter=only)}
            if want <= names or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        arts = client.read_artifacts(flow_run_filter=only)
    assert flow_run.name == "csmf-daily-2026-01-06" == happy.parent.info.run_name
    assert set(CHILDREN) <= names, sorted(names)
    assert {"open_run", "retention", "publish"} <= names  # the bookkeeping tasks: no random suffix either
    (summary,) = [a for a in arts if a.key == "csmf-summary"]
    assert summary.task_run_id is None  # the flow run's own artifact, not a task's
    text = str(summary.data)
    assert "model version 1" in text and "promoted to champion" in text
    for o in OBJECTIVES:
        r = happy.parent.data.metrics[f"test/{o}/fused/recall_at_50"]
        assert f"| {o} |" in text and f"{r:.4f} /" in text


def test_registered_model_loads_and_predicts(happy, tiny):
    c = happy.client
    versions = c.search_model_versions(f"name='{REGISTERED_MODEL}'")
    assert [str(v.version) for v in versions] == ["1"]
    mv = c.get_model_version_by_alias(REGISTERED_MODEL, "challenger")
    champion = c.get_model_version_by_alias(REGISTERED_MODEL, "champion")
    assert str(mv.version) == "1" and str(champion.version) == "1"
    assert mv.tags["csmf.parent_run_id"] == happy.parent.info.run_id
    users = pl.read_parquet(tiny / "users.parquet")["user_id"].head(2).to_list()
    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED_MODEL}@challenger")
    frame = pd.DataFrame({"user_id": [*users, -5], "k": [10, 10, 5], "weights": [None, "1,3,0.5", None]})
    out = model.predict(frame)
    assert list(out.columns) == ["user_id", "item_ids", "scores", "cold_start"]
    assert out["user_id"].tolist() == [*users, -5]
    assert [len(x) for x in out["item_ids"]] == [10, 10, 5]
    assert out["cold_start"].tolist() == [False, False, True]
    assert all(list(s) == sorted(s, reverse=True) for s in out["scores"])
    bundle = resolve_bundle(f"models:/{REGISTERED_MODEL}@challenger", home=happy.home)
    assert (bundle / "bundle.json").is_file() and (bundle / "features" / "item_stats.parquet").is_file()
    assert resolve_bundle(happy.parent.info.run_id, home=happy.home) == bundle
    assert resolve_bundle(None, home=happy.home) == bundle
    rec = load_recommender(f"models:/{REGISTERED_MODEL}/1", home=happy.home)
    assert rec.recommend(users[:1], k=3)[0]["items"] == out["item_ids"][0][:3]


def test_registered_version_describes_itself(happy, tiny):
    """Issue #17 item 3, read back from the store: signature, input example, models from code (no
    pickle), params and metrics on the logged model, the model card, the registered model's description,
    and none of MLflow's signature / CloudPickle warnings while the flow logged the model."""
    c, parent = happy.client, happy.parent
    assert not [
        m for m in happy.mlflow_warnings if "signature" in m or "CloudPickle" in m or "serving input" in m
    ]
    info = mlflow.models.get_model_info(f"models:/{REGISTERED_MODEL}/1")
    assert info.signature.inputs.input_names() == ["user_id", "k", "weights", "mode"]
    assert info.signature.outputs.input_names() == ["user_id", "item_ids", "scores", "cold_start"]
    assert info.flavors["python_function"].get("model_code_path")  # models from code
    local = resolve_bundle(f"models:/{REGISTERED_MODEL}/1", home=happy.home).parent.parent
    assert not list(local.rglob("python_model.pkl"))
    example = mlflow.models.Model.load(str(local)).load_input_example(str(local))
    known = set(pl.read_parquet(tiny / "users.parquet")["user_id"].to_list())
    assert len(example) == 2 and set(example["user_id"]) <= known
    served = mlflow.pyfunc.load_model(f"models:/{REGISTERED_MODEL}/1").predict(example)
    assert [len(x) for x in served["item_ids"]] == list(example["k"]) and not served["cold_start"].any()

    mv = c.get_model_version(REGISTERED_MODEL, "1")
    assert mv.source == f"models:/{info.model_id}"
    logged = c.get_logged_model(info.model_id)
    tags, metrics = parent.data.tags, parent.data.metrics
    assert logged.params["dataset_digest"] == tags["csmf.dataset_digest"]
    assert logged.params["config_digest"] == tags["csmf.config_digest"]
    assert logged.params["objectives"] == ",".join(OBJECTIVES) and logged.params["date"] == "2026-01-06"
    on_model = {m.key: m.value for m in logged.metrics}
    final = re.compile(r"test/(exposure|click|conversion)/(\w+)/(recall|ndcg)_at_50")
    want = {k: v for k, v in metrics.items() if (m := final.fullmatch(k)) and m[2] != "vs_popularity"}
    assert len(want) >= 3 * 4 * 2 and on_model == pytest.approx(
        want, abs=1e-12
    )  # own, fused, popularity, random

    card = mv.description
    train = sorted(p.name[3:] for p in (tiny / "events").iterdir())[:-1]  # every day before 2026-01-06
    for text in (
        f"| training window | {train[0]} .. {train[-1]} ({len(train)} days) |",
        "| evaluation day(s) | 2026-01-06 |",
        f"| dataset digest | {tags['csmf.dataset_digest']} |",
        f"| config digest | {tags['csmf.config_digest']} |",
        "| objectives (cascade order) | exposure -> click -> conversion |",
        f"| MLflow parent run | {parent.info.run_id} |",
        "## Gate decision",
        "**promoted to champion**",
        mv.tags["csmf.gate_reason"],
    ):
        assert text in card, (text, card)
    for o in OBJECTIVES:
        row = next(ln for ln in card.splitlines() if ln.startswith(f"| {o} |"))
        for scorer in (o, "fused", "popularity"):
            r, n = (metrics[f"test/{o}/{scorer}/{m}_at_50"] for m in ("recall", "ndcg"))
            assert f"{r:.4f} / {n:.4f}" in row, (o, scorer, row)
        gap = metrics[f"test/{o}/fused/recall_at_50"] - metrics[f"test/{o}/popularity/recall_at_50"]
        assert row.endswith(f"| {gap:+.4f} |")
    assert "pending" not in card
    described = c.get_registered_model(REGISTERED_MODEL).description
    assert "exposure, click, conversion" in described and "`champion`" in described


def test_lineage_on_the_parent_and_every_child(happy, tiny):
    """Issue #17 item 4: the parent's dataset inputs (training window and evaluation days, each with the
    digest of the files it reads and the dataset directory as source), Source/User tags and a
    description on every run."""
    import getpass
    import json

    from flows.inputs import dataset_digest

    p = happy.parent
    days = sorted(d.name[3:] for d in (tiny / "events").iterdir())
    train, evals = days[:-1], days[-1:]
    inputs = {_context(i): i for i in p.inputs.dataset_inputs}
    assert sorted(inputs) == ["evaluation", "training"]
    for context, dates in (("training", train), ("evaluation", evals)):
        ds = inputs[context].dataset
        tags = {t.key: t.value for t in inputs[context].tags}
        assert tags["csmf.dates"] == ",".join(dates) and tags["csmf.days"] == str(len(dates))
        assert ds.digest == dataset_digest(tiny, dates)[0]
        assert json.loads(ds.source) == {"uri": str(tiny)} and ds.source_type == "local"
        assert ds.name.startswith("synth-tiny " + ("train" if context == "training" else "eval"))
    assert inputs["training"].dataset.digest != inputs["evaluation"].dataset.digest
    user = getpass.getuser()
    for run in [p, *happy.children.values()]:
        assert run.data.tags["mlflow.user"] == user, run.info.run_name
        assert run.data.tags["mlflow.source.name"] == "csmf-daily (Prefect flow, flows/pipeline.py)"
        assert run.data.tags.get("mlflow.note.content"), run.info.run_name
    note = p.data.tags["mlflow.note.content"]
    assert f"training window: {train[0]} .. {train[-1]} ({len(train)} days)" in note
    assert f"evaluation day(s): {evals[0]}" in note and "`synth-tiny`" in note
    assert "stage click" in happy.children["finetune_click"].data.tags["mlflow.note.content"]
    assert (
        "CPP pruning after stage exposure"
        in happy.children["cpp_prune_exposure"].data.tags["mlflow.note.content"]
    )


def test_cascade_at_a_glance(happy):
    """Issue #17 item 5: the parent's figures/cascade.png and metrics/by_step.{json,md} name every step and
    hold exactly the test/by_step values the steps logged on the parent (read back per metric here)."""
    import json

    c, p = happy.client, happy.parent
    files = _artifacts(c, p.info.run_id)
    assert {"figures/cascade.png", "metrics/by_step.json", "metrics/by_step.md"} <= files
    local = Path(c.download_artifacts(p.info.run_id, "figures/cascade.png"))
    assert local.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and local.stat().st_size > 10_000
    table = json.loads(Path(c.download_artifacts(p.info.run_id, "metrics/by_step.json")).read_text())
    rows = [dict(zip(table["columns"], r)) for r in table["data"]] if "columns" in table else table
    assert [r["name"] for r in rows] == STEPS and [r["step"] for r in rows] == list(range(len(STEPS)))
    stage_of = {name: happy.children[name].data.tags["csmf.stage_name"] for name in STEPS}
    assert [r["stage"] for r in rows] == [stage_of[n] for n in STEPS]
    for o in OBJECTIVES:
        for m in ("recall", "ndcg"):
            for k in (10, 50):
                logged = {
                    h.step: h.value
                    for h in c.get_metric_history(p.info.run_id, f"test/by_step/{o}/{m}_at_{k}")
                }
                cells = {r["step"]: r[f"{o} {m}@{k}"] for r in rows}
                got = {step: v for step, v in cells.items() if v is not None and v == v}  # NaN/null: not yet
                # MLflow's log_table writes 10 decimals (pandas to_json); the markdown shows 4
                assert got == pytest.approx(logged, abs=1e-9) and set(got) == set(logged), (o, m, k)
                first = OBJECTIVES.index(o)  # an objective appears from its own stage's first step on
                assert min(got) == next(
                    i for i, n in enumerate(STEPS) if OBJECTIVES.index(stage_of[n]) == first
                )
    md = Path(c.download_artifacts(p.info.run_id, "metrics/by_step.md")).read_text()
    assert "test split" in md and all(f"| {n} |" in md for n in STEPS)


def test_ui_screenshots_of_the_run(happy, tmp_path):
    """bench/ui_screenshots.py against this run's home: three non-blank PNGs of the real MLflow UI
    (skipped, with the script's own reason, where no Chromium is installed)."""
    import subprocess
    import sys

    sys.path.insert(0, str(ROOT))
    from bench import ui_screenshots as shots

    if shots.find_chromium() is None:
        pytest.skip(shots.skip_message())
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "ui_screenshots.py"),
            "--home",
            str(happy.home),
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"parent run {happy.parent.info.run_id}" in done.stdout
    for stem in ("parent_run", "cascade_figure", "model_version"):
        png = tmp_path / f"{stem}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > shots.MIN_PNG_BYTES, stem


def test_a_failed_flow_run_calls_the_failure_webhook(prefect_harness, monkeypatch):
    """flows/notify.py for real: Prefect runs the hook when a flow run fails, and the notice reaches a
    loopback webhook with the flow run's name, state and error."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from prefect import flow

    from flows.notify import WEBHOOK_ENV, notify_failure

    got: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv(WEBHOOK_ENV, f"http://127.0.0.1:{server.server_port}/hook")

    @flow(name="csmf-hook-check", flow_run_name="csmf-hook-check-run", on_failure=[notify_failure])
    def failing(date: str = "2026-01-08"):
        raise RuntimeError("boom")

    try:
        with pytest.raises(RuntimeError, match="boom"):
            failing()
    finally:
        server.shutdown()
        server.server_close()
    assert len(got) == 1, got
    assert got[0]["flow"] == "csmf-hook-check" and got[0]["flow_run"] == "csmf-hook-check-run"
    assert got[0]["state"] == "Failed" and "RuntimeError: boom" in got[0]["message"]
    assert got[0]["parameters"] == {"date": "2026-01-08"}


def _context(dataset_input) -> str:
    return next(t.value for t in dataset_input.tags if t.key == "mlflow.data.context")


# ---- bad data: fail in ingest, register nothing ---------------------------------------------------
def _one_file(root: Path, day: str) -> Path:
    return sorted((root / "events" / f"dt={day}").glob("*.parquet"))[0]


def _cascade(root: Path) -> None:
    f = _one_file(root, "2026-01-03")
    df = pl.read_parquet(f)
    df.with_columns(converted=pl.col("converted") | (pl.int_range(pl.len()) < 3)).write_parquet(f)


def _missing_column(root: Path) -> None:
    f = _one_file(root, "2026-01-02")
    pl.read_parquet(f).drop("clicked").write_parquet(f)


def _wrong_type(root: Path) -> None:
    f = _one_file(root, "2026-01-04")
    pl.read_parquet(f).with_columns(pl.col("user_id").cast(pl.String)).write_parquet(f)


def _empty_partition(root: Path) -> None:
    f = _one_file(root, "2026-01-05")
    pl.read_parquet(f).head(0).write_parquet(f)


def _corrupt_file(root: Path) -> None:
    _one_file(root, "2026-01-02").write_bytes(b"PAR1 this is not a parquet file")


def _eval_day_in_training_partition(root: Path) -> None:
    """Issue #13 item 6: 3 events of the evaluation day (the last partition) filed under the day before."""
    days = sorted(p.name for p in (root / "events").iterdir())
    leaked = pl.read_parquet(_one_file(root, days[-1][3:])).head(3)
    leaked.write_parquet(root / "events" / days[-2] / "part-leak.parquet")


def _infinite_feature(root: Path) -> None:
    items = pl.read_parquet(root / "items.parquet")
    column = next(c for c, t in items.schema.items() if t.is_float())
    items.with_columns(
        pl.when(pl.int_range(pl.len()) == 1).then(float("inf")).otherwise(pl.col(column)).alias(column)
    ).write_parquet(root / "items.parquet")


BAD = {
    "cascade": (_cascade, "rule: cascade"),
    "missing_column": (_missing_column, "rule: missing_column, column clicked"),
    "wrong_type": (_wrong_type, "rule: wrong_type, column user_id"),
    "empty_partition": (_empty_partition, "partition has zero event rows (rule: empty_partition)"),
    "corrupt_file": (_corrupt_file, "rule: corrupt_file"),
    "partition_date": (_eval_day_in_training_partition, "3 rows have a UTC date of ts other than"),
    "non_finite": (_infinite_feature, "1 rows have an infinite"),
}


@pytest.fixture(scope="module")
def bad_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bad-home")


def _runs_for(client: mlflow.MlflowClient, data: Path) -> tuple[list, list]:
    exp = client.get_experiment_by_name("csmf")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if r.data.tags.get("csmf.dataset_dir") == str(data.resolve())]
    ids = {r.info.run_id for r in parents}
    return parents, [r for r in runs if r.data.tags.get("mlflow.parentRunId") in ids]


@pytest.mark.parametrize("case", list(BAD))
def test_bad_data_fails_in_ingest_and_registers_nothing(case, prefect_harness, tiny, bad_home, tmp_path):
    data = tmp_path / f"bad-{case}"
    shutil.copytree(tiny, data)
    breaker, text = BAD[case]
    breaker(data)
    with _store(bad_home) as client:
        with pytest.raises(ContractError) as err:
            csmf_daily(data=str(data), home=str(bad_home), overrides=OVERRIDES)
        assert text in str(err.value)
        assert client.search_model_versions(f"name='{REGISTERED_MODEL}'") == []
        parents, children = _runs_for(client, data)
    assert [p.info.status for p in parents] == ["FAILED"]
    assert [(c.info.run_name, c.info.status) for c in children] == [("ingest", "FAILED")]


def test_diverged_loss_fails_the_run(prefect_harness, tiny, bad_home):
    with _store(bad_home) as client:
        with pytest.raises(TrainingDiverged):
            csmf_daily(data=str(tiny), home=str(bad_home), overrides=[*OVERRIDES, "train.max_loss=0.001"])
        assert client.search_model_versions(f"name='{REGISTERED_MODEL}'") == []
        parents, children = _runs_for(client, tiny)
    assert [p.info.status for p in parents] == ["FAILED"]
    assert [(c.info.run_name, c.info.status) for c in children] == [
        ("ingest", "FINISHED"),
        ("select", "FAILED"),  # the selection pass trains first: it stops there
    ]


def test_fused_weights_of_another_dataset_fail_in_ingest_before_prep(
    prefect_harness, tiny, bad_home, tmp_path
):
    data = tmp_path / "two-weights"
    shutil.copytree(tiny, data)
    with _store(bad_home) as client:
        with pytest.raises(ValueError, match=r"eval.fused_weights has 2 values .* 3 objectives"):
            csmf_daily(data=str(data), home=str(bad_home), overrides=[*OVERRIDES, "eval.fused_weights=[1,1]"])
        parents, children = _runs_for(client, data)
    assert [(c.info.run_name, c.info.status) for c in children] == [("ingest", "FAILED")]
    assert not (Path(parents[0].data.tags["csmf.workdir"]) / "model_ready").exists()


def test_missing_partition_fails_before_any_work(prefect_harness, tiny, bad_home):
    with _store(bad_home):
        with pytest.raises(ValueError, match=r"missing partitions \['2026-01-09'\]"):
            csmf_daily(date="2026-01-09", data=str(tiny), home=str(bad_home), overrides=OVERRIDES)
    assert not (bad_home / "runs" / "2026-01-09").exists()
    assert os.environ.get("CSMF_HOME") != str(bad_home)  # the test's environment was restored


# ---- ids across int64 through the whole flow (issue 13 item 3) -------------------------------------------
def test_flow_serves_ids_across_int64(prefect_harness, tiny, happy, wide_ids, tmp_path_factory):
    """The tiny data with its ids mapped increasingly onto random 62-bit values and int64's extremes
    (tests/conftest.py::widen_ids): the flow must train the same model as on the small ids, register
    it, and serve exactly the mapped ids (the happy run is the oracle)."""
    import numpy as np
    import pyarrow.parquet as pq

    from csmf_core.serving import Recommender

    int64_min, int64_max = -(2**63), 2**63 - 1
    root = tmp_path_factory.mktemp("wide")
    maps = wide_ids(tiny, root / "synth-tiny")
    home = root / "home"
    with _store(home):
        result = csmf_daily(data=str(root / "synth-tiny"), home=str(home), overrides=OVERRIDES)
        model = mlflow.pyfunc.load_model(f"models:/{REGISTERED_MODEL}@champion")
    bundle = Path(result["bundle_dir"])
    assert sorted(np.load(bundle / "index" / "ids.npy").tolist()) == sorted(maps["item_id"].values())
    state = pq.read_table(bundle / "user_state.parquet")["user_id"].to_pylist()
    assert sorted(state) == sorted(maps["user_id"].values())

    inverse = {v: k for k, v in maps["user_id"].items()}
    ids = [int64_max, int64_min, 2**53 + 1, int64_max - 1]
    out = model.predict(pd.DataFrame({"user_id": ids, "k": [5, 5, 5, 5]}))
    assert out["user_id"].tolist() == ids
    assert out["cold_start"].tolist() == [False, False, False, True]
    small = Recommender.load(happy.result["bundle_dir"])
    for got, uid in zip(out["item_ids"][:3], ids[:3]):
        want = small.recommend([inverse[uid]], k=5)[0]["items"]
        assert list(got) == [maps["item_id"][i] for i in want]


def test_select_chooses_on_the_validation_day_and_the_refit_uses_it(happy):
    """The tiny window (5 training days, 1 evaluation day) holds out 1 validation day; the select run
    logs the validation score and what each train step kept, and the parent says which epochs and
    weights the model was refit with."""
    sel = happy.children["select"]
    assert sel.data.params["select.val_days"] == "1" and sel.data.metrics["val/score"] > 0
    kept = [int(e) for e in happy.parent.data.tags["csmf.selected_epochs"].split(",")]
    assert kept == [int(sel.data.metrics[f"val/{o}/best_epoch"]) for o in OBJECTIVES]
    assert all(0 <= e <= 1 for e in kept)  # within the caps train.epochs=[1,1,1]
    assert happy.parent.data.tags["csmf.val_days"] == "1"
    assert happy.parent.data.tags["csmf.fused_weights"] == "1,1.8,1.2"  # the default weights
    assert happy.parent.data.tags["csmf.tuned_config"] == "none"


def test_two_objective_dataset_runs_with_no_fused_weights_given(prefect_harness, tiny, bad_home, tmp_path):
    """A user's exposure -> click data and no config: the paper's three default weights become one
    each (logged), the run trains a two-stage cascade and the bundle serves with those weights."""
    data = tmp_path / "two-objectives"
    shutil.copytree(tiny, data)
    spec = (data / "dataset.yaml").read_text()
    (data / "dataset.yaml").write_text(spec.replace("- name: conversion\n  column: converted\n", ""))
    with _store(bad_home) as client:
        result = csmf_daily(data=str(data), home=str(bad_home), overrides=OVERRIDES)
        parents, children = _runs_for(client, data)
    assert parents[0].data.params["eval.fused_weights"] == "[1.0, 1.0]"
    assert [c.info.run_name for c in children if c.info.run_name.startswith(("pretrain", "finetune"))] == [
        "pretrain_exposure",
        "finetune_click",
    ]
    assert {r["objective"] for r in result["metrics"]} == {"exposure", "click"}
    assert load_config(Path(result["bundle_dir"]) / "config.yaml").eval.fused_weights == (1.0, 1.0)


def test_objective_without_training_positives_fails_in_ingest(prefect_harness, tiny, bad_home, tmp_path):
    """No conversion in the training days: the run stops after prep with the objective, its column,
    the days and the count, before the selection pass trains anything."""
    data = tmp_path / "no-conversions"
    shutil.copytree(tiny, data)
    for part in (data / "events").glob("dt=*/*.parquet"):
        events = pl.read_parquet(part)
        if part.parent.name < "dt=2026-01-06":  # the training days; the evaluation day keeps its own
            events.with_columns(converted=pl.lit(False)).write_parquet(part)
    with _store(bad_home) as client:
        with pytest.raises(
            ValueError,
            match=r"objective conversion \(column converted\): 0 positive row\(s\) in the 5 training day\(s\) "
            r"2026-01-01 \.\. 2026-01-05; .*Every partition before the evaluation day is already used",
        ):
            csmf_daily(data=str(data), home=str(bad_home), overrides=OVERRIDES)
        _, children = _runs_for(client, data)
    assert [(c.info.run_name, c.info.status) for c in children] == [("ingest", "FAILED")]
