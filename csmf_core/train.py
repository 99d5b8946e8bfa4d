"""Stage training: one cascade stage (train or accuracy recovery) over in-memory rows or a batch source.

Rows come from a `TrainRows` (the whole table in memory, `train.loader: memory`) or a
`BatchSource` such as `csmf_core.loader.ParquetTrainSource` (streamed from the model-ready
Parquet, `train.loader: parquet`); both types live in `csmf_core.rows`. The optimiser step, its
log and the divergence check are every method's (`csmf_core.optim`); this module holds what is
CSMF's own: which entries a stage trains (its gradient masks), its batches and its loss.

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
and weight decay is decoupled and applied to the stage's entries only (`csmf_core.optim`). Frozen
entries are therefore bit-identical after the stage; `tests/unit/test_freeze_and_fusion.py` checks it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator

import torch

from csmf_core.config import CSMFConfig
from csmf_core.losses import aml_bias, sampled_softmax
from csmf_core.masks import trainable_masks
from csmf_core.model import TwoTower
from csmf_core.optim import Optimiser, TrainLog, embedding_rule, run_epochs
from csmf_core.rows import BatchSource, FeatureTables, TrainRows, shuffled_batches


def dist_world() -> tuple[int, int]:
    """(rank, world_size) of the initialised torch.distributed group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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


# train_subnet is used when it needs at most this share of the masked towers' multiply-adds
# (TwoTower.subnet_cost). Measured (2-core EPYC, 2026-12-04, user tower forward + backward at B = 512,
# `small` after both prunings): stage 1 (cost 0.12) 1.63 ms instead of 2.51 ms; stage 2 (cost 0.54)
# 2.45 ms instead of 2.35 ms: the split matmuls' fixed costs.
SUBNET_MAX_COST = 0.4

MIN_STAGE_ROWS = 2  # per process: a sampled softmax with in-batch negatives needs a second row


def stage_positives(rows: TrainRows | BatchSource, stage: int) -> int:
    """Rows a train step of `stage` trains on: those whose deepest true objective is >= stage."""
    return int((rows.level >= stage).sum()) if isinstance(rows, TrainRows) else rows.n_rows(stage)


def stage_rows(rows: TrainRows, stage: int, fraction: float | None, gen: torch.Generator) -> TrainRows:
    """The in-memory rows stage `stage` trains on: those with level >= stage, and for accuracy
    recovery (`fraction` given) a random subset of ceil(fraction * n) of them (at least 2) drawn
    with one `randperm` from `gen`.

    The same rows, in the same order and with the same draw from `gen`, as
    `rows.for_stage(stage).select(randperm(...)[:n])`, but indexed into `rows` once: the table is
    copied at most once (not at all for a stage every row reaches, e.g. the first stage's training,
    which trains on the rows as given; the batches are copies of them either way).
    """
    keep = rows.level >= stage
    idx = None if bool(keep.all()) else torch.nonzero(keep).flatten()
    if fraction is not None:
        total = len(rows) if idx is None else idx.numel()
        n = max(2, int(math.ceil(total * fraction)))
        pick = torch.randperm(total, generator=gen)[:n]
        idx = pick if idx is None else idx[pick]
    return rows if idx is None else rows.select(idx)


def _memory_epochs(
    data: TrainRows, bs: int, gen: torch.Generator, rank: int, world: int
) -> Callable[[int], Iterator[TrainRows]]:
    """Per-epoch batches of in-memory rows: a fresh permutation per epoch, this rank's share of
    each global batch (world 1: exactly the original single-process order, last 1-row batch skipped)."""

    def epoch_batches(epoch: int) -> Iterator[TrainRows]:
        for idx in shuffled_batches(len(data), bs, gen):
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
    on_epoch: Callable[[int], bool | None] | None = None,
) -> TrainLog:
    """Train the entries owned by `stage` on rows with level >= stage.

    rows: the train rows in memory (TrainRows) or a BatchSource streaming them (csmf_core.loader).
    phase "train" runs cfg.epochs_for(stage) epochs at train.lr; "recover" runs
    recover.epochs on a recover.fraction subset at train.lr * recover.lr_scale.
    log_q: (N_items,) log sampling probability per item (None = no correction).
    output_owners: (D,) owner of each output dimension (needed for AML when stage >= 1).
    on_epoch(epoch): called after each epoch (1-based), e.g. to score and keep the best epoch; a true
    return ends the stage there (early stopping).
    Under torch.distributed every rank calls this with the same arguments (module docstring).
    Returns the stage's TrainLog, named "<stage_name> (<phase>)".
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
        data = stage_rows(rows, stage, cfg.recover.fraction if recover else None, gen)
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

    if n_rows < MIN_STAGE_ROWS * world:
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
    if world > 1:
        _broadcast_params(model)
    # embedding tables: sparse row gradients and a row-wise update (train.embedding_optimizer), or
    # fused Adam over the whole table like every other parameter ("dense")
    tables_ = model.embedding_tables()
    rule, _ = embedding_rule(
        cfg.train.embedding_optimizer, sum(e.weight.numel() for e in tables_.values()), world
    )
    if rule != cfg.train.embedding_optimizer:  # "auto", resolved on this model's tables
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, embedding_optimizer=rule))
    sparse = rule != "dense"
    log = TrainLog(f"{name} ({phase})", n_rows, epochs, embedding_rule=rule)
    opt = Optimiser(
        [params[k] for k in masks],
        lr,
        cfg,
        log,
        masks=list(masks.values()),
        row_wise=[sparse and k in tables_ for k in masks],
        names=list(masks),
        embedding=[k in tables_ for k in masks],
        reduce=_allreduce if world > 1 else None,
        on_step=on_step,
    )
    out = None if output_owners is None else output_owners.to(device)
    seg_cols = None if out is None else segment_columns(out, stage)
    split = None
    if out is not None and cfg.train.split_scores:
        # the split drops the score over dims it believes later stages own: a stale output_owners
        # would change the loss (with AML off nothing else reads it), so check it against the model
        bias = model.owners[f"{model.output_layers()[0]}.bias"]
        if not torch.equal(bias.to(device).long(), out.long()):
            raise ValueError(
                f"{name}: output_owners {output_owners.tolist()} differ from the model's output owners "
                f"{bias.tolist()}"
            )
        split = stage_columns(out, stage)
    log_q = log_q.to(device) if (log_q is not None and cfg.loss.logq) else None

    def after_epoch(epoch: int) -> bool | None:  # e.g. csmf_core.validation.EpochSelector
        stop = on_epoch(epoch)
        model.train()
        return stop

    model.train()
    model.sparse_embeddings(sparse)
    # removed edges held at zero need no mode mask in the forward: the gradient masks above keep
    # them out of every update (TwoTower.zero_held_unmasked); masks of later-stage entries stay
    try:
        # the stage's own sub-network alone under autograd (TwoTower.train_subnet) where it saves
        # most of the towers' work: measured faster there, slower at 0.54 (its split matmuls)
        use_subnet = split is not None and model.subnet_cost(stage) <= SUBNET_MAX_COST
        subnet = model.train_subnet(stage) if use_subnet else contextlib.nullcontext()
        with model.zero_held_unmasked(stage), subnet:
            log = run_epochs(
                opt,
                epochs,
                lambda epoch: ((len(b), b) for b in epoch_batches(epoch)),
                lambda b: _batch_loss(
                    model, tables, b, stage, cfg, device, use_neg, use_aml, seg_cols, log_q, split
                ),
                on_epoch=None if on_epoch is None else after_epoch,
            )
    finally:
        model.sparse_embeddings(False)  # other trainers of this model expect dense gradients
    model.eval()
    return log


def stage_columns(output_owners: torch.Tensor, stage: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(own, upper): the output dims stage `stage` owns and those of the stages before it, as index
    vectors; None when the stage owns every output dim (stage 0 before its pruning: nothing to split).

    Mode `stage`'s score of a pair is the score on the upper dims plus the score on its own dims (the
    later stages' dims are zero in this mode). The upper dims are outputs of units owned by earlier
    stages only (an edge a -> b exists only if owner(a) <= owner(b)), every one of them frozen while
    `stage` trains: their part of the score is a constant of the batch, and its gradient reaches only
    frozen entries, whose updates the stage's gradient masks drop. So the step computes that part
    without autograd (AML has it already: the upstream mode's score) and differentiates the matmul
    over the stage's own dims only: the same loss and the same update of every trained entry up to
    float rounding (the dims are summed in another order), with the score matmul's backward over
    `own` dims instead of all (`train.split_scores`, docs/performance.md)."""
    own = torch.nonzero(output_owners == stage).flatten()
    upper = torch.nonzero(output_owners < stage).flatten()
    if own.numel() == output_owners.numel():
        return None
    return own, (upper if upper.numel() else None)


def segment_columns(output_owners: torch.Tensor, stage: int) -> list[torch.Tensor]:
    """The output dims of each stage before `stage` (its vector segment) as index vectors, found once
    per stage: `index_select` on them is the same copy as a boolean column mask, without a nonzero()
    per step and segment."""
    return [torch.nonzero(output_owners == r).flatten() for r in range(stage)]


def _batch_loss(
    model: TwoTower,
    tables: FeatureTables,
    b: TrainRows,
    stage: int,
    cfg: CSMFConfig,
    device,
    use_neg: bool,
    use_aml: bool,
    seg_cols: list[torch.Tensor] | None,
    log_q: torch.Tensor | None,
    split: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """The stage's sampled-softmax loss on one batch (in-batch + optional request negatives, AML).
    split: `stage_columns(...)`, or None for one differentiated score matmul over every output dim."""
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

        def pair_scores(
            cols: torch.Tensor | None = None, plus: torch.Tensor | None = None, scale: float = 1.0
        ) -> torch.Tensor:
            """(B, B): row r's user against in-batch item j (on output dims `cols` when given), times
            `scale`, plus the (B, B) matrix `plus` when given (one fused addmm into `plus`, a no-grad
            temporary of the caller's)."""
            u, v = (uvec, ivec) if cols is None else (uvec.index_select(1, cols), ivec.index_select(1, cols))
            if plus is not None:
                return plus.addmm_(u, v.T, alpha=scale)
            return u @ v.T if scale == 1.0 else (u @ v.T).mul_(scale)

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

        def pair_scores(
            cols: torch.Tensor | None = None, plus: torch.Tensor | None = None, scale: float = 1.0
        ) -> torch.Tensor:
            blocks = []
            for k, rows in enumerate(groups):
                u, v = uvec[rows], day_vec[k, inb]
                blocks.append(
                    u @ v.T if cols is None else u.index_select(1, cols) @ v.index_select(1, cols).T
                )
            out = torch.cat(blocks)[back]
            if scale != 1.0:
                out.mul_(scale)
            return out if plus is None else out.add_(plus)

        def neg_vectors() -> torch.Tensor:
            return day_vec[dinv[:, None], inv[B:].view(B, extra_items.shape[1])]

    extra = nvec = margin_bias = extra_margins = upper_scores = None
    if use_neg:
        nvec = neg_vectors()
        extra = torch.einsum("bd,bmd->bm", uvec, nvec)
    if use_aml:
        with torch.no_grad():
            segs = [pair_scores(cols) for cols in seg_cols]
            segs_n = None
            if nvec is not None:
                segs_n = [
                    torch.einsum("bd,bmd->bm", uvec.index_select(1, cols), nvec.index_select(2, cols))
                    for cols in seg_cols
                ]
            margin_bias, extra_margins, *rest = aml_bias(
                segs, stage, cfg.loss, segs_n, mode_score=split is not None, exact_branches=split is not None
            )
            upper_scores = rest[0] if rest else None
    if split is None:
        scores = pair_scores()
    else:
        own, upper = split
        if upper is not None and upper_scores is None:  # no AML: the upper dims' score on its own
            with torch.no_grad():
                upper_scores = pair_scores(upper)

        def scores(bias: torch.Tensor | None, scale: float) -> torch.Tensor:
            """bias + scale * (upper + own scores): the no-grad parts summed first, then one addmm of
            the own dims into them (`sampled_softmax`'s function form)."""
            if upper_scores is not None:
                with torch.no_grad():
                    if bias is None:
                        bias = upper_scores if scale == 1.0 else upper_scores.mul_(scale)
                    else:
                        bias.add_(upper_scores, alpha=scale)
            return pair_scores(own, bias, scale)

    terms = sampled_softmax(
        scores,
        it,
        temperature=cfg.loss.temperature,
        log_q=None if log_q is None else log_q[it],
        margin_bias=margin_bias,
        extra_scores=extra,
        extra_items=extra_items,
        extra_margins=extra_margins,
        score_dtype=uvec.dtype,
    )
    return terms.loss
