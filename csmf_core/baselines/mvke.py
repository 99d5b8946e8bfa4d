"""MVKE: mixture of virtual-kernel experts in the user tower, gated per task by the item.

Source: Xu et al., "Mixture of Virtual-Kernel Experts for Multi-Objective User Profile Modeling"
(KDD 2022), a CSMF-paper baseline (seeds/000, Table 2; Table 4: +299% item storage, +227% ANN
time). The user tower has K virtual-kernel experts (VKEs), each with a learnable virtual kernel
(a vector in the item-vector space); the item ("tag") vector v(i) attends over the kernels
through task t's virtual-kernel gate (VKG): g_t(i) = softmax_k(<kernel_k, W_t v(i)> / sqrt(d)),
and the user representation for that item is sum_k g_tk(i) E_k(u). The score is

    s_t(u, i) = sum_k g_tk(i) <E_k(u), v(i)> = <[E_1(u); ...; E_K(u)], [g_t1(i) v(i); ...; g_tK(i) v(i)]>,

an inner product of a K*d user vector (the same for every task) and a K*d item vector per task:
this is how MVKE is served with an ANN index, and why its storage grows with K and the number of
tasks (the cost the CSMF paper reports).

Choices and simplifications:
* One item tower shared by all tasks (the tag tower), and per-task virtual-kernel gates: task t
  queries the kernels with W_t v(i) (W_t a d x d matrix initialised to the identity), so every
  task starts from the same ranking and the sparse objectives move away from it only as far as
  their data says. (Tried first: an item tower per task, then per-task output heads on a shared
  tower; both left conversion at random level on small budgets, e.g. Recall@50 0.0055 vs random
  0.0066 on a KuaiRand smoke run of 20k rows, 1 epoch.)
* All K experts and their kernels are shared by all tasks (the paper can also give tasks
  private experts).
* An expert is an MLP (cfg.model.hidden) over the shared user feature embedding; the paper's
  experts additionally attend over the feature fields with their kernel as the query. K = 2
  (`N_EXPERTS`), which with two tasks gives the paper's 4x item storage.
* Every objective of the data is a task (exposure too: it feeds the shared experts), trained
  jointly with the in-batch sampled softmax of each objective (log-Q, accidental hits removed,
  same-request negatives for the first objective) and CSMF's per-objective sample budget
  (`multitask.joint_train_loop`). Under the comparison protocol the joint schedule is one part
  ("joint"), judged by every objective's vectors.
"""

from __future__ import annotations

import math
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
    make_tower,
    users_of,
    with_seed,
)
from csmf_core.baselines.multitask import MLP, FeatureEmbedding, train_objective_towers
from csmf_core.cascade import CascadeData, apply_threads
from csmf_core.config import CSMFConfig, ModelConfig
from csmf_core.evaluate import EvalRows, encode_items
from csmf_core.model import TowerInputs, TowerSpec
from csmf_core.rows import FeatureTables

N_EXPERTS = 2  # virtual-kernel experts K


class MVKE(nn.Module):
    def __init__(
        self, user_spec: TowerSpec, item_spec: TowerSpec, cfg: ModelConfig, n_tasks: int, *, seed: int, k: int
    ):
        super().__init__()
        d = cfg.dim
        self.dim, self.k = d, k
        self.embed = FeatureEmbedding(user_spec, cfg, seed=seed)
        self.experts = nn.ModuleList(
            MLP(self.embed.out_dim, cfg.hidden, d, seed=seed * 17 + j + 1) for j in range(k)
        )
        gen = torch.Generator().manual_seed(seed * 29 + 3)
        self.kernels = nn.Parameter(torch.randn(k, d, generator=gen) / math.sqrt(d))
        self.item = make_tower(item_spec, cfg, seed=seed + 7919)
        self.gate_query = nn.Parameter(torch.eye(d).repeat(n_tasks, 1, 1))  # (T, d, d), W_t

    def experts_out(self, x: TowerInputs) -> torch.Tensor:
        """(B, K, d) expert outputs E_k(u)."""
        h = self.embed(x)
        return torch.stack([e(h) for e in self.experts], dim=1)

    def item_and_gate(self, x: TowerInputs, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, d) item vector v(i) (shared) and (B, K) gate g_t(i) of `task` (rows sum to 1)."""
        v = self.item(x, None)
        q = v @ self.gate_query[task]
        return v, torch.softmax(q @ self.kernels.T / math.sqrt(self.dim), dim=1)

    def user_vector(self, x: TowerInputs) -> torch.Tensor:
        """(B, K*d) served user vector [E_1; ...; E_K] (the same for every task)."""
        return self.experts_out(x).flatten(1)

    def item_vector(self, x: TowerInputs, task: int) -> torch.Tensor:
        """(B, K*d) served item vector of `task`: [g_1 v; ...; g_K v]."""
        v, g = self.item_and_gate(x, task)
        return (g[:, :, None] * v[:, None, :]).flatten(1)


def fit(
    data: CascadeData, cfg: CSMFConfig, seed: int, on_step: OnStep = None, *, hook: EpochHook = NO_HOOK
) -> MethodResult:
    """Train MVKE jointly on every objective; serve a K*d user vector and a K*d item vector per task."""
    cfg = with_seed(cfg, seed)
    apply_threads(cfg)
    t0 = time.perf_counter()
    n = len(data.objectives)
    model = MVKE(data.user_spec, data.item_spec, cfg.model, n, seed=seed, k=N_EXPERTS)

    def encode(users: EvalRows, cat: FeatureTables) -> Vectors:
        u = users_of(model.user_vector, cat, users)
        items = {
            o: encode_items(lambda x, t=t: model.item_vector(x, t), cat)
            for t, o in enumerate(data.objectives)
        }
        return {o: u for o in data.objectives}, items

    log = train_objective_towers(
        [model],
        data,
        cfg,
        lambda t, x: model.user_vector(x),
        lambda t, x: model.item_vector(x, t),
        seed=seed,
        name="mvke",
        on_step=on_step,
        hook=hook,
        encode=encode,
    )
    train_seconds = time.perf_counter() - t0
    hook.finish(encode)
    cat = data.catalog_tables("eval")
    users, items = encode(data.eval, cat)
    with torch.no_grad():
        all_items = cat.item_inputs(torch.arange(1, cat.items_cat.shape[0]))
        gate_mean = {
            o: model.item_and_gate(all_items, t)[1].mean(0).tolist() for t, o in enumerate(data.objectives)
        }
    return MethodResult(
        method="mvke",
        user_vecs=users,
        item_vecs=items,
        train_seconds=train_seconds,
        n_params=count_params(model),
        item_bytes_per_item=4 * sum(v.shape[1] for v in items.values()),
        info={"train": log.summary(), "experts": N_EXPERTS, "mean_gate": gate_mean},
    )
