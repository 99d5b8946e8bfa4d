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
from flows.gate import Check, check_exact_fusion, decide, gate_metrics, regressions, verify_model


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
NEW = {"click/click/recall@50": 0.30, "click/fused/ndcg@50": 0.12}
OLD = {"click/click/recall@50": 0.32, "click/fused/ndcg@50": 0.10}


def test_regressions_use_absolute_tolerance():
    assert regressions(NEW, OLD, 0.005) == ["click/click/recall@50 0.3000 < champion 0.3200 - 0.005"]
    assert regressions(NEW, OLD, 0.03) == []
    assert regressions({"a": 0.30}, {"a": 0.305}, 0.005) == []  # exactly at the tolerance: not worse


def test_decide_rules_in_order():
    first = decide(OK, NEW, None, champion_version=None)
    assert first.promote and "first model" in first.reason
    bad = decide([Check("frozen_parameters", False, "w: 1 of 9 changed")], NEW, None, champion_version=None)
    assert not bad.promote and "verification failed: frozen_parameters" in bad.reason
    off = decide(OK, NEW, None, champion_version=None, enabled=False)
    assert not off.promote and "gate.enabled" in off.reason
    same = decide(OK, NEW, OLD, champion_version="2", identical_inputs=True)
    assert not same.promote and "identical inputs" in same.reason
    worse = decide(OK, NEW, OLD, champion_version="2", tolerance=0.005)
    assert not worse.promote and "champion v2" in worse.reason and "click/click/recall@50" in worse.reason
    better = decide(OK, NEW, OLD, champion_version="2", tolerance=0.03)
    assert better.promote and "2 metrics compared" in better.reason
    odd = decide(OK, NEW, None, champion_version="2", incomparable="objectives differ")
    assert not odd.promote and "objectives differ" in odd.reason
    md = worse.to_markdown()
    assert "champion kept" in md and "| click/click/recall@50 | 0.3000 | 0.3200 | -0.0200 |" in md


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
    new, old, why = same_day_metrics(challenger, champion, tmp_path / "mr5", 50)
    assert why is None and old == new and len(new) == 12  # 3 objectives x (own, fused) x (recall, ndcg)
    on_day6 = gate_metrics(champion.evaluate(tiny_world["mr"], ks=(50,)), champion.objectives, 50)
    assert old != on_day6  # a different day gives different numbers: the day given was used
    assert decide(OK, new, old, champion_version="1").promote  # equal is not worse
    odd = SimpleNamespace(objectives=["exposure", "click"])
    _, none, why = same_day_metrics(challenger, odd, tmp_path / "mr5", 50)
    assert none is None and "differ" in why
