"""The run room: the bookkeeping every csmf flow run shares, written once for the daily and the compare flow.

    run = open_run(DAILY, root, cfg, dataset, window)             # work dir + MLflow parent run
    with run_lifecycle(run):                                       # FINISHED, or FAILED with the reason
        with child_run(run, "ingest", kind="ingest") as tracker:   # one child run per step
            tracker.log_metrics({...})
        data = loaded_data(ready.model_ready, cfg, load_train=True)  # loaded once per flow run

What is here and why in one place:

* `RunKind` (`DAILY`, `COMPARE`): the only things that differ between the two flows' runs (MLflow
  experiment, parent-run name, work-dir folder, whether completed stages are resumed).
* `open_run` (a task) creates the work dir `<home>/<folder>/<date>/<flow-run-id>/` and the parent
  run with the tags of flows/names.py; `run_lifecycle` ends that run FINISHED when the flow's block
  completes and FAILED (tag csmf.failure_reason) on any exception, which is re-raised.
* `child_run`: the same end (`ended`) for one step's child run. The tracking store refusing the
  FAILED update never hides the step's own exception (flows/tracking.py `fail`).
* `dataset_name`: the label of a dataset before validation has read it (runs and reports are named
  after it before `ingest` runs).
* `transient`: the retry condition of the tasks that do I/O (ingest, register).
* `LOADED` / `loaded_data`: the model-ready data of the run, loaded once per process and handed from
  task to task (tasks still pass paths).

MLflow's active run is thread-local and Prefect runs tasks in threads, so tasks never use it: they
reach the parent run through `RunContext.parent()` (an `MlflowTracker` bound to its id).
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

import mlflow
import torch
import yaml
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE  # a run's description in the MLflow UI
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from csmf_core.cascade import CascadeData, load_cascade_data
from csmf_core.config import ConfigError, CSMFConfig
from data_contracts import read_name
from flows import doctor, reporting
from flows.env import tracking_uri
from flows.figures import BackgroundFigures
from flows.inputs import Window, code_version, dataset_digest
from flows.names import (
    CODE_VERSION_TAG,
    COMPARE_EXPERIMENT,
    CONFIG_DIGEST_TAG,
    DAILY_EXPERIMENT,
    DATASET_DIGEST_KIND_TAG,
    DATASET_DIGEST_TAG,
    DATASET_DIR_TAG,
    DATASET_TAG,
    DATE_TAG,
    FLOW_RUN_ID_TAG,
    FLOW_RUN_NAME_TAG,
    KIND_TAG,
    STEP_TAG,
    TRAINING_DIGEST_TAG,
    WORKDIR_TAG,
)
from flows.resume import StageCache, training_digest
from flows.tracking import MlflowTracker, ensure_experiment, seed_mlflow_database

_NOT_TRANSIENT = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
_TRANSIENT_MLFLOW = {
    "INTERNAL_ERROR",
    "TEMPORARILY_UNAVAILABLE",
    "REQUEST_LIMIT_EXCEEDED",
    "DEADLINE_EXCEEDED",
}


@dataclass(frozen=True)
class RunKind:
    """What differs between the runs of the daily and the comparison flow."""

    name: str  # parent run `<name>-<date>`
    experiment: str
    folder: str  # work dirs <home>/<folder>/<date>/<flow-run-id>
    resumable: bool  # completed stages of earlier runs with identical inputs are reused (flows/resume.py)
    kind_tag: str = ""  # csmf.kind of the parent run, when set
    source: str = ""  # MLflow's "Source" of every run of the flow (tag mlflow.source.name)
    purpose: str = ""  # the first sentence of the parent run's description


DAILY = RunKind(
    "csmf-daily",
    DAILY_EXPERIMENT,
    "runs",
    resumable=True,
    source="csmf-daily (Prefect flow, flows/pipeline.py)",
    purpose="Daily CSMF run: trains the cascade stage by stage, evaluates it, registers it as a version "
    "of `csmf` and lets the gate decide on the champion.",
)
COMPARE = RunKind(
    "csmf-compare",
    COMPARE_EXPERIMENT,
    "compare",
    resumable=False,
    kind_tag="compare",
    source="csmf-compare (Prefect flow, flows/compare.py)",
    purpose="Comparison of CSMF with the baselines and ablations under one protocol (a child run per "
    "method and seed).",
)

# The description (MLflow note) of a step's child run, by its csmf.kind; {stage_name} and {method} come
# from the child run's tags.
STEP_NOTES = {
    "ingest": "Checks the data contract of the run's partitions (report: validation/report.md), "
    "quarantines rows if allowed, and prepares the model-ready data (model_ready/meta.json).",
    "select": "Selection pass on the held-out validation days: the epochs each train step keeps and, "
    "with eval.fused_weights auto, the fused weights; the cascade then refits on the whole window.",
    "choose_weights": "Chooses the default fused weights on the validation users (eval.fused_weights auto).",
    "train": "Trains stage {stage_name} (its own units; earlier stages' units frozen): loss curve, "
    "checkpoint, and every objective so far measured on the evaluation day(s) (test/by_step/...).",
    "prune": "CPP pruning after stage {stage_name}: frees the low-information units of each layer for the "
    "next stage (prune/layers.md, figures/ownership.png).",
    "recover": "Recovers stage {stage_name} after pruning, on its own remaining units.",
    "build_index": "Builds the serving bundle: the FAISS index of the full-mode item vectors, the id map "
    "and the users' behaviour state.",
    "evaluate": "Evaluates the final model on the evaluation day(s) under every scorer (own modes, fused, "
    "popularity, random) and against popularity with paired bootstrap intervals.",
    "register": "Logs the bundle as the pyfunc `model` and registers it as a version of `csmf` "
    "(alias challenger), with its model card as description.",
    "gate": "Champion gate: verifies the model and compares it with the champion on the same days; "
    "promotes it or keeps the champion, and says why (gate/gate.md).",
    "compare-run": "One method ({method}) and seed of the comparison: its training and scores.",
    "compare-tune": "Tuning trials of {method} on the validation days (compare --tune-trials).",
}


def source_tags(source: str) -> dict[str, str]:
    """MLflow's Source and User columns of a run: the flow that created it, the OS user running it."""
    import getpass

    from mlflow.utils.mlflow_tags import MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE, MLFLOW_USER

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a bare container)
        user = "unknown"
    return {MLFLOW_SOURCE_NAME: source, MLFLOW_SOURCE_TYPE: "JOB", MLFLOW_USER: user}


def run_description(kind: RunKind, dataset: str, window: Window, flow_run_name: str) -> str:
    """The parent run's description (MLflow note, markdown): what the run is and what it read."""
    train = sorted(window.train_dates)
    span = f"{train[0]} .. {train[-1]} ({len(train)} days)" if train else "none"
    return "\n".join(
        [
            kind.purpose,
            "",
            f"- dataset: `{dataset}`",
            f"- training window: {span}",
            f"- evaluation day(s): {', '.join(window.eval_dates)}",
            f"- Prefect flow run: `{flow_run_name}`",
            "",
            "Inputs (Datasets used): the training window and the evaluation days, each with the digest "
            "of the files read. One child run per step, in order; the metrics table is "
            "metrics/test_metrics.md, the cascade at a glance figures/cascade.png and metrics/by_step.md.",
        ]
    )


def step_note(kind: str, tags: dict[str, Any]) -> str:
    """The description of a step's child run (STEP_NOTES), or "" for an unknown kind."""
    text = STEP_NOTES.get(kind, "")
    try:
        return text.format(**{k: v for k, v in tags.items()})
    except (KeyError, IndexError):
        return text


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
    source: str = ""  # tag mlflow.source.name of its runs (RunKind.source)
    # figures queued for a child process to draw and the run to log at its end (flows/figures.py);
    # None: each figure is drawn and logged where it is made
    figures: BackgroundFigures | None = None

    def parent(self) -> MlflowTracker:
        return MlflowTracker.attach(self.parent_run_id, self.tracking_uri, self.experiment_id)


def dataset_name(dataset: Path) -> str:
    """The dataset's `name` from dataset.yaml, or its directory's name when the file cannot say (a
    broken dataset.yaml gets a label here; validation reports the problem itself)."""
    return read_name(dataset) or dataset.name


def transient(task_: Any, task_run: Any, state: Any) -> bool:
    """Retry I/O hiccups (OSError other than a missing path, a busy tracking store), never bad data."""
    from mlflow.exceptions import MlflowException

    exc = state.data if isinstance(state.data, BaseException) else None
    if isinstance(exc, MlflowException):
        return exc.error_code in _TRANSIENT_MLFLOW
    return isinstance(exc, OSError) and not isinstance(exc, _NOT_TRANSIENT)


# ---- the parent run ----------------------------------------------------------------------------------
@task(name="open-run", task_run_name="open_run", cache_policy=NO_CACHE)
def open_run(
    kind: RunKind,
    home: Path,
    cfg: CSMFConfig,
    dataset: Path,
    window: Window,
    params: dict[str, Any] | None = None,
) -> RunContext:
    """Create the work dir and the MLflow parent run (experiment created once, before any fan-out).

    The parent run gets the tags of flows/names.py, the flattened config plus `params` and the run's
    dates as parameters, and the config as `config/config.yaml`. A failure after the run exists (an
    unwritable artifact store, a full disk) ends it FAILED here: the caller only gets a run to end
    once this task has returned it."""
    key = flow_run.id or dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
    workdir = home / kind.folder / window.date / str(key)
    workdir.mkdir(parents=True, exist_ok=True)
    digest, digest_kind = dataset_digest(dataset, window.validate_dates)
    uri = tracking_uri()
    seed_mlflow_database(uri)  # a new home's store starts migrated (flows/tracking.py)
    mlflow.set_tracking_uri(uri)  # the registry's calls (log_model, register_model) use the global store
    experiment_id = ensure_experiment(kind.experiment, home / "mlartifacts", uri)
    tags = {
        DATE_TAG: window.date,
        DATASET_TAG: dataset_name(dataset),
        DATASET_DIR_TAG: str(dataset),
        DATASET_DIGEST_TAG: digest,
        DATASET_DIGEST_KIND_TAG: digest_kind,
        CONFIG_DIGEST_TAG: cfg.digest(),
        TRAINING_DIGEST_TAG: training_digest(cfg),
        CODE_VERSION_TAG: code_version(),
        WORKDIR_TAG: str(workdir),
        **({KIND_TAG: kind.kind_tag} if kind.kind_tag else {}),
        FLOW_RUN_ID_TAG: str(flow_run.id),
        FLOW_RUN_NAME_TAG: str(flow_run.name),
        **doctor.owner_tags(),  # who runs it: `csmf doctor` marks it FAILED if this process dies
        **source_tags(kind.source),
        MLFLOW_RUN_NOTE: run_description(kind, dataset_name(dataset), window, str(flow_run.name)),
    }
    parent = MlflowTracker.start(experiment_id, f"{kind.name}-{window.date}", tags=tags, tracking_uri=uri)
    try:
        parent.log_datasets(window_datasets(dataset, tags[DATASET_TAG], window))
        dates = {"run.train_dates": window.train_dates, "run.eval_dates": window.eval_dates}
        parent.log_params({**cfg.flat(), **(params or {}), **dates})
        (workdir / "config.yaml").write_text(yaml.safe_dump(reporting.plain(cfg.to_dict()), sort_keys=False))
        parent.log_artifact(workdir / "config.yaml", "config")
        cache = None
        if kind.resumable:
            cache = StageCache.for_run(home, digest, training_digest(cfg), code_version(), window)
    except BaseException as exc:
        parent.fail(exc)
        raise
    return RunContext(
        workdir, dataset, window, uri, experiment_id, parent.run_id, digest, home, cache, kind.source
    )


def window_datasets(dataset: Path, name: str, window: Window) -> list[tuple[Any, str, dict[str, str]]]:
    """The run's lineage for `log_datasets`: the training window and the evaluation days of `dataset`,
    each a MetaDataset whose source is the dataset directory and whose digest is
    `flows.inputs.dataset_digest` of exactly the files that part reads (dataset.yaml, users, items and
    its partitions), tagged with its dates."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    out = []
    for context, label, dates in (
        ("training", "train", sorted(window.train_dates)),
        ("evaluation", "eval", sorted(window.eval_dates)),
    ):
        digest, digest_kind = dataset_digest(dataset, dates)
        span = f"{dates[0]}..{dates[-1]}" if len(dates) > 1 else dates[0]
        meta = MetaDataset(
            LocalArtifactDatasetSource(str(dataset)), name=f"{name} {label} {span}", digest=digest
        )
        out.append(
            (
                meta,
                context,
                {
                    "csmf.dates": ",".join(dates),
                    "csmf.days": str(len(dates)),
                    "csmf.digest_kind": digest_kind,
                },
            )
        )
    return out


@contextmanager
def ended(tracker: MlflowTracker) -> Iterator[MlflowTracker]:
    """The end of an MLflow run around a block: FINISHED when the block completes, FAILED with tag
    csmf.failure_reason on any exception, which is re-raised unchanged, even when the tracking store
    refuses the FAILED update (`MlflowTracker.fail` never raises)."""
    try:
        yield tracker
    except BaseException as exc:
        tracker.fail(exc)
        raise
    tracker.finish("FINISHED")


@contextmanager
def run_lifecycle(run: RunContext) -> Iterator[RunContext]:
    """The parent run's end around the flow's block (`ended`); the run's loaded data is dropped either
    way. A run that fails with figures still queued (`run.figures`: the pruning steps', evaluate's)
    has them drawn and logged as far as that goes; no figure process outlives the block."""
    try:
        with ended(run.parent()):
            yield run
    except Exception:
        if run.figures is not None:
            run.figures.salvage()
        raise
    finally:
        if run.figures is not None:
            run.figures.close()
        LOADED.clear()


def child_run(run: RunContext, name: str, plain_tags: dict[str, Any] | None = None, **tags: Any):
    """A child MLflow run named `name` for the block (`with child_run(...) as tracker:`), ended like the
    parent (`ended`). Tags: csmf.step=name, csmf.<key> for each keyword, and `plain_tags` as given."""
    all_tags = {STEP_TAG: name, **{f"csmf.{k}": v for k, v in tags.items()}, **(plain_tags or {})}
    source = getattr(run, "source", "")  # a RunContext; stand-ins in tests may lack it
    all_tags |= source_tags(source) if source else {}
    note = step_note(str(tags.get("kind", "")), {**tags, **(plain_tags or {})})
    all_tags |= {MLFLOW_RUN_NOTE: note} if note else {}
    return ended(run.parent().child(name, tags=all_tags))


# ---- model-ready data, loaded once per flow run -------------------------------------------------
def device(cfg: CSMFConfig) -> str:
    """train.device resolved: "cuda" when asked for, or "auto" with a GPU present; else "cpu".
    `ConfigError` naming the key when cuda is asked for on a machine without one (not torch's
    AssertionError from the first tensor moved)."""
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "train.device=cuda but torch sees no CUDA device on this machine (torch.cuda.is_available() is "
            f"False; torch {torch.__version__}): set train.device=auto (CUDA when present) or cpu"
        )
    return "cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu"


class LoadedData:
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

    def get(self, model_ready: Path, cfg: CSMFConfig, *, load_train: bool) -> CascadeData:
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
                processes=cfg.train.processes,
            )
            self._entry = ((key, load_train), data)
            return dataclasses.replace(data)

    def clear(self) -> None:
        with self._lock:
            self._entry = None


LOADED = LoadedData()


def loaded_data(model_ready: Path, cfg: CSMFConfig, *, load_train: bool) -> CascadeData:
    """The run's model-ready data (from `LOADED`), its feature tables on the run's device."""
    data = LOADED.get(model_ready, cfg, load_train=load_train)
    data.tables = data.tables.to(device(cfg))
    return data
