"""Joint multi-task training and the building blocks of the multi-task baselines (mvke, moppr, dtml,
dmmp, resflow); owned by the complex-baselines engineer (docs/baselines.md).

`joint_train_loop` gives every objective CSMF's per-objective sample budget in one joint schedule,
each step one `csmf_core.optim.Optimiser` step (the step every method takes).
`FeatureEmbedding` is the input half of a CSMF tower (`csmf_core.model.embed_inputs`) for
methods that put their own networks on the features; `MLP` is such a network.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from csmf_core.baselines.common import (
    NO_HOOK,
    Encode,
    EpochHook,
    OnStep,
    make_tower,
    stage_log_q,
    tower_loss,
    uses_request_negatives,
)
from csmf_core.cascade import CascadeData
from csmf_core.config import CSMFConfig, ModelConfig
from csmf_core.model import TowerInputs, TowerSpec, embed_inputs
from csmf_core.optim import Optimiser, TrainLog, run_epochs
from csmf_core.rows import TrainRows, shuffled_batches


class FeatureEmbedding(nn.Module):
    """The input half of a tower: embeddings, mean-pooled sequences and numeric columns -> (B, out_dim).

    Same features, embedding sizes and init as `csmf_core.model.Tower` (built from one and keeping
    its embedding tables) and the same computation (`csmf_core.model.embed_inputs`), so methods that
    put their own networks on top (experts, task towers, cross-feature teachers) read exactly what
    every other method reads.
    """

    def __init__(self, spec: TowerSpec, cfg: ModelConfig, *, seed: int = 0):
        super().__init__()
        t = make_tower(spec, cfg, seed=seed)
        self.spec = spec
        self.emb = t.emb
        self.hist = t.hist
        self.out_dim = int(t.layers[0].in_features)

    def forward(self, x: TowerInputs) -> torch.Tensor:
        return embed_inputs(x, self.spec, self.emb, self.hist)


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
    """How many batches `shuffled_batches` yields for n rows (a trailing 1-row batch is dropped)."""
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
    stop_after: int | None = None,
    on_epoch: Callable[[int], bool | None] | None = None,
) -> TrainLog:
    """Joint multi-task training with the same per-objective sample budget as CSMF's stages.

    Task t makes exactly `epochs[t]` shuffled passes over `pools[t]` (anything with len() and
    select(idx), e.g. TrainRows), in batches of `batch_sizes[t]` (default train.batch_size). Its
    batches are spread evenly over S = max_t(batches of t) joint steps (`task_active`); at each
    step `loss_fn(batches)` gets one batch per task, None where the task sits out, and returns the
    summed loss. Adam(W) at train.lr, the optimiser step of every method (`csmf_core.optim`); the
    log's epoch losses are plain means over runs of S // max(epochs) steps.

    A *joint epoch* is one such run (`joint_epochs` of them, the last possibly shorter): every task's
    share of it is the same fraction of its budget. stop_after: run only the first `stop_after` joint
    epochs of this schedule (the comparison protocol's refit; None = all). on_epoch(e): called after
    joint epoch e (1-based), e.g. `EpochHook.on_epoch`.
    """
    if len(pools) != len(epochs):
        raise ValueError(f"{name}: {len(pools)} pools but {len(epochs)} epoch counts")
    sizes = batch_sizes or [cfg.train.batch_size] * len(pools)
    for t, p in enumerate(pools):
        if epochs[t] > 0 and len(p) < 2:
            raise ValueError(
                f"{name}: task {t} has {len(p)} training rows; a sampled softmax needs at least 2"
            )
    per_task = _task_batches(pools, epochs, sizes)
    total = max(per_task)
    gens = [torch.Generator().manual_seed(int(seed) * 1009 + t * 31) for t in range(len(pools))]

    def stream(t: int) -> Iterator:
        for _ in range(int(epochs[t])):
            yield from shuffled_batches(len(pools[t]), min(sizes[t], len(pools[t])), gens[t])

    streams = [stream(t) for t in range(len(pools))]
    log = TrainLog(name, sum(len(p) for p in pools), max(int(e) for e in epochs))
    opt = Optimiser(params, cfg.train.lr, cfg, log, on_step=on_step)
    per_epoch = max(1, total // max(1, log.epochs))

    def joint_steps(chunk: int) -> Iterator[tuple[int, list]]:
        """The steps of logged epoch `chunk`: per_epoch of them (the last chunk: the rest)."""
        for s in range(chunk * per_epoch, min(total, (chunk + 1) * per_epoch)):
            batches = [
                pools[t].select(next(streams[t]))
                if per_task[t] and task_active(s, per_task[t], total)
                else None
                for t in range(len(pools))
            ]
            yield sum(len(b) for b in batches if b is not None), batches

    n_chunks = -(-total // per_epoch)
    if stop_after is not None:
        n_chunks = min(n_chunks, int(stop_after))
    return run_epochs(opt, n_chunks, joint_steps, loss_fn, by_rows=False, on_epoch=on_epoch)


def _task_batches(pools: list, epochs: list[int], sizes: list[int]) -> list[int]:
    """Batches task t takes over the whole joint schedule (0 for a task with no epochs)."""
    return [
        batches_per_epoch(len(p), sizes[t]) * int(epochs[t]) if epochs[t] > 0 else 0
        for t, p in enumerate(pools)
    ]


def joint_epochs(pools: list, epochs: list[int], batch_size: int) -> int:
    """How many joint epochs `joint_train_loop` runs for these pools and per-task epochs (batches of
    `batch_size`): ceil(S / (S // max(epochs))) with S the largest task's batches."""
    total = max(_task_batches(pools, epochs, [batch_size] * len(pools)))
    per_epoch = max(1, total // max(1, max(int(e) for e in epochs)))
    return -(-total // per_epoch)


def unique_items(items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct item indices of any-shaped `items` and the inverse map (same shape as `items`).

    Item towers run once per distinct item of a batch, then vectors are gathered back.
    """
    uniq, inv = torch.unique(items.flatten(), return_inverse=True)
    return uniq, inv.view(items.shape)


def train_jointly(
    modules: list[nn.Module],
    pools: list,
    loss_fn: Callable[[list], torch.Tensor],
    cfg: CSMFConfig,
    *,
    seed: int,
    name: str,
    on_step: OnStep = None,
    hook: EpochHook = NO_HOOK,
    encode: Encode | None = None,
) -> TrainLog:
    """`joint_train_loop` over every parameter of `modules` (train mode during, eval mode after),
    pool t making cfg.epochs_for(t) passes: CSMF's per-objective budget.

    The whole schedule is one part ("joint") of the comparison protocol: `hook` may stop it after any
    joint epoch and `encode` gives the vectors it is judged by (every objective the method serves)."""
    epochs = [cfg.epochs_for(t) for t in range(len(pools))]
    if encode is not None:
        hook.begin("joint", modules, encode)
    for m in modules:
        m.train()
    log = joint_train_loop(
        [p for m in modules for p in m.parameters()],
        pools,
        epochs,
        loss_fn,
        cfg,
        seed=seed,
        name=name,
        on_step=on_step,
        stop_after=hook.epochs("joint", joint_epochs(pools, epochs, cfg.train.batch_size)),
        on_epoch=hook.on_epoch("joint"),
    )
    for m in modules:
        m.eval()
    hook.end("joint")
    return log


def train_objective_towers(
    modules: list[nn.Module],
    data: CascadeData,
    cfg: CSMFConfig,
    user_fn: Callable[[int, TowerInputs], torch.Tensor],
    item_fn: Callable[[int, TowerInputs], torch.Tensor],
    *,
    seed: int,
    name: str,
    on_step: OnStep = None,
    hook: EpochHook = NO_HOOK,
    encode: Encode | None = None,
) -> TrainLog:
    """Every objective t a task scored user_fn(t, u) . item_fn(t, i), trained jointly (`train_jointly`):
    a step sums the due tasks' in-batch sampled softmax on their positives (`common.tower_loss`: log-Q
    per objective, same-request negatives by CSMF's rule for stage t)."""
    pools = stage_pools(data)
    log_qs = [stage_log_q(data, t) for t in range(len(pools))]
    reqs = [uses_request_negatives(cfg, t, pools[t]) for t in range(len(pools))]

    def task_loss(t: int, b: TrainRows) -> torch.Tensor:
        return tower_loss(
            lambda x: user_fn(t, x),
            lambda x: item_fn(t, x),
            data.tables,
            b,
            cfg,
            log_q=log_qs[t],
            request_negatives=reqs[t],
        )

    def loss_fn(batches: list) -> torch.Tensor:
        return sum(task_loss(t, b) for t, b in enumerate(batches) if b is not None)

    return train_jointly(
        modules, pools, loss_fn, cfg, seed=seed, name=name, on_step=on_step, hook=hook, encode=encode
    )
