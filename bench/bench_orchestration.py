"""Benchmark 4 (orchestration overhead): the Prefect flow `csmf-daily` vs the same stage functions called directly.

How to run:  .venv/bin/python bench/bench_orchestration.py [--rounds 1] [--overrides train.epochs=[4,8,16]] [--quick]

Flow arm: `flows.pipeline.csmf_daily(data=<small>, home=<fresh dir>)` - Prefect's temporary local API,
MLflow parent/child runs with metrics, artifacts (checkpoints, masks, index), the registry pyfunc,
the gate, retention. Direct arm: the same csmf_core work with no Prefect and no MLflow, as lean as
the library allows: validate -> prepare -> load once -> every cascade step in memory with the same
per-step validation -> final checkpoint -> serving bundle (flat index) -> final evaluation.
Overhead = (flow - direct) / flow, on the wall time of each arm's work after imports (import time
is reported separately). Target: <= 10%.

Each arm runs in its own child process (Prefect reads its settings at import); each flow round uses
a fresh csmf home so nothing is resumed from an earlier run (the MLflow database is created in the
round, as on a first run); PREFECT_HOME is kept across rounds under the bench work dir.
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
except ImportError:  # run as `python bench/bench_orchestration.py`
    import benchlib  # type: ignore[no-redef]


def direct(data: str, work: Path, overrides: list[str]) -> dict:
    """The flow's work without Prefect or MLflow; returns seconds per phase."""
    from csmf_core.cascade import build_model, load_cascade_data, plan, run_step
    from csmf_core.checkpoint import save_checkpoint
    from csmf_core.config import load_config
    from csmf_core.evaluate import evaluate_model
    from csmf_core.prep import prepare
    from csmf_core.serving import write_bundle
    from data_contracts import validate_dataset
    from flows.inputs import plan_window  # pure date arithmetic, no Prefect/MLflow

    t = {"start": time.perf_counter()}
    cfg = load_config(None, overrides)
    window = plan_window(data, None, cfg.data)
    validate_dataset(data, dates=window.validate_dates).raise_if_errors()
    mr = prepare(data, work / "model_ready", train_dates=window.train_dates, eval_dates=window.eval_dates,
                 seq_len=cfg.data.seq_len, n_req_neg=cfg.data.n_req_neg, overwrite=True).out_dir  # fmt: skip
    t["ingest"] = time.perf_counter()
    cd = load_cascade_data(mr, item_stats_windows=cfg.data.item_stats)
    model, owners = build_model(cd, cfg)
    for step in plan(cd.objectives, cfg):
        owners, _ = run_step(step, model, owners, cd, cfg)
        evaluate_model(model, owners.output_owners(), cd.catalog_tables("eval"), cd.eval.head(cfg.eval.max_users), cd.objectives,
                       ks=cfg.eval.ks, objectives_upto=step.stage, scorers="own")  # fmt: skip
    t["cascade"] = time.perf_counter()
    ckpt = save_checkpoint(work / "checkpoint", model, owners)
    write_bundle(work / "bundle", checkpoint_dir=ckpt, model_ready_dir=mr, dataset_dir=data, config=cfg,
                 index_kind="flat", overwrite=True)  # fmt: skip
    evaluate_model(model, owners.output_owners(), cd.catalog_tables("eval"), cd.eval.head(cfg.eval.max_users), cd.objectives,
                   ks=cfg.eval.ks, scorers="all", fused_weights=cfg.eval.fused_weights, popularity=cd.counts,
                   random_seed=0)  # fmt: skip
    t["end"] = time.perf_counter()
    return {
        "ingest": t["ingest"] - t["start"],
        "cascade": t["cascade"] - t["ingest"],
        "final": t["end"] - t["cascade"],
    }


def flow(data: str, work: Path, overrides: list[str]) -> dict:
    from flows.pipeline import csmf_daily

    t0 = time.perf_counter()
    out = csmf_daily(data=data, home=str(work / "home"), overrides=overrides)
    return {"flow": time.perf_counter() - t0, "model_version": out.get("model_version")}


def child(arm: str, data: str, work: str, overrides: list[str]) -> None:
    """Entry point of a child process: run one arm, print one JSON line."""
    t_import = time.perf_counter()
    if arm == "flow":
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        import flows.pipeline  # noqa: F401  (timed as import)
    else:
        import csmf_core.cascade  # noqa: F401
        import data_contracts  # noqa: F401
    imports = time.perf_counter() - t_import
    fn = flow if arm == "flow" else direct
    phases = fn(data, Path(work), overrides)
    total = sum(v for v in phases.values() if isinstance(v, float))
    print("RESULT " + json.dumps({"arm": arm, "seconds": total, "imports": imports, "phases": phases}))


def run_arm(arm: str, data: Path, work: Path, overrides: list[str], prefect_home: Path) -> dict:
    env = dict(os.environ, PREFECT_HOME=str(prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    # the default 20 s is too short for the temporary API server on a loaded 2-core machine
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    env.pop("MLFLOW_TRACKING_URI", None)  # the fresh home's own sqlite store
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, __file__, "--child", arm, "--data", str(data), "--work", str(work),
           "--overrides", *overrides]  # fmt: skip
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=benchlib.REPO)
    wall = time.perf_counter() - t0
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"{arm} arm failed (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return {**json.loads(lines[-1][7:]), "wall": wall}


def run(
    rounds: int = 1,
    overrides: list[str] | None = None,
    data: dict | None = None,
    write: bool = True,
    arms: tuple[str, ...] = ("flow", "direct"),
) -> list[dict]:
    import shutil

    overrides = list(overrides or [])
    data = dict(data or {"name": "small"})
    ds, _, _ = benchlib.synth_dataset(data.pop("name"), **data)
    rec = benchlib.Recorder("orchestration", {"dataset": ds.name, "overrides": overrides}, write=write)
    base = benchlib.work_dir() / "orchestration"
    prefect_home = base / "prefect"
    res: dict[str, list[dict]] = {a: [] for a in arms}
    for r in range(rounds):
        for arm in arms if r % 2 == 0 else arms[::-1]:
            work = base / f"{arm}-{r}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            res[arm].append(run_arm(arm, ds, work, overrides, prefect_home))
            shutil.rmtree(work, ignore_errors=True)
    med = lambda arm, key: benchlib.median([x[key] for x in res[arm]])  # noqa: E731
    if len(arms) == 2:
        ratios = [(a["seconds"] - b["seconds"]) / a["seconds"] for a, b in zip(res["flow"], res["direct"])]
        rec.add(
            "orchestration overhead (flow - direct) / flow",
            benchlib.median(ratios),
            "",
            "<= 0.1",
            rounds=rounds,
        )
    if "flow" in arms:
        rec.add("flow seconds (after imports)", med("flow", "seconds"), "s")
    if "direct" in arms:
        rec.add("direct seconds (after imports)", med("direct", "seconds"), "s")
        for k in ("ingest", "cascade", "final"):
            rec.add(f"direct phase: {k}", benchlib.median([x["phases"][k] for x in res["direct"]]), "s")
    labels = {"flow": "prefect, mlflow, flows", "direct": "csmf_core, data_contracts"}
    for arm in arms:
        rec.add(f"{arm} imports ({labels[arm]})", med(arm, "imports"), "s")
        rec.add(f"{arm} process wall", med(arm, "wall"), "s")
    return rec.flush()


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=1, help="flow/direct pairs (alternating order)")
    p.add_argument("--overrides", nargs="*", default=[], help="config overrides for both arms")
    p.add_argument("--quick", action="store_true", help="tiny world, 1 epoch per stage (smoke test)")
    p.add_argument("--arms", nargs="+", choices=["flow", "direct"], default=["flow", "direct"])
    p.add_argument("--no-write", action="store_true", help="do not append to bench/results/")
    p.add_argument("--child", choices=["flow", "direct"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child(a.child, a.data, a.work, a.overrides)
        return []
    if a.quick:
        tiny = {"name": "tiny", "n_users": 300, "n_items": 200, "n_days": 6, "requests_per_day": 340}
        quick = ["train.epochs=[1,1,1]", "recover.epochs=1", *a.overrides]
        return run(1, quick, tiny, write=not a.no_write, arms=tuple(a.arms))
    return run(a.rounds, a.overrides, write=not a.no_write, arms=tuple(a.arms))


if __name__ == "__main__":
    main()
