"""Serving bundle + Recommender on the tiny trained world (tests/unit/conftest.py: tiny_world)."""

from __future__ import annotations

import datetime as dt
import json
import shutil

import numpy as np
import polars as pl
import pytest
import torch

from csmf_core import prep
from csmf_core.evaluate import evaluate_model
from csmf_core.serving import MAX_K, Recommender, write_bundle

W = (1.0, 1.8, 1.2)


@pytest.fixture(scope="module")
def rec(tiny_world):
    return Recommender.load(tiny_world["bundle"])


def _known_users(world, n=6):
    ids = pl.read_parquet(world["mr"] / "users.parquet")["user_id"].to_numpy()[1:]
    return ids[:: max(1, len(ids) // n)][:n].astype(np.int64)


def test_bundle_layout_and_metadata(tiny_world, rec):
    b = tiny_world["bundle"]
    for f in (
        "checkpoint/model.pt",
        "index/index.faiss",
        "features/meta.json",
        "user_state.parquet",
        "config.yaml",
        "bundle.json",
    ):
        assert (b / f).is_file(), f
    info = json.loads((b / "bundle.json").read_text())
    assert info["objectives"] == ["exposure", "click", "conversion"] and info["dim"] == 16
    assert info["default_weights"] == list(W) and info["history_until"] == tiny_world["dates"][-1]
    assert sum(info["segment_sizes"].values()) == 16 and len(info["output_owners"]) == 16
    assert info["config_digest"] == tiny_world["cfg"].digest()
    assert rec.n_stages == 3 and rec.dim == 16 and rec.objectives == info["objectives"]
    np.testing.assert_array_equal(rec.output_owners, tiny_world["owners"].output_owners().numpy())
    ids, vecs = rec.item_vectors()
    assert ids.dtype == np.int64 and vecs.dtype == np.float32 and vecs.shape == (info["n_items"], 16)
    assert rec.index.ntotal == info["n_items"]


def test_recommend_equals_bruteforce(rec, tiny_world):
    users = _known_users(tiny_world)
    ids, vecs = rec.item_vectors()
    for weights in (None, (0.5, 3.0, 0.0)):
        out = rec.recommend(users, k=20, weights=weights)
        q, cold = rec.user_vectors(users, weights=W if weights is None else weights)
        assert not cold.any()
        scores = q.astype(np.float64) @ vecs.astype(np.float64).T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :20]
        for r, row in enumerate(out):
            assert row["user_id"] == users[r] and row["cold_start"] is False
            assert row["items"] == ids[order[r]].tolist()
            np.testing.assert_allclose(row["scores"], scores[r, order[r]], rtol=1e-5, atol=1e-5)
    by_mode = rec.recommend(users[:2], k=5, mode="click")
    qm, _ = rec.user_vectors(users[:2], mode=1)
    assert by_mode[0]["items"] == ids[np.argsort(-(qm[0] @ vecs.T), kind="stable")[:5]].tolist()


def test_fused_query_equals_weighted_mode_scores(rec, tiny_world):
    """sum_t k_t s_t from separate mode passes of the checkpoint model == fused query . item vectors."""
    model, data = tiny_world["model"], tiny_world["data"]
    users = _known_users(tiny_world)
    state = pl.read_parquet(tiny_world["bundle"] / "user_state.parquet")
    rows = state.filter(pl.col("user_id").is_in(users.tolist())).sort(
        pl.col("user_id").replace_strict(users.tolist(), range(len(users)))
    )
    u = torch.tensor(rows["u"].to_numpy(), dtype=torch.long)
    hists = [
        torch.tensor(np.stack(rows[f"hist_{o}"].to_list()), dtype=torch.long) for o in ("click", "conversion")
    ]
    x = data.tables.user_inputs(u, hists)
    xi = data.tables.item_inputs(torch.arange(1, data.tables.items_cat.shape[0]))
    with torch.no_grad():
        want = sum(k * (model.user_vectors(x, t) @ model.item_vectors(xi, t).T) for t, k in enumerate(W))
    q, _ = rec.user_vectors(users, weights=W)
    got = q @ rec.item_vectors()[1].T
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    full, _ = rec.user_vectors(users)
    np.testing.assert_allclose(rec.user_vectors(users, mode=2)[0], full)  # the last mode is the full model


def test_cold_start(rec, tiny_world):
    known = int(_known_users(tiny_world)[0])
    q, cold = rec.user_vectors([known, -5, 10**12])
    assert cold.tolist() == [False, True, True]
    np.testing.assert_allclose(
        q[1], q[2], rtol=1e-6, atol=1e-6
    )  # every unknown user gets the same generic vector
    out = rec.recommend([10**12], k=7)
    assert out[0]["cold_start"] is True and len(out[0]["items"]) == 7
    assert rec.recommend([known], k=MAX_K)[0]["items"].__len__() == rec.index.ntotal  # k > catalog


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"k": 0}, "k must be an integer from 1 to 10000"),
        ({"k": MAX_K + 1}, "k must be an integer from 1 to 10000"),
        ({"k": 2.5}, "k must be an integer"),
        ({"k": True}, "k must be an integer"),
        ({"weights": (1.0, 2.0)}, "expected 3 objective weights, got 2"),
        ({"weights": (1.0, -1.0, 1.0)}, "finite, >= 0 and not all zero"),
        ({"weights": (0.0, 0.0, 0.0)}, "finite, >= 0 and not all zero"),
        ({"weights": (1.0, float("nan"), 1.0)}, "finite"),
        ({"mode": 3}, "unknown stage 3"),
        ({"mode": "purchase"}, "unknown stage 'purchase'"),
        ({"mode": 1, "weights": W}, "either mode .* or weights"),
    ],
)
def test_bad_arguments(rec, tiny_world, kwargs, match):
    with pytest.raises(ValueError, match=match):
        rec.recommend(_known_users(tiny_world)[:1], **kwargs)


def _pure_python_history(world, events, user_id, objective_column, until, L):
    """Last L item indices the user had the label on strictly before the end of `until` (UTC);
    events: rows (dicts) of the canonical dataset; ties at the same ts ordered by item index."""
    items = pl.read_parquet(world["mr"] / "items.parquet")["item_id"].to_list()
    index_of = {iid: r for r, iid in enumerate(items) if iid is not None}
    end = dt.datetime.fromisoformat(until).replace(tzinfo=dt.UTC) + dt.timedelta(days=1)
    seen = []
    for row in events:
        if row["user_id"] == user_id and row[objective_column] and row["ts"] < end:
            seen.append((row["ts"], index_of[row["item_id"]]))
    last = [i for _, i in sorted(seen)][-L:]
    return [0] * (L - len(last)) + last


def test_user_state_equals_pure_python(tiny_world, tmp_path):
    ev = pl.read_parquet(tiny_world["ds"] / "events" / "**" / "*.parquet", hive_partitioning=False)
    clicks = ev.filter(pl.col("clicked")).group_by("user_id").len().sort(["len", "user_id"], descending=True)
    busy, light = clicks["user_id"][0], clicks["user_id"][len(clicks) - 1]
    convert = ev.filter(pl.col("converted"))["user_id"][0]
    rows = ev.filter(pl.col("user_id").is_in([busy, light, convert])).to_dicts()  # only to go faster
    until_early = tiny_world["dates"][2]
    early = write_bundle(
        tmp_path / "early",
        checkpoint_dir=tiny_world["ckpt"],
        model_ready_dir=tiny_world["mr"],
        dataset_dir=tiny_world["ds"],
        config=tiny_world["cfg"],
        history_until=until_early,
    )
    for bundle, until in ((tiny_world["bundle"], tiny_world["dates"][-1]), (early, until_early)):
        state = pl.read_parquet(bundle / "user_state.parquet")
        assert json.loads((bundle / "bundle.json").read_text())["history_until"] == until
        for uid in (busy, light, convert):
            row = state.filter(pl.col("user_id") == uid).row(0, named=True)
            for obj, col in (("click", "clicked"), ("conversion", "converted")):
                assert list(row[f"hist_{obj}"]) == _pure_python_history(
                    tiny_world, rows, uid, col, until, 5
                ), (
                    uid,
                    obj,
                )
    assert (ev.filter(pl.col("clicked") & (pl.col("user_id") == busy)).height) > 5  # the window is full


def test_write_is_atomic_and_refuses_existing(tiny_world, tmp_path):
    kw = dict(
        checkpoint_dir=tiny_world["ckpt"],
        model_ready_dir=tiny_world["mr"],
        dataset_dir=tiny_world["ds"],
        config=tiny_world["cfg"],
    )
    out = write_bundle(tmp_path / "b", **kw)
    first = json.loads((out / "bundle.json").read_text())["created_at"]
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_bundle(out, **kw)
    with pytest.raises(ValueError, match="unknown index kind"):  # fails inside the temp dir
        write_bundle(out, index_kind="nope", overwrite=True, **kw)
    assert json.loads((out / "bundle.json").read_text())["created_at"] == first  # old bundle intact
    write_bundle(out, index_kind="hnsw", overwrite=True, extra={"run_id": "abc"}, **kw)
    info = json.loads((out / "bundle.json").read_text())
    assert info["index"]["kind"] == "hnsw" and info["extra"] == {"run_id": "abc"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temp or old dirs left
    with pytest.raises(FileNotFoundError, match="not a model-ready dataset"):
        write_bundle(tmp_path / "c", **{**kw, "model_ready_dir": tmp_path})
    with pytest.raises(FileNotFoundError, match="not a csmf serving bundle"):
        Recommender.load(tmp_path)


def test_evaluate_same_and_remapped_vocabulary(rec, tiny_world, tmp_path):
    data, cfg = tiny_world["data"], tiny_world["cfg"]
    rows = rec.evaluate(tiny_world["mr"], ks=(10, 50))
    want = evaluate_model(
        tiny_world["model"],
        tiny_world["owners"].output_owners(),
        data.tables,
        data.eval,
        data.objectives,
        ks=(10, 50),
        scorers="all",
        fused_weights=cfg.eval.fused_weights,
        popularity=data.counts,
    )
    assert rows == want
    assert {r["scorer"] for r in rows} == {"exposure", "click", "conversion", "fused", "popularity"}

    # Same events, but one extra user and item (feature rows only) in the middle of the id ranges:
    # every index after them shifts, so only a correct id-based remapping reproduces the metrics.
    ds2 = tmp_path / "ds2"
    shutil.copytree(tiny_world["ds"], ds2)
    for table, col, new_id in (("users", "user_id", 1500), ("items", "item_id", 1001000)):
        df = pl.read_parquet(ds2 / f"{table}.parquet")
        assert new_id not in df[col].to_list()
        pl.concat([df, pl.DataFrame({col: [new_id]})], how="diagonal").write_parquet(ds2 / f"{table}.parquet")
    d = tiny_world["dates"]
    prep.prepare(ds2, tmp_path / "mr2", train_dates=(d[0], d[-2]), eval_dates=d[-1], seq_len=5, n_req_neg=4)
    assert pl.read_parquet(tmp_path / "mr2" / "items.parquet").height == data.tables.items_cat.shape[0] + 1
    assert rec.evaluate(tmp_path / "mr2", ks=(10, 50)) == want
    # the paired model-minus-popularity gaps use the same remapped rows: diff = difference of the means
    gaps = rec.popularity_gaps(tmp_path / "mr2", k=50)
    assert rec.evaluate_with_gaps(tmp_path / "mr2", ks=(10, 50), gaps_k=50) == (want, gaps)  # one encoding
    for g in gaps:
        if g["objective"] != "click":
            continue
        mean = {r["scorer"]: r for r in want if r["k"] == 50 and r["objective"] == "click"}
        assert g["diff"] == pytest.approx(
            mean[g["scorer"]][g["metric"]] - mean["popularity"][g["metric"]], abs=1e-12
        )
        assert g["users"] == mean["popularity"]["users"]


def test_summary_table_pivots_one_k_by_hand():
    from csmf_core.serving import summary_table

    rows = [
        {"objective": o, "scorer": sc, "k": k, "recall": r, "ndcg": n, "users": u}
        for o, sc, k, r, n, u in [
            ("exposure", "exposure", 50, 0.3, 0.2, 10),
            ("exposure", "popularity", 50, 0.1, 0.05, 10),
            ("click", "exposure", 50, 0.11, 0.01, 4),
            ("click", "click", 50, 0.4, 0.3, 4),
            ("click", "fused", 50, 0.45, 0.35, 4),
            ("click", "popularity", 50, 0.2, 0.1, 4),
            ("click", "click", 10, 0.9, 0.9, 4),
        ]
    ]
    lines = summary_table(rows, 50).splitlines()
    assert lines[1].split() == ["objective", "users", "own", "mode", "fused", "popularity"]
    assert lines[3].split() == ["exposure", "10", "0.3000", "/", "0.2000", "-", "0.1000", "/", "0.0500"]
    assert lines[4].split() == [
        "click",
        "4",
        "0.4000",
        "/",
        "0.3000",
        "0.4500",
        "/",
        "0.3500",
        "0.2000",
        "/",
        "0.1000",
    ]
