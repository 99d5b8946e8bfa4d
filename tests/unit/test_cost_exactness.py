"""The cascade-cost changes of issue 18 item 2 change no trained parameter and no choice: each is
checked against the implementation it replaced, kept here as the reference."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from csmf_core import losses, train
from csmf_core.baselines import protocol
from csmf_core.cascade import run_cascade
from csmf_core.config import build_config
from csmf_core.evaluate import Ranked
from csmf_core.rows import TrainRows
from csmf_core.selection import choose_weights, validation_score, weight_grid
from tests.conftest import random_cascade_data

CFG = build_config(
    {"model": {"dim": 16, "hidden": [32, 16]}, "train": {"batch_size": 256, "epochs": [1, 2, 2]}}
)


def old_stage_rows(rows: TrainRows, stage: int, fraction: float | None, gen: torch.Generator) -> TrainRows:
    """train_stage's row selection before `train.stage_rows`: copy the stage's rows, then the subset."""
    data = rows.for_stage(stage)
    if fraction is not None:
        n = max(2, int(math.ceil(len(data) * fraction)))
        data = data.select(torch.randperm(len(data), generator=gen)[:n])
    return data


def _same_rows(a: TrainRows, b: TrainRows) -> bool:
    pairs = [(a.u, b.u), (a.i, b.i), (a.level, b.level), (a.neg, b.neg), *zip(a.hists, b.hists)]
    return len(a.hists) == len(b.hists) and all(torch.equal(x, y) for x, y in pairs)


@pytest.mark.parametrize("fraction", [None, 0.5, 0.01])
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_stage_rows_are_the_old_selection(stage, fraction):
    rows = random_cascade_data().rows
    g_new, g_old = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    new, old = train.stage_rows(rows, stage, fraction, g_new), old_stage_rows(rows, stage, fraction, g_old)
    assert _same_rows(new, old)
    assert torch.equal(torch.randperm(100, generator=g_new), torch.randperm(100, generator=g_old))
    if stage == 0 and fraction is None:
        assert new is rows  # every row is an exposure positive: trained on as given, not copied


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def assert_cascade_bit_identical(monkeypatch, data, cfg, module, old: dict) -> None:
    """Run the whole cascade (pretrain, prune, recover, finetunes) as it is, then with the names in
    `old` (attributes of `module`) replaced by their previous implementations; 1 thread.
    Every parameter, every step's losses and the ownership must be the same bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        new_model, new_owners, new_reps = run_cascade(data, cfg)
        for name, fn in old.items():
            monkeypatch.setattr(module, name, fn)
        old_model, old_owners, old_reps = run_cascade(data, cfg)
    finally:
        torch.set_num_threads(threads)
    new, prev = _params(new_model), _params(old_model)
    assert new.keys() == prev.keys() and all(torch.equal(new[k], prev[k]) for k in new)
    assert [r.losses for r in new_reps] == [r.losses for r in old_reps]
    assert torch.equal(new_owners.output_owners(), old_owners.output_owners())


def test_cascade_bit_identical_to_the_old_row_selection(monkeypatch):
    assert_cascade_bit_identical(
        monkeypatch, random_cascade_data(), CFG, train, {"stage_rows": old_stage_rows}
    )


def old_choose_weights(model, output_owners, tables, val, objectives, counts, k):
    """selection.choose_weights before the popularity part was computed once per objective."""
    grid = weight_grid(len(objectives))
    ranked = Ranked(model, output_owners, tables, val)
    rows, best, best_score = [], grid[0], float("-inf")
    for w in grid:
        s = validation_score(ranked, val, objectives, counts, w, k, scorers=("fused",))
        rows.append({"weights": list(w), "score": s.score} | {o: s.recall[(o, "fused")] for o in s.users})
        if s.score > best_score:
            best, best_score = w, s.score
    return tuple(best), rows


@pytest.mark.parametrize("k", [1, 5, 20])
def test_choose_weights_same_choice_and_rows(trained_random, k):
    t = trained_random
    data, model, out = t["data"], t["model"], t["owners"].output_owners()
    args = (model, out, data.tables, data.eval, data.objectives, data.counts, k)
    assert choose_weights(*args) == old_choose_weights(*args)
    ranked = Ranked(model, out, data.tables, data.eval)  # shared with the score after it (run_trial)
    assert choose_weights(*args, ranked=ranked) == old_choose_weights(*args)
    best = choose_weights(*args)[0]
    for scorers in (("own", "fused"), ("fused",)):
        new = validation_score(ranked, data.eval, data.objectives, data.counts, best, k, scorers=scorers)
        fresh = Ranked(model, out, data.tables, data.eval)
        old = validation_score(fresh, data.eval, data.objectives, data.counts, best, k, scorers=scorers)
        assert new == old


def old_choose_vector_weights(vectors, data_val, k):
    """protocol.choose_vector_weights before the popularity part was computed once."""
    objectives = list(data_val.objectives)
    idx = [objectives.index(o) for o in objectives if o in vectors[0]]
    ranked = protocol.ResultRanked(vectors, [objectives[i] for i in idx], objectives)
    rows, best, best_score = [], tuple(weight_grid(len(objectives))[0]), float("-inf")
    for w in weight_grid(len(objectives)):
        if not any(w[i] > 0 for i in idx):
            continue
        s = protocol.vectors_score(vectors, data_val, w, k, scorers=("fused",), ranked=ranked)
        rows.append({"weights": list(w), "score": s.score} | {o: s.recall[(o, "fused")] for o in s.users})
        if s.score > best_score:
            best, best_score = tuple(w), s.score
    return best, rows


@pytest.mark.parametrize("served", [("exposure", "click", "conversion"), ("click", "conversion")])
def test_choose_vector_weights_same_choice_and_rows(served):
    data = random_cascade_data()
    dv = dataclasses.replace(data, val=data.eval, val_counts=data.counts, val_days=1)
    g = torch.Generator().manual_seed(3)
    n_users, n_items = len(dv.val), dv.tables.items_cat.shape[0]
    users = {o: torch.randn(n_users, 8, generator=g) for o in served}
    items = {o: torch.randn(n_items, 8, generator=g) for o in served}
    for k in (2, 10):
        best, rows, _ = protocol.choose_vector_weights((users, items), dv, k)
        assert (best, rows) == old_choose_vector_weights((users, items), dv, k)
        assert np.isfinite([r["score"] for r in rows]).all()


# ---- validation scoring ranks only the users a score counts (topk_items(rows=)) ----------------------
class FullRanked(Ranked):
    """evaluate.Ranked as before `rows=`: every mode ranking covers every user."""

    def mode(self, m, k, rows=None):
        return super().mode(m, k)


class FullResultRanked(protocol.ResultRanked):
    def mode(self, t, k, rows=None):
        return super().mode(t, k)


def old_own_mode_recall(model, output_owners, tables, val, stage, k):
    """validation.own_mode_recall before it encoded and ranked only the users with a positive of the
    objective."""
    from csmf_core.evaluate import item_matrix, user_matrix
    from csmf_core.fusion import mode_queries
    from csmf_core.metrics import recall_ndcg, topk_items

    items = item_matrix(model, tables)
    users = user_matrix(model, tables, val.u, val.hists)
    top = topk_items(mode_queries(users, output_owners, stage), items, k)
    return float(recall_ndcg(top, val.relevant(stage), (k,))[k]["recall"])


def more_users(ev, n_items, times=5, seed=0):
    """`ev` with every user `times` times, each copy with its own behaviour sequences and positive:
    more rows than the 64 a partial ranking is padded to, so the partial rankings are real subsets."""
    from csmf_core.evaluate import EvalRows

    g = torch.Generator().manual_seed(seed)
    n = len(ev) * times
    hists = [torch.randint(0, n_items, (n, h.shape[1]), generator=g) for h in ev.hists]
    pos = [[np.array([int(x)]) for x in torch.randint(1, n_items, (n,), generator=g)] for _ in ev.pos]
    return EvalRows(ev.u.repeat(times), hists, pos)


def sparser_positives(ev, conversion_users=None):
    """`ev` with the click positives of every 2nd user and the conversion positives of 3 users in 4
    removed (the random data give every user a positive of each objective; real data do not).
    conversion_users: keep the conversion positives of only the first this many users (fewer than
    the rows a partial product is padded to: the padding is then what keeps the sums exact)."""
    from csmf_core.evaluate import EvalRows

    empty = np.zeros(0, np.int64)
    conv = (lambda i: i % 4 == 0) if conversion_users is None else (lambda i: i < conversion_users)
    keep = (lambda i: True, lambda i: i % 2 == 0, conv)
    pos = [[p if keep[t](i) else empty for i, p in enumerate(ev.pos[t])] for t in range(len(ev.pos))]
    return EvalRows(ev.u, ev.hists, pos)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_scoring_only_users_with_positives_gives_the_same_recall(trained_random, k):
    from csmf_core.validation import own_mode_recall

    t = trained_random
    data, model, out = t["data"], t["model"], t["owners"].output_owners()
    many = more_users(data.eval, data.tables.items_cat.shape[0])
    for ev in (data.eval, many, sparser_positives(many), sparser_positives(many, conversion_users=3)):
        for stage in range(3):
            args = (model, out, data.tables, ev, stage, k)
            assert own_mode_recall(*args) == old_own_mode_recall(*args)
        w = (1.0, 1.8, 1.2)
        for scorers in (("own",), ("own", "fused")):
            new = validation_score(
                Ranked(model, out, data.tables, ev), ev, data.objectives, data.counts, w, k, scorers=scorers
            )
            old = validation_score(
                FullRanked(model, out, data.tables, ev),
                ev,
                data.objectives,
                data.counts,
                w,
                k,
                scorers=scorers,
            )
            assert new == old
    n_pos = [int((sparser_positives(many).relevant(s).n_rel > 0).sum()) for s in range(3)]
    assert 64 < n_pos[2] < n_pos[1] < n_pos[0] == len(many)  # real subsets, past the 64-row padding


def test_protocol_scoring_only_users_with_positives_gives_the_same_score():
    data = random_cascade_data(n_users=400)
    dv = dataclasses.replace(data, val=sparser_positives(data.eval), val_counts=data.counts, val_days=1)
    assert (dv.val.relevant(2).n_rel > 0).sum() > 64  # a real subset, past the 64-row padding
    g = torch.Generator().manual_seed(5)
    n_users, n_items = len(dv.val), dv.tables.items_cat.shape[0]
    served = list(dv.objectives)
    users = {o: torch.randn(n_users, 8, generator=g) for o in served}
    items = {o: torch.randn(n_items, 8, generator=g) for o in served}
    for k in (2, 10):
        new = protocol.vectors_score((users, items), dv, (1.0, 1.0, 1.0), k)
        full = FullResultRanked((users, items), served, served)
        old = protocol.vectors_score((users, items), dv, (1.0, 1.0, 1.0), k, ranked=full)
        assert new == old


def old_upstream_scores(segment_scores, stage, how="log_prob", *, overwrite=False, fast=False):
    """losses.upstream_scores before it accumulated in its inputs (each sum a new matrix); the exact
    form only (loss.fast_upstream rounds differently: these bit-for-bit tests turn it off)."""
    assert not fast
    running = segment_scores[0]
    total = torch.nn.functional.logsigmoid(running) if how == "log_prob" else None
    for r in range(1, stage):
        running = running + segment_scores[r]
        if total is not None:
            total = total + torch.nn.functional.logsigmoid(running)
    return total if how == "log_prob" else running


def old_aml_margins(up_pos, up_neg, sigma, eta, *, negate=False, overwrite=False, exact_branches=False):
    """losses.aml_margins before it could overwrite up_neg (d a new matrix); the relu form only (the
    exact-branch form belongs to the split path, which these bit-for-bit tests turn off)."""
    assert not exact_branches
    if up_pos.dim() == 1:
        up_pos = up_pos[:, None]
    diff = up_pos - up_neg
    sign = -1.0 if negate else 1.0
    m = torch.relu(diff).mul_(sign * (1.0 + eta))
    m.add_(diff, alpha=-sign * eta)
    return m.add_(sign * sigma) if sigma else m


@pytest.mark.parametrize("upstream,sigma", [("log_prob", 0.0), ("last_logit", 0.1)])
def test_cascade_bit_identical_with_aml_in_place(monkeypatch, upstream, sigma):
    """AML's upstream and margin matrices overwritten in place (issue 18 item 3) train the same
    parameters bit for bit as the allocating implementation, extra negatives included."""
    data = random_cascade_data()
    assert data.rows.neg is not None  # the extra-negative margins run too
    cfg = build_config(
        {
            "model": {"dim": 16, "hidden": [32, 16]},
            # one score matmul over every dim: the split form (train.split_scores) takes the upstream
            # mode's score from the segment matrices the in-place helpers accumulate it in
            "train": {"batch_size": 256, "epochs": [1, 2, 2], "split_scores": False},
            "loss": {"upstream": upstream, "sigma": sigma, "fast_upstream": False},
        }
    )
    # losses.aml_bias, which train_stage calls, then reaches the allocating forms
    old = {"upstream_scores": old_upstream_scores, "aml_margins": old_aml_margins}
    assert_cascade_bit_identical(monkeypatch, data, cfg, losses, old)


def test_in_place_aml_helpers_match_the_allocating_ones():
    gen = torch.Generator().manual_seed(3)
    segs = [torch.randn(64, 64, generator=gen) * 4 for _ in range(3)]
    for how in ("log_prob", "last_logit"):
        for stage in (1, 2, 3):
            want = old_upstream_scores([s.clone() for s in segs], stage, how)
            got = losses.upstream_scores([s.clone() for s in segs], stage, how, overwrite=True)
            assert torch.equal(got, want)
            pos = want.diagonal().clone()
            for negate in (False, True):
                ref = old_aml_margins(want.diagonal(), want, 0.1, 1.8, negate=negate)
                assert torch.equal(
                    losses.aml_margins(pos, want.clone(), 0.1, 1.8, negate=negate, overwrite=True), ref
                )
    up = segs[0].clone()
    with pytest.raises(ValueError, match="shares memory"):
        losses.aml_margins(up.diagonal(), up, 0.0, 1.8, overwrite=True)


def test_choose_vector_weights_searches_beyond_three_objectives():
    """Four served objectives (216 weightings in the grid): the comparison protocol's weight choice runs
    `selection.search_weights`' coordinate search, and what it returns is a local optimum of the fused
    validation score, each neighbour scored here with `vectors_score` on a fresh ranking cache."""
    from csmf_core.evaluate import EvalRows
    from csmf_core.selection import SEARCH_PASSES, WEIGHT_STEPS

    data = random_cascade_data()
    ev = data.eval
    g = torch.Generator().manual_seed(5)
    deep = [p[torch.rand(len(p), generator=g).numpy() < 0.5] if len(p) else p for p in ev.pos[2]]
    val = EvalRows(ev.u, ev.hists, [*ev.pos, deep])
    counts = [*data.counts, data.counts[2] // 2]
    objectives = (*data.objectives, "deep")
    dv = dataclasses.replace(data, objectives=objectives, val=val, val_counts=counts, val_days=1)
    n_users, n_items = len(dv.val), dv.tables.items_cat.shape[0]
    users = {o: torch.randn(n_users, 8, generator=g) for o in objectives}
    items = {o: torch.randn(n_items, 8, generator=g) for o in objectives}
    k = 5
    best, rows, _ = protocol.choose_vector_weights((users, items), dv, k)
    assert len(weight_grid(4)) == 216
    assert len(rows) <= 1 + SEARCH_PASSES * 3 * (len(WEIGHT_STEPS) - 1) < 216
    assert rows[0]["weights"] == [1.0] * 4
    assert max(r["score"] for r in rows) == next(r["score"] for r in rows if tuple(r["weights"]) == best)

    def score(w):
        return protocol.vectors_score((users, items), dv, w, k, scorers=("fused",)).score

    top = score(best)
    for t in range(1, 4):
        for s in WEIGHT_STEPS:
            w = best[:t] + (s,) + best[t + 1 :]
            assert score(w) <= top, (w, best)
