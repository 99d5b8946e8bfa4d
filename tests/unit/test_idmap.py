"""Stable id maps across runs (#16 item 2): a warm start keeps every known id's rows, new ids get rows
and are served, hashed ids collide only as counted, evicted rows are recycled (csmf_core/idmap.py,
csmf_core/warm.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import polars as pl
import pytest
import torch

from csmf_core import prep
from csmf_core.bundle import read_vocab
from csmf_core.cascade import Step, build_model, load_cascade_data, run_step
from csmf_core.checkpoint import save_checkpoint
from csmf_core.config import build_config
from csmf_core.idmap import BaseMaps, SideMap, assign_rows, read_recycled
from csmf_core.model import TwoTower
from csmf_core.serving import Recommender, write_bundle
from csmf_core.warm import WarmStartError, warm_start
from tests.conftest import TINY_CONFIG


def _is_new_user(u):
    return u % 5 == 0


def _is_new_item(i):
    return i % 7 == 0


def _without_new_ids(src, dst):
    """A copy of canonical dataset `src` without the 'new' users and items (tables and events): what
    the world looked like before they arrived."""
    shutil.copytree(src, dst)
    users = pl.read_parquet(src / "users.parquet")
    users.filter(~_is_new_user(pl.col("user_id"))).write_parquet(dst / "users.parquet")
    items = pl.read_parquet(src / "items.parquet")
    items.filter(~_is_new_item(pl.col("item_id"))).write_parquet(dst / "items.parquet")
    for f in (dst / "events").glob("*/*.parquet"):
        ev = pl.read_parquet(f)
        ev.filter(~_is_new_user(pl.col("user_id")) & ~_is_new_item(pl.col("item_id"))).write_parquet(f)


@pytest.fixture(scope="module")
def two_runs(tiny_world, tmp_path_factory):
    """Run 1 (days 1-3, before the new ids existed): a pruned model (non-trivial owners) and its bundle.
    Run 2 (days 4-5, evaluated on day 6, every id): prepared with run 1's maps, warm-started."""
    root = tmp_path_factory.mktemp("idmap")
    dates, cfg = tiny_world["dates"], build_config(TINY_CONFIG)
    _without_new_ids(tiny_world["ds"], root / "old")
    kw = {"seq_len": cfg.data.seq_len, "n_req_neg": cfg.data.n_req_neg}
    prep.prepare(root / "old", root / "mr1", train_dates=(dates[0], dates[2]), eval_dates=dates[3], **kw)
    data1 = load_cascade_data(root / "mr1")
    model1, owners = build_model(data1, cfg)
    for t, name in enumerate(data1.objectives[:-1]):  # ownership as after a cascade, without training
        owners, _ = run_step(Step(f"cpp_prune_{name}", "prune", t), model1, owners, data1, cfg)
    save_checkpoint(root / "ckpt1", model1, owners)
    write_bundle(root / "b1", checkpoint_dir=root / "ckpt1", model_ready_dir=root / "mr1",
                 dataset_dir=root / "old", config=cfg)  # fmt: skip
    base = BaseMaps.read(root / "b1" / "features")
    prep.prepare(tiny_world["ds"], root / "mr2", train_dates=(dates[3], dates[4]), eval_dates=dates[5],
                 base=base, **kw)  # fmt: skip
    data2 = load_cascade_data(root / "mr2")
    model2, owners2, info = warm_start(root / "ckpt1", data2, cfg)
    return {"root": root, "cfg": cfg, "data1": data1, "data2": data2, "model1": model1, "owners": owners,
            "model2": model2, "owners2": owners2, "info": info, "dates": dates, "base": base}  # fmt: skip


def test_known_ids_keep_their_rows_and_vectors(two_runs):
    r = two_runs["root"]
    for side, col in (("users", "user_id"), ("items", "item_id")):
        old, new = (
            read_vocab(r / "mr1" / f"{side}.parquet", col),
            read_vocab(r / "mr2" / f"{side}.parquet", col),
        )
        assert len(new) > len(old)
        np.testing.assert_array_equal(new[: len(old)], old)  # every known id: the same row
    m1, m2 = two_runs["model1"], two_runs["model2"]
    p1, p2 = dict(m1.named_parameters()), dict(m2.named_parameters())
    for name, a in p1.items():
        b = p2[name]
        if name.split(".")[1] in ("emb", "hist"):
            assert torch.equal(b[: a.shape[0]], a), name  # the known rows, bit for bit
        else:
            assert torch.equal(a, b), name
    assert all(torch.equal(m1.owners[k], m2.owners[k]) or m1.owners[k].shape != m2.owners[k].shape
               for k in m1.owners)  # fmt: skip
    assert {k: v.tolist() for k, v in two_runs["owners"].units.items()} == {
        k: v.tolist() for k, v in two_runs["owners2"].units.items()
    }
    # the towers' vectors of every known user / item, same inputs (features, empty histories): identical
    d1, d2 = two_runs["data1"], two_runs["data2"]
    n_u, n_i = d1.tables.users_cat.shape[0], d1.tables.items_cat.shape[0]
    users = torch.arange(1, n_u)
    hists = [torch.zeros(n_u - 1, 5, dtype=torch.long)] * 2
    assert torch.equal(d1.tables.users_cat[1:], d2.tables.users_cat[1:n_u])  # stable codes
    assert torch.equal(d1.tables.users_num[1:], d2.tables.users_num[1:n_u])  # the base's standardisation
    with torch.no_grad():
        for mode in range(3):
            u1 = m1.user_vectors(d1.tables.user_inputs(users, hists), mode)
            u2 = m2.user_vectors(d2.tables.user_inputs(users, hists), mode)
            assert torch.equal(u1, u2)
            i1 = m1.item_vectors(d1.tables.item_inputs(torch.arange(1, n_i)), mode)
            i2 = m2.item_vectors(d2.tables.item_inputs(torch.arange(1, n_i)), mode)
            assert torch.equal(i1, i2)


def test_new_ids_get_fresh_rows_and_are_served(two_runs, tiny_world):
    r, cfg, d2 = two_runs["root"], two_runs["cfg"], two_runs["data2"]
    users1 = read_vocab(r / "mr1" / "users.parquet", "user_id")
    users2 = read_vocab(r / "mr2" / "users.parquet", "user_id")
    items2 = read_vocab(r / "mr2" / "items.parquet", "item_id")
    new_users = users2[len(users1) :]
    assert len(new_users) and all(_is_new_user(int(u)) for u in new_users)
    assert (np.diff(new_users) > 0).all()  # appended in ascending id order
    meta = json.loads((r / "mr2" / "meta.json").read_text())
    assert meta["id_maps"]["users"]["new"] == len(new_users)
    assert meta["id_maps"]["users"]["kept"] == len(users1)
    # new rows = what a model from scratch with the run's init_seed has there
    fresh = TwoTower(d2.user_spec, d2.item_spec, cfg.model, 3)
    w2, w0 = two_runs["model2"].user.emb["c_uid"].weight, fresh.user.emb["c_uid"].weight
    assert torch.equal(w2[len(users1) + 1 :], w0[len(users1) + 1 :])
    # served: a bundle of the warm-started model knows the new users and items
    save_checkpoint(r / "ckpt2", two_runs["model2"], two_runs["owners2"])
    write_bundle(r / "b2", checkpoint_dir=r / "ckpt2", model_ready_dir=r / "mr2", dataset_dir=tiny_world["ds"],
                 config=cfg)  # fmt: skip
    rec = Recommender.load(r / "b2")
    idx, cold = rec.user_indices(new_users)
    assert not cold.any()
    np.testing.assert_array_equal(idx, np.arange(len(users1) + 1, len(users2) + 1))
    ids, _ = rec.item_vectors()
    new_items = [i for i in items2 if _is_new_item(int(i))]
    assert new_items and set(new_items) <= set(ids.tolist())
    (out,) = rec.recommend([int(new_users[0])], k=5)
    assert out["user_id"] == int(new_users[0]) and not out["cold_start"] and len(out["items"]) == 5
    # the new user's query is its own row's vector, not the unknown user's
    q_new, _ = rec.user_vectors([int(new_users[0])])
    q_unknown, cold = rec.user_vectors([-12345])
    assert cold.all() and not np.array_equal(q_new, q_unknown)


def _splitmix_bucket(i: int, b: int) -> int:
    """An independent splitmix64 in Python integers."""
    m = (1 << 64) - 1
    z = ((i & m) + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    z ^= z >> 31
    return 1 + z % b


def test_hashed_ids_collide_only_as_counted(tiny_world, tmp_path):
    dates, B = tiny_world["dates"], 97
    prep.prepare(tiny_world["ds"], tmp_path / "mr", train_dates=(dates[0], dates[4]), eval_dates=dates[5],
                 seq_len=5, n_req_neg=4, id_buckets=B)  # fmt: skip
    meta = json.loads((tmp_path / "mr" / "meta.json").read_text())
    for side, col, code in (("users", "user_id", "c_uid"), ("items", "item_id", "c_iid")):
        t = pl.read_parquet(tmp_path / "mr" / f"{side}.parquet")
        ids = t[col].to_list()[1:]
        expected = [_splitmix_bucket(i, B) for i in ids]
        assert t[code].to_list()[1:] == expected
        assert meta["id_maps"][side]["collisions"] == len(ids) - len(set(expected)) > 0
        spec = next(s for s in meta["features"][side] if s["name"] == code)
        assert spec["cardinality"] == B + 1
    data = load_cascade_data(tmp_path / "mr")
    model, _ = build_model(data, build_config(TINY_CONFIG, ["model.id_buckets=97"]))
    assert model.user.emb["c_uid"].weight.shape[0] == B + 1 == model.item.emb["c_iid"].weight.shape[0]


def test_assign_rows_keeps_appends_and_recycles():
    base = SideMap(np.array([30, 10, 20, 40]), np.array([5, 9, 2, 3], np.int32))
    # read this run: 10 (day 10), 40 (day 10), new 15, 5, 50; 20 and 30 unseen
    ids, seen = np.array([5, 10, 15, 40, 50]), np.array([10, 10, 10, 10, -1], np.int32)
    a = assign_rows(ids, seen, base, today=10)
    assert a.ids.tolist() == [30, 10, 20, 40, 5, 15, 50]
    assert a.last_seen.tolist() == [5, 10, 2, 10, 10, 10, 10]  # 50 only in the table: today
    assert not a.recycled.any() and a.stats["new"] == 3 and a.stats["kept"] == 4
    # evict after 5 days: 20 (seen day 2) and 30 (day 5) are evictable, oldest first
    a = assign_rows(ids, seen, base, today=10, evict_after_days=5)
    assert a.ids.tolist() == [15, 10, 5, 40, 50]
    assert a.recycled.tolist() == [True, False, True, False, False]
    assert a.stats == {"ids": 5, "kept": 2, "new": 3, "recycled": 2, "base_rows": 5}
    # a base id read only from the feature table (-1) keeps its base day: 20 (day 2) and 30 (day 5)
    # listed in users.parquet with no event stay evictable and are recycled as before
    listed = np.array([5, 10, 15, 20, 30, 40, 50])
    a = assign_rows(
        listed, np.array([10, 10, 10, -1, -1, 10, -1], np.int32), base, today=10, evict_after_days=5
    )
    assert a.ids.tolist() == [15, 10, 5, 40, 50] and a.recycled.tolist() == [True, False, True, False, False]
    a = assign_rows(listed, np.array([10, 10, 10, -1, -1, 10, -1], np.int32), base, today=10)
    assert a.last_seen.tolist() == [5, 10, 2, 10, 10, 10, 10]
    # no new id: evictable ids keep their rows
    a = assign_rows(np.array([10]), np.array([10], np.int32), base, today=10, evict_after_days=1)
    assert a.ids.tolist() == [30, 10, 20, 40] and not a.recycled.any()


def test_recycled_rows_start_fresh(two_runs, tiny_world, tmp_path):
    r, cfg, dates = two_runs["root"], two_runs["cfg"], two_runs["dates"]
    prep.prepare(tiny_world["ds"], tmp_path / "mr", train_dates=(dates[4], dates[4]), eval_dates=dates[5],
                 seq_len=5, n_req_neg=4, base=two_runs["base"], evict_after_days=1)  # fmt: skip
    meta = json.loads((tmp_path / "mr" / "meta.json").read_text())
    rec_u = read_recycled(tmp_path / "mr", "users")
    assert meta["id_maps"]["users"]["recycled"] == int(rec_u.sum()) > 0
    data = load_cascade_data(tmp_path / "mr")
    model, _, info = warm_start(
        r / "ckpt1", data, cfg, {"users": rec_u, "items": read_recycled(tmp_path / "mr", "items")}
    )
    assert info["user.emb.c_uid.weight"]["recycled"] == int(rec_u.sum())
    fresh = TwoTower(data.user_spec, data.item_spec, cfg.model, 3).user.emb["c_uid"].weight
    w, w1 = model.user.emb["c_uid"].weight, two_runs["model1"].user.emb["c_uid"].weight
    rows = np.flatnonzero(rec_u)
    assert torch.equal(w[rows], fresh[rows])
    kept = np.setdiff1d(np.arange(1, w1.shape[0]), rows)
    assert torch.equal(w[kept], w1[kept])
    users = read_vocab(tmp_path / "mr" / "users.parquet", "user_id")
    assert all(_is_new_user(int(u)) for u in users[rows - 1])  # recycled rows went to new ids


def test_mismatched_model_is_refused(two_runs):
    r, data = two_runs["root"], two_runs["data2"]
    with pytest.raises(WarmStartError, match=r"model\.dim: the model has 16, the run 32"):
        warm_start(r / "ckpt1", data, build_config(TINY_CONFIG, ["model.dim=32"]))
    with pytest.raises(WarmStartError, match=r"model\.id_buckets"):
        warm_start(r / "ckpt1", data, build_config(TINY_CONFIG, ["model.id_buckets=50"]))
    other = load_cascade_data(r / "mr2")
    other.objectives = ["exposure", "click", "purchase"]
    with pytest.raises(WarmStartError, match="objectives"):
        warm_start(r / "ckpt1", other, two_runs["cfg"])
