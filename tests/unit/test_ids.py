"""Ids across the whole int64 range, exactly, through prep -> bundle -> index -> Recommender -> pyfunc -> CLI.

The oracle is the tiny world of tests/unit/conftest.py, whose ids are small enough for any float: the
wide dataset is the same data with every id mapped increasingly onto random 62-bit values and int64's
extremes (tests/conftest.py::widen_ids), so prep gives every user and item the same index, the tiny
world's checkpoint fits it, and every wide result must be the tiny result with the ids mapped.
"""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from csmf_core import prep
from csmf_core.bundle import lookup_index, read_vocab
from csmf_core.ids import as_id_array, check_id
from csmf_core.serving import Recommender, write_bundle
from data_contracts import partition_files
from flows.cli import main as csmf
from flows.registry import CSMFPyfunc

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@pytest.fixture(scope="module")
def wide(tiny_world, wide_ids, tmp_path_factory):
    root = tmp_path_factory.mktemp("wide")
    maps = wide_ids(tiny_world["ds"], root / "ds")
    cfg, dates = tiny_world["cfg"], tiny_world["dates"]
    prep.prepare(
        root / "ds",
        root / "mr",
        train_dates=(dates[0], dates[-2]),
        eval_dates=dates[-1],
        seq_len=cfg.data.seq_len,
        n_req_neg=cfg.data.n_req_neg,
    )
    write_bundle(
        root / "bundle",
        checkpoint_dir=tiny_world["ckpt"],  # the tiny world's model: same indices, same vocabulary sizes
        model_ready_dir=root / "mr",
        dataset_dir=root / "ds",
        config=cfg,
    )
    return SimpleNamespace(
        root=root,
        users=maps["user_id"],
        items=maps["item_id"],
        mr=root / "mr",
        bundle=root / "bundle",
        rec=Recommender.load(root / "bundle"),
        small=Recommender.load(tiny_world["bundle"]),
    )


def _ids(path, col) -> list:
    """A column as Python values (polars keeps Int64 exact, nulls as None)."""
    return pl.read_parquet(path, columns=[col])[col].to_list()


def _sample_users(wide, n=8) -> list[int]:
    old = sorted(wide.users)
    return [old[0], old[-1], *old[1 : -1 : max(1, len(old) // n)]]  # the extremes map to int64 min/max


# ---- prep, bundle, index -----------------------------------------------------------------------------
def test_prep_writes_wide_ids_exactly_and_nothing_else_changes(wide, tiny_world):
    small_users = _ids(tiny_world["mr"] / "users.parquet", "user_id")
    small_items = _ids(tiny_world["mr"] / "items.parquet", "item_id")
    assert _ids(wide.mr / "users.parquet", "user_id") == [None] + [wide.users[u] for u in small_users[1:]]
    assert _ids(wide.mr / "items.parquet", "item_id") == [None] + [wide.items[i] for i in small_items[1:]]
    assert {INT64_MIN, 2**53 + 1, INT64_MAX} <= set(_ids(wide.mr / "users.parquet", "user_id"))
    for f in ("users.parquet", "items.parquet"):  # every feature column: identical
        a = pl.read_parquet(tiny_world["mr"] / f).drop("user_id" if f == "users.parquet" else "item_id")
        b = pl.read_parquet(wide.mr / f).drop("user_id" if f == "users.parquet" else "item_id")
        assert a.equals(b), f
    for f in ("eval.parquet", "popularity.parquet", *[p.name for p in (wide.mr / "train").iterdir()]):
        sub = "train/" if f.startswith("part-") else ""
        assert pl.read_parquet(tiny_world["mr"] / sub / f).equals(pl.read_parquet(wide.mr / sub / f)), f


def test_bundle_state_and_index_hold_the_exact_ids(wide, tiny_world):
    small_index = np.load(tiny_world["bundle"] / "index" / "ids.npy")
    wide_index = np.load(wide.bundle / "index" / "ids.npy")
    assert wide_index.dtype == np.int64
    assert wide_index.tolist() == [wide.items[int(i)] for i in small_index]
    assert {INT64_MIN, -1, 0, INT64_MAX} <= set(wide_index.tolist())
    small_state = pq.read_table(tiny_world["bundle"] / "user_state.parquet")
    wide_state = pq.read_table(wide.bundle / "user_state.parquet")
    assert wide_state["user_id"].to_pylist() == [wide.users[u] for u in small_state["user_id"].to_pylist()]
    assert wide_state.drop_columns("user_id").equals(small_state.drop_columns("user_id"))
    assert wide.rec.user_vocab.tolist() == sorted(wide.users.values())
    assert wide.rec.item_vocab.tolist() == sorted(wide.items.values())


# ---- Recommender ---------------------------------------------------------------------------------------
def test_recommend_is_the_small_world_with_ids_mapped(wide):
    users = _sample_users(wide)
    got = wide.rec.recommend([wide.users[u] for u in users], k=15, weights=(1.0, 3.0, 0.5))
    want = wide.small.recommend(users, k=15, weights=(1.0, 3.0, 0.5))
    for g, w, u in zip(got, want, users):
        assert g["user_id"] == wide.users[u] and not g["cold_start"]
        assert g["items"] == [wide.items[i] for i in w["items"]]
        np.testing.assert_allclose(g["scores"], w["scores"], rtol=1e-6, atol=1e-7)
    for mode in range(3):  # every single-stage ranking too
        g = wide.rec.recommend([INT64_MAX], k=5, mode=mode)[0]["items"]
        assert g == [
            wide.items[i] for i in wide.small.recommend([max(wide.users)], k=5, mode=mode)[0]["items"]
        ]


def test_neighbours_of_wide_ids_are_cold_starts(wide):
    known = sorted(wide.users.values())
    # float64 cannot tell these from a known id: each one must still be its own (unknown) user
    near = [INT64_MAX - 1, INT64_MIN + 1, 2**53, known[len(known) // 2] + 1]
    near = [v for v in near if v not in wide.users.values()]
    _, cold = wide.rec.user_vectors([INT64_MAX, *near])
    assert cold.tolist() == [False] + [True] * len(near)
    assert [r["user_id"] for r in wide.rec.recommend(near, k=3)] == near


def test_evaluate_maps_wide_ids_like_small_ones(wide, tiny_world):
    got = wide.rec.evaluate(wide.mr, ks=(10, 50))
    want = wide.small.evaluate(tiny_world["mr"], ks=(10, 50))
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert (g["objective"], g["scorer"], g["k"], g["users"]) == (
            w["objective"],
            w["scorer"],
            w["k"],
            w["users"],
        )
        assert g["recall"] == pytest.approx(w["recall"], abs=1e-9) and g["ndcg"] == pytest.approx(
            w["ndcg"], abs=1e-9
        )


# ---- registry pyfunc ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pyfunc(wide):
    model = CSMFPyfunc()
    model.load_context(SimpleNamespace(artifacts={"bundle": str(wide.bundle)}))
    return model


def test_pyfunc_echoes_and_serves_wide_ids(pyfunc, wide):
    inverse = {v: k for k, v in wide.users.items()}
    ids = [INT64_MAX, INT64_MIN, 2**53 + 1, INT64_MAX - 1]
    out = pyfunc.predict(None, pd.DataFrame({"user_id": ids, "k": [4, 4, 4, 4]}))
    assert out["user_id"].tolist() == ids
    assert out["cold_start"].tolist() == [False, False, False, True]
    for row, uid in zip(out.itertuples(), ids[:3]):
        want = wide.small.recommend([inverse[uid]], k=4)[0]["items"]
        assert list(row.item_ids) == [wide.items[i] for i in want]


@pytest.mark.parametrize(
    "values, message",
    [
        ([2**63], "9223372036854775808 is outside the int64 range"),
        ([-(2**63) - 1], "-9223372036854775809 is outside the int64 range"),
        ([1.5], "user_id 1.5 is not an integer id"),
        (["42"], "user_id '42' is not an integer id (a string"),
        (["alice"], "user_id 'alice' is not an integer id"),
        ([True], "user_id True is not an integer id"),
        ([None], "user_id is missing"),
        # one float row makes pandas turn the whole column into float64: 2**62 + 1 is already 2**62
        ([2**62 + 1, 3.0], "a float beyond 2**53"),
    ],
)
def test_pyfunc_refuses_ids_it_cannot_serve_exactly(pyfunc, values, message):
    with pytest.raises(mlflow.exceptions.MlflowException) as exc:
        pyfunc.predict(None, pd.DataFrame({"user_id": values}))
    assert exc.value.error_code == "INVALID_PARAMETER_VALUE" and message in exc.value.message


# ---- CLI -------------------------------------------------------------------------------------------------
def _cli(argv) -> int:
    try:
        return csmf(argv)
    except SystemExit as exc:  # argparse errors
        return exc.code


def test_cli_recommend_and_embed_keep_wide_ids(wide, tmp_path, capsys):
    inverse = {v: k for k, v in wide.users.items()}
    for uid in (INT64_MAX, INT64_MIN):
        capsys.readouterr()
        assert _cli(["recommend", "--user-id", str(uid), "--k", "5", "--model", str(wide.bundle)]) == 0
        out = capsys.readouterr().out
        assert f"user {uid}  (known user" in out
        rows = [ln.split() for ln in out.splitlines()]
        items = [int(r[1]) for r in rows if len(r) == 3 and r[0].isdigit()]
        want = wide.small.recommend([inverse[uid]], k=5)[0]["items"]
        assert items == [wide.items[i] for i in want]
    for side, col, ids in (("user", "user_id", wide.users), ("item", "item_id", wide.items)):
        f = tmp_path / f"{side}.parquet"
        assert _cli(["embed", "--side", side, "--model", str(wide.bundle), "--out", str(f)]) == 0
        t = pq.read_table(f)
        assert t.schema.field(col).type == pa.int64()
        assert t[col].to_pylist() == sorted(ids.values())


@pytest.mark.parametrize(
    "text, message",
    [
        ("9223372036854775808", "9223372036854775808 is outside the int64 range"),
        ("-9223372036854775809", "-9223372036854775809 is outside the int64 range"),
        ("1.5", "'1.5' is not an integer user id"),
        ("1e3", "'1e3' is not an integer user id"),
        ("alice", "'alice' is not an integer user id"),
    ],
)
def test_cli_user_id_out_of_range_exits_2(wide, capsys, text, message):
    assert _cli(["recommend", f"--user-id={text}", "--model", str(wide.bundle)]) == 2
    err = capsys.readouterr().err
    assert "--user-id" in err and message in err


def test_cli_user_id_extremes_parse_exactly(wide, capsys):
    argv = ["recommend", "--user-id", "9223372036854775807", "--user-id=-9223372036854775808", "--k", "1"]
    assert _cli([*argv, "--model", str(wide.bundle)]) == 0
    out = capsys.readouterr().out
    assert "user 9223372036854775807  (known" in out and "user -9223372036854775808  (known" in out


# ---- the pieces ------------------------------------------------------------------------------------------
def test_read_vocab_is_exact_and_refuses_what_prep_never_writes(tmp_path):
    ids = [2**53 + 1, 2**62 + 3, INT64_MAX]
    pq.write_table(pa.table({"user_id": pa.array([None, *ids], pa.int64())}), tmp_path / "u.parquet")
    got = read_vocab(tmp_path / "u.parquet", "user_id")
    assert got.dtype == np.int64 and got.tolist() == ids
    pq.write_table(pa.table({"user_id": pa.array([None, 1, None], pa.int64())}), tmp_path / "n.parquet")
    with pytest.raises(ValueError, match="1 nulls in rows >= 1"):
        read_vocab(tmp_path / "n.parquet", "user_id")
    pq.write_table(pa.table({"user_id": pa.array([None, 1.0, 2.0], pa.float64())}), tmp_path / "f.parquet")
    with pytest.raises(ValueError, match="has type double, expected int64"):
        read_vocab(tmp_path / "f.parquet", "user_id")


def test_lookup_index_tells_neighbours_apart():
    vocab = np.array([INT64_MIN, 2**53 + 1, INT64_MAX - 1, INT64_MAX], np.int64)
    got = lookup_index(vocab, np.array([INT64_MAX, INT64_MAX - 1, 2**53, 2**53 + 1, INT64_MIN, 0], np.int64))
    assert got.tolist() == [4, 3, 0, 2, 1, 0]
    with pytest.raises(ValueError, match="float64 array"):
        lookup_index(vocab, vocab.astype(np.float64))


@pytest.mark.parametrize(
    "value, expected",
    [
        (INT64_MAX, INT64_MAX),
        (INT64_MIN, INT64_MIN),
        (np.int64(INT64_MAX), INT64_MAX),
        (np.uint64(2**63 - 1), INT64_MAX),
        (3.0, 3),
        (float(2**53), 2**53),
        (np.float64(-7.0), -7),
    ],
)
def test_check_id_accepts_exact_ids(value, expected):
    got = check_id(value)
    assert type(got) is int and got == expected


@pytest.mark.parametrize(
    "value, message",
    [
        (2**63, "outside the int64 range"),
        (-(2**63) - 1, "outside the int64 range"),
        (np.uint64(2**63), "outside the int64 range"),
        (1.5, "not an integer id"),
        (float(2**53 + 2), "a float beyond 2**53"),
        (float("nan"), "not an integer id"),
        (float("inf"), "not an integer id"),
        ("42", "a string"),
        (b"42", "a string"),
        (True, "a boolean"),
        (np.bool_(False), "a boolean"),
        (None, "not an integer id"),
        ([1], "not an integer id"),
    ],
)
def test_check_id_refuses(value, message):
    with pytest.raises(ValueError, match=message.replace("*", r"\*")):
        check_id(value)


def test_as_id_array_never_goes_through_float():
    assert as_id_array([INT64_MAX, INT64_MIN, 2**53 + 1]).tolist() == [INT64_MAX, INT64_MIN, 2**53 + 1]
    assert as_id_array(np.array([5, 2**63 - 1], np.uint64)).tolist() == [5, INT64_MAX]
    assert as_id_array(pd.Series([INT64_MAX, 1])).tolist() == [INT64_MAX, 1]
    assert as_id_array(7).tolist() == [7] and as_id_array([]).dtype == np.int64
    # np.asarray([2**63, -1]) is float64 and np.asarray([2**63]) uint64: both must be refused, not wrapped
    for bad in ([2**63, -1], [2**63], np.array([2**63], np.uint64), np.array([1.0, 2.0]), [1.0], ["1"]):
        with pytest.raises(ValueError):
            as_id_array(bad)
    with pytest.raises(ValueError, match="1-D"):
        as_id_array(np.zeros((2, 2), np.int64))


def test_prep_reads_only_iso_partition_names(tiny_world, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(tiny_world["ds"], ds)
    first = tiny_world["dates"][0]
    real = sorted((ds / "events" / f"dt={first}").glob("*.parquet"))
    # dt=20260101 parses as the same day with date.fromisoformat and sorts after dt=2026-01-01
    for stray in (f"dt={first.replace('-', '')}", "dt=..", "dt=2026-13-40"):
        (ds / "events" / stray).mkdir()
        shutil.copy(real[0], ds / "events" / stray / "part-99999.parquet")
    parts = partition_files(ds)  # what prep (and the bundle) read
    assert list(parts) == tiny_world["dates"]
    assert parts[first] == real


def test_index_keeps_extreme_item_ids_through_save_and_load(tmp_path):
    from csmf_core.index import ItemIndex

    ids = np.array([INT64_MIN, -1, 0, 2**53 + 1, INT64_MAX], np.int64)
    vecs = np.eye(5, dtype=np.float32) * np.arange(1, 6, dtype=np.float32)[:, None]
    ItemIndex.build(ids, vecs).save(tmp_path / "ix")
    ix = ItemIndex.load(tmp_path / "ix")
    assert ix.ids.dtype == np.int64 and ix.ids.tolist() == ids.tolist()
    res = ix.search(np.ones((1, 5), np.float32), 5)  # scores 5, 4, 3, 2, 1: INT64_MAX first
    assert res.ids[0].tolist() == ids[::-1].tolist() and res.counts.tolist() == [5]
    with pytest.raises(ValueError, match="9223372036854775808 is outside the int64 range"):
        ItemIndex.build(np.array([1, 2**63], np.uint64), vecs[:2])
