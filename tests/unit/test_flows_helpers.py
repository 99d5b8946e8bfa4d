"""The pipeline's plain helpers (no Prefect run, no tracking server): date windows, digests,
tracking key rules, pyfunc input parsing, the quarantine clean copy, retry conditions, figures."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import polars as pl
import pytest

from csmf_core.config import DataConfig
from csmf_core.synth import generate
from data_contracts import validate_dataset
from flows.inputs import code_version, dataset_digest, plan_window
from flows.registry import _k, _weights
from flows.reporting import LossCurve, clean_copy
from flows.tracking import NullTracker, metric_key


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("flows") / "tiny"
    generate(out, "tiny", seed=0, n_users=60, n_items=40, requests_per_day=40)
    return out  # dates 2026-01-01 .. 2026-01-06


def test_window_defaults_to_the_last_partition(tiny):
    w = plan_window(tiny, None, DataConfig())
    assert w.date == "2026-01-06" and w.eval_dates == ["2026-01-06"]
    assert w.train_dates == [f"2026-01-0{d}" for d in range(1, 6)]
    assert w.validate_dates == [f"2026-01-0{d}" for d in range(1, 7)]


def test_window_with_train_and_eval_days(tiny):
    w = plan_window(tiny, "2026-01-04", DataConfig(train_days=2, eval_days=2))
    assert w.train_dates == ["2026-01-02", "2026-01-03"] and w.eval_dates == ["2026-01-04", "2026-01-05"]
    # prep reads every earlier partition for history: validate those too, not the later ones
    assert w.validate_dates == [f"2026-01-0{d}" for d in range(1, 6)]


@pytest.mark.parametrize(
    ("date", "data", "match"),
    [
        ("2026-01-06", DataConfig(eval_days=2), r"missing partitions \['2026-01-07'\]"),
        ("2026-01-02", DataConfig(train_days=3), r"missing partitions \['2025-12-30', '2025-12-31'\]"),
        ("2026-01-01", DataConfig(), "no partition before it"),
        ("01/06/2026", DataConfig(), "is not YYYY-MM-DD"),
    ],
)
def test_window_errors_name_the_problem(tiny, date, data, match):
    with pytest.raises(ValueError, match=match):
        plan_window(tiny, date, data)


@pytest.fixture(scope="module")
def gap(tiny, tmp_path_factory):
    """tiny without 2026-01-04: a day the export lost."""
    days = [f"2026-01-0{d}" for d in (1, 2, 3, 5, 6)]
    return clean_copy(tiny, days, tmp_path_factory.mktemp("gap") / "gap")


def test_a_missing_day_is_stepped_over_by_partition_windows_and_named(gap, tiny):
    w = plan_window(gap, "2026-01-06", DataConfig(), last_partitions=2)
    assert w.train_dates == ["2026-01-03", "2026-01-05"] and w.missing == ["2026-01-04"]
    w = plan_window(gap, "2026-01-06", DataConfig())  # every partition before it
    assert w.train_dates == ["2026-01-01", "2026-01-02", "2026-01-03", "2026-01-05"]
    assert w.missing == ["2026-01-04"]
    assert plan_window(tiny, "2026-01-06", DataConfig(), last_partitions=2).missing == []
    assert plan_window(gap, "2026-01-06", DataConfig(), last_partitions=1).missing == []  # 01-05 .. 01-06
    # a calendar window stays strict: its days must all be there
    with pytest.raises(ValueError, match=r"missing partitions \['2026-01-04'\]"):
        plan_window(gap, "2026-01-06", DataConfig(train_days=2))
    with pytest.raises(ValueError, match="last 5 partitions before 2026-01-06: there are 4"):
        plan_window(gap, "2026-01-06", DataConfig(), last_partitions=5)
    # the days new to a model trained for 2026-01-03, counted in partitions (01-03 and 01-05)
    assert plan_window(gap, "2026-01-06", DataConfig()).partitions_from("2026-01-03") == 2
    assert plan_window(tiny, "2026-01-06", DataConfig()).partitions_from("2026-01-03") == 3
    assert plan_window(gap, "2026-01-05", DataConfig()).partitions_from("2026-01-04") == 0


def test_an_incremental_refit_starts_at_a_partition_not_a_calendar_day():
    from csmf_core.config import build_config
    from flows.incremental import train_from

    run = SimpleNamespace(window=SimpleNamespace(train_dates=["2026-01-02", "2026-01-03", "2026-01-05"]))
    assert train_from(run, build_config(None, ["train.incremental_days=2"])) == "2026-01-03"
    assert train_from(run, build_config(None, ["train.incremental_days=1"])) == "2026-01-05"


def test_dataset_digest_follows_content(tiny, tmp_path):
    dates = ["2026-01-01", "2026-01-02"]
    d1, kind = dataset_digest(tiny, dates)
    assert kind == "content" and d1 == dataset_digest(tiny, dates)[0]
    assert dataset_digest(tiny, dates[:1])[0] != d1
    copy = tmp_path / "copy"
    clean_copy(tiny, ["2026-01-01", "2026-01-02"], copy)  # same rows, rewritten files
    assert dataset_digest(copy, dates)[0] != d1


def test_code_version_is_the_package_version_plus_commit():
    v = code_version()
    assert v.startswith("0.1.0") or v.startswith("0+")


def test_metric_keys_and_null_tracker():
    assert metric_key("val/click/recall@50") == "val/click/recall_at_50"
    t = NullTracker()
    t.log_params({"a": 1})
    t.log_metrics({"x@1": 1.0}, step=3)
    assert t.child("x") is t and t.run_id is None


def test_loss_curve_flushes_every_n_steps():
    logged: list[tuple[str, list]] = []
    lines: list[str] = []
    tracker = SimpleNamespace(log_series=lambda k, points: logged.append((k, list(points))))
    logger = SimpleNamespace(info=lambda msg, *a: lines.append(msg % a))
    curve = LossCurve(tracker, logger, "pretrain_exposure", every=2, flush_seconds=0, mean_of=1)
    for s, loss in enumerate([3.0, 2.0, 1.5], start=1):
        curve(s, loss)
    curve.flush()
    assert logged == [("train/loss", [(1, 3.0), (2, 2.0)]), ("train/loss", [(3, 1.5)])]
    assert lines == ["pretrain_exposure: step 2 loss 2.0000", "pretrain_exposure: step 3 loss 1.5000 (last)"]


def test_loss_curve_logs_the_mean_of_every_window():
    """`train/loss` is the mean of every `mean_of` steps at the window's last step, the last partial
    window at the last step; a non-finite loss is left out of its window's mean (a window of only
    non-finite losses gives no point); the progress lines still show single steps."""
    logged: list = []
    lines: list[str] = []
    tracker = SimpleNamespace(log_series=lambda k, points: logged.extend(points))
    logger = SimpleNamespace(info=lambda msg, *a: lines.append(msg % a))
    curve = LossCurve(tracker, logger, "s", every=4, flush_seconds=0, mean_of=3)
    losses = [6.0, 3.0, 0.0, 1.0, float("nan"), 2.0, float("inf"), float("nan"), float("nan"), 5.0, 7.0]
    for s, loss in enumerate(losses, start=1):
        curve(s, loss)
    curve.flush()
    # windows: steps 1-3 mean 3.0; 4-6 (1, 2) 1.5; 7-9 none finite; 10-11 (5, 7) 6.0 at step 11
    assert logged == [(3, 3.0), (6, 1.5), (11, 6.0)]
    assert lines == ["s: step 4 loss 1.0000", "s: step 8 loss nan", "s: step 11 loss 7.0000 (last)"]


def test_loss_curve_sends_at_most_every_flush_seconds():
    """Progress lines every `every` steps; the tracker gets the buffered points only at a progress
    line at least `flush_seconds` after the last write, and the rest at flush(): every point once."""
    logged: list[list] = []
    lines: list[str] = []
    tracker = SimpleNamespace(log_series=lambda k, points: logged.append(list(points)))
    logger = SimpleNamespace(info=lambda msg, *a: lines.append(msg % a))
    now = [100.0]
    curve = LossCurve(tracker, logger, "s", every=2, flush_seconds=5.0, clock=lambda: now[0], mean_of=1)
    # step k at time 100 + 2k: progress lines at steps 2, 4, 6, 8; writes when >= 5 s have passed
    for k in range(1, 10):
        now[0] = 100.0 + 2 * k
        curve(k, float(k))
    curve.flush()
    assert [x.split()[2] for x in lines] == ["2", "4", "6", "8", "9"]
    # step 4 (t 108, 8 s after the start) and step 8 (t 116, 8 s after 108); step 6 (t 112) was 4 s
    assert logged == [
        [(k, float(k)) for k in (1, 2, 3, 4)],
        [(k, float(k)) for k in (5, 6, 7, 8)],
        [(9, 9.0)],
    ]


def test_pyfunc_input_parsing():
    assert _weights(None) is None and _weights(float("nan")) is None and _weights("") is None
    assert _weights("1,1.8,1.2") == (1.0, 1.8, 1.2) and _weights("[1, 2, 3]") == (1.0, 2.0, 3.0)
    assert _weights([1, 2, 3]) == (1.0, 2.0, 3.0)
    with pytest.raises(ValueError, match="comma-separated"):
        _weights("a,b")
    assert _k(None) == 50 and _k(float("nan")) == 50 and _k(7) == 7
    assert pd.isna(pd.DataFrame({"w": [None, "1,2,3"]})["w"][0])


def test_clean_copy_drops_exactly_the_quarantined_rows(tiny, tmp_path):
    bad = tmp_path / "bad"
    clean_copy(tiny, ["2026-01-01", "2026-01-02", "2026-01-03"], bad)
    f = next((bad / "events" / "dt=2026-01-02").glob("*.parquet"))
    df = pl.read_parquet(f)
    df.with_columns(converted=pl.col("converted") | (pl.int_range(pl.len()) < 2)).write_parquet(f)
    dates = ["2026-01-01", "2026-01-02", "2026-01-03"]
    report = validate_dataset(bad, dates=dates, max_violation_rate=0.5, quarantine_dir=tmp_path / "q")
    assert report.ok and report.quarantined.get("cascade", 0) >= 1
    clean = clean_copy(bad, dates, tmp_path / "clean")
    again = validate_dataset(clean, dates=dates)
    assert again.ok and not again.quarantined
    assert again.counts["rows"] == report.counts["rows"] - sum(report.quarantined.values())


def test_evaluation_day_events_in_a_training_partition_are_never_trained_on(tiny, tmp_path):
    """Issue #13 item 6: 3 clicked events of the evaluation day, filed under the last training day."""
    from csmf_core.prep import prepare

    w = plan_window(tiny, None, DataConfig())  # evaluate 2026-01-06, train on 01-01 .. 01-05
    leaky = clean_copy(tiny, w.validate_dates, tmp_path / "leaky")
    eval_rows = pl.read_parquet(leaky / "events" / "dt=2026-01-06" / "part-00000.parquet")
    leaked = eval_rows.filter(pl.col("clicked")).head(3)
    assert leaked.height == 3
    leaked.write_parquet(leaky / "events" / "dt=2026-01-05" / "part-leak.parquet")
    eval_start = int(pd.Timestamp("2026-01-06", tz="UTC").value // 1000)  # microseconds

    def train_ts(dataset, out):
        prepare(dataset, out, train_dates=w.train_dates, eval_dates=w.eval_dates, seq_len=3, n_req_neg=2)
        return pl.read_parquet(out / "train" / "*.parquet")["ts"]

    # prep picks training rows by partition: without the contract the 3 events are trained on
    assert (train_ts(leaky, tmp_path / "mr-leaky") >= eval_start).sum() == 3
    strict = validate_dataset(leaky, dates=w.validate_dates, eval_dates=w.eval_dates)
    v = next(v for v in strict.errors if v.rule == "partition_date")
    assert (v.file, v.column, v.rows) == ("events/dt=2026-01-05/part-leak.parquet", "ts", 3) and not strict.ok
    # the pipeline's quarantine path (flows.pipeline.ingest): quarantine, clean copy, prep
    rate = 3 / strict.counts["rows"]
    report = validate_dataset(
        leaky, dates=w.validate_dates, max_violation_rate=rate, quarantine_dir=tmp_path / "q"
    )
    assert report.ok and report.quarantined == {"partition_date": 3}
    clean = clean_copy(leaky, w.validate_dates, tmp_path / "clean")
    ts = train_ts(clean, tmp_path / "mr-clean")
    assert (ts >= eval_start).sum() == 0 and ts.len() == train_ts(tiny, tmp_path / "mr-tiny").len()


def test_retry_condition_only_for_transient_errors():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

    from flows.runs import transient

    def state(exc):
        return SimpleNamespace(data=exc)

    assert transient(None, None, state(OSError("disk hiccup")))
    assert transient(None, None, state(MlflowException("locked", error_code=INTERNAL_ERROR)))
    assert not transient(None, None, state(FileNotFoundError("gone")))
    assert not transient(None, None, state(ValueError("bad data")))
    assert not transient(None, None, state(MlflowException("bad key", error_code=INVALID_PARAMETER_VALUE)))


def test_figures_render():
    from flows.figures import ownership_figure, recall_at_k_figure

    rows = [
        {"objective": o, "scorer": s, "k": k, "recall": 0.1 * k / 50, "ndcg": 0.0, "users": 3}
        for o in ("exposure", "click")
        for s in (o, "fused", "popularity")
        for k in (10, 50)
    ]
    assert len(recall_at_k_figure(rows).axes) == 2
    fig = ownership_figure(
        {"after cpp_prune_exposure": {"user.layers.0": [3, 5], "output": [4, 4]}}, ["e", "c"]
    )
    assert len(fig.axes) == 1


def test_model_ready_data_loaded_once_per_run(tiny, tmp_path, monkeypatch):
    import os

    import torch

    from csmf_core import prep
    from csmf_core.config import build_config
    from flows import runs

    mr = tmp_path / "mr"
    prep.prepare(tiny, mr, train_dates=("2026-01-01", "2026-01-05"), eval_dates="2026-01-06", seq_len=3)
    calls = []
    real = runs.load_cascade_data
    monkeypatch.setattr(runs, "load_cascade_data", lambda *a, **k: calls.append(k) or real(*a, **k))
    cache, cfg = runs.LoadedData(), build_config(None, [])
    a = cache.get(mr, cfg, load_train=True)
    a.tables = None  # what a task does to its copy (tables.to(device)) must not reach the next task
    b = cache.get(mr, cfg, load_train=False)  # the evaluate task: served by the train-loaded entry
    assert len(calls) == 1 and b.tables is not None and b.rows is a.rows
    assert torch.equal(b.rows.u, real(mr, val_days=cfg.data.val_days).rows.u)  # as a fresh load
    other = build_config(None, ["train.loader=parquet"])
    cache.get(mr, other, load_train=True)  # other loader settings: reloaded, not shared
    assert len(calls) == 2
    meta = mr / "meta.json"
    os.utime(meta, ns=(meta.stat().st_atime_ns, meta.stat().st_mtime_ns + 10**9))  # rewritten data
    cache.get(mr, other, load_train=True)
    assert len(calls) == 3
    cache.clear()
    cache.get(mr, other, load_train=True)
    assert len(calls) == 4


def test_a_figure_for_several_runs_is_rendered_once_with_mlflows_bytes(tmp_path):
    """`reporting.log_figure` to two runs: one `savefig`, and each run gets exactly the PNG that
    MLflow's own `log_figure` writes for the same figure."""
    import mlflow

    from flows.figures import recall_at_k_figure
    from flows.reporting import log_figure
    from flows.tracking import MlflowTracker, ensure_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = ensure_experiment("figures", tmp_path / "artifacts", uri)
    own, a, b = (MlflowTracker.start(exp, name, tracking_uri=uri) for name in ("own", "a", "b"))
    assert a.experiment_id == exp and MlflowTracker.attach(a.run_id, uri).experiment_id == exp
    rows = [
        {"objective": "click", "scorer": s, "k": k, "recall": 0.1 * k / 50, "ndcg": 0.0, "users": 3}
        for s in ("click", "fused", "popularity")
        for k in (10, 50)
    ]
    fig = recall_at_k_figure(rows)
    saves = []
    original = fig.savefig
    fig.savefig = lambda *args, **kw: (saves.append(args), original(*args, **kw))
    own.log_figure(fig, "figures/recall_at_k.png")  # MLflow's own path: the reference bytes
    saves.clear()
    log_figure([a, b], fig, "figures/recall_at_k.png")
    assert len(saves) == 1

    def png(run_id: str) -> bytes:
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id,
            artifact_path="figures/recall_at_k.png",
            dst_path=str(tmp_path / run_id),
            tracking_uri=uri,
        )
        return open(path, "rb").read()

    assert png(a.run_id) == png(b.run_id) == png(own.run_id)


def test_open_stores_creates_the_database_the_flow_then_reuses(tmp_path):
    """`open_stores` on a fresh SQLite URI: the database exists with its tables, and a later client of
    the same URI gets the same (cached) store object."""
    import mlflow

    from flows.tracking import open_stores

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    open_stores(uri)
    assert (tmp_path / "mlflow.db").is_file()
    a, b = mlflow.MlflowClient(uri), mlflow.MlflowClient(uri)
    assert a._tracking_client.store is b._tracking_client.store
    assert a.search_experiments(max_results=5)  # the Default experiment: tables created


_STARTUP = """
import gc, json, sys
from flows.env import startup_imports
if sys.argv[1] == "off":
    gc.disable()
before = gc.get_freeze_count()
with startup_imports():
    inside = gc.isenabled()
    kept = [[i] for i in range(1000)]  # tracked containers, as the imported modules' objects are
first = gc.get_freeze_count()
with startup_imports():
    inside2 = gc.isenabled()
    more = [[i] for i in range(1000)]
from flows.env import freeze_startup
freeze_startup()  # the daily flow's call: nothing more once frozen
print(json.dumps([before, inside, first, gc.isenabled(), inside2, gc.get_freeze_count()]))
"""


@pytest.mark.parametrize("caller_gc", ["on", "off"])
def test_startup_imports_pause_the_collector_and_freeze_once(caller_gc):
    """`csmf run` imports torch, Prefect and MLflow inside `startup_imports`: the collector is off in
    the block, what the block made is frozen (never walked again), the caller's setting comes back,
    and a second block in the same process (tests call `cli.main` often) freezes nothing more. In a
    fresh interpreter, so this test's process keeps its own collector state."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", _STARTUP, caller_gc], cwd=root, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    before, inside, first, enabled_after, inside2, second = json.loads(out.stdout)
    assert inside is False  # no collection while the modules load
    assert first - before >= 1000  # the block's objects (and whatever else was alive) frozen
    assert enabled_after is (caller_gc == "on")  # the caller's setting restored
    assert inside2 is (caller_gc == "on") and second == first  # the second block: nothing changed


def test_freeze_startup_freezes_once_per_process():
    """The daily flow's first call (a worker's flow-run process, which imported the flow module
    itself) freezes what is alive; later flow runs in the same process freeze nothing more."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import gc, json\nfrom flows.env import freeze_startup\n"
        "kept = [[i] for i in range(1000)]\nbefore = gc.get_freeze_count()\nfreeze_startup()\n"
        "first = gc.get_freeze_count()\nmore = [[i] for i in range(1000)]\nfreeze_startup()\n"
        "print(json.dumps([before, first, gc.get_freeze_count(), gc.isenabled()]))"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    before, first, second, enabled = json.loads(out.stdout)
    assert before == 0 and first >= 1000 and second == first and enabled is True
