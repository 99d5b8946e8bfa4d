"""YouTubeDNN-Mix: one two-tower model trained on the mixed positives of the later objectives.

Source: Covington et al. (RecSys 2016), in the CSMF paper's setting (seeds/000, Table 2:
"YouTubeDNN-Mix", one model on the union of click and conversion samples).
Simplifications: same towers and sampled softmax with log-Q as YouTubeDNN-Sep. The training set
is the click rows plus the conversion rows again (objectives 1..N-1 of the cascade; a converted
row appears once per objective it reached), so conversions weigh more than plain clicks while
one vector serves both. Log-Q uses the summed positive counts of those objectives; epochs are
cfg.epochs_for(1) (the click stage's). The exposure objective is not served (the paper's Mix
covers click and conversion only). Serving stores one dim-d vector per item. Under the comparison
protocol the model is one part ("model"), selected by the validation score of the objectives it serves.
"""

from __future__ import annotations

import time

import torch

from csmf_core.baselines.base import MethodResult
from csmf_core.baselines.common import (
    NO_HOOK,
    EpochHook,
    OnStep,
    count_params,
    train_plain_two_tower,
    two_tower_encode,
    with_seed,
)
from csmf_core.cascade import CascadeData, apply_threads
from csmf_core.config import CSMFConfig
from csmf_core.losses import item_log_q
from csmf_core.rows import TrainRows


def mixed_rows(data: CascadeData) -> TrainRows:
    """Rows of objectives 1..N-1 concatenated: a row with level L appears L times (once per objective)."""
    idx = torch.cat([torch.nonzero(data.rows.level >= t).flatten() for t in range(1, len(data.objectives))])
    return data.rows.select(idx)


def fit(
    data: CascadeData, cfg: CSMFConfig, seed: int, on_step: OnStep = None, *, hook: EpochHook = NO_HOOK
) -> MethodResult:
    """Train one plain two-tower model on the mixed later-objective positives; serve it for all of them."""
    cfg = with_seed(cfg, seed)
    apply_threads(cfg)
    t0 = time.perf_counter()
    served = data.objectives[1:]
    counts = sum(torch.as_tensor(data.log_q_counts(t)).double() for t in range(1, len(data.objectives)))
    model, log = train_plain_two_tower(
        data,
        cfg,
        mixed_rows(data),
        stage=1,
        seed=seed * 101 + 1,
        name="youtubednn_mix",
        log_q=item_log_q(counts),
        on_step=on_step,
        hook=hook,
        served=served,
    )
    train_seconds = time.perf_counter() - t0
    encode = two_tower_encode(model.user_vectors, model.item_vectors, served)
    hook.finish(encode)
    users, items = encode(data.eval, data.catalog_tables("eval"))
    v = items[served[0]]
    return MethodResult(
        method="youtubednn_mix",
        user_vecs=users,
        item_vecs=items,
        train_seconds=train_seconds,
        n_params=count_params(model),
        item_bytes_per_item=4 * v.shape[1],
        info={"model": log.summary(), "objectives": served},
    )
