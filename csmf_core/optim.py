"""The one optimiser step every method takes: CSMF's stages and every comparison method.

`Optimiser.step(loss, rows)` is the only place a training loss is backpropagated
(the one call of backward in csmf_core and flows): divergence check, zero_grad, backward, the optional
all-reduce of a distributed step, the optional gradient mask, gradient clipping, the Adam step,
decoupled weight decay and the step's log entry. `run_epochs` drives it over epochs of batches
under deterministic kernels and times the training. So the plumbing that differs between methods
is none: a difference in the comparison comes from a method's model, loss and data, not from its
optimiser.

Two kinds of run, chosen by `masks`:

* every entry of every parameter trains (`masks=None`, the comparison methods): AdamW, whose
  fused kernel decays each parameter by lr * train.weight_decay before its Adam update.
* some entries are frozen (`masks` = one 0/1 mask per parameter, None = the whole parameter; a
  CSMF stage, the weight-level-mask variant): Adam without decay, gradients multiplied by the mask
  before clipping (so Adam's moments of frozen entries stay exactly zero and their update is
  exactly zero), then the decoupled decay p -= lr * wd * (p * mask) on the trained entries only:
  AdamW's decay would move frozen entries. Frozen entries are therefore bit-identical after a run
  (tests/unit/test_freeze_and_fusion.py).

Both are decoupled weight decay (Loshchilov & Hutter); they differ in whether the decay comes before
or after the Adam update, which changes the last bits of a trained model, so each kind keeps its own.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from csmf_core.config import CSMFConfig

B = TypeVar("B")
OnStep = Callable[[int, float], None] | None
# (parameters, loss, rows) -> (loss, rows) summed over processes; grads become the rows-weighted mean
Reduce = Callable[[list[torch.Tensor], float, int], tuple[float, int]]


class TrainingDiverged(RuntimeError):
    """A non-finite or exploding loss; the training stops and nothing downstream may use it."""


def adam(
    params: Iterable[torch.Tensor], lr: float, *, weight_decay: float = 0.0, decoupled: bool = False
) -> torch.optim.Optimizer:
    """Adam (AdamW when `decoupled`) using torch's fused kernel when the parameters allow it.

    Same update rule as the per-parameter loop; one kernel over every parameter instead of ~10
    small ops per parameter: 0.6 ms instead of 4.9 ms per step over this model's parameters on the
    2-core CPU measured (bench/bench_train_step.py). Entries whose gradient is always zero keep
    exactly their value either way (zero first moment -> zero update), which freezing relies on.
    """
    params = list(params)
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    fusable = all(
        p.dtype in (torch.float32, torch.float64) and p.device.type in ("cpu", "cuda") for p in params
    )
    if fusable:
        try:
            return cls(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay, fused=True)
        except (RuntimeError, TypeError):  # a torch build without the fused kernel
            pass
    return cls(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)


@contextlib.contextmanager
def deterministic_kernels(enabled: bool) -> Iterator[None]:
    """Run the block with torch's deterministic kernels (restoring the previous setting after).

    Measured: on this CPU build with 2 threads, two identical cascades differed by up to 0.12 in a
    weight without it (multi-threaded scatter/index-add reductions), and were bit-identical with it,
    at no measurable cost. warn_only: an op without a deterministic kernel warns instead of failing.
    On CUDA, cuBLAS also needs CUBLAS_WORKSPACE_CONFIG (set here if absent, before CUDA starts).
    """
    if not enabled:
        yield
        return
    prev, prev_warn = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


@dataclass
class TrainLog:
    """What one training run did (a CSMF stage, a comparison method's model).

    name: how errors and reports call the run ("finetune_click (train)", "youtubednn_sep/click").
    rows: rows (or pool entries) it trains on; epochs: passes over them; steps: optimiser steps;
    seconds: training time (callbacks between epochs excluded); samples: rows stepped on, all epochs;
    losses: the loss of every step; epoch_losses: one mean per epoch (`end_epoch`).
    """

    name: str
    rows: int
    epochs: int
    steps: int = 0
    seconds: float = 0.0
    samples: int = 0
    losses: list[float] = field(default_factory=list)  # per step
    epoch_losses: list[float] = field(default_factory=list)
    _sizes: list[int] = field(default_factory=list, repr=False)  # rows of every step
    _epoch_start: int = field(default=0, repr=False)  # first step of the open epoch

    @property
    def samples_per_s(self) -> float:
        return self.samples / max(self.seconds, 1e-9)

    def record(self, loss: float, rows: int) -> None:
        """One optimiser step on `rows` rows with this loss."""
        self.steps += 1
        self.losses.append(loss)
        self._sizes.append(rows)
        self.samples += rows

    def end_epoch(self, *, by_rows: bool = True) -> None:
        """Close the open epoch: its mean step loss weighted by rows (`by_rows`), else the plain mean
        (joint multi-task steps, whose loss sums tasks with batches of different sizes)."""
        losses = self.losses[self._epoch_start :]
        if by_rows:
            total, count = 0.0, 0
            for value, n in zip(losses, self._sizes[self._epoch_start :]):
                total += value * n
                count += n
            self.epoch_losses.append(total / max(count, 1))
        else:
            self.epoch_losses.append(sum(losses) / len(losses))
        self._epoch_start = self.steps

    def summary(self) -> dict[str, float]:
        return {
            "rows": self.rows,
            "epochs": self.epochs,
            "steps": self.steps,
            "seconds": round(self.seconds, 3),
            "samples_per_s": round(self.samples_per_s, 1),
            "final_loss": self.epoch_losses[-1] if self.epoch_losses else float("nan"),
        }


class Optimiser:
    """Adam over `params` and the one training step (module docstring).

    lr: the run's learning rate (train.lr, or the recovery's); cfg: train.weight_decay, grad_clip,
    max_loss and deterministic, loss.temperature (named in the divergence message).
    masks: None (every entry trains, AdamW) or one float 0/1 mask per parameter, broadcastable to
    it, None where the whole parameter trains (Adam, masked gradients, masked decay).
    reduce: the distributed all-reduce of a step (`csmf_core.train._allreduce`), or None.
    on_step(k, loss): called after every step, k counted from step_offset + 1.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        lr: float,
        cfg: CSMFConfig,
        log: TrainLog,
        *,
        masks: Sequence[torch.Tensor | None] | None = None,
        reduce: Reduce | None = None,
        on_step: OnStep = None,
        step_offset: int = 0,
    ):
        self.params = list(params)
        self.masks = None if masks is None else list(masks)
        if self.masks is not None and len(self.masks) != len(self.params):
            raise ValueError(f"{len(self.masks)} masks for {len(self.params)} parameters")
        self.lr, self.cfg, self.log = lr, cfg, log
        self.reduce, self.on_step, self.step_offset = reduce, on_step, step_offset
        wd = cfg.train.weight_decay
        self.opt = (
            adam(self.params, lr)
            if masks is not None
            else adam(self.params, lr, weight_decay=wd, decoupled=True)
        )

    def step(self, loss: torch.Tensor, rows: int) -> float:
        """Backpropagate `loss` (a scalar over `rows` rows) and update the parameters; returns the loss
        (all processes' row-weighted mean under `reduce`). Raises TrainingDiverged before any update
        on a non-finite loss or one above train.max_loss."""
        value = float(loss.detach())
        if self.reduce is None:
            self._check(value)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.reduce is not None:  # every process checks the same all-reduced loss: all stop together
            value, rows = self.reduce(self.params, value, rows)
            self._check(value)
        with torch.no_grad():
            if self.masks is not None:
                for p, m in zip(self.params, self.masks):
                    if m is not None and p.grad is not None:
                        p.grad.mul_(m)
            if self.cfg.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.grad_clip)
        self.opt.step()
        wd = self.cfg.train.weight_decay
        if self.masks is not None and wd > 0:
            with torch.no_grad():
                for p, m in zip(self.params, self.masks):
                    p.sub_(p if m is None else p * m, alpha=self.lr * wd)
        self.log.record(value, rows)
        if self.on_step is not None:
            self.on_step(self.step_offset + self.log.steps, value)
        return value

    def _check(self, value: float) -> None:
        """The divergence check: a non-finite loss, or one above train.max_loss, stops the run."""
        if not math.isfinite(value) or value > self.cfg.train.max_loss:
            log = self.log
            raise TrainingDiverged(
                f"{log.name}: loss {value} at epoch {len(log.epoch_losses) + 1}, step {log.steps + 1}; "
                f"nothing from this run is kept. Lower train.lr (now {self.lr:g}) or raise "
                f"loss.temperature (now {self.cfg.loss.temperature:g})."
            )


def run_epochs(
    opt: Optimiser,
    epochs: int,
    epoch_batches: Callable[[int], Iterable[tuple[int, B]]],
    loss_fn: Callable[[B], torch.Tensor],
    *,
    on_epoch: Callable[[int], None] | None = None,
    by_rows: bool = True,
) -> TrainLog:
    """`epochs` passes of `opt.step(loss_fn(batch), rows)` over `epoch_batches(epoch)` ((rows, batch)
    pairs), under deterministic kernels when train.deterministic; returns the filled-in log.

    on_epoch(epoch): called after each epoch (1-based), not timed as training (e.g. to score and keep
    the best epoch: csmf_core.validation.EpochSelector). by_rows: see TrainLog.end_epoch.
    """
    log = opt.log
    t0 = time.perf_counter()
    with deterministic_kernels(opt.cfg.train.deterministic):
        for epoch in range(epochs):
            for rows, batch in epoch_batches(epoch):
                opt.step(loss_fn(batch), rows)
            log.end_epoch(by_rows=by_rows)
            if on_epoch is not None:
                t_cb = time.perf_counter()
                on_epoch(epoch + 1)
                t0 += time.perf_counter() - t_cb
    log.seconds = time.perf_counter() - t0
    return log
