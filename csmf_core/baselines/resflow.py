"""ResFlow adapted to retrieval: per-task towers with residual links between corresponding layers.

Source: Fu et al., "Residual Multi-Task Learner for Applied Ranking" (KDD 2024; seeds/001):
one network per task, ordered like the funnel (exposure -> click -> conversion); the output of
layer l of task t is added to the output of layer l of task t+1 ("residual flow"), and the
final task logits are fused additively, which the paper finds better than multiplying
probabilities.

Adaptation to retrieval (the paper ranks user-item pairs with one network per task; retrieval
needs scores that are inner products of a user vector and a precomputed item vector):

* Both towers are ResFlow stacks: one shared feature embedding per side, one MLP per task with
  cfg.model.hidden widths, and hidden layer l of task t gets + (hidden layer l of task t-1).
* Each task's output layer produces a *segment* r_t (no residual there); the task-t score is
  the additive residual chain s_t = s_{t-1} + <r_t(u), r_t(i)> = sum_{q<=t} <r_q(u), r_q(i)>,
  i.e. the paper's additive logit fusion moved onto the scores. s_t is an inner product of the
  concatenated segments [r_0; ...; r_t], so one index over the full concatenation serves every
  task (task t queries with the later segments zeroed) and weighted fusions of the tasks, exactly
  like CSMF's unit-level layout.
* Serving cost equals a single-vector model: the segments split cfg.model.dim (dim // T each,
  the first segments get the remainder), so the item vector is cfg.model.dim floats. This makes
  ResFlow the jointly-trained counterpart of CSMF at equal storage (CSMF sizes its segments by
  pruning and trains them in a cascade instead).
* Training is joint: each step sums the in-batch sampled softmax (log-Q per objective,
  accidental hits removed, same-request negatives for the first objective as CSMF's stage 0) of
  every task whose batch is due; task t makes cfg.epochs_for(t) passes over its positives, the
  same per-objective budget as CSMF (`multitask.joint_train_loop`). Gradients flow through the
  residual links into earlier tasks, as in the paper. Feature-level parts of the paper (task
  specific feature selection) and its Weighted Recall metric are not reproduced.
* Under the comparison protocol the joint schedule is one part ("joint"), judged by every task.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from csmf_core.baselines.base import MethodResult
from csmf_core.baselines.common import (
    NO_HOOK,
    EpochHook,
    OnStep,
    Vectors,
    count_params,
    users_of,
    with_seed,
)
from csmf_core.baselines.multitask import MLP, FeatureEmbedding, train_objective_towers
from csmf_core.cascade import CascadeData, apply_threads
from csmf_core.config import CSMFConfig, ModelConfig
from csmf_core.evaluate import EvalRows, encode_items
from csmf_core.model import TowerInputs, TowerSpec
from csmf_core.rows import FeatureTables


def segment_dims(dim: int, n_tasks: int) -> list[int]:
    """Split `dim` output units into n_tasks segments (earlier segments get the remainder)."""
    if dim < n_tasks:
        raise ValueError(f"resflow: model.dim={dim} cannot hold one segment per objective ({n_tasks})")
    base, extra = divmod(dim, n_tasks)
    return [base + (1 if t < extra else 0) for t in range(n_tasks)]


class ResFlowTower(nn.Module):
    """Shared feature embedding + one MLP per task; task t's hidden layer l adds task t-1's layer l."""

    def __init__(self, spec: TowerSpec, cfg: ModelConfig, seg: list[int], *, seed: int):
        super().__init__()
        self.embed = FeatureEmbedding(spec, cfg, seed=seed)
        self.tasks = nn.ModuleList(
            MLP(self.embed.out_dim, cfg.hidden, d, seed=seed * 131 + t + 1) for t, d in enumerate(seg)
        )

    def segments(self, x: TowerInputs, upto: int) -> list[torch.Tensor]:
        """[(B, seg_t) for t = 0..upto]: each task's output segment, computed along the residual flow."""
        h0 = self.embed(x)
        prev: list[torch.Tensor] | None = None
        out = []
        for t in range(upto + 1):
            layers = self.tasks[t].layers
            h, hidden = h0, []
            for k, lin in enumerate(layers[:-1]):
                h = torch.relu(lin(h))
                if prev is not None:
                    h = h + prev[k]  # the residual link from the previous task's layer k
                hidden.append(h)
            out.append(layers[-1](h))
            prev = hidden
        return out

    def vector(self, x: TowerInputs, upto: int) -> torch.Tensor:
        """(B, sum of segments 0..upto) concatenated vector; its inner product is the task-`upto` score."""
        return torch.cat(self.segments(x, upto), dim=1)


class ResFlowRetrieval(nn.Module):
    def __init__(
        self, user_spec: TowerSpec, item_spec: TowerSpec, cfg: ModelConfig, n_tasks: int, *, seed: int
    ):
        super().__init__()
        self.seg = segment_dims(cfg.dim, n_tasks)
        self.user = ResFlowTower(user_spec, cfg, self.seg, seed=seed)
        self.item = ResFlowTower(item_spec, cfg, self.seg, seed=seed + 7919)

    def score(self, u: TowerInputs, i: TowerInputs, task: int) -> torch.Tensor:
        """(B,) task-`task` scores of paired rows."""
        return (self.user.vector(u, task) * self.item.vector(i, task)).sum(dim=1)


def fit(
    data: CascadeData, cfg: CSMFConfig, seed: int, on_step: OnStep = None, *, hook: EpochHook = NO_HOOK
) -> MethodResult:
    """Train ResFlow jointly on every objective; task t's retrieval vector is the prefix [r_0..r_t]."""
    cfg = with_seed(cfg, seed)
    apply_threads(cfg)
    t0 = time.perf_counter()
    n = len(data.objectives)
    model = ResFlowRetrieval(data.user_spec, data.item_spec, cfg.model, n, seed=seed)
    ends = torch.cumsum(torch.tensor(model.seg), 0).tolist()

    def encode(users: EvalRows, cat: FeatureTables) -> Vectors:
        full_u = users_of(lambda x: model.user.vector(x, n - 1), cat, users)
        full_i = encode_items(lambda x: model.item.vector(x, n - 1), cat)
        # One shared item matrix (what a server stores); task t's query zeroes the segments after its
        # own, so its inner product is exactly the prefix score s_0 + ... + s_t.
        out = {}
        for t, o in enumerate(data.objectives):
            q = full_u.clone()
            q[:, ends[t] :] = 0.0
            out[o] = q
        return out, {o: full_i for o in data.objectives}

    log = train_objective_towers(
        [model],
        data,
        cfg,
        lambda t, x: model.user.vector(x, t),
        lambda t, x: model.item.vector(x, t),
        seed=seed,
        name="resflow",
        on_step=on_step,
        hook=hook,
        encode=encode,
    )
    train_seconds = time.perf_counter() - t0
    hook.finish(encode)
    users, items = encode(data.eval, data.catalog_tables("eval"))
    full_i = items[data.objectives[0]]
    return MethodResult(
        method="resflow",
        user_vecs=users,
        item_vecs=items,
        train_seconds=train_seconds,
        n_params=count_params(model),
        item_bytes_per_item=4 * int(full_i.shape[1]),  # one vector; every task reads a prefix of it
        info={"train": log.summary(), "segments": list(model.seg)},
    )
