"""Run every benchmark (bench/bench_*.py) in turn and summarise the targets: what `make bench` runs.

How to run:  .venv/bin/python bench/run_all.py [--full] [--only serving scaling] [--quick]

Each benchmark runs as its own process (its own threads, memory and imports) and prints its table;
its figures are appended to bench/results/<bench>.jsonl (or $CSMF_BENCH_RESULTS). At the end, every
figure of this run is printed again in one table, with the list of targets met and not met.
`--full` runs the 1M / 4M / 16M-exposure scaling cases instead of 0.5M / 2M (about 30 minutes on 2 cores) and the sharded-ingest
benchmark on Dask (bench_ingest_dask.py, ~70 s: a scale-out figure, not one of the targets) and the
early-stopping measurement (bench_patience.py, ~5 min: three seeds of CSMF's and MOPPR's selection
pass); without --full these two run only when named in --only, keeping the default run under 20 minutes; `--quick` runs every
benchmark at smoke-test size (seconds each; the figures mean nothing). Exit status 0 even when a
target is missed (a benchmark reports, it does not gate); 1 when a benchmark crashed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

try:
    from bench import benchlib
except ImportError:  # run as `python bench/run_all.py`
    import benchlib  # type: ignore[no-redef]


FULL_ONLY = {"ingest_dask", "patience"}  # run with --full (or by name in --only)


def scripts(only: list[str] | None = None, full: bool = False) -> list[Path]:
    """bench_*.py in name order (train_step, embeddings, data_path, serving, orchestration, scaling first
    when present)."""
    order = ["train_step", "embeddings", "data_path", "serving", "orchestration", "cascade_cost", "scaling"]
    found = sorted(benchlib.BENCH_DIR.glob("bench_*.py"))
    key = lambda p: (order.index(p.stem[6:]) if p.stem[6:] in order else len(order), p.name)  # noqa: E731
    found = sorted(found, key=key)
    if only:
        return [p for p in found if p.stem[6:] in only or p.stem in only]
    return [p for p in found if full or p.stem[6:] not in FULL_ONLY]


def _sizes(results: Path) -> dict[Path, int]:
    return {p: p.stat().st_size for p in results.glob("*.jsonl")} if results.is_dir() else {}


def new_records(results: Path, before: dict[Path, int]) -> list[dict]:
    """Records appended to results/*.jsonl since `before` (file sizes)."""
    out = []
    for p in sorted(results.glob("*.jsonl")) if results.is_dir() else []:
        with open(p) as f:
            f.seek(before.get(p, 0))
            out += [json.loads(line) for line in f if line.strip()]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="scaling at 1M / 4M / 16M exposures, and Dask ingest")
    p.add_argument("--quick", action="store_true", help="smoke-test sizes (figures meaningless)")
    p.add_argument("--only", nargs="+", help="benchmark names, e.g. serving scaling")
    a = p.parse_args(argv)
    results = benchlib.results_dir()
    before = _sizes(results)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    failed, t_all = [], time.perf_counter()
    for script in scripts(a.only, a.full):
        args = [sys.executable, str(script)]
        if a.quick:
            args.append("--quick")
        if a.full and script.stem == "bench_scaling":
            args.append("--full")
        print(f"\n######## {script.name} {' '.join(args[2:])}", flush=True)
        t0 = time.perf_counter()
        code = subprocess.call(args, env=env, cwd=benchlib.REPO)
        print(f"######## {script.name}: {time.perf_counter() - t0:.0f} s, exit {code}", flush=True)
        if code != 0:
            failed.append(script.name)
    records = new_records(results, before)
    print()
    print(benchlib.table(records, title=f"all figures of this run ({benchlib.cpu_model()})", with_bench=True))
    met = [r for r in records if r["met"] is True]
    missed = [r for r in records if r["met"] is False]
    print(f"\ntargets met: {len(met)} of {len(met) + len(missed)}")
    for r in missed:
        print(
            f"  NOT MET  {r['bench']}: {r['figure']} = {benchlib.fmt(r['value'])} {r['unit']} (target {r['target']})"
        )
    print(f"total: {time.perf_counter() - t_all:.0f} s; results in {results}")
    if failed:
        print(f"benchmarks that crashed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
