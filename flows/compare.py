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
`csmf-compare-<date>` in the MLflow experiment "csmf-compare" (flows/runs.py `COMPARE`); the parent
holds the report (markdown, tables, figures, runs.json). The report also goes to
`reports/<dataset>/` (or --report-dir) and to Prefect artifacts; its layout is
flows/compare_render.py, its numbers flows/compare_report.py, the command line flows/cli.py. Methods:
csmf_core.baselines (docs/comparison.md). Runs are sequential: on a small machine parallel runs
would just share the same cores.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from csmf_core.baselines import METHODS, resolve_methods
from csmf_core.baselines.base import MethodResult, evaluate_result
from csmf_core.baselines.csmf import train_csmf
from csmf_core.baselines.protocol import fit_with_protocol
from csmf_core.baselines.serving_cost import fused_rows, serving_costs
from csmf_core.cascade import CascadeData, load_cascade_data
from csmf_core.config import ConfigError, CSMFConfig, build_config, load_config
from csmf_core.evaluate import popularity_rows
from csmf_core.optim import deterministic_kernels
from csmf_core.tuning import changed_keys, override_keys
from flows import doctor, prefect_compat, reporting
from flows.compare_protocol import (
    compare_protocol,
    fixed_weights,
    protocol_data,
    protocol_statement,
    protocol_val_days,
    tune_method,
)
from flows.compare_render import PARTIAL_FILES, REPORT_FILES, machine, render_report
from flows.compare_report import SWEEPS, WEIGHT_GRID
from flows.env import check_writable, setup_home, tracking_uri
from flows.ingest import Ingested, ingest
from flows.inputs import code_version, dataset_location, fit_to_dataset, plan_window, report_directory
from flows.notify import notify_failure
from flows.runs import COMPARE, RunContext, child_run, dataset_name, open_run, run_lifecycle

prefect_compat.install()  # a flow run's end does not wait for its heartbeat thread (flows/prefect_compat.py)

LOG_EVERY = 200
LATENCY_ITEMS = 100_000  # fused-query latency is measured on the catalog tiled to at least this many rows


def parse_sweeps(spec: str | None) -> list[str]:
    """'' | 'tau,eta,weights' -> names; ValueError naming unknown ones."""
    names = [s.strip() for s in (spec or "").split(",") if s.strip()]
    unknown = [n for n in names if n not in (*SWEEPS, "weights")]
    if unknown:
        raise ValueError(f"unknown sweep(s) {unknown}; known: tau, eta, weights")
    return names


def check_arguments(methods: str, seeds: int, sweeps: str | None) -> tuple[list[str], list[str]]:
    """(method names, sweep names) of the arguments, or ValueError naming the problem: checked by the
    CLI before Prefect starts and by the flow itself."""
    names = resolve_methods(methods)
    sweep_names = parse_sweeps(sweeps)
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    if "weights" in sweep_names and "csmf" not in names:
        raise ValueError("the weights sweep reuses the trained csmf model: include csmf in --methods")
    return names, sweep_names


def report_out_dir(dataset: Path, report_dir: str | os.PathLike | None, cwd: Path | None = None) -> Path:
    """Where the report goes: `report_dir`, else `<cwd>/reports/<dataset name>`, checked.

    The dataset name comes from dataset.yaml, i.e. from the data: it must be one directory name
    (data_contracts NAME_PATTERN) and the joined path must stay inside reports/ ("../../x",
    "/etc", "a/b" are refused). An explicit `report_dir` may be anywhere, but the report writes fixed
    file names into it, so it must be new, empty or hold an earlier csmf report (REPORT_FILES): a
    mistyped `--report-dir ..` or `--report-dir ~` is refused instead of filled.
    """
    return report_directory(dataset_name(dataset), report_dir, REPORT_FILES, "csmf report", cwd)


def check_fixed_weights(cfg: CSMFConfig, window, fixed: list[str]) -> None:
    """`--set eval.fused_weights=[...]` with validation days: refused (ConfigError), since the protocol
    chooses every method's default fused weights on the validation days from one grid and would
    replace the fixed weighting without a word. Without validation days every method uses it."""
    if "eval.fused_weights" not in fixed or cfg.eval.fused_weights == "auto":
        return
    n, why = protocol_val_days(cfg, len(window.train_dates), len(window.eval_dates))
    if n > 0:
        raise ConfigError(
            f"--set eval.fused_weights={list(cfg.eval.fused_weights)}: the comparison chooses every method's "
            f"default fused weights on its validation days ({why}) from one grid (docs/comparison.md), "
            "so a fixed weighting would not be applied; drop it (the report's weights sweep, --sweeps "
            "weights, shows CSMF at other weightings)"
        )


# ---- the flow --------------------------------------------------------------------------------------
@flow(name="csmf-compare", on_failure=[notify_failure], on_crashed=[notify_failure])
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
    tune_trials: int = 0,
) -> dict:
    """Train and evaluate `methods` x `seeds` on one window of `data`; write the comparison report.

    Every method follows one protocol (csmf_core/baselines/protocol.py): epochs chosen on the
    validation days at the end of the training window, fused weights chosen there, then a refit on
    the whole window. tune_trials > 0: each method first gets that many Optuna trials over its own
    search space (configs/tune_spaces/), scored on the validation days, and every seed then trains
    the best configuration.

    Returns {"report": path of the markdown report, "mlflow_run_id", "tracking_uri", "runs": n}.
    """
    t0 = time.perf_counter()
    root = setup_home(home)
    check_writable(root)
    cfg = load_config(config, overrides)
    names, sweep_names = check_arguments(methods, seeds, sweeps)
    dataset = dataset_location(data, root)
    cfg = fit_to_dataset(cfg, dataset, get_run_logger().info)
    window = plan_window(dataset, date, cfg.data)
    check_fixed_weights(cfg, window, override_keys(overrides or []))
    doctor.before_run(root, tracking_uri())  # what killed csmf processes left (flows/doctor.py)
    out_dir = report_out_dir(dataset, report_dir)
    command = command or _command(data, date, methods, seeds, config, overrides, sweeps)
    run = open_run(COMPARE, root, cfg, dataset, window, {"compare.methods": names, "compare.seeds": seeds})
    with run_lifecycle(run):
        ready = ingest(run, cfg, max_violation_rate)
        protocol = compare_protocol(ready, cfg, tune_trials)
        if protocol["val_days"] == 0:
            get_run_logger().warning(
                "no validation days (%s): every method trains its fixed epochs", protocol["why"]
            )
        configs = {name: cfg for name in names}
        if tune_trials > 0 and protocol["val_days"] > 0:
            for name in names:  # the same budget for every method, on the validation days only
                configs[name] = tune_method.with_options(task_run_name=f"tune-{name}")(
                    name, tune_trials, ready, cfg, run, fixed=override_keys(overrides)
                )
        if tune_trials > 0 and protocol["val_days"] > 0:  # the statement with what the tuning chose
            protocol["statement"] = protocol_statement(protocol, cfg, configs)
        meta = report_meta(ready, cfg, run, names, seeds, overrides, command)
        meta["protocol"] = protocol | {"tuned": {n: changed_keys(cfg, c) for n, c in configs.items()}}
        results = Results(out_dir, meta)
        for seed in range(seeds):  # seeds outer: after each seed a complete comparison exists
            for name in names:
                weight_sweep = "weights" in sweep_names and name == "csmf" and seed == 0
                results.add(
                    _fit(name, seed, ready, configs[name], run, weight_sweep=weight_sweep), name, seed
                )
        for sweep, value, swept in sweep_configs(sweep_names, cfg):
            results.add(_fit("csmf", 0, ready, swept, run, sweep=(sweep, value)), f"csmf {sweep}={value}", 0)
        path = write_report(*results.final(), out_dir, run, time.perf_counter() - t0)
    return {
        "report": str(path),
        "mlflow_run_id": run.parent_run_id,
        "tracking_uri": run.tracking_uri,
        "runs": len(results.records) + len(results.sweeps),
    }


def report_meta(
    ready: Ingested,
    cfg: CSMFConfig,
    run: RunContext,
    names: list[str],
    seeds: int,
    overrides: list[str] | None,
    command: str,
) -> dict:
    """The report's header: what ran, on what, where; the settings the comparison does not apply (a
    warning each); and the popularity ranking on the same split as a reference row."""
    meta = {
        "dataset": dataset_name(run.dataset_dir),
        "dataset_dir": str(run.dataset_dir),
        "window": dataclasses.asdict(run.window),
        "command": command,
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
        "notes": [],
    }
    meta["reference"] = {"popularity": reference_rows(ready, cfg, run)}
    for note in meta["notes"]:
        get_run_logger().warning(note)
    return meta


class Results:
    """The records of the finished runs, and the failures, as they come in.

    Each is also appended to `runs.partial.jsonl` beside `meta.partial.json` (both written at the
    start), so the report of an interrupted comparison can still be rendered
    (flows/compare_render.py `rebuild_report`); the finished report replaces both."""

    def __init__(self, out_dir: Path, meta: dict):
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "meta.partial.json").write_text(json.dumps(meta, indent=1))
        self.partial = out_dir / "runs.partial.jsonl"
        self.partial.write_text("")
        self.meta = meta
        self.records: list[dict] = []
        self.sweeps: list[dict] = []
        self.failures: list[dict] = []

    def add(self, state, name: str, seed: int) -> None:
        """Keep a finished run's record, or note a failed one (the other runs go on; the report lists it)."""
        if state.is_completed():
            rec = state.result()
            (self.sweeps if "sweep" in rec else self.records).append(rec)
        else:
            try:
                state.result()
                err = f"state {state.type}"
            except BaseException as exc:  # the task's exception, re-raised by result()
                if isinstance(exc, KeyboardInterrupt):
                    raise
                err = f"{type(exc).__name__}: {exc}"
            rec = {"failed": name, "seed": seed, "error": err[:500]}
            self.failures.append(rec)
            get_run_logger().error("%s seed %d failed: %s", name, seed, err)
        with self.partial.open("a") as fh:
            fh.write(json.dumps(rec, default=float) + "\n")

    def final(self) -> tuple[list[dict], list[dict], dict]:
        """(records, sweep records, meta with the failures) for the report; RuntimeError when every
        run failed (there is nothing to report)."""
        if not self.records:
            raise RuntimeError(f"every run failed: {self.failures}")
        return self.records, self.sweeps, {**self.meta, "failures": self.failures}


def sweep_configs(sweep_names: list[str], cfg: CSMFConfig) -> Iterator[tuple[str, float, CSMFConfig]]:
    """(sweep, value, config with that value) for every point of the retrained sweeps (tau, eta); the
    weights sweep needs no retraining (it runs inside the seed-0 csmf fit)."""
    for sweep in sweep_names:
        if sweep == "weights":
            continue
        key, grid = SWEEPS[sweep]
        for value in grid:
            yield sweep, value, build_config(reporting.plain(cfg.to_dict()), [f"{key}={value}"])


def _command(data, date, methods, seeds, config, overrides, sweeps) -> str:
    parts = ["csmf compare", f"--data {data}", f"--methods {methods}", f"--seeds {seeds}"]
    parts += [f"--date {date}"] if date else []
    parts += [f"--config {config}"] if config else []
    parts += [f"--set {o}" for o in overrides or []]
    parts += [f"--sweeps {sweeps}"] if sweeps else []
    return " ".join(parts)


# ---- tasks -----------------------------------------------------------------------------------------
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


def _fit(method: str, seed: int, ready: Ingested, cfg: CSMFConfig, run: RunContext, **kwargs):
    """`fit_method` as a task run named after the run ("csmf-seed0", "csmf-tau=0.5"); its final state."""
    sweep = kwargs.get("sweep")
    name = f"{method}-{sweep[0]}={sweep[1]}" if sweep else f"{method}-seed{seed}"
    return fit_method.with_options(task_run_name=name)(
        method, seed, ready, cfg, run, return_state=True, **kwargs
    )


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
    data_val, data = protocol_data(ready.model_ready, cfg)
    data.eval = data.eval.head(cfg.eval.max_users)
    tags = {"method": method, "seed": seed} | ({"sweep": sweep[0], "sweep_value": sweep[1]} if sweep else {})
    name = f"{method}/seed{seed}" if not sweep else f"{method}/{sweep[0]}={sweep[1]}"
    with child_run(run, name, tags, method=method, kind="compare-run") as tracker:
        tracker.log_params({**cfg.flat(), "method": method, "seed": seed})
        curve = reporting.LossCurve(tracker, logger, name, every=LOG_EVERY)
        protocol = {}
        with deterministic_kernels(cfg.train.deterministic):  # every method, not only csmf's train_stage
            if data_val is not None:  # select on the validation days, refit on the whole window
                result, protocol = fit_with_protocol(method, data_val, data, cfg, seed, curve)
            elif method == "csmf":
                result = train_csmf(data, cfg, seed, curve).result
            else:
                result = METHODS[method](data, cfg, seed, on_step=curve)
        curve.flush()
        fused = protocol.get("weights") or fixed_weights(cfg, data.objectives)
        weights = dict(zip(data.objectives, fused))
        if protocol:
            tracker.log_metrics(
                {
                    "val/score": protocol["val_score"],
                    "train/selection_seconds": protocol["seconds"]["selection"],
                }
            )
            tracker.set_tags(
                {"csmf.epochs": json.dumps(protocol["epochs"]), "csmf.fused_weights": list(fused)}
            )
        rows, serving = _score(result, data, weights, cfg)
        tracker.log_metrics(_metrics(rows, serving, result))
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
        if protocol:
            record["protocol"] = {
                "epochs": protocol["epochs"],
                "weights": list(fused),
                "val_score": protocol["val_score"],
            }
        if weight_sweep:
            record["weight_sweep"] = _weight_sweep(result, data, weights, cfg.eval.primary_k)
            tracker.log_table(record["weight_sweep"], "sweeps/weights.json")
        k = cfg.eval.primary_k
        primary = {f"{r['objective']}/{r['scorer']}": round(r["recall"], 4) for r in rows if r["k"] == k}
        logger.info("%s done in %.1fs: recall@%d %s", name, result.train_seconds, k, primary)
    return record


def _score(
    result: MethodResult, data: CascadeData, weights: dict[str, float], cfg: CSMFConfig
) -> tuple[list[dict], dict]:
    """(metric rows: every objective the method serves under its own score and the fused one, serving
    costs: bytes per item, index size, fused-query latency)."""
    ks = tuple(cfg.eval.ks)
    rows = [{**r, "scorer": r["objective"]} for r in evaluate_result(result, data, ks)]
    relevant = {o: data.eval.pos[t] for t, o in enumerate(data.objectives) if o in result.user_vecs}
    rows += fused_rows(result, relevant, weights, ks)
    return rows, serving_costs(result, weights, k=cfg.eval.primary_k, min_items=LATENCY_ITEMS)


def _metrics(rows: list[dict], serving: dict, result: MethodResult) -> dict[str, float]:
    """The child run's metrics: test/<objective>/[fused/]{recall,ndcg}@K (NaN left out), serving/...,
    train/seconds, model/n_params."""
    metrics = {
        f"test/{r['objective']}/{'' if r['scorer'] == r['objective'] else 'fused/'}{m}@{r['k']}": r[m]
        for r in rows
        for m in ("recall", "ndcg")
        if r[m] == r[m]
    }
    metrics |= {f"serving/{k}": float(v) for k, v in serving.items()}
    return metrics | {"train/seconds": result.train_seconds, "model/n_params": result.n_params}


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
    for stale in PARTIAL_FILES:  # the complete report replaces them
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
