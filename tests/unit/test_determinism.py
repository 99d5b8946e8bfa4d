"""Reproducible training: the same data, config and seed give a bit-identical model with 2 threads.

Without train.deterministic, two identical cascades on this CPU build differed by up to 0.12 in a
weight (multi-threaded reductions); the flag must make them equal, and restore torch's setting.
"""

import pytest
import torch

from csmf_core.cascade import load_cascade_data, run_cascade
from csmf_core.config import build_config
from csmf_core.optim import deterministic_kernels
from csmf_core.prep import prepare
from csmf_core.synth import generate


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("det")
    s = generate(root / "ds", "tiny", seed=0)
    prepare(root / "ds", root / "mr", train_dates=(s.dates[0], s.dates[-2]), eval_dates=[s.dates[-1]])
    return load_cascade_data(root / "mr")


def test_two_runs_are_bit_identical_with_two_threads(tiny):
    cfg = build_config({}, ["train.epochs=[1,1,1]", "recover.epochs=1", "train.threads=2"])
    before = torch.get_num_threads()
    try:
        states = []
        for _ in range(2):
            model, owners, _ = run_cascade(tiny, cfg)
            states.append({k: v.clone() for k, v in model.state_dict().items()})
    finally:
        torch.set_num_threads(before)
    differ = [k for k in states[0] if not torch.equal(states[0][k], states[1][k])]
    assert differ == []
    assert not torch.are_deterministic_algorithms_enabled()  # restored after each stage


def test_deterministic_kernels_restores_the_previous_setting():
    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_kernels(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_kernels(False):
        assert not torch.are_deterministic_algorithms_enabled()
    assert torch.utils.deterministic.fill_uninitialized_memory  # torch's default, untouched


def test_no_nan_fill_of_new_tensors_inside_and_the_same_model(tiny, monkeypatch):
    # torch's deterministic mode fills every new tensor with NaN unless told not to; training turns
    # that off (cost) and restores it, and a cascade trained with the fill on is bit-identical
    import contextlib

    from csmf_core import optim

    with deterministic_kernels(True):
        assert not torch.utils.deterministic.fill_uninitialized_memory
    assert torch.utils.deterministic.fill_uninitialized_memory
    cfg = build_config({}, ["train.epochs=[1,1,1]", "recover.epochs=1"])
    plain, _, _ = run_cascade(tiny, cfg)
    original = optim.deterministic_kernels

    @contextlib.contextmanager
    def filling(enabled):
        with original(enabled):
            torch.utils.deterministic.fill_uninitialized_memory = True
            yield

    monkeypatch.setattr(optim, "deterministic_kernels", filling)
    filled, _, _ = run_cascade(tiny, cfg)
    a, b = plain.state_dict(), filled.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
