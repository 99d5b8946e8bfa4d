"""`train.split_scores`: a stage differentiates the in-batch score matmul over the output dims it owns
and adds the earlier stages' part as a constant. Checked against the one-matmul form (every dim,
autograd through all of them): the same loss and the same gradient on every entry the stage trains,
up to float rounding, on a cascade really pruned by CPP, at every moment a stage trains (a recovery
after its pruning, stage 1 before and after the second pruning, the last stage), with and without the
zero-held removed edges unmasked as training runs them; and one epoch of train_stage both ways."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from csmf_core.config import build_config
from csmf_core.losses import item_log_q
from csmf_core.masks import expand_to_param, trainable_masks
from csmf_core.train import SUBNET_MAX_COST, _batch_loss, segment_columns, stage_columns, train_stage


def test_stage_columns_partition_by_owner():
    owners = torch.tensor([0, 2, 1, 0, 2, 1, 2])
    assert stage_columns(torch.zeros(7, dtype=torch.long), 0) is None  # stage 0 before pruning: all its own
    own, upper = stage_columns(owners, 0)
    assert own.tolist() == [0, 3] and upper is None
    own, upper = stage_columns(owners, 1)
    assert own.tolist() == [2, 5] and upper.tolist() == [0, 3]
    own, upper = stage_columns(owners, 2)
    assert own.tolist() == [1, 4, 6] and upper.tolist() == [0, 2, 3, 5]


def _model_at(trained, after_stage: int | None):
    """The random cascade's model as it was when `after_stage` ended (None: the final model), with the
    owners of that moment, and its output owners read from the output layer's bias."""
    model = copy.deepcopy(trained["model"])
    if after_stage is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(trained["snaps"][after_stage][name])
        model.set_owners({k: v.clone() for k, v in trained["owners_at_end"][after_stage].items()})
    return model, model.owners[f"{model.output_layers()[0]}.bias"].long()


def _loss_and_grads(model, out, data, cfg, batch, stage, split, use_aml, use_neg, held, subnet=False):
    """_batch_loss and the masked gradient of every entry `stage` trains; `held`: inside
    `zero_held_unmasked(stage)`, as train_stage runs it (zero-held removed edges not multiplied);
    `subnet`: inside `train_subnet(stage)` (autograd through the stage's own units only)."""
    model = copy.deepcopy(model)
    model.train()
    log_q = item_log_q(torch.as_tensor(data.counts[stage]))
    ctx = model.zero_held_unmasked(stage) if held else contextlib.nullcontext()
    sub = model.train_subnet(stage) if subnet else contextlib.nullcontext()
    with ctx, sub:
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


# (stage, the stage whose end the model is taken at): stage 0 after its pruning (its recovery), stage 1
# before the second pruning (it owns every freed unit) and after it (its recovery), stage 2 at the end
MOMENTS = [(0, 0), (1, 0), (1, None), (2, None)]


@pytest.mark.parametrize("stage,moment", MOMENTS)
@pytest.mark.parametrize("upstream", ["log_prob", "last_logit"])
@pytest.mark.parametrize(
    "aml,neg,temperature",
    [(True, False, 1.0), (True, True, 1.0), (False, False, 1.0), (True, True, 0.7), (False, False, 0.7)],
)
@pytest.mark.parametrize("held", [True, False])
def test_split_matches_one_matmul(trained_random, stage, moment, upstream, aml, neg, temperature, held):
    data = trained_random["data"]
    model, out = _model_at(trained_random, moment)
    if moment is None:
        assert torch.equal(out, trained_random["owners"].output_owners().long())
        assert {int(x) for x in out.unique()} == {0, 1, 2}  # really pruned: three output segments
    split = stage_columns(out, stage)
    assert split is not None and split[0].numel() < out.numel()
    cfg = build_config(
        {"model": {"dim": 16, "hidden": [32, 16]}, "loss": {"upstream": upstream, "temperature": temperature}}
    )
    g = torch.Generator().manual_seed(stage)
    rows = data.rows.for_stage(stage)
    batch = rows.select(torch.randperm(len(rows), generator=g)[:200])
    use_aml = aml and stage >= 1
    args = (model, out, data, cfg, batch, stage)
    want_loss, want = _loss_and_grads(*args, False, use_aml, neg, held)
    got_loss, got = _loss_and_grads(*args, True, use_aml, neg, held)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    assert got.keys() == want.keys() and want
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(bool(w.abs().sum() > 0) for w in want.values())  # the comparison is not of zeros


@pytest.mark.parametrize("stage,moment", MOMENTS)
@pytest.mark.parametrize("aml,neg", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("held", [True, False])
def test_subnet_matches_the_masked_network(trained_random, stage, moment, aml, neg, held):
    """TwoTower.train_subnet: the frozen units without autograd from cached weights, the stage's own
    units with it, later stages' units left out: the same loss and the same gradient on every entry the
    stage trains as the masked forward with one score matmul (up to rounding), at every moment a stage
    trains, whatever the cost rule would choose there."""
    data = trained_random["data"]
    model, out = _model_at(trained_random, moment)
    cfg = build_config({"model": {"dim": 16, "hidden": [32, 16]}})
    g = torch.Generator().manual_seed(10 + stage)
    rows = data.rows.for_stage(stage)
    batch = rows.select(torch.randperm(len(rows), generator=g)[:200])
    args = (model, out, data, cfg, batch, stage)
    want_loss, want = _loss_and_grads(*args, False, aml and stage >= 1, neg, held)
    got_loss, got = _loss_and_grads(*args, True, aml and stage >= 1, neg, held, subnet=True)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    assert got.keys() == want.keys() and want
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(bool(w.abs().sum() > 0) for w in want.values())


def test_subnet_vectors_and_when_it_applies(trained_random):
    """Inside train_subnet the mode's vectors equal the masked forward's up to rounding (later stages'
    dims exactly zero); in eval mode, under no_grad and in another mode the masked forward runs, bit for
    bit; new owners or a move drop the plan (its weights were cached)."""
    data = trained_random["data"]
    model, out = _model_at(trained_random, None)
    u_in = data.tables.user_inputs(data.rows.u[:60], [h[:60] for h in data.rows.hists])
    i_in = data.tables.item_inputs(data.rows.i[:60])
    model.eval()
    with torch.no_grad():
        want = {m: (model.user_vectors(u_in, m), model.item_vectors(i_in, m)) for m in (1, 2)}
    model.train()
    with model.train_subnet(1):
        u, i = model.user_vectors(u_in, 1), model.item_vectors(i_in, 1)
        assert u.requires_grad and i.requires_grad
        torch.testing.assert_close(u.detach(), want[1][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(i.detach(), want[1][1], rtol=1e-5, atol=1e-6)
        assert not bool(u[:, out > 1].any()) and not bool(i[:, out > 1].any())
        with torch.no_grad():
            assert torch.equal(model.user_vectors(u_in, 1), want[1][0])
        assert torch.equal(model.user_vectors(u_in, 2).detach(), want[2][0])
        model.eval()
        assert torch.equal(model.user_vectors(u_in, 1).detach(), want[1][0])
        model.train()
        model.set_owners(dict(model.owners))
        assert model._subnet is None
    with model.train_subnet(1):
        model.to(torch.float32)
        assert model._subnet is None


@pytest.mark.parametrize("mode", [0, 1])
def test_later_stage_dims_are_zero_in_the_mode(trained_random, mode):
    """What the split relies on: in mode t, the output dims of later stages are exactly zero (also with
    zero-held removed edges unmasked, as in training), so the mode's score is the upper dims' part plus
    the own dims' part."""
    data, model = trained_random["data"], trained_random["model"]
    out = trained_random["owners"].output_owners().long()
    u_in = data.tables.user_inputs(data.rows.u[:50], [h[:50] for h in data.rows.hists])
    i_in = data.tables.item_inputs(data.rows.i[:50])
    for ctx in (contextlib.nullcontext(), model.zero_held_unmasked(mode)):
        with ctx:
            u, i = model.user_vectors(u_in, mode), model.item_vectors(i_in, mode)
        assert not bool(u[:, out > mode].any()) and not bool(i[:, out > mode].any())


@pytest.mark.parametrize(
    "stage,emb_opt", [(1, "dense"), (2, "dense"), (1, "lazy_adam"), (1, "rowwise_adagrad")]
)
def test_train_stage_split_on_and_off(trained_random, stage, emb_opt):
    """One epoch of a fine-tuning stage through train_stage with the split and without (dense Adam, and
    the row-wise embedding optimisers, whose sparse row gradients pass through the sub-network at stage
    1 here): the frozen entries are bit-identical to the start in both, the step losses and the trained mode's scores agree
    up to rounding. (Not every parameter does: the gradient of the item tower's output bias is zero in
    exact arithmetic, a shift of every item's vector that the softmax cannot see, so what autograd
    computes for it is rounding noise, which Adam scales to full steps; rankings do not see them.)"""
    data = trained_random["data"]
    start, out = _model_at(trained_random, None)
    before = {k: v.detach().clone() for k, v in start.named_parameters()}
    log_q = item_log_q(torch.as_tensor(data.counts[stage]))
    u_in = data.tables.user_inputs(torch.arange(1, 50), [h[:49] for h in data.rows.hists])
    i_in = data.tables.item_inputs(torch.arange(1, 50))
    losses, scores = {}, {}
    for split in (True, False):
        cfg = build_config(
            {
                "model": {"dim": 16, "hidden": [32, 16]},
                "train": {
                    "batch_size": 256,
                    "epochs": [1, 1, 1],
                    "split_scores": split,
                    "embedding_optimizer": emb_opt,
                },
            }
        )
        model = copy.deepcopy(start)
        losses[split] = train_stage(
            model, data.tables, data.rows, stage, cfg, log_q=log_q, output_owners=out
        ).losses
        for name, p in model.named_parameters():
            frozen = expand_to_param(start.owners[name], p) != stage
            assert torch.equal(p.detach()[frozen], before[name][frozen]), (split, name)
        with torch.no_grad():
            s = model.user_vectors(u_in, stage) @ model.item_vectors(i_in, stage).T
        scores[split] = s - s.mean(dim=1, keepdim=True)  # a per-user constant changes no ranking
    assert len(losses[True]) >= 2
    if stage == 1:  # the model after both prunings: stage 1's recovery, which trains its sub-network
        assert start.subnet_cost(1) <= SUBNET_MAX_COST
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        s0 = start.user_vectors(u_in, stage) @ start.item_vectors(i_in, stage).T
    s0 = s0 - s0.mean(dim=1, keepdim=True)
    scale = float(scores[False].abs().max())
    torch.testing.assert_close(scores[True], scores[False], rtol=0, atol=1e-4 * scale)
    assert float((scores[False] - s0).abs().max()) > 1e-2 * scale  # training moved the scores


def test_stale_output_owners_are_refused(trained_random):
    """train_stage checks the output owners it is given against the model's before splitting."""
    data, model = trained_random["data"], copy.deepcopy(trained_random["model"])
    stale = torch.zeros_like(trained_random["owners"].output_owners())  # as before any pruning
    cfg = build_config({"model": {"dim": 16, "hidden": [32, 16]}, "train": {"epochs": [1, 1, 1]}})
    with pytest.raises(ValueError, match="differ from the model's output owners"):
        train_stage(model, data.tables, data.rows, 1, cfg, output_owners=stale)


def test_subnet_cost_by_hand(trained_random):
    """subnet_cost counts, per linear layer with f frozen and t trained units fed by n_f frozen and n_t
    trained inputs (layer 0's inputs counted as frozen): n_f f + 2 (n_f + n_t) t + n_t t multiply-adds,
    against 3 x in x out for the masked step. Worked out by hand for dim 16, hidden [32, 16], with units
    owned 1/4 by stage 0, 1/4 by stage 1, 1/2 by stage 2, at stage 1."""
    model = copy.deepcopy(trained_random["model"])
    assert [lin.out_features for lin in model.user.layers] == [32, 16, 16]

    def units(n):
        return torch.tensor([0] * (n // 4) + [1] * (n // 4) + [2] * (n // 2), dtype=torch.uint8)

    model._owners = {
        f"{t}.layers.{k}.bias": units(n) for t in ("user", "item") for k, n in enumerate((32, 16, 16))
    }
    in_u, in_i = model.user.layers[0].in_features, model.item.layers[0].in_features
    # layer 0: n_f = in, t = 8 -> in * 8 (frozen 8 units) + 2 * in * 8; layer 1: n_f = n_t = 8, f = t = 4
    # -> 32 + 128 + 32; layer 2: n_f = n_t = 4, f = t = 4 -> 16 + 64 + 16
    sub = (24 * in_u + 288) + (24 * in_i + 288)
    full = (96 * in_u + 3 * 32 * 16 + 3 * 16 * 16) + (96 * in_i + 3 * 32 * 16 + 3 * 16 * 16)
    assert model.subnet_cost(1) == pytest.approx(sub / full)


def test_subnet_needs_unit_level_owners_and_current_weights(trained_random):
    """train_subnet reads ownership by units: weight-level owners (an entry owned apart from its unit)
    are refused at the start; a write to frozen units' weights inside the block (its steps used the
    copy cached at the start) fails at the end; new owners inside drop the plan without a check."""
    model, _ = _model_at(trained_random, None)
    owners = {k: v.clone() for k, v in model.owners.items()}
    w = owners["user.layers.1.weight"]
    bias = owners["user.layers.1.bias"]
    row = int(torch.nonzero(bias == 0)[0])
    col = int(torch.nonzero(w[row] == 0)[0])
    w[row, col] = 1  # an entry of a stage-0 unit owned by stage 1: weight-level ownership
    model.set_owners(owners)
    with pytest.raises(ValueError, match="unit-level ownership"):
        with model.train_subnet(1):
            pass
    model, _ = _model_at(trained_random, None)
    frozen = int(torch.nonzero(model.owners["item.layers.0.bias"] < 1)[0])
    with pytest.raises(RuntimeError, match="changed inside the block"):
        with model.train_subnet(1), torch.no_grad():
            model.item.layers[0].weight[frozen].mul_(2.0)
    with model.train_subnet(1), torch.no_grad():  # new owners: the plan is dropped, nothing to check
        model.item.layers[0].weight[frozen].mul_(0.5)
        model.set_owners(dict(model.owners))
