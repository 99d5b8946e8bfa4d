"""Shared fixtures: small fixed-seed worlds and a trained 3-stage cascade."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from csmf_core.cascade import CascadeData, run_cascade
from csmf_core.config import build_config
from csmf_core.evaluate import EvalRows
from csmf_core.model import TowerSpec
from csmf_core.rows import FeatureTables, TrainRows

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


TINY_CONFIG = {
    "model": {"dim": 16, "hidden": [32]},
    "train": {"batch_size": 256, "epochs": [1, 1, 1]},
    "data": {"seq_len": 5, "n_req_neg": 4},
}


def train_tiny(ds, root, dates, config: dict | None = None):
    """Prep `ds` (train on every day but the last, evaluate on the last) into root/mr, train the
    3-stage cascade with one torch thread (tiny matrices: ~5x faster on a busy 2-core machine) and
    save it to root/ckpt. Returns (cfg, mr_dir, model, owners); shared by the tiny-world fixtures."""
    from csmf_core import prep
    from csmf_core.cascade import load_cascade_data
    from csmf_core.checkpoint import save_checkpoint

    cfg = build_config(config or TINY_CONFIG)
    prep.prepare(
        ds,
        root / "mr",
        train_dates=(dates[0], dates[-2]),
        eval_dates=dates[-1],
        seq_len=cfg.data.seq_len,
        n_req_neg=cfg.data.n_req_neg,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, owners, _ = run_cascade(load_cascade_data(root / "mr"), cfg)
    finally:
        torch.set_num_threads(threads)
    save_checkpoint(root / "ckpt", model, owners)
    return cfg, root / "mr", model, owners


def random_cascade_data(seed: int = 0, n_users: int = 60, n_items: int = 50, rows: int = 3000, L: int = 5):
    """A random 3-objective world (no signal): enough to exercise every code path quickly."""
    g = torch.Generator().manual_seed(seed)
    us = TowerSpec(
        cat=(("uid", n_users), ("g", 3)),
        n_num=2,
        hist=("click", "conversion"),
        n_items=n_items,
        id_feature="uid",
    )
    its = TowerSpec(cat=(("iid", n_items), ("c", 4)), n_num=1, id_feature="iid")
    tables = FeatureTables(
        torch.stack([torch.arange(n_users), torch.randint(0, 3, (n_users,), generator=g)], 1),
        torch.randn(n_users, 2, generator=g),
        torch.stack([torch.arange(n_items), torch.randint(0, 4, (n_items,), generator=g)], 1),
        torch.randn(n_items, 1, generator=g),
    )
    level = torch.multinomial(torch.tensor([0.6, 0.3, 0.1]), rows, replacement=True, generator=g).to(
        torch.int8
    )
    tr = TrainRows(
        torch.randint(1, n_users, (rows,), generator=g),
        torch.randint(1, n_items, (rows,), generator=g),
        level,
        [torch.randint(0, n_items, (rows, L), generator=g) for _ in range(2)],
        torch.randint(0, n_items, (rows, 4), generator=g),
    )
    eu = torch.arange(1, n_users)
    ev = EvalRows(
        eu,
        [torch.randint(0, n_items, (len(eu), L), generator=g) for _ in range(2)],
        [[np.array([int(x)]) for x in torch.randint(1, n_items, (len(eu),), generator=g)]] * 3,
    )
    counts = [np.bincount(tr.i[tr.level >= t].numpy(), minlength=n_items) for t in range(3)]
    return CascadeData(["exposure", "click", "conversion"], us, its, tables, tr, ev, counts)


@pytest.fixture(scope="session")
def trained_random():
    """A 3-stage cascade on random data, with parameter snapshots at the end of every stage."""
    return train_random_cascade()


@pytest.fixture(scope="session", params=["dense", "lazy_adam", "rowwise_adagrad"])
def trained_random_each_rule(request):
    """`trained_random` once per train.embedding_optimizer (the no-forgetting tests run through each)."""
    return train_random_cascade(request.param)


@pytest.fixture(scope="session")
def random_cascade_trainer():
    """`train_random_cascade` itself, for tests that train the random cascade under their own patches."""
    return train_random_cascade


def train_random_cascade(embedding_optimizer: str | None = None) -> dict:
    data = random_cascade_data()
    train = {"batch_size": 256, "epochs": [2, 2, 2]}
    if embedding_optimizer is not None:
        train["embedding_optimizer"] = embedding_optimizer
    cfg = build_config({"model": {"dim": 16, "hidden": [32, 16]}, "train": train})
    snaps: dict[int, dict] = {}
    scores: dict[int, torch.Tensor] = {}
    probe_u = data.tables.user_inputs(torch.arange(1, 20), [h[:19] for h in data.rows.hists])
    probe_i = data.tables.item_inputs(torch.arange(1, 30))
    stage_end = {}

    def after(rep, model, owners):
        # a stage ends after its recovery (or its training for the last stage)
        last = rep.step.kind == "recover" or (rep.step.kind == "train" and rep.step.stage == 2)
        if last:
            t = rep.step.stage
            snaps[t] = {k: v.detach().clone() for k, v in model.named_parameters()}
            stage_end[t] = {k: v.clone() for k, v in model.owners.items()}
            with torch.no_grad():
                scores[t] = model.user_vectors(probe_u, 0) @ model.item_vectors(probe_i, 0).T

    model, owners, reports = run_cascade(data, cfg, after_step=after)
    return {
        "data": data,
        "cfg": cfg,
        "model": model,
        "owners": owners,
        "reports": reports,
        "snaps": snaps,
        "owners_at_end": stage_end,
        "exposure_scores": scores,
        "probe": (probe_u, probe_i),
    }


# ---- wide ids: a canonical dataset whose ids fill int64 (issue 13 item 3) ----------------------------
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
WIDE_USER_SPECIALS = (INT64_MIN, 2**53 + 1, INT64_MAX)  # 2**53 + 1: the first integer float64 cannot hold
WIDE_ITEM_SPECIALS = (INT64_MIN, -1, 0, 2**53 + 1, INT64_MAX)  # -1: FAISS's padding label


def widen_ids(src, dst, seed: int = 0) -> dict[str, dict[int, int]]:
    """Copy canonical dataset `src` to `dst` with every user and item id replaced by a wide int64 id.

    The map is increasing (the k-th smallest old id -> the k-th smallest new id), so prep gives every
    user and item the index it has in `src`: a model trained on `src` fits `dst`, and every result on
    `dst` is the result on `src` with the ids mapped, an oracle computed on ids small enough for any
    float. New ids: random values of up to 62 bits (either sign) plus int64's extremes, 2**53 + 1 and,
    for items, -1 and 0. Returns {"user_id": {old: new}, "item_id": {old: new}}.
    """
    import shutil
    from pathlib import Path

    import polars as pl

    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst)
    rng = np.random.default_rng(seed)
    events = sorted((dst / "events").rglob("*.parquet"))
    maps = {}
    for col, table, specials in (
        ("user_id", "users.parquet", WIDE_USER_SPECIALS),
        ("item_id", "items.parquet", WIDE_ITEM_SPECIALS),
    ):
        old = set(pl.read_parquet(dst / table, columns=[col])[col].drop_nulls().to_list())
        for f in events:
            old |= set(pl.read_parquet(f, columns=[col])[col].drop_nulls().to_list())
        new = set(specials)
        while len(new) < len(old):
            new |= {int(x) for x in rng.integers(-(2**62), 2**62, len(old) - len(new), dtype=np.int64)}
        maps[col] = dict(zip(sorted(old), sorted(new)))
    for f, cols in [(dst / "users.parquet", ["user_id"]), (dst / "items.parquet", ["item_id"])] + [
        (f, ["user_id", "item_id"]) for f in events
    ]:
        df = pl.read_parquet(f)
        df = df.with_columns(
            pl.col(c).replace_strict(list(maps[c]), list(maps[c].values()), return_dtype=pl.Int64)
            for c in cols
        )
        df.write_parquet(f)
    return maps


@pytest.fixture(scope="session")
def wide_ids():
    """`widen_ids(src, dst, seed=0)` (above), for tests that need a dataset with ids across int64."""
    return widen_ids


@pytest.fixture(scope="session")
def tiny_trainer():
    """`train_tiny(ds, root, dates, config=None)` (above): prep + tiny cascade + checkpoint."""
    return train_tiny


def assert_same_model_ready(a, b) -> None:
    """Two model-ready directories hold the same files; Parquet tables equal (schema, values, row groups);
    meta.json equal but for the source dir. Shared by the prep tests (URI, sharded, Dask)."""
    import json
    from pathlib import Path

    import pyarrow.parquet as pq

    a, b = Path(a), Path(b)
    names = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    for n in names:
        if n.endswith(".parquet"):
            ta, tb = pq.read_table(a / n), pq.read_table(b / n)
            assert ta.schema == tb.schema, n
            assert ta.equals(tb), n
            assert (
                pq.ParquetFile(a / n).metadata.num_row_groups == pq.ParquetFile(b / n).metadata.num_row_groups
            )
        else:
            ma, mb = json.loads((a / n).read_text()), json.loads((b / n).read_text())
            ma["dataset"].pop("dir"), mb["dataset"].pop("dir")
            assert ma == mb, n
