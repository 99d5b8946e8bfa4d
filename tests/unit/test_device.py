"""Where the cascade's tensors live: a model follows its feature tables' device (train.device).

No GPU is available where these tests normally run, so the CPU test uses torch's `meta` device (tensors
with shapes and no storage) to check that `build_model` puts the model where the tables are; before
this was fixed, `tuning.run_trial` (the flow's `select` task) built the model on the CPU while the
tables were on CUDA. The `gpu` test trains a small cascade on CUDA for real and runs only on a machine
with one (bench/gpu_check.sh runs it there).
"""

from __future__ import annotations

import copy
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


@torch.no_grad()
def _vectors_every_mode(model, tables, eval_rows, n: int = 64):
    """[(item vectors, user vectors)] of the first n items / evaluation users in every mode, on the CPU."""
    dev = next(model.parameters()).device
    items = torch.arange(min(n, len(tables.items_cat)), device=dev)
    u, hists = eval_rows.u[:n].to(dev), [h[:n].to(dev) for h in eval_rows.hists]
    return [
        (model.item_vectors(tables.item_inputs(items), mode=m).cpu(),
         model.user_vectors(tables.user_inputs(u, hists), mode=m).cpu())
        for m in range(model.n_stages)
    ]  # fmt: skip


def test_a_trained_model_moved_to_another_device_remakes_its_mode_masks():
    """Found by bench/gpu_check.py on an H200: a model trained on the CPU (its mode masks cached there by
    the training and evaluation forwards), then moved with `.to(device)`, failed at its first masked
    forward ("found at least two devices, cuda:0 and cpu"). Here on torch's meta device, which refuses a
    CPU operand the same way: the moved model must run in every mode (and the CPU model still run as before)."""
    data = random_cascade_data()
    cfg = build_config(None, ["train.epochs=[1,1,1]", "recover.epochs=1", "train.batch_size=256"])
    model, owners, _ = run_cascade(data, cfg)
    assert owners.counts(), "the cascade must have pruned: masks exist"
    before = _vectors_every_mode(model, data.tables, data.eval)  # fills the CPU mask cache
    moved = copy.deepcopy(model).to("meta")
    x = data.tables.to("meta").item_inputs(torch.arange(8, device="meta"))
    with torch.no_grad():  # the item tower (the user tower's history pooling has no meta kernel)
        for m in range(model.n_stages):
            assert moved.item_vectors(x, mode=m).shape == (8, cfg.model.dim)
    after = _vectors_every_mode(model, data.tables, data.eval)  # the original is untouched
    for (i0, u0), (i1, u1) in zip(before, after):
        assert torch.equal(i0, i1) and torch.equal(u0, u1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cpu_trained_model_serves_on_cuda_with_the_same_vectors():
    data = random_cascade_data()
    cfg = build_config(None, ["train.epochs=[1,1,1]", "recover.epochs=1", "train.batch_size=256"])
    model, _, _ = run_cascade(data, cfg)
    cpu = _vectors_every_mode(model, data.tables, data.eval)
    cuda = _vectors_every_mode(copy.deepcopy(model).to("cuda"), data.tables.to("cuda"), data.eval)
    for (i0, u0), (i1, u1) in zip(cpu, cuda):
        assert (i0 - i1.cpu()).abs().max() <= 1e-4 and (u0 - u1.cpu()).abs().max() <= 1e-4
