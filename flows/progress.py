"""Training progress on the terminal: one bar per cascade step with its steps, epoch, loss and time left.

    bar = StepBar("pretrain_exposure", total=expected, epochs=2)   # nothing happens off a terminal
    bar.update(step, loss)                                          # from the on_step callback
    bar.close()

`rich` comes with Prefect (no extra pin). The bar is drawn on stderr only when stderr is a terminal
(`csmf run` in a shell); in tests, logs and Prefect workers it does nothing, and the log line every
`LOG_EVERY` steps (flows/reporting.py LossCurve) stays the record. The total is the step's expected
optimiser steps (`expected_steps`): epochs x batches per epoch, from the rows the step trains on.
"""

from __future__ import annotations

import math
import sys
from typing import Any, TextIO


def expected_steps(n_rows: int, batch_size: int, epochs: int) -> int:
    """Optimiser steps of `epochs` passes over `n_rows` rows in batches of `batch_size` (the last,
    smaller batch included; csmf_core.train skips a final 1-row batch, so this may count one more)."""
    if n_rows <= 0 or epochs <= 0:
        return 0
    bs = max(1, min(batch_size, n_rows))
    return epochs * math.ceil(n_rows / bs)


class StepBar:
    """A rich progress bar for one training step; a no-op unless `stream` (default stderr) is a TTY."""

    def __init__(self, name: str, total: int, epochs: int, stream: TextIO | None = None):
        self.total, self.epochs = max(0, int(total)), max(1, int(epochs))
        self.per_epoch = max(1, math.ceil(self.total / self.epochs)) if self.total else 1
        self._progress: Any = None
        stream = stream or sys.stderr
        if not self.total or not getattr(stream, "isatty", lambda: False)():
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps  epoch {task.fields[epoch]}/{task.fields[epochs]}  loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
            console=Console(file=stream, force_terminal=True),
            transient=False,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._task = self._progress.add_task(name, total=self.total, epoch=1, epochs=self.epochs, loss="-")
        self._progress.start()

    def update(self, step: int, loss: float) -> None:
        """After optimiser step `step` (1-based) with this loss."""
        if self._progress is None:
            return
        epoch = min(self.epochs, (step - 1) // self.per_epoch + 1)
        self._progress.update(self._task, completed=min(step, self.total), epoch=epoch, loss=f"{loss:.4f}")

    def close(self) -> None:
        """Fill the bar (the estimate may count one step more than ran) and stop drawing."""
        if self._progress is None:
            return
        self._progress.update(self._task, completed=self.total)
        self._progress.stop()
        self._progress = None


class PassBars:
    """The bars of a pass over several cascade steps that reports only `begin(step)` before each step
    and `update(k, loss)` after each optimiser step (k from 1 within the step): the selection pass,
    `csmf_core.tuning.run_trial(on_begin=..., on_step=...)`. One StepBar per step, from `make(step)`
    (None for a step that does not train, a pruning); each is closed when the next step begins."""

    def __init__(self, make):
        self.make = make
        self.bar: StepBar | None = None

    def begin(self, step) -> None:
        self.close()
        self.bar = self.make(step)

    def update(self, step: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(step, loss)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
