"""Losses: sampled softmax with in-batch negatives, and CSMF's cross-stage adaptive margin (AML).

Scores are functions of vectors; losses are functions of scores. Shapes: B = batch rows,
M = extra (same-request) negatives per row.

Sampled softmax for row i (positive = column i of the in-batch score matrix):

    L_i = -log( exp(l_ii) / (exp(l_ii) + sum_{j != i, item_j != item_i} exp(l_ij - m_ij)
                                        + sum_m exp(x_im - m'_im)) )

with l = score / temperature - log q(item_j) (log-Q correction on in-batch columns only, Yi et
al. 2019), x = extra negatives' scores / temperature, and margins m = 0 unless AML is on.
An in-batch column holding the same item as row i's positive is an *accidental hit*: it is not a
negative and is removed (a huge negative additive bias: exactly 0 after exp, like -inf), as are
padded extra negatives (item 0) and extra negatives equal to the positive.

AML margin for positive i and negative j from upstream scores up (constants, no gradient):

    m_ij = (up_i - up_j) + sigma          if up_i >= up_j
    m_ij = eta * (up_j - up_i) + sigma    if up_i <  up_j

subtracted from the negative's logit exactly as in the paper's Eq. 6.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from csmf_core.config import LossConfig

NEG_INF = float("-inf")


def removed_bias(dtype: torch.dtype) -> float:
    """Additive bias of a removed in-batch column: a quarter of the dtype's most negative finite
    value. exp(bias + any finite logit - max) is exactly 0, so the loss and its gradient equal those
    of a -inf entry; a finite value lets the bias be built by arithmetic (0 * -inf would be nan)."""
    return torch.finfo(dtype).min / 4


@dataclass
class LossTerms:
    loss: torch.Tensor  # scalar, mean over rows
    n_neg: float  # mean number of valid negatives per row (diagnostic)


def item_log_q(counts: torch.Tensor) -> torch.Tensor:
    """(N,) log of each item's share of positives, the log-Q correction's log q (items never seen
    get the smallest share). counts: (N,) positives per item in the training window."""
    c = counts.double().clamp_min(0.5)
    return torch.log(c / c.sum()).float()


def aml_margins(
    up_pos: torch.Tensor,
    up_neg: torch.Tensor,
    sigma: float,
    eta: float,
    *,
    negate: bool = False,
    overwrite: bool = False,
    exact_branches: bool = False,
) -> torch.Tensor:
    """Adaptive margins. up_pos: (B, 1) or (B,), up_neg: (B, K) -> (B, K).

    Computed as sigma + (1 + eta) * relu(d) - eta * d with d = up_pos - up_neg, which is
    d + sigma for d >= 0 and eta * (-d) + sigma for d < 0 (no boolean select: `torch.where` and
    `masked_fill` on a (B, B) matrix cost 3-5x more than this arithmetic on the CPU builds measured).

    negate=True returns -margins, bit for bit what negating the result would give, without the extra
    pass over the matrix: every step is computed with its sign flipped (IEEE rounding is symmetric, so
    round(-x) = -round(x)); only the sign of an exact zero may differ, which no later step can see
    (it is added to a logit). sigma = 0 (the default) skips adding it (x + 0 = x).

    overwrite=True: `up_neg` is a temporary of the caller's and becomes d in place (-up_neg + up_pos,
    bit for bit up_pos - up_neg: IEEE subtraction is the addition of the negation), one (B, K)
    allocation fewer; `up_pos` must not share memory with it (pass a copy of a diagonal).

    exact_branches=True (needs eta >= 0): the margins as max(d, -eta * d) + sigma, which is d + sigma
    for d >= 0 and eta * (-d) + sigma below, each branch's value rounded once as the formula above
    writes it (the relu form rounds (1 + eta) * d and eta * d and subtracts them), in three passes
    over the matrix instead of five (with negate: -margins = min(-d, eta * d) - sigma, -d taken as
    up_neg - up_pos). Not bit-identical to the default form, which `train.split_scores=false` keeps.
    """
    if up_pos.dim() == 1:
        up_pos = up_pos[:, None]
    if overwrite and up_pos.untyped_storage().data_ptr() == up_neg.untyped_storage().data_ptr():
        raise ValueError("aml_margins(overwrite=True): up_pos shares memory with up_neg; pass a copy")
    if exact_branches:
        if not eta >= 0:
            raise ValueError(f"aml_margins(exact_branches=True) needs eta >= 0, got {eta}")
        if negate:  # -m = min(-d, eta * d) - sigma, from -d = up_neg - up_pos
            nd = up_neg.sub_(up_pos) if overwrite else up_neg - up_pos
            m = torch.minimum(nd, nd * -eta, out=nd)
            return m.sub_(sigma) if sigma else m
        d = up_neg.neg_().add_(up_pos) if overwrite else up_pos - up_neg
        m = torch.maximum(d, d * -eta, out=d)
        return m.add_(sigma) if sigma else m
    if overwrite:
        diff = up_neg.neg_().add_(up_pos)
    else:
        diff = up_pos - up_neg
    sign = -1.0 if negate else 1.0  # negate: -(1 + eta) relu(d) + eta d - sigma
    m = torch.relu(diff).mul_(sign * (1.0 + eta))
    m.add_(diff, alpha=-sign * eta)  # (torch's sub_ with alpha is this add with -alpha)
    return m.add_(sign * sigma) if sigma else m


def accidental_hits(items: torch.Tensor) -> torch.Tensor:
    """(B, B) bool: column j holds row i's positive item but j != i. items: (B,) int."""
    same = items[:, None] == items[None, :]
    same.fill_diagonal_(False)
    return same


def _hit_pairs(items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The accidental hits as index pairs: (rows, cols, hits per row), all int64.

    The same entries as `accidental_hits(items)` (in another order), built from the rows sorted by
    item: each row of a group of c equal items pairs with the c - 1 others of its group, enumerated by
    a repeat, so the work follows the number of pairs, not B^2. Boolean (B, B) matrices and masked
    fills cost several times more than float arithmetic on the CPU builds measured, and comparing the
    rows with duplicates among themselves, then `nonzero`, still cost ~0.15 ms a step when half the
    rows of a batch share items (the generated worlds' batches). On the CPU the ~15 index operations
    on B entries run in NumPy (~40 us in all instead of ~100 us of torch dispatch); elsewhere in torch
    (one host sync: the number of pairs).
    """
    if items.device.type == "cpu":
        out = _hit_pairs_sorted(items.numpy(), _NumpyOps)
        return tuple(torch.from_numpy(x.astype(np.int64, copy=False)) for x in out)  # type: ignore[return-value]
    return _hit_pairs_sorted(items, _TorchOps(items.device))


class _NumpyOps:
    """The array operations `_hit_pairs_sorted` needs, on NumPy arrays."""

    @staticmethod
    def argsort(x):
        return np.argsort(x, kind="stable")

    @staticmethod
    def arange(n):
        return np.arange(n, dtype=np.int64)

    @staticmethod
    def ones(n):
        return np.ones(n, dtype=bool)

    @staticmethod
    def running_max(x):
        return np.maximum.accumulate(x)

    @staticmethod
    def running_min_from_end(x):
        return np.minimum.accumulate(x[::-1])[::-1]

    @staticmethod
    def repeat(x, counts, total):
        return np.repeat(x, counts)

    where = staticmethod(np.where)
    cumsum = staticmethod(np.cumsum)
    empty_like = staticmethod(np.empty_like)


class _TorchOps:
    """The same operations as torch calls on `device` (`_hit_pairs` off the CPU)."""

    def __init__(self, device: torch.device | str):
        self.device = device

    def argsort(self, x):
        return torch.argsort(x, stable=True)

    def arange(self, n):
        return torch.arange(n, device=self.device)

    def ones(self, n):
        return torch.ones(n, dtype=torch.bool, device=self.device)

    def running_max(self, x):
        return torch.cummax(x, 0).values

    def running_min_from_end(self, x):
        return torch.cummin(x.flip(0), 0).values.flip(0)

    def repeat(self, x, counts, total):
        return torch.repeat_interleave(x, counts, output_size=total)

    def where(self, cond, x, y):
        return torch.where(cond, x, y)

    def cumsum(self, x):
        return torch.cumsum(x, 0)

    def empty_like(self, x):
        return torch.empty_like(x)


def _hit_pairs_sorted(items, xp):
    """`_hit_pairs` on a NumPy array (xp = _NumpyOps) or a tensor (xp = _TorchOps(device)):
    (rows, cols, per_row)."""
    n = items.shape[0]
    order = xp.argsort(items)
    s = items[order]
    pos = xp.arange(n)
    differs = s[1:] != s[:-1]
    first, last = xp.ones(n), xp.ones(n)  # sorted positions where a group of equal items starts / ends
    first[1:] = differs
    last[:-1] = differs
    start = xp.running_max(xp.where(first, pos, 0))  # the first position of each position's group
    k = xp.running_min_from_end(xp.where(last, pos, n - 1)) - start  # its partners: group size - 1
    per_row = xp.empty_like(k)
    per_row[order] = k
    total = int(k.sum())
    a = xp.repeat(pos, k, total)  # each position once per partner
    j = xp.arange(total) - xp.repeat(xp.cumsum(k) - k, k, total)  # 0 .. k - 1 within its run
    first_of = start[a]
    b = first_of + j + (j >= a - first_of)  # the group's positions in order, a itself skipped
    return order[a], order[b], per_row


def sampled_softmax(
    scores: torch.Tensor | Callable[[torch.Tensor | None, float], torch.Tensor],
    items: torch.Tensor,
    *,
    temperature: float = 1.0,
    log_q: torch.Tensor | None = None,
    margins: torch.Tensor | None = None,
    margin_bias: torch.Tensor | None = None,
    extra_scores: torch.Tensor | None = None,
    extra_items: torch.Tensor | None = None,
    extra_margins: torch.Tensor | None = None,
    score_dtype: torch.dtype | None = None,
) -> LossTerms:
    """Sampled softmax over in-batch (and optional extra) negatives.

    scores: (B, B) user_i . item_j in the current mode; the diagonal holds the positives. Or a
        function `scores(bias, scale)` returning bias + scale * scores, with `bias` the no-grad (B, B)
        matrix built below (log-Q, margins, removed columns; the function may overwrite it) or None
        when there is nothing to add, and scale = 1 / temperature: the caller adds its scores into the
        bias in place (an `addmm_`), one (B, B) pass and buffer fewer than scores + bias
        (`csmf_core.train`'s split scores). The same loss up to rounding, not bit for bit. The bias
        it is given has `score_dtype` (the scores' dtype; default float32).
    items: (B,) item index of each row's positive (for accidental-hit removal).
    log_q: (B,) log sampling probability of each in-batch item, or None.
    margins: (B, B) AML margins for in-batch negatives (diagonal ignored), or None.
    margin_bias: instead of margins, their negation as `aml_margins(..., negate=True)` returns it
        (one pass over the (B, B) matrix fewer; the same loss bit for bit). It is taken over:
        the function builds its bias in it, in place.
    extra_scores / extra_items / extra_margins: (B, M) same-request negatives; item 0 = padding.
    """
    into = scores if callable(scores) else None
    if into is None:
        logits = scores if temperature == 1.0 else scores / temperature
        dtype = logits.dtype
    else:
        dtype = score_dtype or torch.float32
    n_cols = items.numel()  # in-batch columns: one per row
    with torch.no_grad():  # log-Q, margins and removed columns go into one additive (B, B) bias
        rows, cols, per_row = _hit_pairs(items)
        n_neg = (n_cols - 1) - per_row.to(dtype)
        if margins is not None:
            if margin_bias is not None:
                raise ValueError("give margins or margin_bias, not both")
            margin_bias = -margins
        bias = margin_bias
        if bias is not None:
            bias.diagonal().zero_()  # the positive gets no margin
            if log_q is not None:
                bias.sub_(log_q[None, :])
        elif log_q is not None:
            bias = (-log_q[None, :]).expand(n_cols, n_cols).clone()
        if rows.numel():
            if bias is None:
                bias = torch.zeros((n_cols, n_cols), dtype=dtype, device=items.device)
            bias[rows, cols] = removed_bias(dtype)
    if into is not None:
        logits = into(None if bias is None else bias.to(dtype), 1.0 / temperature)
    elif bias is not None:
        logits = logits + bias
    if extra_scores is not None:
        x = extra_scores / temperature
        if extra_margins is not None:
            x = x - extra_margins
        invalid = (extra_items == 0) | (extra_items == items[:, None])
        x = x.masked_fill(invalid, NEG_INF)
        logits = torch.cat([logits, x], dim=1)
        n_neg = n_neg + (~invalid).sum(dim=1).float()
    target = torch.arange(logits.shape[0], device=logits.device)
    loss = F.cross_entropy(logits, target)
    return LossTerms(loss=loss, n_neg=float(n_neg.float().mean()))


# fast upstream (loss.fast_upstream): an entry of the product of the stages' sigmoids at least this
# (2^-100: every factor a normal float32, the product's relative error a few ulps) gives its log; one
# below it (the log-sigmoids summing to less than about -69) gets the sum of log-sigmoids instead
FAST_UPSTREAM_MIN = 2.0**-100


def upstream_scores(
    segment_scores: list[torch.Tensor],
    stage: int,
    how: str = "log_prob",
    *,
    overwrite: bool = False,
    fast: bool = False,
) -> torch.Tensor:
    """Upstream score for stage `stage` >= 1 from per-segment score matrices.

    segment_scores[r]: (B, K) contribution of output segment r (dims owned by stage r), so the
    mode-r score is s_r = sum_{q <= r} segment_scores[q] (unit-level ownership).
    how = "log_prob": log of the product of cascade probabilities of the stages before `stage`,
        each the logistic of its mode score: sum_{r < stage} log sigmoid(s_r). For the click stage
        this is log sigmoid(s_exposure), a monotone transform of the exposure score (same AML
        branch for every pair; margins compressed for high scores).
    how = "last_logit": the raw score of mode stage - 1 (the paper's click-stage definition).
    overwrite=True: the segment matrices are the caller's temporaries; the running mode score is
    accumulated in them in place (segment_scores[r] + running, bit for bit running + segment_scores[r]:
    IEEE addition commutes), so they are overwritten, and the result may be one of them.
    fast=True ("log_prob" on float32 / float64 scores; ignored otherwise; `loss.fast_upstream`, on in
    the default config, while this function's default stays the exact form): log(prod_{r < stage}
    sigmoid(s_r)), one sigmoid per stage and one log per entry instead of a log-sigmoid per stage
    (whose log1p is most of its cost on the CPU builds measured: 2x the sigmoid's and the log's
    together). The same values up to float32 rounding (a few ulps of the value, like the exact sum's
    own rounding; entries whose log-sigmoid is above about -6e-8 read 0); an entry whose product is
    below FAST_UPSTREAM_MIN gets the sum of log-sigmoids instead (from the running mode scores kept).
    The segment matrices are left as the exact form leaves them.
    """
    if stage < 1:
        raise ValueError("AML has no upstream for stage 0")
    if how not in ("log_prob", "last_logit"):
        raise ValueError(f"unknown upstream definition {how!r}")
    runs = [segment_scores[0]]  # the running mode scores s_0 .. s_{stage-1}
    for r in range(1, stage):
        runs.append(segment_scores[r].add_(runs[-1]) if overwrite else runs[-1] + segment_scores[r])
    if how == "last_logit":
        return runs[-1]
    if not (fast and runs[0].dtype in (torch.float32, torch.float64)):
        return _log_sigmoid_sum(runs)
    prob = torch.sigmoid(runs[0])
    for run in runs[1:]:
        prob.mul_(torch.sigmoid(run))
    low = prob.numel() and not bool(prob.min() >= FAST_UPSTREAM_MIN)  # NaN: not >=, so low
    at = torch.nonzero(~(prob >= FAST_UPSTREAM_MIN), as_tuple=True) if low else None
    out = prob.log_()
    if at is not None:
        out[at] = _log_sigmoid_sum([run[at] for run in runs])
    return out


def _log_sigmoid_sum(runs: list[torch.Tensor]) -> torch.Tensor:
    """sum_r log sigmoid(runs[r]), in a buffer of its own."""
    total = F.logsigmoid(runs[0])
    for run in runs[1:]:
        total.add_(F.logsigmoid(run))
    return total


def aml_bias(
    segment_scores: list[torch.Tensor],
    stage: int,
    loss: LossConfig,
    extra_segment_scores: list[torch.Tensor] | None = None,
    *,
    mode_score: bool = False,
    exact_branches: bool = False,
) -> tuple[torch.Tensor, ...]:
    """AML for stage `stage` >= 1: (margin_bias, extra_margins) as `sampled_softmax` takes them.

    segment_scores: per-segment (B, B) in-batch score matrices (`upstream_scores`);
    extra_segment_scores: the same for the (B, M) extra negatives, or None (extra_margins None).
    Both lists are the caller's temporaries and are overwritten (`overwrite=True` above: bit for bit
    the allocating forms, fewer (B, B) buffers). Call under torch.no_grad(): margins are constants.
    mode_score=True: a third value, the (B, B) score of mode `stage - 1` (the sum of the segment
    matrices, which `upstream_scores` accumulates anyway): the part of stage `stage`'s score that
    its training cannot change (csmf_core.train.stage_columns).
    exact_branches: as in `aml_margins` (the margins in fewer passes; not bit-identical).
    """
    up = upstream_scores(segment_scores, stage, loss.upstream, overwrite=True, fast=loss.fast_upstream)
    # the running sum ends in segment matrix stage - 1; "last_logit" returns that very buffer, which
    # the margins below overwrite, so it is copied first ("log_prob" returns a buffer of its own)
    last = segment_scores[stage - 1]  # (overwrite=True: the running sum is accumulated in place)
    upper = None if not mode_score else (last if up is not last else up.clone())
    up_pos = up.diagonal().clone()  # the positives' upstream, kept before `up` becomes d
    margin_bias = aml_margins(
        up_pos, up, loss.sigma, loss.eta, negate=True, overwrite=True, exact_branches=exact_branches
    )
    extra_margins = None
    if extra_segment_scores is not None:
        up_n = upstream_scores(
            extra_segment_scores, stage, loss.upstream, overwrite=True, fast=loss.fast_upstream
        )
        extra_margins = aml_margins(
            up_pos, up_n, loss.sigma, loss.eta, overwrite=True, exact_branches=exact_branches
        )
    return (margin_bias, extra_margins, upper) if mode_score else (margin_bias, extra_margins)
