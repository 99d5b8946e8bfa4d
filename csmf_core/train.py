"""Stage training: one cascade stage (train or accuracy recovery) over in-memory rows or a batch source.

Rows come from a `TrainRows` (the whole table in memory, `train.loader: memory`) or a
`BatchSource` such as `csmf_core.loader.ParquetTrainSource` (streamed from the model-ready
Parquet, `train.loader: parquet`).

Under torch.distributed (`csmf_core.distributed`), every rank trains on its share of each global
batch of `train.batch_size` rows; initial parameters are broadcast from rank 0, the gradients of
the trained parameters (weighted by each rank's rows) are all-reduced in one flat buffer before
the stage's gradient mask is applied, so every rank takes the same Adam step and parameters stay
bit-identical across ranks; the divergence check uses the all-reduced loss, so every rank stops
together. In-batch negatives are each rank's own rows (B / world per rank), so a 2-rank step is
not numerically the 1-rank step of the same global batch (docs/distributed.md).

Freezing that survives Adam: each call builds a fresh optimizer over the parameters holding at
least one entry the stage owns, gradients are multiplied by the stage's 0/1 mask before every
step (so Adam's moments of frozen entries stay exactly zero and their update is exactly zero),
and weight decay is decoupled and applied to the stage's entries only. Frozen entries are
therefore bit-identical after the stage; `tests/unit/test_freeze.py` checks it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from csmf_core.config import CSMFConfig
from csmf_core.losses import aml_margins, sampled_softmax, upstream_scores
from csmf_core.masks import trainable_masks
from csmf_core.model import TowerInputs, TwoTower


class TrainingDiverged(RuntimeError):
    """A non-finite or exploding loss; the stage stops and nothing downstream may use it."""


@dataclass
class FeatureTables:
    """Feature rows by entity index (row 0 = unknown). cat: (N, n_cat) int64, num: (N, n_num) float32.

    item_stats (optional): (D, N_items, k) float32 point-in-time item statistics, row d = as of the
    start of UTC day ``stats_day0 + d`` (csmf_core/item_stats.py); they are appended to the item's
    numeric columns. A training row scores items with the statistics of its own day
    (``item_inputs(i, day)``, in-batch negatives included: ``_batch_loss``);
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


def dist_world() -> tuple[int, int]:
    """(rank, world_size) of the initialised torch.distributed group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass
class StageResult:
    stage: int
    phase: str  # "train" | "recover"
    rows: int
    epochs: int
    steps: int
    seconds: float
    samples_per_s: float
    losses: list[float] = field(default_factory=list)  # per step
    epoch_losses: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        return {
            "rows": self.rows,
            "epochs": self.epochs,
            "steps": self.steps,
            "seconds": round(self.seconds, 3),
            "samples_per_s": round(self.samples_per_s, 1),
            "final_loss": self.epoch_losses[-1] if self.epoch_losses else float("nan"),
        }


def item_log_q(counts: torch.Tensor) -> torch.Tensor:
    """(N,) log of each item's share of positives (items never seen get the smallest share)."""
    c = counts.double().clamp_min(0.5)
    return torch.log(c / c.sum()).float()


def adam(
    params: Iterable[torch.Tensor], lr: float, *, weight_decay: float = 0.0, decoupled: bool = False
) -> torch.optim.Optimizer:
    """Adam (AdamW when `decoupled`) using torch's fused kernel when the parameters allow it.

    Same update rule as the per-parameter loop; one kernel over every parameter instead of ~10
    small ops per parameter: 0.6 ms instead of 4.9 ms per step over this model's parameters on the
    2-core CPU measured (bench/bench_train_step.py). Entries whose gradient is always zero keep
    exactly their value either way (zero first moment -> zero update), which freezing relies on.
    """
    params = list(params)
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    fusable = all(
        p.dtype in (torch.float32, torch.float64) and p.device.type in ("cpu", "cuda") for p in params
    )
    if fusable:
        try:
            return cls(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay, fused=True)
        except (RuntimeError, TypeError):  # a torch build without the fused kernel
            pass
    return cls(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)


def _grad_masks(model: TwoTower, stage: int) -> dict[str, torch.Tensor | None]:
    """The parameters stage `stage` trains, each with its 0/1 gradient mask.

    A mask keeps the owner tensor's own shape (embedding columns: (d,) or (1, d), broadcast over
    the table's rows when multiplied) instead of a full-shape copy, and is None when the stage owns
    every entry of the parameter (nothing to mask). Parameters with no entry of the stage are left
    out: they get no optimizer state and no update at all.
    """
    if model.owners is None:
        raise RuntimeError("the model has no owner tensors: call model.set_owners(param_owners(...)) first")
    params = dict(model.named_parameters())
    masks: dict[str, torch.Tensor | None] = {}
    for name, m in trainable_masks(model.owners, stage).items():
        if not bool(m.any()):
            continue
        p = params[name]
        masks[name] = None if bool(m.all()) else m.to(p.device, p.dtype)
    return masks


def _memory_epochs(
    data: TrainRows, bs: int, gen: torch.Generator, rank: int, world: int
) -> Callable[[int], Iterator[TrainRows]]:
    """Per-epoch batches of in-memory rows: a fresh permutation per epoch, this rank's share of
    each global batch (world 1: exactly the original single-process order, last 1-row batch skipped)."""

    def epoch_batches(epoch: int) -> Iterator[TrainRows]:
        perm = torch.randperm(len(data), generator=gen)
        for start in range(0, len(data) - 1, bs):
            idx = perm[start : start + bs]
            n = idx.numel()
            if n // world < 2:  # every rank decides the same: no rank waits on a skipped step
                continue
            yield data.select(idx[rank * n // world : (rank + 1) * n // world])

    return epoch_batches


def _broadcast_params(model: TwoTower) -> None:
    import torch.distributed as dist

    with torch.no_grad():
        for p in [*model.parameters(), *model.buffers()]:
            dist.broadcast(p.data, src=0)


def _allreduce(params: list[torch.Tensor], loss: float, n: int) -> tuple[float, int]:
    """Sum over ranks of (grad * n_rank, loss * n_rank, n_rank) in one flat buffer; grads become
    the row-weighted mean gradient. Returns (row-weighted mean loss, global rows)."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat(
        [g.reshape(-1) * n for g in grads]
        + [torch.tensor([loss * n, n], dtype=grads[0].dtype, device=grads[0].device)]
    )
    dist.all_reduce(flat)
    total_n = float(flat[-1])
    flat /= total_n
    offset = 0
    for p, g in zip(params, grads):
        k = g.numel()
        p.grad = flat[offset : offset + k].view_as(g).clone()
        offset += k
    return float(flat[-2]), int(round(total_n))


@contextlib.contextmanager
def deterministic_kernels(enabled: bool) -> Iterator[None]:
    """Run the block with torch's deterministic kernels (restoring the previous setting after).

    Measured: on this CPU build with 2 threads, two identical cascades differed by up to 0.12 in a
    weight without it (multi-threaded scatter/index-add reductions), and were bit-identical with it,
    at no measurable cost. warn_only: an op without a deterministic kernel warns instead of failing.
    On CUDA, cuBLAS also needs CUBLAS_WORKSPACE_CONFIG (set here if absent, before CUDA starts).
    """
    if not enabled:
        yield
        return
    prev, prev_warn = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def train_stage(
    model: TwoTower,
    tables: FeatureTables,
    rows: TrainRows | BatchSource,
    stage: int,
    cfg: CSMFConfig,
    *,
    phase: str = "train",
    log_q: torch.Tensor | None = None,
    output_owners: torch.Tensor | None = None,
    on_step: Callable[[int, float], None] | None = None,
    stage_name: str | None = None,
    on_epoch: Callable[[int], None] | None = None,
) -> StageResult:
    """Train the entries owned by `stage` on rows with level >= stage.

    rows: the train rows in memory (TrainRows) or a BatchSource streaming them (csmf_core.loader).
    phase "train" runs cfg.epochs_for(stage) epochs at train.lr; "recover" runs
    recover.epochs on a recover.fraction subset at train.lr * recover.lr_scale.
    log_q: (N_items,) log sampling probability per item (None = no correction).
    output_owners: (D,) owner of each output dimension (needed for AML when stage >= 1).
    on_epoch(epoch): called after each epoch (1-based), e.g. to score and keep the best epoch.
    Under torch.distributed every rank calls this with the same arguments (module docstring).
    Raises TrainingDiverged on a non-finite or exploding loss.
    """
    name = stage_name or f"stage {stage}"
    device = next(model.parameters()).device
    rank, world = dist_world()
    if phase not in ("train", "recover"):
        raise ValueError(f"phase must be 'train' or 'recover', got {phase!r}")
    recover = phase == "recover"
    lr, epochs = cfg.train.lr, cfg.epochs_for(stage)
    if recover:
        lr, epochs = cfg.train.lr * cfg.recover.lr_scale, cfg.recover.epochs
    bs_global = cfg.train.batch_size
    if isinstance(rows, TrainRows):
        gen = torch.Generator().manual_seed(cfg.train.seed * 1009 + stage * 31 + recover)
        data = rows.for_stage(stage)
        if recover:
            n = max(2, int(math.ceil(len(data) * cfg.recover.fraction)))
            data = data.select(torch.randperm(len(data), generator=gen)[:n])
        n_rows, has_neg = len(data), data.neg is not None
        bs_global = min(bs_global, n_rows)
        epoch_batches = _memory_epochs(data, bs_global, gen, rank, world)
    else:
        source = rows
        frac = cfg.recover.fraction if recover else 1.0
        n_rows = source.n_rows(stage, fraction=frac, seed=cfg.train.seed, salt=int(recover))
        has_neg = source.has_neg
        bs_global = max(2 * world, min(bs_global, n_rows))

        def epoch_batches(epoch: int) -> Iterator[TrainRows]:
            return source.batches(
                stage, bs_global, seed=cfg.train.seed, epoch=epoch, fraction=frac, salt=int(recover)
            )

    if n_rows < 2 * world:
        raise ValueError(
            f"{name}: {n_rows} positive rows; a sampled softmax needs at least 2 per process ({world})"
        )
    use_aml = cfg.loss.aml and stage >= 1
    if use_aml and output_owners is None:
        raise ValueError("AML needs output_owners (the owner of each output dimension)")
    use_neg = has_neg and (
        cfg.loss.request_negatives == "all" or (cfg.loss.request_negatives == "first" and stage == 0)
    )
    masks = _grad_masks(model, stage)
    params = dict(model.named_parameters())
    trained = [params[k] for k in masks]
    if world > 1:
        _broadcast_params(model)
    opt = adam(trained, lr)
    wd = cfg.train.weight_decay
    out_owners = output_owners.to(device) if output_owners is not None else None
    log_q = log_q.to(device) if (log_q is not None and cfg.loss.logq) else None
    result = StageResult(stage, phase, n_rows, epochs, 0, 0.0, 0.0)
    model.train()
    t0 = time.perf_counter()
    seen = 0
    with deterministic_kernels(cfg.train.deterministic):
        for epoch in range(epochs):
            total, count = 0.0, 0
            for b in epoch_batches(epoch):
                loss = _batch_loss(model, tables, b, stage, cfg, device, use_neg, use_aml, out_owners, log_q)
                value, n_b = float(loss.detach()), len(b)
                if world == 1:
                    _check_loss(value, name, phase, epoch, result.steps, lr, cfg)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if world > 1:
                    value, n_b = _allreduce(trained, value, n_b)
                    _check_loss(value, name, phase, epoch, result.steps, lr, cfg)
                with torch.no_grad():
                    for k, m in masks.items():
                        if m is not None and params[k].grad is not None:
                            params[k].grad.mul_(m)
                    if cfg.train.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(trained, cfg.train.grad_clip)
                opt.step()
                if wd > 0:
                    with torch.no_grad():
                        for k, m in masks.items():
                            p = params[k]
                            p.sub_(p if m is None else p * m, alpha=lr * wd)
                result.steps += 1
                result.losses.append(value)
                total += value * n_b
                count += n_b
                if on_step is not None:
                    on_step(result.steps, value)
            seen += count
            result.epoch_losses.append(total / max(count, 1))
            if on_epoch is not None:  # e.g. csmf_core.validation.EpochSelector (not timed as training)
                t_cb = time.perf_counter()
                on_epoch(epoch + 1)
                model.train()
                t0 += time.perf_counter() - t_cb
    result.seconds = time.perf_counter() - t0
    result.samples_per_s = seen / max(result.seconds, 1e-9)
    model.eval()
    return result


def _check_loss(
    value: float, name: str, phase: str, epoch: int, step: int, lr: float, cfg: CSMFConfig
) -> None:
    if not math.isfinite(value) or value > cfg.train.max_loss:
        raise TrainingDiverged(
            f"{name} ({phase}): loss {value} at epoch {epoch + 1}, step {step + 1}; "
            f"nothing from this stage is kept. Lower train.lr (now {lr:g}) or raise "
            f"loss.temperature (now {cfg.loss.temperature:g})."
        )


def _batch_loss(
    model: TwoTower,
    tables: FeatureTables,
    b: TrainRows,
    stage: int,
    cfg: CSMFConfig,
    device,
    use_neg: bool,
    use_aml: bool,
    out_owners: torch.Tensor | None,
    log_q: torch.Tensor | None,
) -> torch.Tensor:
    """The stage's sampled-softmax loss on one batch (in-batch + optional request negatives, AML)."""
    u_in = tables.user_inputs(b.u.to(device), [h.to(device) for h in b.hists])
    it = b.i.to(device)
    uvec = model.user_vectors(u_in, stage)
    extra_items = b.neg.to(device) if use_neg else None
    # one item-tower pass over the distinct items of the batch (positives and request
    # negatives overlap heavily), then gather: the tower cost scales with distinct items
    wanted = it if extra_items is None else torch.cat([it, extra_items.flatten()])
    uniq, inv = torch.unique(wanted, return_inverse=True)
    B = it.numel()
    if tables.item_stats is None:
        all_vec = model.item_vectors(tables.item_inputs(uniq), stage)
        ivec = all_vec[inv[:B]]

        def pair_scores(cols: torch.Tensor | None = None) -> torch.Tensor:
            """(B, B): row r's user against in-batch item j (on `cols` output dims when given)."""
            return uvec @ ivec.T if cols is None else uvec[:, cols] @ ivec[:, cols].T

        def neg_vectors() -> torch.Tensor:
            return all_vec[inv[B:]].view(B, extra_items.shape[1], -1)

    else:
        # An item's inputs depend on the day. Every row scores the batch's items *as of its own day*,
        # as the catalog is encoded at serving: scoring another row's positive with that row's day
        # would let the model match users to items by day (the statistics and the behaviour
        # sequences both tell the day) instead of by preference. One item-tower pass over (distinct
        # day of the batch) x (distinct item); rows are scored day by day.
        if b.day is None:
            raise ValueError("the feature tables carry item statistics but the batch has no row days")
        days, dinv = torch.unique(b.day.to(device), return_inverse=True)
        nd, nu = days.numel(), uniq.numel()
        day_vec = model.item_vectors(
            tables.item_inputs(uniq.repeat(nd), days.repeat_interleave(nu)), stage
        ).view(nd, nu, -1)
        order = torch.argsort(dinv, stable=True)
        groups = torch.split(order, torch.bincount(dinv, minlength=nd).tolist())
        back = torch.argsort(order)
        inb = inv[:B]

        def pair_scores(cols: torch.Tensor | None = None) -> torch.Tensor:
            blocks = []
            for k, rows in enumerate(groups):
                u, v = uvec[rows], day_vec[k, inb]
                blocks.append(u @ v.T if cols is None else u[:, cols] @ v[:, cols].T)
            return torch.cat(blocks)[back]

        def neg_vectors() -> torch.Tensor:
            return day_vec[dinv[:, None], inv[B:].view(B, extra_items.shape[1])]

    scores = pair_scores()
    margins = None
    up = None
    if use_aml:
        with torch.no_grad():
            segs = [pair_scores(out_owners == r) for r in range(stage)]
            up = upstream_scores(segs, stage, cfg.loss.upstream)
            margins = aml_margins(up.diagonal(), up, cfg.loss.sigma, cfg.loss.eta)
    extra = extra_margins = None
    if use_neg:
        nvec = neg_vectors()
        extra = torch.einsum("bd,bmd->bm", uvec, nvec)
        if use_aml:
            with torch.no_grad():
                segs = [
                    torch.einsum("bd,bmd->bm", uvec[:, out_owners == r], nvec[:, :, out_owners == r])
                    for r in range(stage)
                ]
                up_n = upstream_scores(segs, stage, cfg.loss.upstream)
                extra_margins = aml_margins(up.diagonal(), up_n, cfg.loss.sigma, cfg.loss.eta)
    terms = sampled_softmax(
        scores,
        it,
        temperature=cfg.loss.temperature,
        log_q=None if log_q is None else log_q[it],
        margins=margins,
        extra_scores=extra,
        extra_items=extra_items,
        extra_margins=extra_margins,
    )
    return terms.loss
