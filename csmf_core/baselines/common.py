"""The comparison harness's shared pieces (owned by the harness; see docs/comparison.md).

Every baseline trains with the same pieces CSMF uses, so differences come from the method and
not from the plumbing: the same feature tables and towers (`csmf_core.model.Tower` without
masks is a plain MLP tower), the same in-batch sampled softmax with log-Q correction and
accidental-hit removal (`csmf_core.losses.sampled_softmax`), the same same-request negatives
for the exposure objective (as CSMF's stage 0 with loss.request_negatives="first"), the same
batching (`csmf_core.rows.shuffled_batches`) and the same optimiser step as CSMF's stages
(`csmf_core.optim`: Adam(W) at train.lr, clipping, divergence check, deterministic kernels, one
log type), batch size and per-stage epochs (`cfg.epochs_for(stage)`), and CSMF's evaluation
encoders (`csmf_core.evaluate.encode_items` / `encode_users`).

Joint multi-task training and the multi-task building blocks: `baselines/multitask.py`;
teacher-student distillation: `baselines/distill.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import nn

from csmf_core.cascade import CascadeData
from csmf_core.config import CSMFConfig, ModelConfig
from csmf_core.evaluate import encode_users
from csmf_core.losses import item_log_q, sampled_softmax
from csmf_core.model import Tower as _Tower
from csmf_core.model import TowerInputs, TowerSpec
from csmf_core.optim import OnStep, Optimiser, TrainLog, run_epochs
from csmf_core.rows import FeatureTables, TrainRows, shuffled_batches

Encoder = Callable[[TowerInputs], torch.Tensor]


def with_seed(cfg: CSMFConfig, seed: int) -> CSMFConfig:
    """cfg with train.seed and model.init_seed set to `seed` (one seed drives init and shuffling)."""
    return dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, seed=int(seed)),
        model=dataclasses.replace(cfg.model, init_seed=int(seed)),
    )


def objective_index(data: CascadeData, name: str) -> int:
    """Cascade position of objective `name`; ValueError listing the known ones."""
    if name not in data.objectives:
        raise ValueError(f"objective {name!r} is not in the data's objectives {data.objectives}")
    return data.objectives.index(name)


def make_tower(spec: TowerSpec, cfg: ModelConfig, *, dim: int | None = None, seed: int = 0) -> _Tower:
    """A plain MLP tower (embeddings + pooled sequences + numeric -> hidden -> dim), no masks.

    Same architecture and init as one CSMF tower; `dim` overrides the output size.
    """
    mc = cfg if dim is None else dataclasses.replace(cfg, dim=int(dim))
    return _Tower(spec, mc, torch.Generator().manual_seed(int(seed)))


class PlainTwoTower(nn.Module):
    """One user tower and one item tower (YouTubeDNN-style); score = inner product."""

    def __init__(
        self, user_spec: TowerSpec, item_spec: TowerSpec, cfg: ModelConfig, *, dim=None, seed: int = 0
    ):
        super().__init__()
        self.user = make_tower(user_spec, cfg, dim=dim, seed=seed)
        self.item = make_tower(item_spec, cfg, dim=dim, seed=seed + 7919)

    def user_vectors(self, x: TowerInputs) -> torch.Tensor:
        return self.user(x, None)

    def item_vectors(self, x: TowerInputs) -> torch.Tensor:
        return self.item(x, None)


def count_params(*modules: nn.Module) -> int:
    """Number of trainable scalars (each parameter counted once)."""
    seen, total = set(), 0
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def stage_log_q(data: CascadeData, stage: int) -> torch.Tensor:
    """(N_items,) log sampling probability of each item among objective `stage`'s positives."""
    return item_log_q(torch.as_tensor(data.counts[stage]))


def uses_request_negatives(cfg: CSMFConfig, stage: int, rows: TrainRows) -> bool:
    """Same rule as CSMF's trainer: same-request negatives for stage 0 ("first"), all, or none."""
    rn = cfg.loss.request_negatives
    return rows.neg is not None and (rn == "all" or (rn == "first" and stage == 0))


def softmax_loss(
    uvec: torch.Tensor,
    ivec: torch.Tensor,
    items: torch.Tensor,
    cfg: CSMFConfig,
    *,
    log_q: torch.Tensor | None = None,
    neg_vec: torch.Tensor | None = None,
    neg_items: torch.Tensor | None = None,
) -> torch.Tensor:
    """In-batch sampled softmax (CSMF's loss without AML).

    uvec: (B, d) user vectors; ivec: (B, d) positive item vectors; items: (B,) item indices.
    log_q: (N_items,) log sampling probabilities (applied when cfg.loss.logq). neg_vec: (B, M, d)
    vectors of same-request negatives neg_items (B, M) (item 0 = padding), or None.
    """
    extra = None if neg_vec is None else torch.einsum("bd,bmd->bm", uvec, neg_vec)
    lq = log_q[items] if (log_q is not None and cfg.loss.logq) else None
    return sampled_softmax(
        uvec @ ivec.T,
        items,
        temperature=cfg.loss.temperature,
        log_q=lq,
        extra_scores=extra,
        extra_items=neg_items,
    ).loss


def batch_vectors(
    user_fn: Encoder, item_fn: Encoder, tables: FeatureTables, b: TrainRows, request_negatives: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(B, d) user vectors of batch rows `b`, (B, d) vectors of their items and, with
    `request_negatives`, (B, M, d) vectors of their same-request negatives (else None): one
    item-side pass over the batch's distinct items, then gathered."""
    uvec = user_fn(tables.user_inputs(b.u, b.hists))
    wanted = torch.cat([b.i, b.neg.flatten()]) if request_negatives else b.i
    uniq, inv = torch.unique(wanted, return_inverse=True)
    all_vec = item_fn(tables.item_inputs(uniq))
    n = b.i.numel()
    ivec = all_vec[inv[:n]]
    neg_vec = all_vec[inv[n:]].view(*b.neg.shape, -1) if request_negatives else None
    return uvec, ivec, neg_vec


def tower_loss(
    user_fn: Encoder,
    item_fn: Encoder,
    tables: FeatureTables,
    b: TrainRows,
    cfg: CSMFConfig,
    *,
    log_q: torch.Tensor | None,
    request_negatives: bool,
) -> torch.Tensor:
    """Sampled-softmax loss on batch rows `b` of a model whose score is user_fn(u) . item_fn(i)."""
    uvec, ivec, neg_vec = batch_vectors(user_fn, item_fn, tables, b, request_negatives)
    return softmax_loss(
        uvec, ivec, b.i, cfg, log_q=log_q, neg_vec=neg_vec, neg_items=b.neg if request_negatives else None
    )


def train_loop(
    params: list[torch.nn.Parameter],
    rows,
    loss_fn: Callable,
    cfg: CSMFConfig,
    *,
    epochs: int,
    seed: int,
    name: str,
    lr: float | None = None,
    on_step: OnStep = None,
    step_offset: int = 0,
    masks: Sequence[torch.Tensor | None] | None = None,
) -> TrainLog:
    """`epochs` passes of shuffled batches of `rows` (anything with len() and select(idx), e.g.
    TrainRows), each one `csmf_core.optim.Optimiser` step over `params` on loss_fn(rows.select(idx)).

    Uses train.batch_size, train.lr (unless `lr`), train.weight_decay, train.grad_clip,
    train.max_loss and train.deterministic. masks: one 0/1 gradient mask per parameter (frozen
    entries; `csmf_core.optim`), or None. Raises TrainingDiverged naming `name` on a non-finite or
    exploding loss. `on_step(global_step, loss)` is called with step numbers starting after `step_offset`.
    """
    if len(rows) < 2:
        raise ValueError(f"{name}: {len(rows)} training rows; a sampled softmax needs at least 2")
    lr = cfg.train.lr if lr is None else lr
    opt = Optimiser(
        params,
        lr,
        cfg,
        TrainLog(name, len(rows), epochs),
        masks=masks,
        on_step=on_step,
        step_offset=step_offset,
    )
    gen = torch.Generator().manual_seed(int(seed))
    bs = min(cfg.train.batch_size, len(rows))
    return run_epochs(
        opt,
        epochs,
        lambda epoch: ((idx.numel(), rows.select(idx)) for idx in shuffled_batches(len(rows), bs, gen)),
        loss_fn,
    )


def encode_eval_users(fn: Encoder, data: CascadeData) -> torch.Tensor:
    """(E, d) float32 vectors of the evaluation users (`fn` = a method's user side), in chunks of 8192."""
    return encode_users(fn, data.tables, data.eval.u, data.eval.hists, batch=8192)


def set_threads(cfg: CSMFConfig) -> None:
    """Apply train.threads (0 = leave torch's setting)."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)


def train_plain_two_tower(
    data: CascadeData,
    cfg: CSMFConfig,
    rows: TrainRows,
    *,
    stage: int,
    seed: int,
    name: str,
    log_q: torch.Tensor | None,
    on_step: OnStep = None,
    step_offset: int = 0,
) -> tuple[PlainTwoTower, TrainLog]:
    """Train one plain two-tower model of cfg.model.dim on `rows` for cfg.epochs_for(stage) epochs.

    Request negatives follow CSMF's rule for `stage`. Returns the model (eval mode) and its log.
    """
    model = PlainTwoTower(data.user_spec, data.item_spec, cfg.model, seed=seed)
    req = uses_request_negatives(cfg, stage, rows)
    model.train()
    log = train_loop(
        list(model.parameters()),
        rows,
        lambda b: tower_loss(
            model.user_vectors, model.item_vectors, data.tables, b, cfg, log_q=log_q, request_negatives=req
        ),
        cfg,
        epochs=cfg.epochs_for(stage),
        seed=seed * 1009 + stage * 31,
        name=name,
        on_step=on_step,
        step_offset=step_offset,
    )
    model.eval()
    return model, log
