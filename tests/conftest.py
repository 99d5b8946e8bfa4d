"""Shared fixtures: small fixed-seed worlds and a trained 3-stage cascade."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from csmf_core.cascade import CascadeData, run_cascade
from csmf_core.config import build_config
from csmf_core.evaluate import EvalRows
from csmf_core.model import TowerSpec
from csmf_core.rows import FeatureTables, TrainRows

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def random_cascade_data(seed: int = 0, n_users: int = 60, n_items: int = 50, rows: int = 3000, L: int = 5):
    """A random 3-objective world (no signal): enough to exercise every code path quickly."""
    g = torch.Generator().manual_seed(seed)
    us = TowerSpec(
        cat=(("uid", n_users), ("g", 3)),
        n_num=2,
        hist=("click", "conversion"),
        n_items=n_items,
        id_feature="uid",
    )
    its = TowerSpec(cat=(("iid", n_items), ("c", 4)), n_num=1, id_feature="iid")
    tables = FeatureTables(
        torch.stack([torch.arange(n_users), torch.randint(0, 3, (n_users,), generator=g)], 1),
        torch.randn(n_users, 2, generator=g),
        torch.stack([torch.arange(n_items), torch.randint(0, 4, (n_items,), generator=g)], 1),
        torch.randn(n_items, 1, generator=g),
    )
    level = torch.multinomial(torch.tensor([0.6, 0.3, 0.1]), rows, replacement=True, generator=g).to(
        torch.int8
    )
    tr = TrainRows(
        torch.randint(1, n_users, (rows,), generator=g),
        torch.randint(1, n_items, (rows,), generator=g),
        level,
        [torch.randint(0, n_items, (rows, L), generator=g) for _ in range(2)],
        torch.randint(0, n_items, (rows, 4), generator=g),
    )
    eu = torch.arange(1, n_users)
    ev = EvalRows(
        eu,
        [torch.randint(0, n_items, (len(eu), L), generator=g) for _ in range(2)],
        [[np.array([int(x)]) for x in torch.randint(1, n_items, (len(eu),), generator=g)]] * 3,
    )
    counts = [np.bincount(tr.i[tr.level >= t].numpy(), minlength=n_items) for t in range(3)]
    return CascadeData(["exposure", "click", "conversion"], us, its, tables, tr, ev, counts)


@pytest.fixture(scope="session")
def trained_random():
    """A 3-stage cascade on random data, with parameter snapshots at the end of every stage."""
    data = random_cascade_data()
    cfg = build_config(
        {"model": {"dim": 16, "hidden": [32, 16]}, "train": {"batch_size": 256, "epochs": [2, 2, 2]}}
    )
    snaps: dict[int, dict] = {}
    scores: dict[int, torch.Tensor] = {}
    probe_u = data.tables.user_inputs(torch.arange(1, 20), [h[:19] for h in data.rows.hists])
    probe_i = data.tables.item_inputs(torch.arange(1, 30))
    stage_end = {}

    def after(rep, model, owners):
        # a stage ends after its recovery (or its training for the last stage)
        last = rep.step.kind == "recover" or (rep.step.kind == "train" and rep.step.stage == 2)
        if last:
            t = rep.step.stage
            snaps[t] = {k: v.detach().clone() for k, v in model.named_parameters()}
            stage_end[t] = {k: v.clone() for k, v in model.owners.items()}
            with torch.no_grad():
                scores[t] = model.user_vectors(probe_u, 0) @ model.item_vectors(probe_i, 0).T

    model, owners, reports = run_cascade(data, cfg, after_step=after)
    return {
        "data": data,
        "cfg": cfg,
        "model": model,
        "owners": owners,
        "reports": reports,
        "snaps": snaps,
        "owners_at_end": stage_end,
        "exposure_scores": scores,
        "probe": (probe_u, probe_i),
    }
