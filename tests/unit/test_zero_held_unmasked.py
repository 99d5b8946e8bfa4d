"""TwoTower.zero_held_unmasked (the training forward skips mode masks that only remove zero-held
removed edges): a whole cascade trained with it is bit-identical to one trained with every mask
multiplied, and it does skip masks in the fine-tuning stages but never a mask of later-stage entries."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch

from csmf_core.model import NO_EDGE, TwoTower


def test_cascade_bit_identical_with_and_without_the_skip(monkeypatch, random_cascade_trainer):
    skipped: list[tuple[int, list[str]]] = []
    real = TwoTower.zero_held_unmasked

    @contextmanager
    def recording(self, mode):
        with real(self, mode) as names:
            skipped.append((mode, list(names)))
            yield names

    monkeypatch.setattr(TwoTower, "zero_held_unmasked", recording)
    fast = random_cascade_trainer()

    @contextmanager
    def every_mask(self, mode):  # the forward before the change: every mode mask multiplied
        yield []

    monkeypatch.setattr(TwoTower, "zero_held_unmasked", every_mask)
    slow = random_cascade_trainer()

    a, b = dict(fast["model"].named_parameters()), dict(slow["model"].named_parameters())
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    for t in fast["snaps"]:
        for name, v in fast["snaps"][t].items():
            assert torch.equal(v, slow["snaps"][t][name]), (t, name)
    # the skip happened in the fine-tuning stages (modes 1 and 2), on hidden and output weights
    assert any(mode >= 1 and names for mode, names in skipped)
    assert all(n.endswith(".weight") and ".layers." in n for _, names in skipped for n in names)


def test_masks_of_later_stage_entries_are_kept(trained_random):
    model = trained_random["model"]
    owners = model.owners
    for mode in range(model.n_stages):
        with model.zero_held_unmasked(mode) as names:
            for name in names:
                o = owners[name]
                removed = o > mode
                assert bool((o[removed] == NO_EDGE).all()), (mode, name)
                assert not bool(dict(model.named_parameters())[name].detach()[removed].any())
            # a weight whose removed entries include a later stage's is still masked
            for name, o in owners.items():
                if o.dim() == 2 and bool(((o > mode) & (o != NO_EDGE)).any()):
                    assert name not in names
    # a nonzero value on a removed edge (never the case after zero_disallowed) keeps the mask
    model = copy.deepcopy(model)  # the fixture's model is shared
    params = dict(model.named_parameters())
    name = next(n for n, o in owners.items() if o.dim() == 2 and bool((o == NO_EDGE).any()))
    with torch.no_grad():
        params[name][owners[name] == NO_EDGE] = 1.0
    with model.zero_held_unmasked(model.n_stages - 1) as names:
        assert name not in names
