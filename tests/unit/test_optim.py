"""The one optimiser step (csmf_core.optim): its two kinds of decay against torch's own optimisers,
frozen entries under decay and clipping, the divergence check, the log, deterministic kernels."""

from __future__ import annotations

import pytest
import torch

from csmf_core.config import build_config
from csmf_core.optim import Optimiser, TrainingDiverged, TrainLog, run_epochs

CFG = build_config({}, ["train.lr=0.01", "train.weight_decay=0.1", "train.grad_clip=0.5"])


def _losses(p: torch.Tensor, n: int = 12):
    g = torch.Generator().manual_seed(0)
    targets = [torch.randn(p.shape, generator=g) for _ in range(n)]
    return [lambda t=t: ((p - t) ** 2 * torch.arange(1, p.numel() + 1).view_as(p)).sum() for t in targets]


def test_unmasked_step_is_adamw_with_clipping():
    p = torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(1)))
    q = torch.nn.Parameter(p.detach().clone())
    opt = Optimiser([p], 0.01, CFG, TrainLog("toy", 4, 1))
    ref = torch.optim.AdamW([q], lr=0.01, weight_decay=0.1, fused=True)
    for f, fq in zip(_losses(p), _losses(q)):
        opt.step(f(), 4)
        ref.zero_grad()
        fq().backward()
        torch.nn.utils.clip_grad_norm_([q], 0.5)
        ref.step()
    assert torch.equal(p.detach(), q.detach())
    assert opt.log.steps == 12 and len(opt.log.losses) == 12


def test_masked_step_freezes_entries_under_decay_and_clipping():
    p = torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(2)))
    before = p.detach().clone()
    mask = torch.tensor([1.0, 0.0, 1.0])  # column 1 frozen, broadcast over rows
    q = torch.nn.Parameter(before.clone())
    opt = Optimiser([p], 0.01, CFG, TrainLog("toy", 4, 1), masks=[mask])
    ref = torch.optim.Adam([q], lr=0.01, fused=True)  # masked gradient, then decay of trained entries
    for f, fq in zip(_losses(p), _losses(q)):
        opt.step(f(), 4)
        ref.zero_grad()
        fq().backward()
        q.grad.mul_(mask)
        torch.nn.utils.clip_grad_norm_([q], 0.5)
        ref.step()
        with torch.no_grad():
            q.sub_(q * mask, alpha=0.01 * 0.1)
    assert torch.equal(p.detach()[:, 1], before[:, 1])  # bit-identical, decay and clipping included
    assert not torch.equal(p.detach()[:, 0], before[:, 0])
    assert torch.equal(p.detach(), q.detach())


def test_divergence_stops_before_any_update():
    p = torch.nn.Parameter(torch.ones(3))
    opt = Optimiser([p], 0.01, CFG, TrainLog("finetune_click (train)", 3, 1))
    opt.step((p**2).sum(), 3)
    kept = p.detach().clone()
    with pytest.raises(TrainingDiverged) as err:
        opt.step((p**2).sum() * float("nan"), 3)
    assert str(err.value).startswith("finetune_click (train): loss nan at epoch 1, step 2")
    assert "Lower train.lr (now 0.01)" in str(err.value)
    assert torch.equal(p.detach(), kept) and opt.log.steps == 1
    with pytest.raises(TrainingDiverged, match=r"^x: loss 29\d\d"):  # finite, above train.max_loss
        Optimiser([p], 0.01, build_config({}, ["train.max_loss=5"]), TrainLog("x", 1, 1)).step(
            (p * 1e3).sum(), 1
        )


def test_log_epoch_means_and_summary():
    log = TrainLog("toy", 10, 2)
    for value, rows in ((1.0, 4), (4.0, 2)):
        log.record(value, rows)
    log.end_epoch()  # by rows: (1 * 4 + 4 * 2) / 6
    log.record(3.0, 5)
    log.record(5.0, 1)
    log.end_epoch(by_rows=False)  # plain mean of the epoch's steps
    assert log.epoch_losses == [2.0, 4.0] and log.steps == 4 and log.samples == 12
    log.seconds = 2.0
    assert log.summary() == {
        "rows": 10,
        "epochs": 2,
        "steps": 4,
        "seconds": 2.0,
        "samples_per_s": 6.0,
        "final_loss": 4.0,
    }


@pytest.mark.parametrize("deterministic", [True, False])
def test_run_epochs_trains_under_the_configured_kernels(deterministic):
    cfg = build_config({}, [f"train.deterministic={str(deterministic).lower()}"])
    p = torch.nn.Parameter(torch.zeros(2))
    seen, epochs_done = [], []

    def loss_fn(batch):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return ((p - batch) ** 2).sum()

    log = run_epochs(
        Optimiser([p], 0.1, cfg, TrainLog("toy", 3, 2)),
        2,
        lambda epoch: [(1, torch.ones(2)), (2, torch.full((2,), 2.0))],
        loss_fn,
        on_epoch=epochs_done.append,
    )
    assert seen == [deterministic] * 4 and epochs_done == [1, 2]
    assert not torch.are_deterministic_algorithms_enabled()
    assert log.steps == 4 and len(log.epoch_losses) == 2 and log.seconds > 0
