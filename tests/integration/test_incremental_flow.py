"""train.mode incremental in real flow runs (Prefect harness + MLflow on SQLite, tiny data), #16 item 3.

One tracking store, two consecutive days as the daily deployment runs them (train.mode=incremental):

    A  2026-01-05  no champion yet       -> full retrain (fallback), v1 champion
    B  2026-01-06  champion v1 exists    -> incremental from v1 on 2026-01-05 (2026-01-04 the validation
                                            day of the selection pass), v2, verified by the gate
    C  2026-01-06  --from-model v1,      -> incremental from v1 on 2026-01-05 and as many rows again drawn
                   rehearsal 1, 2 days      from 2026-01-02 .. 01-04 (2 rehearsal days + the pass's own day)
    D  2026-01-06  --from-model v1,      -> the same, each stage's ratio (0 or 1) chosen by the selection
                   rehearsal auto [0, 1]    pass on the validation day 2026-01-04

    .venv/bin/pytest -m integration tests/integration/test_incremental_flow.py
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from csmf_core.bundle import read_vocab
from csmf_core.synth import generate
from flows.pipeline import csmf_daily
from flows.registry import REGISTERED_MODEL, resolve_bundle
from flows.tracking import metric_key
from tests.integration.conftest import temporary_api
from tests.integration.test_gate_flow import OVERRIDES, _store

pytestmark = pytest.mark.integration

INCREMENTAL = [*OVERRIDES, "train.mode=incremental"]
REHEARSAL = [*INCREMENTAL, "train.incremental_rehearsal=1", "train.rehearsal_days=2"]
AUTO = [
    *INCREMENTAL,
    "train.incremental_rehearsal=auto",
    "train.rehearsal_candidates=[1,0]",
    "train.rehearsal_days=2",
]


@pytest.fixture(scope="module")
def days(tmp_path_factory):
    root = tmp_path_factory.mktemp("incremental-flow")
    tiny = generate(root / "tiny", "tiny", seed=0).out_dir
    home = root / "home"
    out = SimpleNamespace(root=root, home=home)
    with temporary_api():
        with _store(home) as client:
            out.client = client
            out.a = csmf_daily(date="2026-01-05", data=str(tiny), home=str(home), overrides=INCREMENTAL)
            out.b = csmf_daily(date="2026-01-06", data=str(tiny), home=str(home), overrides=INCREMENTAL)
            out.c = csmf_daily(
                date="2026-01-06",
                data=str(tiny),
                home=str(home),
                overrides=REHEARSAL,
                from_model="models:/csmf/1",
            )
            out.d = csmf_daily(
                date="2026-01-06", data=str(tiny), home=str(home), overrides=AUTO, from_model="models:/csmf/1"
            )
            out.versions = {
                str(v.version): v for v in client.search_model_versions(f"name='{REGISTERED_MODEL}'")
            }
            out.bundles = {
                v: resolve_bundle(f"models:/{REGISTERED_MODEL}/{v}", home=home) for v in ("1", "2")
            }
            out.parents = {k: client.get_run(getattr(out, k)["mlflow_run_id"]) for k in ("a", "b", "c", "d")}
    return out


def test_first_day_falls_back_to_full(days):
    tags = days.parents["a"].data.tags
    assert tags["csmf.train_mode"] == "full" and tags["csmf.parent_model_version"] == "none"
    assert tags["csmf.last_full_date"] == "2026-01-05"
    assert days.a["model_version"] == "1" and days.a["gate"]["promoted"]
    children = days.client.search_runs(
        [days.parents["a"].info.experiment_id], f"tags.mlflow.parentRunId = '{days.a['mlflow_run_id']}'"
    )
    assert {"pretrain_exposure", "cpp_prune_exposure", "finetune_conversion"} <= {
        c.info.run_name for c in children
    }


def test_second_day_is_incremental_and_verified(days):
    v2 = days.versions["2"]
    assert v2.tags["csmf.train_mode"] == "incremental"
    assert v2.tags["csmf.parent_model_version"] == "1"
    assert v2.tags["csmf.last_full_date"] == "2026-01-05"
    # one new day (01-05), its validation day (01-04) and, for rehearsal (train.incremental_rehearsal auto,
    # train.rehearsal_days 6), the days before them: as many as the data has (01-01 .. 01-03)
    assert v2.tags["csmf.train_dates"].startswith("2026-01-01..2026-01-05 (5 days)")
    children = days.client.search_runs(
        [days.parents["b"].info.experiment_id], f"tags.mlflow.parentRunId = '{days.b['mlflow_run_id']}'"
    )
    names = {c.info.run_name for c in children}
    assert {"select", "incremental_exposure", "incremental_click", "incremental_conversion"} <= names
    assert not any(n.startswith(("cpp_prune", "recover", "pretrain")) for n in names)
    step = next(c for c in children if c.info.run_name == "incremental_click")
    assert step.data.params["step.train_from"] == "2026-01-05"
    checks = days.b["gate"]["checks"]
    assert checks == {"exact_fusion": True, "frozen_parameters": True, "index_matches_towers": True}
    # v2 keeps v1's rows for every id v1 knew
    for side, col in (("users", "user_id"), ("items", "item_id")):
        old = read_vocab(Path(days.bundles["1"]) / "features" / f"{side}.parquet", col)
        new = read_vocab(Path(days.bundles["2"]) / "features" / f"{side}.parquet", col)
        np.testing.assert_array_equal(new[: len(old)], old)


@pytest.fixture(scope="module")
def line_days(tmp_path_factory):
    """train.start_from=line in real runs, its own store:

    A  2026-01-04  no champion           -> full retrain, v1 champion
    B  2026-01-05  gate.enabled=false    -> incremental from v1, v2 verified but kept out
    C  2026-01-06  start_from=line       -> incremental from v2 (the line's head), not from champion v1,
                   incremental_logq=history
    """
    root = tmp_path_factory.mktemp("line-flow")
    tiny = generate(root / "tiny", "tiny", seed=0).out_dir
    home = root / "home"
    out = SimpleNamespace(root=root, home=home)
    with temporary_api():
        with _store(home) as client:
            out.client = client
            out.a = csmf_daily(date="2026-01-04", data=str(tiny), home=str(home), overrides=INCREMENTAL)
            out.b = csmf_daily(
                date="2026-01-05",
                data=str(tiny),
                home=str(home),
                overrides=[*INCREMENTAL, "gate.enabled=false"],
            )
            out.c = csmf_daily(
                date="2026-01-06",
                data=str(tiny),
                home=str(home),
                overrides=[*INCREMENTAL, "train.start_from=line", "train.incremental_logq=history"],
            )
            out.versions = {
                str(v.version): v for v in client.search_model_versions(f"name='{REGISTERED_MODEL}'")
            }
            out.champion = client.get_model_version_by_alias(REGISTERED_MODEL, "champion")
    return out


def test_line_continues_the_verified_challenger_the_gate_kept_out(line_days):
    v2, v3 = line_days.versions["2"], line_days.versions["3"]
    assert v2.tags["csmf.gate"] == "kept" and v2.tags["csmf.gate_verified"] == "true"
    assert v3.tags["csmf.train_mode"] == "incremental"
    assert v3.tags["csmf.parent_model_version"] == "2"  # the line's head, not champion v1
    assert v3.tags["csmf.last_full_date"] == "2026-01-04"
    # one new day (01-05), the validation day before it and the rehearsal days before those (01-01 ..
    # 01-03); train.start_from=champion would have caught v1 up on two new days
    assert v3.tags["csmf.train_dates"].startswith("2026-01-01..2026-01-05 (5 days)")
    steps = line_days.client.search_runs(
        [line_days.client.get_run(line_days.c["mlflow_run_id"]).info.experiment_id],
        f"tags.mlflow.parentRunId = '{line_days.c['mlflow_run_id']}'",
    )
    assert {
        c.data.params["step.train_from"] for c in steps if c.info.run_name.startswith("incremental_")
    } == {"2026-01-05"}
    assert line_days.c["gate"]["checks"] == {
        "exact_fusion": True,
        "frozen_parameters": True,
        "index_matches_towers": True,
    }
    assert str(line_days.champion.version) in ("1", "3")  # v2 never served
    parent = line_days.client.get_run(line_days.c["mlflow_run_id"])
    assert parent.data.params["train.incremental_logq"] == "history"


def test_a_quiet_day_of_a_sparse_objective_keeps_its_stage(tmp_path):
    """No conversion on the incremental run's day (2026-01-05; no selection pass, so every stage with
    rows trains its epoch cap): the run completes, the conversion stage's entries are the starting
    model's bit for bit, and the other stages trained. (The selection pass's side: tests/unit/
    test_incremental.py.)"""
    import polars as pl
    import torch

    from csmf_core.checkpoint import load_checkpoint
    from csmf_core.masks import param_owners

    tiny = generate(tmp_path / "tiny", "tiny", seed=0).out_dir
    for part in (tiny / "events").glob("dt=2026-01-0[45]/*.parquet"):
        pl.read_parquet(part).with_columns(converted=pl.lit(False)).write_parquet(part)
    home = tmp_path / "home"
    quiet = [*INCREMENTAL, "data.item_stats=[]"]  # one training day: no earlier day for statistics
    with temporary_api(), _store(home) as client:
        a = csmf_daily(date="2026-01-05", data=str(tiny), home=str(home), overrides=quiet)
        b = csmf_daily(
            date="2026-01-06", data=str(tiny), home=str(home), overrides=[*quiet, "data.val_days=0"]
        )
        tags = client.get_run(b["mlflow_run_id"]).data.tags
    assert tags["csmf.train_mode"] == "incremental"
    old, _, _ = load_checkpoint(Path(a["bundle_dir"]) / "checkpoint")
    new, owners, _ = load_checkpoint(Path(b["bundle_dir"]) / "checkpoint")
    own = param_owners(new, owners)
    old_p = dict(old.named_parameters())
    changed = {t: False for t in range(3)}
    for name, p in new.named_parameters():
        for t in range(3):
            sel = own[name] == t
            same = torch.equal(p.detach()[sel.expand_as(p)], old_p[name].detach()[sel.expand_as(p)])
            assert t != 2 or same, f"{name}: a conversion-owned entry changed"
            changed[t] |= not same
    assert changed[0] and changed[1]


def test_a_day_missing_from_the_data_is_stepped_over(tmp_path):
    """The export lost 2026-01-04. Before, every incremental run whose window reached back over it
    failed ("missing partitions ['2026-01-04']") until the next full retrain, a week later. Now the
    run for 2026-01-06 continues v1 (trained for 01-03, on 01-01 .. 01-02) on the partitions new to
    it, 01-03 and 01-05, the selection pass validating on 01-05, and says which day it stepped over."""
    import shutil

    tiny = generate(tmp_path / "tiny", "tiny", seed=0).out_dir
    shutil.rmtree(tiny / "events" / "dt=2026-01-04")
    home = tmp_path / "home"
    with temporary_api(), _store(home) as client:
        csmf_daily(date="2026-01-03", data=str(tiny), home=str(home), overrides=INCREMENTAL)
        b = csmf_daily(date="2026-01-06", data=str(tiny), home=str(home), overrides=INCREMENTAL)
        parent = client.get_run(b["mlflow_run_id"])
        children = client.search_runs(
            [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{b['mlflow_run_id']}'"
        )
    assert parent.data.tags["csmf.train_mode"] == "incremental"
    assert parent.data.tags["csmf.parent_model_version"] == "1"
    # two new days of data (01-03, 01-05) plus one validation day before them (the last 3 partitions)
    # and the one partition left before those for rehearsal (train.incremental_rehearsal auto)
    assert parent.data.params["run.train_dates"] == '["2026-01-01", "2026-01-02", "2026-01-03", "2026-01-05"]'
    steps = [c for c in children if c.info.run_name.startswith("incremental_")]
    assert len(steps) == 3 and {c.data.params["step.train_from"] for c in steps} == {"2026-01-03"}
    assert b["gate"]["checks"]["exact_fusion"]


def test_a_model_continued_from_later_data_is_compared_after_what_its_line_saw(tmp_path):
    """v1 champion for 2026-01-04; v2 trained for 2026-01-06 (on .. 01-05), gate off; then a run for
    01-04 continuing v2 (--from-model). Its own window ends before 01-04, but v2 learned from 01-04 and
    01-05: the gate used to compare on 01-04, a day the challenger had seen. Now both models are
    scored on the newest day after both lines, 01-06, and the bundle records trained_through."""
    import json

    tiny = generate(tmp_path / "tiny", "tiny", seed=0).out_dir
    home = tmp_path / "home"
    with temporary_api(), _store(home):
        csmf_daily(date="2026-01-04", data=str(tiny), home=str(home), overrides=OVERRIDES)
        csmf_daily(
            date="2026-01-06", data=str(tiny), home=str(home), overrides=[*OVERRIDES, "gate.enabled=false"]
        )
        c = csmf_daily(
            date="2026-01-04",
            data=str(tiny),
            home=str(home),
            overrides=INCREMENTAL,
            from_model="models:/csmf/2",
        )
        info = json.loads((resolve_bundle("models:/csmf/3", home=home) / "bundle.json").read_text())
    assert info["extra"]["trained_through"] == "2026-01-05" and max(info["train_dates"]) < "2026-01-04"
    assert c["gate"]["days"] == ["2026-01-06"]
    assert "is compared with a challenger that trained on later days" in c["gate"]["reason"]


def test_rehearsal_trains_the_new_day_and_a_draw_of_the_days_before(days):
    """Day C with train.incremental_rehearsal=1, rehearsal_days=2: its window reads two more days, and
    each step trains the new day's rows and as many rows again drawn from the window's days before it
    (counted here from the raw events: every exposure is a train row of stage 0)."""
    import polars as pl

    v3 = days.versions["3"]
    assert v3.tags["csmf.train_mode"] == "incremental" and v3.tags["csmf.parent_model_version"] == "1"
    # 2 rehearsal days + the selection pass's day + the validation day (the refit's new day)
    assert v3.tags["csmf.train_dates"].startswith("2026-01-02..2026-01-05")
    assert days.c["gate"]["checks"]["frozen_parameters"] and days.c["gate"]["checks"]["exact_fusion"]
    children = days.client.search_runs(
        [days.parents["c"].info.experiment_id], f"tags.mlflow.parentRunId = '{days.c['mlflow_run_id']}'"
    )
    step = next(c for c in children if c.info.run_name == "incremental_exposure")
    assert step.data.params["step.train_from"] == "2026-01-05"
    events = pl.read_parquet(days.root / "tiny" / "events" / "**" / "*.parquet", hive_partitioning=True)
    exposed = events.filter(pl.col("exposed")).with_columns(pl.col("dt").cast(pl.String))
    new = exposed.filter(pl.col("dt") == "2026-01-05").height
    older = exposed.filter(pl.col("dt").is_between(pl.lit("2026-01-02"), pl.lit("2026-01-04"))).height
    drawn = min(new, older)
    assert int(step.data.params["step.rehearsal_rows"]) == drawn > 0
    assert int(step.data.metrics["train/rows"]) == new + drawn
    select = next(c for c in children if c.info.run_name == "select")
    day4 = exposed.filter(pl.col("dt") == "2026-01-04").height
    before4 = exposed.filter(pl.col("dt").is_between(pl.lit("2026-01-02"), pl.lit("2026-01-03"))).height
    assert int(select.data.params["select.rehearsal_rows"]) == min(day4, before4) > 0


def test_rehearsal_auto_keeps_each_stages_better_ratio(days):
    """Day D with train.incremental_rehearsal=auto over [0, 1]: the selection pass trains every stage with
    each ratio from the same point and keeps the one with the higher validation Recall@K (0 on a tie:
    the candidates are tried in ascending order); the refit trains each stage with its kept ratio (the
    exposure step's rows counted from the raw events, as for day C)."""
    import polars as pl

    v4 = days.versions["4"]
    assert v4.tags["csmf.train_mode"] == "incremental" and v4.tags["csmf.parent_model_version"] == "1"
    assert days.d["gate"]["checks"]["frozen_parameters"] and days.d["gate"]["checks"]["exact_fusion"]
    children = days.client.search_runs(
        [days.parents["d"].info.experiment_id], f"tags.mlflow.parentRunId = '{days.d['mlflow_run_id']}'"
    )
    select = next(c for c in children if c.info.run_name == "select")
    kept = [float(r) for r in select.data.params["select.rehearsal"].split(",")]
    assert 1.0 in kept and 0.0 in kept  # on this day both outcomes occur (exposure keeps 1, click a tie at 0)
    events = pl.read_parquet(days.root / "tiny" / "events" / "**" / "*.parquet", hive_partitioning=True)
    exposed = events.filter(pl.col("exposed")).with_columns(pl.col("dt").cast(pl.String))
    day4 = exposed.filter(pl.col("dt") == "2026-01-04").height
    before4 = exposed.filter(pl.col("dt").is_between(pl.lit("2026-01-02"), pl.lit("2026-01-03"))).height
    assert select.data.params["select.rehearsal_rows"] == f"0:0,1:{min(day4, before4)}"
    objectives = ["exposure", "click", "conversion"]
    assert len(kept) == len(objectives)
    for o, r in zip(objectives, kept):
        s0, s1 = (select.data.metrics.get(f"val/{o}/score_rehearsal_{x}") for x in (0, 1))
        if s0 is None:  # the stage had too few positives to train: kept as it was, the first ratio
            assert s1 is None and r == 0.0
            continue
        assert r == (1.0 if s1 > s0 else 0.0), (o, s0, s1, r)
        assert max(s0, s1) == pytest.approx(select.data.metrics[metric_key(f"val/{o}/best_recall@50")]), o
    new = exposed.filter(pl.col("dt") == "2026-01-05").height
    older = exposed.filter(pl.col("dt").is_between(pl.lit("2026-01-02"), pl.lit("2026-01-04"))).height
    for o, r in zip(objectives, kept):
        step = next(c for c in children if c.info.run_name == f"incremental_{o}")
        assert int(step.data.params["step.rehearsal_rows"]) == (min(new, older) if r else 0), o
    exposure = next(c for c in children if c.info.run_name == "incremental_exposure")
    assert int(exposure.data.metrics["train/rows"]) == new + (min(new, older) if kept[0] else 0)
