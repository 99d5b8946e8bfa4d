"""YouTubeDNN-Sep: one independent two-tower model per objective.

Source: Covington et al., "Deep Neural Networks for YouTube Recommendations" (RecSys 2016), as
used for multi-objective retrieval by the CSMF paper (seeds/000, Table 2: "YouTubeDNN-Sep").
Simplifications: the towers are the same MLP towers CSMF uses (feature embeddings, mean-pooled
behaviour sequences, numeric columns, hidden layers, cfg.model.dim output); training is the
in-batch sampled softmax with log-Q correction (Yi et al. 2019) instead of YouTube's sampled
softmax over a fixed candidate sample. Objective t's model trains on objective t's positives for
cfg.epochs_for(t) epochs (the epochs CSMF's stage t gets); the exposure model also sees the
same-request negatives, as CSMF's stage 0 does. Serving stores one dim-d vector per objective.
Under the comparison protocol each objective's model is a part of its own (named after the objective),
selected by its own objective's validation score.
"""

from __future__ import annotations

import time

from csmf_core.baselines.base import MethodResult
from csmf_core.baselines.common import (
    NO_HOOK,
    EpochHook,
    OnStep,
    Vectors,
    count_params,
    stage_log_q,
    train_plain_two_tower,
    two_tower_encode,
    with_seed,
)
from csmf_core.cascade import CascadeData, apply_threads
from csmf_core.config import CSMFConfig
from csmf_core.evaluate import EvalRows
from csmf_core.rows import FeatureTables


def fit(
    data: CascadeData, cfg: CSMFConfig, seed: int, on_step: OnStep = None, *, hook: EpochHook = NO_HOOK
) -> MethodResult:
    """Train one plain two-tower model per objective in data.objectives."""
    cfg = with_seed(cfg, seed)
    apply_threads(cfg)
    t0 = time.perf_counter()
    encoders, info, n_params, steps = [], {}, 0, 0
    for t, o in enumerate(data.objectives):
        model, log = train_plain_two_tower(
            data,
            cfg,
            data.rows.for_stage(t),
            stage=t,
            seed=seed * 101 + t,
            name=f"youtubednn_sep/{o}",
            log_q=stage_log_q(data, t),
            on_step=on_step,
            step_offset=steps,
            hook=hook,
            part=o,
            served=(o,),
        )
        steps += log.steps
        encoders.append(two_tower_encode(model.user_vectors, model.item_vectors, (o,)))
        info[o] = log.summary()
        n_params += count_params(model)
    train_seconds = time.perf_counter() - t0

    def encode(users: EvalRows, tables: FeatureTables) -> Vectors:
        out: Vectors = ({}, {})
        for e in encoders:
            u, v = e(users, tables)
            out[0].update(u)
            out[1].update(v)
        return out

    hook.finish(encode)
    users, items = encode(data.eval, data.catalog_tables("eval"))
    return MethodResult(
        method="youtubednn_sep",
        user_vecs=users,
        item_vecs=items,
        train_seconds=train_seconds,
        n_params=n_params,
        item_bytes_per_item=4 * sum(v.shape[1] for v in items.values()),
        info={"models": info},
    )
