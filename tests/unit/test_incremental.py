"""train.mode incremental (#16 item 3): the schedule (full retrain forced, fallback with no champion),
a mismatched starting model refused, and an incremental model that passes the gate's verification."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from csmf_core import prep
from csmf_core.cascade import build_model, load_cascade_data, run_step
from csmf_core.checkpoint import save_checkpoint
from csmf_core.config import build_config
from csmf_core.idmap import BaseMaps
from csmf_core.incremental import FULL, INCREMENTAL, decide_mode, incremental_plan
from csmf_core.item_stats import day_number
from csmf_core.masks import param_owners
from csmf_core.serving import Recommender, write_bundle
from csmf_core.tuning import refit_config, run_trial, trial_config
from csmf_core.warm import WarmStartError, warm_start
from flows import incremental as flow_inc
from flows import registry
from flows.gate import verify_model
from flows.names import DATE_TAG, LAST_FULL_TAG
from tests.conftest import TINY_CONFIG


def test_decide_mode_schedule():
    parent = {"version": "3", "last_full_date": "2026-01-01"}
    d = decide_mode(FULL, "2026-01-05", 7, parent)
    assert d.mode == FULL and d.last_full_date == "2026-01-05" and d.parent_version is None
    d = decide_mode(INCREMENTAL, "2026-01-07", 7, parent)  # 6 days after the full retrain
    assert d.mode == INCREMENTAL and d.parent_version == "3" and d.last_full_date == "2026-01-01"
    d = decide_mode(INCREMENTAL, "2026-01-08", 7, parent)  # 7 days: forced
    assert d.mode == FULL and "full retrain is due" in d.reason and d.last_full_date == "2026-01-08"
    d = decide_mode(INCREMENTAL, "2026-01-08", 7, parent, explicit=True)  # --from-model: as asked
    assert d.mode == INCREMENTAL and "NOTE" not in d.reason
    # a named model trained for this date or later is continued, with a note: it saw the evaluation day
    d = decide_mode(INCREMENTAL, "2026-01-05", 7, parent | {"date": "2026-01-06"}, explicit=True)
    assert d.mode == INCREMENTAL and "it has seen 2026-01-05" in d.reason and "not out of sample" in d.reason
    d = decide_mode(INCREMENTAL, "2026-01-06", 7, parent | {"date": "2026-01-06"}, explicit=True)
    assert d.mode == INCREMENTAL and "NOTE" not in d.reason  # trained on days before 01-06: not seen
    # its line learned from later days (it continued a model trained for a later date): the schedule
    # retrains from scratch, a named start says its evaluation is not out of sample
    later = parent | {"date": "2026-01-04", "trained_through": "2026-01-05"}
    d = decide_mode(INCREMENTAL, "2026-01-05", 7, later)
    assert d.mode == FULL and "learned from days up to 2026-01-05" in d.reason
    d = decide_mode(INCREMENTAL, "2026-01-05", 7, later, explicit=True)
    assert d.mode == INCREMENTAL and "its line has learned from days up to 2026-01-05" in d.reason
    d = decide_mode(INCREMENTAL, "2026-01-06", 7, later)  # after everything it saw: as before
    assert d.mode == INCREMENTAL and "NOTE" not in d.reason
    d = decide_mode(INCREMENTAL, "2026-01-06", 7, parent | {"date": "2026-01-06"})  # a re-run
    assert d.mode == FULL and "re-run or a backfill" in d.reason
    d = decide_mode(INCREMENTAL, "2026-01-06", 7, parent | {"date": "2026-01-05"})
    assert d.mode == INCREMENTAL
    d = decide_mode(INCREMENTAL, "2026-01-08", 7, None)
    assert d.mode == FULL and "no champion" in d.reason and "falling back" in d.reason
    # a model that continued a bundle named by its path: its line's last full retrain is unknown, so
    # the next scheduled run retrains in full (it reset the clock: read as a full retrain of its date)
    named = {"version": "/somewhere/bundle", "last_full_date": "unknown"}
    d = decide_mode(INCREMENTAL, "2026-01-07", 7, named, explicit=True)
    assert d.mode == INCREMENTAL and d.last_full_date == "unknown" and "last full retrain unknown" in d.reason
    d = decide_mode(
        INCREMENTAL, "2026-01-08", 7, {"version": "5", "last_full_date": "unknown", "date": "2026-01-07"}
    )
    assert d.mode == FULL and "last full retrain of its line is unknown" in d.reason


def test_a_bundle_named_by_path_keeps_its_registered_lineage(monkeypatch, tiny_world):
    """--from-model <bundle directory> recorded no lineage: the version it registered said
    csmf.last_full_date '' and the next scheduled run took it for a full retrain of its own date."""
    resolved = SimpleNamespace(bundle=tiny_world["bundle"], version=None)
    monkeypatch.setattr(registry, "resolve_model", lambda ref=None, home=None: resolved)
    found = {}
    monkeypatch.setattr(registry, "find_version", lambda client, tags: found.get(tuple(tags.values())[0]))
    cfg = build_config(TINY_CONFIG, ["train.mode=incremental"])
    start = flow_inc.choose_start(
        cfg, "2026-01-06", tiny_world["ds"], str(tiny_world["bundle"]), tiny_world["root"], print
    )
    assert start.incremental and start.tags()["csmf.last_full_date"] == "unknown"
    # the directory is a registered version's bundle (same model digest): that version's facts
    digest = registry.model_digest(tiny_world["bundle"] / "checkpoint")
    found[digest] = _version(2, **{DATE_TAG: "2026-01-05", LAST_FULL_TAG: "2026-01-03"})
    start = flow_inc.choose_start(
        cfg, "2026-01-06", tiny_world["ds"], str(tiny_world["bundle"]), tiny_world["root"], print
    )
    assert start.decision.parent_version == "2" and start.tags()["csmf.last_full_date"] == "2026-01-03"


def test_incremental_runs_train_on_the_days_new_to_their_model():
    parent = {"version": "3", "last_full_date": "2026-01-04", "date": "2026-01-05"}
    d = decide_mode(INCREMENTAL, "2026-01-06", 7, parent)  # yesterday's champion: one new day
    assert d.new_days == 1 and d.train_days(1) == 1 and d.train_days(2) == 2
    # the gate kept v3 (trained for 01-05) through 01-06 and 01-07: 01-05, 01-06, 01-07 are new to it
    d = decide_mode(INCREMENTAL, "2026-01-08", 7, parent)
    assert d.new_days == 3 and d.train_days(1) == 3 and "the 3 day(s)" in d.reason
    d = decide_mode(INCREMENTAL, "2026-01-08", 7, parent | {"date": None}, explicit=True)  # a bundle path
    assert d.new_days is None and d.train_days(2) == 2
    cfg = build_config(
        {"data": {"val_days": "auto"}, "train": {"incremental_days": 1, "incremental_rehearsal": 0}}
    )
    assert flow_inc.incremental_overrides(cfg, decide_mode(INCREMENTAL, "2026-01-08", 7, parent)) == {
        "train.mode": "incremental",
        "train.incremental_days": 3,
        "data.train_days": 4,  # + the validation day (data.val_days auto -> 1)
    }
    # clipped to the partitions a full run would train on, the validation day kept
    clipped = flow_inc.incremental_overrides(cfg, decide_mode(INCREMENTAL, "2026-01-08", 7, parent), 3)
    assert clipped["train.incremental_days"] == 2 and clipped["data.train_days"] == 3
    assert (
        flow_inc.incremental_overrides(cfg, decide_mode(INCREMENTAL, "2026-01-08", 7, parent), 9)[
            "train.incremental_days"
        ]
        == 3
    )
    cfg = build_config({"data": {"val_days": 0}, "train": {"incremental_days": 2}})
    assert (
        flow_inc.incremental_overrides(cfg, decide_mode(INCREMENTAL, "2026-01-06", 7, parent))[
            "data.train_days"
        ]
        == 2
    )


def _version(n, **tags):
    return SimpleNamespace(version=str(n), tags=tags, aliases=["champion"], name="csmf")


def test_choose_start_falls_back_without_champion(monkeypatch, tiny_world):
    monkeypatch.setattr(registry, "champion", lambda client=None: None)
    monkeypatch.setattr(registry, "line_head", lambda run_date, client=None, dataset=None: None)
    fallback = (
        "train.mode=incremental but there is no champion to start from: falling back to a full retrain "
        "(the cascade from scratch)"
    )
    lines = []
    cfg = build_config(TINY_CONFIG, ["train.mode=incremental"])  # the default start: the line
    start = flow_inc.choose_start(cfg, "2026-01-06", tiny_world["ds"], None, tiny_world["root"], lines.append)
    assert not start.incremental and start.bundle is None
    assert lines == ["train.start_from=line: no verified model trained before 2026-01-06 yet", fallback]
    lines = []
    cfg = build_config(TINY_CONFIG, ["train.mode=incremental", "train.start_from=champion"])
    start = flow_inc.choose_start(cfg, "2026-01-06", tiny_world["ds"], None, tiny_world["root"], lines.append)
    assert not start.incremental and start.bundle is None
    assert lines == [fallback]
    assert start.tags() == {
        "csmf.train_mode": "full",
        "csmf.parent_model_version": "none",
        "csmf.last_full_date": "2026-01-06",
    }


def test_choose_start_forces_full_on_schedule(monkeypatch, tiny_world):
    # a champion from before train.mode existed: its own run date is its last full retrain
    monkeypatch.setattr(registry, "champion", lambda client=None: _version(4, **{DATE_TAG: "2026-01-02"}))
    resolved = SimpleNamespace(bundle=tiny_world["bundle"], version=_version(4))
    monkeypatch.setattr(registry, "resolve_model", lambda ref=None, home=None: resolved)
    lines = []
    cfg = build_config(
        TINY_CONFIG, ["train.mode=incremental", "train.full_every_days=3", "train.start_from=champion"]
    )
    start = flow_inc.choose_start(cfg, "2026-01-05", tiny_world["ds"], None, tiny_world["root"], lines.append)
    assert not start.incremental and "full retrain is due" in lines[0] and "3 days" in lines[0]
    start = flow_inc.choose_start(cfg, "2026-01-04", tiny_world["ds"], None, tiny_world["root"], lines.append)
    assert start.incremental and start.bundle == tiny_world["bundle"]
    assert start.tags() == {
        "csmf.train_mode": "incremental",
        "csmf.parent_model_version": "4",
        "csmf.last_full_date": "2026-01-02",
    }
    # the version an incremental run registers carries its line's full date on
    monkeypatch.setattr(
        registry,
        "champion",
        lambda client=None: _version(5, **{LAST_FULL_TAG: "2026-01-02", DATE_TAG: "2026-01-04"}),
    )
    start = flow_inc.choose_start(cfg, "2026-01-05", tiny_world["ds"], None, tiny_world["root"], lines.append)
    assert not start.incremental  # 3 days after 01-02, not after 01-04


def test_start_from_line_continues_the_newest_verified_model(monkeypatch, tiny_world):
    """train.start_from=line: the line's head when it is newer than the champion (the gate kept it
    out), the champion otherwise; the schedule of full retrains follows the model continued."""
    champ = _version(4, **{DATE_TAG: "2026-01-03", LAST_FULL_TAG: "2026-01-02"})
    head = _version(6, **{DATE_TAG: "2026-01-04", LAST_FULL_TAG: "2026-01-02", "csmf.gate": "kept"})
    monkeypatch.setattr(registry, "champion", lambda client=None: champ)
    heads = {"now": head}
    monkeypatch.setattr(registry, "line_head", lambda run_date, client=None, dataset=None: heads["now"])
    asked = []

    def resolve(ref=None, home=None):
        asked.append(ref)
        return SimpleNamespace(bundle=tiny_world["bundle"], version=None)

    monkeypatch.setattr(registry, "resolve_model", resolve)
    cfg = build_config(TINY_CONFIG, ["train.mode=incremental", "train.start_from=line"])
    lines = []
    start = flow_inc.choose_start(cfg, "2026-01-05", tiny_world["ds"], None, tiny_world["root"], lines.append)
    assert start.incremental and asked == ["models:/csmf/6"] and start.decision.parent_version == "6"
    assert start.decision.new_days == 1  # trained for 01-04: one new day, not the champion's two
    assert lines[0] == (
        "train.start_from=line: continuing the line's head v6 (trained for 2026-01-04, gate: kept); "
        "the champion (v4) keeps serving"
    )
    assert lines[1].startswith("train.mode=incremental: continuing model v6")
    # start_from=champion continues the champion, caught up on the two days since its run date
    start = flow_inc.choose_start(
        build_config(TINY_CONFIG, ["train.mode=incremental", "train.start_from=champion"]), "2026-01-05",
        tiny_world["ds"], None,
        tiny_world["root"], lines.append,
    )  # fmt: skip
    assert (
        start.decision.parent_version == "4"
        and start.decision.new_days == 2
        and asked[-1] == "models:/csmf/4"
    )
    # a champion as new as the head (here: the head itself) or no head: the champion
    heads["now"] = champ
    lines.clear()
    start = flow_inc.choose_start(cfg, "2026-01-05", tiny_world["ds"], None, tiny_world["root"], lines.append)
    assert (
        start.decision.parent_version == "4"
        and lines[0] == "train.start_from=line: the champion v4 heads the line"
    )
    heads["now"] = None
    lines.clear()
    start = flow_inc.choose_start(cfg, "2026-01-05", tiny_world["ds"], None, tiny_world["root"], lines.append)
    assert start.decision.parent_version == "4" and "no verified model" in lines[0]
    # the full retrain is due by the head's line: 7 days after its last full retrain
    heads["now"] = head
    lines.clear()
    start = flow_inc.choose_start(cfg, "2026-01-09", tiny_world["ds"], None, tiny_world["root"], lines.append)
    assert not start.incremental
    assert "the line's head (v6) descends from the full retrain of 2026-01-02, 7 days" in lines[1]


def test_a_model_of_another_dataset_is_not_continued(monkeypatch, tiny_world):
    """One registry per home: an incremental run on dataset B continued dataset A's champion (its id
    maps, its users), and the gate could then promote it over A's. Now another dataset's champion
    counts as no champion, and the line's head is looked up among the run's dataset's models."""
    from flows.names import DATASET_TAG

    other = _version(4, **{DATE_TAG: "2026-01-04", DATASET_TAG: "other-world"})
    monkeypatch.setattr(registry, "champion", lambda client=None: other)
    asked = []

    def head(run_date, client=None, dataset=None):
        asked.append(dataset)
        return None

    monkeypatch.setattr(registry, "line_head", head)
    lines = []
    cfg = build_config(TINY_CONFIG, ["train.mode=incremental"])
    start = flow_inc.choose_start(cfg, "2026-01-06", tiny_world["ds"], None, tiny_world["root"], lines.append)
    assert not start.incremental and asked == ["synth-tiny"]
    assert lines[0] == (
        "the champion v4 is a model of dataset 'other-world', this run's is 'synth-tiny': not continued"
    )
    assert "no champion to start from" in lines[-1]
    # the same dataset's champion is continued as before
    monkeypatch.setattr(registry, "champion", lambda client=None: _version(4, **{DATE_TAG: "2026-01-04",
                                                                               DATASET_TAG: "synth-tiny"}))  # fmt: skip
    resolved = SimpleNamespace(bundle=tiny_world["bundle"], version=None)
    monkeypatch.setattr(registry, "resolve_model", lambda ref=None, home=None: resolved)
    start = flow_inc.choose_start(cfg, "2026-01-06", tiny_world["ds"], None, tiny_world["root"], print)
    assert start.incremental and start.decision.parent_version == "4"


def test_mismatched_champion_is_refused(monkeypatch, tiny_world):
    monkeypatch.setattr(registry, "champion", lambda client=None: _version(2, **{DATE_TAG: "2026-01-05"}))
    resolved = SimpleNamespace(bundle=tiny_world["bundle"], version=_version(2))
    monkeypatch.setattr(registry, "resolve_model", lambda ref=None, home=None: resolved)
    cfg = build_config(TINY_CONFIG, ["train.mode=incremental", "model.dim=32", "model.hidden=[64]"])
    with pytest.raises(WarmStartError) as e:
        flow_inc.choose_start(cfg, "2026-01-06", tiny_world["ds"], None, tiny_world["root"], print)
    msg = str(e.value)
    assert "model.dim: the model has 16, the run 32" in msg and "model.hidden" in msg
    assert "train.mode=full" in msg
    with pytest.raises(
        WarmStartError, match=r"objectives: the model has \['exposure', 'click', 'conversion'\]"
    ):
        flow_inc.check_start_model(tiny_world["bundle"], build_config(TINY_CONFIG), ["exposure", "click"])


@pytest.fixture(scope="module")
def incremental_run(tiny_world, tmp_path_factory):
    """An incremental run from the tiny world's model: days 4-5 prepared with its id maps (day 5 the
    validation day of the selection pass), then the refit on day 5 only, evaluated on day 6."""
    root, dates, cfg = tmp_path_factory.mktemp("incr"), tiny_world["dates"], build_config(TINY_CONFIG)
    base = BaseMaps.read(tiny_world["bundle"] / "features")
    prep.prepare(tiny_world["ds"], root / "mr", train_dates=(dates[3], dates[4]), eval_dates=dates[5],
                 seq_len=5, n_req_neg=4, base=base)  # fmt: skip
    ckpt = tiny_world["bundle"] / "checkpoint"
    sel = load_cascade_data(root / "mr", val_days=1)
    start = warm_start(ckpt, sel, cfg)[:2]
    res = run_trial(
        sel, trial_config(cfg, {"data.val_days": 1}), start=start, steps=incremental_plan(sel.objectives)
    )
    refit = refit_config(cfg, res)
    data = load_cascade_data(root / "mr", train_from=dates[4])
    model, owners, _ = warm_start(ckpt, data, cfg)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    trained = trial_config(refit, {"train.epochs": [1, 1, 1]})  # every stage really trains here
    stage_ends = {}
    for step in incremental_plan(data.objectives):
        owners, _ = run_step(step, model, owners, data, trained)
        save_checkpoint(root / step.name, model, owners)
        if step.stage < 2:
            stage_ends[step.stage] = root / step.name
    write_bundle(root / "bundle", checkpoint_dir=root / "incremental_conversion", model_ready_dir=root / "mr",
                 dataset_dir=tiny_world["ds"], config=cfg)  # fmt: skip
    return {"res": res, "refit": refit, "data": data, "model": model, "owners": owners, "before": before,
            "stage_ends": stage_ends, "root": root, "sel": sel}  # fmt: skip


def test_selection_chooses_epochs_on_the_validation_day(incremental_run, tiny_world):
    res, sel, data = incremental_run["res"], incremental_run["sel"], incremental_run["data"]
    assert len(res.epochs) == 3 and all(0 <= e <= 1 for e in res.epochs)
    assert list(incremental_run["refit"].train.epochs) == res.epochs
    assert [r.step.name for r in res.reports] == [
        "incremental_exposure",
        "incremental_click",
        "incremental_conversion",
    ]
    assert all("val_best_epoch" in r.info for r in res.reports)
    # the selection trained on day 4 only, the refit on day 5 only: disjoint row sets, both non-empty
    assert 0 < len(sel.rows.u) and 0 < len(data.rows.u)
    both = load_cascade_data(incremental_run["root"] / "mr", val_days=0)
    assert len(sel.rows.u) + len(data.rows.u) == len(both.rows.u)


def test_incremental_keeps_ownership_and_passes_gate_verification(incremental_run, tiny_world):
    model, owners, before = incremental_run["model"], incremental_run["owners"], incremental_run["before"]
    base_owners = tiny_world["owners"]
    assert {k: v.tolist() for k, v in owners.units.items()} == {
        k: v.tolist() for k, v in base_owners.units.items()
    }
    own = param_owners(model, owners)
    changed = {t: 0 for t in range(3)}
    for name, p in model.named_parameters():
        o = own[name].long()
        mask = o.expand(p.shape) if o.shape != p.shape else o
        for t in range(3):
            changed[t] += int(((p.detach() != before[name]) & (mask == t)).sum())
    assert all(changed[t] > 0 for t in range(3)), changed  # every stage trained its own entries
    rec = Recommender.load(incremental_run["root"] / "bundle")
    checks = verify_model(
        rec, incremental_run["root"] / "incremental_conversion", incremental_run["stage_ends"]
    )
    assert [c.name for c in checks] == ["exact_fusion", "frozen_parameters", "index_matches_towers"]
    assert all(c.ok for c in checks), [c.detail for c in checks]
    # the check can fail: a stage-0 entry changed after stage 0 ended is caught
    broken = incremental_run["root"] / "broken"
    with torch.no_grad():
        p = dict(model.named_parameters())
        name = next(n for n, o in own.items() if (o == 0).any() and n.endswith("layers.0.weight"))
        idx = tuple((own[name] == 0).nonzero()[0])
        orig = p[name][idx].clone()
        p[name][idx] += 1.0
        save_checkpoint(broken, model, owners)
        p[name][idx] = orig
    bad = verify_model(rec, broken, incremental_run["stage_ends"])
    assert not next(c for c in bad if c.name == "frozen_parameters").ok


def test_logq_history_counts_every_earlier_partition(incremental_run, tiny_world):
    """train.incremental_logq=history: the refit's log-Q counts of click and conversion are their
    positives over every day before the evaluation day (days 1-5 here, counted from the raw events),
    not those of day 5's rows; exposure keeps the rows' counts."""
    import polars as pl

    mr, dates = incremental_run["root"] / "mr", tiny_world["dates"]
    rows_only = load_cascade_data(mr, train_from=dates[4])
    hist = load_cascade_data(mr, train_from=dates[4], logq_history=True)
    assert (hist.counts[0] == rows_only.counts[0]).all()
    items = pl.read_parquet(mr / "items.parquet")["item_id"].to_list()
    row = {iid: r for r, iid in enumerate(items) if iid is not None}
    events = pl.read_parquet(tiny_world["ds"] / "events" / "**" / "*.parquet", hive_partitioning=True)
    early = events.filter(pl.col("dt").cast(pl.String) < dates[5])
    for t, col in ((1, "clicked"), (2, "converted")):
        expected = [0] * len(items)
        for iid, n in early.filter(pl.col(col)).group_by("item_id").len().iter_rows():
            if iid in row:
                expected[row[iid]] += n
        assert hist.counts[t].tolist() == expected, col
        assert hist.counts[t].sum() > rows_only.counts[t].sum()  # more days than day 5's rows


def test_logq_history_of_the_selection_pass_leaves_out_its_validation_day(incremental_run, tiny_world):
    """With a validation day held out, the history counts of the selection pass are the positives of
    the days before that day (they included it: the pass trained on item frequencies of the day it
    was judged on); the counts of a load without validation days keep every day before evaluation."""
    import datetime as dt

    import polars as pl

    mr, dates = incremental_run["root"] / "mr", tiny_world["dates"]
    sel = load_cascade_data(mr, val_days=1, logq_history=True)
    whole = load_cascade_data(mr, logq_history=True)
    val_date = (dt.date(1970, 1, 1) + dt.timedelta(days=sel.val_day)).isoformat()
    assert val_date == dates[4]
    items = pl.read_parquet(mr / "items.parquet")["item_id"].to_list()
    row = {iid: r for r, iid in enumerate(items) if iid is not None}
    events = pl.read_parquet(tiny_world["ds"] / "events" / "**" / "*.parquet", hive_partitioning=True)
    for t, col in ((1, "clicked"), (2, "converted")):
        for data, before in ((sel, val_date), (whole, dates[5])):
            expected = [0] * len(items)
            early = events.filter((pl.col("dt").cast(pl.String) < before) & pl.col(col))
            for iid, n in early.group_by("item_id").len().iter_rows():
                if iid in row:
                    expected[row[iid]] += n
            assert data.log_q_counts(t).tolist() == expected, (col, before)
        assert sel.log_q_counts(t).sum() < whole.log_q_counts(t).sum()


def test_a_stage_with_too_few_rows_is_kept_as_it_was(incremental_run, tiny_world):
    """A quiet day of a sparse objective: the incremental step keeps the stage bit for bit (and the
    selection pass keeps its epoch 0) where a step of a cascade from scratch fails."""
    import dataclasses

    from csmf_core.cascade import Step

    data, cfg = incremental_run["data"], build_config(TINY_CONFIG)
    level = data.rows.level.clone()
    converted = torch.nonzero(level >= 2).flatten()
    assert len(converted) >= 2  # the fixture's day has conversions: remove all but one
    level[converted[1:]] = 1
    quiet = dataclasses.replace(data, rows=dataclasses.replace(data.rows, level=level))
    model, owners, _ = warm_start(tiny_world["bundle"] / "checkpoint", quiet, cfg)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    step = incremental_plan(quiet.objectives)[2]
    _, rep = run_step(step, model, owners, quiet, trial_config(cfg, {"train.epochs": [1, 1, 1]}))
    assert rep.info == {"rows": 1, "epochs": 0, "steps": 0, "kept": 1}
    assert all(torch.equal(before[k], v) for k, v in model.named_parameters())
    # the other stages still train on that day
    _, rep = run_step(
        incremental_plan(quiet.objectives)[1],
        model,
        owners,
        quiet,
        trial_config(cfg, {"train.epochs": [1, 1, 1]}),
    )
    assert rep.info["steps"] > 0 and rep.info["rows"] == int((level >= 1).sum())
    # a cascade from scratch has nothing to keep: the same rows fail its step
    with pytest.raises(ValueError, match="1 positive rows; a sampled softmax needs at least 2"):
        run_step(Step("finetune_conversion", "train", 2), model, owners, quiet, cfg)


def test_the_selection_pass_keeps_epoch_0_for_a_quiet_stage(incremental_run, tiny_world):
    import dataclasses

    sel, cfg = incremental_run["sel"], build_config(TINY_CONFIG)
    level = sel.rows.level.clone()
    level[level >= 2] = 1  # no conversion before the validation day
    quiet = dataclasses.replace(sel, rows=dataclasses.replace(sel.rows, level=level))
    start = warm_start(tiny_world["bundle"] / "checkpoint", quiet, cfg)[:2]
    res = run_trial(
        quiet, trial_config(cfg, {"data.val_days": 1}), start=start, steps=incremental_plan(quiet.objectives)
    )
    assert res.epochs[2] == 0 and res.reports[2].info["rows"] == 0
    assert list(refit_config(cfg, res).train.epochs)[2] == 0


def test_the_selection_pass_continues_the_newest_model_not_trained_on_its_days(
    monkeypatch, tiny_world, tmp_path
):
    """train.incremental_select_from=unseen: the selection pass trained the run's start on days the start
    had trained on (the previous run's refit day), so it measured extra epochs on a seen day. It now
    walks the line back through csmf.parent_model_version to the newest model trained before its first
    day; the start when the line reaches a full retrain (logged), or with `start`."""
    import json
    import shutil

    import mlflow

    from flows.incremental import Start, selection_start

    bundles, parents = {}, {"3": "2", "2": "1", "1": "none"}
    for v, through in (("1", "2026-01-03"), ("2", "2026-01-04"), ("3", "2026-01-05")):
        b = shutil.copytree(tiny_world["bundle"], tmp_path / f"b{v}")
        info = json.loads((b / "bundle.json").read_text())
        info["train_dates"] = ["2026-01-01", "2026-01-02"]  # each one's own window ends before its lineage
        info.setdefault("extra", {})["trained_through"] = through
        (b / "bundle.json").write_text(json.dumps(info))
        bundles[v] = b

    class Client:
        def get_model_version(self, name, version):
            assert name == "csmf"
            return _version(version, **{"csmf.parent_model_version": parents[version]})

    monkeypatch.setattr(mlflow, "MlflowClient", Client)
    monkeypatch.setattr(
        registry, "resolve_model", lambda ref, home=None: SimpleNamespace(bundle=bundles[ref[-1]])
    )
    cfg = build_config(TINY_CONFIG, ["train.mode=incremental"])
    start = Start(decide_mode(INCREMENTAL, "2026-01-07", 7, {"version": "3", "last_full_date": "2026-01-03",
                                                                "date": "2026-01-06"}), bundles["3"])  # fmt: skip
    assert start.incremental and start.decision.parent_version == "3"
    lines = []
    got = selection_start(start, "2026-01-05", cfg, tmp_path, lines.append)  # v3 trained on 01-05
    assert (got.select_bundle, got.select_version, got.select_between) == (
        bundles["2"],
        "2",
        (bundles["3"] / "features",),
    )
    assert "continues v2 (trained through 2026-01-04)" in lines[-1] and "the refit continues v3" in lines[-1]
    got = selection_start(start, "2026-01-04", cfg, tmp_path, lines.append)
    assert got.select_version == "1" and got.select_between == (
        bundles["3"] / "features",
        bundles["2"] / "features",
    )
    got = selection_start(start, "2026-01-03", cfg, tmp_path, lines.append)  # v1 is the line's full retrain
    assert got == start and "a full retrain" in lines[-1] and "continues the starting model" in lines[-1]
    assert selection_start(start, "2026-01-06", cfg, tmp_path, lines.append) == start  # v3 has not seen 01-06
    old = build_config(TINY_CONFIG, ["train.mode=incremental", "train.incremental_select_from=start"])
    assert selection_start(start, "2026-01-05", old, tmp_path, lines.append) == start


def test_the_selection_warm_start_loads_its_model_and_the_rows_recycled_since(tiny_world, tmp_path):
    """`_warm(selection=True)` continues the selection's model (not the run's start), and a row that a
    later model of the line recycled starts fresh, as a row this run recycles does."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from csmf_core.checkpoint import load_checkpoint
    from flows.incremental import Start, _warm

    cfg, data = build_config(TINY_CONFIG), tiny_world["data"]
    older = shutil.copytree(tiny_world["bundle"], tmp_path / "older")
    model, owners, _ = load_checkpoint(older / "checkpoint")
    with torch.no_grad():
        model.user.emb["c_uid"].weight.add_(1.0)  # tell the two models apart
    shutil.rmtree(older / "checkpoint")
    save_checkpoint(older / "checkpoint", model, owners)
    between = tmp_path / "between_features"
    between.mkdir()
    n_users = model.user.emb["c_uid"].weight.shape[0]
    flags = [False] * n_users
    flags[5] = True  # the line's later model gave user row 5 to a new id
    pq.write_table(pa.table({"last_seen": pa.array([0] * n_users, pa.int32()), "recycled": flags}),
                   between / "users_seen.parquet")  # fmt: skip
    start = Start(decide_mode(INCREMENTAL, "2026-01-07", 7, {"version": "3", "last_full_date": "2026-01-03",
                                                                "date": "2026-01-06"}), tiny_world["bundle"],
                  select_bundle=older, select_version="2", select_between=(between,))  # fmt: skip
    ready = SimpleNamespace(model_ready=tiny_world["mr"])
    refit_start, _, _ = _warm(start, ready, data, cfg)
    sel, _, info = _warm(start, ready, data, cfg, selection=True)
    w_start, w_sel = refit_start.user.emb["c_uid"].weight, sel.user.emb["c_uid"].weight
    fresh = build_model(data, cfg)[0].user.emb["c_uid"].weight
    assert torch.equal(w_start, tiny_world["model"].user.emb["c_uid"].weight)
    rows = [r for r in range(1, n_users) if r != 5]  # (row 0, the unknown id: zero in any warm start)
    assert torch.equal(w_sel[rows], model.user.emb["c_uid"].weight[rows])
    assert torch.equal(w_sel[5], fresh[5]) and not torch.equal(w_sel[5], model.user.emb["c_uid"].weight[5])
    assert info["user.emb.c_uid.weight"]["recycled"] == 1


def test_an_ancestor_that_cannot_be_loaded_leaves_the_selection_on_the_start(
    monkeypatch, tiny_world, tmp_path
):
    """A deleted parent version (or its artifacts gone) failed the whole daily run in selection_start;
    the pass then continues the start, with a line saying why."""
    import json
    import shutil

    import mlflow

    from flows.incremental import Start, selection_start

    b = shutil.copytree(tiny_world["bundle"], tmp_path / "b3")
    info = json.loads((b / "bundle.json").read_text())
    info.setdefault("extra", {})["trained_through"] = "2026-01-05"
    (b / "bundle.json").write_text(json.dumps(info))

    class Client:
        def get_model_version(self, name, version):
            return _version(version, **{"csmf.parent_model_version": "2"})

    def gone(ref, home=None):
        raise LookupError(f"{ref}: no such version")

    monkeypatch.setattr(mlflow, "MlflowClient", Client)
    monkeypatch.setattr(registry, "resolve_model", gone)
    start = Start(decide_mode(INCREMENTAL, "2026-01-07", 7, {"version": "3", "last_full_date": "2026-01-03",
                                                                "date": "2026-01-06"}), b)  # fmt: skip
    lines = []
    cfg = build_config(TINY_CONFIG, ["train.mode=incremental"])
    assert selection_start(start, "2026-01-05", cfg, tmp_path, lines.append) == start
    assert "v2, the parent of v3, cannot be loaded (LookupError" in lines[-1]


def test_a_warm_start_zeroes_the_unknown_id_row(tiny_world, tmp_path):
    """Row 0 of the id tables (the unknown id, and items the window does not train) never gets a
    gradient; a model from before 2026-12-05 left it random, so a line continuing one scored every
    untrained item with the same random vector. A warm start zeroes it, as a model from scratch starts."""
    import shutil

    from csmf_core.checkpoint import load_checkpoint

    old = shutil.copytree(tiny_world["bundle"] / "checkpoint", tmp_path / "ckpt")
    model, owners, _ = load_checkpoint(old)
    with torch.no_grad():
        model.item.emb["c_iid"].weight[0].normal_()
        model.user.emb["c_uid"].weight[0].normal_()
    shutil.rmtree(old)
    save_checkpoint(old, model, owners)
    warm, _, _ = warm_start(old, tiny_world["data"], build_config(TINY_CONFIG))
    assert not warm.item.emb["c_iid"].weight[0].any() and not warm.user.emb["c_uid"].weight[0].any()
    assert torch.equal(warm.item.emb["c_iid"].weight[1:], model.item.emb["c_iid"].weight[1:])


# ---- rehearsal (train.incremental_rehearsal) -------------------------------------------------------
@pytest.fixture(scope="module")
def rehearsal_mr(tiny_world, tmp_path_factory):
    """Days 2-5 of the tiny world prepared with its id maps, evaluated on day 6; with each train row's
    day and identity read straight from the model-ready train table (independent of the loader)."""
    from csmf_core.data import load_model_ready
    from csmf_core.prep import DAY_US

    root, dates = tmp_path_factory.mktemp("rehearsal"), tiny_world["dates"]
    base = BaseMaps.read(tiny_world["bundle"] / "features")
    prep.prepare(tiny_world["ds"], root / "mr", train_dates=(dates[1], dates[4]), eval_dates=dates[5],
                 seq_len=5, n_req_neg=4, base=base)  # fmt: skip
    tr = load_model_ready(root / "mr").train
    day = (tr.ts // DAY_US).tolist()
    keys = [(int(u), int(i), int(lv), tuple(n.tolist())) for u, i, lv, n in zip(tr.u, tr.i, tr.level, tr.neg)]
    return SimpleNamespace(mr=root / "mr", dates=dates, day=day, keys=keys)


def _keys(rows):
    return [
        (int(u), int(i), int(lv), tuple(n.tolist()))
        for u, i, lv, n in zip(rows.u, rows.i, rows.level, rows.neg)
    ]


def test_rehearsal_adds_a_uniform_draw_of_earlier_rows(rehearsal_mr):
    """The refit of an incremental step with rehearsal R: every row of the new day, in order, then
    round(R x their number) distinct rows of the earlier days (a multiset check against the raw
    table), drawn by the seed; R = 0 is the new day alone."""
    from collections import Counter

    r, new_day = rehearsal_mr, rehearsal_mr.dates[4]
    d5 = day_number(new_day)
    new = [k for k, d in zip(r.keys, r.day) if d == d5]
    old = Counter(k for k, d in zip(r.keys, r.day) if d < d5)
    plain = load_cascade_data(r.mr, train_from=new_day)
    assert _keys(plain.rows) == new
    half = load_cascade_data(r.mr, train_from=new_day, rehearsal=0.5, rehearsal_seed=3)
    got = _keys(half.rows)
    assert got[: len(new)] == new
    drawn = got[len(new) :]
    assert len(drawn) == round(0.5 * len(new)) > 0
    assert (
        not Counter(drawn) - old
    )  # every drawn row is an earlier day's row, none twice more than it is there
    again = load_cascade_data(r.mr, train_from=new_day, rehearsal=0.5, rehearsal_seed=3)
    other = load_cascade_data(r.mr, train_from=new_day, rehearsal=0.5, rehearsal_seed=4)
    assert _keys(again.rows) == got and _keys(other.rows) != got
    # more than the earlier days hold: all of them, once
    everything = load_cascade_data(r.mr, train_from=new_day, rehearsal=1000.0)
    assert Counter(_keys(everything.rows)[len(new) :]) == old
    # the log-Q / popularity counts of a refit are those of the rows trained on, the drawn ones included
    exposure = [0] * half.counts[0].shape[0]
    for _, i, _, _ in got:
        exposure[i] += 1
    assert half.counts[0].tolist() == exposure


@pytest.mark.parametrize("logq_history", [False, True])
def test_rehearsal_variants_read_once_equal_separate_loads(rehearsal_mr, logq_history):
    """load_rehearsal_variants: for each ratio (0, a draw, more than the earlier days hold, a repeat)
    the CascadeData a separate load_cascade_data(rehearsal=ratio) gives, field by field, the selection
    pass's validation day held out; the tables they have in common are the same objects."""
    import dataclasses

    import numpy as np

    from csmf_core.cascade import load_rehearsal_variants

    r = rehearsal_mr
    opts = dict(val_days=1, train_from=r.dates[3], logq_history=logq_history, rehearsal_seed=5)
    got = load_rehearsal_variants(r.mr, [0.0, 0.5, 1000.0, 0.5], **opts)
    assert list(got) == [0.0, 0.5, 1000.0]
    for ratio, d in got.items():
        want = load_cascade_data(r.mr, rehearsal=ratio, **opts)
        assert _keys(d.rows) == _keys(want.rows) and d.rehearsal_rows == want.rehearsal_rows
        for f in dataclasses.fields(want):
            a, b = getattr(d, f.name), getattr(want, f.name)
            if f.name in ("counts", "logq_counts", "val_counts"):
                assert (a is None) == (b is None) and all((x == y).all() for x, y in zip(a or [], b or []))
                assert len(a or []) == len(b or [])
            elif f.name in ("val", "eval"):
                assert torch.equal(a.u, b.u)
            elif f.name not in ("rows", "tables"):
                assert a == b, f.name
        assert d.tables is got[0.0].tables and d.val is got[0.0].val and d.eval is got[0.0].eval
    assert got[0.0].rehearsal_rows == 0 < got[0.5].rehearsal_rows < got[1000.0].rehearsal_rows
    assert not np.array_equal(got[0.0].logq_counts[0], got[0.5].logq_counts[0])


def test_rehearsal_in_the_selection_pass_never_draws_validation_rows(rehearsal_mr):
    """The selection pass (validation day = day 5) trains on day 4 and a draw from days 2-3; its
    popularity reference stays the window's non-validation rows; without rehearsal, naming the
    window's first day as train_from changes nothing (rows and counts bit for bit)."""
    from collections import Counter

    r = rehearsal_mr
    d4, d5 = day_number(r.dates[3]), day_number(r.dates[4])
    day4 = [k for k, d in zip(r.keys, r.day) if d == d4]
    earlier = Counter(k for k, d in zip(r.keys, r.day) if d < d4)
    sel = load_cascade_data(r.mr, val_days=1, train_from=r.dates[3], rehearsal=1.0)
    assert day_number(r.dates[4]) == sel.val_day == d5
    got = _keys(sel.rows)
    assert got[: len(day4)] == day4 and len(got) == 2 * len(day4)
    assert not Counter(got[len(day4) :]) - earlier
    window = load_cascade_data(r.mr, val_days=1)
    for a, b in zip(sel.val_counts, window.val_counts):
        assert (a == b).all()
    clicks = [0] * sel.counts[0].shape[0]
    for _, i, lv, _ in got:
        clicks[i] += lv >= 1
    assert sel.logq_counts[1].tolist() == clicks  # log-Q: the rows trained on (incremental_logq rows)
    same = load_cascade_data(r.mr, val_days=1, train_from=r.dates[1])
    assert _keys(same.rows) == _keys(window.rows)
    for a, b in zip(same.logq_counts, window.logq_counts):
        assert (a == b).all()


def test_rehearsal_widens_the_incremental_window():
    parent = {"version": "3", "last_full_date": "2026-01-04", "date": "2026-01-07"}
    decision = decide_mode(INCREMENTAL, "2026-01-08", 7, parent)
    cfg = build_config({"train": {"incremental_rehearsal": 1.0, "rehearsal_days": 3}})
    # one new day + the validation day + three rehearsal days before them
    assert flow_inc.incremental_overrides(cfg, decision)["data.train_days"] == 5
    assert flow_inc.incremental_overrides(cfg, decision, 4)["data.train_days"] == 4  # as many as there are
    off = build_config(None, ["train.incremental_rehearsal=0"])
    assert flow_inc.incremental_overrides(off, decision, 7)["data.train_days"] == 2  # off
    # the default (auto over [0, 2]) reads the rehearsal days; with no validation days it cannot choose
    assert (
        flow_inc.incremental_overrides(build_config(None), decision, 9)["data.train_days"] == 8
    )  # 1 + 1 + 6
    no_val_auto = build_config({"data": {"val_days": 0}})
    assert flow_inc.incremental_overrides(no_val_auto, decision, 9)["data.train_days"] == 1
    assert no_val_auto.rehearsal_ratios() == (0.0,) and no_val_auto.rehearsal_for(2) == 0.0
    dates = [f"2026-01-0{d}" for d in range(2, 8)]
    assert flow_inc.selection_from(dates, cfg) == "2026-01-06"  # the day before the validation day
    two = build_config({"train": {"incremental_days": 2, "incremental_rehearsal": 0.5, "rehearsal_days": 2}})
    assert flow_inc.selection_from(dates, two) == "2026-01-05"  # the two days before the validation day
    assert flow_inc.incremental_overrides(two, decision, 9)["data.train_days"] == 5  # 2 + 1 + 2
    no_val = build_config({"data": {"val_days": 0}, "train": {"incremental_rehearsal": 1.0}})
    assert flow_inc.incremental_overrides(no_val, decision, 9)["data.train_days"] == 7  # 1 + 0 + 6
    with pytest.raises(ValueError, match="incremental_rehearsal must be >= 0"):
        build_config(None, ["train.incremental_rehearsal=-1"])


def test_rehearsal_keeps_the_selection_pass_history_counts(rehearsal_mr):
    """train.incremental_logq=history with rehearsal in the selection pass: the counts of the objectives
    after the first are still the positives before the validation day (the draw does not change them),
    the first objective's are those of the rows trained on."""
    r = rehearsal_mr
    plain = load_cascade_data(r.mr, val_days=1, logq_history=True)
    drawn = load_cascade_data(r.mr, val_days=1, logq_history=True, train_from=r.dates[3], rehearsal=1.0)
    assert drawn.rehearsal_rows == len(drawn.rows.u) // 2 > 0
    for t in (1, 2):
        assert (drawn.logq_counts[t] == plain.logq_counts[t]).all()
    exposure = [0] * drawn.counts[0].shape[0]
    for _, i, _, _ in _keys(drawn.rows):
        exposure[i] += 1
    assert drawn.logq_counts[0].tolist() == exposure
    assert (drawn.logq_counts[0] != plain.logq_counts[0]).any()  # fewer rows than the whole window


def _state(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def test_best_of_keeps_the_rows_whose_stage_validates_best(tiny_world, rehearsal_mr):
    """train.incremental_rehearsal=auto in the selection pass (csmf_core.tuning.best_of): each ratio's
    rows train the step from the same point; the kept one is the one whose own-mode validation Recall@K
    (the epoch selection's best) is highest, the first of equal ones, and the model ends exactly as
    that ratio's run alone leaves it (every ratio checked against its own run from a copy)."""
    import copy
    import math

    from csmf_core.tuning import best_of

    cfg = build_config(TINY_CONFIG, ["train.epochs=[2,2,2]", "data.val_days=1"])
    r = rehearsal_mr
    by_ratio = {
        x: load_cascade_data(r.mr, val_days=1, train_from=r.dates[3], rehearsal=x) for x in (0.0, 1.0, 3.0)
    }
    assert [d.rehearsal_rows for d in by_ratio.values()][0] == 0 < by_ratio[1.0].rehearsal_rows
    start, owners, _ = warm_start(tiny_world["bundle"] / "checkpoint", by_ratio[0.0], cfg)
    step = incremental_plan(by_ratio[0.0].objectives)[0]
    alone = {}
    for x, d in by_ratio.items():
        m = copy.deepcopy(start)
        _, rep = run_step(step, m, owners, d, cfg)
        alone[x] = (max(rep.val_scores), _state(m), rep.info["val_best_epoch"])
    assert len({s for s, _, _ in alone.values()}) > 1  # the ratios lead to different validation scores
    order = [1.0, 3.0, 0.0]  # here 3 validates best: neither the first nor the last tried
    want = max(order, key=lambda x: alone[x][0])  # the best score, the first tried among equals
    assert want == 3.0  # (what makes this case test the restore of a kept state)
    model = copy.deepcopy(start)
    _, rep, kept = best_of(step, model, owners, [(x, by_ratio[x]) for x in order], cfg)
    assert kept == want == rep.info["rehearsal"]
    assert rep.info["val_best_epoch"] == alone[want][2]
    for x, (s, _, _) in alone.items():
        assert math.isclose(rep.info[f"val_score_rehearsal_{x:g}"], s, rel_tol=0, abs_tol=1e-12)
    got = _state(model)
    assert all(torch.equal(got[n], alone[want][1][n]) for n in got)
    # equal candidates (the same rows twice): the first is kept, as trained alone
    model = copy.deepcopy(start)
    _, rep, kept = best_of(step, model, owners, [(3.0, by_ratio[1.0]), (5.0, by_ratio[1.0])], cfg)
    assert kept == 3.0
    got = _state(model)
    assert all(torch.equal(got[n], alone[1.0][1][n]) for n in got)


def test_rehearsal_per_stage_and_auto_settings():
    """A list gives one ratio per stage (the last repeats), auto reads the candidates; the refit of an
    auto run trains the ratios its selection pass kept; rehearsal days are read when any may be > 0."""
    from csmf_core.tuning import TrialResult

    per = build_config(None, ["train.incremental_rehearsal=[1, 0]"])
    assert [per.rehearsal_for(t) for t in range(3)] == [1.0, 0.0, 0.0]
    assert flow_inc.rehearsal_window(per) == per.train.rehearsal_days == 6
    auto = build_config(None, ["train.incremental_rehearsal=auto", "train.rehearsal_candidates=[0, 2]"])
    assert auto.rehearsal_ratios() == (0.0, 2.0) and flow_inc.rehearsal_window(auto) == 6
    assert flow_inc.rehearsal_window(build_config(None, ["train.incremental_rehearsal=auto",
                                                        "train.rehearsal_candidates=[0]"])) == 0  # fmt: skip
    with pytest.raises(ValueError, match="no ratio until a selection pass"):
        auto.rehearsal_for(0)
    res = TrialResult(1.0, (1.0, 1.0, 1.0), [2, 0, 3], [], rehearsal=[2.0, 0.0, 2.0])
    refit = refit_config(auto, res)
    assert [refit.rehearsal_for(t) for t in range(3)] == [2.0, 0.0, 2.0] and refit.data.val_days == 0
    assert refit.train.epochs == (2, 0, 3)
    assert refit_config(per, TrialResult(1.0, (1.0,) * 3, [1, 1, 1], [])).train.incremental_rehearsal == (
        1.0,
        0.0,
    )


def test_best_of_scores_a_kept_stage_as_its_start(tiny_world, rehearsal_mr):
    """A choice whose rows leave the stage as it was (fewer than 2 positives: Step.keep_if_few) scores
    what the starting model scores (the trained choice's epoch 0): it is kept, with the model
    untouched, unless the trained choice validates better than its start."""
    import copy
    import dataclasses

    from csmf_core.tuning import best_of

    cfg = build_config(TINY_CONFIG, ["train.epochs=[2,2,2]", "data.val_days=1"])
    r = rehearsal_mr
    full = load_cascade_data(r.mr, val_days=1, train_from=r.dates[3])
    few = dataclasses.replace(full, rows=full.rows.select(torch.nonzero(full.rows.level < 2).flatten()))
    start, owners, _ = warm_start(tiny_world["bundle"] / "checkpoint", full, cfg)
    step = incremental_plan(full.objectives)[2]  # conversion: no positive among `few`'s rows
    trained = copy.deepcopy(start)
    _, alone = run_step(step, trained, owners, full, cfg)
    assert alone.val_scores and max(alone.val_scores) >= alone.val_scores[0]
    model = copy.deepcopy(start)
    _, rep, kept = best_of(step, model, owners, [(0.0, few), (2.0, full)], cfg)
    assert rep.info["val_score_rehearsal_0"] == alone.val_scores[0]  # the start's score
    assert rep.info["val_score_rehearsal_2"] == max(alone.val_scores)
    want, state = (
        (2.0, _state(trained)) if max(alone.val_scores) > alone.val_scores[0] else (0.0, _state(start))
    )
    assert kept == want
    got = _state(model)
    assert all(torch.equal(got[n], state[n]) for n in got)
    # the trained choice first: it wins a tie with the kept one (the first of equal ones)
    model = copy.deepcopy(start)
    _, rep, kept = best_of(step, model, owners, [(2.0, full), (0.0, few)], cfg)
    assert kept == 2.0
    got, state = _state(model), _state(trained)
    assert all(torch.equal(got[n], state[n]) for n in got)


def test_selection_data_shares_what_the_ratios_share(rehearsal_mr):
    """One CascadeData per ratio for the selection pass (validation day 5, pass day 4): the same tables
    and validation rows, each its own draw; a ratio that cannot draw more rows than a smaller one (every
    earlier row drawn already) is that one's data, so auto does not train the same rows twice."""
    r = rehearsal_mr
    cfg = build_config(
        None, ["train.incremental_rehearsal=auto", "train.rehearsal_candidates=[1000, 0, 1, 2000]"]
    )
    ready = SimpleNamespace(model_ready=r.mr)
    run = SimpleNamespace(window=SimpleNamespace(train_dates=list(r.dates[1:5])))
    out = flow_inc.selection_data(ready, cfg, run, 1)
    assert list(out) == [0.0, 1.0, 1000.0, 2000.0]
    d4 = day_number(r.dates[3])
    n4, older = sum(d == d4 for d in r.day), sum(d < d4 for d in r.day)
    assert [out[x].rehearsal_rows for x in (0.0, 1.0, 1000.0)] == [0, min(n4, older), older]
    assert out[2000.0] is out[1000.0] and out[1000.0] is not out[1.0]
    assert all(out[x].tables is out[0.0].tables and out[x].val is out[0.0].val for x in out)
    alone = load_cascade_data(r.mr, val_days=1, train_from=r.dates[3], rehearsal=1.0)
    assert _keys(out[1.0].rows) == _keys(alone.rows)
