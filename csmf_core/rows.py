"""Row types: feature tables by entity index, training rows, and where streamed batches come from.

The types every part of the core passes around: the trainer (`csmf_core.train`), the streaming
loader (`csmf_core.loader`), evaluation, validation, the serving bundle and the comparison methods.
Level with the trainer, so that reading rows never imports training.

`shuffled_batches` is the one batching of rows held in memory: CSMF's stages (`train_stage`,
`train.loader: memory`) and every comparison method draw their batches with it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from csmf_core.model import TowerInputs


@dataclass
class FeatureTables:
    """Feature rows by entity index (row 0 = unknown). cat: (N, n_cat) int64, num: (N, n_num) float32.

    item_stats (optional): (D, N_items, k) float32 point-in-time item statistics, row d = as of the
    start of UTC day ``stats_day0 + d`` (csmf_core/item_stats.py); they are appended to the item's
    numeric columns. A training row scores items with the statistics of its own day
    (``item_inputs(i, day)``, in-batch negatives included: ``csmf_core.train._batch_loss``);
    catalog encodings (evaluation, validation, the index) read those of ``stats_day``, set with
    ``as_of(day)``. With statistics and neither a row day nor ``stats_day``, ``item_inputs`` raises
    instead of guessing a day (a guess could show training rows the future).
    """

    users_cat: torch.Tensor
    users_num: torch.Tensor
    items_cat: torch.Tensor
    items_num: torch.Tensor
    item_stats: torch.Tensor | None = None
    stats_day0: int = 0
    stats_day: int | None = None

    def to(self, device) -> FeatureTables:
        return dataclasses.replace(
            self,
            **{k: getattr(self, k).to(device) for k in ("users_cat", "users_num", "items_cat", "items_num")},
            item_stats=None if self.item_stats is None else self.item_stats.to(device),
        )

    @property
    def stats_days(self) -> tuple[int, int]:
        """(first, last) UTC day number the statistics cover (empty range (0, -1) without them)."""
        if self.item_stats is None:
            return 0, -1
        return self.stats_day0, self.stats_day0 + self.item_stats.shape[0] - 1

    def _check_days(self, lo: int, hi: int) -> None:
        first, last = self.stats_days
        if lo < first or hi > last:  # a negative index would silently read the last (latest) row
            raise ValueError(f"item statistics cover days {first}..{last}, not days {lo}..{hi}")

    def as_of(self, day: int) -> FeatureTables:
        """The same tables with catalog encodings reading the statistics as of UTC day `day`."""
        if self.item_stats is None:
            return self
        self._check_days(int(day), int(day))
        return dataclasses.replace(self, stats_day=int(day))

    def user_inputs(self, u: torch.Tensor, hists: list[torch.Tensor]) -> TowerInputs:
        return TowerInputs(self.users_cat[u], self.users_num[u], hists)

    def item_inputs(self, i: torch.Tensor, day: torch.Tensor | None = None) -> TowerInputs:
        """Items `i` (B,); `day` (B,) UTC day numbers of the rows, only read with item statistics."""
        if self.item_stats is None:
            return TowerInputs(self.items_cat[i], self.items_num[i])
        if day is None:
            if self.stats_day is None:
                raise ValueError(
                    "these feature tables carry point-in-time item statistics: give each row's day "
                    "(item_inputs(i, day)) or choose the day of a catalog encoding with as_of(day)"
                )
            stats = self.item_stats[self.stats_day - self.stats_day0][i]
        else:
            self._check_days(int(day.min()), int(day.max()))
            stats = self.item_stats[day - self.stats_day0, i]
        return TowerInputs(self.items_cat[i], torch.cat([self.items_num[i], stats], 1))


@dataclass
class TrainRows:
    """Training events. u, i: (R,) int64; level: (R,) int8 deepest objective reached;
    hists: [(R, L) int64] behaviour sequences; neg: (R, M) int64 same-request negatives or None;
    row: (R,) int64 row ids in the train table, when known (streamed batches carry them);
    day: (R,) int64 UTC day number of each row, needed with point-in-time item statistics."""

    u: torch.Tensor
    i: torch.Tensor
    level: torch.Tensor
    hists: list[torch.Tensor]
    neg: torch.Tensor | None = None
    row: torch.Tensor | None = None
    day: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.u.numel())

    def select(self, idx: torch.Tensor) -> TrainRows:
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[idx]

        return TrainRows(
            self.u[idx],
            self.i[idx],
            self.level[idx],
            [h[idx] for h in self.hists],
            pick(self.neg),
            pick(self.row),
            pick(self.day),
        )

    def for_stage(self, stage: int) -> TrainRows:
        """Rows that are positives of `stage` (level >= stage)."""
        return self.select(torch.nonzero(self.level >= stage).flatten())


@runtime_checkable
class BatchSource(Protocol):
    """Where a stage's batches come from when the rows are not in memory (csmf_core.loader).

    `batches` yields this process's share (torch.distributed rank) of every global batch of
    `batch_size` rows with level >= stage, in an order fixed by (seed, epoch, stage, salt);
    `fraction` < 1 keeps a fixed subset of about that share (the same in every epoch).
    """

    has_neg: bool

    def n_rows(self, stage: int, *, fraction: float = 1.0, seed: int = 0, salt: int = 0) -> int: ...

    def batches(
        self, stage: int, batch_size: int, *, seed: int, epoch: int, fraction: float = 1.0, salt: int = 0
    ) -> Iterator[TrainRows]: ...


def shuffled_batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Shuffled index batches over range(n), one permutation drawn from `gen` per call (drawn when the
    first batch is asked for); a trailing batch of 1 row is dropped (it has no in-batch negative)."""
    perm = torch.randperm(n, generator=gen)
    for start in range(0, n, batch_size):
        idx = perm[start : start + batch_size]
        if idx.numel() >= 2:
            yield idx
