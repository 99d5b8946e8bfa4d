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
from csmf_core.train import FeatureTables, TrainingDiverged, TrainRows, adam, item_log_q

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
    opt = adam(params, lr, weight_decay=cfg.train.weight_decay, decoupled=True)
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


# =============================================================================================
# Multi-task helpers for the complex baselines (mvke, moppr, dtml, dmmp, resflow). This block is
# owned by the complex-baselines engineer; everything above is the harness's.
# =============================================================================================


class FeatureEmbedding(nn.Module):
    """The input half of a tower: embeddings, mean-pooled sequences and numeric columns -> (B, out_dim).

    Same features, embedding sizes and init as `csmf_core.model.Tower` (built from one and keeping
    its embedding tables), so methods that put their own networks on top (experts, task towers,
    cross-feature teachers) read exactly what every other method reads.
    """

    def __init__(self, spec: TowerSpec, cfg: ModelConfig, *, seed: int = 0):
        super().__init__()
        t = make_tower(spec, cfg, seed=seed)
        self.spec = spec
        self.emb = t.emb
        self.hist = t.hist
        self.out_dim = int(t.layers[0].in_features)

    def forward(self, x: TowerInputs) -> torch.Tensor:
        parts = [e(x.cat[:, k]) for k, e in enumerate(self.emb.values())]
        for k, e in enumerate(self.hist.values()):
            seq = x.hists[k]
            pooled = torch.nn.functional.embedding_bag(seq, e.weight, mode="sum", padding_idx=0)
            parts.append(pooled / (seq > 0).sum(dim=1, keepdim=True).clamp_min(1).to(pooled.dtype))
        if self.spec.n_num:
            parts.append(x.num)
        return torch.cat(parts, dim=1)


class MLP(nn.Module):
    """Linear layers in_dim -> widths... -> out_dim, ReLU between (none after the last), nn.Linear init."""

    def __init__(self, in_dim: int, widths: tuple[int, ...], out_dim: int, *, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(int(seed))
        dims = [int(in_dim), *(int(w) for w in widths), int(out_dim)]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        with torch.no_grad():
            for lin in self.layers:
                bound = 1.0 / math.sqrt(lin.weight.shape[1])
                lin.weight.uniform_(-bound, bound, generator=gen)
                lin.bias.uniform_(-bound, bound, generator=gen)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for k, lin in enumerate(self.layers):
            h = lin(h)
            if k < last:
                h = torch.relu(h)
        return h


def stage_pools(data: CascadeData) -> list[TrainRows]:
    """Positive rows of every objective (pool t = rows with level >= t), in cascade order."""
    return [data.rows.for_stage(t) for t in range(len(data.objectives))]


def batches_per_epoch(n: int, batch_size: int) -> int:
    """How many batches `iter_batches` yields for n rows (a trailing 1-row batch is dropped)."""
    bs = min(batch_size, n)
    return n // bs + (1 if n % bs >= 2 else 0)


def task_active(step: int, task_steps: int, total_steps: int) -> bool:
    """Whether a task with `task_steps` batches takes part in joint step `step` of `total_steps`.

    Spreads the task's batches evenly: it takes part when floor((s+1) k / S) > floor(s k / S),
    which is true for exactly k of the S steps (k <= S).
    """
    return (step + 1) * task_steps // total_steps > step * task_steps // total_steps


def joint_train_loop(
    params: list[torch.nn.Parameter],
    pools: list,
    epochs: list[int],
    loss_fn: Callable[[list], torch.Tensor],
    cfg: CSMFConfig,
    *,
    seed: int,
    name: str,
    batch_sizes: list[int] | None = None,
    on_step: OnStep = None,
) -> TrainLog:
    """Joint multi-task training with the same per-objective sample budget as CSMF's stages.

    Task t makes exactly `epochs[t]` shuffled passes over `pools[t]` (anything with len() and
    select(idx), e.g. TrainRows), in batches of `batch_sizes[t]` (default train.batch_size). Its
    batches are spread evenly over S = max_t(batches of t) joint steps (`task_active`); at each
    step `loss_fn(batches)` gets one batch per task, None where the task sits out, and returns the
    summed loss. Adam(W) at train.lr; the same divergence check as `train_loop`.
    """
    if len(pools) != len(epochs):
        raise ValueError(f"{name}: {len(pools)} pools but {len(epochs)} epoch counts")
    sizes = batch_sizes or [cfg.train.batch_size] * len(pools)
    for t, p in enumerate(pools):
        if epochs[t] > 0 and len(p) < 2:
            raise ValueError(
                f"{name}: task {t} has {len(p)} training rows; a sampled softmax needs at least 2"
            )
    per_task = [
        batches_per_epoch(len(p), sizes[t]) * int(epochs[t]) if epochs[t] > 0 else 0
        for t, p in enumerate(pools)
    ]
    total = max(per_task)
    gens = [torch.Generator().manual_seed(int(seed) * 1009 + t * 31) for t in range(len(pools))]

    def stream(t: int) -> Iterator:
        for _ in range(int(epochs[t])):
            yield from iter_batches(len(pools[t]), min(sizes[t], len(pools[t])), gens[t])

    streams = [stream(t) for t in range(len(pools))]
    opt = adam(params, cfg.train.lr, weight_decay=cfg.train.weight_decay, decoupled=True)
    log = TrainLog(name, sum(len(p) for p in pools), max(int(e) for e in epochs))
    running: list[float] = []
    per_epoch = max(1, total // max(1, log.epochs))
    t0 = time.perf_counter()
    for s in range(total):
        batches = [
            pools[t].select(next(streams[t])) if per_task[t] and task_active(s, per_task[t], total) else None
            for t in range(len(pools))
        ]
        loss = loss_fn(batches)
        value = float(loss.detach())
        if not math.isfinite(value) or value > cfg.train.max_loss:
            raise TrainingDiverged(
                f"{name}: loss {value} at step {s + 1} of {total}. Lower train.lr (now {cfg.train.lr:g}) "
                f"or raise loss.temperature (now {cfg.loss.temperature:g})."
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        opt.step()
        log.steps += 1
        log.losses.append(value)
        running.append(value)
        if len(running) == per_epoch or s == total - 1:
            log.epoch_losses.append(sum(running) / len(running))
            running = []
        if on_step is not None:
            on_step(log.steps, value)
    log.seconds = time.perf_counter() - t0
    return log


def unique_items(items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct item indices of any-shaped `items` and the inverse map (same shape as `items`).

    Item towers run once per distinct item of a batch, then vectors are gathered back.
    """
    uniq, inv = torch.unique(items.flatten(), return_inverse=True)
    return uniq, inv.view(items.shape)


def distill_lists(b: TrainRows, n_inbatch: int) -> torch.Tensor:
    """(B, L) candidate items per row for listwise distillation; item 0 = padding (ignored).

    Column 0 is the row's item, then its same-request negatives (if any), then the items of the
    next `n_inbatch` rows of the batch (a cyclic shift: other users' positives, i.e. in-batch
    negatives), so teacher and student are compared on the kind of lists retrieval ranks.
    """
    cols = [b.i[:, None]]
    if b.neg is not None and b.neg.shape[1]:
        cols.append(b.neg)
    for k in range(1, min(n_inbatch, b.i.numel() - 1) + 1):
        cols.append(torch.roll(b.i, -k)[:, None])
    return torch.cat(cols, dim=1)


def listwise_kl(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Mean over rows of KL(softmax(teacher) || softmax(student)) over each row's valid columns.

    teacher_logits, student_logits, valid: (B, L). Zero exactly when the two rows of logits differ
    by a per-row constant (same distribution), positive otherwise; the teacher is a constant here.
    """
    neg = torch.finfo(student_logits.dtype).min
    lt = torch.log_softmax(teacher_logits.detach().masked_fill(~valid, neg), dim=1)
    ls = torch.log_softmax(student_logits.masked_fill(~valid, neg), dim=1)
    pt = lt.exp() * valid
    return (pt * (lt - ls)).masked_fill(~valid, 0.0).sum(dim=1).mean()


def cascade_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """(..., T') per-step logits -> (..., T') log P(objective t+1 | exposed), chained as in ESMM.

    Step q's logit models P(objective q+1 | objective q) (pCTR, pCVR, ...); the entire-space
    probability of objective t+1 is the product of the steps up to it, so its log is the running
    sum of log sigmoid (ESMM, Ma et al. SIGIR 2018: pCTCVR = pCTR * pCVR).
    """
    return torch.cumsum(torch.nn.functional.logsigmoid(logits), dim=-1)


def cascade_bce(logits: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Teacher loss over exposed rows: sum over t of BCE(P(objective t+1 | exposed), level >= t+1).

    logits: (B, T') step logits; level: (B,) deepest objective reached. Every probability is fitted
    on the entire exposure space (no sample-selection bias): pCVR is only learned through pCTCVR.
    """
    logp = cascade_log_probs(logits)
    labels = (level[:, None] >= torch.arange(1, logits.shape[1] + 1, device=level.device)[None, :]).float()
    log_not = torch.log(-torch.expm1(logp.clamp(max=-1e-6)))  # log(1 - p), stable
    return -(labels * logp + (1 - labels) * log_not).mean(dim=0).sum()
