"""Benchmark 6 (embedding tables): does one training step cost grow with the catalog?

How to run:  .venv/bin/python bench/bench_embeddings.py [--users 10000000 --items 1000000] [--rounds 3]
             [--steps 4] [--paths lazy_adam dense] [--quick]

One CSMF training step (`csmf_core.train.train_stage`, batch 512, the default towers: 256-128-64, id
embeddings 32 columns, behaviour-sequence embeddings 32 columns over the item table, stage 1 = click
with AML, a quarter of every layer's units handed to it as CPP would) on random rows, with a big
catalog (default 10,000,000 user rows, 1,000,000 item rows: the user-id table, the item-id table and
the two behaviour-sequence tables grow with it) against a small one (10,000 / 5,000 rows).

Each path (`train.embedding_optimizer`: lazy_adam, rowwise_adagrad, dense) runs in its own child
process: it builds the small model, trains it, records its peak RSS, builds the big one, then
alternates `--rounds` rounds of one `train_stage` call of `--steps` + 1 steps on each of three cases:
the small model; the big model on **the same batches** (same seed, so the same ids, every one a row
of both catalogs: only the tables' size differs, the issue's "same batch of 512"); and the big model
on batches whose ids are drawn over its own catalog. The step time is the median interval between
consecutive steps' ends (the first step of a call, which allocates the optimiser state, is left
out). Figures: big / small step-time ratio per path on the same batch (target <= 1.2 for the sparse
paths; the dense path's beside it: its Adam reads every row), the same ratio with ids drawn over each
catalog (no target), step times, peak RSS of the small and the big case (ru_maxrss of the child, so
the big figure includes the small model), optimiser state MiB of the big tables, and the distinct
rows a step touches in each case (mean over as many random batches as are timed): the same 512 x 20
behaviour-sequence lookups hit ~4,300 distinct rows of a 5,000-row item table (which, with its
optimiser state, stays in the caches) but ~10,200 of a 1,000,000-row one, each a cache miss. So with
ids drawn over each catalog a sparse step does more row-wise work in the big case: it grows with the
distinct rows a batch touches, which the batch bounds (512 x 42 lookups here) and a 1M-row catalog
already nearly reaches, not with the catalog beyond that.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

try:
    from bench import benchlib
except ImportError:  # run as `python bench/bench_embeddings.py`
    import benchlib  # type: ignore[no-redef]

import torch

from csmf_core.config import build_config
from csmf_core.masks import UnitOwners, param_owners
from csmf_core.model import TowerSpec, TwoTower
from csmf_core.rows import FeatureTables, TrainRows
from csmf_core.train import train_stage

OBJECTIVES = ("exposure", "click", "conversion")
STAGE = 1
BATCH = 512
SEQ = 20
HISTS = ("hist_click", "hist_conversion")


def build(n_users: int, n_items: int, cfg, seed: int = 0):
    """(model with stage-1 owners, feature tables, output owners) of a catalog of this size."""
    user = TowerSpec(
        cat=(("uid", n_users), ("age_bucket", 8), ("region", 20)),
        n_num=1,
        hist=HISTS,
        n_items=n_items,
        id_feature="uid",
    )
    item = TowerSpec(cat=(("iid", n_items), ("category", 50), ("brand", 200)), n_num=2, id_feature="iid")
    model = TwoTower(user, item, cfg.model, len(OBJECTIVES))
    owners = UnitOwners.initial(model, OBJECTIVES)
    for units in owners.units.values():  # the last quarter of every group to stage 1
        units[len(units) - max(1, len(units) // 4) :] = STAGE
    model.set_owners(param_owners(model, owners))
    g = torch.Generator().manual_seed(seed)
    tables = FeatureTables(
        users_cat=torch.stack(
            [
                torch.arange(n_users),
                torch.randint(0, 8, (n_users,), generator=g),
                torch.randint(0, 20, (n_users,), generator=g),
            ],
            1,
        ),  # fmt: skip
        users_num=torch.randn(n_users, 1, generator=g),
        items_cat=torch.stack(
            [
                torch.arange(n_items),
                torch.randint(0, 50, (n_items,), generator=g),
                torch.randint(0, 200, (n_items,), generator=g),
            ],
            1,
        ),  # fmt: skip
        items_num=torch.randn(n_items, 2, generator=g),
    )
    return model, tables, owners.output_owners()


def rows(n_users: int, n_items: int, n: int, seed: int) -> TrainRows:
    g = torch.Generator().manual_seed(seed)
    return TrainRows(
        u=torch.randint(1, n_users, (n,), generator=g),
        i=torch.randint(1, n_items, (n,), generator=g),
        level=torch.full((n,), STAGE, dtype=torch.int8),
        hists=[torch.randint(0, n_items, (n, SEQ), generator=g) for _ in HISTS],
    )


def rows_touched(n_users: int, n_items: int, steps: int, seed: int = 0) -> dict[str, float]:
    """Distinct rows per step of the user-id, item-id and behaviour-sequence tables (padding 0 left
    out), mean over `steps` batches of the benchmark's rows."""
    data = rows(n_users, n_items, BATCH * steps, seed)
    out: dict[str, float] = {}
    for k in range(steps):
        b = slice(k * BATCH, (k + 1) * BATCH)
        seen = {"uid": data.u[b], "iid": data.i[b]}
        seen.update({name: h[b][h[b] > 0] for name, h in zip(HISTS, data.hists)})
        for name, ids in seen.items():
            out[name] = out.get(name, 0.0) + torch.unique(ids).numel() / steps
    return out


def step_times(model, tables, out, cfg, n_users, n_items, steps: int, seed: int) -> tuple[list[float], dict]:
    """Seconds between consecutive step ends of one train_stage call of steps + 1 steps; state MiB."""
    ends: list[float] = []
    data = rows(n_users, n_items, BATCH * (steps + 1), seed)
    log = train_stage(
        model,
        tables,
        data,
        STAGE,
        cfg,
        output_owners=out,
        on_step=lambda k, v: ends.append(time.perf_counter()),
    )
    return [b - a for a, b in zip(ends[:-1], ends[1:])], log.summary()  # fmt: skip


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(
    path: str, big: tuple[int, int], small: tuple[int, int], rounds: int, steps: int, threads: int
) -> dict:
    """One path in this process: small case, then big, then interleaved rounds."""
    benchlib.set_threads(threads)
    cfg = build_config(None, ["train.epochs=[1,1,1]", f"train.embedding_optimizer={path}"])
    res: dict = {"path": path}
    cases = {}
    for label, (nu, ni) in (("small", small), ("big", big)):
        t0 = time.perf_counter()
        cases[label] = build(nu, ni, cfg)
        res[f"{label}_build_s"] = time.perf_counter() - t0
        step_times(*cases[label], cfg, nu, ni, 1, seed=99)  # warm-up: allocator, mask caches
        res[f"{label}_peak_mib"] = peak_mib()
    # "same": the big model on the small case's very batches (same seed, ids within the small
    # catalog), so only the tables' size differs; "big": ids drawn over the big catalog (more
    # distinct rows per step, module docstring)
    times: dict[str, list[float]] = {"small": [], "same": [], "big": []}
    labels = tuple(times)
    for r in range(rounds):
        for label in labels[r % 3 :] + labels[: r % 3]:  # each case first, second and last in turn
            nu, ni = big if label == "big" else small
            t, summary = step_times(
                *cases["small" if label == "small" else "big"], cfg, nu, ni, steps, seed=r
            )
            times[label] += t
            if label != "same":  # the same model and state as "big"
                res[f"{label}_state_mib"] = {
                    k.removeprefix("opt_state_mib/"): v
                    for k, v in summary.items()
                    if k.startswith("opt_state_mib/")
                }
    res["small_step_s"] = statistics.median(times["small"])
    res["big_step_s"] = statistics.median(times["big"])
    res["same_step_s"] = statistics.median(times["same"])
    res["peak_mib"] = peak_mib()
    return res


def run(
    users: int = 10_000_000,
    items: int = 1_000_000,
    small: tuple[int, int] = (10_000, 5_000),
    rounds: int = 3,
    steps: int = 4,
    paths: tuple[str, ...] = ("lazy_adam", "rowwise_adagrad", "dense"),
    write: bool = True,
    threads: int | None = None,
) -> list[dict]:
    n_threads = threads or os.cpu_count() or 1
    rec = benchlib.Recorder(
        "embeddings",
        {"batch_size": BATCH, "users": users, "items": items, "small": list(small), "rounds": rounds,
         "steps": steps, "threads": n_threads},
        write=write,
    )  # fmt: skip
    tag = f"{users:,}/{items:,} vs {small[0]:,}/{small[1]:,} rows"
    for label, (nu, ni) in (("small", small), ("big", (users, items))):
        for table, n in rows_touched(nu, ni, steps * rounds).items():
            rec.add(f"distinct rows per step, {label}, {table} ({nu:,}/{ni:,} rows)", n, "rows")
    for path in paths:
        args = [sys.executable, __file__, "--child", path, "--users", str(users), "--items", str(items),
                "--small", str(small[0]), str(small[1]), "--rounds", str(rounds), "--steps", str(steps),
                "--threads", str(n_threads)]  # fmt: skip
        t0 = time.perf_counter()
        out = subprocess.run(args, capture_output=True, text=True, cwd=benchlib.REPO)
        if out.returncode != 0:
            raise RuntimeError(f"{path} child failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        p = {"path": path, "wall_s": round(time.perf_counter() - t0, 1)}
        rec.add(
            f"step time ratio big/small, same batch, {path} ({tag})",
            r["same_step_s"] / r["small_step_s"],
            "x",
            None if path == "dense" else "<= 1.2",
            **p,
        )
        rec.add(
            f"step time ratio big/small, ids drawn over each catalog, {path} ({tag})",
            r["big_step_s"] / r["small_step_s"],
            "x",
            **p,
        )
        rec.add(f"step time small, {path}", r["small_step_s"] * 1e3, "ms", **p)
        rec.add(f"step time big, same batch, {path}", r["same_step_s"] * 1e3, "ms", **p)
        rec.add(f"step time big, ids drawn over each catalog, {path}", r["big_step_s"] * 1e3, "ms", **p)
        rec.add(f"peak RSS small, {path}", r["small_peak_mib"] / 1024, "GiB", **p)
        rec.add(f"peak RSS big, {path}", r["big_peak_mib"] / 1024, "GiB", **p)
        for table, mib in sorted(r.get("big_state_mib", {}).items()):
            rec.add(f"optimiser state big, {path}, {table}", mib, "MiB", **p)
    return rec.flush()


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=10_000_000)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--small", type=int, nargs=2, default=(10_000, 5_000))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="timed steps per round and case")
    p.add_argument("--paths", nargs="+", default=["lazy_adam", "rowwise_adagrad", "dense"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="200,000 / 50,000 rows, 1 round (smoke test)")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        res = child(a.child, (a.users, a.items), tuple(a.small), a.rounds, a.steps, a.threads or 1)
        print(json.dumps(res))
        return []
    if a.quick:
        return run(
            200_000, 50_000, (10_000, 5_000), rounds=1, steps=2, paths=tuple(a.paths), write=not a.no_write
        )
    return run(a.users, a.items, tuple(a.small), a.rounds, a.steps, tuple(a.paths), not a.no_write, a.threads)


if __name__ == "__main__":
    main()
