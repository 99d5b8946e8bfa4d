"""`train.split_scores`: a stage differentiates the in-batch score matmul over the output dims it owns
and adds the earlier stages' part as a constant. Checked against the one-matmul form (every dim,
autograd through all of them): the same loss and the same gradient on every entry the stage trains,
up to float rounding, on a cascade really pruned by CPP; frozen entries stay bit-identical through
a whole cascade trained with it (the no-forgetting tests run with the default, which is on)."""

from __future__ import annotations

import copy

import pytest
import torch

from csmf_core.config import build_config
from csmf_core.losses import item_log_q
from csmf_core.masks import expand_to_param, trainable_masks
from csmf_core.train import _batch_loss, segment_columns, stage_columns


def test_stage_columns_partition_by_owner():
    owners = torch.tensor([0, 2, 1, 0, 2, 1, 2])
    assert stage_columns(torch.zeros(7, dtype=torch.long), 0) is None  # stage 0 before pruning: all its own
    own, upper = stage_columns(owners, 0)
    assert own.tolist() == [0, 3] and upper is None
    own, upper = stage_columns(owners, 1)
    assert own.tolist() == [2, 5] and upper.tolist() == [0, 3]
    own, upper = stage_columns(owners, 2)
    assert own.tolist() == [1, 4, 6] and upper.tolist() == [0, 2, 3, 5]


def _loss_and_grads(model, out_owners, data, cfg, batch, stage, split, use_aml, use_neg):
    model = copy.deepcopy(model)
    model.train()
    out = out_owners
    log_q = item_log_q(torch.as_tensor(data.counts[stage]))
    loss = _batch_loss(
        model,
        data.tables,
        batch,
        stage,
        cfg,
        "cpu",
        use_neg,
        use_aml,
        segment_columns(out, stage),
        log_q,
        stage_columns(out, stage) if split else None,
    )
    loss.backward()
    trains = trainable_masks(model.owners, stage)
    grads = {}
    for name, p in model.named_parameters():
        m = expand_to_param(trains[name], p)
        if bool(m.any()):
            g = torch.zeros_like(p) if p.grad is None else p.grad
            grads[name] = g * m
    return loss.detach(), grads


@pytest.mark.parametrize("stage", [0, 1, 2])
@pytest.mark.parametrize("upstream", ["log_prob", "last_logit"])
@pytest.mark.parametrize("aml,neg", [(True, False), (True, True), (False, False)])
def test_split_matches_one_matmul(trained_random, stage, upstream, aml, neg):
    data, model = trained_random["data"], trained_random["model"]
    out = trained_random["owners"].output_owners().long()
    assert {int(x) for x in out.unique()} == {0, 1, 2}  # really pruned: three output segments
    split = stage_columns(out, stage)
    assert split is not None and split[0].numel() < out.numel()
    cfg = build_config({"model": {"dim": 16, "hidden": [32, 16]}, "loss": {"upstream": upstream}})
    g = torch.Generator().manual_seed(stage)
    batch = data.rows.for_stage(stage).select(
        torch.randperm(len(data.rows.for_stage(stage)), generator=g)[:200]
    )
    use_aml = aml and stage >= 1
    want_loss, want = _loss_and_grads(model, out, data, cfg, batch, stage, False, use_aml, neg)
    got_loss, got = _loss_and_grads(model, out, data, cfg, batch, stage, True, use_aml, neg)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    assert got.keys() == want.keys() and want
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(bool(w.abs().sum() > 0) for w in want.values())  # the comparison is not of zeros


def test_later_stage_dims_are_zero_in_the_mode(trained_random):
    """What the split relies on: in mode t, the output dims of later stages are exactly zero, so the
    mode's score is the upper dims' part plus the own dims' part."""
    data, model = trained_random["data"], trained_random["model"]
    out = trained_random["owners"].output_owners().long()
    u = model.user_vectors(data.tables.user_inputs(data.rows.u[:50], [h[:50] for h in data.rows.hists]), 1)
    i = model.item_vectors(data.tables.item_inputs(data.rows.i[:50]), 1)
    assert not bool(u[:, out > 1].any()) and not bool(i[:, out > 1].any())
