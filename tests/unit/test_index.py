"""Unit tests for csmf_core.index.ItemIndex: exactness, -1 padding, id map, save/load, validation."""

import json

import numpy as np
import pytest

from csmf_core.index import ItemIndex, SearchResult, size_bytes_on_disk


def _data(n=300, d=16, seed=0):
    rng = np.random.default_rng(seed)
    vecs = rng.standard_normal((n, d)).astype(np.float32)
    ids = (1000 + 7 * rng.permutation(n)).astype(np.int64)  # non-trivial position -> id map
    return ids, vecs, rng


def _brute(ids, vecs, queries, k):
    scores = queries.astype(np.float64) @ vecs.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return ids[order], np.take_along_axis(scores, order, axis=1)


def test_flat_equals_bruteforce():
    ids, vecs, rng = _data()
    queries = rng.standard_normal((20, 16)).astype(np.float32)
    res = ItemIndex.build(ids, vecs).search(queries, 10)
    want_ids, want_scores = _brute(ids, vecs, queries, 10)
    np.testing.assert_array_equal(res.ids, want_ids)
    np.testing.assert_allclose(res.scores, want_scores, atol=1e-5, rtol=0)
    assert res.ids.dtype == np.int64 and res.scores.dtype == np.float32
    assert (res.counts == 10).all()


def test_k_larger_than_corpus_returns_all():
    ids, vecs, rng = _data(n=30)
    res = ItemIndex.build(ids, vecs).search(vecs[:4], 50)
    assert res.ids.shape == (4, 30) and (res.counts == 30).all()
    assert all(set(row.tolist()) == set(ids.tolist()) for row in res.ids)


def test_ivf_padding_is_minus_one_and_ids_are_mapped():
    ids, vecs, rng = _data(n=50, d=8)
    # 25 lists over 50 points and one probe: a probed list holds far fewer than k=20 items.
    index = ItemIndex.build(ids, vecs, "ivf", ivf_nlist=25, nprobe=1)
    queries = rng.standard_normal((10, 8)).astype(np.float32)
    res = index.search(queries, 20)
    assert res.ids.shape == (10, 20)
    assert (res.counts < 20).all() and (res.counts >= 1).all()
    pos_of = {int(i): p for p, i in enumerate(ids)}
    for q, row_ids, row_scores, c in zip(queries, res.ids, res.scores, res.counts):
        assert (row_ids[c:] == -1).all() and np.isneginf(row_scores[c:]).all()
        # Each valid id's score is that item's true inner product: the map went position -> id.
        for i, s in zip(row_ids[:c], row_scores[:c]):
            assert float(q @ vecs[pos_of[int(i)]]) == pytest.approx(float(s), abs=1e-5)
    assert [len(x) for x in index.search_ids_lists(queries, 20)] == res.counts.tolist()


class _StubIndex:
    """Mimics a FAISS index returning -1 padding, including one in the middle of a row."""

    d, ntotal = 2, 3

    def search(self, q, k):
        pos = np.array([[2, -1, 0], [-1, -1, -1]], dtype=np.int64)
        return np.array([[3.0, -3.4e38, 1.0], [0, 0, 0]], dtype=np.float32), pos


def test_minus_one_is_never_mapped_through_the_id_map():
    index = ItemIndex(_StubIndex(), np.array([10, 20, 30], dtype=np.int64), "flat", {})
    res = index.search(np.zeros((2, 2), dtype=np.float32), 3)
    # ids[-1] would be 30: it must not appear for padded slots.
    np.testing.assert_array_equal(res.ids, [[30, 10, -1], [-1, -1, -1]])
    np.testing.assert_array_equal(res.scores, [[3.0, 1.0, -np.inf], [-np.inf] * 3])
    np.testing.assert_array_equal(res.counts, [2, 0])


def test_hnsw_recall_against_exact():
    ids, vecs, rng = _data(n=2000, d=32, seed=1)
    queries = rng.standard_normal((200, 32)).astype(np.float32)
    exact = ItemIndex.build(ids, vecs).search(queries, 10).ids
    approx = ItemIndex.build(ids, vecs, "hnsw", hnsw_m=16, ef_search=64).search(queries, 10).ids
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx.tolist(), exact.tolist())])
    assert recall > 0.9


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_save_load_roundtrip(tmp_path, kind):
    ids, vecs, rng = _data(n=200, d=8)
    index = ItemIndex.build(ids, vecs, kind, nprobe=2)
    queries = rng.standard_normal((15, 8)).astype(np.float32)
    before = index.search(queries, 7)
    target = tmp_path / "idx"
    index.save(target)
    index.save(target)  # overwriting an existing index works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temp/old dirs left behind
    assert sorted(p.name for p in target.iterdir()) == ["ids.npy", "index.faiss", "index.json"]
    meta = json.loads((target / "index.json").read_text())
    assert (meta["kind"], meta["dim"], meta["ntotal"]) == (kind, 8, 200) and meta["faiss_version"]
    loaded = ItemIndex.load(target)
    after = loaded.search(queries, 7)
    assert loaded.kind == kind and loaded.params == index.params
    np.testing.assert_array_equal(after.ids, before.ids)
    np.testing.assert_array_equal(after.scores, before.scores)
    assert index.nbytes_vectors == 200 * 8 * 4
    assert size_bytes_on_disk(target) == sum(p.stat().st_size for p in target.iterdir()) > 200 * 8 * 4


def test_load_errors(tmp_path):
    ids, vecs, _ = _data(n=20, d=4)
    target = ItemIndex.build(ids, vecs).save(tmp_path / "idx")
    np.save(target / "ids.npy", ids[:5])
    with pytest.raises(ValueError, match="ids.npy has 5 ids"):
        ItemIndex.load(target)
    meta = json.loads((target / "index.json").read_text())
    (target / "index.json").write_text(json.dumps({**meta, "dim": 5}))
    with pytest.raises(ValueError, match="D=4 but index.json says dim=5"):
        ItemIndex.load(target)
    (target / "index.faiss").unlink()
    with pytest.raises(FileNotFoundError, match="missing \\['index.faiss'\\]"):
        ItemIndex.load(target)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ItemIndex.load(tmp_path / "nope")


def test_build_and_search_validation():
    ids, vecs, _ = _data(n=10, d=4)
    bad = vecs.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="1 of 10 rows with NaN/inf values \\(first at row 3\\)"):
        ItemIndex.build(ids, bad)
    dup = ids.copy()
    dup[[1, 2]] = dup[0]
    with pytest.raises(ValueError, match="1 ids repeat among 10 rows"):
        ItemIndex.build(dup, vecs)
    with pytest.raises(ValueError, match="item_ids has 9 rows but vectors has 10 rows"):
        ItemIndex.build(ids[:9], vecs)
    with pytest.raises(ValueError, match="must be 2-D"):
        ItemIndex.build(ids, vecs[0])
    with pytest.raises(ValueError, match="unknown index kind 'pq'"):
        ItemIndex.build(ids, vecs, "pq")
    with pytest.raises(ValueError, match="ivf_nlist must be in \\[1, N=10\\]"):
        ItemIndex.build(ids, vecs, "ivf", ivf_nlist=11)
    # float64 Fortran-ordered input is converted, not rejected.
    index = ItemIndex.build(ids, np.asfortranarray(vecs.astype(np.float64)))
    with pytest.raises(ValueError, match="k must be a positive integer"):
        index.search(vecs, 0)
    with pytest.raises(ValueError, match="queries have D=3 but the index has D=4"):
        index.search(vecs[:, :3], 2)
    assert isinstance(index.search(vecs, 1), SearchResult)
