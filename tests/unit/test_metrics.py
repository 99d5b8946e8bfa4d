"""Unit tests for csmf_core.metrics: hand-computed Recall/nDCG, exact top-K, baselines."""

import math

import numpy as np
import pytest
import torch

from csmf_core.metrics import (
    Relevant,
    evaluate_objective,
    format_metrics_table,
    popularity_topk,
    random_topk,
    recall_ndcg,
    topk_items,
)

L3 = 1 / math.log2(3)  # discount at rank 2 = 0.6309...
L4 = 1 / math.log2(4)  # discount at rank 3 = 0.5
L5 = 1 / math.log2(5)  # discount at rank 4 = 0.4307...


def test_recall_ndcg_hand_computed():
    topk = np.array(
        [
            [7, 1, 3, 5],  # A: relevant {3, 7}: hits at ranks 1 and 3
            [1, 2, 4, 5],  # B: relevant {2, 4, 6, 8, 9} (5 > K): hits at ranks 2 and 3
            [1, 2, 3, 4],  # C: no relevant item -> skipped, not counted
            [9, 5, 1, 2],  # D: relevant [5, 5, 5] = {5}: hit at rank 2
        ]
    )
    relevant = [
        np.array([3, 7]),
        np.array([2, 4, 6, 8, 9]),
        np.array([], dtype=np.int64),
        np.array([5, 5, 5]),
    ]
    res = recall_ndcg(topk, relevant, ks=[2, 4])

    # K=2. A: recall 1/2; DCG = 1 (rank 1), IDCG = 1 + L3 -> 1/(1+L3).
    #      B: recall 1/5; DCG = L3 (rank 2), IDCG over min(5,2)=2 items = 1 + L3.
    #      D: recall 1/1 (duplicates removed); DCG = L3, IDCG = 1.
    a2, b2, d2 = 1 / (1 + L3), L3 / (1 + L3), L3
    assert res[2]["users"] == 3
    assert res[2]["recall"] == pytest.approx((0.5 + 0.2 + 1.0) / 3, abs=1e-12)
    assert res[2]["ndcg"] == pytest.approx((a2 + b2 + d2) / 3, abs=1e-12)
    assert res[2]["ndcg"] == pytest.approx((1 + L3) / 3, abs=1e-12)  # a2 + b2 = 1 exactly

    # K=4. A: recall 2/2; DCG = 1 + L4, IDCG = 1 + L3.
    #      B: recall 2/5; DCG = L3 + L4, IDCG over min(5,4)=4 items = 1 + L3 + L4 + L5.
    #      D: recall 1; DCG = L3, IDCG = 1.
    a4 = (1 + L4) / (1 + L3)  # 1.5 / 1.6309 = 0.9197
    b4 = (L3 + L4) / (1 + L3 + L4 + L5)  # 1.1309 / 2.5616 = 0.4415
    assert res[4]["users"] == 3
    assert res[4]["recall"] == pytest.approx((1.0 + 0.4 + 1.0) / 3, abs=1e-12)
    assert res[4]["ndcg"] == pytest.approx((a4 + b4 + L3) / 3, abs=1e-12)
    assert a4 == pytest.approx(0.91972, abs=1e-4) and b4 == pytest.approx(0.44149, abs=1e-4)


def test_recall_ndcg_padding_duplicates_and_short_lists():
    # -1 padding never hits; item 3 repeated in the ranking counts once (at rank 1).
    topk = np.array([[3, 3, -1], [-1, -1, -1]])
    res = recall_ndcg(topk, [[3, 4], [4]], ks=[3, 5])
    # user 0: recall 1/2, DCG 1, IDCG(min(2,3)=2) = 1 + L3. user 1: 0, 0.
    assert res[3]["recall"] == pytest.approx((0.5 + 0) / 2)
    assert res[3]["ndcg"] == pytest.approx((1 / (1 + L3)) / 2)
    # k=5 > width 3: missing positions are misses; IDCG still over min(2, 5) = 2 items.
    assert res[5] == pytest.approx(res[3])
    # No user with a relevant item -> NaN and 0 users (never a silent 0.0).
    empty = recall_ndcg(np.array([[1, 2]]), [[]], ks=[2])
    assert empty[2]["users"] == 0 and math.isnan(empty[2]["recall"])


def test_recall_ndcg_matches_per_user_reference():
    rng = np.random.default_rng(0)
    n_users, n_items, width = 300, 40, 12
    topk = np.stack([rng.permutation(np.arange(1, n_items))[:width] for _ in range(n_users)])
    relevant = [rng.integers(1, n_items, size=rng.integers(0, 15)) for _ in range(n_users)]
    res = recall_ndcg(topk, relevant, ks=[1, 5, 12])
    for k in (1, 5, 12):
        rec, nd = [], []
        for row, rel in zip(topk, relevant):
            rel = set(rel.tolist())
            if not rel:
                continue
            gains = [1.0 if it in rel else 0.0 for it in row[:k]]
            rec.append(sum(gains) / len(rel))
            dcg = sum(g / math.log2(r + 2) for r, g in enumerate(gains))
            idcg = sum(1 / math.log2(r + 2) for r in range(min(len(rel), k)))
            nd.append(dcg / idcg)
        assert res[k]["users"] == len(rec)
        assert res[k]["recall"] == pytest.approx(np.mean(rec), abs=1e-12)
        assert res[k]["ndcg"] == pytest.approx(np.mean(nd), abs=1e-12)


def test_recall_ndcg_rejects_bad_input():
    with pytest.raises(ValueError, match="relevant has 1 entries but topk has 2 rows"):
        recall_ndcg(np.zeros((2, 3), dtype=np.int64), [[1]], ks=[1])
    with pytest.raises(ValueError, match="k must be >= 1"):
        recall_ndcg(np.zeros((1, 3), dtype=np.int64), [[1]], ks=[0])


def test_topk_items_matches_bruteforce_argsort():
    g = torch.Generator().manual_seed(0)
    users, items = torch.randn(53, 16, generator=g), torch.randn(200, 16, generator=g)
    # Make the padding row win every query by far, so excluding it is actually tested.
    users[:, 0] = users[:, 0].abs() + 1
    items[0] = 0.0
    items[0, 0] = 1000.0
    got = topk_items(users, items, 10, chunk=7)  # small chunk: several (balanced) chunks
    scores = users.double().numpy() @ items.double().numpy().T
    scores[:, 0] = -np.inf
    want = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    assert got.dtype == np.int64 and got.shape == (53, 10)
    np.testing.assert_array_equal(got, want)
    # Without exclusion item 0 comes first for every user.
    assert (topk_items(users, items, 3, exclude_first=False)[:, 0] == 0).all()


def test_topk_items_ties_and_width():
    # D=1 item "vectors": item 5 scores 2, every other item 1 (item 0 is padding).
    items = torch.ones(10, 1)
    items[5] = 2.0
    users = torch.tensor([[1.0], [0.0]])  # user 1 is all-zero: every item ties at 0
    got = topk_items(users, items, 3)
    # Ties broken by lower index: user 0 -> [5, 1, 2]; user 1 -> [1, 2, 3].
    np.testing.assert_array_equal(got, [[5, 1, 2], [1, 2, 3]])
    # k larger than the catalog: all N-1 = 9 real items, no index 0.
    full = topk_items(users, items, 50)
    assert full.shape == (2, 9) and 0 not in full
    np.testing.assert_array_equal(full[1], np.arange(1, 10))
    with pytest.raises(ValueError, match="dimension mismatch"):
        topk_items(users, torch.ones(10, 2), 3)
    with pytest.raises(ValueError, match="user_vecs contains NaN"):
        topk_items(torch.tensor([[float("nan")]]), items, 3)


def test_topk_items_many_ties_match_stable_argsort():
    # Small integer vectors make scores tie constantly, including across the top-k boundary;
    # a stable argsort of -score is exactly "score desc, lower index first".
    g = torch.Generator().manual_seed(3)
    for _ in range(30):
        n, k = int(torch.randint(2, 60, (1,), generator=g)), int(torch.randint(1, 70, (1,), generator=g))
        items = torch.randint(-2, 3, (n, 3), generator=g).float()
        users = torch.randint(-2, 3, (40, 3), generator=g).float()
        for exclude in (True, False):
            got = topk_items(users, items, k, exclude_first=exclude, chunk=9)
            scores = (users @ items.T).double().numpy()
            if exclude:
                scores[:, 0] = -np.inf
            assert got.shape == (40, min(k, n - 1 if exclude else n))
            np.testing.assert_array_equal(got, np.argsort(-scores, axis=1, kind="stable")[:, : got.shape[1]])


def test_evaluate_objective_small_catalog():
    # scores of user [1, 0]: item1 1.0, item2 0.0, item3 0.5 -> ranking [1, 3, 2].
    items = torch.tensor([[10.0, 10.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    res = evaluate_objective(torch.tensor([[1.0, 0.0]]), items, [np.array([3])], ks=[1, 2, 50])
    assert res[1]["recall"] == 0.0 and res[1]["ndcg"] == 0.0
    # relevant item at rank 2: recall 1, nDCG = L3 / 1.
    assert res[2]["recall"] == 1.0 and res[2]["ndcg"] == pytest.approx(L3)
    assert res[50]["recall"] == 1.0 and res[50]["users"] == 1  # catalog smaller than 50 is fine


def test_popularity_topk():
    counts = np.array([100, 3, 5, 5, 0, 7])  # item 0 (padding) must never appear
    got = popularity_topk(counts, n_users=4, k=3)
    # counts desc, ties by index: 5 (7), 2 (5), 3 (5), then 1 (3), 4 (0)
    np.testing.assert_array_equal(got, np.tile([5, 2, 3], (4, 1)))
    assert popularity_topk(counts, 1, 99).tolist() == [[5, 2, 3, 1, 4]]


def test_per_user_values_match_the_means_and_a_loop():
    rng = np.random.default_rng(3)
    topk = rng.integers(1, 40, size=(30, 10))
    relevant = [rng.choice(np.arange(1, 40), size=int(rng.integers(0, 4)), replace=False) for _ in range(30)]
    res = recall_ndcg(topk, relevant, [5], per_user=True)[5]
    want_r, want_n = [], []
    for row, rel in zip(topk, relevant, strict=True):  # textbook loop, first occurrence counts
        rel = set(rel.tolist())
        if not rel:
            continue
        seen, hits = set(), []
        for x in row[:5].tolist():
            hits.append(x in rel and x not in seen)
            seen.add(x)
        want_r.append(sum(hits) / len(rel))
        dcg = sum(h / math.log2(p + 2) for p, h in enumerate(hits))
        want_n.append(dcg / sum(1 / math.log2(p + 2) for p in range(min(len(rel), 5))))
    np.testing.assert_allclose(res["recall_per_user"], want_r)
    np.testing.assert_allclose(res["ndcg_per_user"], want_n)
    assert res["recall"] == pytest.approx(np.mean(want_r)) and res["users"] == len(want_r)


def test_paired_bootstrap():
    from csmf_core.metrics import paired_bootstrap

    # constant difference: every resample has the same mean, the interval is that point
    out = paired_bootstrap(np.array([0.5, 0.2, 0.9]), np.array([0.4, 0.1, 0.8]))
    assert (
        out["diff"] == pytest.approx(0.1)
        and out["lo"] == pytest.approx(0.1)
        and out["hi"] == pytest.approx(0.1)
    )
    # symmetric +-1 differences over many users: mean 0, interval about +-1.96 / sqrt(n)
    n = 10_000
    a = np.where(np.arange(n) % 2 == 0, 1.0, 0.0)
    got = paired_bootstrap(a, 1 - a, n_boot=500, seed=1)
    assert got["diff"] == 0.0 and got["n"] == n
    assert got["lo"] == pytest.approx(-1.96 / math.sqrt(n), rel=0.15)
    assert got["hi"] == pytest.approx(1.96 / math.sqrt(n), rel=0.15)
    with pytest.raises(ValueError, match="same users"):
        paired_bootstrap(np.zeros(3), np.zeros(4))


def test_popularity_rows_hand_computed():
    from csmf_core.evaluate import EvalRows, popularity_rows

    # objective a: counts -> order 2, 1, 4, 3; objective b: order 3, 4 (tie by index), ...
    counts = [np.array([50, 5, 9, 1, 3]), np.array([50, 0, 0, 4, 4])]
    pos = [
        [np.array([1]), np.array([3, 4])],  # a: user 0 hit at rank 2; user 1 none in the top 2
        [np.array([], dtype=np.int64), np.array([4])],  # b: user 0 skipped; user 1 hit at rank 2
    ]
    ev = EvalRows(torch.tensor([1, 2]), [], pos)
    rows = {r["objective"]: r for r in popularity_rows(ev, ["a", "b"], counts, ks=(2,))}
    assert rows["a"]["recall"] == pytest.approx(0.5) and rows["a"]["ndcg"] == pytest.approx(L3 / 2)
    assert rows["a"]["users"] == 2 and rows["a"]["scorer"] == "popularity" and rows["a"]["k"] == 2
    assert rows["b"]["recall"] == pytest.approx(1.0) and rows["b"]["ndcg"] == pytest.approx(L3)
    assert rows["b"]["users"] == 1


@pytest.mark.parametrize(("n_items", "k"), [(1000, 5), (10, 8), (10, 50)])
def test_random_topk(n_items, k):
    got = random_topk(n_items, 500, k, seed=1)
    kk = min(k, n_items - 1)
    assert got.shape == (500, kk) and got.dtype == np.int64
    assert got.min() >= 1 and got.max() < n_items
    assert all(len(set(r)) == kk for r in got.tolist())
    np.testing.assert_array_equal(got, random_topk(n_items, 500, k, seed=1))
    assert not np.array_equal(got, random_topk(n_items, 500, k, seed=2))


def test_format_metrics_table():
    table = format_metrics_table([{"model": "csmf", "recall@50": 0.17771}, {"model": "pop", "users": 3}])
    assert table.splitlines() == [
        "| model | recall@50 | users |",
        "|---|---|---|",
        "| csmf | 0.1777 |  |",
        "| pop |  | 3 |",
    ]


def test_recall_ndcg_repeats_padding_and_prepared_relevant_match_a_loop():
    # Rankings with repeated items, ANN padding (-1) and an index past 2**32 (never relevant), scored
    # from the raw lists and from one prepared Relevant, against a per-user loop.
    rng = np.random.default_rng(3)
    n_users, n_items, width = 400, 30, 10
    topk = rng.integers(-1, n_items, size=(n_users, width))
    topk[::7, 3] = (1 << 32) + 5
    relevant = [rng.integers(1, n_items, size=rng.integers(0, 8)) for _ in range(n_users)]
    prepared = Relevant.of(relevant)
    for ks in ([1, 4, 10], [15]):
        got, again = recall_ndcg(topk, relevant, ks), recall_ndcg(topk, prepared, ks)
        assert got == again  # bit-identical: the same computation
        for k in ks:
            rec, nd = [], []
            for row, rel in zip(topk, relevant):
                rel = set(rel.tolist())
                if not rel:
                    continue
                seen, gains = set(), []
                for it in row[:k].tolist():
                    gains.append(1.0 if it in rel and it not in seen else 0.0)
                    seen.add(it)
                rec.append(sum(gains) / len(rel))
                dcg = sum(g / math.log2(r + 2) for r, g in enumerate(gains))
                nd.append(dcg / sum(1 / math.log2(r + 2) for r in range(min(len(rel), k))))
            assert got[k]["users"] == len(rec)
            assert got[k]["recall"] == pytest.approx(np.mean(rec), abs=1e-12)
            assert got[k]["ndcg"] == pytest.approx(np.mean(nd), abs=1e-12)
    assert Relevant.of(prepared) is prepared and len(prepared) == n_users
    with pytest.raises(ValueError, match="must be >= 0"):
        Relevant.of([np.array([1, -2])])
    with pytest.raises(ValueError, match="must be < 2"):
        Relevant.of([np.array([1 << 32])])


def test_eval_rows_relevant_is_prepared_once_and_follows_replaced_lists():
    from csmf_core.evaluate import EvalRows

    pos = [[np.array([1, 2]), np.array([3])], [np.array([2]), np.array([], np.int64)]]
    ev = EvalRows(torch.arange(2), [torch.zeros(2, 1, dtype=torch.long)], pos)
    first = ev.relevant(0)
    assert ev.relevant(0) is first and first.n_rel.tolist() == [2, 1]
    sub = ev.objectives_subset([1, 0])
    assert sub.relevant(1) is first and sub.pos[0] is pos[1]
    ev.pos[0] = [np.array([], np.int64), np.array([1, 1, 4])]  # replaced: prepared again
    assert ev.relevant(0).n_rel.tolist() == [0, 2]
    top = np.array([[1, 2], [4, 3]])
    assert recall_ndcg(top, ev.relevant(0), [2])[2]["recall"] == pytest.approx(0.5)


@pytest.mark.parametrize("n_rows", [0, 1, 5, 63, 64, 150, 200])
@pytest.mark.parametrize("chunk", [4096, 7])
def test_topk_items_rows_ranks_only_those_rows_as_brute_force(n_rows, chunk):
    g = torch.Generator().manual_seed(n_rows)
    users, items = torch.randn(200, 12, generator=g), torch.randn(90, 12, generator=g)
    scores = users.double().numpy() @ items.double().numpy().T
    scores[:, 0] = -np.inf
    brute = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    rows = np.sort(np.random.default_rng(n_rows).choice(200, n_rows, replace=False))
    got = topk_items(users, items, 10, chunk=chunk, rows=rows[::-1])  # any order
    assert got.shape == (200, 10) and got.dtype == np.int64
    np.testing.assert_array_equal(got[rows], brute[rows])
    others = np.setdiff1d(np.arange(200), rows)
    assert (got[others] == -1).all()  # padding rows (scored to keep BLAS on one kernel) are not returned
    # a user row that needs no ranking counts nowhere: the same recall as the full ranking
    rel = Relevant.of(
        [np.array([3, 7]) if r in set(rows.tolist()) else np.zeros(0, np.int64) for r in range(200)]
    )
    full = topk_items(users, items, 10)
    if n_rows:  # (no user counted: NaN on both sides)
        assert recall_ndcg(got, rel, (5, 10)) == recall_ndcg(full, rel, (5, 10))
    with pytest.raises(ValueError, match="rows must index"):
        topk_items(users, items, 10, rows=np.array([200]))


def test_topk_cache_serves_prefixes_and_keeps_row_rankings_apart():
    from csmf_core.metrics import TopKCache

    g = torch.Generator().manual_seed(1)
    users, items = torch.randn(100, 6, generator=g), torch.randn(40, 6, generator=g)
    calls = []

    def vectors():
        calls.append(1)
        return users, items

    cache, rows = TopKCache(), np.array([2, 50, 99])
    part = cache.get("a", 5, vectors, rows)
    assert len(calls) == 1 and (part[0] == -1).all()
    assert cache.get("a", 3, vectors, rows).shape == (100, 3) and len(calls) == 1  # prefix, same rows
    cache.get("a", 3, vectors, np.array([1]))  # other rows: ranked again
    assert len(calls) == 2
    full = cache.get("a", 5, vectors)  # a full request is never served by a partial ranking
    assert len(calls) == 3 and (full >= 1).all()
    np.testing.assert_array_equal(full[rows], part[rows])
    np.testing.assert_array_equal(cache.get("a", 4, vectors, rows), full[:, :4])  # the full one serves rows
    assert len(calls) == 3


@pytest.mark.parametrize("n_users", [40, 300, 9000])
def test_topk_items_rows_give_the_full_rankings_rows(n_users):
    # whole-catalog rankings (k = every candidate): any difference in the scores' order shows; a catalog
    # with repeated item vectors has exact ties, broken by index in both paths
    g = torch.Generator().manual_seed(n_users)
    users, items = torch.randn(n_users, 16, generator=g), torch.randn(120, 16, generator=g)
    items[60:80] = items[40:60]
    full = topk_items(users, items, 119, chunk=4096)
    rng = np.random.default_rng(0)
    for n in (1, 10, 65, n_users // 3, n_users):
        rows = rng.choice(n_users, min(n, n_users), replace=False)
        np.testing.assert_array_equal(topk_items(users, items, 119, rows=rows)[rows], full[rows])


def test_topk_items_rows_checks_every_user_and_rejects_masks():
    users, items = torch.randn(100, 4), torch.randn(20, 4)
    users[7, 2] = float("nan")  # a user that is not ranked still makes the vectors invalid, as before
    with pytest.raises(ValueError, match="NaN"):
        topk_items(users, items, 5, rows=np.array([1, 2]))
    with pytest.raises(ValueError, match="row indices"):
        topk_items(torch.randn(100, 4), items, 5, rows=np.ones(100, dtype=bool))
    assert (topk_items(torch.randn(100, 4), items, 5, rows=[]) == -1).all()  # an empty list: nothing ranked
