"""The daily CSMF pipeline: one Prefect flow run per evaluation date, tracked in MLflow.

How to run:

    .venv/bin/python -m flows.pipeline                    # generated data, last date, home ./.csmf
    from flows.pipeline import csmf_daily
    csmf_daily(date="2026-01-08", data="data/synth-small", overrides=["train.epochs=[1,1,1]"])

The flow body reads like the design card (the middle is `csmf_core.cascade.plan`, so N objectives work):

    ingest -> pretrain_exposure -> cpp_prune_exposure -> recover_exposure -> finetune_click
    -> cpp_prune_click -> recover_click -> finetune_conversion -> build_index -> evaluate -> register
    -> gate (champion or not, flows/gate.py) -> retention -> publish

Tasks pass paths, ids and small metadata, never tensors. Every output goes to the run's own work dir
`<home>/runs/<date>/<flow-run-id>/` (`<step>/checkpoint`, `model_ready`, `bundle`, `quarantine`).
Only a run that got through evaluate registers a model, so a failed run (bad data, a diverged loss)
never replaces a good one; a registered model becomes champion only through the gate. One run per
date at a time (flows/lock.py); completed stages of an earlier run with identical inputs are
resumed (flows/resume.py). MLflow layout: flows/reporting.py; operations: docs/operations.md.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from csmf_core.cascade import Step, build_model, load_cascade_data, plan, run_step
from csmf_core.checkpoint import load_checkpoint, save_checkpoint
from csmf_core.config import CSMFConfig, check_objectives, load_config
from csmf_core.distributed import run_step_distributed
from csmf_core.evaluate import Ranked, evaluate_model, gaps_table, metric_dict, popularity_gaps
from csmf_core.prep import prepare
from csmf_core.serving import metrics_table, summary_table, write_bundle
from data_contracts import list_partitions, load_spec, validate_dataset
from flows import doctor, reporting
from flows import gate as gating
from flows.inputs import EXPERIMENT, Window, code_version, dataset_digest, plan_window, setup_home
from flows.lock import date_lock
from flows.registry import (
    CHALLENGER,
    REGISTERED_MODEL,
    RUN_TAG,
    champion,
    find_version,
    log_and_register,
    model_digest,
    promote,
    resolve_bundle,
)
from flows.resume import StageCache, training_digest
from flows.retention import apply_retention
from flows.tracking import MlflowTracker, ensure_experiment, metric_key

LOG_EVERY = 50  # training steps between progress lines (and MLflow loss flushes)
_NOT_TRANSIENT = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
_TRANSIENT_MLFLOW = {
    "INTERNAL_ERROR",
    "TEMPORARILY_UNAVAILABLE",
    "REQUEST_LIMIT_EXCEEDED",
    "DEADLINE_EXCEEDED",
}


@dataclass(frozen=True)
class RunContext:
    """Where one flow run writes and logs (passed to every task)."""

    workdir: Path
    dataset_dir: Path
    window: Window
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    data_digest: str
    home: Path | None = None
    cache: StageCache | None = None  # completed stages of earlier runs with identical inputs

    def parent(self) -> MlflowTracker:
        return MlflowTracker.attach(self.parent_run_id, self.tracking_uri)


@dataclass(frozen=True)
class Ingested:
    """The validated, model-ready data of a run. source: the canonical dataset prep read."""

    model_ready: Path
    source: Path
    objectives: list[str]


def _transient(task_: Any, task_run: Any, state: Any) -> bool:
    """Retry I/O hiccups (OSError other than a missing path, a busy tracking store), never bad data."""
    from mlflow.exceptions import MlflowException

    exc = state.data if isinstance(state.data, BaseException) else None
    if isinstance(exc, MlflowException):
        return exc.error_code in _TRANSIENT_MLFLOW
    return isinstance(exc, OSError) and not isinstance(exc, _NOT_TRANSIENT)


@contextmanager
def _child(run: RunContext, name: str, **tags: Any) -> Iterator[MlflowTracker]:
    """A child MLflow run named `name`, FINISHED on success and FAILED (tag csmf.failure_reason) on any
    exception; the exception is re-raised unchanged even when the tracking store refuses the update."""
    tracker = run.parent().child(name, tags={"csmf.step": name, **{f"csmf.{k}": v for k, v in tags.items()}})
    try:
        yield tracker
    except BaseException as exc:
        tracker.fail(exc)
        raise
    tracker.finish("FINISHED")


def _device(cfg: CSMFConfig) -> str:
    want = cfg.train.device
    return "cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu"


# ---- the flow --------------------------------------------------------------------------------------
@flow(name="csmf-daily")
def csmf_daily(
    date: str | None = None,
    data: str | None = None,
    config: str | None = None,
    overrides: list[str] | None = None,
    home: str | None = None,
    max_violation_rate: float = 0.0,
    train_days: int | None = None,
) -> dict:
    """Train, evaluate and register the CSMF model for evaluation day `date` (default: the last one).

    data: canonical dataset dir (default: generated `small` data under <home>/data); config: YAML
    file; overrides: ["train.lr=1e-3", ...]; home: state dir (default $CSMF_HOME or ./.csmf);
    max_violation_rate: share of rows per row-level rule that is quarantined instead of failing;
    train_days: training window length in days before `date` (= override data.train_days; 0 = all).
    Returns mlflow_run_id, tracking_uri, experiment, model_version, bundle_dir, metrics, metrics_table,
    gate (promoted, reason, champion_version) and resumed_stages.

    Production semantics (docs/operations.md): one run per date at a time (file lock), stages
    resumed from earlier runs with identical inputs, the gate decides on the champion, retention
    trims old local run dirs.
    """
    env = setup_home(home)
    if train_days is not None:
        overrides = [*(overrides or []), f"data.train_days={int(train_days)}"]
    cfg = load_config(config, overrides)
    dataset = Path(data).resolve() if data else generate_data(env.root)
    window = plan_window(dataset, date, cfg.data)  # missing partitions fail here, before any work
    doctor.before_run(env.root, env.tracking_uri)  # what killed csmf processes left (flows/doctor.py)
    with date_lock(env.root, window.date, who=f"prefect flow run {flow_run.id or 'local'}"):
        run = open_run(env.root, env.tracking_uri, env.artifacts, cfg, dataset, window)
        try:
            ready = ingest(run, cfg, max_violation_rate)
            checkpoint: Path | None = None
            for index, step in enumerate(plan(ready.objectives, cfg)):
                checkpoint = cascade_step.with_options(task_run_name=step.name)(
                    step, index, checkpoint, ready, cfg, run
                )
            bundle = build_index(checkpoint, ready, cfg, run)
            rows = evaluate(checkpoint, ready, cfg, run)
            version = register(bundle, rows, cfg, run)
            decision = gate(bundle, version, ready, cfg, run)
        except BaseException as exc:
            run.parent().fail(exc)
            raise
        finally:
            _LOADED.clear()
        run.parent().finish("FINISHED")
        retain(run, cfg)
        return publish(run, rows, version, bundle, decision)


# ---- model-ready data, loaded once per flow run -------------------------------------------------
class _LoadedData:
    """The latest `load_cascade_data` result of this process, reused by the next task of the run.

    Tasks still pass paths, not tensors: each task asks for the model-ready directory and gets the
    loaded tables from here when the previous task of the same run loaded them (one load per run
    instead of one per cascade step; measured 0.4-1.2 s each on the `small` world). Keyed by the
    directory, its meta.json modification time and the loader settings; a shallow copy is handed
    out so a task's `tables.to(device)` does not change what the next task gets. The flow clears it
    when it ends. In a process that runs several flows at once the key keeps them apart (one entry:
    they then reload, never share wrong data).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entry: tuple[tuple, Any] | None = None

    def get(self, model_ready: Path, cfg: CSMFConfig, *, load_train: bool):
        path = Path(model_ready).resolve()
        key = (
            str(path),
            (path / "meta.json").stat().st_mtime_ns,
            cfg.train.loader,
            cfg.train.shuffle_window,
            cfg.data.val_days,
            cfg.data.item_stats,
        )
        with self._lock:
            if self._entry is not None:
                (k, has_train), data = self._entry
                if k == key and (has_train or not load_train):  # train rows loaded: serves either request
                    return dataclasses.replace(data)
            self._entry = None  # free the previous entry before loading the next
            data = load_cascade_data(
                path,
                load_train=load_train,
                loader=cfg.train.loader,
                shuffle_window=cfg.train.shuffle_window,
                val_days=cfg.data.val_days if load_train else 0,
                item_stats_windows=cfg.data.item_stats,
            )
            self._entry = ((key, load_train), data)
            return dataclasses.replace(data)

    def clear(self) -> None:
        with self._lock:
            self._entry = None


_LOADED = _LoadedData()


# ---- tasks -----------------------------------------------------------------------------------------
@task(name="generate-data", cache_policy=NO_CACHE)
def generate_data(home: Path) -> Path:
    """The `small` synthetic dataset under <home>/data/synth-small (generated once)."""
    from csmf_core.synth import generate

    out = home / "data" / "synth-small"
    if not (out / "dataset.yaml").is_file():
        get_run_logger().info("no --data given: generating the small synthetic dataset into %s", out)
        generate(out, "small", seed=0, overwrite=True)
    return out


@task(name="open-run", cache_policy=NO_CACHE)
def open_run(
    home: Path, tracking_uri: str, artifacts: Path, cfg: CSMFConfig, dataset: Path, window: Window
) -> RunContext:
    """Create the work dir and the MLflow parent run (experiment created once, before any fan-out)."""
    key = flow_run.id or dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
    workdir = home / "runs" / window.date / str(key)
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
        "csmf.training_digest": training_digest(cfg),
        "csmf.code_version": code_version(),
        "csmf.workdir": str(workdir),
        "prefect.flow_run_id": str(flow_run.id),
        "prefect.flow_run_name": str(flow_run.name),
        **doctor.owner_tags(),  # who runs it: `csmf doctor` marks it FAILED if this process dies
    }
    parent = MlflowTracker.start(
        experiment_id, f"csmf-daily-{window.date}", tags=tags, tracking_uri=tracking_uri
    )
    try:  # the flow's own FAILED handling starts once this task has returned the run
        parent.log_params(
            {**cfg.flat(), "run.train_dates": window.train_dates, "run.eval_dates": window.eval_dates}
        )
        (workdir / "config.yaml").write_text(yaml.safe_dump(reporting.plain(cfg.to_dict()), sort_keys=False))
        parent.log_artifact(workdir / "config.yaml", "config")
        cache = StageCache.for_run(home, digest, training_digest(cfg), code_version(), window)
    except BaseException as exc:  # an unwritable artifact store, a full disk
        parent.fail(exc)
        raise
    return RunContext(
        workdir, dataset, window, tracking_uri, experiment_id, parent.run_id, digest, home, cache
    )


@task(name="ingest", retries=2, retry_delay_seconds=5, retry_condition_fn=_transient, cache_policy=NO_CACHE)
def ingest(run: RunContext, cfg: CSMFConfig, max_violation_rate: float = 0.0) -> Ingested:
    """Validate the dataset (data contract), quarantine within the allowed rate, build model-ready data."""
    logger = get_run_logger()
    hit = run.cache.lookup("ingest", -1) if run.cache is not None else None
    if hit is not None:
        return _resume_ingest(run, hit)
    with _child(run, "ingest", kind="ingest") as tracker:
        qdir = run.workdir / "quarantine"
        report = validate_dataset(
            run.dataset_dir,
            dates=run.window.validate_dates,
            max_violation_rate=max_violation_rate,
            quarantine_dir=qdir if max_violation_rate > 0 else None,
            eval_dates=run.window.eval_dates,
        )
        reporting.log_validation(tracker, report)
        create_markdown_artifact(
            report.to_markdown(), key="csmf-validation", description=report.summary_line()
        )
        logger.info(report.summary_line())
        report.raise_if_errors()
        objectives = list(load_spec(run.dataset_dir).objective_names)
        check_objectives(cfg, objectives)  # dataset-dependent settings, before prep and training
        source = run.dataset_dir
        if report.quarantined:
            source = reporting.clean_copy(run.dataset_dir, run.window.validate_dates, run.workdir / "clean")
            logger.info("quarantined %s; training on the clean copy %s", report.quarantined, source)
        summary = prepare(
            source,
            run.workdir / "model_ready",
            train_dates=run.window.train_dates,
            eval_dates=run.window.eval_dates,
            seq_len=cfg.data.seq_len,
            n_req_neg=cfg.data.n_req_neg,
            overwrite=True,
        )
        reporting.log_prep(tracker, summary)
    if run.cache is not None:
        outputs = {"model_ready": summary.out_dir} | ({"clean": source} if report.quarantined else {})
        run.cache.record(
            "ingest", -1, outputs, source_run=run.parent_run_id, extra={"objectives": objectives}
        )
    return Ingested(summary.out_dir, source, objectives)


def _resume_ingest(run: RunContext, hit: dict) -> Ingested:
    """Ingest of an earlier run with the same dataset digest, config and window: copy its outputs."""
    out = hit["outputs"]
    with _child(run, "ingest", kind="ingest", resumed_from=hit["source_run"]):
        ready = StageCache.restore(out["model_ready"], run.workdir / "model_ready")
        source = (
            StageCache.restore(out["clean"], run.workdir / "clean") if "clean" in out else run.dataset_dir
        )
        run.parent().set_tags({"csmf.resumed.ingest": hit["source_run"]})
        create_markdown_artifact(
            f"Validation and prep resumed from MLflow run {hit['source_run']} (identical dataset digest "
            f"{run.data_digest}, config and window).",
            key="csmf-validation",
            description="resumed",
        )
    get_run_logger().info("ingest: resumed from MLflow run %s (%s)", hit["source_run"], out["model_ready"])
    return Ingested(ready, source, list(hit["objectives"]))


@task(name="cascade-step", cache_policy=NO_CACHE)
def cascade_step(
    step: Step, index: int, previous: Path | None, ready: Ingested, cfg: CSMFConfig, run: RunContext
) -> Path:
    """Run one step of the cascade from the previous checkpoint; returns `<workdir>/<step>/checkpoint`."""
    logger = get_run_logger()
    resumed = _resume_step(step, index, ready, run)
    if resumed is not None:
        return resumed
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = _device(cfg)
    # train.processes > 1: the torchrun ranks read the rows themselves
    data = _LOADED.get(ready.model_ready, cfg, load_train=cfg.train.processes == 1)
    data.tables = data.tables.to(device)
    if previous is None:
        model, owners = build_model(data, cfg)
        model.to(device)
    else:
        model, owners, _ = load_checkpoint(previous, device=device)
    with _child(
        run,
        step.name,
        kind=step.kind,
        stage=step.stage,
        stage_name=ready.objectives[step.stage],
        step_index=index,
    ) as tracker:
        tracker.log_params(
            {
                **cfg.flat(),
                "step.name": step.name,
                "step.kind": step.kind,
                "step.stage": step.stage,
                "step.index": index,
            }
        )
        curve = reporting.LossCurve(tracker, logger, step.name, every=LOG_EVERY)
        if cfg.train.processes > 1 and step.kind != "prune":  # DDP under torchrun; rank 0 reports back
            owners, report = run_step_distributed(
                step, model, owners, ready.model_ready, cfg, run.workdir / step.name / "ddp",
                on_step=curve, log=logger.info,
            )  # fmt: skip
        else:
            owners, report = run_step(step, model, owners, data, cfg, on_step=curve)
        curve.flush()
        meta = {
            "step": step.name,
            "kind": step.kind,
            "stage": step.stage,
            "index": index,
            "info": report.info,
        }
        out = save_checkpoint(run.workdir / step.name / "checkpoint", model, owners, meta=meta)
        tracker.log_artifact(out, "checkpoint")
        if step.kind == "prune" or previous is None:  # ownership changed (or its initial state)
            tracker.log_artifact(out / "masks", "masks")
        if step.kind == "prune":
            reporting.log_pruning(tracker, report.info, list(owners.stages), step.name)
        else:
            tracker.log_metrics({f"train/{k}": v for k, v in report.info.items()})
        rows = evaluate_model(
            model,
            owners.output_owners(),
            data.catalog_tables("eval"),
            data.eval.head(cfg.eval.max_users),
            data.objectives,
            ks=cfg.eval.ks,
            objectives_upto=step.stage,
            scorers="own",
        )
        val = metric_dict(rows, prefix="val")
        tracker.log_metrics(val)
        run.parent().log_metrics(val, step=index)
        primary = {k: round(v, 4) for k, v in val.items() if k.endswith(f"recall@{cfg.eval.primary_k}")}
        logger.info("%s done: %s", step.name, primary)
        if "val_best_epoch" in report.info:  # data.val_days > 0 (csmf_core/validation.py)
            k = cfg.eval.primary_k
            logger.info(
                "%s: kept epoch %d of %d (validation recall@%d: start %.4f, best %.4f, last %.4f)",
                step.name,
                int(report.info["val_best_epoch"]),
                report.info.get("epochs", -1),
                k,
                report.info[f"val_start_recall@{k}"],
                report.info[f"val_best_recall@{k}"],
                report.info[f"val_last_recall@{k}"],
            )
    if run.cache is not None:
        run.cache.record(step.name, index, {"checkpoint": out}, metrics=val, source_run=run.parent_run_id)
    return out


def _resume_step(step: Step, index: int, ready: Ingested, run: RunContext) -> Path | None:
    """The step's checkpoint from an earlier run with identical inputs (flows/resume.py), or None.

    The child run is still created (tag csmf.resumed_from) with the step's validation metrics, so
    the MLflow compare view and the parent's per-step history stay complete."""
    hit = run.cache.lookup(step.name, index) if run.cache is not None else None
    if hit is None:
        return None
    with _child(
        run,
        step.name,
        kind=step.kind,
        stage=step.stage,
        stage_name=ready.objectives[step.stage],
        step_index=index,
        resumed_from=hit["source_run"],
    ) as tracker:
        out = StageCache.restore(hit["outputs"]["checkpoint"], run.workdir / step.name / "checkpoint")
        tracker.log_metrics(hit["metrics"])
        run.parent().log_metrics(hit["metrics"], step=index)
        run.parent().set_tags({f"csmf.resumed.{step.name}": hit["source_run"]})
    get_run_logger().info("%s: resumed from MLflow run %s", step.name, hit["source_run"])
    return out


@task(name="build-index", cache_policy=NO_CACHE)
def build_index(checkpoint: Path, ready: Ingested, cfg: CSMFConfig, run: RunContext) -> Path:
    """The serving bundle (checkpoint, FAISS index + id map, user state) in `<workdir>/bundle`."""
    with _child(run, "build_index", kind="build_index") as tracker:
        bundle = write_bundle(
            run.workdir / "bundle",
            checkpoint_dir=checkpoint,
            model_ready_dir=ready.model_ready,
            dataset_dir=ready.source,
            config=cfg,
            index_kind="flat",
            data_digest=run.data_digest,
            extra={"mlflow_parent_run_id": run.parent_run_id, "date": run.window.date},
            overwrite=True,
        )
        tracker.log_artifact(bundle / "index", "index")
        tracker.log_artifact(bundle / "bundle.json", "bundle")
        info = reporting.read_json(bundle / "bundle.json")
        tracker.log_metrics({"index/n_items": info["n_items"], "index/n_users": info["n_users"]})
    return bundle


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(checkpoint: Path, ready: Ingested, cfg: CSMFConfig, run: RunContext) -> list[dict]:
    """Every scorer (own modes, fused, popularity, random) on the evaluation day(s)."""
    with _child(run, "evaluate", kind="evaluate") as tracker:
        model, owners, _ = load_checkpoint(checkpoint, device=_device(cfg))
        data = _LOADED.get(ready.model_ready, cfg, load_train=False)
        data.tables = data.tables.to(_device(cfg))
        ev, out = data.eval.head(cfg.eval.max_users), owners.output_owners()
        tables = data.catalog_tables("eval")  # with item statistics: as of the first evaluation day
        ranked = Ranked(model, out, tables, ev)  # encoded and ranked once for metrics and gaps
        rows = evaluate_model(
            model,
            out,
            tables,
            ev,
            data.objectives,
            ks=cfg.eval.ks,
            scorers="all",
            fused_weights=cfg.eval.fused_weights,
            popularity=data.counts,
            random_seed=0,
            ranked=ranked,
        )
        steps = plan(data.objectives, cfg)
        prunes = {s.name: run.workdir / s.name / "checkpoint" for s in steps if s.kind == "prune"}
        for target in (tracker, run.parent()):
            reporting.log_evaluation(target, rows, prunes, data.objectives)
        # is the model better than popularity on these users? paired bootstrap over users
        k = cfg.eval.primary_k
        gaps = popularity_gaps(
            model,
            out,
            tables,
            ev,
            data.objectives,
            data.counts,
            cfg.eval.fused_weights,
            k,
            ranked=ranked,
        )
        gap_metrics = {}
        for g in gaps:
            key = f"test/{g['objective']}/{'fused/' if g['scorer'] == 'fused' else ''}vs_popularity/{g['metric']}@{g['k']}"
            gap_metrics |= {key: g["diff"], f"{key}/lo": g["lo"], f"{key}/hi": g["hi"]}
        for target in (tracker, run.parent()):
            target.log_metrics(gap_metrics)
        tracker.log_text(gaps_table(gaps) + "\n", "metrics/vs_popularity.md")
    logger = get_run_logger()
    logger.info("evaluation:\n%s", summary_table(rows, cfg.eval.primary_k))
    logger.info("model minus popularity, paired 95%% bootstrap over users:\n%s", gaps_table(gaps))
    return rows


# version tags that say which inputs and which model a version is (a re-run matching all reuses it)
IDENTITY_TAGS = (
    "csmf.dataset_digest",
    "csmf.training_digest",
    "csmf.code_version",
    "csmf.date",
    "csmf.model_digest",
)


@task(name="register", retries=2, retry_delay_seconds=5, retry_condition_fn=_transient, cache_policy=NO_CACHE)
def register(bundle: Path, rows: list[dict], cfg: CSMFConfig, run: RunContext) -> str:
    """Log the bundle as a pyfunc, register a new version of "csmf", alias it "challenger" (the gate
    task decides on "champion").

    A version with this run's inputs and a bit-identical model (IDENTITY_TAGS; a re-run of a date,
    resumed or retrained deterministically) is reused instead of registering a copy: it becomes the
    challenger again and the parent run's tag `csmf.registered` says "reused vN"."""
    parent = run.parent()
    client = parent.client
    ptags = client.get_run(run.parent_run_id).data.tags
    primary = metric_dict([r for r in rows if r["k"] == cfg.eval.primary_k], prefix="test", own_only=False)
    tags = {
        k: ptags.get(k, "")
        for k in (
            "csmf.date",
            "csmf.dataset",
            "csmf.dataset_digest",
            "csmf.config_digest",
            "csmf.training_digest",
            "csmf.code_version",
            "prefect.flow_run_id",
        )
    }
    train = sorted(run.window.train_dates)
    tags |= {
        RUN_TAG: run.parent_run_id,
        "csmf.workdir": str(run.workdir),
        # the gate compares models only on days after both training windows (flows/gate.py)
        "csmf.train_dates": f"{train[0]}..{train[-1]} ({len(train)} days)",
        "csmf.model_digest": model_digest(bundle / "checkpoint"),
    }
    tags |= {metric_key(k): f"{v:.4f}" for k, v in primary.items() if "/fused/" in k and "recall" in k}
    with _child(run, "register", kind="register") as tracker:
        same = find_version(client, {k: tags[k] for k in IDENTITY_TAGS})
        if same is not None and (same.tags or {}).get(RUN_TAG) != run.parent_run_id:
            client.set_registered_model_alias(REGISTERED_MODEL, CHALLENGER, same.version)
            version = client.get_model_version(REGISTERED_MODEL, same.version)
            how = (
                f"reused v{version.version}: identical inputs and bit-identical model (model digest "
                f"{tags['csmf.model_digest']}), registered by MLflow run {same.tags.get(RUN_TAG)}"
            )
        else:
            version = log_and_register(
                tracker.run_id,
                bundle,
                version_tags=tags,
                description=f"csmf-daily {run.window.date}: dataset {tags['csmf.dataset']} "
                f"({run.data_digest}), config {cfg.digest()}",
            )
            how = "new"
        tracker.set_tags(
            {"csmf.model_version": version.version, "csmf.model_id": version.source, "csmf.registered": how}
        )
    parent.set_tags({"csmf.model_version": version.version, "csmf.registered": how})
    get_run_logger().info(
        "registered csmf version %s (%s; aliases %s)", version.version, how, version.aliases
    )
    return str(version.version)


@task(name="gate", cache_policy=NO_CACHE)
def gate(bundle: Path, version: str, ready: Ingested, cfg: CSMFConfig, run: RunContext) -> dict:
    """Promote this run's version to champion only if flows/gate.py says so; say why either way.

    Challenger and champion are scored with the same function (Recommender.evaluate, ids mapped
    through the original ids) on the same days: this run's evaluation days, or, when the champion
    trained on them or later (a backfill), the newest days after both training windows
    (`_comparison_data`). Days that cannot measure the model promote nothing (flows/gate.py)."""
    from mlflow.exceptions import MlflowException

    from csmf_core.serving import Recommender

    logger = get_run_logger()
    client = run.parent().client
    k = cfg.eval.primary_k
    with _child(run, "gate", kind="gate") as tracker:
        current = champion(client)
        already = current is not None and str(current.version) == version  # a retry, or a reused version
        rec = Recommender.load(bundle)
        steps = plan(ready.objectives, cfg)
        stage_ends = {
            t: run.workdir / [s for s in steps if s.stage == t][-1].name / "checkpoint"
            for t in range(len(ready.objectives) - 1)
        }
        checks = gating.verify_model(rec, bundle / "checkpoint", stage_ends, cfg.gate.sample_users)
        champ, why_not, identical = None, None, False
        if current is not None and not already:
            identical = _same_inputs(current.tags or {}, run, cfg)
            if not identical:
                try:
                    champ = Recommender.load(resolve_bundle(f"models:/csmf/{current.version}", home=run.home))
                except (OSError, ValueError, LookupError, MlflowException) as exc:
                    why_not = f"{type(exc).__name__}: {exc}"
        data, days, note = ready.model_ready, run.window.eval_dates, None
        if champ is not None:
            data, days, note, why_not = _comparison_data(champ, str(current.version), ready, cfg, run)
        new, old, mismatch, users = gating.same_day_metrics(rec, None if why_not else champ, data, k)
        why_not = why_not or mismatch
        if already:
            decision = gating.Decision(
                True, f"v{version} is already champion", checks, new, {}, version, days, users
            )
        else:
            decision = gating.decide(
                checks,
                new,
                old,
                champion_version=None if current is None else str(current.version),
                users=users,
                min_users=cfg.gate.min_users,
                days=days,
                note=note,
                identical_inputs=identical,
                tolerance=cfg.gate.tolerance,
                enabled=cfg.gate.enabled,
                incomparable=why_not,
            )
        if decision.promote and not already:
            promote(version, client)
        tags = {
            "csmf.gate": "promoted" if decision.promote else "kept",
            "csmf.gate_reason": decision.reason[:4000],
        }
        if not (already and "csmf.gate" in (current.tags or {})):  # keep the verdict that promoted it
            for key, value in tags.items():
                client.set_model_version_tag("csmf", version, key, value)
        tracker.set_tags({**tags, "csmf.gate_days": ",".join(decision.days)})
        run.parent().set_tags(tags)
        tracker.log_metrics({f"gate/challenger/{key}": v for key, v in decision.challenger.items()})
        tracker.log_metrics({f"gate/champion/{key}": v for key, v in decision.champion.items()})
        tracker.log_metrics({f"gate/check/{c.name}": float(c.ok) for c in checks})
        tracker.log_metrics({f"gate/users/{o}": float(n) for o, n in decision.users.items()})
        (run.workdir / "gate.md").write_text(decision.to_markdown())
        tracker.log_artifact(run.workdir / "gate.md", "gate")
    create_markdown_artifact(
        decision.to_markdown(),
        key="csmf-gate",
        description=f"v{version}: {decision.verdict()}",
    )
    now = champion(client)
    logger.info("gate: v%s %s. %s", version, tags["csmf.gate"], decision.reason)
    return {
        "promoted": decision.promote,
        "reason": decision.reason,
        "champion_version": None if now is None else str(now.version),
        "checks": {c.name: c.ok for c in checks},
        "days": decision.days,
        "users": decision.users,
    }


def _comparison_data(
    champ, champion_version: str, ready: Ingested, cfg: CSMFConfig, run: RunContext
) -> tuple[Path, list[str], str | None, str | None]:
    """Where to score challenger and champion: (model-ready dir, its evaluation days, note, why the
    champion cannot be compared or None).

    This run's evaluation days when every training day of the champion (its bundle.json) precedes
    them. Otherwise (a backfill, or a champion trained on later data) the newest `data.eval_days`
    days of this run's dataset after both training windows: the partitions this run's ingest did not
    check are validated, then the days are prepared as a regular run for them would prepare them,
    into <workdir>/gate/model_ready. No such days, or days that fail: the champion is kept, and why."""
    own = list(run.window.eval_dates)

    def here(why: str | None) -> tuple[Path, list[str], None, str | None]:
        return ready.model_ready, own, None, why

    trained = champ.info.get("train_dates")
    if not trained:
        return here(
            "its bundle records no training dates, so it cannot be told whether it trained on "
            + ", ".join(own)
        )
    late = gating.trained_too_late(own, trained)
    if late is None:
        return here(None)
    partitions = [p.date.isoformat() for p in list_partitions(run.dataset_dir)[0]]
    days = gating.comparison_dates(partitions, [trained, run.window.train_dates], cfg.data.eval_days)
    if days is None:
        return here(
            f"it {late}, and {run.dataset_dir} has no {cfg.data.eval_days} consecutive day(s) after both "
            f"training windows (newest partition {partitions[-1]}): re-run once a newer day is exported, "
            "or promote by hand"
        )
    try:
        window = plan_window(run.dataset_dir, days[0], cfg.data)
        unchecked = sorted(set(window.validate_dates) - set(run.window.validate_dates))
        report = validate_dataset(run.dataset_dir, dates=unchecked, eval_dates=days) if unchecked else None
        if report is not None and not report.ok:
            return here(
                f"it {late}, and the re-evaluation day(s) {', '.join(days)} fail the data contract: "
                f"{report.summary_line()}"
            )
        summary = prepare(
            run.dataset_dir,
            run.workdir / "gate" / "model_ready",
            train_dates=window.train_dates,
            eval_dates=window.eval_dates,
            seq_len=cfg.data.seq_len,
            n_req_neg=cfg.data.n_req_neg,
            overwrite=True,
        )
    except (ValueError, OSError) as exc:  # bad data or a full disk: keep the champion, say why
        return here(f"it {late}, and preparing {', '.join(days)} failed: {type(exc).__name__}: {exc}")
    note = (
        f"champion v{champion_version} {late}: both models re-evaluated on {', '.join(days)}, "
        "the newest day(s) after both training windows"
    )
    return summary.out_dir, days, note, None


def _same_inputs(tags: dict, run: RunContext, cfg: CSMFConfig) -> bool:
    """Was a version (its registry tags) trained on exactly this run's inputs?"""
    mine = {
        "csmf.dataset_digest": run.data_digest,
        "csmf.code_version": code_version(),
        "csmf.date": run.window.date,
    }
    if "csmf.training_digest" in tags:
        mine["csmf.training_digest"] = training_digest(cfg)
    else:
        mine["csmf.config_digest"] = cfg.digest()
    return all(tags.get(key) == value for key, value in mine.items())


@task(name="retention", cache_policy=NO_CACHE)
def retain(run: RunContext, cfg: CSMFConfig) -> list[str]:
    """Delete local run dirs older than retention.keep_days, never the champion's or this run's."""
    logger = get_run_logger()
    client = run.parent().client
    protect = [run.workdir]
    current = champion(client)
    if current is not None:
        tags = current.tags or {}
        workdir = tags.get("csmf.workdir")
        if not workdir and tags.get(RUN_TAG):
            workdir = client.get_run(tags[RUN_TAG]).data.tags.get("csmf.workdir")
        if workdir:
            protect.append(Path(workdir))
    if run.home is None:
        return []
    try:
        removed = apply_retention(run.home, cfg.retention.keep_days, protect)
    except OSError as exc:  # never fail a finished run over housekeeping
        logger.warning("retention skipped: %s", exc)
        return []
    if removed:
        logger.info(
            "retention (keep_days=%s): removed %s", cfg.retention.keep_days, [str(p) for p in removed]
        )
    return [str(p) for p in removed]


@task(name="publish", cache_policy=NO_CACHE)
def publish(
    run: RunContext, rows: list[dict], version: str, bundle: Path, decision: dict | None = None
) -> dict:
    """Prefect artifacts (metrics table, link to the MLflow run) and the flow's return value."""
    parent = run.parent()
    resumed = sorted(
        k.removeprefix("csmf.resumed.")
        for k in parent.client.get_run(run.parent_run_id).data.tags
        if k.startswith("csmf.resumed.")
    )
    parent.set_tags({"csmf.resumed_stages": ",".join(resumed) or "none"})
    table = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
    create_table_artifact(
        table, key="csmf-metrics", description=f"csmf-daily {run.window.date}, model v{version}"
    )
    url = f"http://127.0.0.1:5000/#/experiments/{run.experiment_id}/runs/{run.parent_run_id}"
    create_link_artifact(
        url,
        link_text="MLflow run",
        key="csmf-mlflow-run",
        description="start the UI with `csmf ui` (mlflow ui on 127.0.0.1:5000)",
    )
    return {
        "mlflow_run_id": run.parent_run_id,
        "tracking_uri": run.tracking_uri,
        "experiment": EXPERIMENT,
        "experiment_id": run.experiment_id,
        "model_version": version,
        "bundle_dir": str(bundle),
        "workdir": str(run.workdir),
        "metrics": rows,
        "metrics_table": metrics_table(rows),
        "gate": decision or {},
        "resumed_stages": resumed,
    }


def _dataset_name(dataset: Path) -> str:
    try:
        return str(yaml.safe_load((dataset / "dataset.yaml").read_text()).get("name") or dataset.name)
    except (OSError, yaml.YAMLError, AttributeError):
        return dataset.name  # validation reports the broken dataset.yaml


if __name__ == "__main__":
    print(csmf_daily()["metrics_table"])
