"""DTML: a multi-task cross-feature teacher distilled into a two-tower student (per-task vectors).

Source: Zhao et al., "Distillation based Multi-task Learning: A Candidate Generation Model for
Improving Reading Duration" (SIGIR 2023; the CSMF paper's "DTML", seeds/000). A ranking-style
multi-task teacher sees user and item features together (cross features) and models the deeper
objective through its dependence on the click; a two-tower candidate-generation student, trained
at the same time, learns the objectives from the data and from the teacher's scores.

Here:
* Teacher: the user and item feature embeddings concatenated -> MLP (cfg.model.hidden, shared
  bottom) -> one logit per step after the first objective (pCTR, pCVR, ...). It is trained on the
  exposed rows with the entire-space cascade loss (`distill.cascade_bce`: BCE of pCTR on clicks and
  of pCTCVR = pCTR * pCVR on conversions), the paper's way of tying the deeper objective to the
  click (its duration regression becomes a conversion probability here).
* Student: a plain user tower and item tower with output (T-1) * cfg.model.dim, split into one
  d-dim vector per objective after the first (click, conversion). Its loss per objective is the
  same in-batch sampled softmax (log-Q, accidental hits removed) as every method, plus
  `distill.DISTILL_WEIGHT` times the listwise distillation KL(teacher || student) (`distill.listwise_kl`)
  over each exposed row's candidate list (its item, its unexposed same-request items, and
  `distill.DISTILL_INBATCH` other in-batch items): the teacher's log probability of the objective
  *given exposure*, plus the log exposure popularity of the item (the prior the teacher cannot
  know: a ranking teacher only sees exposed items, while retrieval ranks the whole catalog, so
  the target is P(exposed) x P(objective | exposed); the same prior the log-Q correction stands
  for), against the student's score / temperature. The teacher gets no gradient from it.
  Without the prior the student ranked near random on a tiny generated world (Recall@50 click
  0.077 vs random 0.071); with it 0.330.
* Joint training with CSMF's per-objective budget (`multitask.joint_train_loop`): the exposed rows
  (teacher + distillation) make cfg.epochs_for(0) passes, objective t's positives
  cfg.epochs_for(t) passes.
Simplifications: no duration-specific tricks (duration bucketing, negative-sample handling of
unread items); a fixed distillation weight; the teacher is not kept for serving. The exposure
objective has no student vector (DTML serves click and conversion). Under the comparison protocol the
joint schedule is one part ("joint"), judged by the student's click and conversion vectors.
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
    RowItems,
    Vectors,
    count_params,
    make_tower,
    scores_loss,
    users_of,
    with_seed,
)
from csmf_core.baselines.distill import train_distilled
from csmf_core.baselines.multitask import MLP, FeatureEmbedding
from csmf_core.cascade import CascadeData, apply_threads
from csmf_core.config import CSMFConfig, ModelConfig
from csmf_core.evaluate import EvalRows, encode_items
from csmf_core.model import TowerInputs, TowerSpec
from csmf_core.rows import FeatureTables


class CrossTeacher(nn.Module):
    """Shared-bottom multi-task teacher over concatenated user and item features -> (B, T-1) step logits."""

    def __init__(
        self, user_spec: TowerSpec, item_spec: TowerSpec, cfg: ModelConfig, n_steps: int, *, seed: int
    ):
        super().__init__()
        self.user = FeatureEmbedding(user_spec, cfg, seed=seed + 11)
        self.item = FeatureEmbedding(item_spec, cfg, seed=seed + 13)
        self.mlp = MLP(self.user.out_dim + self.item.out_dim, cfg.hidden, n_steps, seed=seed + 17)

    def pair_logits(self, hu: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """hu: (..., du) user features, hi: (..., di) item features -> (..., T-1) step logits."""
        return self.mlp(torch.cat([hu, hi], dim=-1))


class TwoTowerStudent(nn.Module):
    """User and item towers with output n_obj * d; slice o is objective o's vector."""

    def __init__(
        self, user_spec: TowerSpec, item_spec: TowerSpec, cfg: ModelConfig, n_obj: int, *, seed: int
    ):
        super().__init__()
        self.d, self.n = cfg.dim, n_obj
        self.user = make_tower(user_spec, cfg, dim=cfg.dim * n_obj, seed=seed)
        self.item = make_tower(item_spec, cfg, dim=cfg.dim * n_obj, seed=seed + 7919)

    def user_vectors(self, x: TowerInputs) -> torch.Tensor:
        return self.user(x, None).view(-1, self.n, self.d)  # (B, n_obj, d)

    def item_vectors(self, x: TowerInputs) -> torch.Tensor:
        return self.item(x, None).view(-1, self.n, self.d)


def fit(
    data: CascadeData, cfg: CSMFConfig, seed: int, on_step: OnStep = None, *, hook: EpochHook = NO_HOOK
) -> MethodResult:
    """Train teacher and student jointly; serve the student's per-objective vectors (objectives 1..T-1)."""
    cfg = with_seed(cfg, seed)
    apply_threads(cfg)
    t0 = time.perf_counter()
    n = len(data.objectives)
    served = data.objectives[1:]
    teacher = CrossTeacher(data.user_spec, data.item_spec, cfg.model, n - 1, seed=seed * 7 + 1)
    student = TwoTowerStudent(data.user_spec, data.item_spec, cfg.model, n - 1, seed=seed)
    tables = data.tables
    d = cfg.model.dim

    def list_scores(b, lists):  # (B, L, n-1): row b's user against its list items, per objective
        items = RowItems(tables, b.day, lists)
        sv = items.own(items.encode(student.item_vectors), items.inv)  # (B, L, n-1, d)
        su = student.user_vectors(tables.user_inputs(b.u, b.hists))  # (B, n-1, d)
        return torch.einsum("bod,blod->blo", su, sv)

    def objective_terms(t, bt, log_q):
        uvec = student.user_vectors(tables.user_inputs(bt.u, bt.hists))[:, t - 1]
        items = RowItems(tables, bt.day, bt.i)
        vecs = items.encode(student.item_vectors)  # (U, n-1, d), or (days, U, n-1, d)
        yield scores_loss(items.pairs(uvec, vecs[..., t - 1, :], items.inv), bt.i, cfg, log_q=log_q)

    def encode(users: EvalRows, cat: FeatureTables) -> Vectors:
        u = users_of(lambda x: student.user_vectors(x).flatten(1), cat, users)
        v = encode_items(lambda x: student.item_vectors(x).flatten(1), cat)
        return (
            {o: u[:, k * d : (k + 1) * d].contiguous() for k, o in enumerate(served)},
            {o: v[:, k * d : (k + 1) * d].contiguous() for k, o in enumerate(served)},
        )

    log, parts = train_distilled(
        teacher, student, data, cfg, list_scores, objective_terms, seed=seed, name="dtml", on_step=on_step,
        hook=hook, encode=encode,
    )  # fmt: skip
    train_seconds = time.perf_counter() - t0
    hook.finish(encode)
    users, items = encode(data.eval, data.catalog_tables("eval"))
    return MethodResult(
        method="dtml",
        user_vecs=users,
        item_vecs=items,
        train_seconds=train_seconds,
        n_params=count_params(teacher, student),
        item_bytes_per_item=4 * sum(x.shape[1] for x in items.values()),
        info={"train": log.summary(), "last_terms": parts, "student_params": count_params(student)},
    )
