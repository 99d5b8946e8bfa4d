"""Teacher-student distillation for the baselines with a ranking-style teacher (dtml, dmmp).

A cross-feature teacher models the cascade over the exposure space (ESMM-style entire-space BCE,
`cascade_bce`); a retrieval student learns each objective's ranking of a list of candidates from
it (`listwise_kl` over `distill_lists`). `distill_terms` is the part both methods share: the
teacher's loss on an exposed batch and the summed listwise KL of the student's scores against the
teacher's target, P(exposed) x P(objective | exposed) (docs/baselines.md); `train_distilled` is
their joint training, each method giving its student's list scores and retrieval losses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from csmf_core.baselines.common import NO_HOOK, Encode, EpochHook, OnStep, RowItems, stage_log_q
from csmf_core.baselines.multitask import stage_pools, train_jointly
from csmf_core.cascade import CascadeData
from csmf_core.config import CSMFConfig
from csmf_core.optim import TrainLog
from csmf_core.rows import FeatureTables, TrainRows

DISTILL_WEIGHT = 1.0  # weight of the listwise distillation KL against the retrieval losses
DISTILL_INBATCH = 8  # in-batch items added to each distillation list


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


def teacher_step(
    teacher: nn.Module,
    tables: FeatureTables,
    b: TrainRows,
    n_inbatch: int,
    pair_logits,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher loss on an exposed batch and its list targets.

    Returns (cascade BCE on the batch's own pairs, (B, L, T-1) detached teacher log entire-space
    probabilities over the distillation lists, (B, L) list items). `pair_logits(hu, hi)` is the
    teacher's scoring function over feature embeddings. With item statistics every list item is
    seen as of its row's day (`common.RowItems`).
    """
    hu = teacher.user(tables.user_inputs(b.u, b.hists))
    lists = distill_lists(b, n_inbatch)
    items = RowItems(tables, b.day, lists)
    hi_all = items.encode(teacher.item)
    own = pair_logits(hu, items.own(hi_all, items.inv[:, 0]))
    bce = cascade_bce(own, b.level)
    with torch.no_grad():
        hl = items.own(hi_all, items.inv)  # (B, L, di)
        logp = cascade_log_probs(pair_logits(hu[:, None, :].expand(-1, hl.shape[1], -1), hl))
    return bce, logp, lists


def distill_terms(
    teacher: nn.Module,
    tables: FeatureTables,
    b: TrainRows,
    n_inbatch: int,
    exposure_log_q: torch.Tensor,
    student_logits: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher's cascade BCE, summed listwise KL) on exposed batch rows `b`.

    student_logits(lists): (B, L, T') the student's score / temperature of each list item for each
    distilled objective, lists (B, L) from `distill_lists`. The target of objective o is the
    teacher's log P(o | exposed) plus the item's log exposure popularity `exposure_log_q`
    (N_items,): the prior a ranking teacher, which only sees exposed items, cannot know.
    """
    bce, logp, lists = teacher_step(teacher, tables, b, n_inbatch, teacher.pair_logits)
    s = student_logits(lists)
    valid = lists > 0
    target = logp + exposure_log_q[lists][:, :, None]  # P(exposed) prior x teacher P(. | exposed)
    kl = sum(listwise_kl(target[:, :, o], s[:, :, o], valid) for o in range(s.shape[2]))
    return bce, kl


def train_distilled(
    teacher: nn.Module,
    student: nn.Module,
    data: CascadeData,
    cfg: CSMFConfig,
    list_scores: Callable[[TrainRows, torch.Tensor], torch.Tensor],
    objective_terms: Callable[[int, TrainRows, torch.Tensor], Iterator[torch.Tensor]],
    *,
    seed: int,
    name: str,
    on_step: OnStep = None,
    weight: float = DISTILL_WEIGHT,
    n_inbatch: int = DISTILL_INBATCH,
    hook: EpochHook = NO_HOOK,
    encode: Encode | None = None,
) -> tuple[TrainLog, dict[str, float]]:
    """Teacher and student trained jointly with CSMF's per-objective budget (`train_jointly`).

    A joint step sums, on the exposed batch (objective 0's pool), the teacher's cascade BCE plus
    `weight` x the listwise KL of `distill_terms`, the student's logits being list_scores(b, lists)
    (B, L, T') / loss.temperature; and on each later objective t's batch the terms
    objective_terms(t, batch, log_q_t) yields (the student's retrieval losses). Returns the log and
    the last step's {"teacher_bce", "distill_kl"}. hook, encode: the comparison protocol's epoch
    selection of the whole schedule (`multitask.train_jointly`), judged by the student's vectors.
    """
    pools = stage_pools(data)
    log_qs = [stage_log_q(data, t) for t in range(len(pools))]
    parts: dict[str, float] = {}

    def loss_fn(batches: list) -> torch.Tensor:
        total = torch.zeros(())
        b = batches[0]
        if b is not None:  # exposed rows: teacher loss + listwise distillation per served objective
            bce, kl = distill_terms(
                teacher,
                data.tables,
                b,
                n_inbatch,
                log_qs[0],
                lambda lists: list_scores(b, lists) / cfg.loss.temperature,
            )
            parts["teacher_bce"], parts["distill_kl"] = float(bce.detach()), float(kl.detach())
            total = total + bce + weight * kl
        for t in range(1, len(batches)):
            if batches[t] is not None:
                for term in objective_terms(t, batches[t], log_qs[t]):
                    total = total + term
        return total

    log = train_jointly(
        [teacher, student],
        pools,
        loss_fn,
        cfg,
        seed=seed,
        name=name,
        on_step=on_step,
        hook=hook,
        encode=encode,
    )
    return log, parts
