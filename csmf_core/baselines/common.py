"""Shared training helpers for the comparison methods (owned by the harness; see docs/comparison.md).

Every baseline trains with the same pieces CSMF uses, so differences come from the method and
not from the plumbing: the same feature tables and towers (`csmf_core.model.Tower` without
masks is a plain MLP tower), the same in-batch sampled softmax with log-Q correction and
accidental-hit removal (`csmf_core.losses.sampled_softmax`), the same same-request negatives
for the exposure objective (as CSMF's stage 0 with loss.request_negatives="first"), the same
optimiser (Adam, train.lr), batch size and per-stage epochs (`cfg.epochs_for(stage)`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from csmf_core.cascade import CascadeData
from csmf_core.config import CSMFConfig, ModelConfig
from csmf_core.evaluate import EvalRows
from csmf_core.losses import sampled_softmax
from csmf_core.model import Tower as _Tower
from csmf_core.model import TowerInputs, TowerSpec
from csmf_core.train import FeatureTables, TrainingDiverged, TrainRows, item_log_q

OnStep = Callable[[int, float], None] | None


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


def iter_batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Shuffled index batches over range(n); a trailing batch of 1 row is dropped (no in-batch negative)."""
    perm = torch.randperm(n, generator=gen)
    for start in range(0, n, batch_size):
        idx = perm[start : start + batch_size]
        if idx.numel() >= 2:
            yield idx


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


def tower_loss(
    model: PlainTwoTower,
    tables: FeatureTables,
    b: TrainRows,
    cfg: CSMFConfig,
    *,
    log_q: torch.Tensor | None,
    request_negatives: bool,
) -> torch.Tensor:
    """Sampled-softmax loss of a plain two-tower model on batch rows `b` (one item-tower pass)."""
    uvec = model.user_vectors(tables.user_inputs(b.u, b.hists))
    wanted = b.i if not request_negatives else torch.cat([b.i, b.neg.flatten()])
    uniq, inv = torch.unique(wanted, return_inverse=True)
    all_vec = model.item_vectors(tables.item_inputs(uniq))
    ivec = all_vec[inv[: b.i.numel()]]
    neg_vec = None
    if request_negatives:
        neg_vec = all_vec[inv[b.i.numel() :]].view(b.neg.shape[0], b.neg.shape[1], -1)
    return softmax_loss(
        uvec, ivec, b.i, cfg, log_q=log_q, neg_vec=neg_vec, neg_items=b.neg if request_negatives else None
    )


@dataclass
class TrainLog:
    name: str
    rows: int
    epochs: int
    steps: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)  # per step
    epoch_losses: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        return {
            "rows": self.rows,
            "epochs": self.epochs,
            "steps": self.steps,
            "seconds": round(self.seconds, 3),
            "final_loss": self.epoch_losses[-1] if self.epoch_losses else float("nan"),
        }


def train_loop(
    params: list[torch.nn.Parameter],
    rows: TrainRows,
    loss_fn: Callable[[TrainRows], torch.Tensor],
    cfg: CSMFConfig,
    *,
    epochs: int,
    seed: int,
    name: str,
    lr: float | None = None,
    on_step: OnStep = None,
    step_offset: int = 0,
) -> TrainLog:
    """Adam over `params` for `epochs` passes of shuffled batches of `rows`; loss = loss_fn(batch).

    Uses train.batch_size, train.lr (unless `lr`), train.weight_decay (decoupled), train.grad_clip
    and train.max_loss. Raises TrainingDiverged naming `name` on a non-finite or exploding loss.
    `on_step(global_step, loss)` is called with step numbers starting after `step_offset`.
    """
    if len(rows) < 2:
        raise ValueError(f"{name}: {len(rows)} training rows; a sampled softmax needs at least 2")
    lr = cfg.train.lr if lr is None else lr
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.train.weight_decay)
    gen = torch.Generator().manual_seed(int(seed))
    bs = min(cfg.train.batch_size, len(rows))
    log = TrainLog(name, len(rows), epochs)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        total, count = 0.0, 0
        for idx in iter_batches(len(rows), bs, gen):
            loss = loss_fn(rows.select(idx))
            value = float(loss.detach())
            if not math.isfinite(value) or value > cfg.train.max_loss:
                raise TrainingDiverged(
                    f"{name}: loss {value} at epoch {epoch + 1}, step {log.steps + 1}. Lower train.lr "
                    f"(now {lr:g}) or raise loss.temperature (now {cfg.loss.temperature:g})."
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
            opt.step()
            log.steps += 1
            log.losses.append(value)
            total += value * idx.numel()
            count += idx.numel()
            if on_step is not None:
                on_step(step_offset + log.steps, value)
        log.epoch_losses.append(total / max(count, 1))
    log.seconds = time.perf_counter() - t0
    return log


@torch.no_grad()
def encode_users(
    fn: Callable[[TowerInputs], torch.Tensor], tables: FeatureTables, ev: EvalRows, batch: int = 8192
) -> torch.Tensor:
    """(E, d) float32 vectors of the evaluation users, `fn` applied to their tower inputs in chunks."""
    out = []
    for s in range(0, len(ev), batch):
        sl = slice(s, s + batch)
        out.append(fn(tables.user_inputs(ev.u[sl], [h[sl] for h in ev.hists])).float())
    return torch.cat(out) if out else torch.zeros(0, 0)


@torch.no_grad()
def encode_items(
    fn: Callable[[TowerInputs], torch.Tensor], tables: FeatureTables, batch: int = 65536
) -> torch.Tensor:
    """(N_items, d) float32 vectors of every item index (row 0 included)."""
    n = tables.items_cat.shape[0]
    return torch.cat(
        [fn(tables.item_inputs(torch.arange(s, min(n, s + batch)))).float() for s in range(0, n, batch)]
    )


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
        lambda b: tower_loss(model, data.tables, b, cfg, log_q=log_q, request_negatives=req),
        cfg,
        epochs=cfg.epochs_for(stage),
        seed=seed * 1009 + stage * 31,
        name=name,
        on_step=on_step,
        step_offset=step_offset,
    )
    model.eval()
    return model, log
