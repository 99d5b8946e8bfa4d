"""Where the cascade's tensors live: a model follows its feature tables' device (train.device).

No GPU is available where these tests normally run, so the CPU test uses torch's `meta` device (tensors
with shapes and no storage) to check that `build_model` puts the model where the tables are; before
this was fixed, `tuning.run_trial` (the flow's `select` task) built the model on the CPU while the
tables were on CUDA. The `gpu` test trains a small cascade on CUDA for real and runs only on a machine
with one (bench/gpu_check.sh runs it there).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from csmf_core.cascade import build_model, run_cascade
from csmf_core.config import build_config
from csmf_core.evaluate import evaluate_model
from tests.conftest import random_cascade_data


def test_build_model_follows_the_tables_device():
    data = random_cascade_data()
    cfg = build_config(None, [])
    model, _ = build_model(data, cfg)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    meta = dataclasses.replace(data, tables=data.tables.to("meta"))
    model_m, owners_m = build_model(meta, cfg)
    assert {p.device.type for p in model_m.parameters()} == {"meta"}
    # same architecture and owners whatever the device
    assert [(n, p.shape) for n, p in model.named_parameters()] == [
        (n, p.shape) for n, p in model_m.named_parameters()
    ]
    assert owners_m.counts() == build_model(data, cfg)[1].counts()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cascade_trains_and_evaluates_on_cuda():
    """The whole plan (train, prune, recover, finetune) with tables and model on CUDA, then the
    evaluation: the model stays on CUDA, the losses are finite, the metrics are well-formed."""
    data = random_cascade_data()
    data = dataclasses.replace(data, tables=data.tables.to("cuda"))
    cfg = build_config(None, ["train.epochs=[1,1,1]", "train.batch_size=256"])
    model, owners, reports = run_cascade(data, cfg)
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert all(torch.isfinite(torch.tensor(r.losses)).all() for r in reports if r.losses)
    rows = evaluate_model(
        model,
        owners.output_owners(),
        data.tables,
        data.eval,
        data.objectives,
        scorers="all",
        fused_weights=(1, 1, 1),
    )
    assert rows and all(0.0 <= r["recall"] <= 1.0 for r in rows)
