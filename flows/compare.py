"""The comparison flow `csmf-compare` (issue 5): every method x seed on one dataset, one report.

How to run:

    csmf compare --data data/synth-small --methods all --seeds 3
    csmf compare --data data/synth-small --methods csmf,youtubednn_sep --seeds 2 --set train.epochs=1,2,2
    csmf compare --data data/synth-small --methods csmf --seeds 1 --sweeps tau,eta,weights
    from flows.compare import csmf_compare; csmf_compare(data="data/synth-small", methods="csmf", seeds=1)

The flow reads like the report it writes:

    ingest (validate + model-ready, once) -> fit <method> seed <s> (one task per run) ->
    [sweeps: csmf retrained per tau / eta value; fusion weights on the trained seed-0 CSMF] -> report

Each run is a child MLflow run (tags `method`, `seed`, `sweep`) under one parent run
`csmf-compare-<date>` in the MLflow experiment "csmf-compare"; the parent holds the report
(markdown, tables, figures, runs.json). The report also goes to `reports/<dataset>/` (or
--report-dir) and to Prefect artifacts. Methods: csmf_core.baselines (docs/comparison.md).
Runs are sequential: on a small machine parallel runs would just share the same cores.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import platform
import time
from pathlib import Path

import torch
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from csmf_core.baselines import ABLATIONS, METHODS, resolve_methods
from csmf_core.baselines.base import evaluate_result
from csmf_core.baselines.csmf import train_csmf
from csmf_core.baselines.serving_cost import fused_rows, serving_costs
from csmf_core.cascade import CascadeData, load_cascade_data
from csmf_core.config import CSMFConfig, build_config, load_config
from csmf_core.evaluate import popularity_rows
from csmf_core.optim import deterministic_kernels
from flows import compare_report as rep
from flows import doctor, reporting
from flows.inputs import Window, code_version, contained, dataset_digest, plan_window, safe_name, setup_home
from flows.pipeline import Ingested, RunContext, _dataset_name, ingest
from flows.tracking import MlflowTracker, ensure_experiment

EXPERIMENT = "csmf-compare"
SWEEPS = {
    "tau": ("cpp.tau", (0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95)),  # paper Figure 4
    "eta": ("loss.eta", (1.2, 1.4, 1.6, 1.8, 2.0, 2.2)),  # paper Figure 5
}
WEIGHT_GRID = (
    0.0,
    0.5,
    1.0,
    1.5,
    2.0,
    3.0,
)  # each objective's weight in turn, the others at eval.fused_weights
LOG_EVERY = 200
LATENCY_ITEMS = 100_000  # fused-query latency is measured on the catalog tiled to at least this many rows


def parse_sweeps(spec: str | None) -> list[str]:
    """'' | 'tau,eta,weights' -> names; ValueError naming unknown ones."""
    names = [s.strip() for s in (spec or "").split(",") if s.strip()]
    unknown = [n for n in names if n not in (*SWEEPS, "weights")]
    if unknown:
        raise ValueError(f"unknown sweep(s) {unknown}; known: tau, eta, weights")
    return names


def _weights(cfg: CSMFConfig, objectives: list[str]) -> dict[str, float]:
    if len(cfg.eval.fused_weights) != len(objectives):
        raise ValueError(
            f"eval.fused_weights has {len(cfg.eval.fused_weights)} values for objectives {objectives}; "
            "set eval.fused_weights=[...] with one weight each"
        )
    return dict(zip(objectives, cfg.eval.fused_weights))


def machine() -> str:
    """One line describing where the run happened."""
    return (
        f"{platform.node()}: {platform.machine()} {platform.processor() or ''}".strip()
        + f", {os.cpu_count()} CPU cores visible, torch {torch.__version__}, torch threads: {torch.get_num_threads()}, "
        f"load average at start {os.getloadavg()[0]:.1f}"
    )


REPORT_FILES = ("comparison.md", "runs.json", "runs.partial.jsonl", "meta.partial.json")


def report_out_dir(dataset: Path, report_dir: str | os.PathLike | None, cwd: Path | None = None) -> Path:
    """Where the report goes: `report_dir`, else `<cwd>/reports/<dataset name>`, checked.

    The dataset name comes from dataset.yaml, i.e. from the data: it must be one directory name
    (data_contracts NAME_PATTERN) and the joined path must stay inside reports/ ("../../x",
    "/etc", "a/b" are refused). An explicit `report_dir` may be anywhere, but the report writes fixed
    file names into it, so it must be new, empty or hold an earlier csmf report (REPORT_FILES): a
    mistyped `--report-dir ..` or `--report-dir ~` is refused instead of filled.
    """
    if report_dir:
        out = Path(report_dir)
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"--report-dir {out} is a file; pass a directory for the report")
        if out.is_dir() and any(out.iterdir()) and not any((out / f).exists() for f in REPORT_FILES):
            raise FileExistsError(
                f"--report-dir {out} ({out.resolve()}) is a non-empty directory without a csmf report "
                f"({', '.join(REPORT_FILES)}); pass a new or empty directory, or one holding an earlier report"
            )
        return out
    name = _dataset_name(dataset)
    safe_name(name, f"the dataset name in {dataset / 'dataset.yaml'} (used for reports/<name>/)")
    return contained((cwd or Path.cwd()) / "reports", name, what="report directory")


# ---- the flow --------------------------------------------------------------------------------------
@flow(name="csmf-compare")
def csmf_compare(
    data: str,
    date: str | None = None,
    methods: str = "all",
    seeds: int = 3,
    config: str | None = None,
    overrides: list[str] | None = None,
    home: str | None = None,
    sweeps: str = "",
    report_dir: str | None = None,
    command: str | None = None,
    max_violation_rate: float = 0.0,
) -> dict:
    """Train and evaluate `methods` x `seeds` on one window of `data`; write the comparison report.

    Returns {"report": path of the markdown report, "mlflow_run_id", "tracking_uri", "runs": n}.
    """
    t0 = time.perf_counter()
    env = setup_home(home)
    cfg = load_config(config, overrides)
    names = resolve_methods(methods)
    sweep_names = parse_sweeps(sweeps)
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    if "weights" in sweep_names and "csmf" not in names:
        raise ValueError("the weights sweep reuses the trained csmf model: include csmf in --methods")
    dataset = Path(data).resolve()
    window = plan_window(dataset, date, cfg.data)
    doctor.before_run(env.root, env.tracking_uri)  # what killed csmf processes left (flows/doctor.py)
    out_dir = report_out_dir(dataset, report_dir)
    run = open_compare_run(env.root, env.tracking_uri, env.artifacts, cfg, dataset, window, names, seeds)
    try:
        ready = ingest(run, cfg, max_violation_rate)
        meta = {
            "dataset": _dataset_name(dataset),
            "dataset_dir": str(dataset),
            "window": dataclasses.asdict(window),
            "command": command or _command(data, date, methods, seeds, config, overrides, sweeps),
            "machine": machine(),
            "config_digest": cfg.digest(),
            "code_version": code_version(),
            "objectives": ready.objectives,
            "k": cfg.eval.primary_k,
            "seeds": seeds,
            "methods": names,
            "overrides": list(overrides or []),
            "mlflow_run_id": run.parent_run_id,
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "epochs": list(cfg.train.epochs),
            "notes": [
                f"{setting} is not applied by the comparison: every method, csmf included, {instead}"
                for setting, on, instead in (
                    (
                        f"data.val_days={cfg.data.val_days}",
                        cfg.data.val_days,
                        "trains on the whole window with its fixed epochs",
                    ),
                    (
                        f"data.item_stats={list(cfg.data.item_stats)}",
                        cfg.data.item_stats,
                        "sees the dataset's own item features only",
                    ),
                )
                if on
            ],
        }
        meta["reference"] = {"popularity": reference_rows(ready, cfg, run)}
        for note in meta["notes"]:
            get_run_logger().warning(note)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "meta.partial.json").write_text(json.dumps(meta, indent=1))
        partial = out_dir / "runs.partial.jsonl"
        partial.write_text("")
        records, failures = [], []
        # seeds outer: after each seed a complete comparison exists (runs.partial.jsonl, rebuild_report)
        for seed in range(seeds):
            for name in names:
                state = fit_method.with_options(task_run_name=f"{name}-seed{seed}")(
                    name,
                    seed,
                    ready,
                    cfg,
                    run,
                    weight_sweep=("weights" in sweep_names and name == "csmf" and seed == 0),
                    return_state=True,
                )
                _collect(state, name, seed, records, failures, partial)
        sweep_records = []
        for s in sweep_names:
            if s == "weights":
                continue
            key, grid = SWEEPS[s]
            for value in grid:
                c = build_config(reporting.plain(cfg.to_dict()), [f"{key}={value}"])
                state = fit_method.with_options(task_run_name=f"csmf-{s}={value}")(
                    "csmf", 0, ready, c, run, sweep=(s, value), return_state=True
                )
                _collect(state, f"csmf {s}={value}", 0, sweep_records, failures, partial)
        if not records:
            raise RuntimeError(f"every run failed: {failures}")
        meta["failures"] = failures
        path = write_report(records, sweep_records, meta, out_dir, run, time.perf_counter() - t0)
    except BaseException as exc:
        run.parent().fail(exc)
        raise
    run.parent().finish("FINISHED")
    return {
        "report": str(path),
        "mlflow_run_id": run.parent_run_id,
        "tracking_uri": run.tracking_uri,
        "runs": len(records) + len(sweep_records),
    }


def _collect(state, name: str, seed: int, ok: list, failures: list, partial: Path) -> None:
    """Keep a finished run's record, or note a failed one (the other runs go on; the report lists it)."""
    if state.is_completed():
        rec = state.result()
        ok.append(rec)
    else:
        try:
            state.result()
            err = f"state {state.type}"
        except BaseException as exc:  # the task's exception, re-raised by result()
            if isinstance(exc, KeyboardInterrupt):
                raise
            err = f"{type(exc).__name__}: {exc}"
        rec = {"failed": name, "seed": seed, "error": err[:500]}
        failures.append(rec)
        get_run_logger().error("%s seed %d failed: %s", name, seed, err)
    with partial.open("a") as fh:
        fh.write(json.dumps(rec, default=float) + "\n")


def _command(data, date, methods, seeds, config, overrides, sweeps) -> str:
    parts = ["csmf compare", f"--data {data}", f"--methods {methods}", f"--seeds {seeds}"]
    parts += [f"--date {date}"] if date else []
    parts += [f"--config {config}"] if config else []
    parts += [f"--set {o}" for o in overrides or []]
    parts += [f"--sweeps {sweeps}"] if sweeps else []
    return " ".join(parts)


# ---- tasks -----------------------------------------------------------------------------------------
@task(name="open-compare-run", cache_policy=NO_CACHE)
def open_compare_run(
    home: Path,
    tracking_uri: str,
    artifacts: Path,
    cfg: CSMFConfig,
    dataset: Path,
    window: Window,
    methods: list[str],
    seeds: int,
) -> RunContext:
    """Work dir `<home>/compare/<date>/<flow-run>` and the MLflow parent run."""
    key = flow_run.id or dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
    workdir = home / "compare" / window.date / str(key)
    workdir.mkdir(parents=True, exist_ok=True)
    digest, kind = dataset_digest(dataset, window.validate_dates)
    experiment_id = ensure_experiment(EXPERIMENT, artifacts, tracking_uri)
    tags = {
        "csmf.date": window.date,
        "csmf.dataset": _dataset_name(dataset),
        "csmf.dataset_dir": str(dataset),
        "csmf.dataset_digest": digest,
        "csmf.dataset_digest_kind": kind,
        "csmf.config_digest": cfg.digest(),
        "csmf.code_version": code_version(),
        "csmf.workdir": str(workdir),
        "csmf.kind": "compare",
        "prefect.flow_run_id": str(flow_run.id),
        **doctor.owner_tags(),  # who runs it: `csmf doctor` marks it FAILED if this process dies
    }
    parent = MlflowTracker.start(
        experiment_id, f"csmf-compare-{window.date}", tags=tags, tracking_uri=tracking_uri
    )
    try:
        parent.log_params(
            {
                **cfg.flat(),
                "compare.methods": methods,
                "compare.seeds": seeds,
                "run.train_dates": window.train_dates,
                "run.eval_dates": window.eval_dates,
            }
        )
    except BaseException as exc:  # the flow's own FAILED handling starts once the run is returned
        parent.fail(exc)
        raise
    return RunContext(workdir, dataset, window, tracking_uri, experiment_id, parent.run_id, digest)


def reference_rows(ready: Ingested, cfg: CSMFConfig, run: RunContext) -> list[dict]:
    """The popularity ranking on the same split (no training; deterministic), logged to the parent run."""
    data = load_cascade_data(ready.model_ready, load_train=False)
    rows = popularity_rows(
        data.eval.head(cfg.eval.max_users), data.objectives, data.counts, tuple(cfg.eval.ks)
    )
    run.parent().log_metrics(
        {
            f"reference/popularity/{r['objective']}/{m}@{r['k']}": r[m]
            for r in rows
            for m in ("recall", "ndcg")
        }
    )
    return [{**r, "scorer": r["objective"]} for r in rows]


def _load(ready: Ingested, cfg: CSMFConfig) -> CascadeData:
    data = load_cascade_data(ready.model_ready)
    data.eval = data.eval.head(cfg.eval.max_users)
    return data


@task(name="fit-method", cache_policy=NO_CACHE)
def fit_method(
    method: str,
    seed: int,
    ready: Ingested,
    cfg: CSMFConfig,
    run: RunContext,
    *,
    weight_sweep: bool = False,
    sweep: tuple[str, float] | None = None,
) -> dict:
    """Train one (method, seed), evaluate it, measure serving costs; log a child run; return the record."""
    logger = get_run_logger()
    data = _load(ready, cfg)
    weights = _weights(cfg, data.objectives)
    ks = tuple(cfg.eval.ks)
    tags = {"method": method, "seed": seed, "csmf.method": method, "csmf.kind": "compare-run"}
    if sweep:
        tags |= {"sweep": sweep[0], "sweep_value": sweep[1]}
    name = f"{method}/seed{seed}" if not sweep else f"{method}/{sweep[0]}={sweep[1]}"
    tracker = run.parent().child(name, tags=tags)
    try:
        tracker.log_params({**cfg.flat(), "method": method, "seed": seed})
        curve = reporting.LossCurve(tracker, logger, name, every=LOG_EVERY)
        trained = None
        with deterministic_kernels(cfg.train.deterministic):  # every method, not only csmf's train_stage
            if method == "csmf":
                trained = train_csmf(data, cfg, seed, curve)
                result = trained.result
            else:
                result = METHODS[method](data, cfg, seed, on_step=curve)
        curve.flush()
        own = evaluate_result(result, data, ks)
        rows = [{**r, "scorer": r["objective"]} for r in own]
        relevant = {o: data.eval.pos[t] for t, o in enumerate(data.objectives) if o in result.user_vecs}
        rows += fused_rows(result, relevant, weights, ks)
        serving = serving_costs(result, weights, k=cfg.eval.primary_k, min_items=LATENCY_ITEMS)
        metrics = {
            f"test/{r['objective']}/{'' if r['scorer'] == r['objective'] else 'fused/'}{m}@{r['k']}": r[m]
            for r in rows
            for m in ("recall", "ndcg")
            if r[m] == r[m]
        }
        metrics |= {f"serving/{k}": float(v) for k, v in serving.items()}
        metrics |= {"train/seconds": result.train_seconds, "model/n_params": result.n_params}
        tracker.log_metrics(metrics)
        tracker.log_text(json.dumps(reporting.plain(result.info), indent=1, default=str), "method/info.json")
        tracker.log_table([{k: v for k, v in r.items() if k != "method"} for r in rows], "metrics/test.json")
        record = {
            "method": method,
            "seed": seed,
            "metrics": rows,
            "train_seconds": result.train_seconds,
            "n_params": result.n_params,
            "serving": serving,
            "mlflow_run_id": tracker.run_id,
        }
        if sweep:
            record["sweep"] = {"name": sweep[0], "value": sweep[1]}
        if weight_sweep and trained is not None:
            record["weight_sweep"] = _weight_sweep(result, data, weights, cfg.eval.primary_k)
            tracker.log_table(record["weight_sweep"], "sweeps/weights.json")
        primary = {
            f"{r['objective']}/{r['scorer']}": round(r["recall"], 4)
            for r in rows
            if r["k"] == cfg.eval.primary_k
        }
        logger.info("%s done in %.1fs: recall@%d %s", name, result.train_seconds, cfg.eval.primary_k, primary)
    except BaseException as exc:
        tracker.fail(exc)
        raise
    tracker.finish("FINISHED")
    return record


def _weight_sweep(result, data: CascadeData, weights: dict[str, float], k: int) -> list[dict]:
    """Fused Recall/nDCG@k as each objective's weight moves over WEIGHT_GRID (no retraining)."""
    relevant = {o: data.eval.pos[t] for t, o in enumerate(data.objectives)}
    points = []
    for o in data.objectives:
        for w in WEIGHT_GRID:
            ws = {**weights, o: w}
            if sum(ws.values()) == 0:
                continue
            for r in fused_rows(result, relevant, ws, (k,)):
                points.append(
                    {
                        "param": f"k_{o}",
                        "value": w,
                        "objective": r["objective"],
                        "scorer": "fused",
                        "k": k,
                        "recall": r["recall"],
                        "ndcg": r["ndcg"],
                    }
                )
    return points


@task(name="report", cache_policy=NO_CACHE)
def write_report(
    records: list[dict], sweep_records: list[dict], meta: dict, out_dir: Path, run: RunContext, seconds: float
) -> Path:
    """Markdown + runs.json + figures under out_dir; the same to the parent run and Prefect artifacts."""
    path, md, t2_rows, t3_rows, t4_rows = render_report(records, sweep_records, meta, out_dir, seconds)
    for stale in ("runs.partial.jsonl", "meta.partial.json"):  # the complete report replaces them
        (out_dir / stale).unlink(missing_ok=True)
    parent = run.parent()
    parent.log_artifact(path, "report")
    parent.log_artifact(out_dir / "runs.json", "report")
    parent.log_artifact(out_dir / "figures", "report/figures")
    parent.log_table(t2_rows, "report/table2_accuracy.json")
    if t3_rows:
        parent.log_table(t3_rows, "report/table3_ablations.json")
    parent.log_table(t4_rows, "report/table4_serving.json")
    parent.log_metrics({"compare/wall_seconds": seconds})
    for name, rows in (("table2", t2_rows), ("table3", t3_rows), ("table4", t4_rows)):
        if rows:
            create_table_artifact(
                [{a: (round(b, 5) if isinstance(b, float) else b) for a, b in r.items()} for r in rows],
                key=f"csmf-compare-{name}",
                description=f"csmf-compare {meta['dataset']} {name}",
            )
    create_markdown_artifact(md, key="csmf-compare-report", description=f"csmf-compare {meta['dataset']}")
    return path


def render_report(
    records: list[dict], sweep_records: list[dict], meta: dict, out_dir: Path, seconds: float
) -> tuple[Path, str, list[dict], list[dict], list[dict]]:
    """Write comparison.md, runs.json and figures/ under out_dir; returns (path, markdown, table rows 2-4)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "figures").mkdir(exist_ok=True)
    meta = {**meta, "wall_seconds": seconds}
    k, objs = meta["k"], meta["objectives"]
    shown = [o for o in objs if any(m["objective"] == o for r in records for m in r["metrics"])]
    main_methods = [m for m in meta["methods"] if m not in ABLATIONS or m == "csmf"]
    abl_methods = [m for m in meta["methods"] if m in ABLATIONS]
    later = shown[1:] if len(shown) > 1 else shown  # click, conversion: the paper's Table 2 objectives
    # deterministic reference rankings on the same split (popularity), shown under the trained methods
    refs = [{"method": n, "seed": 0, "metrics": rows} for n, rows in meta.get("reference", {}).items()]
    fixed = [r["method"] for r in refs]
    t2, t2_rows = rep.accuracy_table(records + refs, main_methods + fixed, later, k, fixed=fixed)
    t2e, _ = rep.accuracy_table(records + refs, main_methods + fixed, shown[:1], k, fixed=fixed)
    t2f, _ = rep.accuracy_table(records, meta["methods"], shown, k, scorer="fused")
    t3, t3_rows = rep.accuracy_table(
        records, abl_methods, shown, k, reference="csmf" if "csmf" in abl_methods else None
    )
    if not any(m != "csmf" for m in abl_methods):  # csmf alone is not an ablation table
        t3, t3_rows = "", []
    t4, t4_rows = rep.serving_table(records, meta["methods"])
    verdict = rep.verdicts(records, main_methods, later, k) if "csmf" in main_methods else []
    if "csmf" in main_methods and "popularity" in fixed:
        verdict += rep.floor_verdicts(records + refs, shown, k)
    verdict3 = rep.verdicts(records, abl_methods, shown, k) if "csmf" in abl_methods else []
    figs = {"accuracy": rep.accuracy_figure(records, meta["methods"], later, k)}
    sweep_md = []
    for s in sorted({r["sweep"]["name"] for r in sweep_records}):
        pts = [
            {
                "value": r["sweep"]["value"],
                **m,
                "scorer": "own" if m["scorer"] == m["objective"] else m["scorer"],
            }
            for r in sweep_records
            if r["sweep"]["name"] == s
            for m in r["metrics"]
            if m["k"] == k
        ]
        sweep_md.append(
            f"### {s} sweep ({SWEEPS[s][0]}; csmf retrained, seed 0)\n\n"
            + rep.sweep_table(pts, SWEEPS[s][0], shown, k)
            + f"\n\n![{s}](figures/sweep_{s}.png)\n"
        )
        figs[f"sweep_{s}"] = rep.sweep_figure(pts, SWEEPS[s][0], shown, k)
    wpts = [p for r in records for p in r.get("weight_sweep", [])]
    for param in sorted({p["param"] for p in wpts}):
        pts = [p for p in wpts if p["param"] == param]
        sweep_md.append(
            f"### fusion weight {param} (others at eval.fused_weights; trained csmf seed 0, no retraining)\n\n"
            + rep.sweep_table(pts, param, shown, k)
            + f"\n\n![{param}](figures/sweep_{param}.png)\n"
        )
        figs[f"sweep_{param}"] = rep.sweep_figure(pts, param, shown, k)
    for fname, fig in figs.items():
        fig.savefig(out_dir / "figures" / f"{fname}.png", dpi=110)
    md = _markdown(
        meta,
        seconds,
        t2,
        t2e,
        t2f,
        t3,
        t4,
        verdict,
        verdict3,
        sweep_md,
        rep.per_seed_table(records, shown, k),
        records,
    )
    path = out_dir / "comparison.md"
    path.write_text(md)
    (out_dir / "runs.json").write_text(
        json.dumps({"meta": meta, "runs": records, "sweeps": sweep_records}, indent=1, default=float)
    )
    return path, md, t2_rows, t3_rows, t4_rows


def rebuild_report(out_dir: str | Path) -> Path:
    """Render the report from the runs finished so far (runs.partial.jsonl) of an interrupted compare.

    The report says it is partial; wall time is the time from the start to the last finished run.
    A finished report (runs.json, no partial files) is rendered again from its own records, the same
    numbers in the current layout; its wall time is the one recorded in runs.json.
    """
    out_dir = Path(out_dir)
    if not (out_dir / "runs.partial.jsonl").exists() and (out_dir / "runs.json").exists():
        done = json.loads((out_dir / "runs.json").read_text())
        meta = done["meta"]
        if "wall_seconds" not in meta:
            raise ValueError(
                f"{out_dir / 'runs.json'} has no meta.wall_seconds (written before it was recorded)"
            )
        return render_report(done["runs"], done["sweeps"], meta, out_dir, meta["wall_seconds"])[0]
    meta = json.loads((out_dir / "meta.partial.json").read_text())
    recs = [json.loads(x) for x in (out_dir / "runs.partial.jsonl").read_text().splitlines() if x.strip()]
    meta["failures"] = [r for r in recs if "failed" in r]
    recs = [r for r in recs if "failed" not in r]
    records = [r for r in recs if "sweep" not in r]
    sweeps = [r for r in recs if "sweep" in r]
    seeds = sorted({r["seed"] for r in records})
    full = [s for s in seeds if {r["method"] for r in records if r["seed"] == s} >= set(meta["methods"])]
    meta = {
        **meta,
        "partial": f"interrupted: {len(records)} of {len(meta['methods']) * meta['seeds']} runs finished; "
        f"seeds with every method: {full}",
    }
    started = dt.datetime.fromisoformat(meta["started"])
    last = max(Path(out_dir / "runs.partial.jsonl").stat().st_mtime, started.timestamp())
    return render_report(records, sweeps, meta, out_dir, last - started.timestamp())[0]


def _markdown(meta, seconds, t2, t2e, t2f, t3, t4, verdict, verdict3, sweep_md, per_seed, records) -> str:
    k = meta["k"]
    w = meta["window"]
    lines = [
        f"# Method comparison on `{meta['dataset']}`",
        "",
        "Generated by the `csmf-compare` Prefect flow; every number below comes from this run "
        f"(per-seed values at the end and in `runs.json`; MLflow parent run `{meta['mlflow_run_id']}`, "
        f"experiment `{EXPERIMENT}`).",
        "",
        *([f"- **Partial report**: {meta['partial']}"] if meta.get("partial") else []),
        f"- Command: `{meta['command']}`",
        f"- Machine: {meta['machine']}",
        *[f"- Note: {n}" for n in meta.get("notes", [])],
        f"- Wall time: {seconds / 60:.1f} min ({len(records)} runs + sweeps, sequential)",
        f"- Data: `{meta['dataset_dir']}`; training days {w['train_dates'][0]} .. {w['train_dates'][-1]}, "
        f"evaluation day(s) {', '.join(w['eval_dates'])}",
        f"- Config digest {meta['config_digest']}, code {meta['code_version']}, train.epochs {meta['epochs']}"
        + (f", overrides {meta['overrides']}" if meta["overrides"] else ""),
        f"- Metrics: Recall@{k} / nDCG@{k} over the whole catalog (csmf_core.metrics), users with at least one "
        "positive of the objective on the evaluation day; cells are mean ± half-width of the 95% Student-t "
        f"interval over {meta['seeds']} seed(s) (n=1: no interval).",
        "",
        "## Accuracy (like the paper's Table 2): each objective ranked by the method's own score for it",
        "",
        t2,
        "",
        *[f"- {v}" for v in verdict],
        "",
        f"Exposure objective (methods that serve it):\n\n{t2e}",
        "",
        "![accuracy](figures/accuracy.png)",
        "",
        "## Fused ranking (weights eval.fused_weights over the objectives each method serves)",
        "",
        t2f,
        "",
    ]
    if t3:
        lines += [
            "## Ablations (like the paper's Table 3; relative change of the mean vs csmf)",
            "",
            t3,
            "",
            *[f"- {v}" for v in verdict3],
            "",
        ]
    lines += [
        "## Serving (like the paper's Table 4)",
        "",
        "Bytes/item: float32 item vectors a server stores per item (a vector shared by objectives counted once). "
        "Index: serialized flat inner-product FAISS index over the concatenation of the method's distinct item "
        "matrices, the index an exact fused query must search. Latency: exact fused top-"
        f"{k} per request (best of 3 passes), catalog tiled to {records[0]['serving']['latency_items']:,} rows, "
        f"FAISS threads: {records[0]['serving']['faiss_threads']}, on the machine above (noisy when shared).",
        "",
        t4,
        "",
    ]
    if sweep_md:
        lines += ["## Sensitivity (like the paper's Figures 4-5)", "", *sweep_md]
    if meta.get("failures"):
        lines += ["## Failed runs (left out of every table above)", ""]
        lines += [f"- {f['failed']} seed {f['seed']}: {f['error']}" for f in meta["failures"]] + [""]
    lines += ["## Per-seed values", "", per_seed, ""]
    return "\n".join(lines)


def compare_from_cli(args, home: Path) -> int:
    """`csmf compare`: check the arguments before Prefect starts, run the flow, print where things are."""
    cfg = load_config(args.config, args.set)  # fail fast on a bad config
    names = resolve_methods(args.methods)
    parse_sweeps(args.sweeps)
    data = Path(args.data).resolve()
    if not data.is_dir():
        raise FileNotFoundError(f"--data {data}: no such directory")
    report_out_dir(data, args.report_dir)  # a bad dataset name or --report-dir fails before Prefect starts
    command = "csmf compare " + " ".join(
        [f"--data {args.data}", f"--methods {args.methods}", f"--seeds {args.seeds}"]
        + ([f"--date {args.date}"] if args.date else [])
        + ([f"--config {args.config}"] if args.config else [])
        + [f"--set {o}" for o in args.set]
        + ([f"--sweeps {args.sweeps}"] if args.sweeps else [])
        + ([f"--report-dir {args.report_dir}"] if args.report_dir else [])
    )
    print(
        f"csmf compare: {len(names)} method(s) x {args.seeds} seed(s) on {data}; home {home}; "
        f"epochs {list(cfg.train.epochs)}"
    )
    out = csmf_compare(
        data=str(data),
        date=args.date,
        methods=args.methods,
        seeds=args.seeds,
        config=args.config,
        overrides=list(args.set),
        home=str(home),
        sweeps=args.sweeps,
        report_dir=args.report_dir,
        command=command,
    )
    print(
        f"\nreport: {out['report']}\nMLflow parent run: {out['mlflow_run_id']} (experiment {EXPERIMENT}; "
        f"open with `csmf ui`)"
    )
    return 0
