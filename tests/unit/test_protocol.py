"""The comparison protocol (csmf_core/baselines/protocol.py) and item statistics in every baseline.

By hand: on a hand-built validation set with a fake method whose state after each epoch is fixed in
advance, the selection pass keeps the epoch whose validation score (computed here from the definition)
is best, puts that epoch's parameters back, and chooses the fused weights a brute-force search over the
grid chooses; the refit trains exactly the chosen epochs (optimiser steps counted against batch counts
computed here); evaluation users change no choice. Item statistics: `RowItems`, `tower_loss` and the
distillation teacher score every candidate as of its row's own day (row-by-row recomputation), every
method reads the statistics in training (changing only the training days' statistics changes its
result) and encodes the catalog as of the first evaluation day; every method runs the protocol end to
end on the tiny world with statistics on. Every method has a search space that parses.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from csmf_core.baselines import METHODS
from csmf_core.baselines.base import MethodResult, evaluate_result
from csmf_core.baselines.common import NO_HOOK, PlainTwoTower, RowItems, batch_scores, scores_loss, tower_loss
from csmf_core.baselines.distill import cascade_log_probs, teacher_step
from csmf_core.baselines.dtml import CrossTeacher
from csmf_core.baselines.protocol import (
    Refit,
    Selector,
    check_protocol_data,
    fit_with_protocol,
    load_protocol_data,
    selection_score,
    space_path,
)
from csmf_core.cascade import CascadeData, load_cascade_data
from csmf_core.config import build_config
from csmf_core.evaluate import EvalRows
from csmf_core.losses import item_log_q
from csmf_core.model import TowerSpec
from csmf_core.rows import FeatureTables, TrainRows
from csmf_core.selection import weight_grid
from csmf_core.tuning import load_space

TINY = {
    "model": {"dim": 16, "hidden": [32]},
    "train": {"batch_size": 256, "epochs": [1, 2, 1], "threads": 1},
    "recover": {"epochs": 1},
    "data": {"seq_len": 5, "n_req_neg": 4, "val_days": 1},
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster on a busy 2-core machine
    yield
    torch.set_num_threads(threads)


# ---- a hand-built validation set and a fake method -------------------------------------------------
N_ITEMS = 8  # items 1..7 (0 = padding)
K = 2
VAL_U = [1, 2, 3, 4]
VAL_POS = {"a": [[1, 2], [3], [4, 5], [6]], "b": [[2], [3], [], [6, 7]]}
VAL_COUNTS = {"a": [0, 50, 10, 40, 20, 30, 5, 1], "b": [0, 1, 60, 2, 30, 4, 10, 20]}  # no ties
HAND_CFG = build_config({"eval": {"ks": [K], "primary_k": K}, "train": {"epochs": [4]}})


def hand_world() -> CascadeData:
    """Two objectives a -> b, 10 users, 7 items; validation users 1-4 (positives above), evaluation
    users 5-7 (their positives differ: nothing may read them)."""
    spec = TowerSpec(cat=(("id", 10),), n_num=0, hist=("b",), n_items=N_ITEMS, id_feature="id")
    tables = FeatureTables(
        torch.arange(10)[:, None], torch.zeros(10, 0), torch.arange(N_ITEMS)[:, None], torch.zeros(N_ITEMS, 0)
    )
    z = torch.zeros(0, dtype=torch.long)
    rows = TrainRows(z, z, z.to(torch.int8), [torch.zeros(0, 2, dtype=torch.long)])

    def users(u, pos):
        u = torch.tensor(u)
        return EvalRows(
            u, [torch.zeros(len(u), 2, dtype=torch.long)], [[np.array(p) for p in pos[o]] for o in pos]
        )

    val = users(VAL_U, VAL_POS)
    ev = users([5, 6, 7], {"a": [[7], [1], [2]], "b": [[7], [], [2]]})
    counts = [np.array(VAL_COUNTS[o]) for o in ("a", "b")]
    return CascadeData(["a", "b"], spec, spec, tables, rows, ev, counts, val, val_days=1, val_counts=counts)


def hand_recall(scores: np.ndarray, pos: list[list[int]], k: int) -> float:
    """Recall@k from the definition: users with a positive; top-k of items 1.. by score (no ties here)."""
    vals = []
    for s, p in zip(scores, pos):
        if p:
            top = sorted(range(1, N_ITEMS), key=lambda i: -s[i])[:k]
            vals.append(len(set(top) & set(p)) / len(p))
    return float(np.mean(vals))


def hand_ratio(scores: np.ndarray, o: str) -> float:
    pop = np.tile(np.array(VAL_COUNTS[o], dtype=float), (len(VAL_U), 1))
    return hand_recall(scores, VAL_POS[o], K) / hand_recall(pop, VAL_POS[o], K)


class FakeMethod:
    """A method whose state after epoch e is fixed in advance: user u's item scores for objective o are
    schedule[o][e][u] (one-hot item vectors, one matrix per objective). Its one parameter holds the
    epoch whose state the model is in, so a restored best epoch shows in the final vectors."""

    def __init__(self, schedule: dict[str, list[np.ndarray]], cap: int, served=("a", "b")):
        self.schedule, self.cap, self.served = schedule, cap, served
        self.trained: list[int] = []
        self.final_epoch: int | None = None
        self.steps = 0

    def __call__(self, data, cfg, seed, on_step=None, *, hook=NO_HOOK):
        model = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            model.weight.fill_(0.0)

        def encode(users, tables):
            e = int(round(float(model.weight.detach())))
            u = {
                o: torch.tensor(self.schedule[o][e][users.u.numpy()], dtype=torch.float32)
                for o in self.served
            }
            return u, {o: torch.eye(N_ITEMS) for o in self.served}

        hook.begin("model", [model], encode)
        n = hook.epochs("model", self.cap)
        self.trained.append(n)
        after = hook.on_epoch("model")
        for e in range(1, n + 1):
            with torch.no_grad():
                model.weight.fill_(float(e))
            self.steps += 1
            if on_step is not None:
                on_step(self.steps, 0.0)
            if after is not None:
                after(e)
        hook.end("model")
        self.final_epoch = int(round(float(model.weight.detach())))
        hook.finish(encode)
        u, v = encode(data.eval, data.catalog_tables("eval"))
        return MethodResult("fake", u, v, 0.0, 1, 4 * N_ITEMS * len(self.served))


def schedule(seed: int, cap: int, oracle_epoch: int | None) -> dict[str, list[np.ndarray]]:
    """Random continuous scores per epoch (0..cap) and user; at `oracle_epoch` the validation users'
    positives of each objective score above everything else."""
    g = np.random.default_rng(seed)
    out = {o: [g.random((10, N_ITEMS)) for _ in range(cap + 1)] for o in ("a", "b")}
    if oracle_epoch is not None:
        for o in out:
            for u, p in zip(VAL_U, VAL_POS[o]):
                out[o][oracle_epoch][u, p] += 10.0
    return out


def test_selection_keeps_the_best_epoch_by_hand():
    data = hand_world()
    sched = schedule(0, 4, oracle_epoch=2)
    fake = FakeMethod(sched, cap=4)
    sel = Selector(data, K)
    fake(data, HAND_CFG, 0, hook=sel)
    want = [np.mean([hand_ratio(sched[o][e][VAL_U], o) for o in ("a", "b")]) for e in range(1, 5)]
    rec = sel.parts["model"]
    assert rec.epochs == [1, 2, 3, 4] and rec.scores == pytest.approx(want, rel=1e-9)
    assert rec.chosen == 1 + int(np.argmax(want)) == 2
    # the best epoch's parameters are back, and the final vectors are that epoch's
    assert fake.final_epoch == 2
    assert torch.equal(sel.final[0]["a"], torch.tensor(sched["a"][2][VAL_U], dtype=torch.float32))
    # the untrained start is only a candidate when the method says so; ties keep the earlier epoch
    flat = {o: [sched[o][1]] * 5 for o in sched}
    sel2 = Selector(data, K)
    FakeMethod(flat, cap=4)(data, HAND_CFG, 0, hook=sel2)
    assert sel2.parts["model"].chosen == 1 and sel2.parts["model"].epochs == [1, 2, 3, 4]


def test_fused_weights_and_validation_score_by_brute_force():
    data = hand_world()
    sched = schedule(3, 1, oracle_epoch=None)
    score, info = selection_score(FakeMethod(sched, cap=1), data, HAND_CFG, 0)
    ua, ub = sched["a"][1][VAL_U], sched["b"][1][VAL_U]
    best, best_s, by_w = None, -math.inf, {}
    for w in weight_grid(2):
        fused = w[0] * ua + w[1] * ub
        s = np.mean([hand_ratio(fused, o) for o in ("a", "b")])
        by_w[tuple(w)] = s
        if s > best_s:
            best, best_s = tuple(w), s
    assert tuple(info["weights"]) == best
    assert {tuple(r["weights"]): r["score"] for r in info["weight_rows"]} == pytest.approx(by_w, rel=1e-9)
    fused = best[0] * ua + best[1] * ub
    own_and_fused = [hand_ratio(ua, "a"), hand_ratio(ub, "b"), hand_ratio(fused, "a"), hand_ratio(fused, "b")]
    assert score == pytest.approx(np.mean(own_and_fused), rel=1e-9) == info["val_score"]
    # a method serving only b: weightings that give b weight 0 rank nothing and are skipped
    _, info_b = selection_score(FakeMethod(sched, cap=1, served=("b",)), data, HAND_CFG, 0)
    assert all(r["weights"][1] > 0 for r in info_b["weight_rows"])
    assert len(info_b["weight_rows"]) == sum(1 for w in weight_grid(2) if w[1] > 0)


def test_refit_trains_the_chosen_epochs_and_evaluation_users_change_nothing():
    data = hand_world()
    sched = schedule(1, 4, oracle_epoch=3)
    fake = FakeMethod(sched, cap=4)
    full = dataclasses.replace(data, val=None, val_counts=None, val_days=0)
    steps: list[int] = []
    res, info = fit_with_protocol(fake, data, full, HAND_CFG, 0, on_step=lambda k, v: steps.append(k))
    assert fake.trained == [4, 3] and info["epochs"] == info["refit_epochs"] == {"model": 3}
    assert len(steps) == 3 and fake.final_epoch == 3  # the refit: exactly 3 epochs, no selection
    assert res.info["protocol"] is info and set(info["seconds"]) == {"selection", "refit"}
    # other evaluation users, in both datasets: every choice is the same
    other = EvalRows(torch.tensor([9, 8]), [torch.zeros(2, 2, dtype=torch.long)], [[np.array([1])] * 2] * 2)
    _, info2 = fit_with_protocol(
        FakeMethod(sched, cap=4), dataclasses.replace(data, eval=other), dataclasses.replace(full, eval=other),
        HAND_CFG, 0,
    )  # fmt: skip
    for key in ("epochs", "parts", "weights", "weight_rows", "val_score"):
        assert info2[key] == info[key], key
    with pytest.raises(ValueError, match="did not"):
        Refit({"model": 1}).epochs("other", 3)


def test_protocol_refuses_data_that_would_change_it():
    data = hand_world()
    no_val = dataclasses.replace(data, val=None, val_counts=None)
    with pytest.raises(ValueError, match="validation days"):
        check_protocol_data(no_val, None, HAND_CFG)
    with pytest.raises(ValueError, match="whole window"):
        check_protocol_data(data, data, HAND_CFG)
    stats_cfg = build_config({"data": {"item_stats": [1]}})
    with pytest.raises(ValueError, match="item_stats_windows"):
        check_protocol_data(data, None, stats_cfg)


# ---- real methods on the tiny world: steps counted, evaluation users ------------------------------------
def n_batches(n: int, bs: int) -> int:
    """Batches of one shuffled pass (a trailing 1-row batch is dropped), counted here."""
    bs = min(bs, n)
    return n // bs + (1 if n % bs >= 2 else 0)


@pytest.fixture(scope="module")
def proto_data(tiny_world):
    return load_protocol_data(tiny_world["mr"], build_config(TINY))


def level_counts(data) -> list[int]:
    return [int((data.rows.level >= t).sum()) for t in range(len(data.objectives))]


def test_refit_steps_of_a_per_objective_and_a_joint_method(proto_data):
    dv, df = proto_data
    cfg = build_config(TINY, ["train.epochs=[2,3,2]"])
    caps = [2, 3, 2]
    sel_steps, refit_steps = [], []
    res, info = fit_with_protocol(
        "youtubednn_sep", dv, df, cfg, 0, on_step=lambda k, v: refit_steps.append(k),
        on_select_step=lambda k, v: sel_steps.append(k),
    )  # fmt: skip
    chosen = [info["epochs"][o] for o in df.objectives]
    assert all(1 <= c <= cap for c, cap in zip(chosen, caps))
    assert len(sel_steps) == sum(cap * n_batches(n, 256) for cap, n in zip(caps, level_counts(dv)))
    assert len(refit_steps) == sum(c * n_batches(n, 256) for c, n in zip(chosen, level_counts(df)))
    for o, p in info["parts"].items():
        assert p["objectives"] == [o] and p["epochs"] == list(range(1, p["cap"] + 1))
        assert p["chosen"] == 1 + int(np.nanargmax(p["scores"]))

    # a joint schedule: the refit runs the first c joint epochs of the whole window's schedule
    refit_steps.clear()
    _, info = fit_with_protocol("mvke", dv, df, cfg, 0, on_step=lambda k, v: refit_steps.append(k))
    c = info["epochs"]["joint"]
    total = max(e * n_batches(n, 256) for e, n in zip(caps, level_counts(df)))
    per_epoch = total // max(caps)
    assert info["refit_epochs"]["joint"] == c and len(refit_steps) == min(total, c * per_epoch)

    # CSMF: every train step its kept epochs, every recovery recover.epochs over half its stage's rows
    refit_steps.clear()
    sel_steps.clear()
    _, info = fit_with_protocol(
        "csmf", dv, df, cfg, 0, on_step=lambda k, v: refit_steps.append(k),
        on_select_step=lambda k, v: sel_steps.append(k),
    )  # fmt: skip
    chosen = list(info["epochs"].values())
    assert list(info["epochs"]) == ["pretrain_exposure", "finetune_click", "finetune_conversion"]
    assert chosen == list(info["refit_epochs"].values()) and all(
        0 <= c <= cap for c, cap in zip(chosen, caps)
    )
    n = level_counts(df)
    recover = sum(n_batches(max(2, math.ceil(n[t] * 0.5)), 256) for t in range(2))  # recover.epochs = 1
    assert len(refit_steps) == sum(c * n_batches(m, 256) for c, m in zip(chosen, n)) + recover
    m = level_counts(dv)
    recover_val = sum(n_batches(max(2, math.ceil(m[t] * 0.5)), 256) for t in range(2))
    assert sel_steps == list(range(1, sum(c * n_batches(x, 256) for c, x in zip(caps, m)) + recover_val + 1))


def test_evaluation_users_change_no_choice_of_a_real_method(proto_data):
    dv, df = proto_data
    cfg = build_config(TINY)
    res, info = fit_with_protocol("youtubednn_sep", dv, df, cfg, 0)
    shuffled = df.eval.head(len(df.eval) // 2)
    other = EvalRows(shuffled.u.flip(0), [h.flip(0) for h in shuffled.hists], [p[::-1] for p in shuffled.pos])
    res2, info2 = fit_with_protocol(
        "youtubednn_sep", dataclasses.replace(dv, eval=other), dataclasses.replace(df, eval=other), cfg, 0
    )
    for key in ("epochs", "parts", "weights", "weight_rows", "val_score", "val_metrics", "refit_epochs"):
        assert info2[key] == info[key], key
    for o in res.item_vecs:  # the same refit model
        assert torch.equal(res.item_vecs[o], res2.item_vecs[o])


# ---- item statistics in every baseline ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def stats_data(tiny_world):
    return load_cascade_data(tiny_world["mr"], item_stats_windows=(1, 2))


def stats_batch(data, n=120, seed=0) -> TrainRows:
    b = data.rows.select(torch.randperm(len(data.rows), generator=torch.Generator().manual_seed(seed))[:n])
    assert len(torch.unique(b.day)) > 2
    return b


def test_row_items_score_every_candidate_as_of_the_rows_day(stats_data):
    tables = stats_data.tables
    b = stats_batch(stats_data)
    g = torch.Generator().manual_seed(0)
    w_num = torch.randn(tables.items_num.shape[1] + tables.item_stats.shape[2], 5, generator=g)
    w_cat = torch.randn(tables.items_cat.shape[1], 5, generator=g)

    def fn(x):  # a linear item "tower" over every input, statistics included
        return x.num @ w_num + (x.cat.float() / 100) @ w_cat

    uvec = torch.randn(len(b), 5, generator=g)
    lists = torch.cat([b.i[:, None], b.neg], 1)
    items = RowItems(tables, b.day, lists)
    vecs = items.encode(fn)
    own = items.own(vecs, items.inv)
    pairs = items.pairs(uvec, vecs, items.inv[:, 0])
    for r in range(len(b)):
        day = b.day[r]
        want_own = fn(tables.item_inputs(lists[r], day.expand(lists.shape[1])))
        torch.testing.assert_close(own[r], want_own)
        want_pairs = fn(tables.item_inputs(b.i, day.expand(len(b)))) @ uvec[r]
        torch.testing.assert_close(pairs[r], want_pairs)
    # without statistics: one vector per item whatever the day
    plain = dataclasses.replace(tables, item_stats=None)

    def fn_plain(x):
        return (x.cat.float() / 100) @ w_cat

    items0 = RowItems(plain, None, b.i)
    got = items0.pairs(uvec, items0.encode(fn_plain), items0.inv)
    torch.testing.assert_close(got, uvec @ fn_plain(plain.item_inputs(b.i)).T)
    with pytest.raises(ValueError, match="no row days"):
        RowItems(tables, None, b.i)


def test_tower_loss_reads_each_rows_day(stats_data):
    """`common.tower_loss` (YouTubeDNN, MVKE, ResFlow) and `batch_scores` (MOPPR) against the loss
    built row by row: row r scores every in-batch item and its request negatives as of r's day."""
    data = stats_data
    cfg = build_config(TINY)
    model = PlainTwoTower(data.user_spec, data.item_spec, cfg.model, seed=0)
    b = stats_batch(data)
    log_q = item_log_q(torch.as_tensor(data.counts[0]))
    got = tower_loss(
        model.user_vectors, model.item_vectors, data.tables, b, cfg, log_q=log_q, request_negatives=True
    )
    uvec = model.user_vectors(data.tables.user_inputs(b.u, b.hists))
    rows, negs = [], []
    for r in range(len(b)):
        day = b.day[r]
        rows.append(model.item_vectors(data.tables.item_inputs(b.i, day.expand(len(b)))) @ uvec[r])
        negs.append(
            model.item_vectors(data.tables.item_inputs(b.neg[r], day.expand(b.neg.shape[1]))) @ uvec[r]
        )
    want = scores_loss(torch.stack(rows), b.i, cfg, log_q=log_q, extra=torch.stack(negs), neg_items=b.neg)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    _, scores, extra = batch_scores(model.user_vectors, model.item_vectors, data.tables, b, True)
    torch.testing.assert_close(scores, torch.stack(rows), rtol=1e-5, atol=1e-5)


def test_distillation_teacher_reads_each_rows_day(stats_data):
    """DTML's and DMMP's teacher: its own-pair logits and its list targets, row by row at the row's day."""
    data = stats_data
    cfg = build_config(TINY)
    teacher = CrossTeacher(data.user_spec, data.item_spec, cfg.model, 2, seed=1)
    b = stats_batch(data, n=40)
    bce, logp, lists = teacher_step(teacher, data.tables, b, 3, teacher.pair_logits)
    hu = teacher.user(data.tables.user_inputs(b.u, b.hists))
    for r in range(len(b)):
        hi = teacher.item(data.tables.item_inputs(lists[r], b.day[r].expand(lists.shape[1])))
        want = cascade_log_probs(teacher.pair_logits(hu[r].expand(len(hi), -1), hi))
        torch.testing.assert_close(logp[r], want, rtol=1e-5, atol=1e-6)


class SpyTables(FeatureTables):
    """Feature tables that record every item-input read: (days read, or None for a catalog read, and the
    catalog day)."""

    calls: list = []

    def item_inputs(self, i, day=None):
        SpyTables.calls.append((None if day is None else set(day.unique().tolist()), self.stats_day))
        return super().item_inputs(i, day)


BASELINES = [
    "youtubednn_sep",
    "youtubednn_mix",
    "mvke",
    "moppr",
    "dtml",
    "dmmp",
    "resflow",
    "csmf_weight_masks",
    "csmf",
]


@pytest.mark.parametrize("name", BASELINES)
def test_every_method_reads_item_statistics_in_training_and_at_the_catalog(stats_data, name):
    cfg = build_config(TINY, ["data.item_stats=[1,2]", "train.epochs=[1]"])
    t = stats_data.tables
    spy = SpyTables(t.users_cat, t.users_num, t.items_cat, t.items_num, t.item_stats, t.stats_day0)
    SpyTables.calls = []
    res = METHODS[name](dataclasses.replace(stats_data, tables=spy), cfg, 0)
    train_days = set(stats_data.rows.day.unique().tolist())
    by_row = [d for d, _ in SpyTables.calls if d is not None]
    catalog = [c for d, c in SpyTables.calls if d is None]
    assert by_row and set().union(*by_row) <= train_days  # training rows read their own days
    assert catalog and set(catalog) == {stats_data.eval_day}  # the catalog as of the first evaluation day
    # only the training days' statistics changed (the catalog's day is the same): the result changes
    changed = t.item_stats.clone()
    changed[:-1] = changed[:-1].flip(1)
    res2 = METHODS[name](
        dataclasses.replace(stats_data, tables=dataclasses.replace(t, item_stats=changed)), cfg, 0
    )
    assert any(not torch.equal(res.item_vecs[o], res2.item_vecs[o]) for o in res.item_vecs)


# ---- every method end to end ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stats_protocol_data(tiny_world):
    return load_protocol_data(tiny_world["mr"], build_config(TINY, ["data.item_stats=[1]"]))


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_runs_the_protocol_end_to_end(stats_protocol_data, name):
    dv, df = stats_protocol_data
    cfg = build_config(TINY, ["data.item_stats=[1]"])
    res, info = fit_with_protocol(name, dv, df, cfg, 0)
    rows = evaluate_result(res, df, (10,))
    assert rows and all(math.isfinite(r["recall"]) for r in rows)
    assert math.isfinite(info["val_score"]) and info["val_score"] > 0
    assert tuple(info["weights"]) in weight_grid(3)
    assert set(info["epochs"]) == set(info["parts"]) == set(info["refit_epochs"])
    for part, p in info["parts"].items():
        assert 0 <= p["chosen"] <= p["cap"] and info["refit_epochs"][part] <= p["chosen"]
        assert len(p["scores"]) == len(p["epochs"]) and p["epochs"][-1] == p["cap"]
    assert info["val_days"] == 1 and info["method"] == name and res.info["protocol"] is info


# ---- search spaces -------------------------------------------------------------------------------------
COMMON = {"train.lr", "train.batch_size", "train.epochs", "loss.temperature", "data.item_stats"}


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_has_a_search_space(name):
    path = space_path(name)
    assert path.is_file(), path
    space = {p.key: p for p in load_space(path.read_text())}
    assert COMMON <= set(space), sorted(COMMON - set(space))
    assert "none" in space["data.item_stats"].choices
    if name == "csmf":
        assert path.name == "tune_space.yaml"
    if not name.startswith("csmf"):  # a baseline searches the common ranges only (its caps among them):
        # settings every method reads (weight decay, log-Q) but CSMF's space leaves out are not searched
        assert set(space) <= COMMON, sorted(set(space) - COMMON)
        csmf = {p.key: p for p in load_space(space_path("csmf").read_text())}
        for key in COMMON - {"train.epochs"}:  # the same ranges as CSMF's
            assert space[key] == csmf[key], key
    # an ablation does not search the setting it switches off
    off = {"csmf_no_aml": {"loss.aml", "loss.eta"}, "csmf_no_ar": {"recover.fraction", "recover.epochs"}}
    assert not off.get(name, set()) & set(space)


def test_compare_refuses_fixed_fused_weights_it_would_replace():
    """--set eval.fused_weights=[...] was silently replaced by the weights the protocol chose on the
    validation days; now refused there, and applied where there are no validation days."""
    from types import SimpleNamespace

    from csmf_core.config import ConfigError
    from flows.compare import check_fixed_weights

    window = SimpleNamespace(train_dates=[f"2026-01-0{d}" for d in range(1, 6)], eval_dates=["2026-01-06"])
    cfg = build_config(None, ["eval.fused_weights=[1, 2, 3]"])
    with pytest.raises(ConfigError, match=r"fused_weights=\[1.0, 2.0, 3.0\]: the comparison chooses"):
        check_fixed_weights(cfg, window, ["eval.fused_weights"])
    check_fixed_weights(cfg, window, [])  # the config file's weights (not --set): the protocol's grid
    check_fixed_weights(build_config(None, ["eval.fused_weights=auto"]), window, ["eval.fused_weights"])
    short = SimpleNamespace(train_dates=["2026-01-05"], eval_dates=["2026-01-06"])  # no room: applied
    check_fixed_weights(cfg, short, ["eval.fused_weights"])


def test_protocol_data_holds_out_the_days_the_report_states(tiny_world):
    """With train.loader=parquet the report said "no validation days, fixed epochs, no tuning" while
    the data were loaded with validation days and every method selected epochs on them."""
    from flows.compare_protocol import _window_days, protocol_data, protocol_val_days

    for sets, days in (([], 1), (["train.loader=parquet"], 0), (["data.val_days=2"], 2)):
        cfg = build_config(None, sets)
        v, _ = protocol_val_days(cfg, *_window_days(tiny_world["mr"]))
        data_val, data = protocol_data(tiny_world["mr"], cfg)
        assert v == days and (data_val is None) == (days == 0), sets
        assert data.val is None and (data_val is None or data_val.val_days == days)


def test_compare_states_what_an_oversized_val_days_leaves(tiny_world):
    """data.val_days=9 on five training days: the data fell back to fixed epochs while the report
    stated nine validation days (and tuning on them)."""
    from types import SimpleNamespace

    from flows.compare_protocol import compare_protocol, item_stats_sentence

    cfg = build_config(None, ["data.val_days=9"])
    ready = SimpleNamespace(model_ready=tiny_world["mr"])
    out = compare_protocol(ready, cfg, 2)
    assert out["val_days"] == 0 and out["tune_trials"] == 0
    assert out["statement"].startswith("No validation days (data.val_days=9 (set explicitly), which leave")
    a, b = build_config(), build_config(None, ["data.item_stats=[7]"])
    assert item_stats_sentence({"csmf": a, "moppr": b}) == "Item statistics (as tuned): csmf off, moppr [7]."
    assert item_stats_sentence({"csmf": b, "moppr": b}) == "Item statistics: [7] for every method."
