"""Benchmark 2 (data path): training fed from the model-ready Parquet through the loader vs in-memory rows.

How to run:  .venv/bin/python bench/bench_data_path.py [--rows 32768] [--rounds 5] [--stages 0 2] [--profile] [--quick]

Arms (the same `csmf_core.train.train_stage`, the same model architecture and config, one epoch of a
stage over the first `--rows` train rows of the generated `small` world, alternated round by round):
  memory   rows loaded into tensors beforehand (`train.loader: memory`, the reference);
  parquet  `csmf_core.loader.ParquetTrainSource` over `train/part-*.parquet` with the default shuffle
           window (2^20 rows: the whole stage fits, so an epoch is an exact permutation);
  parquet-window-8k  the same with an 8,192-row window (a quarter of the rows): the bounded-memory
           regime of large data (row groups interleaved, approximate shuffle).
The rows are rewritten as 8,192-row parts so the loader opens several files and row groups as it
would at scale. Figures: samples/s of each arm, ratio parquet / memory (median of
per-round ratios), target >= 0.7; the loader alone (rows produced per second with no training) as
the headroom; and the loader's CPU time as a share of a training epoch's CPU time (where the time
goes, robust to other jobs on the machine). Stage 0 is the dense case (every row used); the last stage is the sparse
one: its first epoch decodes every row to keep the few with level >= stage, later epochs replay the
kept rows (the loader's stage cache, `cache_rows`); the warm-up epoch builds it, so the timed epochs
are the steady state, and "loader alone, first epoch" reports a fresh source's decoding epoch.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

try:
    from bench import benchlib
except ImportError:  # run as `python bench/bench_data_path.py`
    import benchlib  # type: ignore[no-redef]

from csmf_core.cascade import load_cascade_data
from csmf_core.config import build_config
from csmf_core.loader import ParquetTrainSource
from csmf_core.losses import item_log_q
from csmf_core.train import train_stage

PART_ROWS = 8_192
WINDOW = 8_192


def subset(mr: Path, rows: int, part_rows: int) -> Path:
    """A model-ready copy of `mr` whose train table is its first `rows` rows, in parts of `part_rows`.

    Cached under benchlib.work_dir(); the feature tables, eval and popularity files are linked.
    """
    out = benchlib.work_dir() / "model_ready" / f"{mr.name}-first{rows}-parts{part_rows}"
    stamp = out / "_bench_params.json"
    src_stamp = mr / "_bench_params.json"
    if stamp.exists() and stamp.stat().st_mtime >= src_stamp.stat().st_mtime:
        return out
    shutil.rmtree(out, ignore_errors=True)
    (out / "train").mkdir(parents=True)
    meta = json.loads((mr / "meta.json").read_text())
    table = pa.concat_tables([pq.read_table(mr / p) for p in meta["train_parts"]]).slice(0, rows)
    parts = []
    for k, lo in enumerate(range(0, table.num_rows, part_rows)):
        parts.append(f"train/part-{k:05d}.parquet")
        pq.write_table(table.slice(lo, part_rows), out / parts[-1], row_group_size=part_rows)
    for f in ("users.parquet", "items.parquet", "eval.parquet", "popularity.parquet"):
        shutil.copyfile(mr / f, out / f)
    level = table["level"].to_numpy()
    meta["train_parts"] = parts
    meta["rows"] = {**meta["rows"], "train": table.num_rows,
                    "train_by_level": [int((level == t).sum()) for t in range(len(meta["objectives"]))]}  # fmt: skip
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    stamp.write_text(json.dumps({"rows": rows, "part_rows": part_rows}))
    return out


def setup(cfg, data_kw: dict, rows: int):
    name = data_kw.pop("name")
    ds, dates, _ = benchlib.synth_dataset(name, **data_kw)
    full, _ = benchlib.model_ready(ds, dates, name)
    mr = subset(full, rows, PART_ROWS)
    data = load_cascade_data(mr)
    model, owners = benchlib.pruned_model(data, cfg)  # late stages train under the cascade's owners
    return mr, data, model, owners


def run(
    rows: int = 32_768,
    rounds: int = 5,
    stages: tuple[int, ...] = (0, 2),
    profile: bool = False,
    write: bool = True,
    threads: int | None = None,
    data: dict | None = None,
) -> list[dict]:
    n_threads = benchlib.set_threads(threads)
    cfg = build_config(None, ["train.epochs=[1,1,1]"])
    mr, cd, model, owners = setup(cfg, dict(data or {"name": "small"}), rows)
    rec = benchlib.Recorder(
        "data_path",
        {
            "batch_size": cfg.train.batch_size,
            "threads": n_threads,
            "part_rows": PART_ROWS,
            "rows": len(cd.rows),
        },
        write=write,
    )
    sources = {
        "parquet": ParquetTrainSource(mr),
        "parquet-window-8k": ParquetTrainSource(mr, window_rows=WINDOW),
    }
    for stage in stages:
        log_q = item_log_q(torch.as_tensor(cd.counts[stage]))
        out = owners.output_owners()
        models = {a: copy.deepcopy(model) for a in ("memory", *sources)}
        n = len(cd.rows.for_stage(stage))

        def arm(name, stage=stage, log_q=log_q, out=out, models=models):
            rows = cd.rows if name == "memory" else sources[name]
            return lambda: train_stage(
                models[name], cd.tables, rows, stage, cfg, log_q=log_q, output_owners=out
            )

        arms = {a: arm(a) for a in models}
        for f in arms.values():  # warm-up (allocator, page cache, level column)
            f()
        t = benchlib.interleaved(arms, rounds)
        name = cd.objectives[stage]
        p = {"stage": stage, "stage_name": name, "rounds": rounds, "stage_rows": n}
        for a in arms:
            rec.add(f"{a} samples/s, stage {stage} ({name})", n / benchlib.median(t[a]), "samples/s", **p)
        for a in sources:
            rec.add(
                f"samples/s ratio {a}/memory, stage {stage} ({name})",
                benchlib.paired_ratio(t["memory"], t[a]),
                "x",
                ">= 0.7",
                **p,
            )
        for a, src in sources.items():  # the loader alone: how far ahead of training it can run

            def drain(src=src, stage=stage) -> int:
                return sum(1 for _ in src.batches(stage, cfg.train.batch_size, seed=0, epoch=0))

            lt = benchlib.interleaved({a: drain}, 2)
            loader_cpu, train_cpu = cpu_seconds(drain), cpu_seconds(arms[a])
            share = loader_cpu / train_cpu if train_cpu > 0 else float("nan")
            rec.add(f"{a} loader CPU time / training epoch CPU time, stage {stage}", share, "", **p)
            rec.add(f"{a} loader alone, stage {stage}", n / benchlib.median(lt[a]), "rows/s", **p)
        for a, src in sources.items():  # a fresh source's first epoch decodes the whole table
            fresh = ParquetTrainSource(mr, window_rows=src.window_rows)
            t_first = benchlib.interleaved(
                {
                    a: lambda f=fresh, s=stage: sum(
                        1 for _ in f.batches(s, cfg.train.batch_size, seed=0, epoch=0)
                    )
                },
                1,
            )
            rec.add(
                f"{a} loader alone, first epoch, stage {stage}",
                n / benchlib.median(t_first[a]),
                "rows/s",
                **p,
            )
            rec.add(f"{a} loader: rows kept across epochs, stage {stage}", src.stats.cached_rows, "rows", **p)
        st = sources["parquet-window-8k"].stats
        rec.add("window-8k loader: most rows held in the window", st.max_window_rows, "rows", **p)
        if profile:
            print_profile(arms["parquet"], f"parquet arm, stage {stage}")
            print_profile(arms["memory"], f"memory arm, stage {stage}")
    return rec.flush()


def cpu_seconds(fn) -> float:
    """CPU time (user + system, every thread of this process) of one call: less sensitive than wall
    time to other jobs on a shared machine. `time.process_time` (the process's CPU clock, ns
    resolution), not `os.times` (10-ms ticks): a small stage's epoch can take under one tick, and
    a share of 0 / 0 crashed `make bench` (2026-12-06, the conversion stage)."""
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def print_profile(fn, title: str, rows: int = 15) -> None:
    """torch.profiler table of one epoch (main thread; the loader thread shows as its waits)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    print(f"== profile: {title}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=32_768, help="train rows used (the first rows of the table)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--stages", type=int, nargs="+", default=[0, 2])
    p.add_argument("--profile", action="store_true", help="print torch.profiler tables of both arms")
    p.add_argument("--quick", action="store_true", help="tiny world (smoke test)")
    p.add_argument("--no-write", action="store_true", help="do not append to bench/results/")
    a = p.parse_args(argv)
    if a.quick:
        tiny = {"name": "tiny", "n_users": 300, "n_items": 200, "n_days": 6, "requests_per_day": 340}
        return run(
            rows=4096, rounds=2, stages=tuple(a.stages), profile=a.profile, write=not a.no_write, data=tiny
        )
    return run(rows=a.rows, rounds=a.rounds, stages=tuple(a.stages), profile=a.profile, write=not a.no_write)


if __name__ == "__main__":
    main()
