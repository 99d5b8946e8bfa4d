"""Choosing on validation days only (csmf_core/selection.py): the held-out days rule, the validation
score against hand-computed rankings, auto weights against an independent brute-force search, and a
model-ready dataset that never opens the evaluation days."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from csmf_core import prep
from csmf_core.cascade import load_cascade_data
from csmf_core.config import ConfigError, build_config
from csmf_core.selection import (
    FULL_GRID_MAX,
    PAPER_WEIGHTS,
    SEARCH_PASSES,
    WEIGHT_STEPS,
    choose_weights,
    positives_per_item,
    resolve_val_days,
    search_weights,
    validation_score,
    weight_grid,
)


@pytest.mark.parametrize(
    ("setting", "n", "e", "loader", "procs", "want"),
    [
        ("auto", 12, 3, "memory", 1, 3),  # KuaiRand: 12 training days, 3 evaluation days
        ("auto", 7, 1, "memory", 1, 1),  # the generated small world
        ("auto", 8, 3, "memory", 1, 2),  # a quarter of the window at most
        ("auto", 4, 1, "memory", 1, 1),
        ("auto", 3, 1, "memory", 1, 0),  # too short
        ("auto", 30, 1, "memory", 1, 1),  # mirrors the evaluation period
        ("auto", 30, 1, "parquet", 1, 0),  # epoch selection is in-memory only
        ("auto", 30, 1, "memory", 2, 0),
        (2, 3, 1, "memory", 1, 2),  # an explicit number is kept as it is
        (0, 30, 1, "memory", 1, 0),
    ],
)
def test_val_days_rule(setting, n, e, loader, procs, want):
    got, why = resolve_val_days(setting, n, e, loader=loader, processes=procs)
    assert got == want
    assert why.startswith("data.val_days")


def test_auto_settings_parse_and_reject():
    cfg = build_config({}, ["data.val_days=auto", "eval.fused_weights=AUTO"])
    assert cfg.data.val_days == "auto" and cfg.eval.fused_weights == "auto"
    assert build_config({}, ["data.val_days=2"]).data.val_days == 2
    for bad, key in [
        ("data.val_days=often", "data.val_days"),
        ("eval.fused_weights=[1,x,1]", "eval.fused_weights"),
    ]:
        with pytest.raises(ConfigError, match=key):
            build_config({}, [bad])


def test_weight_grid():
    grid = weight_grid(3)
    assert grid[0] == PAPER_WEIGHTS
    assert len(grid) == len(set(grid)) == len(WEIGHT_STEPS) ** 2 + 1
    assert all(w[0] == 1.0 for w in grid) and (1.0, 0.0, 0.0) in grid and (1.0, 4.0, 0.25) in grid
    assert len(weight_grid(2)) == len(WEIGHT_STEPS) and weight_grid(2)[0] == (1.0, 0.0)


def _all_weightings(n):
    """Every k_0 = 1 weighting over WEIGHT_STEPS, written out independently of weight_grid."""
    out = [(1.0,)]
    for _ in range(n - 1):
        out = [w + (s,) for w in out for s in WEIGHT_STEPS]
    return out


def test_search_weights_scans_the_whole_grid_up_to_three_objectives():
    calls = []
    table = {w: float(np.sin(7 * sum((i + 1) * x for i, x in enumerate(w)))) for w in _all_weightings(3)}
    table[PAPER_WEIGHTS] = 0.0

    def score(w):
        calls.append(w)
        return table[w]

    best, order = search_weights(3, score)
    assert order == calls == weight_grid(3) and len(order) <= FULL_GRID_MAX
    assert best == max(weight_grid(3), key=lambda w: table[w])  # the first of any tie: grid order
    # an explicit grid is scanned whole, whatever its size
    grid = _all_weightings(5)[:150]
    best, order = search_weights(5, lambda w: -abs(w[2] - 2.0) - abs(w[4] - 0.5), grid)
    assert order == grid and best == (1.0, 0.0, 2.0, 0.0, 0.5)


def test_search_weights_finds_the_optimum_of_a_separable_score_with_few_rankings():
    """Five objectives: 1,296 weightings in the grid. A score that adds one term per k_t is maximised
    by the best step of each k_t on its own, which a brute force over the whole grid confirms."""
    rng = np.random.default_rng(3)
    terms = {t: dict(zip(WEIGHT_STEPS, rng.normal(size=len(WEIGHT_STEPS)))) for t in range(1, 5)}

    def score(w):
        return sum(terms[t][w[t]] for t in range(1, 5))

    grid = _all_weightings(5)
    assert len(grid) == 1296 and len(weight_grid(5)) == 1296
    want = max(grid, key=score)
    best, order = search_weights(5, score)
    assert best == want
    assert len(order) == len(set(order)) <= 1 + SEARCH_PASSES * 4 * (len(WEIGHT_STEPS) - 1)
    assert order[0] == (1.0,) * 5  # starts from equal weights
    # a score that never changes: one pass over the coordinates, then it stops where it started
    best, order = search_weights(5, lambda w: 0.5)
    assert best == (1.0,) * 5 and len(order) == 1 + 4 * (len(WEIGHT_STEPS) - 1)


def test_search_weights_ends_at_a_local_optimum_and_respects_keep():
    """A score with no structure (random per weighting): the search ends where no single k_t change
    is better, every weighting it scored is at most as good, and skipped weightings are not scored."""
    rng = np.random.default_rng(0)
    grid = _all_weightings(4)
    table = dict(zip(grid, rng.permutation(len(grid)).astype(float)))
    scored = []

    def score(w):
        scored.append(w)
        return table[w]

    def keep(w):
        return w[2] > 0  # as a method serving objective 2 only skips the weightings without it

    best, order = search_weights(4, score, keep=keep)
    assert order == scored and all(keep(w) for w in order) and keep(best)
    assert table[best] == max(table[w] for w in order)
    for t in range(1, 4):
        for s in WEIGHT_STEPS:
            w = best[:t] + (s,) + best[t + 1 :]
            assert not keep(w) or table[w] <= table[best], (w, best)
    assert len(order) < len(grid) // 2


class _Fixed:
    """A stand-in for evaluate.Ranked with hand-written rankings."""

    def __init__(self, modes, fused):
        self.modes, self.fused_top = modes, fused

    def mode(self, m, k, rows=None):
        return self.modes[m][:, :k]

    def fused(self, w, k):
        return self.fused_top[:, :k]


def test_validation_score_by_hand():
    # 3 users, 5 items (index 0 = padding), 2 objectives, k = 2.
    from csmf_core.evaluate import EvalRows

    val = EvalRows(
        torch.arange(3),
        [torch.zeros(3, 1, dtype=torch.long)],
        [
            [np.array([1]), np.array([2, 3]), np.array([4])],  # exposure positives
            [np.array([3]), np.array([], np.int64), np.array([4])],  # click: user 1 has none
        ],
    )
    counts = [np.array([0, 9, 8, 1, 0]), np.array([0, 0, 5, 7, 1])]  # popularity top-2: [1, 2] and [3, 2]
    modes = [np.array([[1, 4], [3, 1], [2, 3]]), np.array([[3, 1], [1, 2], [1, 2]])]
    fused = np.array([[1, 3], [2, 3], [4, 1]])
    s = validation_score(_Fixed(modes, fused), val, ["exposure", "click"], counts, (1, 1), 2)
    # exposure: own recalls 1, 1/2, 0 -> 1/2; fused 1, 1, 1 -> 1; popularity [1,2]: 1, 1/2, 0 -> 1/2
    # click (users 0, 2): own 1, 0 -> 1/2; fused 1, 1 -> 1; popularity [3,2]: 1, 0 -> 1/2
    assert s.users == {"exposure": 3, "click": 2}
    assert s.recall == pytest.approx(
        {("exposure", "own"): 0.5, ("exposure", "fused"): 1.0, ("click", "own"): 0.5, ("click", "fused"): 1.0}
    )
    assert s.popularity == pytest.approx({"exposure": 0.5, "click": 0.5})
    assert s.score == pytest.approx((1 + 2 + 1 + 2) / 4)
    assert s.metrics()["val/click/fused/ratio_to_popularity"] == pytest.approx(2.0)
    # an objective without any validation positive is skipped, not counted as 0
    val.pos[1] = [np.array([], np.int64)] * 3
    s = validation_score(_Fixed(modes, fused), val, ["exposure", "click"], counts, (1, 1), 2)
    assert s.skipped == ["click"] and s.score == pytest.approx(1.5)


def _brute_force_weights(model, owners, tables, val, counts, k, grid):
    """Independent of choose_weights: fused score = sum_t k_t s_t from separate mode-t passes."""
    with torch.no_grad():
        n_items = tables.items_cat.shape[0]
        x_i = tables.item_inputs(torch.arange(n_items))
        x_u = tables.user_inputs(val.u, val.hists)
        per_mode = [
            (model.user_vectors(x_u, t) @ model.item_vectors(x_i, t).T).double().numpy()
            for t in range(len(counts))
        ]
    best, best_score = None, -np.inf
    for w in grid:
        scores = sum(kt * s for kt, s in zip(w, per_mode))
        scores[:, 0] = -np.inf  # padding item
        ratios = []
        for t, c in enumerate(counts):
            pop_top = np.argsort(-c[1:], kind="stable")[:k] + 1
            rec, rec_pop = [], []
            for e, rel in enumerate(val.pos[t]):
                rel = set(int(x) for x in rel)
                if not rel:
                    continue
                top = np.argsort(-scores[e], kind="stable")[:k]
                rec.append(len(rel & set(top.tolist())) / len(rel))
                rec_pop.append(len(rel & set(pop_top.tolist())) / len(rel))
            if rec:
                ratios.append(np.mean(rec) / max(np.mean(rec_pop), 1e-3))
        score = float(np.mean(ratios))
        if score > best_score + 1e-12:
            best, best_score = w, score
    return best, best_score


def test_auto_weights_match_an_independent_search(tiny_world):
    w = tiny_world
    data = load_cascade_data(w["mr"], val_days=1)
    assert data.val_days == 1 and data.val is not None
    counts = data.val_counts
    # popularity before the validation days, counted from the kept rows by hand
    i, lvl = data.rows.i.numpy(), data.rows.level.numpy()
    for t in range(3):
        assert np.array_equal(counts[t], np.bincount(i[lvl >= t], minlength=len(counts[t])))
    grid = [
        PAPER_WEIGHTS,
        (1.0, 0.0, 0.0),
        (1.0, 4.0, 0.0),
        (1.0, 0.0, 4.0),
        (1.0, 1.0, 1.0),
        (1.0, 0.25, 2.0),
    ]
    tables = data.catalog_tables("val")
    got, rows = choose_weights(
        w["model"], w["owners"].output_owners(), tables, data.val, data.objectives, counts, 10, grid
    )
    want, want_score = _brute_force_weights(
        w["model"], w["owners"].output_owners(), tables, data.val, counts, 10, grid
    )
    assert got == want
    assert max(r["score"] for r in rows) == pytest.approx(want_score, rel=1e-9)
    # the evaluation users play no part: replacing them changes nothing
    data.eval.pos = [[np.array([1])] * len(data.eval)] * 3
    again, _ = choose_weights(
        w["model"], w["owners"].output_owners(), tables, data.val, data.objectives, counts, 10, grid
    )
    assert again == got


def test_positives_per_item_by_hand():
    from csmf_core.rows import TrainRows

    rows = TrainRows(
        torch.tensor([1, 1, 2, 3]),
        torch.tensor([1, 2, 2, 3]),
        torch.tensor([0, 1, 2, 1], dtype=torch.int8),
        [torch.zeros(4, 1, dtype=torch.long)],
    )
    got = positives_per_item(rows, 5, 3)
    assert [c.tolist() for c in got] == [[0, 1, 2, 1, 0], [0, 0, 2, 1, 0], [0, 0, 1, 0, 0]]


def test_training_only_prep_never_opens_the_evaluation_days(tiny_world, tmp_path):
    """prep(eval_dates=[]) reads nothing after the last training date: poisoning every later
    partition (an unreadable file) gives byte-identical training rows."""
    dates = tiny_world["dates"]
    ds = tmp_path / "ds"
    shutil.copytree(tiny_world["ds"], ds)
    train = (dates[0], dates[-3])
    a = prep.prepare(ds, tmp_path / "a", train_dates=train, eval_dates=[], seq_len=5, n_req_neg=4)
    for d in dates[-2:]:
        for f in (ds / "events" / f"dt={d}").glob("*.parquet"):
            f.write_bytes(b"not parquet")
    b = prep.prepare(ds, tmp_path / "b", train_dates=train, eval_dates=[], seq_len=5, n_req_neg=4)
    assert a.meta["eval_dates"] == [] and a.n_eval == 0 and a.n_train > 0
    for part in a.train_parts:
        assert part.read_bytes() == (tmp_path / "b" / part.relative_to(tmp_path / "a")).read_bytes()
    assert b.meta["history_dates"][-1] == dates[-3]
    # and it loads, with "auto" validation days resolved from its 4 training days
    data = load_cascade_data(tmp_path / "b", val_days="auto", eval_days=1)
    assert data.val_days == 1 and len(data.eval) == 0 and data.eval_day is None
    assert len(data.val) > 0
