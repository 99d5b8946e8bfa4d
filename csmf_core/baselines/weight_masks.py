"""CSMF with weight-level masks: the paper's CPP read literally (per weight), served exactly.

Source: Deng et al., CSMF (SIGIR 2025; seeds/000 section 4.2) with PackNet-style per-weight
ownership (Mallya & Lazebnik, CVPR 2018). csmf-method.md section 3 explains why the default
CSMF owns *units*: with per-weight masks a later stage's weights change every hidden unit, so
the earlier modes' vectors are not sub-vectors of the full-mode vector and the one-vector fusion
of Eq. 8 is not exact. This variant keeps the per-weight reading and pays for exact serving:

* Ownership: every entry of every linear weight matrix has an owner stage; embedding tables
  are owned per column (a column is an input unit; per-row ownership of id tables would be
  per-entity, not per-parameter-role); biases stay with stage 0 (PackNet's convention).
* Cascade: train stage t on its positives in mode t (entries owned by stages <= t), with AML
  whose upstream scores come from separate mode-r forward passes (r < t), then CPP over the
  entries stage t owns in each weight matrix (information = |w|; rule, tau, ratio and
  freed_init from cfg.cpp), then accuracy recovery (cfg.recover), exactly as the unit cascade.
  Frozen entries get zero gradients and a fresh Adam per phase, so they stay bit-identical.
* Serving: item vector = concatenation of the per-mode item vectors [v^0; v^1; ...; v^{N-1}]
  (N * dim floats per item); the objective-t query is e^t in block t and zeros elsewhere (a fused
  query is [k_0 e^0; ...; k_{N-1} e^{N-1}]). `info["single_vector"]` records what serving only
  the full-mode item vector would give instead (mode-t queries against v^{N-1}).
* Under the comparison protocol each stage's train phase is a part ("train_<objective>") selected by
  its own objective's mode-t validation score, as CSMF's train steps are; a later stage's starting
  point (the previous mode plus the freed entries) is a candidate, stage 0's random start is not.
  Accuracy recovery keeps recover.epochs, as in CSMF.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch

from csmf_core.baselines.base import MethodResult
from csmf_core.baselines.common import (
    NO_HOOK,
    EpochHook,
    OnStep,
    RowItems,
    Vectors,
    count_params,
    stage_log_q,
    train_loop,
    users_of,
    uses_request_negatives,
    with_seed,
)
from csmf_core.cascade import CascadeData, apply_threads
from csmf_core.config import CSMFConfig
from csmf_core.cpp import select_pruned
from csmf_core.evaluate import EvalRows, encode_items
from csmf_core.losses import aml_bias, sampled_softmax
from csmf_core.metrics import recall_ndcg, topk_items
from csmf_core.model import TwoTower
from csmf_core.rows import FeatureTables, TrainRows


def initial_owners(model: TwoTower) -> dict[str, torch.Tensor]:
    """Stage 0 owns everything: (d,) per embedding column, full shape per linear weight, (out,) per bias."""
    owners = {}
    for name, p in model.named_parameters():
        if ".emb." in name or ".hist." in name:
            owners[name] = torch.zeros(p.shape[1], dtype=torch.uint8)
        else:
            owners[name] = torch.zeros(p.shape, dtype=torch.uint8)
    return owners


def prune_weights(
    model: TwoTower, owners: dict[str, torch.Tensor], stage: int, cfg: CSMFConfig, seed: int
) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """Per-weight CPP (or fixed ratio) on every linear weight and per-column on embeddings.

    Among the entries stage `stage` owns in one parameter, the lowest-|w| ones are handed to
    stage + 1. Returns new owners and {param: [entries kept, entries freed]}.
    """
    c = cfg.cpp
    params = dict(model.named_parameters())
    new = {k: v.clone() for k, v in owners.items()}
    stats: dict[str, list[int]] = {}
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, o in owners.items():
            if name.endswith(".bias"):
                continue
            w = params[name].detach()
            is_emb = o.dim() == 1
            info_all = w.abs().sum(dim=0) if is_emb else w.abs().flatten()
            own = torch.nonzero((o == stage).flatten()).flatten()
            if own.numel() < 2:
                continue
            idx = own[
                select_pruned(
                    info_all[own],
                    rule=c.rule,
                    tau=c.tau,
                    ratio=c.ratio,
                    min_keep=c.min_keep,
                    min_free=c.min_free,
                )
            ]
            new[name].view(-1)[idx] = stage + 1
            stats[name] = [int(own.numel() - idx.numel()), int(idx.numel())]
            if c.freed_init == "keep" or idx.numel() == 0:
                continue
            if is_emb:
                fresh = (
                    torch.zeros(w.shape[0], idx.numel())
                    if c.freed_init == "zero"
                    else (torch.randn(w.shape[0], idx.numel(), generator=gen) * 0.1)
                )
                params[name][:, idx] = fresh.to(w)
            else:
                bound = 1.0 / math.sqrt(w.shape[1])
                fresh = (
                    torch.zeros(idx.numel())
                    if c.freed_init == "zero"
                    else ((torch.rand(idx.numel(), generator=gen) * 2 - 1) * bound)
                )
                params[name].view(-1)[idx] = fresh.to(w)
    return new, stats


def _mode_loss(
    model: TwoTower,
    data: CascadeData,
    b: TrainRows,
    stage: int,
    cfg: CSMFConfig,
    log_q: torch.Tensor | None,
    use_neg: bool,
) -> torch.Tensor:
    """Mode-`stage` sampled softmax on batch rows `b` (AML from separate mode-r passes); with item
    statistics every candidate is scored as of its row's day (`common.RowItems`)."""
    tables = data.tables
    u_in = tables.user_inputs(b.u, b.hists)
    wanted = b.i if not use_neg else torch.cat([b.i, b.neg.flatten()])
    items = RowItems(tables, b.day, wanted)
    n = b.i.numel()
    pos = items.inv[:n]
    neg_pos = items.inv[n:].view(b.neg.shape) if use_neg else None
    uvec = model.user_vectors(u_in, stage)
    all_vec = items.encode(lambda x: model.item_vectors(x, stage))
    margin_bias = extra = extra_margins = None
    if use_neg:
        extra = torch.einsum("bd,bmd->bm", uvec, items.own(all_vec, neg_pos))
    if cfg.loss.aml and stage >= 1:
        with torch.no_grad():
            # mode-r scores by separate forward passes; upstream_scores wants per-segment
            # increments whose running sums are the mode scores
            modes, modes_n = [], []
            for r in range(stage):
                ur = model.user_vectors(u_in, r)
                vr = items.encode(lambda x, r=r: model.item_vectors(x, r))
                modes.append(items.pairs(ur, vr, pos))
                if use_neg:
                    modes_n.append(torch.einsum("bd,bmd->bm", ur, items.own(vr, neg_pos)))
            inc = [modes[0]] + [modes[r] - modes[r - 1] for r in range(1, stage)]
            inc_n = None
            if use_neg:
                inc_n = [modes_n[0]] + [modes_n[r] - modes_n[r - 1] for r in range(1, stage)]
            margin_bias, extra_margins = aml_bias(inc, stage, cfg.loss, inc_n)
    lq = log_q[b.i] if (log_q is not None and cfg.loss.logq) else None
    return sampled_softmax(
        items.pairs(uvec, all_vec, pos),
        b.i,
        temperature=cfg.loss.temperature,
        log_q=lq,
        margin_bias=margin_bias,
        extra_scores=extra,
        extra_items=b.neg if use_neg else None,
        extra_margins=extra_margins,
    ).loss


def _train_phase(
    model: TwoTower,
    owners: dict[str, torch.Tensor],
    data: CascadeData,
    cfg: CSMFConfig,
    stage: int,
    phase: str,
    seed: int,
    on_step: OnStep,
    offset: int,
    hook: EpochHook = NO_HOOK,
) -> dict:
    rows = data.rows.for_stage(stage)
    lr, epochs = cfg.train.lr, cfg.epochs_for(stage)
    if phase == "recover":
        gen = torch.Generator().manual_seed(seed)
        k = max(2, int(math.ceil(len(rows) * cfg.recover.fraction)))
        rows = rows.select(torch.randperm(len(rows), generator=gen)[:k])
        lr, epochs = cfg.train.lr * cfg.recover.lr_scale, cfg.recover.epochs
    params = dict(model.named_parameters())
    trained, masks = [], []
    for name, o in owners.items():
        m = (o == stage).to(torch.float32)
        if not bool(m.any()):
            continue
        trained.append(params[name])
        masks.append(m.expand(params[name].shape).contiguous())
    use_neg = uses_request_negatives(cfg, stage, rows)
    log_q = stage_log_q(data, stage)
    part = f"{phase}_{data.objectives[stage]}"
    if phase == "train":  # the train phase is a part of the protocol (recovery keeps its epochs)
        o = data.objectives[stage]

        def encode(users: EvalRows, cat: FeatureTables) -> Vectors:
            return (
                {o: users_of(lambda x: model.user_vectors(x, stage), cat, users)},
                {o: encode_items(lambda x: model.item_vectors(x, stage), cat)},
            )

        hook.begin(part, [model], encode, start=stage > 0)
        epochs = hook.epochs(part, epochs)
    model.train()
    try:
        log = train_loop(
            trained,
            rows,
            lambda b: _mode_loss(model, data, b, stage, cfg, log_q, use_neg),
            cfg,
            epochs=epochs,
            seed=seed,
            name=f"csmf_weight_masks/{phase}_{data.objectives[stage]}",
            lr=lr,
            on_step=on_step,
            step_offset=offset,
            masks=masks,  # frozen entries: zero gradient, no decay (csmf_core.optim)
            on_epoch=hook.on_epoch(part) if phase == "train" else None,
        )
    finally:
        model.eval()
    if phase == "train":
        hook.end(part)
    return log.summary()


def _per_mode(model: TwoTower, n: int, users: EvalRows, cat: FeatureTables):
    """Per mode t: the users' mode-t vectors and the catalog's mode-t item vectors."""
    per_mode_u = [users_of(lambda x, t=t: model.user_vectors(x, t), cat, users) for t in range(n)]
    per_mode_v = [encode_items(lambda x, t=t: model.item_vectors(x, t), cat) for t in range(n)]
    return per_mode_u, per_mode_v


def _served(objectives: list[str], per_mode_u, per_mode_v, d: int) -> Vectors:
    """The served vectors: objective t's query is e^t in block t of the concatenated [v^0; ...]."""
    n = len(objectives)
    concat = torch.cat(per_mode_v, dim=1)
    users = {}
    for t, o in enumerate(objectives):
        q = torch.zeros(per_mode_u[t].shape[0], n * d)
        q[:, t * d : (t + 1) * d] = per_mode_u[t]
        users[o] = q
    return users, {o: concat for o in objectives}


def fit(
    data: CascadeData, cfg: CSMFConfig, seed: int, on_step: OnStep = None, *, hook: EpochHook = NO_HOOK
) -> MethodResult:
    """Weight-level-mask cascade; serving stores the concatenated per-mode item vectors."""
    cfg = with_seed(cfg, seed)
    # this variant has always trained without weight decay (its figures); the masked optimiser step
    # (csmf_core.optim) would decay only the stage's own entries
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, weight_decay=0.0))
    apply_threads(cfg)
    t0 = time.perf_counter()
    n = len(data.objectives)
    model = TwoTower(data.user_spec, data.item_spec, cfg.model, n)
    owners = initial_owners(model)
    model.set_owners(owners)
    info: dict = {}
    steps = 0
    for t in range(n):
        s = _train_phase(model, owners, data, cfg, t, "train", seed * 1009 + t * 31, on_step, steps, hook)
        steps += s["steps"]
        info[f"train_{data.objectives[t]}"] = s
        if t < n - 1:
            owners, stats = prune_weights(model, owners, t, cfg, seed + t)
            model.set_owners(owners)
            info[f"prune_{data.objectives[t]}"] = {
                "kept": sum(v[0] for v in stats.values()),
                "freed": sum(v[1] for v in stats.values()),
            }
            if cfg.recover.enabled:
                s = _train_phase(
                    model, owners, data, cfg, t, "recover", seed * 1009 + t * 31 + 1, on_step, steps
                )
                steps += s["steps"]
                info[f"recover_{data.objectives[t]}"] = s
    train_seconds = time.perf_counter() - t0
    d = cfg.model.dim
    hook.finish(lambda users, cat: _served(data.objectives, *_per_mode(model, n, users, cat), d))
    per_mode_u, per_mode_v = _per_mode(model, n, data.eval, data.catalog_tables("eval"))
    users, items = _served(data.objectives, per_mode_u, per_mode_v, d)
    concat = items[data.objectives[0]]
    # what serving one full-mode vector would give: mode-t queries against the last mode's items
    single = {}
    for t, o in enumerate(data.objectives):
        top = topk_items(per_mode_u[t], per_mode_v[-1], cfg.eval.primary_k)
        single[o] = recall_ndcg(top, data.eval.pos[t], (cfg.eval.primary_k,))[cfg.eval.primary_k]["recall"]
    info["single_vector"] = {f"recall@{cfg.eval.primary_k}": single}
    return MethodResult(
        method="csmf_weight_masks",
        user_vecs=users,
        item_vecs=items,
        train_seconds=train_seconds,
        n_params=count_params(model),
        item_bytes_per_item=4 * concat.shape[1],
        info=info,
    )
