"""MOPPR: page-view-level, multi-positive listwise softmax over graded objectives, one vector.

Source: Zheng et al., "Multi-Objective Personalized Product Retrieval in Taobao Search" (2022,
arXiv 2210.04170), the CSMF paper's strongest baseline and its online control (seeds/000).
MOPPR builds *entire-space multi-positive* samples: one sample is a page view (request) with all
its items, graded by the deepest objective reached (relevance < exposure < click < purchase),
and trains a single two-tower model with a modified softmax so that every positive of a page
view is ranked above everything graded lower. One user vector and one item vector serve every
objective.

Here (`moppr_loss`): a page view's rows are its exposed items, item r graded by its level g_r
(0 = exposed only, 1 = clicked, 2 = converted, ...); its same-request unexposed items are
graded below every exposed one. For each row r, the softmax's denominator holds

    its own item; the items of the same page view with a lower grade (g_c < g_r); the page
    view's unexposed items; every item of the *other* page views in the batch (in-batch
    negatives, accidental hits with item r removed),

with log-Q correction (exposure popularity: in-batch items are drawn from exposed rows) on the
in-batch columns, like every other method. Rows are weighted by `GRADE_WEIGHTS[g_r]` (deeper
objectives count more) and the loss is the weighted mean. Same-page-view items of equal or
higher grade are neither positives nor negatives for r.

Simplifications: Taobao's query-side relevance objective and its multi-grained query encoder do
not apply (no queries here); a page view is a run of consecutive training rows of one user with
the same same-request negatives and histories (prep sorts rows by time, user, item, so this is
the request when the data has request ids; without them it is the user's events of one
timestamp), cut to at most `MAX_PV_ROWS` rows. A batch holds about train.batch_size rows in
whole page views; the model makes cfg.epochs_for(0) passes over the page views (every training
row is an exposure positive), the first objective's budget in CSMF. Under the comparison protocol
the model is one part ("model"), judged by every objective it serves (all, with the one vector).
"""

from __future__ import annotations

import dataclasses
import time

import torch
import torch.nn.functional as F

from csmf_core.baselines.base import MethodResult
from csmf_core.baselines.common import (
    NO_HOOK,
    EpochHook,
    OnStep,
    PlainTwoTower,
    batch_scores,
    count_params,
    stage_log_q,
    train_loop,
    two_tower_encode,
    uses_request_negatives,
    with_seed,
)
from csmf_core.cascade import CascadeData, apply_threads
from csmf_core.config import CSMFConfig
from csmf_core.losses import NEG_INF
from csmf_core.rows import TrainRows

GRADE_WEIGHTS = (1.0, 2.0, 3.0)  # row weight by grade (level); deeper levels reuse the last value
MAX_PV_ROWS = 64


def moppr_loss(
    scores: torch.Tensor,
    items: torch.Tensor,
    pv: torch.Tensor,
    level: torch.Tensor,
    *,
    temperature: float = 1.0,
    log_q: torch.Tensor | None = None,
    extra_scores: torch.Tensor | None = None,
    extra_items: torch.Tensor | None = None,
    weights: tuple[float, ...] = GRADE_WEIGHTS,
) -> torch.Tensor:
    """Graded multi-positive softmax over page views (module docstring).

    scores: (B, B) user of row r . item of row c; items, pv, level: (B,) item index, page-view id
    and grade of each row; log_q: (B,) log sampling probability of each in-batch item or None;
    extra_scores / extra_items: (B, M) the row's unexposed same-request items (item 0 = padding).
    Returns the scalar weighted mean of the per-row losses.
    """
    b = scores.shape[0]
    logits = scores / temperature
    if log_q is not None:
        logits = logits - log_q[None, :]
    eye = torch.eye(b, dtype=torch.bool, device=scores.device)
    same_pv = pv[:, None] == pv[None, :]
    lower = level[None, :] < level[:, None]  # column graded below the row
    hit = items[:, None] == items[None, :]
    valid = eye | (~hit & (~same_pv | lower))
    logits = logits.masked_fill(~valid, NEG_INF)
    if extra_scores is not None:
        x = extra_scores / temperature
        x = x.masked_fill((extra_items == 0) | (extra_items == items[:, None]), NEG_INF)
        logits = torch.cat([logits, x], dim=1)
    per_row = F.cross_entropy(logits, torch.arange(b, device=scores.device), reduction="none")
    w = torch.tensor(weights, dtype=per_row.dtype, device=per_row.device)
    wr = w[level.long().clamp(max=len(weights) - 1)]
    return (wr * per_row).sum() / wr.sum()


def page_views(rows: TrainRows, max_rows: int = MAX_PV_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """(starts, lengths) of page views: runs of consecutive rows with the same user, same-request
    negatives and histories, cut to at most `max_rows` rows."""
    n = len(rows)
    if n == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    new = torch.ones(n, dtype=torch.bool)
    same = rows.u[1:] == rows.u[:-1]
    if rows.neg is not None:
        same &= (rows.neg[1:] == rows.neg[:-1]).all(dim=1)
    for h in rows.hists:
        same &= (h[1:] == h[:-1]).all(dim=1)
    new[1:] = ~same
    starts = torch.nonzero(new).flatten()
    ends = torch.cat([starts[1:], torch.tensor([n])])
    out_s, out_l = [], []
    for s, e in zip(starts.tolist(), ends.tolist()):
        for c in range(s, e, max_rows):
            out_s.append(c)
            out_l.append(min(max_rows, e - c))
    return torch.tensor(out_s, dtype=torch.long), torch.tensor(out_l, dtype=torch.long)


class PageViews:
    """Page views as a pool for `train_loop`: len() = number of page views; select(idx) gives the
    rows of those page views and a page-view id per row."""

    def __init__(self, rows: TrainRows, starts: torch.Tensor, lengths: torch.Tensor):
        self.rows, self.starts, self.lengths = rows, starts, lengths

    def __len__(self) -> int:
        return int(self.starts.numel())

    def select(self, idx: torch.Tensor) -> tuple[TrainRows, torch.Tensor]:
        lens = self.lengths[idx]
        pv = torch.repeat_interleave(torch.arange(idx.numel()), lens)
        offset = torch.arange(int(lens.sum())) - torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
        return self.rows.select(self.starts[idx][pv] + offset), pv


def fit(
    data: CascadeData, cfg: CSMFConfig, seed: int, on_step: OnStep = None, *, hook: EpochHook = NO_HOOK
) -> MethodResult:
    """Train one two-tower model with the graded page-view softmax; one vector serves every objective."""
    cfg = with_seed(cfg, seed)
    apply_threads(cfg)
    t0 = time.perf_counter()
    rows = data.rows
    starts, lengths = page_views(rows)
    pool = PageViews(rows, starts, lengths)
    mean_len = float(lengths.float().mean())
    pv_batch = max(2, round(cfg.train.batch_size / mean_len))
    req = uses_request_negatives(cfg, 0, rows)
    log_q = stage_log_q(data, 0) if cfg.loss.logq else None
    model = PlainTwoTower(data.user_spec, data.item_spec, cfg.model, seed=seed)

    def loss_fn(batch):
        b, pv = batch
        _, scores, extra = batch_scores(model.user_vectors, model.item_vectors, data.tables, b, req)
        return moppr_loss(
            scores,
            b.i,
            pv,
            b.level,
            temperature=cfg.loss.temperature,
            log_q=None if log_q is None else log_q[b.i],
            extra_scores=extra,
            extra_items=b.neg if req else None,
        )

    pv_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=pv_batch))
    encode = two_tower_encode(model.user_vectors, model.item_vectors, data.objectives)
    hook.begin("model", [model], encode)
    model.train()
    log = train_loop(
        list(model.parameters()),
        pool,
        loss_fn,
        pv_cfg,
        epochs=hook.epochs("model", cfg.epochs_for(0)),
        seed=seed * 1009,
        name="moppr",
        on_step=on_step,
        on_epoch=hook.on_epoch("model"),
    )
    model.eval()
    hook.end("model")
    train_seconds = time.perf_counter() - t0
    hook.finish(encode)
    users, items = encode(data.eval, data.catalog_tables("eval"))
    v = items[data.objectives[0]]
    return MethodResult(
        method="moppr",
        user_vecs=users,
        item_vecs=items,
        train_seconds=train_seconds,
        n_params=count_params(model),
        item_bytes_per_item=4 * int(v.shape[1]),  # one vector shared by every objective
        info={
            "train": log.summary(),
            "page_views": len(pool),
            "mean_page_view_rows": round(mean_len, 2),
            "page_views_per_batch": pv_batch,
        },
    )
