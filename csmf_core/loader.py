"""Streaming training loader: batches of a stage's rows read from the model-ready train Parquet.

Why: `csmf_core.data.load_model_ready` loads the whole train table (R x (3 + L(N-1) + M) int64);
at tens of millions of events that no longer fits. This loader reads the `train/part-*.parquet`
files (docs/architecture.md section 2) in record batches of at most `read_rows` rows, packs each
into one (rows, C) int32 matrix with vectorised numpy (no per-row Python), keeps the rows with
`level >= stage`, shuffles them in a bounded window and hands out batches from a background
prefetch thread. Memory is bounded by `window_rows + interleave * read_rows` packed rows (about
4 * C bytes each: 220 bytes at L = 20, three objectives, M = 10) plus `prefetch` batches, plus
the stage cache: when a stage's selection has at most `cache_rows` rows (default `window_rows`),
its packed rows are kept and later epochs replay them instead of decoding the whole table again
(the click and conversion stages are a few percent of the rows, so without it every epoch of
theirs would decode 20-200 rows per row trained on). Batches are identical either way.

Shuffling is deterministic in (seed, epoch, stage, salt) and is an approximation of a full
permutation, by design (it never holds the table):

1. the row groups of every part are visited in a random order, `interleave` of them at a time;
   each read takes the next `read_rows` rows of a randomly chosen open row group;
2. rows go into a window; when it holds `window_rows` rows it is permuted, the first half
   (whole global batches) is emitted and the second half stays to mix with later reads;
3. at the end of the epoch the rest is permuted and emitted.

When the stage's rows fit in the window (the default window is 2^20 rows) an epoch is an exact
uniformly random permutation. Beyond that, two rows share a batch only if their row groups were
open at nearby times: rows of the same time range (prep writes parts in time order) are more
likely together than under a full permutation; smaller row groups and a larger window bring it
closer. Every row of the stage is emitted exactly once per epoch either way.

Sharding (`rank`, `world_size`, for torch.distributed): every rank runs the same deterministic
stream of global batches of `batch_size` rows and takes its contiguous 1/world share of each,
so ranks take equal numbers of steps (no rank waits on a collective the others never reach), the
union of the ranks' batches is the single-process global batch, and every row is seen by exactly
one rank. Each rank decodes the whole stream (Parquet decoding is a small share of a training
step) but converts and trains on its share only. A last global batch too small to give every rank
two rows (in-batch softmax) is merged into the one before it, so no row is dropped.

How to use (what `train_stage` does when `train.loader: parquet`):

    src = ParquetTrainSource("runs/.../model_ready")
    for batch in src.batches(stage=1, batch_size=512, seed=0, epoch=3):   # TrainRows, int64
        ...
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from csmf_core.prep import DAY_US
from csmf_core.rows import TrainRows

_SPLITMIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


@dataclass
class LoaderStats:
    """What the loader held at most (instrumentation for the bounded-memory tests and benchmarks)."""

    max_read_rows: int = 0  # largest record batch read from Parquet
    max_window_rows: int = 0  # largest packed window (rows) held at once
    max_open_readers: int = 0  # row groups open at once
    rows_read: int = 0  # rows decoded (all levels) since the source was made
    batches: int = 0  # batches handed to the consumer
    cached_rows: int = 0  # packed rows kept across epochs (the latest stage selection; see cache_rows)

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class _Group:
    path: Path
    index: int  # row group within the file
    rows: int
    first_row: int  # global row id of its first row (parts in meta order, row groups in file order)


@dataclass
class ParquetTrainSource:
    """Batches of the train rows of a model-ready dataset, streamed from its Parquet parts.

    read_rows: rows per Parquet read; window_rows: shuffle window (rows held, see module doc);
    interleave: row groups read concurrently; prefetch: batches queued by the background thread
    (0 = no thread, produce in the caller's thread); rank / world_size: this process's shard.
    """

    directory: str | Path
    read_rows: int = 65_536
    window_rows: int = 1 << 20
    interleave: int = 4
    prefetch: int = 4
    rank: int = 0
    world_size: int = 1
    use_threads: bool = False  # pyarrow decoding on its own thread pool: measured slower on 2 shared cores
    cache_rows: int | None = (
        None  # keep a stage's packed rows across epochs when <= this (None: window_rows; 0: never)
    )
    stats: LoaderStats = field(default_factory=LoaderStats)
    with_days: bool = False  # batches carry each row's UTC day (point-in-time item statistics)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        meta_path = self.directory / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: not a model-ready dataset (csmf_core.prep)")
        meta = json.loads(meta_path.read_text())
        self.objectives = [o["name"] for o in meta["objectives"]]
        self.hist_names = self.objectives[1:]
        self.seq_len, self.n_neg = int(meta["seq_len"]), int(meta["n_req_neg"])
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, world_size={self.world_size})")
        if self.read_rows < 1 or self.window_rows < 1 or self.interleave < 1 or self.prefetch < 0:
            raise ValueError("read_rows, window_rows and interleave must be >= 1, prefetch >= 0")
        self.groups: list[_Group] = []
        first = 0
        for part in meta["train_parts"]:
            path = self.directory / part
            md = pq.ParquetFile(path).metadata
            for g in range(md.num_row_groups):
                n = md.row_group(g).num_rows
                if n:
                    self.groups.append(_Group(path, g, n, first))
                first += n
        if first >= 2**31:
            raise ValueError(f"{self.directory}: {first} train rows; the loader's int32 row ids hold < 2^31")
        self.total_rows = first
        self.columns = ["u", "i", "level", *(f"hist_{o}" for o in self.hist_names), "neg"]
        L, M = self.seq_len, self.n_neg
        # packed int32 row layout: row id, u, i, level, hist_<o> (L each), neg (M)
        self.width = 4 + L * len(self.hist_names) + M
        self._levels: np.ndarray | None = None
        self._days: np.ndarray | None = None
        if self.with_days:
            self.days()  # read here, not first in the prefetch thread
        self._cache: tuple[tuple, list[list[np.ndarray]]] | None = None

    # ---- sizes -----------------------------------------------------------------------------------
    def _per_row(self, column: str, convert, dtype) -> np.ndarray:
        """`convert(column)` of every train row in row-id order, one column read per part file."""
        parts = [
            convert(pq.read_table(path, columns=[column])[column])
            for path in dict.fromkeys(g.path for g in self.groups)
        ]
        return np.concatenate(parts) if parts else np.zeros(0, dtype)

    def levels(self) -> np.ndarray:
        """(total_rows,) int8 `level` of every train row in row-id order (1 byte a row, read once)."""
        if self._levels is None:
            self._levels = self._per_row("level", lambda c: c.to_numpy().astype(np.int8), np.int8)
        return self._levels

    def days(self) -> np.ndarray:
        """(total_rows,) int32 UTC day number of every train row in row-id order (read once)."""
        if self._days is None:
            self._days = self._per_row(
                "ts",
                lambda c: np.floor_divide(c.cast(pa.int64()).to_numpy(), DAY_US).astype(np.int32),
                np.int32,
            )
        return self._days

    def n_rows(self, stage: int, *, fraction: float = 1.0, seed: int = 0, salt: int = 0) -> int:
        """Rows that are positives of `stage` (level >= stage), in the `fraction` subset if < 1."""
        keep = self.levels() >= stage
        if fraction < 1.0:
            keep &= _unit_hash(np.arange(self.total_rows), _subset_key(seed, stage, salt)) < fraction
        return int(keep.sum())

    @property
    def has_neg(self) -> bool:
        return self.n_neg > 0

    # ---- batches ---------------------------------------------------------------------------------
    def batches(
        self, stage: int, batch_size: int, *, seed: int, epoch: int, fraction: float = 1.0, salt: int = 0
    ) -> Iterator[TrainRows]:
        """This rank's share of every global batch of `batch_size` rows with level >= stage.

        fraction < 1 keeps a fixed pseudo-random subset of the stage's rows (the same for every
        epoch of (seed, stage, salt): accuracy recovery), about `fraction` of them.
        Batches are TrainRows with int64 tensors and `row` = global row ids.
        """
        if batch_size < 2 * self.world_size:
            raise ValueError(f"batch_size {batch_size} < 2 rows per rank x world_size {self.world_size}")
        gen = self._global_batches(stage, batch_size, seed, epoch, fraction, salt)
        if self.prefetch == 0:
            for g in gen:
                yield self._to_rows(g)
            return
        yield from _prefetched((self._to_rows(g) for g in gen), self.prefetch)

    def _to_rows(self, g: np.ndarray) -> TrainRows:
        n = len(g)
        mine = g[self.rank * n // self.world_size : (self.rank + 1) * n // self.world_size]
        t = torch.from_numpy(np.ascontiguousarray(mine)).long()
        L, H = self.seq_len, len(self.hist_names)
        c = lambda lo, hi: t[:, lo:hi].contiguous()  # noqa: E731 - column blocks, contiguous for gathers
        hists = [c(4 + k * L, 4 + (k + 1) * L) for k in range(H)]
        neg = c(4 + H * L, self.width) if self.n_neg else None
        self.stats.batches += 1
        row = c(0, 1)[:, 0]
        day = torch.from_numpy(self.days()[row.numpy()]).long() if self.with_days else None
        return TrainRows(c(1, 2)[:, 0], c(2, 3)[:, 0], t[:, 3].to(torch.int8), hists, neg, row=row, day=day)

    def _pack(
        self, rb: pa.RecordBatch, first_row: int, stage: int, keep_hash: np.uint64 | None, fraction: float
    ):
        """Record batch -> (rows, width) int32 of the rows with level >= stage (and in the subset)."""
        n = rb.num_rows
        level = rb.column("level").to_numpy()
        keep = level >= stage
        rows = np.arange(first_row, first_row + n, dtype=np.int64)
        if keep_hash is not None:
            keep &= _unit_hash(rows, keep_hash) < fraction
        sel = np.flatnonzero(keep)
        out = np.empty((len(sel), self.width), np.int32)
        if not len(sel):
            return out
        out[:, 0] = rows[sel]
        out[:, 1] = rb.column("u").to_numpy()[sel]
        out[:, 2] = rb.column("i").to_numpy()[sel]
        out[:, 3] = level[sel]
        col = 4
        for name, width in [*((f"hist_{o}", self.seq_len) for o in self.hist_names), ("neg", self.n_neg)]:
            arr = rb.column(name)
            values = arr.flatten().to_numpy(zero_copy_only=False)  # flatten honours slice offsets
            out[:, col : col + width] = values.reshape(n, width)[sel]
            col += width
        return out

    def _group_chunks(
        self, grp: _Group, stage: int, keep_hash: np.uint64 | None, fraction: float
    ) -> Iterator[np.ndarray]:
        """Packed chunks (possibly empty) of one row group, one per Parquet read of `read_rows`."""
        reader = pq.ParquetFile(grp.path).iter_batches(
            batch_size=self.read_rows,
            row_groups=[grp.index],
            columns=self.columns,
            use_threads=self.use_threads,
        )
        pos = grp.first_row
        for rb in reader:
            self.stats.max_read_rows = max(self.stats.max_read_rows, rb.num_rows)
            self.stats.rows_read += rb.num_rows
            yield self._pack(rb, pos, stage, keep_hash, fraction)
            pos += rb.num_rows

    def _stage_chunks(
        self, stage: int, keep_hash: np.uint64 | None, fraction: float, seed: int, salt: int
    ) -> list[list[np.ndarray]] | None:
        """Every row group's packed chunks for (stage, subset), kept across epochs, or None.

        Kept only when the selection has at most `cache_rows` rows (default: `window_rows`), and
        only the latest selection: later stages (click, conversion) are a few percent of the
        table, so their epochs replay these chunks instead of decoding the whole table again.
        The replay consumes the same random draws in the same order, so batches are identical
        with or without the cache.
        """
        limit = self.window_rows if self.cache_rows is None else self.cache_rows
        key = (stage, None if keep_hash is None else int(keep_hash), fraction)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        if limit <= 0 or self.n_rows(stage, fraction=fraction, seed=seed, salt=salt) > limit:
            return None
        self._cache = None  # drop the previous selection before decoding the next
        chunks = [list(self._group_chunks(g, stage, keep_hash, fraction)) for g in self.groups]
        self._cache = (key, chunks)
        self.stats.cached_rows = sum(len(c) for cs in chunks for c in cs)
        return chunks

    def _windows(self, stage: int, rng: np.random.Generator, fraction: float, salt: int, seed: int):
        """Packed chunks of the stage's rows, row groups in random order, `interleave` open at a time."""
        keep_hash = _subset_key(seed, stage, salt) if fraction < 1.0 else None
        cached = self._stage_chunks(stage, keep_hash, fraction, seed, salt)
        order = list(rng.permutation(len(self.groups)))
        open_: list[Iterator[np.ndarray]] = []
        while order or open_:
            while order and len(open_) < self.interleave:
                gi = int(order.pop())
                if cached is not None:
                    open_.append(iter(cached[gi]))
                else:
                    open_.append(self._group_chunks(self.groups[gi], stage, keep_hash, fraction))
                self.stats.max_open_readers = max(self.stats.max_open_readers, len(open_))
            k = int(rng.integers(len(open_)))
            chunk = next(open_[k], None)
            if chunk is None:
                open_.pop(k)
                continue
            if len(chunk):
                yield chunk

    def _global_batches(
        self, stage: int, batch_size: int, seed: int, epoch: int, fraction: float, salt: int
    ) -> Iterator[np.ndarray]:
        state = np.random.SeedSequence([seed, epoch, stage, salt]).generate_state(2, np.uint64)
        rng = np.random.default_rng(state)
        window = max(self.window_rows, 2 * batch_size)
        pending: list[np.ndarray] = []
        held = 0
        last: np.ndarray | None = None  # one batch of look-ahead, for merging a too-small tail

        def emit(buf: np.ndarray, n: int):
            nonlocal last
            for lo in range(0, n, batch_size):
                if last is not None:
                    yield last
                last = buf[lo : lo + batch_size]

        for chunk in self._windows(stage, rng, fraction, salt, seed):
            pending.append(chunk)
            held += len(chunk)
            self.stats.max_window_rows = max(self.stats.max_window_rows, held)
            if held >= window:
                buf = np.concatenate(pending)
                buf = buf[rng.permutation(len(buf))]
                n_out = (len(buf) // 2) // batch_size * batch_size
                yield from emit(buf, n_out)
                pending, held = [buf[n_out:]], len(buf) - n_out
        if held:
            buf = np.concatenate(pending)
            buf = buf[rng.permutation(len(buf))]
            tail = len(buf) % batch_size
            yield from emit(buf, len(buf) - tail)
            if tail:
                piece = buf[len(buf) - tail :]
                if tail < 2 * self.world_size and last is not None:
                    last = np.concatenate([last, piece])  # too small to split: merged, not dropped
                else:
                    if last is not None:
                        yield last
                    last = piece
        if last is not None:
            yield last


def _subset_key(seed: int, stage: int, salt: int) -> np.uint64:
    return np.uint64(np.random.SeedSequence([seed, stage, salt, 7]).generate_state(1, np.uint64)[0])


def _unit_hash(rows: np.ndarray, key: np.uint64) -> np.ndarray:
    """Row ids -> uniform [0, 1) floats (splitmix64 of id ^ key): a fixed pseudo-random subset."""
    with np.errstate(over="ignore"):
        z = rows.astype(np.uint64) ^ key
        z = z + _SPLITMIX[0]
        z = (z ^ (z >> np.uint64(30))) * _SPLITMIX[1]
        z = (z ^ (z >> np.uint64(27))) * _SPLITMIX[2]
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


_DONE = object()


def _prefetched(items: Iterator, depth: int) -> Iterator:
    """Run `items` in a daemon thread, `depth` ahead; errors re-raised here; stops when abandoned."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for x in items:
                while not stop.is_set():
                    try:
                        q.put(x, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            q.put(e)

    t = threading.Thread(target=work, name="csmf-loader", daemon=True)
    t.start()
    try:
        while True:
            x = q.get()
            if x is _DONE:
                return
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:
        stop.set()
        while t.is_alive():
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass
        t.join()


def steps_per_epoch(n_rows: int, batch_size: int, world_size: int = 1) -> int:
    """Global batches in an epoch of `n_rows` rows (a last batch with < 2 rows per rank is merged)."""
    if n_rows <= 0:
        return 0
    full, tail = divmod(n_rows, batch_size)
    return full + (1 if tail >= 2 * world_size or full == 0 else 0) if tail else full


__all__ = ["LoaderStats", "ParquetTrainSource", "steps_per_epoch"]
