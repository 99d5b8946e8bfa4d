"""GPU check (#18 item 5): the cascade and the serving path on CUDA against the same runs on the CPU.

How to run:  bench/gpu_check.sh [--quick] [driver options]   (makes .venv-gpu with torch's CUDA build)
        or:  .venv/bin/python bench/gpu_check.py [--kuairand PATH | --data DIR] [--cpu-seeds 2] [--quick]

Data: the KuaiRand slice at --kuairand (default ../shared/data/kuairand beside the repo), imported
as `csmf import kuairand` does (`data_contracts.import_kuairand`) into the work dir once, evaluated on
2022-05-06 .. 05-08 like reports/kuairand; else a canonical dataset given with --data; else the
generated `small` world (`--quick`: a tiny one). Ingest as the flow does (`plan_window`, `prepare`).

The cascade: `csmf_core.cascade.run_cascade` (every step of the plan, the configured epochs, no
validation days, so both devices train exactly the same epochs; the flow's selection pass is the same
code on fewer days), with `train.device` semantics: the feature tables go to the device and the model
follows them (`build_model`). Runs: the CUDA run with --seed, and --cpu-seeds CPU runs with seeds
seed, seed + 1, ... Printed and recorded (bench/results/gpu_check.jsonl, `benchlib.Recorder`):

* training samples/s on each device (rows stepped on / training seconds, summed over the cascade's
  train and recovery steps; pruning and evaluation excluded) and the CUDA / CPU ratio;
* peak GPU memory of the CUDA cascade (torch.cuda.max_memory_allocated);
* forward parity: the CPU-trained model's item and user vectors computed on CUDA against the CPU
  (same weights; max abs difference, target <= 1e-3: float32 rounding only);
* whether Recall@K / nDCG@K (eval.primary_k) per objective, own mode and fused, of the CUDA run match
  the CPU run of the same seed within noise (`tolerances`, `compare_metrics`);
* serving: latency per query of the product's query path (user tower -> fused query -> exact FAISS
  search of k items) with the tower on CUDA and on the CPU, batch 1 and 1,024 (FAISS is faiss-cpu in
  both arms: the pinned stack has no GPU index).

The tolerance: CUDA and CPU train the same seed with the same batches and initial weights; only
floating-point rounding differs, and over thousands of Adam steps such differences grow until the
model is about as different as another seed's. So a metric matches when |CUDA - CPU| <= max(FLOOR,
2 x the range of that metric over the CPU seeds): the spread training randomness gives on the same
data, doubled because the range of 2-3 seeds underestimates it. FLOOR = 0.005 is about 3 standard
deviations of the least noisy figure documented for KuaiRand (exposure Recall@50, 0.173 +- 0.002
over 5 seeds, docs/method-notes.md), so two seeds that happen to agree do not make the check stricter
than the data can tell. A device bug (masks, log-Q or AML applied wrongly on CUDA) moves metrics by
more than that; rounding does not.

Without CUDA it says so and runs the CPU path only (exit 0). `--quick`: tiny world, 1 epoch per
stage, few serving rounds (seconds; the figures mean nothing).
"""

from __future__ import annotations

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS: before CUDA starts

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

try:
    from bench import benchlib
except ImportError:  # run as `python bench/gpu_check.py`
    import benchlib  # type: ignore[no-redef]

FLOOR = 0.005
SPREAD_FACTOR = 2.0
PARITY_TARGET = 1e-3
KUAIRAND_DATE, KUAIRAND_EVAL_DAYS = "2022-05-06", 3  # reports/kuairand's evaluation days
DEFAULT_KUAIRAND = benchlib.REPO.parent / "shared" / "data" / "kuairand"


# ---- the metric comparison ------------------------------------------------------------------------
def tolerances(cpu_runs: list[dict[str, float]], floor: float = FLOOR, factor: float = SPREAD_FACTOR) -> dict:
    """Per metric: max(floor, factor x (max - min) over the CPU seeds' values). NaN values (an
    objective without evaluation users) are left out; one CPU run gives the floor."""
    keys = sorted(set().union(*cpu_runs)) if cpu_runs else []
    out = {}
    for k in keys:
        vals = [r[k] for r in cpu_runs if k in r and not math.isnan(r[k])]
        spread = (max(vals) - min(vals)) if vals else 0.0
        out[k] = max(floor, factor * spread)
    return out


def compare_metrics(cuda: dict[str, float], cpu: dict[str, float], tol: dict[str, float]) -> list[dict]:
    """One row per metric of the CPU run: both values, |difference|, tolerance and match: None when the
    CPU value is NaN (no evaluation user of that objective: nothing to compare), False when the device
    value is missing or NaN where the CPU has one, else |difference| <= tolerance."""
    rows = []
    for k in sorted(cpu):
        a, b = cuda.get(k, float("nan")), cpu[k]
        diff = abs(a - b)
        t = tol.get(k, FLOOR)
        match = None if math.isnan(b) else False if math.isnan(a) else diff <= t
        rows.append({"metric": k, "cuda": a, "cpu": b, "diff": diff, "tol": t, "match": match})
    return rows


def all_match(rows: list[dict]) -> bool:
    """Every comparable metric within its tolerance (and at least one compared)."""
    known = [r["match"] for r in rows if r["match"] is not None]
    return bool(known) and all(known)


def metrics_from_rows(rows: list[dict], k: int) -> dict[str, float]:
    """evaluate_model rows -> {"<objective>/own/recall@k": v, ".../fused/ndcg@k": v, ...}."""
    out = {}
    for r in rows:
        if r["k"] != k or r["scorer"] not in (r["objective"], "fused"):
            continue
        which = "own" if r["scorer"] == r["objective"] else "fused"
        for m in ("recall", "ndcg"):
            out[f"{r['objective']}/{which}/{m}@{k}"] = float(r[m])
    return out


# ---- data -----------------------------------------------------------------------------------------
def dataset(a: argparse.Namespace, work: Path) -> tuple[Path, str | None, list[str], str]:
    """(canonical dataset dir, evaluation date or None, config overrides it implies, description)."""
    if a.data:
        return Path(a.data), a.date, [], f"canonical dataset {a.data}"
    src = Path(a.kuairand) if a.kuairand else DEFAULT_KUAIRAND
    if not a.quick and src.is_dir():
        from data_contracts import import_kuairand

        out = work / "kuairand"
        done = out / "_gpu_check_imported"
        if not done.exists() or done.read_text() != str(src.resolve()):
            t0 = time.perf_counter()
            import_kuairand(src, out, overwrite=True)  # what `csmf import kuairand SRC --out OUT` runs
            done.write_text(str(src.resolve()))
            print(f"imported KuaiRand from {src} into {out} ({time.perf_counter() - t0:.0f} s)", flush=True)
        date = a.date or KUAIRAND_DATE
        return out, date, [f"data.eval_days={KUAIRAND_EVAL_DAYS}"], f"KuaiRand slice {src}"
    if a.quick:
        ds, _, _ = benchlib.synth_dataset(
            "gpu-check-tiny", n_users=300, n_items=200, n_days=6, requests_per_day=340
        )
        return ds, a.date, [], "generated tiny world (--quick)"
    ds, _, _ = benchlib.synth_dataset("small")
    return ds, a.date, [], f"generated small world (no KuaiRand slice at {src})"


def ingest(ds: Path, date: str | None, cfg, work: Path) -> Path:
    """The flow's ingest: the window of `date`, then the model-ready data (validated by prepare)."""
    from csmf_core.prep import prepare
    from flows.inputs import plan_window  # date arithmetic only: no Prefect, no MLflow

    w = plan_window(ds, date, cfg.data)
    out = work / f"model_ready-{ds.name}-{w.eval_dates[0]}"
    return prepare(ds, out, train_dates=w.train_dates, eval_dates=w.eval_dates, seq_len=cfg.data.seq_len,
                   n_req_neg=cfg.data.n_req_neg, overwrite=True).out_dir  # fmt: skip


# ---- the cascade on one device -----------------------------------------------------------------------
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_cascade_on(cd, cfg, device: str, seed: int) -> dict:
    """The whole cascade with seed `seed` on `device`, then its evaluation on the evaluation days."""
    from csmf_core.baselines.common import with_seed
    from csmf_core.cascade import run_cascade
    from csmf_core.evaluate import evaluate_model

    c = with_seed(cfg, seed)
    data = dataclasses.replace(cd, tables=cd.tables.to(device))
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    t0 = time.perf_counter()
    model, owners, reports = run_cascade(data, c)
    _sync(device)
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None  # before eval
    where = {p.device.type for p in model.parameters()}
    if where != {torch.device(device).type}:
        raise RuntimeError(f"the cascade's model ended on {where}, not {device}")
    trained = [r.info for r in reports if r.step.kind != "prune"]
    seconds = sum(float(i["seconds"]) for i in trained)
    # rows stepped on: each step's rate x its seconds (TrainLog.summary rounds seconds to 1 ms)
    samples = sum(float(i["samples_per_s"]) * float(i["seconds"]) for i in trained)
    k = c.eval.primary_k
    weights = c.eval.fused_weights
    rows = evaluate_model(model, owners.output_owners(), data.catalog_tables("eval"), data.eval.head(c.eval.max_users),
                          data.objectives, ks=(k,), scorers="all", fused_weights=tuple(weights))  # fmt: skip
    out = {
        "device": device,
        "seed": seed,
        "wall_s": wall,
        "train_s": seconds,
        "samples": samples,
        "samples_per_s": samples / max(seconds, 1e-9),
        "metrics": metrics_from_rows(rows, k),
        "model": model,
        "owners": owners,
        "data": data,
    }
    if peak is not None:
        out["peak_mib"] = peak
    return out


@torch.no_grad()
def forward_parity(run: dict, device: str) -> dict[str, float]:
    """The CPU-trained model's item and user vectors on `device` against the CPU: max abs difference."""
    from csmf_core.evaluate import item_matrix, user_matrix

    model, data = run["model"], run["data"]
    tables = data.catalog_tables("eval")
    ev = data.eval.head(2048)
    other = copy.deepcopy(model).to(device)
    other_tables = tables.to(device)
    items = (item_matrix(model, tables) - item_matrix(other, other_tables)).abs().max()
    users = (
        user_matrix(model, tables, ev.u, ev.hists) - user_matrix(other, other_tables, ev.u, ev.hists)
    ).abs()
    return {"items": float(items), "users": float(users.max()) if users.numel() else 0.0}


# ---- serving: the query path with the user tower on each device -----------------------------------------
def serving_latency(
    run: dict,
    arms: dict[str, str],
    weights: tuple[float, ...],
    batches=(1, 1024),
    rounds: int = 7,
    k: int = 50,
) -> dict:
    """Per query seconds of user tower (arm label -> its device) -> fused query (numpy) -> exact FAISS
    top-k, the arms interleaved; returns {(label, batch): seconds per query}."""
    from csmf_core.evaluate import item_matrix
    from csmf_core.fusion import fuse_queries_np
    from csmf_core.index import ItemIndex

    model, data = run["model"], run["data"]
    tables = data.catalog_tables("eval")
    items = item_matrix(model, tables).numpy()
    index = ItemIndex.build(np.arange(len(items), dtype=np.int64), items, "flat")
    out_owners = run["owners"].output_owners().numpy()
    weights_all = np.asarray(weights, dtype=np.float32)
    placed = {
        label: (copy.deepcopy(model).to(dev).eval(), tables.to(dev), dev) for label, dev in arms.items()
    }
    per = {}
    for b in batches:
        n = min(b, len(data.eval))
        if n == 0:
            continue
        u = data.eval.u[:n]
        hists = [h[:n] for h in data.eval.hists]
        w = np.broadcast_to(weights_all, (n, len(weights_all))).copy()
        calls = 16 if n == 1 else 1

        def query(label: str, u=u, hists=hists, w=w, calls=calls) -> None:
            m, t, dev = placed[label]
            with torch.no_grad():
                for _ in range(calls):
                    x = t.user_inputs(u.to(dev), [h.to(dev) for h in hists])
                    vec = m.user_vectors(x).float().cpu().numpy()  # .cpu() waits for the GPU
                    index.search(fuse_queries_np(vec, out_owners, w), min(k, len(items)))

        fns = {label: (lambda x=label: query(x)) for label in arms}
        for f in fns.values():
            f()  # warm-up
        t = benchlib.interleaved(fns, rounds)
        for label in arms:
            per[(label, n)] = benchlib.median(t[label]) / (calls * n)
    return per


# ---- main -------------------------------------------------------------------------------------------------
def accelerator(a: argparse.Namespace) -> str | None:
    """The device compared with the CPU (None: CPU path only), with what it is printed first."""
    if a.cpu_only:
        print(
            "NO GPU run: --cpu-only given. Running the CPU path only: no CUDA figure is produced.", flush=True
        )
        return None
    if a.device.startswith("cuda"):
        if not torch.cuda.is_available():
            print(f"NO GPU: torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False). "
                  "Running the CPU path only: no CUDA figure is produced.", flush=True)  # fmt: skip
            return None
        props = torch.cuda.get_device_properties(0)
        print(f"CUDA: {torch.cuda.get_device_name(0)} ({props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, "
              f"CUDA runtime {torch.version.cuda}", flush=True)  # fmt: skip
        return a.device
    print(f"comparison arm on {a.device!r} (--device): a test of this script's comparison, not a GPU figure",
          flush=True)  # fmt: skip
    return a.device


def run(a: argparse.Namespace) -> dict:
    from csmf_core.cascade import load_cascade_data
    from csmf_core.config import load_config

    acc = accelerator(a)
    work = Path(a.work) if a.work else benchlib.work_dir() / "gpu-check"
    work.mkdir(parents=True, exist_ok=True)
    ds, date, data_overrides, described = dataset(a, work)
    overrides = [*data_overrides, "data.val_days=0", *(a.set or [])]
    if a.quick:
        overrides = ["train.epochs=[1,1,1]", "recover.epochs=1", *overrides]
    cfg = load_config(a.config, overrides)
    if cfg.eval.fused_weights == "auto":
        from csmf_core.selection import PAPER_WEIGHTS

        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, fused_weights=PAPER_WEIGHTS))
    print(f"data: {described}; config overrides {overrides}", flush=True)
    t0 = time.perf_counter()
    mr = ingest(ds, date, cfg, work)
    cd = load_cascade_data(mr, item_stats_windows=cfg.data.item_stats)
    print(f"ingest: {time.perf_counter() - t0:.1f} s, {len(cd.rows):,} train rows, {len(cd.eval):,} eval users, "
          f"torch threads {torch.get_num_threads()}", flush=True)  # fmt: skip
    k = cfg.eval.primary_k
    gpu = torch.cuda.get_device_name(0) if acc and acc.startswith("cuda") else None
    rec = benchlib.Recorder(
        "gpu_check",
        {"data": described, "overrides": overrides, "device": acc, "gpu": gpu, "cpu_seeds": a.cpu_seeds,
         "seed": a.seed},
        write=not a.no_write,
    )  # fmt: skip
    cpu_runs = []
    for s in range(a.seed, a.seed + a.cpu_seeds):
        r = run_cascade_on(cd, cfg, "cpu", s)
        print(f"cpu seed {s}: {r['samples_per_s']:,.0f} samples/s, cascade {r['wall_s']:.1f} s", flush=True)
        cpu_runs.append(r)
    ref = cpu_runs[0]
    rec.add("cpu training samples/s", ref["samples_per_s"], "samples/s", seed=a.seed)
    rec.add("cpu cascade wall", ref["wall_s"], "s", seed=a.seed)
    tol = tolerances([r["metrics"] for r in cpu_runs])
    result: dict = {"device": acc, "cpu": cpu_runs, "tolerances": tol, "match": None}
    arms = {"cpu": "cpu"}
    if acc is not None:
        name = acc if acc != "cpu" else "cpu-arm"  # figures of a CPU comparison arm (a test) stay apart
        g = run_cascade_on(cd, cfg, acc, a.seed)
        print(
            f"{name} seed {a.seed}: {g['samples_per_s']:,.0f} samples/s, cascade {g['wall_s']:.1f} s",
            flush=True,
        )
        result["accelerated"] = g
        arms["accelerated"] = acc
        rec.add(f"{name} training samples/s", g["samples_per_s"], "samples/s", seed=a.seed)
        rec.add(f"{name} cascade wall", g["wall_s"], "s", seed=a.seed)
        rec.add(f"training samples/s ratio {name}/cpu", g["samples_per_s"] / ref["samples_per_s"], "x")
        if "peak_mib" in g:
            rec.add("peak GPU memory (cascade, torch.cuda.max_memory_allocated)", g["peak_mib"], "MiB")
        for what, v in forward_parity(ref, acc).items():
            rec.add(f"forward parity: max |{name} - cpu| of {what} vectors, same weights", v, "",
                    f"<= {PARITY_TARGET}")  # fmt: skip
        rows = compare_metrics(g["metrics"], ref["metrics"], tol)
        result["comparison"] = rows
        print(comparison_table(rows, len(cpu_runs), name))
        for r in rows:
            if r["match"] is not None:
                rec.add(f"|{name} - cpu| {r['metric']}", r["diff"], "", f"<= {r['tol']:.4g}", accelerated=r["cuda"],
                        cpu=r["cpu"])  # fmt: skip
        result["match"] = all_match(rows)
        rec.add(f"metrics match cpu within noise (Recall/nDCG@{k}, own and fused)", int(result["match"]), "",
                "== 1", compared=sum(r["match"] is not None for r in rows))  # fmt: skip
    else:
        for key, v in ref["metrics"].items():
            rec.add(f"cpu {key}", v, "", seed=a.seed, tolerance=tol.get(key))
    weights = tuple(float(x) for x in cfg.eval.fused_weights)
    lat = serving_latency(ref, arms, weights, rounds=3 if a.quick else a.serving_rounds, k=k)
    for (label, n), sec in sorted(lat.items()):
        where = "cpu" if label == "cpu" else name
        rec.add(f"serving latency per query, tower on {where}, batch {n}", sec * 1e6, "us", batch=n)
    if acc is not None:
        for n in sorted({n for _, n in lat}):
            ratio = lat[("accelerated", n)] / lat[("cpu", n)]
            rec.add(f"serving latency ratio {name}/cpu tower, batch {n}", ratio, "x", batch=n)
    result["records"] = rec.flush()
    result["serving"] = lat
    if acc is None:
        print("NO GPU: CPU path only; run bench/gpu_check.sh on a CUDA machine for the CUDA figures.")
    elif result["match"]:
        print(f"{acc} metrics match the CPU run within noise ({len(cpu_runs)} CPU seeds).")
    else:
        print(f"{acc} metrics do NOT match the CPU run within noise: see the table above.")
    return result


def comparison_table(rows: list[dict], n_seeds: int, device: str = "cuda") -> str:
    head = ["metric", device, "cpu", "|diff|", "tolerance", "match"]
    body = [[r["metric"], f"{r['cuda']:.4f}", f"{r['cpu']:.4f}", f"{r['diff']:.4f}", f"{r['tol']:.4f}",
             {True: "yes", False: "NO", None: "-"}[r["match"]]] for r in rows]  # fmt: skip
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    title = (f"== metrics, {device} vs CPU (same seed); tolerance max({FLOOR}, {SPREAD_FACTOR:g} x range over "
             f"{n_seeds} CPU seeds)")  # fmt: skip
    return "\n".join([title, line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kuairand", help=f"the KuaiRand slice (default {DEFAULT_KUAIRAND} when present)")
    p.add_argument("--data", help="a canonical dataset directory instead (evaluated on --date)")
    p.add_argument("--date", help="evaluation date (default: KuaiRand 2022-05-06, else the last partition)")
    p.add_argument("--config", help="a YAML config (default: the built-in defaults)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="the seed of the CUDA run and of the first CPU run")
    p.add_argument("--cpu-seeds", type=int, default=2, help="CPU runs (seeds seed, seed+1, ...): the noise")
    p.add_argument("--serving-rounds", type=int, default=7)
    p.add_argument("--cpu-only", action="store_true", help="skip CUDA even when present")
    p.add_argument(
        "--device",
        default="cuda",
        help="the device compared with the CPU (default cuda; cpu: tests this script's comparison)",
    )
    p.add_argument("--work", help="scratch dir (default: $CSMF_BENCH_DIR or <tmp>/csmf-bench, /gpu-check)")
    p.add_argument(
        "--quick", action="store_true", help="tiny generated world, 1 epoch per stage (smoke test)"
    )
    p.add_argument("--no-write", action="store_true", help="do not append to bench/results/")
    a = p.parse_args(argv)
    if a.cpu_seeds < 1:
        p.error("--cpu-seeds must be >= 1")
    return run(a)


if __name__ == "__main__":
    raise SystemExit(0 if main()["match"] in (True, None) else 1)  # 1: the metrics do not match
