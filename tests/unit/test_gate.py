"""The champion/challenger gate (flows/gate.py): verification checks that can fail, and the rules."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from csmf_core.cascade import run_cascade
from csmf_core.checkpoint import save_checkpoint
from csmf_core.index import ItemIndex
from csmf_core.masks import param_owners
from csmf_core.serving import Recommender
from flows.gate import (
    Check,
    check_exact_fusion,
    comparison_dates,
    decide,
    gate_metrics,
    gate_users,
    regressions,
    trained_too_late,
    unknown_id,
    unmeasured,
    verify_model,
)


@pytest.fixture(scope="module")
def stages(tiny_world, tmp_path_factory):
    """Checkpoints at the end of each stage but the last of a re-run of tiny_world's cascade."""
    root = tmp_path_factory.mktemp("gate")
    ends = {}

    def after(rep, model, owners):
        if rep.step.kind == "recover":
            ends[rep.step.stage] = save_checkpoint(root / f"end{rep.step.stage}", model, owners)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, owners, _ = run_cascade(tiny_world["data"], tiny_world["cfg"], after_step=after)
    finally:
        torch.set_num_threads(threads)
    final = save_checkpoint(root / "final", model, owners)
    return {"root": root, "ends": ends, "final": final, "model": model, "owners": owners}


def test_verification_passes_on_a_correct_model(tiny_world, stages):
    rec = Recommender.load(tiny_world["bundle"])
    checks = verify_model(rec, stages["final"], stages["ends"], sample_users=64)
    assert [c.name for c in checks] == ["exact_fusion", "frozen_parameters", "index_matches_towers"]
    assert all(c.ok for c in checks), checks
    assert sorted(stages["ends"]) == [0, 1]


def test_frozen_check_catches_a_changed_stage0_entry(stages, tmp_path):
    model, owners = stages["model"], stages["owners"]
    own = param_owners(model, owners)
    # a linear weight entry owned by stage 0 (found from the owner tensors, not from the gate code)
    name = next(n for n, o in own.items() if n.endswith(".weight") and o.dim() == 2 and (o == 0).any())
    r, c = map(int, (own[name] == 0).nonzero()[0])
    with torch.no_grad():
        dict(model.named_parameters())[name][r, c] += 1e-3
    try:
        broken = save_checkpoint(tmp_path / "broken", model, owners)
    finally:
        with torch.no_grad():
            dict(model.named_parameters())[name][r, c] -= 1e-3
    from flows.gate import check_frozen

    check = check_frozen(broken, stages["ends"])
    assert not check.ok and name in check.detail and "1 of" in check.detail
    assert check_frozen(stages["final"], stages["ends"]).ok


def test_index_check_catches_stale_vectors(tiny_world, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_world["bundle"], bundle)
    rec = Recommender.load(bundle)
    ids, vecs = rec.item_vectors()
    stale = vecs.copy()
    stale[3] += 0.05  # one item re-embedded by an older model
    shutil.rmtree(bundle / "index")
    ItemIndex.build(ids, stale, kind="flat").save(bundle / "index")
    from flows.gate import check_index

    check = check_index(Recommender.load(bundle), rec.user_vocab[:5])
    assert not check.ok and "differ from the item tower" in check.detail
    assert check_index(rec, rec.user_vocab[:5]).ok


def test_fusion_check_catches_wrong_segments(tiny_world):
    rec = Recommender.load(tiny_world["bundle"])
    users = rec.user_vocab[:20]
    w = [np.array([1.0, 1.8, 1.2], np.float32)]
    assert check_exact_fusion(rec, users, w).ok
    owners = rec._owners.clone()
    first_click = int((owners == 1).nonzero()[0])
    owners[first_click] = 2  # serving scales one click dimension as if conversion owned it
    rec._owners = owners
    bad = check_exact_fusion(rec, users, w)
    assert not bad.ok and "max |fused - sum k_t s_t|" in bad.detail


# ---- metrics and rules (hand-made numbers) ---------------------------------------------------------
def _rows(values):
    return [
        {"objective": o, "scorer": s, "k": k, "recall": r, "ndcg": n, "users": 10}
        for (o, s, k, r, n) in values
    ]


def test_gate_metrics_keep_own_and_fused_at_k():
    rows = _rows(
        [
            ("click", "click", 50, 0.3, 0.1),
            ("click", "fused", 50, 0.32, 0.11),
            ("click", "exposure", 50, 0.9, 0.9),  # another stage's score: not gated
            ("click", "popularity", 50, 0.9, 0.9),
            ("click", "click", 10, 0.9, 0.9),  # other k
            ("conversion", "conversion", 50, float("nan"), float("nan")),  # no users: left out
        ]
    )
    assert gate_metrics(rows, ["exposure", "click", "conversion"], 50) == {
        "click/click/recall@50": 0.3,
        "click/click/ndcg@50": 0.1,
        "click/fused/recall@50": 0.32,
        "click/fused/ndcg@50": 0.11,
    }


OK = [Check("exact_fusion", True, "")]
LABELS = ("exposed", "clicked", "converted")  # the synthetic data's label columns, in objective order
NEW = {"click/click/recall@50": 0.30, "click/fused/ndcg@50": 0.12}
OLD = {"click/click/recall@50": 0.32, "click/fused/ndcg@50": 0.10}


def test_regressions_use_absolute_tolerance():
    assert regressions(NEW, OLD, 0.005) == ["click/click/recall@50 0.3000 < champion 0.3200 - 0.005"]
    assert regressions(NEW, OLD, 0.03) == []
    assert regressions({"a": 0.30}, {"a": 0.305}, 0.005) == []  # exactly at the tolerance: not worse


USERS = {"exposure": 150, "click": 80, "conversion": 15}  # users with a positive: measurable at 10


def test_decide_rules_in_order():
    first = decide(OK, NEW, None, champion_version=None, users=USERS)
    assert first.promote and "first model" in first.reason
    bad = decide(
        [Check("frozen_parameters", False, "w: 1 of 9 changed")],
        NEW,
        None,
        champion_version=None,
        users=USERS,
    )
    assert not bad.promote and "verification failed: frozen_parameters" in bad.reason
    assert not bad.verified and first.verified  # the tag csmf.gate_verified (train.start_from=line)
    assert not decide([], NEW, None, champion_version=None, users=USERS).verified  # nothing checked
    off = decide(OK, NEW, None, champion_version=None, users=USERS, enabled=False)
    assert not off.promote and "gate.enabled" in off.reason
    same = decide(OK, NEW, OLD, champion_version="2", users=USERS, identical_inputs=True)
    assert not same.promote and "identical inputs" in same.reason
    worse = decide(OK, NEW, OLD, champion_version="2", users=USERS, tolerance=0.005)
    assert not worse.promote and worse.verified  # kept by the metrics, still a sound model
    assert not worse.promote and "champion v2" in worse.reason and "click/click/recall@50" in worse.reason
    better = decide(OK, NEW, OLD, champion_version="2", users=USERS, tolerance=0.03)
    assert better.promote and "2 metrics compared" in better.reason
    odd = decide(OK, NEW, None, champion_version="2", users=USERS, incomparable="objectives differ")
    assert not odd.promote and "objectives differ" in odd.reason
    md = worse.to_markdown()
    assert "champion kept" in md and "| click/click/recall@50 | 0.3000 | 0.3200 | -0.0200 |" in md


# ---- measurability (issue #13 item 1) ----------------------------------------------------------------
def test_gate_users_reads_the_own_scorer_rows():
    rows = [
        {"objective": "exposure", "scorer": "exposure", "k": 50, "recall": 0.5, "ndcg": 0.2, "users": 150},
        {"objective": "exposure", "scorer": "fused", "k": 50, "recall": 0.5, "ndcg": 0.2, "users": 150},
        {
            "objective": "click",
            "scorer": "click",
            "k": 10,
            "recall": 0.1,
            "ndcg": 0.1,
            "users": 99,
        },  # other k
        {"objective": "click", "scorer": "popularity", "k": 50, "recall": 0.1, "ndcg": 0.1, "users": 98},
        {"objective": "click", "scorer": "click", "k": 50, "recall": 0.3, "ndcg": 0.1, "users": 7},
    ]
    assert gate_users(rows, ["exposure", "click", "conversion"], 50) == {
        "exposure": 150,
        "click": 7,
        "conversion": 0,  # no row: no user with a positive
    }


def test_unmeasured_lists_objectives_below_the_minimum():
    users = {"exposure": 10, "click": 3, "conversion": 0}
    assert unmeasured(users, 10) == ["click: 3 users with a positive", "conversion: 0 users with a positive"]
    assert unmeasured(users, 1) == ["conversion: 0 users with a positive"]
    assert unmeasured({"exposure": 10}, 10) == []  # exactly the minimum measures


NOTHING = {"exposure": 0, "click": 0, "conversion": 0}


def test_a_day_without_positives_never_promotes():
    """The issue's case: every metric NaN (dropped by gate_metrics) for both models. The old rules
    compared "0 metrics", found no regression and promoted the untrained challenger."""
    kept = decide(OK, {}, {}, champion_version="1", users=NOTHING, days=["2026-01-06"])
    assert not kept.promote and kept.verdict() == "champion kept"
    assert kept.reason.startswith("the evaluation data on 2026-01-06 cannot measure the model: ")
    assert "exposure: 0 users with a positive; click: 0 users" in kept.reason
    assert "(gate.min_users 10); champion v1 kept" in kept.reason
    md = kept.to_markdown()
    assert (
        "**Gate: champion kept.**" in md
        and "Evaluated on 2026-01-06; users with a positive: exposure 0" in md
    )


def test_too_few_users_for_one_objective_keeps_the_champion():
    users = {"exposure": 150, "click": 80, "conversion": 4}
    good = {k: v + 0.1 for k, v in OLD.items()}  # better everywhere: still not measured well enough
    kept = decide(OK, good, OLD, champion_version="1", users=users, min_users=5)
    assert not kept.promote and "conversion: 4 users with a positive" in kept.reason
    assert "exposure" not in kept.reason.split("cannot measure the model: ")[1]
    assert decide(OK, good, OLD, champion_version="1", users=users, min_users=4).promote


def test_an_unmeasurable_first_model_is_not_promoted():
    first = decide(OK, {}, None, champion_version=None, users=NOTHING, days=["2026-01-06"])
    assert not first.promote and first.verdict() == "not promoted (no champion)"
    assert "cannot measure" in first.reason and "no champion yet" in first.reason
    assert "flows.registry.promote" in first.reason  # what the operator can do
    # the other failures still win first: verification, then the switch
    broken = [Check("index_matches_towers", False, "stale")]
    assert "verification failed" in decide(broken, {}, None, champion_version=None, users=NOTHING).reason


def test_every_compared_metric_missing_keeps_the_champion():
    # measurable users, but no metric (cannot happen with real rows; the rule must not rely on that)
    none = decide(OK, {}, {}, champion_version="1", users=USERS)
    assert not none.promote and "no metric could be computed" in none.reason
    first = decide(OK, {}, None, champion_version=None, users=USERS)
    assert not first.promote and "no metric could be computed" in first.reason
    # champion scored nothing on the days the challenger was scored on: nothing was compared
    empty = decide(OK, NEW, {}, champion_version="1", users=USERS)
    assert (
        not empty.promote
        and "champion lacks ['click/click/recall@50', 'click/fused/ndcg@50']" in empty.reason
    )
    part = decide(OK, {"click/click/recall@50": 0.9}, OLD, champion_version="1", users=USERS)
    assert not part.promote and "challenger lacks ['click/fused/ndcg@50']" in part.reason


# ---- which days (issue #13 item 2) --------------------------------------------------------------------
def _days(a: int, b: int) -> list[str]:
    return [f"2026-01-{d:02d}" for d in range(a, b + 1)]


def test_trained_too_late():
    assert trained_too_late(["2026-01-05"], _days(1, 4)) is None  # the daily case: window before the day
    assert trained_too_late(["2026-01-04"], _days(1, 4)) == (
        "trained on 2026-01-04 (its window 2026-01-01..2026-01-04), "
        "not before the evaluation day(s) 2026-01-04"
    )
    two = trained_too_late(["2026-01-04", "2026-01-03"], list(reversed(_days(1, 5))))  # order ignored
    assert two.startswith("trained on 2026-01-03, 2026-01-04 (its window 2026-01-01..2026-01-05)")
    later = trained_too_late(["2026-01-02"], _days(5, 7))  # a champion trained on later data only
    assert later.startswith("trained on later days (its window 2026-01-05..2026-01-07)")
    assert trained_too_late(["2026-01-02"], ["2026-01-01"]) is None


def test_comparison_dates_are_the_newest_after_both_windows():
    parts = _days(1, 6)
    assert comparison_dates(parts, [_days(1, 4), _days(1, 3)], 1) == ["2026-01-06"]
    assert comparison_dates(parts, [_days(1, 4), _days(1, 3)], 2) == ["2026-01-05", "2026-01-06"]
    assert comparison_dates(parts, [_days(1, 4), _days(1, 3)], 3) is None  # 2026-01-04 was trained on
    assert comparison_dates(parts, [_days(1, 6), _days(1, 3)], 1) is None  # nothing after the newest
    gappy = ["2026-01-01", "2026-01-05", "2026-01-07", "2026-01-08", "2026-01-10"]
    assert comparison_dates(gappy, [["2026-01-01"]], 2) == ["2026-01-07", "2026-01-08"]  # consecutive
    assert comparison_dates(gappy, [["2026-01-01"]], 1) == ["2026-01-10"]


def test_the_reason_names_the_days_and_why_they_were_chosen():
    note = "champion v1 trained on 2026-01-04 (...): both models re-evaluated on 2026-01-06"
    d = decide(
        OK, NEW, OLD, champion_version="1", users=USERS, tolerance=0.03, days=["2026-01-06"], note=note
    )
    assert d.promote and d.days == ["2026-01-06"]
    assert d.reason == (
        "no metric below champion v1 on 2026-01-06 by more than 0.03 (2 metrics compared). "
        f"Why these days: {note}"
    )


def test_gate_min_users_is_range_checked():
    from csmf_core.config import ConfigError, build_config

    assert build_config().gate.min_users == 10
    assert build_config(None, ["gate.min_users=1"]).gate.min_users == 1
    with pytest.raises(ConfigError, match="gate.min_users must be >= 1"):
        build_config(None, ["gate.min_users=0"])


# ---- registry: identical re-runs reuse their version (issue #13 item 9) ---------------------------------
def test_model_digest_follows_weights_and_owners_not_file_bytes(stages, tmp_path):
    from flows.registry import model_digest

    model, owners = stages["model"], stages["owners"]
    a = save_checkpoint(tmp_path / "a", model, owners, meta={"info": {"seconds": 1.25}})
    b = save_checkpoint(
        tmp_path / "b", model, owners, meta={"info": {"seconds": 3.5}}
    )  # another run's timing
    assert (a / "checkpoint.json").read_text() != (b / "checkpoint.json").read_text()
    assert model_digest(a) == model_digest(b) == model_digest(stages["final"])
    name, p = next((n, p) for n, p in model.named_parameters() if p.dim() == 2)
    with torch.no_grad():
        p[0, 0] += 1e-6
    try:
        moved = save_checkpoint(tmp_path / "moved", model, owners)
    finally:
        with torch.no_grad():
            p[0, 0] -= 1e-6
    assert model_digest(moved) != model_digest(a), name
    other = owners.clone()
    group = next(k for k, v in other.units.items() if (v == 1).any())
    other.units[group][int((other.units[group] == 1).nonzero()[0])] = 2
    assert model_digest(save_checkpoint(tmp_path / "owners", model, other)) != model_digest(a)


def test_find_version_returns_the_newest_exact_match():
    from types import SimpleNamespace

    from flows.registry import find_version

    def mv(v, date, digest):
        return SimpleNamespace(version=str(v), tags={"csmf.date": date, "csmf.model_digest": digest})

    versions = [
        mv(1, "2026-01-05", "aa"),
        mv(2, "2026-01-05", "bb"),
        mv(3, "2026-01-05", "aa"),
        mv(4, "2026-01-06", "aa"),
        SimpleNamespace(version="5", tags={}),  # registered before model digests existed
    ]
    client = SimpleNamespace(search_model_versions=lambda _filter: versions)
    assert find_version(client, {"csmf.date": "2026-01-05", "csmf.model_digest": "aa"}).version == "3"
    assert find_version(client, {"csmf.date": "2026-01-05", "csmf.model_digest": "cc"}) is None
    assert find_version(client, {"csmf.date": "2026-01-05", "csmf.model_digest": ""}) is None  # unknown
    assert find_version(client, {}) is None


def test_champion_is_scored_on_this_runs_day(tiny_world, tmp_path):
    """same_day_metrics evaluates the champion on the model-ready data it is given (this run's
    evaluation day), not on the day it was trained for."""
    from types import SimpleNamespace

    from csmf_core import prep
    from flows.gate import same_day_metrics

    d = tiny_world["dates"]
    cfg = tiny_world["cfg"]
    prep.prepare(
        tiny_world["ds"],
        tmp_path / "mr5",
        train_dates=(d[0], d[-3]),
        eval_dates=d[-2],
        seq_len=cfg.data.seq_len,
        n_req_neg=cfg.data.n_req_neg,
    )
    challenger = Recommender.load(tiny_world["bundle"])
    champion = Recommender.load(tiny_world["bundle"])
    new, old, why, users = same_day_metrics(challenger, champion, tmp_path / "mr5", 50)
    assert why is None and old == new and len(new) == 12  # 3 objectives x (own, fused) x (recall, ndcg)
    # users with a positive on 2026-01-05, counted here from the raw events
    import polars as pl

    ev = pl.read_parquet(sorted((tiny_world["ds"] / "events" / f"dt={d[-2]}").glob("*.parquet")))
    want = {o: ev.filter(pl.col(c))["user_id"].n_unique() for o, c in zip(champion.objectives, LABELS)}
    assert users == want and min(want.values()) > 0
    on_day6 = gate_metrics(champion.evaluate(tiny_world["mr"], ks=(50,)), champion.objectives, 50)
    assert old != on_day6  # a different day gives different numbers: the day given was used
    assert decide(OK, new, old, champion_version="1", users=users).promote  # equal is not worse
    odd = SimpleNamespace(objectives=["exposure", "click"])
    _, none, why, _ = same_day_metrics(challenger, odd, tmp_path / "mr5", 50)
    assert none is None and "differ" in why


# ---- the flow's choice of days, on real partitions (flows/promotion.py::_comparison_data) -----------------
@pytest.fixture(scope="module")
def six_days(tmp_path_factory):
    from csmf_core.synth import generate

    return generate(tmp_path_factory.mktemp("days") / "ds", "tiny", seed=1, n_users=60, n_items=40).out_dir


def _choose(ds, tmp_path, date: str, champion_train, cfg_overrides=()):
    from types import SimpleNamespace

    from csmf_core.config import build_config
    from flows.inputs import plan_window
    from flows.promotion import _comparison_data

    cfg = build_config(None, ["data.seq_len=5", "data.n_req_neg=4", *cfg_overrides])
    run = SimpleNamespace(window=plan_window(ds, date, cfg.data), dataset_dir=ds, workdir=tmp_path / "run")
    ready = SimpleNamespace(model_ready=tmp_path / "own-model-ready")
    champ = SimpleNamespace(info={"train_dates": champion_train} if champion_train is not None else {})
    return _comparison_data(champ, "1", ready, cfg, run)


def test_daily_case_compares_on_this_runs_day(six_days, tmp_path):
    data, days, note, why = _choose(six_days, tmp_path, "2026-01-05", _days(1, 4))
    assert (data, days, note, why) == (tmp_path / "own-model-ready", ["2026-01-05"], None, None)
    assert not (tmp_path / "run" / "gate").exists()  # nothing prepared


def test_backfill_is_prepared_for_the_newest_day_after_both_windows(six_days, tmp_path):
    import json

    data, days, note, why = _choose(six_days, tmp_path, "2026-01-03", _days(1, 4))
    assert why is None and days == ["2026-01-06"] and data == tmp_path / "run" / "gate" / "model_ready"
    meta = json.loads((data / "meta.json").read_text())
    assert meta["eval_dates"] == ["2026-01-06"] and meta["train_dates"] == _days(1, 5)  # a 01-06 run's window
    assert note == (
        "champion v1 trained on 2026-01-03 (its window 2026-01-01..2026-01-04), not before the evaluation "
        "day(s) 2026-01-03: both models re-evaluated on 2026-01-06, "
        "the newest day(s) after both training windows"
    )
    # two evaluation days: the newest two after both windows
    _, two, _, why2 = _choose(six_days, tmp_path / "two", "2026-01-02", _days(1, 4), ["data.eval_days=2"])
    assert why2 is None and two == ["2026-01-05", "2026-01-06"]


def test_no_day_after_both_windows_or_no_dates_keeps_the_champion(six_days, tmp_path):
    data, days, note, why = _choose(six_days, tmp_path, "2026-01-04", _days(1, 6))
    assert data == tmp_path / "own-model-ready" and days == ["2026-01-04"] and note is None
    assert why.startswith("it trained on 2026-01-04 (its window 2026-01-01..2026-01-06)")
    assert "has no 1 consecutive day(s) after both training windows (newest partition 2026-01-06)" in why
    _, _, _, why = _choose(six_days, tmp_path, "2026-01-04", None)
    assert "records no training dates" in why


def test_a_broken_re_evaluation_day_keeps_the_champion(six_days, tmp_path):
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(six_days, ds)
    next((ds / "events" / "dt=2026-01-06").glob("*.parquet")).write_bytes(b"PAR1 not parquet")
    data, _, note, why = _choose(ds, tmp_path, "2026-01-03", _days(1, 4))  # its own window is intact
    assert data == tmp_path / "own-model-ready" and note is None
    assert "the re-evaluation day(s) 2026-01-06 fail the data contract" in why and "1 errors" in why


def test_unknown_id_is_outside_any_int64_vocabulary():
    import warnings

    lo, hi = np.iinfo(np.int64).min, np.iinfo(np.int64).max
    cases = {
        (): 1,
        (3, 7): 8,
        (5, hi): 4,  # max + 1 would overflow: min - 1
        (lo, hi): 0,  # both extremes taken: the smallest free id >= 0
        (lo, 0, 1, 2, hi): 3,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow or invalid-cast warning on the way
        for vocab, want in cases.items():
            got = unknown_id(np.array(vocab, dtype=np.int64))
            assert got == want and got not in vocab and lo <= got <= hi
