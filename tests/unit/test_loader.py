"""The streaming Parquet loader: coverage per epoch (also across shards), determinism, content equal
to the in-memory rows, bounded reads (instrumented), recovery subsets, and training through it."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from csmf_core import prep, synth
from csmf_core.cascade import build_model, load_cascade_data
from csmf_core.config import build_config
from csmf_core.data import load_model_ready
from csmf_core.loader import ParquetTrainSource, steps_per_epoch
from csmf_core.losses import item_log_q
from csmf_core.train import train_stage


@pytest.fixture(scope="module")
def mr(tmp_path_factory):
    """Tiny world prepared into 5 train parts of <= 4000 rows, the first rewritten with 4 row groups."""
    root = tmp_path_factory.mktemp("loader")
    s = synth.generate(root / "ds", "tiny", seed=0)
    prep.prepare(
        root / "ds",
        root / "mr",
        train_dates=(s.dates[0], s.dates[-2]),
        eval_dates=s.dates[-1],
        seq_len=5,
        n_req_neg=4,
        part_rows=4000,
    )
    first = sorted((root / "mr" / "train").glob("part-*.parquet"))[0]
    table = pq.read_table(first)
    pq.write_table(table, first, row_group_size=1000)  # several row groups in one file
    assert pq.ParquetFile(first).metadata.num_row_groups == 4
    return root / "mr"


@pytest.fixture(scope="module")
def mem(mr):
    return load_model_ready(mr).train


def _rows(src, stage, bs, **kw):
    return [b.row.clone() for b in src.batches(stage, bs, **kw)]


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_every_row_of_the_stage_once_per_epoch(mr, mem, stage):
    src = ParquetTrainSource(mr, read_rows=300, window_rows=2000, interleave=3)
    want = torch.nonzero(mem.level >= stage).flatten().tolist()
    for epoch in (0, 1):
        rows = torch.cat(_rows(src, stage, 128, seed=5, epoch=epoch)).tolist()
        assert sorted(rows) == want  # each exactly once (no duplicate, nothing missing)
    assert src.n_rows(stage) == len(want)


@pytest.mark.parametrize("world", [2, 3])
def test_shards_partition_each_global_batch(mr, mem, world):
    stage = 1
    ref = _rows(ParquetTrainSource(mr, read_rows=300, window_rows=2000), stage, 120, seed=2, epoch=1)
    shards = [
        _rows(
            ParquetTrainSource(mr, read_rows=300, window_rows=2000, rank=r, world_size=world),
            stage,
            120,
            seed=2,
            epoch=1,
        )
        for r in range(world)
    ]
    n_ref = len(ref)
    assert all(len(s) == n_ref for s in shards)  # equal step counts on every rank
    assert n_ref == steps_per_epoch(int((mem.level >= stage).sum()), 120, world)
    for k in range(n_ref):  # the union of the ranks' batches is the single-process global batch
        got = torch.cat([s[k] for s in shards])
        assert torch.equal(got, ref[k])
        assert min(len(s[k]) for s in shards) >= 2
    every = Counter(torch.cat([torch.cat(s) for s in shards]).tolist())
    assert sorted(every) == torch.nonzero(mem.level >= stage).flatten().tolist()
    assert set(every.values()) == {1}


def test_deterministic_by_seed_epoch_stage(mr):
    src = ParquetTrainSource(mr, read_rows=300, window_rows=2000, interleave=2)
    order = lambda **kw: torch.cat(_rows(src, 0, 256, **kw)).tolist()  # noqa: E731
    a = order(seed=1, epoch=0)
    assert a == order(seed=1, epoch=0)
    assert (
        a
        == torch.cat(
            _rows(
                ParquetTrainSource(mr, read_rows=300, window_rows=2000, interleave=2, prefetch=0),
                0,
                256,
                seed=1,
                epoch=0,
            )
        ).tolist()
    )
    assert a != order(seed=1, epoch=1)
    assert a != order(seed=2, epoch=0)


def test_batches_equal_in_memory_rows(mr, mem):
    src = ParquetTrainSource(mr, read_rows=256, window_rows=1500)
    n = 0
    for b in src.batches(0, 200, seed=0, epoch=0):
        r = b.row
        assert b.u.dtype == torch.int64 and b.hists[0].dtype == torch.int64
        assert torch.equal(b.u, mem.u[r]) and torch.equal(b.i, mem.i[r])
        assert torch.equal(b.level.long(), mem.level[r])
        assert torch.equal(b.hists[0], mem.hist["click"][r]) and torch.equal(
            b.hists[1], mem.hist["conversion"][r]
        )
        assert torch.equal(b.neg, mem.neg[r])
        n += len(b)
    assert n == len(mem)


def test_memory_bounded_by_instrumentation(mr, mem):
    src = ParquetTrainSource(mr, read_rows=200, window_rows=1000, interleave=2)
    batches = sum(1 for _ in src.batches(0, 100, seed=0, epoch=0))
    st = src.stats
    assert st.rows_read == len(mem) and st.batches == batches
    assert st.max_read_rows <= 200
    assert st.max_open_readers <= 2
    assert st.max_window_rows < 1000 + 200  # the window never holds more than window + one read
    assert st.max_window_rows < len(mem) / 10  # far from the whole table


def test_window_mixes_row_groups(mr, mem):
    """Rows of different parts share batches (row groups are interleaved, not read one by one)."""
    src = ParquetTrainSource(mr, read_rows=250, window_rows=1000, interleave=4)
    batch = next(iter(src.batches(0, 256, seed=0, epoch=0)))
    parts = np.unique(batch.row.numpy() // 4000)
    assert len(parts) >= 2


def test_tail_merged_not_dropped(mr, mem):
    n0 = int((mem.level >= 2).sum())  # stage 2: the fewest rows
    bs = n0 - 1  # a tail of exactly one row
    src = ParquetTrainSource(mr)
    batches = _rows(src, 2, bs, seed=0, epoch=0)
    assert [len(b) for b in batches] == [n0]
    assert steps_per_epoch(n0, bs) == 1 and steps_per_epoch(10, 4) == 3 and steps_per_epoch(9, 4) == 2


def test_recovery_subset_is_fixed_and_counted(mr, mem):
    src = ParquetTrainSource(mr, read_rows=300, window_rows=2000)
    a = torch.cat(_rows(src, 0, 256, seed=3, epoch=0, fraction=0.3, salt=1))
    b = torch.cat(_rows(src, 0, 256, seed=3, epoch=1, fraction=0.3, salt=1))
    assert sorted(a.tolist()) == sorted(b.tolist())  # the same subset every epoch, other order
    assert a.tolist() != b.tolist()
    assert len(a) == src.n_rows(0, fraction=0.3, seed=3, salt=1)
    assert abs(len(a) / len(mem) - 0.3) < 0.02
    c = torch.cat(_rows(src, 0, 256, seed=4, epoch=0, fraction=0.3, salt=1))
    assert sorted(c.tolist()) != sorted(a.tolist())


def test_bad_arguments_and_errors(mr, tmp_path):
    with pytest.raises(FileNotFoundError, match="meta.json"):
        ParquetTrainSource(tmp_path)
    with pytest.raises(ValueError, match="rank 2"):
        ParquetTrainSource(mr, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size 3"):
        next(iter(ParquetTrainSource(mr, world_size=2).batches(0, 3, seed=0, epoch=0)))


def test_reader_error_reaches_the_consumer(mr, tmp_path):
    """A part that goes bad during an epoch raises in the training thread, not silently in the loader."""
    import shutil

    copy = tmp_path / "mr"
    shutil.copytree(mr, copy)
    src = ParquetTrainSource(copy, read_rows=500)
    part = sorted((copy / "train").glob("part-*.parquet"))[-1]
    part.write_bytes(b"not parquet")
    with pytest.raises(Exception, match="(?i)parquet|magic"):
        for _ in src.batches(0, 128, seed=0, epoch=0):
            pass


def test_abandoned_epoch_stops_the_thread(mr):
    import threading

    src = ParquetTrainSource(mr, read_rows=100, window_rows=500, prefetch=2)
    it = src.batches(0, 64, seed=0, epoch=0)
    next(it)
    it.close()
    assert not [t for t in threading.enumerate() if t.name == "csmf-loader"]


def test_train_stage_through_the_parquet_loader(mr):
    """A stage trains from the streamed rows: loss falls, frozen entries stay bit-identical."""
    cfg = build_config({"model": {"dim": 8, "hidden": [16]}, "train": {"batch_size": 256, "epochs": [3]}})
    data = load_cascade_data(mr, loader="parquet", shuffle_window=3000)
    assert isinstance(data.rows, ParquetTrainSource)
    torch.manual_seed(0)
    model, owners = build_model(data, cfg)
    log_q = item_log_q(torch.as_tensor(data.counts[0]))
    res = train_stage(
        model, data.tables, data.rows, 0, cfg, log_q=log_q, output_owners=owners.output_owners()
    )
    assert res.rows == data.rows.n_rows(0)
    assert res.steps == 3 * steps_per_epoch(res.rows, 256)
    assert res.epoch_losses[-1] < res.epoch_losses[0] - 0.1


def test_in_memory_rows_shard_like_the_loader(mem):
    """train.loader=memory under DDP: rank shares of each global batch, equal steps, no row twice."""
    from csmf_core.rows import TrainRows
    from csmf_core.train import _memory_epochs

    rows = TrainRows(mem.u, mem.i, mem.level, [mem.hist["click"]], mem.neg, row=torch.arange(len(mem)))
    data = rows.for_stage(1)
    one = [b.row for b in _memory_epochs(data, 100, torch.Generator().manual_seed(4), 0, 1)(0)]
    shards = [
        [b.row for b in _memory_epochs(data, 100, torch.Generator().manual_seed(4), r, 3)(0)]
        for r in range(3)
    ]
    assert all(len(s) == len(one) for s in shards)
    for k in range(len(one)):
        assert torch.equal(torch.cat([s[k] for s in shards]), one[k])
    seen = torch.cat([torch.cat(s) for s in shards])
    assert len(seen) == len(set(seen.tolist())) >= len(data) - 1


@pytest.mark.parametrize("stage, fraction", [(1, 1.0), (2, 1.0), (1, 0.5)])
def test_stage_cache_gives_identical_batches_and_decodes_once(mr, mem, stage, fraction):
    # the click / conversion stages fit the cache: their epochs replay packed rows instead of
    # decoding the whole table, with exactly the batches (rows, order, content) of the streamed path
    kw = dict(read_rows=300, window_rows=2000, interleave=3, prefetch=0)
    cached, streamed = ParquetTrainSource(mr, **kw), ParquetTrainSource(mr, cache_rows=0, **kw)
    n = cached.n_rows(stage, fraction=fraction, seed=2, salt=1)
    assert 0 < n <= 2000
    for epoch in (0, 1, 2):
        a = list(cached.batches(stage, 64, seed=2, epoch=epoch, fraction=fraction, salt=1))
        b = list(streamed.batches(stage, 64, seed=2, epoch=epoch, fraction=fraction, salt=1))
        assert [x.row.tolist() for x in a] == [x.row.tolist() for x in b]
        for x, y in zip(a, b):
            assert torch.equal(x.u, y.u) and torch.equal(x.i, y.i) and torch.equal(x.neg, y.neg)
            assert all(torch.equal(h, g) for h, g in zip(x.hists, y.hists))
            assert torch.equal(x.i, mem.i[x.row])  # and the content is the table's
    assert cached.stats.rows_read == len(mem)  # decoded once, for the first epoch only
    assert streamed.stats.rows_read == 3 * len(mem)
    assert cached.stats.cached_rows == n


def test_stage_cache_bounded_and_only_latest(mr, mem):
    src = ParquetTrainSource(mr, read_rows=300, window_rows=2000, prefetch=0)
    assert src.n_rows(0) > 2000
    list(src.batches(0, 128, seed=0, epoch=0))
    list(src.batches(0, 128, seed=0, epoch=1))
    assert src.stats.cached_rows == 0 and src.stats.rows_read == 2 * len(mem)  # too large: streamed
    list(src.batches(2, 32, seed=0, epoch=0))
    list(src.batches(1, 32, seed=0, epoch=0))
    assert src.stats.cached_rows == src.n_rows(1)  # the latest selection replaced the previous one
    assert src._cache is not None and src._cache[0][0] == 1
