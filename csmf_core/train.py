"""Stage training: one cascade stage (train or accuracy recovery) over in-memory tensors.

Freezing that survives Adam: each call builds a fresh optimizer over the parameters holding at
least one entry the stage owns, gradients are multiplied by the stage's 0/1 mask before every
step (so Adam's moments of frozen entries stay exactly zero and their update is exactly zero),
and weight decay is decoupled and applied to the stage's entries only. Frozen entries are
therefore bit-identical after the stage; `tests/unit/test_freeze.py` checks it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from csmf_core.config import CSMFConfig
from csmf_core.losses import aml_margins, sampled_softmax, upstream_scores
from csmf_core.masks import trainable_masks
from csmf_core.model import TowerInputs, TwoTower


class TrainingDiverged(RuntimeError):
    """A non-finite or exploding loss; the stage stops and nothing downstream may use it."""


@dataclass
class FeatureTables:
    """Feature rows by entity index (row 0 = unknown). cat: (N, n_cat) int64, num: (N, n_num) float32."""

    users_cat: torch.Tensor
    users_num: torch.Tensor
    items_cat: torch.Tensor
    items_num: torch.Tensor

    def to(self, device) -> FeatureTables:
        return FeatureTables(*(t.to(device) for t in (self.users_cat, self.users_num, self.items_cat, self.items_num)))

    def user_inputs(self, u: torch.Tensor, hists: list[torch.Tensor]) -> TowerInputs:
        return TowerInputs(self.users_cat[u], self.users_num[u], hists)

    def item_inputs(self, i: torch.Tensor) -> TowerInputs:
        return TowerInputs(self.items_cat[i], self.items_num[i])


@dataclass
class TrainRows:
    """Training events. u, i: (R,) int64; level: (R,) int8 deepest objective reached;
    hists: [(R, L) int64] behaviour sequences; neg: (R, M) int64 same-request negatives or None."""

    u: torch.Tensor
    i: torch.Tensor
    level: torch.Tensor
    hists: list[torch.Tensor]
    neg: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.u.numel())

    def select(self, idx: torch.Tensor) -> TrainRows:
        neg = None if self.neg is None else self.neg[idx]
        return TrainRows(self.u[idx], self.i[idx], self.level[idx], [h[idx] for h in self.hists], neg)

    def for_stage(self, stage: int) -> TrainRows:
        """Rows that are positives of `stage` (level >= stage)."""
        return self.select(torch.nonzero(self.level >= stage).flatten())


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
            "steps": self.steps,
            "seconds": round(self.seconds, 3),
            "samples_per_s": round(self.samples_per_s, 1),
            "final_loss": self.epoch_losses[-1] if self.epoch_losses else float("nan"),
        }


def item_log_q(counts: torch.Tensor) -> torch.Tensor:
    """(N,) log of each item's share of positives (items never seen get the smallest share)."""
    c = counts.double().clamp_min(0.5)
    return torch.log(c / c.sum()).float()


def _grad_masks(model: TwoTower, stage: int) -> dict[str, torch.Tensor]:
    if model.owners is None:
        raise RuntimeError("the model has no owner tensors: call model.set_owners(param_owners(...)) first")
    params = dict(model.named_parameters())
    masks = {}
    for name, m in trainable_masks(model.owners, stage).items():
        p = params[name]
        m = m.to(p.device, torch.float32)
        masks[name] = m.expand(p.shape).contiguous() if m.shape != p.shape else m
    return {k: v for k, v in masks.items() if bool(v.any())}


def _segment_scores(u: torch.Tensor, v: torch.Tensor, out_owners: torch.Tensor, stage: int) -> list[torch.Tensor]:
    """(B, D) x (K, D) -> [ (B, K) contribution of segment r for r < stage ]."""
    return [u[:, out_owners == r] @ v[:, out_owners == r].T for r in range(stage)]


def train_stage(
    model: TwoTower,
    tables: FeatureTables,
    rows: TrainRows,
    stage: int,
    cfg: CSMFConfig,
    *,
    phase: str = "train",
    log_q: torch.Tensor | None = None,
    output_owners: torch.Tensor | None = None,
    on_step: Callable[[int, float], None] | None = None,
    stage_name: str | None = None,
) -> StageResult:
    """Train the entries owned by `stage` on rows with level >= stage.

    phase "train" runs cfg.epochs_for(stage) epochs at train.lr; "recover" runs
    recover.epochs on a recover.fraction subset at train.lr * recover.lr_scale.
    log_q: (N_items,) log sampling probability per item (None = no correction).
    output_owners: (D,) owner of each output dimension (needed for AML when stage >= 1).
    Raises TrainingDiverged on a non-finite or exploding loss.
    """
    name = stage_name or f"stage {stage}"
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(cfg.train.seed * 1009 + stage * 31 + (phase == "recover"))
    data = rows.for_stage(stage)
    lr, epochs = cfg.train.lr, cfg.epochs_for(stage)
    if phase == "recover":
        n = max(2, int(math.ceil(len(data) * cfg.recover.fraction)))
        data = data.select(torch.randperm(len(data), generator=gen)[:n])
        lr, epochs = cfg.train.lr * cfg.recover.lr_scale, cfg.recover.epochs
    elif phase != "train":
        raise ValueError(f"phase must be 'train' or 'recover', got {phase!r}")
    if len(data) < 2:
        raise ValueError(f"{name}: {len(data)} positive rows; a sampled softmax needs at least 2")
    use_aml = cfg.loss.aml and stage >= 1
    if use_aml and output_owners is None:
        raise ValueError("AML needs output_owners (the owner of each output dimension)")
    use_neg = data.neg is not None and (
        cfg.loss.request_negatives == "all" or (cfg.loss.request_negatives == "first" and stage == 0)
    )
    masks = _grad_masks(model, stage)
    params = dict(model.named_parameters())
    opt = torch.optim.Adam([params[k] for k in masks], lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    wd = cfg.train.weight_decay
    out_owners = output_owners.to(device) if output_owners is not None else None
    log_q = log_q.to(device) if (log_q is not None and cfg.loss.logq) else None
    bs = min(cfg.train.batch_size, len(data))
    result = StageResult(stage, phase, len(data), epochs, 0, 0.0, 0.0)
    model.train()
    t0 = time.perf_counter()
    for epoch in range(epochs):
        perm = torch.randperm(len(data), generator=gen)
        total, count = 0.0, 0
        for start in range(0, len(data) - 1, bs):
            idx = perm[start : start + bs]
            if idx.numel() < 2:
                continue
            b = data.select(idx)
            u_in = tables.user_inputs(b.u.to(device), [h.to(device) for h in b.hists])
            it = b.i.to(device)
            uvec = model.user_vectors(u_in, stage)
            extra_items = b.neg.to(device) if use_neg else None
            # one item-tower pass over the distinct items of the batch (positives and request
            # negatives overlap heavily), then gather: the tower cost scales with distinct items
            wanted = it if extra_items is None else torch.cat([it, extra_items.flatten()])
            uniq, inv = torch.unique(wanted, return_inverse=True)
            all_vec = model.item_vectors(tables.item_inputs(uniq), stage)
            ivec = all_vec[inv[: it.numel()]]
            scores = uvec @ ivec.T
            margins = None
            if use_aml:
                with torch.no_grad():
                    up = upstream_scores(_segment_scores(uvec, ivec, out_owners, stage), stage, cfg.loss.upstream)
                    margins = aml_margins(up.diagonal(), up, cfg.loss.sigma, cfg.loss.eta)
            extra = extra_margins = None
            if use_neg:
                nvec = all_vec[inv[it.numel() :]].view(extra_items.shape[0], extra_items.shape[1], -1)
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
            value = float(terms.loss.detach())
            if not math.isfinite(value) or value > cfg.train.max_loss:
                raise TrainingDiverged(
                    f"{name} ({phase}): loss {value} at epoch {epoch + 1}, step {result.steps + 1}; "
                    f"nothing from this stage is kept. Lower train.lr (now {lr:g}) or raise "
                    f"loss.temperature (now {cfg.loss.temperature:g})."
                )
            opt.zero_grad(set_to_none=True)
            terms.loss.backward()
            with torch.no_grad():
                for k, m in masks.items():
                    if params[k].grad is not None:
                        params[k].grad.mul_(m)
                if cfg.train.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_([params[k] for k in masks], cfg.train.grad_clip)
            opt.step()
            if wd > 0:
                with torch.no_grad():
                    for k, m in masks.items():
                        params[k].sub_(params[k] * m, alpha=lr * wd)
            result.steps += 1
            result.losses.append(value)
            total += value * idx.numel()
            count += idx.numel()
            if on_step is not None:
                on_step(result.steps, value)
        result.epoch_losses.append(total / max(count, 1))
    result.seconds = time.perf_counter() - t0
    result.samples_per_s = len(data) * epochs / max(result.seconds, 1e-9)
    model.eval()
    return result
