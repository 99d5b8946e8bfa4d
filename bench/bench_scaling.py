"""Benchmark 5 (scaling): ingest + one training epoch on generated data of 0.5M / 2M (`make bench`) or 1M, 4M, 16M exposures (`--full`).

How to run:  .venv/bin/python bench/bench_scaling.py [--sizes 500000 2000000] [--full] [--quick]

`--full` runs 1M, 4M and 16M exposures (about 30 minutes on 2 cores; docs/performance.md has the
recorded figure); the default 0.5M and 2M keep the factor of 4 of the 1M -> 4M step at half its time,
so that `make bench` stays under 20 minutes on 2 cores. Data: the generated world with 100,000 users and 50,000 items over 8 days,
requests_per_day = exposures / 80 (10 exposed of 20 candidates per request, so 2x the exposures in
event rows); generation is cached under the bench work dir and not timed.

Each phase runs in its own child process and its peak RSS comes from os.wait4's rusage of that child:
1. ingest: `data_contracts.validate_dataset` + `csmf_core.prep.prepare` (polars lazy scans, streaming
   engine, request ids as integer codes, train parts written part by part);
2. one epoch of the first stage (pretrain on every exposure of the train days: the largest stage),
   streamed from the model-ready Parquet by `csmf_core.loader.ParquetTrainSource` (bounded window),
   default model and batch size.
Targets: time(16M) / time(1M) <= 18 (linear growth), peak RSS < 4 GiB at 16M. Any other pair of sizes
is held to the same slack: time(n) / time(smallest) <= 1.125 x n / smallest (4.5 for a factor of 4).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    from bench import benchlib
except ImportError:  # run as `python bench/bench_scaling.py`
    import benchlib  # type: ignore[no-redef]

N_USERS, N_ITEMS, N_DAYS = 100_000, 50_000, 8
SIZES = (500_000, 2_000_000)  # make bench's pair
FULL_SIZES = (1_000_000, 4_000_000, 16_000_000)  # --full
GIB = 1024**3


def world(exposures: int, quick: bool = False) -> dict:
    """Generator overrides of the dataset with `exposures` exposed rows (10 exposed per request)."""
    users, items = (300, 200) if quick else (N_USERS, N_ITEMS)
    return {
        "n_users": users,
        "n_items": items,
        "n_days": N_DAYS,
        "requests_per_day": exposures // (10 * N_DAYS),
    }


# ---- child phases ---------------------------------------------------------------------------------
def child_ingest(data: Path, out: Path) -> dict:
    from csmf_core.prep import prepare
    from data_contracts import validate_dataset

    dates = sorted(p.name[3:] for p in (data / "events").glob("dt=*"))
    t0 = time.perf_counter()
    validate_dataset(data, dates=dates).raise_if_errors()
    t1 = time.perf_counter()
    s = prepare(data, out, train_dates=(dates[0], dates[-2]), eval_dates=dates[-1], overwrite=True)
    t2 = time.perf_counter()
    return {"validate": t1 - t0, "prepare": t2 - t1, "train_rows": s.n_train}


def child_train(mr: Path) -> dict:
    import torch

    from csmf_core.cascade import build_model, load_cascade_data
    from csmf_core.config import build_config
    from csmf_core.loader import ParquetTrainSource
    from csmf_core.losses import item_log_q
    from csmf_core.train import train_stage

    cfg = build_config(None, ["train.epochs=[1,1,1]", "train.loader=parquet"])
    t0 = time.perf_counter()
    data = load_cascade_data(mr, load_train=False)  # feature tables, specs, counts; no train rows
    model, owners = build_model(data, cfg)
    src = ParquetTrainSource(mr, window_rows=cfg.train.shuffle_window)
    t1 = time.perf_counter()
    res = train_stage(model, data.tables, src, 0, cfg, log_q=item_log_q(torch.as_tensor(data.counts[0])),
                      output_owners=owners.output_owners())  # fmt: skip
    return {"setup": t1 - t0, "epoch": time.perf_counter() - t1, "rows": res.rows, "steps": res.steps}


def run_child(args: list[str]) -> tuple[dict, float, float]:
    """Run this script as a child with `args`; returns (its JSON result, wall seconds, peak RSS bytes)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as errf:
        p = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, stderr=errf,
                             cwd=benchlib.REPO, text=True)  # fmt: skip
        out = p.stdout.read()  # until the child closes it; then reap it ourselves for its rusage
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        p.stdout.close()
        errf.seek(0)
        err = errf.read()
    wall = time.perf_counter() - t0
    code = p.returncode
    lines = [x for x in out.splitlines() if x.startswith("RESULT ")]
    if code != 0 or not lines:
        raise RuntimeError(f"child {args} failed (exit {code}):\n{out[-2000:]}\n{err[-3000:]}")
    return json.loads(lines[-1][7:]), wall, usage.ru_maxrss * 1024.0


def run(sizes=SIZES, write: bool = True, quick: bool = False, train: bool = True) -> list[dict]:
    rec = benchlib.Recorder("scaling", {"users": N_USERS, "items": N_ITEMS, "days": N_DAYS}, write=write)
    totals: dict[int, float] = {}
    ingest: dict[int, float] = {}
    for n in sizes:
        ds, _, gen_s = benchlib.synth_dataset(f"scale-{n}", **world(n, quick))
        mr = benchlib.work_dir() / "model_ready" / f"scale-{n}"
        ing, ing_wall, ing_rss = run_child(["--child", "ingest", "--data", str(ds), "--mr", str(mr)])
        p = {"exposures": n, "train_rows": ing["train_rows"]}
        tag = f"{n / 1e6:g}M exposures"
        rec.add(
            f"ingest wall (validate + prepare), {tag}",
            ing_wall,
            "s",
            **p,
            validate_s=ing["validate"],
            prepare_s=ing["prepare"],
        )
        rec.add(f"ingest peak RSS, {tag}", ing_rss / GIB, "GiB", "< 4" if n >= 16_000_000 else None, **p)
        if gen_s:
            rec.add(f"generation (not in the totals), {tag}", gen_s, "s", **p)
        ingest[n] = ing_wall
        if n != min(ingest):
            rec.add(f"ingest time ratio {tag} / {min(ingest) / 1e6:g}M", ing_wall / ingest[min(ingest)], "x")
        if not train:
            continue
        tr, tr_wall, tr_rss = run_child(["--child", "train", "--mr", str(mr)])
        totals[n] = ing_wall + tr_wall
        rec.add(
            f"train epoch wall (stage 0, parquet loader), {tag}",
            tr_wall,
            "s",
            **p,
            setup_s=tr["setup"],
            epoch_s=tr["epoch"],
            steps=tr["steps"],
        )
        rec.add(f"train peak RSS, {tag}", tr_rss / GIB, "GiB", "< 4" if n >= 16_000_000 else None, **p)
        rec.add(f"train samples/s, {tag}", tr["rows"] / tr["epoch"], "samples/s", **p)
        rec.add(f"ingest + epoch wall, {tag}", totals[n], "s", **p)
        base = min(totals)
        if n != base:
            ratio, factor = totals[n] / totals[base], n / base
            rec.add(
                f"time ratio {tag} / {base / 1e6:g}M", ratio, "x", f"<= {factor * 18 / 16:g}", factor=factor
            )
    return rec.flush()


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", help=f"exposures; default {' '.join(map(str, SIZES))}")
    p.add_argument("--full", action="store_true", help="1M, 4M and 16M exposures (about 30 minutes)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--ingest-only", action="store_true", help="skip the training epoch")
    p.add_argument("--no-write", action="store_true", help="do not append to bench/results/")
    p.add_argument("--child", choices=["ingest", "train"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--mr", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        torch_threads = os.environ.get("OMP_NUM_THREADS")
        if torch_threads:
            import torch

            torch.set_num_threads(int(torch_threads))
        res = child_ingest(Path(a.data), Path(a.mr)) if a.child == "ingest" else child_train(Path(a.mr))
        print("RESULT " + json.dumps(res))
        return []
    if a.quick:
        return run([8_000, 16_000], write=not a.no_write, quick=True)
    sizes = set(a.sizes or ()) | set(FULL_SIZES if a.full else ())
    return run(sorted(sizes or SIZES), write=not a.no_write, train=not a.ingest_only)


if __name__ == "__main__":
    main()
