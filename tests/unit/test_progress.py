"""The training progress bar (issue #17 item 6): its total is the number of optimiser steps a cascade
step really takes (counted here through on_step), and it draws steps, epoch, loss and time left on a
terminal only."""

from __future__ import annotations

import io

import torch

from csmf_core.cascade import build_model, load_cascade_data, plan, run_step
from csmf_core.config import build_config
from csmf_core.tuning import run_trial
from flows.cascade_step import _step_rows, step_bar
from flows.progress import PassBars, StepBar, expected_steps


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_expected_steps_match_the_steps_a_cascade_step_takes(tiny_world):
    data, cfg = tiny_world["data"], tiny_world["cfg"]
    model, owners = build_model(data, cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for step in plan(data.objectives, cfg)[:3]:  # pretrain, prune, recover of the first stage
            seen: list[int] = []
            owners, _ = run_step(
                step, model, owners, data, cfg, on_step=lambda k, loss, seen=seen: seen.append(k)
            )
            if step.kind == "prune":
                assert seen == []
                continue
            epochs = cfg.recover.epochs if step.kind == "recover" else cfg.epochs_for(step.stage)
            want = expected_steps(_step_rows(step, data, cfg), cfg.train.batch_size, epochs)
            assert seen == list(range(1, len(seen) + 1)) and seen, step.name
            # a final 1-row batch is skipped by training and counted by the estimate: at most one per epoch
            assert len(seen) <= want <= len(seen) + epochs, (step.name, len(seen), want)
    finally:
        torch.set_num_threads(threads)


def test_bar_shows_steps_epoch_loss_and_time_left_on_a_terminal_only():
    out = _Terminal()
    bar = StepBar("finetune_click", total=10, epochs=2, stream=out)
    for k in range(1, 10):
        bar.update(k, 1.0 / k)
    bar.close()
    text = out.getvalue()
    assert "finetune_click" in text and "10/10" in text and "epoch 2/2" in text
    assert "loss 0.1111" in text and "left" in text
    quiet = io.StringIO()  # not a terminal: nothing drawn
    bar = StepBar("finetune_click", total=10, epochs=2, stream=quiet)
    bar.update(1, 0.5)
    bar.close()
    assert quiet.getvalue() == ""
    assert (
        expected_steps(1000, 256, 3) == 12
        and expected_steps(100, 256, 2) == 2
        and expected_steps(0, 8, 1) == 0
    )


def test_select_pass_draws_a_bar_per_training_step(tiny_world, monkeypatch):
    """The selection pass (run_trial, the `select` task) gets the refit's bars: one per train and
    recover step, labelled `select: <step>`, each filled to the steps that step really takes."""
    monkeypatch.setenv("COLUMNS", "160")  # rich's width off a real terminal: room for every column
    data = load_cascade_data(tiny_world["mr"], val_days=1)
    cfg = build_config(
        {
            "model": {"dim": 16, "hidden": [32]},
            "train": {"batch_size": 256, "epochs": [2, 1, 1]},
            "data": {"seq_len": 5, "n_req_neg": 4, "val_days": 1},
            "eval": {"fused_weights": [1.0, 1.0, 1.0]},
        }
    )
    out = _Terminal()
    made: dict[str, StepBar | None] = {}

    def make(step):
        made[step.name] = step_bar(step, data, cfg, f"select: {step.name}", stream=out)
        return made[step.name]

    bars = PassBars(make)
    current, taken = [""], {}

    def begin(step):
        current[0] = step.name
        bars.begin(step)

    def update(k, loss):
        taken[current[0]] = k
        bars.update(k, loss)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_trial(data, cfg, on_begin=begin, on_step=update)
    finally:
        torch.set_num_threads(threads)
        bars.close()
    assert bars.bar is None
    steps = plan(data.objectives, cfg)
    assert list(made) == [s.name for s in steps]
    text = out.getvalue()
    for step in steps:
        bar = made[step.name]
        if step.kind == "prune":
            assert bar is None and step.name not in taken
            continue
        epochs = cfg.recover.epochs if step.kind == "recover" else cfg.epochs_for(step.stage)
        assert bar is not None and bar.epochs == epochs
        assert taken[step.name] <= bar.total <= taken[step.name] + epochs, (step.name, taken, bar.total)
        assert f"select: {step.name}" in text and f"{bar.total}/{bar.total}" in text
