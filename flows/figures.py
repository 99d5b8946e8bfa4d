"""Figures for the tracking store (matplotlib, Agg backend, object-oriented API: safe in task threads).

    fig = recall_at_k_figure(rows)                 # rows of csmf_core.evaluate.evaluate_model
    fig = ownership_figure({"cpp_prune_exposure": units_per_stage, ...}, stages)
    tracker.log_figure(fig, "figures/recall_at_k.png")

    figures = BackgroundFigures(workdir / "figures")   # or drawn by a child process, meanwhile:
    figures.add("recall_at_k", {"rows": rows}, "figures/recall_at_k.png", [tracker, parent])
    figures.start()                                     # returns at once
    ...                                                 # the flow goes on
    figures.finish()                                    # waits, logs each PNG to its runs

Figures are built with `matplotlib.figure.Figure` directly (no pyplot global state to leak);
matplotlib is imported by the first figure drawn, not by this module.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SCORERS = ("own", "fused", "popularity")
_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")


def new_figure(**kwargs: Any) -> Figure:
    """A `matplotlib.figure.Figure` on the Agg backend, matplotlib imported here (~0.3 s): a process
    whose figures a `BackgroundFigures` child draws never imports it."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def recall_at_k_figure(rows: list[dict], scorers: tuple[str, ...] = SCORERS) -> Figure:
    """Recall@K vs K, one panel per objective, one line per scorer ("own" = the objective's own mode)."""
    objectives = list(dict.fromkeys(r["objective"] for r in rows))
    fig = new_figure(figsize=(4.2 * max(1, len(objectives)), 3.4), layout="constrained")
    axes = fig.subplots(1, max(1, len(objectives)), squeeze=False)[0]
    for ax, obj in zip(axes, objectives):
        for j, scorer in enumerate(scorers):
            name = obj if scorer == "own" else scorer
            pts = sorted((r["k"], r["recall"]) for r in rows if r["objective"] == obj and r["scorer"] == name)
            if pts:
                ax.plot([k for k, _ in pts], [v for _, v in pts], marker="o", color=_COLORS[j], label=scorer)
        ks = sorted({r["k"] for r in rows if r["objective"] == obj})
        ax.set_title(obj)
        ax.set_xlabel("K")
        ax.set_xscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Recall@K")
    axes[0].legend(loc="upper left", fontsize="small")
    return fig


def ownership_figure(snapshots: dict[str, dict[str, list[int]]], stages: list[str]) -> Figure:
    """Share of units per owner stage in every unit group (stacked; unit count in the tick label),
    one panel per snapshot (e.g. after each pruning).

    snapshots: {title: {group: [units owned by stage 0, stage 1, ...]}} (masks.json units_per_stage).
    """
    fig = new_figure(
        figsize=(max(6.0, 0.5 * _n_groups(snapshots) + 2), 2.8 * max(1, len(snapshots))), layout="constrained"
    )
    axes = fig.subplots(max(1, len(snapshots)), 1, squeeze=False)[:, 0]
    for ax, (title, groups) in zip(axes, snapshots.items()):
        names = list(groups)
        totals = [max(1, sum(groups[g])) for g in names]
        bottom = [0.0] * len(names)
        for s, stage in enumerate(stages):
            values = [(groups[g][s] if s < len(groups[g]) else 0) / n for g, n in zip(names, totals)]
            ax.bar(range(len(names)), values, bottom=bottom, color=_COLORS[s % len(_COLORS)], label=stage)
            bottom = [b + v for b, v in zip(bottom, values)]
        labels = [f"{g} ({sum(groups[g])})" for g in names]
        ax.set_xticks(range(len(names)), labels, rotation=45, ha="right", fontsize="x-small")
        ax.set_ylim(0, 1)
        ax.set_ylabel("share of units")
        ax.set_title(title, fontsize="small")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=len(stages), fontsize="small")
    return fig


def _n_groups(snapshots: dict[str, dict[str, list[int]]]) -> int:
    return max((len(g) for g in snapshots.values()), default=1)


def cascade_figure(rows: list[dict], objectives: list[str], k: int, days: str) -> Figure:
    """Every objective's metric after each cascade step (the cascade at a glance): one panel per metric
    (Recall@k, nDCG@k), x = the steps in plan order labelled with their names, one line per objective
    (its own mode; absent before the objective's stage is trained).

    rows: `flows.reporting.cascade_rows` (one per step: "step", "name", and "<objective> recall@k" /
    "<objective> ndcg@k" values or None); days: the evaluation day(s) the metrics were measured on."""
    names = [r["name"] for r in rows]
    fig = new_figure(figsize=(max(7.0, 0.85 * len(names) + 2.5), 4.4), layout="constrained")
    axes = fig.subplots(1, 2, squeeze=False)[0]
    xs = list(range(len(names)))
    for ax, metric, label in zip(axes, ("recall", "ndcg"), (f"Recall@{k}", f"nDCG@{k}")):
        for j, o in enumerate(objectives):
            pts = [
                (x, r[f"{o} {metric}@{k}"])
                for x, r in zip(xs, rows)
                if r.get(f"{o} {metric}@{k}") is not None
            ]
            if pts:
                ax.plot([x for x, _ in pts], [v for _, v in pts], marker="o", color=_COLORS[j % 6], label=o)
        ax.set_xticks(xs, names, rotation=35, ha="right", fontsize="small")
        ax.set_ylabel(f"{label} (test: {days})")
        ax.set_title(f"{label} after each step")  # short: two panels' long titles ran into each other
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best", fontsize="small", title="objective (own mode)")
    fig.suptitle("Each objective after every cascade step")
    return fig


DRAWERS = {"recall_at_k": recall_at_k_figure, "ownership": ownership_figure, "cascade": cascade_figure}


class BackgroundFigures:
    """Figures drawn to PNG by one child process (`python -m flows.figures DIR`) while the caller goes
    on, then logged to their runs by `finish`.

    Why: drawing is matplotlib's Python (text layout for the constrained layout, then the Agg draw),
    ~0.15-0.2 s a figure that holds the GIL, so a thread would not overlap it with the flow's own
    Python work. A child process draws on the machine's other core while the flow builds the index,
    evaluates, registers and gates the model (the daily flow's figures: ~1.2 s of drawing, matplotlib's
    import included, off its critical path on the 2-core VM, docs/performance.md). The PNGs are the
    bytes `savefig` writes in-process (same matplotlib, same code, MLflow's `log_figure` defaults),
    logged with `log_artifact` as `reporting.log_figure` does.

    Jobs are drawn in the order added. `start` may come before the last `add`: each job is a JSON file
    in `directory`, its path one line on the child's stdin (a line of ~100 bytes, not the job, so a
    pipe buffer holds hundreds of them), and the child draws each as it arrives until `finish` closes
    its stdin. From `start` until `finish` or `close` this process's torch runs one intra-op thread
    fewer (`_leave_a_core`), so that the two do not fight over the same cores. `directory` (created, removed by `finish` once everything is
    logged) holds the jobs, the PNGs and the child's stderr; a child that fails makes `finish` raise
    with that stderr. Arguments must be JSON (NumPy scalars are converted)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.jobs: list[tuple[Path, str, list[Any]]] = []  # (png, artifact folder, target trackers)
        self._unsent: list[str] = []  # queued jobs (JSON) the child has not been handed yet
        self._process: subprocess.Popen | None = None
        self._stderr: Any = None
        self._threads: int | None = None  # this process's torch threads before the child started
        self._lost: OSError | None = None  # why a job could not be handed to the child

    def add(self, kind: str, kwargs: dict, artifact_file: str, targets: Sequence[Any]) -> None:
        """Queue `DRAWERS[kind](**kwargs)` as `artifact_file` ("figures/x.png") of every target run;
        once started, the child gets it at once."""
        if kind not in DRAWERS:
            raise ValueError(f"unknown figure {kind!r}; known: {', '.join(DRAWERS)}")
        folder, name = os.path.split(os.path.normpath(artifact_file))
        png = self.directory / str(len(self.jobs)) / name
        # serialised now: a value that is not JSON fails here, at the call that queued it
        job = json.dumps({"kind": kind, "kwargs": kwargs, "png": str(png)}, default=_json_scalar)
        self.jobs.append((png, folder, list(targets)))
        self._unsent.append(job)
        if self._process is not None:
            self._send()

    def start(self) -> None:
        """Launch the child on the figures queued so far (nothing when none are: a later `start` or
        `finish` launches it); returns at once. Figures added after it go to the same child."""
        if self._process is not None or not self._unsent:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        stderr = open(self.directory / "stderr.txt", "wb")  # noqa: SIM115  (closed by finish / close)
        try:
            # -P: the child finds this installation's `flows`, never a `flows` folder in the working dir
            self._process = subprocess.Popen(
                [sys.executable, "-P", "-m", "flows.figures", str(self.directory)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        except BaseException:
            stderr.close()
            raise
        self._stderr = stderr
        self._threads = _leave_a_core()
        self._send()

    def _send(self) -> None:
        """Write each unsent job to its file and hand the child its path. Never raises: a child that
        has died (a failed figure) reads nothing more and `finish` reports its error; a job file that
        cannot be written (a full disk) is kept for `finish` to report, and the flow goes on."""
        first = len(self.jobs) - len(self._unsent)
        unsent, self._unsent = self._unsent, []
        lines = []
        try:
            for i, job in enumerate(unsent, start=first):
                path = self.directory / f"job-{i}.json"
                path.write_text(job)
                lines.append(json.dumps(str(path)) + "\n")  # one line whatever the path holds
        except OSError as exc:
            self._lost = self._lost or exc
        try:
            self._process.stdin.write("".join(lines).encode())
            self._process.stdin.flush()
        except (BrokenPipeError, OSError):  # the child exited: its stderr says why, at `finish`
            pass

    def finish(self, timeout: float = 600.0) -> list[str]:
        """Wait for the child (starting it first if `start` was not called) to draw every job, log
        every PNG to its runs and remove `directory`; returns the artifact files logged. RuntimeError
        when the child failed."""
        self.start()
        process, self._process = self._process, None
        if process is None:
            return []
        jobs, self.jobs, self._unsent = self.jobs, [], []  # finished either way: nothing to draw again
        try:
            _close_quietly(process.stdin)  # no more jobs: the child exits after the last one
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            code = None
        finally:
            self._stderr.close()
            self._stderr = None
            self._threads = _restore_threads(self._threads)
        if code != 0:
            err = (self.directory / "stderr.txt").read_text(errors="replace").strip()[-2000:]
            why = f"exited with code {code}" if code is not None else f"did not finish in {timeout:g} s"
            raise RuntimeError(f"drawing the figures in {self.directory} {why}: {err or '(no output)'}")
        lost, self._lost = self._lost, None
        if lost is not None:
            raise RuntimeError(f"a figure could not be handed to the child drawing them: {lost}")
        logged = []
        for png, folder, targets in jobs:
            for t in targets:
                t.log_artifact(png, folder or None)
            logged.append(f"{folder}/{png.name}" if folder else png.name)
        shutil.rmtree(self.directory, ignore_errors=True)
        return logged

    def salvage(self, timeout: float = 120.0) -> list[str]:
        """`finish` for a run that failed: draw and log what was queued, as far as that goes; never
        raises (the run's own error is the one to report). Returns the artifact files logged."""
        try:
            return self.finish(timeout=timeout)
        except Exception:  # noqa: BLE001  (a failing run: its figures are best effort)
            return []

    def close(self) -> None:
        """Stop a child still drawing (a run that ended without `finish`) and close its files;
        idempotent. What was queued is dropped."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
        if process is not None:
            process.wait()
            _close_quietly(process.stdin)
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        self._threads = _restore_threads(self._threads)
        self.jobs, self._unsent, self._lost = [], [], None


def _close_quietly(stream: Any) -> None:
    """Close a pipe to a child that may have exited (its end closed: nothing to flush)."""
    try:
        stream.close()
    except (BrokenPipeError, OSError):
        pass


def _leave_a_core() -> int | None:
    """While the child runs, this process's torch uses one intra-op thread fewer (at least one) and
    leaves it a core: with as many threads as cores, every parallel op waits at its barrier for the
    thread the child preempted (the gate's exact-fusion check, 257 users x 1500 items on the 2-core
    VM beside a busy process: 0.13 s with 2 threads, 0.013 s with 1; evaluation alone as fast with 1
    as with 2; docs/performance.md). torch's OpenMP setting is per thread: this applies to the
    calling thread, where the daily flow runs its tasks (a task submitted to a worker thread would
    keep its own count). Returns the count to restore, None when nothing changed (torch not
    imported here, or one thread)."""
    torch = sys.modules.get("torch")  # never imported for this
    if torch is None:
        return None
    n = torch.get_num_threads()
    if n <= 1:
        return None
    torch.set_num_threads(n - 1)
    return n


def _restore_threads(n: int | None) -> None:
    """Undo `_leave_a_core` (its return value); returns None for the caller to store."""
    if n is not None:
        sys.modules["torch"].set_num_threads(n)
    return None


def _json_scalar(value: Any) -> Any:
    """NumPy (and torch) scalars as Python numbers for the spec."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON: {type(value).__name__}")


def draw(lines: Iterable[str]) -> None:
    """Draw each job whose JSON file path (a JSON string) is a line of `lines` (the child's stdin, written by
    `BackgroundFigures`) to its PNG, in order, until the lines end."""
    for line in lines:
        job = json.loads(Path(json.loads(line)).read_text())
        png = Path(job["png"])
        png.parent.mkdir(parents=True, exist_ok=True)
        DRAWERS[job["kind"]](**job["kwargs"]).savefig(png)


if __name__ == "__main__":  # the child of BackgroundFigures.start
    if len(sys.argv) != 2:
        sys.exit("usage: python -m flows.figures DIR  (job file paths on stdin, one a line)")
    draw(sys.stdin)
