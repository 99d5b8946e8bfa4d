"""Sharded prep: the model-ready output of ``csmf_core.prep.prepare``, built by shards of users.

    plan_file = vocab_pass(dataset, work, out_dir, train_dates=..., eval_dates=...)   # once
    shard = shard_pass(plan_file, k, n_shards, work)                                # k = 0 .. n-1, anywhere
    summary = reduce_pass(plan_file, [shard, ...], out_dir)                         # once

1. **Vocabulary pass** (global): the sorted user and item vocabularies (feature tables + events),
   the encoded ``users.parquet`` / ``items.parquet``, the dates; written as one pickle under ``work``.
   (A request is one user's request id, in prep as here: an id several users share is one request
   per user, so request negatives never need another shard's rows.)
2. **Shard pass** (per shard, independent): the events whose ``user_id`` hashes to shard ``k``
   (polars' ``hash`` with a fixed seed: stable for a given polars version, which every worker shares):
   training rows with their point-in-time histories and request negatives (both are per user, so
   a shard needs no other shard's rows), evaluation rows and per-item positive counts. Train rows go
   to an uncompressed Arrow IPC file (memory-mapped by the reduction), sorted as prep sorts them.
3. **Reduction**: per-item counts summed (popularity), evaluation rows concatenated and sorted by
   user, train rows merged by (ts, user, item) with a stable sort over the shards' keys (ties can
   only come from one user, hence one shard, in source order), then written in parts of
   ``part_rows`` by gathering from the memory-mapped shards. It holds 16 bytes per train row of keys
   (and the order), never the wide columns of more than one part.

The output equals ``prepare``'s file for file (tests/unit/test_prep_sharded.py). Nothing here knows
about Prefect or Dask: flows/ingest_dask.py runs the three passes as Prefect tasks on a Dask cluster.
"""

from __future__ import annotations

import os
import pickle
import resource
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from csmf_core.fsutil import commit_dir, fresh_temp_dir
from csmf_core.idmap import BaseMaps
from csmf_core.prep import (
    PrepSummary,
    build_rows,
    plan,
    read_feature_tables,
    row_queries,
    summary,
    vocab_queries,
    write_outputs,
)

SHARD_SEED = 19_0001  # polars hash seed of the user -> shard map


def n_shards(ingest) -> int:
    """The shard count of an `ingest` config section: `ingest.shards`, or 2 per worker when 0."""
    return ingest.shards or 2 * ingest.workers


def shard_of(n_shards: int) -> pl.Expr:
    """The shard of each event's user: hash(user_id) mod n_shards."""
    return (pl.col("user_id").hash(seed=SHARD_SEED) % n_shards).cast(pl.Int64)


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if os.uname().sysname == "Darwin" else 1024)


def vocab_pass(
    dataset_dir: str | Path,
    work_dir: str | Path,
    out_dir: str | Path,
    *,
    base_dir: str | Path | None = None,
    **plan_kw,
) -> Path:
    """Global vocabularies, id maps and encoded feature tables -> ``work_dir/plan.pkl`` (its path).
    ``plan_kw``: ``prep.plan``'s keywords (dates, seq_len, n_req_neg, overwrite, id_buckets,
    evict_after_days); ``base_dir``: the features of the model a run starts from (csmf_core/idmap.py,
    ``BaseMaps.read``). The id maps are global, like the vocabulary."""
    p = plan(dataset_dir, out_dir, base=BaseMaps.read(base_dir) if base_dir is not None else None, **plan_kw)
    ev = p.events()
    users_df, items_df = read_feature_tables(p)
    uids, iids = pl.collect_all(vocab_queries(ev, users_df, items_df), engine="streaming")
    p.set_vocab(uids, iids, users_df, items_df)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    path = work / "plan.pkl"
    tmp = work / "plan.pkl.tmp"
    with open(tmp, "wb") as f:
        pickle.dump(p, f, protocol=pickle.HIGHEST_PROTOCOL)
    tmp.replace(path)
    return path


def _load(plan_file: str | Path):
    with open(plan_file, "rb") as f:  # written by vocab_pass of this run (the run's work dir)
        return pickle.load(f)


def shard_pass(
    plan_file: str | Path, k: int, n_shards: int, work_dir: str | Path, slice_rows: int = 1 << 18
) -> dict:
    """The rows of the users of shard ``k`` -> files under ``work_dir``; returns their paths and counts."""
    if not 0 <= k < n_shards:
        raise ValueError(f"shard {k} is not in [0, {n_shards})")
    p = _load(plan_file)
    ev = p.events().filter(shard_of(n_shards) == k)
    req, queries = row_queries(ev, p.cols, p.n_req_neg)
    frames = pl.collect_all(queries, engine="streaming")
    rows = build_rows(p, req, frames)
    del frames
    level, n_train = rows.level, len(rows.t_u)
    work = Path(work_dir)
    train_path = work / f"shard-{k:05d}.arrow"
    first = rows.train_slice(p, slice(0, min(slice_rows, n_train)), level)
    with pa.OSFile(str(train_path), "wb") as sink, pa.ipc.new_file(sink, first.schema) as writer:
        writer.write_table(first)
        for lo in range(slice_rows, n_train, slice_rows):
            writer.write_table(rows.train_slice(p, slice(lo, lo + slice_rows), level))
    eval_path = work / f"eval-{k:05d}.parquet"
    pq.write_table(rows.eval_table(p), eval_path)
    counts_path = work / f"counts-{k:05d}.npy"
    np.save(counts_path, rows.counts(p))
    by_level = np.bincount(level, minlength=len(p.names))[: len(p.names)].tolist()
    return {
        "shard": k,
        "train": str(train_path),
        "eval": str(eval_path),
        "counts": str(counts_path),
        "n_train": n_train,
        "by_level": by_level,
        "pid": os.getpid(),
        "peak_rss": peak_rss_bytes(),
    }


def reduce_pass(
    plan_file: str | Path,
    shards: list[dict],
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    part_rows: int = 1_000_000,
) -> PrepSummary:
    """Merge the shards' outputs into the model-ready dataset at ``out_dir`` (module docstring, 3)."""
    p = _load(plan_file)
    shards = sorted(shards, key=lambda s: s["shard"])
    if [s["shard"] for s in shards] != list(range(len(shards))):
        raise ValueError(
            f"reduce needs every shard 0..{len(shards) - 1} once, got {[s['shard'] for s in shards]}"
        )
    out_dir = Path(out_dir)
    tables = [pa.ipc.open_file(pa.memory_map(s["train"])).read_all() for s in shards]
    train = pa.concat_tables(tables)  # zero-copy: chunks of the memory-mapped files
    n_train = train.num_rows
    keys = [
        np.concatenate([t[c].to_numpy() for t in tables]) if n_train else np.zeros(0)
        for c in ("i", "u", "ts")
    ]
    order = np.lexsort(keys)  # stable: (ts, u, i), ties in shard order = source order
    del keys
    evals = pa.concat_tables([pq.read_table(s["eval"]) for s in shards]).sort_by("u")
    counts = sum(np.load(s["counts"]) for s in shards)
    by_level = np.sum([s["by_level"] for s in shards], axis=0).astype(int).tolist()
    tmp = fresh_temp_dir(out_dir, overwrite, marker="meta.json")
    try:
        batches = [b for t in tables for b in t.to_batches()]  # concatenation order
        starts = np.cumsum([0] + [b.num_rows for b in batches])
        parts = (
            _gather(batches, starts, order[lo : lo + part_rows], tables[0].schema)
            for lo in range(0, max(n_train, 1), part_rows)
        )
        meta = write_outputs(p, tmp, parts, evals.combine_chunks(), counts, by_level, n_train)
        commit_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary(p, out_dir, meta)


def _gather(
    batches: list[pa.RecordBatch], starts: np.ndarray, idx: np.ndarray, schema: pa.Schema
) -> pa.Table:
    """Rows ``idx`` (positions in the concatenation of ``batches``) in that order, taking from each
    batch alone: Table.take would concatenate every memory-mapped chunk of a column first."""
    bid = np.searchsorted(starts, idx, side="right") - 1
    g = np.argsort(bid, kind="stable")
    sb, si = bid[g], idx[g]
    bounds = np.searchsorted(sb, np.unique(sb)), np.searchsorted(sb, np.unique(sb), side="right")
    pieces = [batches[sb[lo]].take(pa.array(si[lo:hi] - starts[sb[lo]])) for lo, hi in zip(*bounds)]
    grouped = pa.Table.from_batches(pieces, schema).combine_chunks()
    inv = np.empty_like(g)
    inv[g] = np.arange(len(g))
    return grouped.take(pa.array(inv))


def prepare_sharded(
    dataset_dir: str | Path,
    out_dir: str | Path,
    *,
    n_shards: int,
    work_dir: str | Path,
    part_rows: int = 1_000_000,
    **plan_kw,
) -> PrepSummary:
    """The three passes one after the other in this process (what the Dask flow distributes);
    ``plan_kw``: ``vocab_pass``'s keywords."""
    plan_file = vocab_pass(dataset_dir, work_dir, out_dir, **plan_kw)
    shards = [shard_pass(plan_file, k, n_shards, work_dir) for k in range(n_shards)]
    return reduce_pass(
        plan_file, shards, out_dir, overwrite=plan_kw.get("overwrite", False), part_rows=part_rows
    )
