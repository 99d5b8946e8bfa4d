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

from csmf_core.allocator import tune_allocator
from csmf_core.config import CSMFConfig
from csmf_core.rowwise import RowOptimiser, row_grad

B = TypeVar("B")
OnStep = Callable[[int, float], None] | None
# (parameters, loss, rows) -> (loss, rows) summed over processes; grads become the rows-weighted mean
Reduce = Callable[[list[torch.Tensor], float, int], tuple[float, int]]

# `train.embedding_optimizer: auto`: dense fused Adam up to this many embedding-table entries in all
# (rows x columns over every table), lazy_adam above. Measured with bench/bench_embeddings.py (2-core
# EPYC, 2 threads, one step of 512 rows): dense 8.5 ms / lazy_adam 9.9 ms at 10,000 users / 5,000 items
# (0.8M entries), 18.1 / 13.3 ms at 100,000 / 50,000 (8M), 1,013 / 43.5 ms at 10M / 1M: dense Adam
# costs ~1.3 ms a step per million entries, so the two meet at ~2-3M. KuaiRand's tables (1.7M) and the
# generated worlds' stay dense.
AUTO_SPARSE_MIN_ENTRIES = 4_000_000
AUTO_SPARSE_RULE = "lazy_adam"  # Adam's update on the rows a batch touches: the closest to dense


def embedding_rule(setting: str, n_entries: int, processes: int = 1) -> tuple[str, str]:
    """(rule, why) for `train.embedding_optimizer` = setting on tables of n_entries entries in all:
    an explicit rule as it is; "auto" -> dense up to AUTO_SPARSE_MIN_ENTRIES (and with processes > 1:
    the sparse rules are single-process), AUTO_SPARSE_RULE above."""
    if setting != "auto":
        return setting, f"train.embedding_optimizer={setting}"
    if processes > 1:
        return (
            "dense",
            f"train.embedding_optimizer=auto -> dense ({processes} processes: sparse rules are single-process)",
        )
    rule = AUTO_SPARSE_RULE if n_entries > AUTO_SPARSE_MIN_ENTRIES else "dense"
    cmp = ">" if rule != "dense" else "<="
    return rule, (
        f"train.embedding_optimizer=auto -> {rule} (embedding tables: {n_entries:,} entries "
        f"{cmp} {AUTO_SPARSE_MIN_ENTRIES:,})"
    )


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
    # torch's deterministic mode also fills every new uninitialised tensor with NaN (a debugging aid
    # against reading memory no kernel wrote; ~180 fills a CSMF step, 0.25 ms for each (B, B) one on
    # this CPU). Every kernel writes its whole output, so values are the same without it.
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = fill
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
    # optimiser state bytes per embedding table (`Optimiser` with names), whichever path updates it
    state_bytes: dict[str, int] = field(default_factory=dict)
    # how its embedding tables were updated (`embedding_rule`, a CSMF stage); "" = not recorded
    embedding_rule: str = ""
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
        """The run's figures; with `state_bytes`, also `opt_state_mib/<table>` per embedding table, and
        with `embedding_rule`, `sparse_embeddings` (1 = row-wise updates, 0 = dense Adam)."""
        out = {
            "rows": self.rows,
            "epochs": self.epochs,
            "steps": self.steps,
            "seconds": round(self.seconds, 3),
            "samples_per_s": round(self.samples_per_s, 1),
            "final_loss": self.epoch_losses[-1] if self.epoch_losses else float("nan"),
        }
        out.update({f"opt_state_mib/{k}": round(v / 2**20, 3) for k, v in self.state_bytes.items()})
        if self.embedding_rule:  # 1 = sparse row updates (lazy_adam / rowwise_adagrad), 0 = dense Adam
            out["sparse_embeddings"] = float(self.embedding_rule != "dense")
        return out


class Optimiser:
    """Adam over `params` and the one training step (module docstring).

    lr: the run's learning rate (train.lr, or the recovery's); cfg: train.weight_decay, grad_clip,
    max_loss, deterministic and embedding_optimizer, loss.temperature (named in the divergence message).
    masks: None (every entry trains, AdamW) or one float 0/1 mask per parameter, broadcastable to
    it, None where the whole parameter trains (Adam, masked gradients, masked decay).
    row_wise: one flag per parameter: True for an embedding table whose lookups give sparse row
    gradients, updated by train.embedding_optimizer (`csmf_core.rowwise`: lazy_adam or
    rowwise_adagrad) on the rows a batch touches; the other parameters keep fused Adam. None = none.
    names: parameter names; with them the log records each embedding table's optimiser state bytes
    (`TrainLog.state_bytes`; `embedding` flags which parameters are tables, default: the row-wise ones).
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
        row_wise: Sequence[bool] | None = None,
        names: Sequence[str] | None = None,
        embedding: Sequence[bool] | None = None,
        reduce: Reduce | None = None,
        on_step: OnStep = None,
        step_offset: int = 0,
    ):
        self.params = list(params)
        self.masks = None if masks is None else list(masks)
        if self.masks is not None and len(self.masks) != len(self.params):
            raise ValueError(f"{len(self.masks)} masks for {len(self.params)} parameters")
        flags = [False] * len(self.params) if row_wise is None else [bool(f) for f in row_wise]
        if len(flags) != len(self.params):
            raise ValueError(f"{len(flags)} row_wise flags for {len(self.params)} parameters")
        kind = cfg.train.embedding_optimizer
        if any(flags) and kind in ("dense", "auto"):
            raise ValueError(
                f"row-wise parameters given but train.embedding_optimizer is {kind} "
                "(resolve auto first: embedding_rule)"
            )
        if any(flags) and reduce is not None:
            raise ValueError("row-wise (sparse) embedding updates are single-process: set train.processes=1")
        self.lr, self.cfg, self.log = lr, cfg, log
        self.reduce, self.on_step, self.step_offset = reduce, on_step, step_offset
        self.names = None if names is None else list(names)
        self.embedding = flags if embedding is None else [bool(f) for f in embedding]
        wd = cfg.train.weight_decay
        dense = [k for k, f in enumerate(flags) if not f]
        self.dense_idx, self.row_idx = dense, [k for k, f in enumerate(flags) if f]
        dense_params = [self.params[k] for k in dense]
        self.opt = None
        if dense_params:
            self.opt = (
                adam(dense_params, lr)
                if masks is not None
                else adam(dense_params, lr, weight_decay=wd, decoupled=True)
            )
        self.rows: RowOptimiser | None = None
        if self.row_idx:
            self.rows = RowOptimiser(
                [self.params[k] for k in self.row_idx],
                [None if self.masks is None else self.masks[k] for k in self.row_idx],
                lr,
                kind,
                weight_decay=wd,
                decay_first=masks is None,  # AdamW's order on the unmasked path, as the fused kernel
            )

    def step(self, loss: torch.Tensor, rows: int) -> float:
        """Backpropagate `loss` (a scalar over `rows` rows) and update the parameters; returns the loss
        (all processes' row-weighted mean under `reduce`). Raises TrainingDiverged before any update
        on a non-finite loss or one above train.max_loss."""
        value = float(loss.detach())
        if self.reduce is None:
            self._check(value)
        for p in self.params:
            p.grad = None
        loss.backward()
        if self.reduce is not None:  # every process checks the same all-reduced loss: all stop together
            value, rows = self.reduce(self.params, value, rows)
            self._check(value)
        with torch.no_grad():
            row_grads = [row_grad(self.params[k]) for k in self.row_idx]
            if self.masks is not None:
                for k in self.dense_idx:
                    p, m = self.params[k], self.masks[k]
                    if m is not None and p.grad is not None:
                        p.grad.mul_(m)
                for j, k in enumerate(self.row_idx):
                    if self.masks[k] is not None:
                        row_grads[j] = (row_grads[j][0], row_grads[j][1] * self.masks[k])
            if self.cfg.train.grad_clip > 0:
                if row_grads:
                    self._clip(row_grads)
                else:
                    torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.grad_clip)
        if self.opt is not None:
            self.opt.step()
        if self.rows is not None:
            self.rows.step(row_grads)
        wd = self.cfg.train.weight_decay
        if self.masks is not None and wd > 0:
            with torch.no_grad():
                for k in self.dense_idx:
                    p, m = self.params[k], self.masks[k]
                    p.sub_(p if m is None else p * m, alpha=self.lr * wd)
        self.log.record(value, rows)
        if self.log.steps == 1 or not self.log.state_bytes:
            self.log.state_bytes = self.state_bytes()
        if self.on_step is not None:
            self.on_step(self.step_offset + self.log.steps, value)
        return value

    def _clip(self, row_grads: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """torch's clip_grad_norm_ over the dense gradients and the row gradients' values together
        (the norm of a coalesced sparse gradient is the norm of its dense equivalent)."""
        dense = [self.params[k].grad for k in self.dense_idx if self.params[k].grad is not None]
        grads = dense + [v for _, v in row_grads]
        if not grads:
            return
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        coef = torch.clamp(self.cfg.train.grad_clip / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef)

    def state_bytes(self) -> dict[str, int]:
        """Optimiser state bytes of every embedding table by name (empty without `names`)."""
        if self.names is None:
            return {}
        out: dict[str, int] = {}
        if self.opt is not None:
            for k in self.dense_idx:
                if self.embedding[k]:
                    st = self.opt.state.get(self.params[k], {})
                    out[self.names[k]] = sum(t.numel() * t.element_size() for t in st.values() if t.dim() > 0)
        if self.rows is not None:
            for k, b in zip(self.row_idx, self.rows.state_bytes()):
                out[self.names[k]] = b
        return out

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
    on_epoch: Callable[[int], bool | None] | None = None,
    by_rows: bool = True,
) -> TrainLog:
    """`epochs` passes of `opt.step(loss_fn(batch), rows)` over `epoch_batches(epoch)` ((rows, batch)
    pairs), under deterministic kernels when train.deterministic; returns the filled-in log.

    on_epoch(epoch): called after each epoch (1-based), not timed as training (e.g. to score and keep
    the best epoch: csmf_core.validation.EpochSelector); a true return stops training there (early
    stopping, train.patience). by_rows: see TrainLog.end_epoch.
    """
    tune_allocator()  # freed (B, B) step buffers stay in the heap: no page faults per step
    log = opt.log
    t0 = time.perf_counter()
    with deterministic_kernels(opt.cfg.train.deterministic):
        for epoch in range(epochs):
            for rows, batch in epoch_batches(epoch):
                opt.step(loss_fn(batch), rows)
            log.end_epoch(by_rows=by_rows)
            if on_epoch is not None:
                t_cb = time.perf_counter()
                stop = on_epoch(epoch + 1)
                t0 += time.perf_counter() - t_cb
                if stop:
                    break
    log.seconds = time.perf_counter() - t0
    return log
