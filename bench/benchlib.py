"""Shared helpers of the benchmarks: machine facts, result records, interleaved timing, cached data.

Every figure is a ratio against a reference measured in the same process, interleaved with it,
because the development machine is shared (2 cores, other jobs running): absolute samples/s
move by 20-30% between minutes, ratios of interleaved medians much less.

Results: `bench/results/<bench>.jsonl` ($CSMF_BENCH_RESULTS overrides the folder), one JSON object per figure:
    {bench, figure, value, unit, target, met, machine, date, params}
`target` is a string such as ">= 0.8" (or null for informational figures) and `met` the verdict.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
if str(REPO) not in sys.path:  # `python bench/bench_x.py` from anywhere
    sys.path.insert(0, str(REPO))


def results_dir() -> Path:
    """Where figures are appended: $CSMF_BENCH_RESULTS, else bench/results (tests point it at a tmp dir)."""
    return Path(os.environ.get("CSMF_BENCH_RESULTS") or RESULTS)


def work_dir() -> Path:
    """Scratch space for generated datasets ($CSMF_BENCH_DIR, else <tmp>/csmf-bench); reused across runs."""
    d = Path(os.environ.get("CSMF_BENCH_DIR") or Path(os.environ.get("TMPDIR", "/tmp")) / "csmf-bench")
    d.mkdir(parents=True, exist_ok=True)
    return d


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    import faiss

    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "python": platform.python_version(),
        "loadavg": load,
    }


def set_threads(n: int | None) -> int:
    """Same thread count for torch and FAISS (default: every core)."""
    import faiss

    n = int(n or os.cpu_count() or 1)
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    return n


def _met(value: float, target: str | None) -> bool | None:
    if target is None or value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    op, ref = target.split()
    ref = float(ref)
    return {">=": value >= ref, "<=": value <= ref, "<": value < ref, ">": value > ref, "==": value == ref}[
        op
    ]


@dataclass
class Recorder:
    """Collects the figures of one benchmark, prints them as a table and appends them to its JSONL."""

    bench: str
    params: dict = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)
    write: bool = True

    def add(self, figure: str, value, unit: str, target: str | None = None, **params) -> dict:
        if isinstance(value, float | np.floating):
            value = float(value)
        rec = {
            "bench": self.bench,
            "figure": figure,
            "value": value,
            "unit": unit,
            "target": target,
            "met": _met(value, target),
            "machine": machine(),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "params": {**self.params, **params},
        }
        self.records.append(rec)
        return rec

    def flush(self) -> list[dict]:
        print(
            table(
                self.records,
                title=f"{self.bench} ({self.records[0]['machine']['cpu'] if self.records else ''})",
            )
        )
        if self.write and self.records:
            out = results_dir()
            out.mkdir(parents=True, exist_ok=True)
            with open(out / f"{self.bench}.jsonl", "a") as f:
                for r in self.records:
                    f.write(json.dumps(r, default=str) + "\n")
        return self.records


def fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.1f}"
    return str(v)


def table(records: list[dict], title: str = "", with_bench: bool = False) -> str:
    head = (["bench"] if with_bench else []) + ["figure", "value", "unit", "target", "met"]
    rows = []
    for r in records:
        met = {True: "yes", False: "NO", None: ""}[r["met"]]
        row = [r["figure"], fmt(r["value"]), r["unit"], r["target"] or "", met]
        rows.append(([r["bench"]] if with_bench else []) + row)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = ([f"== {title}"] if title else []) + [line(head), line(["-" * w for w in widths])]
    return "\n".join(out + [line(r) for r in rows])


# ---- timing ---------------------------------------------------------------------------------------
def interleaved(arms: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """Run every arm `reps` times, alternating (ABAB..., order reversed every other round) -> seconds."""
    names = list(arms)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for n in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            arms[n]()
            out[n].append(time.perf_counter() - t0)
    return out


def median(xs) -> float:
    return float(statistics.median(xs))


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median of per-round ratios num[r] / den[r] (rounds are adjacent in time, so noise mostly cancels)."""
    return median([a / b for a, b in zip(num, den)])


def matmul_gflops(n: int = 1024, seconds: float = 0.5, device: str = "cpu") -> float:
    """Measured float32 torch matmul rate (GFLOP/s) at n x n on the current thread count (best of 3),
    on `device` (on CUDA: synchronised before the clock stops; torch's default float32 precision)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    best = 0.0
    for _ in range(3):
        k, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 3:
            a @ b
            k += 1
        sync()
        best = max(best, 2 * n**3 * k / (time.perf_counter() - t0) / 1e9)
    return best


def peak_rss_mib() -> float:
    """Peak resident set size of this process (MiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- data -----------------------------------------------------------------------------------------
def synth_dataset(name: str, **overrides) -> tuple[Path, list[str], float]:
    """A generated canonical dataset under work_dir() (generated once, reused while the params match).

    Returns (path, dates, seconds spent generating now; 0 when reused).
    """
    from csmf_core import synth

    path = work_dir() / "datasets" / name
    stamp = path / "_bench_params.json"
    want = json.dumps(overrides, sort_keys=True)
    if stamp.exists() and stamp.read_text() == want:
        cfg = synth.SynthConfig.from_preset("small", overrides.pop("seed", 0), **overrides)
        return path, cfg.dates, 0.0
    t0 = time.perf_counter()
    s = synth.generate(path, None, overwrite=True, config=synth.SynthConfig.from_preset("small", **overrides))
    stamp.write_text(want)
    return path, s.dates, time.perf_counter() - t0


def protocol_dataset(data: Path | None, quick: bool) -> Path:
    """The dataset a protocol benchmark (cascade cost, early stopping) runs on: `data` when given, else
    the generated tiny world for --quick (generated once) or the `small` one."""
    if data is not None:
        return Path(data)
    if not quick:
        return synth_dataset("small")[0]
    from csmf_core import synth

    path = work_dir() / "datasets" / "tiny"
    if not (path / "dataset.yaml").exists():
        synth.generate(path, "tiny", seed=0, overwrite=True)
    return path


def prepare_window(bench: str, data: Path, date: str | None, cfg) -> tuple[Path, Any]:
    """(model-ready directory, window): `data` prepared as a daily run for evaluation day `date` (the
    last partition by default) would prepare it, under work_dir()/<bench>/<dataset>/model_ready."""
    from csmf_core import prep
    from flows.inputs import plan_window

    window = plan_window(str(data), date, cfg.data)
    mr = work_dir() / bench / Path(data).name / "model_ready"
    prep.prepare(data, mr, train_dates=window.train_dates, eval_dates=window.eval_dates,
                 seq_len=cfg.data.seq_len, n_req_neg=cfg.data.n_req_neg, overwrite=True)  # fmt: skip
    return mr, window


def add_protocol_args(parser: argparse.ArgumentParser, quick_help: str) -> None:
    """--data, --date, --set, --quick, --no-write: the options of the protocol benchmarks."""
    parser.add_argument("--data", type=Path, help="canonical dataset (default: the generated small world)")
    parser.add_argument("--date", help="first evaluation day (default: the last partition)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--no-write", action="store_true", help="do not append to bench/results")


def model_ready(
    ds: Path, dates: list[str], name: str, part_rows: int = 1_000_000, seq_len: int = 20, n_req_neg: int = 10
) -> tuple[Path, float]:
    """Model-ready dataset of `ds` (train on every day but the last), cached like synth_dataset."""
    from csmf_core import prep

    path = work_dir() / "model_ready" / name
    stamp = path / "_bench_params.json"
    want = json.dumps({"ds": str(ds), "dates": dates, "part_rows": part_rows, "L": seq_len, "M": n_req_neg})
    src_stamp = ds / "_bench_params.json"
    if stamp.exists() and stamp.read_text() == want and stamp.stat().st_mtime >= src_stamp.stat().st_mtime:
        return path, 0.0
    t0 = time.perf_counter()
    prep.prepare(
        ds,
        path,
        train_dates=(dates[0], dates[-2]),
        eval_dates=dates[-1],
        seq_len=seq_len,
        n_req_neg=n_req_neg,
        overwrite=True,
        part_rows=part_rows,
    )
    stamp.write_text(want)
    return path, time.perf_counter() - t0


def pruned_model(data, cfg, prunings: int | None = None):
    """A fresh CSMF model with every stage but the last pruned as the cascade prunes it (its own
    `run_step`, no training): the owners a late stage trains under. `prunings`: only the first so
    many stages pruned (1: the owners stage 1's fine-tuning trains under). Returns (model, owners)."""
    from csmf_core.cascade import Step, build_model, run_step

    model, owners = build_model(data, cfg)
    n = len(data.objectives) - 1 if prunings is None else prunings
    for s in range(n):
        owners, _ = run_step(Step(f"cpp_prune_{data.objectives[s]}", "prune", s), model, owners, data, cfg)
    return model, owners
