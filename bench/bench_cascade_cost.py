"""Benchmark 7 (cascade cost): where the seconds of one CSMF cascade go, beside MOPPR at the same budget.

How to run:  .venv/bin/python bench/bench_cascade_cost.py [--data DIR] [--date YYYY-MM-DD]
             [--set KEY=VALUE ...] [--seed 0] [--methods csmf moppr] [--quick]

Both methods are trained the way `csmf compare` trains them (`protocol.fit_with_protocol`: a selection
pass on the training window minus its validation days, every part keeping its best epoch there, the
fused weights chosen on the validation users, then a refit on the whole window for the kept epochs),
in this process, on the same model-ready data (loaded once, timed once: both methods need it, as is
the process's first torch optimiser, which imports torch._dynamo: `warm_torch`), with
the same config, seed, torch threads and epoch caps. The per-objective sample budget is the same by
construction: MOPPR's caps are the first objective's, CSMF's stages their own (docs/comparison.md).

Wall time is attributed *exclusively* (a timed call's own seconds, minus those of the timed calls it
makes) to what the method is doing: each cascade step kind (pretrain, prune, recover, finetune), the
per-epoch validation scoring of epoch selection, the step score after each train step, the choice of
fused weights and the final validation score, model construction (setup), the final encoding of the
evaluation users and catalog, and MOPPR's page-view grouping and training loop; what no timed call
covers is "other". Each figure is printed per phase (select / refit). The headline is the ratio of
the two methods' fit times (target <= 1.35, the paper's 4h34m / 3h23m; issue #18).

Without --data the generated `small` world is used (generated under the bench work dir when missing).
--quick: the tiny world with 1 epoch per step (seconds; the figures mean nothing).
"""

from __future__ import annotations

import argparse
import functools
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

try:
    from bench import benchlib
except ImportError:  # run as `python bench/bench_cascade_cost.py`
    import benchlib  # type: ignore[no-redef]


class Clock:
    """Exclusive wall time per (phase, label): a call's seconds minus those of the timed calls inside it."""

    def __init__(self) -> None:
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)
        self.calls: dict[tuple[str, str], int] = defaultdict(int)
        self.phase = "refit"
        self._stack: list[list] = []  # [label, start, seconds of timed children]

    def timed(self, label: str | Callable[..., str], fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            name = label(*args, **kwargs) if callable(label) else label
            frame = [name, time.perf_counter(), 0.0]
            self._stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                self._stack.pop()
                total = time.perf_counter() - frame[1]
                self.seconds[(self.phase, name)] += total - frame[2]
                self.calls[(self.phase, name)] += 1
                if self._stack:
                    self._stack[-1][2] += total

        return wrapper

    def in_phase(self, phase: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            before, self.phase = self.phase, phase
            try:
                return fn(*args, **kwargs)
            finally:
                self.phase = before

        return wrapper


def _step_label(step, *args, **kwargs) -> str:
    """pretrain / finetune / prune / recover: the kind of a cascade step, from its name."""
    return (
        step.name.split("_")[0]
        if step.kind == "train"
        else {"prune": "prune", "recover": "recover"}[step.kind]
    )


def instrument(clock: Clock) -> Callable[[], None]:
    """Wrap the functions a protocol fit calls, where its callers look them up; returns an undo."""
    from csmf_core import tuning, validation
    from csmf_core.baselines import csmf as b_csmf
    from csmf_core.baselines import moppr, protocol

    patches = [
        (tuning, "run_step", _step_label),
        (b_csmf, "run_step", _step_label),
        (tuning, "build_model", "setup"),
        (b_csmf, "build_model", "setup"),
        (tuning, "step_score", "step score"),
        (tuning, "choose_weights", "weight choice"),
        (tuning, "validation_score", "validation score"),
        (protocol, "choose_vector_weights", "weight choice"),
        (protocol, "vectors_score", "validation score"),
        (b_csmf, "item_matrix", "encode"),
        (b_csmf, "user_matrix", "encode"),
        (moppr, "page_views", "setup"),
        (moppr, "train_loop", "train"),
        (validation.EpochSelector, "consider", "epoch validation"),
        (validation.EpochSelector, "__init__", "epoch validation"),
        (validation.EpochSelector, "restore", "epoch validation"),
        (protocol.Selector, "_consider", "epoch validation"),
        (protocol.Selector, "finish", "encode"),
    ]
    undo = []
    for owner, attr, label in patches:
        orig = getattr(owner, attr)
        setattr(owner, attr, clock.timed(label, orig))
        undo.append((owner, attr, orig))
    orig_sel = protocol._selection
    protocol._selection = clock.in_phase("select", orig_sel)
    undo.append((protocol, "_selection", orig_sel))

    def restore() -> None:
        for owner, attr, orig in reversed(undo):
            setattr(owner, attr, orig)

    return restore


ORDER = ["setup", "pretrain", "prune", "recover", "finetune", "train", "epoch validation", "step score",
         "weight choice", "validation score", "encode", "other"]  # fmt: skip


def fit_breakdown(
    method: str, data_val, data_full, cfg, seed: int
) -> tuple[float, dict[tuple[str, str], float]]:
    """(wall seconds of the whole protocol fit, exclusive seconds per (phase, label))."""
    from csmf_core.baselines.protocol import fit_with_protocol

    clock = Clock()
    restore = instrument(clock)
    try:
        fit = clock.timed("other", fit_with_protocol)
        t0 = time.perf_counter()
        fit(method, data_val, data_full, cfg, seed)
        wall = time.perf_counter() - t0
    finally:
        restore()
    return wall, dict(clock.seconds)


def warm_torch() -> float:
    """Seconds of the process's first torch optimiser: building one imports torch._dynamo (~800
    modules, sympy among them; ~1.3 s of CPU on the 2-core VM), once per process. Paid here, before
    either method is timed, instead of inside whichever method trains first (it was CSMF's pretrain)."""
    import torch

    from csmf_core.optim import adam

    t0 = time.perf_counter()
    adam([torch.zeros(1, requires_grad=True)], 1e-3)
    return time.perf_counter() - t0


def run(
    data: Path | None = None,
    date: str | None = None,
    overrides: list[str] | None = None,
    seed: int = 0,
    methods: tuple[str, ...] = ("csmf", "moppr"),
    quick: bool = False,
    write: bool = True,
) -> list[dict]:
    from csmf_core.baselines.protocol import load_protocol_data
    from csmf_core.config import load_config

    overrides = list(overrides or [])
    if quick:
        overrides = [
            "train.epochs=[1,1,1]",
            "model.dim=16",
            "model.hidden=[32]",
            "data.seq_len=5",
            *overrides,
        ]
    data = benchlib.protocol_dataset(data, quick)
    cfg = load_config(None, overrides)
    threads = benchlib.set_threads(cfg.train.threads or None)
    t0 = time.perf_counter()
    mr, window = benchlib.prepare_window("cascade_cost", data, date, cfg)
    t_prep = time.perf_counter() - t0
    t0 = time.perf_counter()
    data_val, data_full = load_protocol_data(mr, cfg)
    t_load = time.perf_counter() - t0
    rec = benchlib.Recorder(
        "cascade_cost",
        {
            "dataset": Path(data).name,
            "eval_dates": list(window.eval_dates),
            "overrides": overrides,
            "seed": seed,
            "threads": threads,
            "epochs": list(cfg.train.epochs),
        },  # fmt: skip
        write=write,
    )
    rec.add("prep (model-ready data, shared)", t_prep, "s")
    rec.add("data loading (both passes' data, shared)", t_load, "s")
    rec.add("torch optimiser first use (shared)", warm_torch(), "s")
    walls: dict[str, float] = {}
    rows: dict[str, dict[tuple[str, str], float]] = {}
    for m in methods:
        walls[m], rows[m] = fit_breakdown(m, data_val, data_full, cfg, seed)
    labels = sorted(
        {lab for r in rows.values() for (_, lab) in r},
        key=lambda x: (ORDER.index(x) if x in ORDER else 99, x),
    )
    train = {m: training_seconds(rows[m]) for m in methods}
    for m in methods:
        for phase in ("select", "refit"):
            for lab in labels:
                s = rows[m].get((phase, lab), 0.0)
                if s > 0:
                    rec.add(f"{m} {phase}: {lab}", s, "s", share=s / walls[m])
        rec.add(f"{m} fit (select + refit)", walls[m], "s")
        rec.add(f"{m} training passes (select + refit)", train[m], "s")
    if "csmf" in walls and "moppr" in walls:
        rec.add("csmf / moppr fit time", walls["csmf"] / walls["moppr"], "x", target="<= 1.35")
        # what the ratio would be with validation scoring, setup and encoding free for both methods
        rec.add("csmf / moppr training passes alone", train["csmf"] / train["moppr"], "x")
    print(breakdown_table(rows, walls))
    return rec.flush()


TRAINING = ("pretrain", "prune", "recover", "finetune", "train")  # a method's own passes over rows


def training_seconds(row: dict[tuple[str, str], float]) -> float:
    """Seconds of the training passes (TRAINING labels) of one fit, select + refit."""
    return sum(s for (_, label), s in row.items() if label in TRAINING)


def breakdown_table(rows: dict[str, dict[tuple[str, str], float]], walls: dict[str, float]) -> str:
    """One line per label: seconds and share of the fit per method, select + refit."""
    labels = sorted(
        {lab for r in rows.values() for (_, lab) in r},
        key=lambda x: (ORDER.index(x) if x in ORDER else 99, x),
    )
    head = ["what"] + [f"{m} s (share)" for m in rows]
    out = []
    for lab in labels:
        cells = [lab]
        for m, r in rows.items():
            s = r.get(("select", lab), 0.0) + r.get(("refit", lab), 0.0)
            cells.append(f"{s:8.2f} ({s / walls[m]:5.1%})" if s else "")
        out.append(cells)
    out.append(["total (wall)"] + [f"{walls[m]:8.2f}" for m in rows])
    widths = [max(len(c) for c in col) for col in zip(head, *out)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join(["== cascade cost breakdown (exclusive seconds, select + refit)", line(head),
                      line(["-" * w for w in widths]), *[line(c) for c in out]])  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    benchlib.add_protocol_args(p, "tiny world, 1 epoch per step (smoke test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=["csmf", "moppr"])
    a = p.parse_args(argv)
    return run(a.data, a.date, a.overrides, a.seed, tuple(a.methods), a.quick, write=not a.no_write)


if __name__ == "__main__":
    main()
