"""Benchmark: sharded ingest on Dask (issue #19 item 4), ingest time and peak memory per worker.

How to run:  .venv/bin/python bench/bench_ingest_dask.py [--exposures 4000000] [--workers 1 2] [--quick]

Data: bench_scaling.py's generated world (100,000 users, 50,000 items, 8 days; 4M exposures = 8M
event rows with the unexposed candidates), cached under the bench work dir, generation not timed.
Arms, each in its own child process (so peak RSS is that arm's alone):
- `single`: `csmf_core.prep.prepare` in one process (the default, `ingest.dask: off`);
- `dask-N` for each N of `--workers`: `flows.ingest_dask.prepare_on_dask` with `ingest.dask: local`,
  a LocalCluster of N worker processes (1 thread each), 2N user shards: the Prefect flow
  `csmf-ingest-sharded` (vocabulary pass, shards, reduction as tasks on prefect-dask's
  DaskTaskRunner; Prefect's temporary local API when PREFECT_API_URL is unset, its start included).
Figures: wall time of each arm (for Dask: LocalCluster start, flow and tasks; Prefect's temporary
API is started before the clock, as a production server would be up already); peak RSS of the
single process, of each Dask worker (max over the shard tasks it ran, getrusage in the task), of
the worker after the reduction task, and of the largest process of the arm (os.wait4). The output of every Dask
arm is checked equal to the single-process output (row counts and every train part's row count).
Validation (data_contracts) is the same in both modes and is not timed here.
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
    from bench.bench_scaling import world
except ImportError:  # run as `python bench/bench_ingest_dask.py`
    import benchlib  # type: ignore[no-redef]
    from bench_scaling import world  # type: ignore[no-redef]

GIB = 1024**3


def _dates(data: Path) -> list[str]:
    return sorted(p.name[3:] for p in (data / "events").glob("dt=*"))


def child(arm: str, data: Path, out: Path) -> dict:
    dates = _dates(data)
    kw = {"train_dates": (dates[0], dates[-2]), "eval_dates": dates[-1], "overwrite": True}
    api_s = 0.0
    if arm != "single":  # Prefect's temporary API starts before the clock (a server at scale is up)
        from flows.ingest_dask import api_url

        t_api = time.perf_counter()
        api_url()
        api_s = time.perf_counter() - t_api
    t0 = time.perf_counter()
    if arm == "single":
        from csmf_core.prep import prepare

        s = prepare(data, out, **kw)
        extra = {}
    else:
        from csmf_core.config import build_config
        from flows.ingest_dask import prepare_on_dask

        n = int(arm.split("-")[1])
        cfg = build_config(None, ["ingest.dask=local", f"ingest.workers={n}"])
        with tempfile.TemporaryDirectory(prefix="csmf-shards-", dir=out.parent) as work:
            s = prepare_on_dask(cfg.ingest, data, out, work, **kw)
        extra = s.meta["sharded"]
    return {
        "seconds": time.perf_counter() - t0,
        "train_rows": s.n_train,
        "parts": [p.name for p in s.train_parts],
        "eval_rows": s.n_eval,
        "api_start_s": api_s,
        **extra,
    }


def run_child(args: list[str]) -> tuple[dict, float]:
    """Run this script as a child; (its JSON result, its peak RSS in bytes from os.wait4)."""
    env = dict(os.environ, PYTHONPATH=str(benchlib.REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # Prefect's temporary API (no PREFECT_API_URL): a loaded machine needs more than its default start time
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with tempfile.TemporaryFile("w+") as errf:
        p = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, stderr=errf,
                             cwd=benchlib.REPO, text=True, env=env)  # fmt: skip
        out = p.stdout.read()
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        p.stdout.close()
        errf.seek(0)
        err = errf.read()
    lines = [x for x in out.splitlines() if x.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"child {args} failed (exit {p.returncode}):\n{out[-2000:]}\n{err[-3000:]}")
    return json.loads(lines[-1][7:]), usage.ru_maxrss * 1024.0


def run(exposures: int, workers: list[int], write: bool = True, quick: bool = False) -> list[dict]:
    rec = benchlib.Recorder("ingest_dask", {"exposures": exposures, "quick": quick}, write=write)
    ds, _, gen_s = benchlib.synth_dataset(f"scale-{exposures}", **world(exposures, quick))
    base = benchlib.work_dir() / "model_ready" / f"ingest-dask-{exposures}"
    tag = f"{exposures / 1e6:g}M exposures"
    single, single_rss = run_child(["--child", "single", "--data", str(ds), "--out", str(base / "single")])
    rec.add(f"ingest wall (prep), 1 process, {tag}", single["seconds"], "s", train_rows=single["train_rows"])
    rec.add(f"peak RSS, 1 process, {tag}", single_rss / GIB, "GiB")
    for n in workers:
        res, flow_rss = run_child(
            ["--child", f"dask-{n}", "--data", str(ds), "--out", str(base / f"dask-{n}")]
        )
        same = (res["train_rows"], res["parts"], res["eval_rows"]) == (
            single["train_rows"],
            single["parts"],
            single["eval_rows"],
        )
        if not same:
            raise RuntimeError(f"dask-{n}: output differs from single-process prep: {res} vs {single}")
        rec.add(
            f"ingest wall (prep, cluster start included), Dask {n} worker(s), {tag}",
            res["seconds"],
            "s",
            shards=res["shards"],
            api_start_s=res["api_start_s"],
        )
        per_worker: dict[int, int] = {}
        for key, rss in res["peak_rss"].items():
            if key.startswith("shard-"):
                pid = res["shard_pid"][key]
                per_worker[pid] = max(per_worker.get(pid, 0), rss)
        for k, (pid, rss) in enumerate(sorted(per_worker.items())):
            rec.add(f"peak RSS, Dask {n} worker(s), worker {k + 1} (pid {pid}), {tag}", rss / GIB, "GiB")
        rec.add(
            f"peak RSS, Dask {n} worker(s), the worker after the reduction, {tag}",
            res["peak_rss"]["reduce"] / GIB,
            "GiB",
        )
        rec.add(f"peak RSS, Dask {n} worker(s), largest process of the arm, {tag}", flow_rss / GIB, "GiB")
        rec.add(f"ingest time ratio Dask {n} / 1 process, {tag}", res["seconds"] / single["seconds"], "x")
    if gen_s:
        rec.add(f"generation (not timed above), {tag}", gen_s, "s")
    return rec.flush()


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--exposures", type=int, default=4_000_000)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--quick", action="store_true", help="tiny world (smoke test: the figures mean nothing)")
    p.add_argument("--no-write", action="store_true", help="do not append to bench/results/")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print("RESULT " + json.dumps(child(a.child, Path(a.data), Path(a.out)), default=str))
        return []
    if a.quick:
        return run(16_000, a.workers, write=not a.no_write, quick=True)
    return run(a.exposures, a.workers, write=not a.no_write)


if __name__ == "__main__":
    main()
