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

Two things every method shares with CSMF since issue #15 (docs/comparison.md, "One protocol"):

* **Item statistics** (`data.item_stats`): a training row scores every candidate item with the
  point-in-time statistics of its own day (`RowItems`, as `csmf_core.train._batch_loss` does), and
  catalogs are encoded with `data.catalog_tables(split)`.
* **Epoch selection** (`EpochHook`): every method's training tells the hook where its independently
  trained parts begin and end and calls it after every epoch, so the protocol
  (`baselines/protocol.py`) can score each part on the validation users and keep its best epoch,
  then refit each part for exactly its chosen epochs. The default hook (`NO_HOOK`) is the protocol
  switched off: every part trains its configured epochs and nothing runs between epochs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import nn

from csmf_core.cascade import CascadeData
from csmf_core.config import CSMFConfig, ModelConfig
from csmf_core.evaluate import EvalRows, encode_items, encode_users
from csmf_core.losses import item_log_q, sampled_softmax
from csmf_core.model import Tower as _Tower
from csmf_core.model import TowerInputs, TowerSpec
from csmf_core.optim import OnStep, Optimiser, TrainLog, run_epochs
from csmf_core.rows import FeatureTables, TrainRows, shuffled_batches

Encoder = Callable[[TowerInputs], torch.Tensor]
# (user vectors, item vectors) per objective; a tensor shared by several objectives is one object
Vectors = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]
# encode(users, catalog tables) -> Vectors: a trained part's (or method's) vectors for these users
# (rows aligned with users.u) and the whole catalog as encoded with these tables
Encode = Callable[[EvalRows, FeatureTables], Vectors]


class EpochHook:
    """How a method's training lets the comparison protocol choose epochs (baselines/protocol.py).

    A *part* is a piece of a method trained on its own and selected on its own: one of
    YouTubeDNN-Sep's per-objective models, a stage of the weight-mask cascade, or the whole model of a
    jointly trained method ("model", or "joint" for the multi-task schedule). Per part, a method calls

        n = hook.epochs(part, cap)                       # cap: the configured epochs
        hook.begin(part, modules, encode, start=...)     # start: the untrained state is a candidate
        <train n epochs with on_epoch=hook.on_epoch(part)>
        hook.end(part)                                   # puts back the best epoch's parameters

    and, when training is over, `hook.finish(encode)` with the encoder of its served vectors.
    `encode` gives the part's vectors of the objectives it is judged on (`Encode`).

    This base class is the protocol switched off: every part trains its cap, `on_epoch` is None (so
    `optim.run_epochs` runs exactly as without a hook) and the other calls do nothing.
    """

    def epochs(self, part: str, cap: int) -> int:
        return int(cap)

    def begin(self, part: str, modules: Sequence[nn.Module], encode: Encode, *, start: bool = False) -> None:
        pass

    def on_epoch(self, part: str) -> Callable[[int], bool | None] | None:
        return None

    def end(self, part: str) -> None:
        pass

    def finish(self, encode: Encode) -> None:
        pass


NO_HOOK = EpochHook()


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
    return item_log_q(torch.as_tensor(data.log_q_counts(stage)))


def uses_request_negatives(cfg: CSMFConfig, stage: int, rows: TrainRows) -> bool:
    """Same rule as CSMF's trainer: same-request negatives for stage 0 ("first"), all, or none."""
    rn = cfg.loss.request_negatives
    return rows.neg is not None and (rn == "all" or (rn == "first" and stage == 0))


def scores_loss(
    scores: torch.Tensor,
    items: torch.Tensor,
    cfg: CSMFConfig,
    *,
    log_q: torch.Tensor | None = None,
    extra: torch.Tensor | None = None,
    neg_items: torch.Tensor | None = None,
) -> torch.Tensor:
    """In-batch sampled softmax (CSMF's loss without AML) from scores.

    scores: (B, B) row r's user against row c's item; items: (B,) item indices. log_q: (N_items,)
    log sampling probabilities (applied when cfg.loss.logq). extra: (B, M) scores of the rows'
    same-request negatives neg_items (B, M) (item 0 = padding), or None.
    """
    lq = log_q[items] if (log_q is not None and cfg.loss.logq) else None
    return sampled_softmax(
        scores,
        items,
        temperature=cfg.loss.temperature,
        log_q=lq,
        extra_scores=extra,
        extra_items=neg_items,
    ).loss


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
    """`scores_loss` of user vectors uvec (B, d) against item vectors ivec (B, d) that do not depend on
    the row (no item statistics); neg_vec: (B, M, d) vectors of the same-request negatives, or None."""
    extra = None if neg_vec is None else torch.einsum("bd,bmd->bm", uvec, neg_vec)
    return scores_loss(uvec @ ivec.T, items, cfg, log_q=log_q, extra=extra, neg_items=neg_items)


class RowItems:
    """The items one training batch scores, each row's candidates as of the row's own day.

    With point-in-time item statistics (`data.item_stats`) an item's tower input depends on the day,
    and a training row scores every candidate (its positive, the other rows' items, its same-request
    negatives, its distillation list) with the statistics of *its own* day, as CSMF's trainer does
    (`csmf_core.train._batch_loss`) and as the catalog is encoded for serving: scoring another row's
    positive with that row's day would let a model match users to items by day (the statistics and
    the behaviour sequences both tell the day) instead of by preference. One item-tower pass over
    (distinct day) x (distinct item). Without statistics: one pass over the distinct items, exactly
    the operations every baseline ran before statistics existed.

    items: any shape of item indices; `inv` (same shape) gives each one's position among the
    distinct items `uniq`. day: (B,) UTC day number of each row (TrainRows.day).
    """

    def __init__(self, tables: FeatureTables, day: torch.Tensor | None, items: torch.Tensor):
        self.tables = tables
        self.uniq, inv = torch.unique(items.flatten(), return_inverse=True)
        self.inv = inv.view(items.shape)
        self.by_day = tables.item_stats is not None
        if self.by_day:
            if day is None:
                raise ValueError("the feature tables carry item statistics but the batch has no row days")
            self.days, self.dinv = torch.unique(day, return_inverse=True)
            order = torch.argsort(self.dinv, stable=True)
            self.groups = torch.split(order, torch.bincount(self.dinv, minlength=self.days.numel()).tolist())
            self.back = torch.argsort(order)

    def encode(self, fn: Encoder) -> torch.Tensor:
        """`fn` over the distinct items: (U, ...) without statistics, (D, U, ...) by distinct day."""
        if not self.by_day:
            return fn(self.tables.item_inputs(self.uniq))
        nd, nu = self.days.numel(), self.uniq.numel()
        out = fn(self.tables.item_inputs(self.uniq.repeat(nd), self.days.repeat_interleave(nu)))
        return out.view(nd, nu, *out.shape[1:])

    def own(self, vecs: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """(B, ..., *) vectors of row r's own items at positions pos[r, ...] (into `uniq`), as of r's day."""
        if not self.by_day:
            return vecs[pos]
        return vecs[self.dinv.view(-1, *([1] * (pos.dim() - 1))), pos]

    def candidates(self, vecs: torch.Tensor, pos: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """score(uvec) -> (B, C): uvec[r] . the vector of item pos[c] as of row r's day (in-batch
        scores); the items are gathered once, for several user-side vectors (pos: (C,))."""
        if not self.by_day:
            ivec = vecs[pos]
            return lambda uvec: uvec @ ivec.T
        per_day = [vecs[k, pos] for k in range(len(self.groups))]

        def score(uvec: torch.Tensor) -> torch.Tensor:
            blocks = [uvec[rows] @ per_day[k].T for k, rows in enumerate(self.groups)]
            return torch.cat(blocks)[self.back]

        return score

    def pairs(self, uvec: torch.Tensor, vecs: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """(B, C): uvec[r] . the vector of item pos[c] as of row r's day (`candidates`, one user side)."""
        return self.candidates(vecs, pos)(uvec)


def batch_scores(
    user_fn: Encoder, item_fn: Encoder, tables: FeatureTables, b: TrainRows, request_negatives: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(B, d) user vectors of batch rows `b`, (B, B) scores of every row against every row's item and,
    with `request_negatives`, (B, M) scores against the row's same-request negatives (else None).
    One item-side pass over the batch's distinct items (by day with item statistics: `RowItems`)."""
    uvec = user_fn(tables.user_inputs(b.u, b.hists))
    wanted = torch.cat([b.i, b.neg.flatten()]) if request_negatives else b.i
    items = RowItems(tables, b.day, wanted)
    vecs = items.encode(item_fn)
    n = b.i.numel()
    extra = None
    if request_negatives:
        extra = torch.einsum("bd,bmd->bm", uvec, items.own(vecs, items.inv[n:].view(b.neg.shape)))
    return uvec, items.pairs(uvec, vecs, items.inv[:n]), extra


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
    _, scores, extra = batch_scores(user_fn, item_fn, tables, b, request_negatives)
    return scores_loss(
        scores, b.i, cfg, log_q=log_q, extra=extra, neg_items=b.neg if request_negatives else None
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
    on_epoch: Callable[[int], bool | None] | None = None,
) -> TrainLog:
    """`epochs` passes of shuffled batches of `rows` (anything with len() and select(idx), e.g.
    TrainRows), each one `csmf_core.optim.Optimiser` step over `params` on loss_fn(rows.select(idx)).

    Uses train.batch_size, train.lr (unless `lr`), train.weight_decay, train.grad_clip,
    train.max_loss and train.deterministic. masks: one 0/1 gradient mask per parameter (frozen
    entries; `csmf_core.optim`), or None. Raises TrainingDiverged naming `name` on a non-finite or
    exploding loss. `on_step(global_step, loss)` is called with step numbers starting after `step_offset`;
    `on_epoch(epoch)` after every epoch (1-based; `EpochHook.on_epoch`).
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
        on_epoch=on_epoch,
    )


def encode_eval_users(fn: Encoder, data: CascadeData) -> torch.Tensor:
    """(E, d) float32 vectors of the evaluation users (`fn` = a method's user side), in chunks of 8192."""
    return encode_users(fn, data.tables, data.eval.u, data.eval.hists, batch=8192)


def users_of(fn: Encoder, tables: FeatureTables, users: EvalRows) -> torch.Tensor:
    """(E, d) float32 vectors of `users` (evaluation or validation users), in chunks of 8192."""
    return encode_users(fn, tables, users.u, users.hists, batch=8192)


def two_tower_encode(user_fn: Encoder, item_fn: Encoder, served: Sequence[str]) -> Encode:
    """The `Encode` of a model with one user and one item vector serving every objective in `served`."""

    def encode(users: EvalRows, tables: FeatureTables) -> Vectors:
        u, v = users_of(user_fn, tables, users), encode_items(item_fn, tables)
        return {o: u for o in served}, {o: v for o in served}

    return encode


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
    hook: EpochHook = NO_HOOK,
    part: str = "model",
    served: Sequence[str] = (),
) -> tuple[PlainTwoTower, TrainLog]:
    """Train one plain two-tower model of cfg.model.dim on `rows` for cfg.epochs_for(stage) epochs
    (or the hook's choice for `part`, judged on the objectives in `served`).

    Request negatives follow CSMF's rule for `stage`. Returns the model (eval mode) and its log.
    """
    model = PlainTwoTower(data.user_spec, data.item_spec, cfg.model, seed=seed)
    req = uses_request_negatives(cfg, stage, rows)
    hook.begin(part, [model], two_tower_encode(model.user_vectors, model.item_vectors, served))
    model.train()
    log = train_loop(
        list(model.parameters()),
        rows,
        lambda b: tower_loss(
            model.user_vectors, model.item_vectors, data.tables, b, cfg, log_q=log_q, request_negatives=req
        ),
        cfg,
        epochs=hook.epochs(part, cfg.epochs_for(stage)),
        seed=seed * 1009 + stage * 31,
        name=name,
        on_step=on_step,
        step_offset=step_offset,
        on_epoch=hook.on_epoch(part),
    )
    model.eval()
    hook.end(part)
    return model, log
