"""Experiment tracking behind a tiny interface, so that flows never touch MLflow's global state.

    tracker = MlflowTracker.start(experiment_id, "csmf-daily 2026-01-08", tags={"csmf.date": "2026-01-08"})
    step = tracker.child("pretrain_exposure")
    step.log_params({"train.lr": 0.002})
    step.log_metrics({"train/loss": 1.23}, step=10)
    step.log_artifact("runs/.../checkpoint", "checkpoint")
    step.finish()                     # or step.fail(exc): FAILED with tag csmf.failure_reason

Why explicit run ids: MLflow's *active run* is thread-local and Prefect runs tasks in threads, so
every call here goes through `mlflow.MlflowClient` with the run id it is bound to. A tracker is
cheap to rebuild from `(tracking_uri, run_id)` inside a task (`MlflowTracker.attach`).

A run that fails ends FAILED with the tag `csmf.failure_reason` ("TrainingDiverged: ..."). When the
tracking store itself refuses that write (disk full, read-only store) `fail` says so in the log and
returns False instead of raising: the caller's own error stays the one reported, and the run stays
RUNNING until `csmf doctor` (flows/doctor.py) marks it once its process is gone.

`NullTracker` implements the same interface and does nothing (library tests, dry runs).
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import mlflow
from mlflow.entities import Metric, Param, RunTag

from flows.env import keep_template, seed_from_template, sqlite_path, template_dir

PARENT_TAG = "mlflow.parentRunId"
FAILURE_TAG = "csmf.failure_reason"  # why a run (or a model version) did not finish
_REASON_CHARS = 5000  # MLflow tag values hold 8000 characters
_log = logging.getLogger(__name__)
_BATCH = 100  # params and tags per log_batch call (MLflow's limit); metrics allow 1000
_METRIC_BATCH = 1000


class Tracker(Protocol):
    """What flows log. Artifact paths are relative to the run's artifact root ("masks/masks.json")."""

    run_id: str | None

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def log_series(self, key: str, points: Sequence[tuple[int, float]]) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_dict(self, data: Any, artifact_file: str) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_table(self, rows: list[dict] | dict[str, list], artifact_file: str) -> None: ...
    def log_figure(self, figure: Any, artifact_file: str) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...


def metric_key(key: str) -> str:
    """MLflow metric names allow letters, digits, `_ - . : /` and spaces, not `@`: `recall@50` is
    logged as `recall_at_50` (so `test/by_step/click/recall@50` becomes `test/by_step/click/recall_at_50`)."""
    return str(key).replace("@", "_at_")


def failure_reason(exc: BaseException) -> str:
    """The tag value for a run that failed with `exc`: "TrainingDiverged: pretrain_exposure (train): ..."."""
    text = str(exc).strip() or {KeyboardInterrupt: "interrupted (Ctrl+C or SIGINT)"}.get(type(exc), "")
    return f"{type(exc).__name__}: {text}"[:_REASON_CHARS] if text else type(exc).__name__


def _param_value(v: Any) -> str:
    """Params are strings in MLflow: lists/tuples as JSON, the rest as str (max 6000 chars)."""
    if isinstance(v, list | tuple | dict):
        v = json.dumps(v, default=str)
    return str(v)[:6000]


def _chunks(items: list, n: int) -> Iterable[list]:
    for s in range(0, len(items), n):
        yield items[s : s + n]


class MlflowTracker:
    """One MLflow run, addressed by id through an `MlflowClient` (thread-safe, no active run)."""

    def __init__(self, run_id: str, tracking_uri: str | None = None, experiment_id: str | None = None):
        self.run_id = run_id
        self.tracking_uri = tracking_uri or mlflow.get_tracking_uri()
        self.client = mlflow.MlflowClient(self.tracking_uri)
        self._experiment_id = experiment_id

    @property
    def experiment_id(self) -> str:
        """The run's experiment: given by whoever knows it (`start`, `RunContext.parent`), else read
        from the store once, when first needed (a tracker is rebuilt many times per flow run)."""
        if self._experiment_id is None:
            self._experiment_id = self.client.get_run(self.run_id).info.experiment_id
        return self._experiment_id

    @classmethod
    def start(
        cls,
        experiment_id: str,
        run_name: str,
        *,
        tags: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
        tracking_uri: str | None = None,
    ) -> MlflowTracker:
        """Create a run (RUNNING) in `experiment_id`, nested under `parent_run_id` when given."""
        client = mlflow.MlflowClient(tracking_uri or mlflow.get_tracking_uri())
        all_tags = {str(k): _param_value(v) for k, v in (tags or {}).items()}
        if parent_run_id is not None:
            all_tags[PARENT_TAG] = parent_run_id
        run = client.create_run(experiment_id, tags=all_tags, run_name=run_name)
        return cls(run.info.run_id, client.tracking_uri, run.info.experiment_id)

    @classmethod
    def attach(
        cls, run_id: str, tracking_uri: str | None = None, experiment_id: str | None = None
    ) -> MlflowTracker:
        """Bind to an existing run (e.g. the parent run inside a task); `experiment_id`, when the
        caller knows it, spares a read of the run."""
        return cls(run_id, tracking_uri, experiment_id)

    def child(self, run_name: str, tags: Mapping[str, Any] | None = None) -> MlflowTracker:
        """A nested run under this one, in the same experiment."""
        return MlflowTracker.start(
            self.experiment_id, run_name, tags=tags, parent_run_id=self.run_id, tracking_uri=self.tracking_uri
        )

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [Param(str(k), _param_value(v)) for k, v in params.items()]
        for chunk in _chunks(items, _BATCH):
            self.client.log_batch(self.run_id, params=chunk, synchronous=True)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        items = [Metric(metric_key(k), float(v), now, int(step or 0)) for k, v in metrics.items()]
        for chunk in _chunks(items, _METRIC_BATCH):
            self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)

    def log_series(self, key: str, points: Sequence[tuple[int, float]]) -> None:
        """One metric value per (step, value) point (a loss curve); non-finite values are skipped."""
        now = int(time.time() * 1000)
        key = metric_key(key)
        items = [Metric(key, float(v), now, int(step)) for step, v in points if math.isfinite(v)]
        for chunk in _chunks(items, _METRIC_BATCH):
            self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file goes to `artifact_path/<name>`; a directory's contents go under `artifact_path/`."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path)
        else:
            raise FileNotFoundError(f"cannot log artifact {path}: no such file or directory")

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_table(self, rows: list[dict] | dict[str, list], artifact_file: str) -> None:
        """A table artifact (shown as a table in the MLflow UI); artifact_file must end in .json."""
        if isinstance(rows, list):
            keys = list(dict.fromkeys(k for r in rows for k in r))
            rows = {k: [r.get(k) for r in rows] for k in keys}
        self.client.log_table(self.run_id, rows, artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def log_datasets(self, inputs: Iterable[tuple[Any, str, Mapping[str, str]]]) -> None:
        """Dataset inputs of the run (MLflow's `log_input`, through the client: no active run needed).

        inputs: (mlflow.data Dataset, context such as "training", tags) per dataset."""
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        entries = [
            DatasetInput(
                dataset._to_mlflow_entity(),
                [InputTag(MLFLOW_DATASET_CONTEXT, context), *(InputTag(k, str(v)) for k, v in tags.items())],
            )
            for dataset, context, tags in inputs
        ]
        self.client.log_inputs(self.run_id, datasets=entries)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        items = [RunTag(str(k), _param_value(v)) for k, v in tags.items()]
        for chunk in _chunks(items, _BATCH):
            self.client.log_batch(self.run_id, tags=chunk, synchronous=True)

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run FINISHED, FAILED or KILLED."""
        self.client.set_terminated(self.run_id, status=status)

    def fail(self, reason: BaseException | str) -> bool:
        """End the run FAILED with tag csmf.failure_reason (an exception or a sentence); never raises.

        Returns False when the tracking store refused (module docstring); the tag and the status are
        written separately so that a refused tag still leaves the run FAILED."""
        text = reason if isinstance(reason, str) else failure_reason(reason)
        ok = True
        for what, write in (
            ("tag", lambda: self.set_tags({FAILURE_TAG: text[:_REASON_CHARS]})),
            ("status", lambda: self.finish("FAILED")),
        ):
            try:
                write()
            except Exception as exc:  # the store is down or full: report, keep the caller's error
                ok = False
                _log.warning(
                    "could not mark MLflow run %s FAILED (%s: %s); `csmf doctor` marks it once this "
                    "process has ended",
                    self.run_id,
                    what,
                    exc,
                )
        return ok


class NullTracker:
    """The same interface, recording nothing: for library use and tests without a tracking store."""

    run_id: str | None = None

    def child(self, run_name: str, tags: Mapping[str, Any] | None = None) -> NullTracker:
        return self

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_series(self, key: str, points: Sequence[tuple[int, float]]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_dict(self, data: Any, artifact_file: str) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_table(self, rows: list[dict] | dict[str, list], artifact_file: str) -> None:
        pass

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_datasets(self, inputs: Iterable[tuple[Any, str, Mapping[str, str]]]) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass

    def fail(self, reason: BaseException | str) -> bool:
        return True


def ensure_experiment(name: str, artifact_location: str | Path, tracking_uri: str | None = None) -> str:
    """Id of experiment `name`, created with `artifact_location` when missing.

    Against a tracking server (an http(s):// URI) the experiment is created without a location, so
    the server's default applies (`mlflow server --serve-artifacts`: mlflow-artifacts:/<id>, uploaded
    through the server, readable by every client of it); a local path there would only exist on the
    machine that created the experiment. Call once before any fan-out: concurrent first-time creation
    races on SQLite.
    """
    client = mlflow.MlflowClient(tracking_uri or mlflow.get_tracking_uri())
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    if str(client.tracking_uri).split(":", 1)[0].lower() in ("http", "https"):
        return client.create_experiment(name)
    location = Path(artifact_location)
    location.mkdir(parents=True, exist_ok=True)
    return client.create_experiment(name, artifact_location=location.resolve().as_uri())


def open_stores(tracking_uri: str) -> None:
    """Open the tracking and model-registry stores of `tracking_uri` now: on a first run this creates
    the SQLite database (from the migrated template when there is one: `seed_mlflow_database`, else
    MLflow's migrations, seconds of CPU). MLflow keeps each store per URI for the process, so the
    flow's clients later reuse them; nothing is written but the schema and MLflow's Default
    experiment. `csmf run` calls it while Prefect's temporary API is still starting (flows/local_api.py)."""
    seed_mlflow_database(tracking_uri)
    _open_stores(tracking_uri)


def _open_stores(tracking_uri: str) -> None:
    """Have MLflow open (and on a new database create) the tracking and registry stores of the URI."""
    client = mlflow.MlflowClient(tracking_uri)
    client.search_experiments(max_results=1)
    client.search_registered_models(max_results=1)


# ---- a new home's MLflow database from a migrated template ---------------------------------------
# A new SQLite tracking store makes MLflow create its tables and run every alembic migration (~1.1 s of
# a first run's 2.1 s under `open_stores` on the 2-core VM; the rest is importing the store's code).
# `make venv` has MLflow create one empty store in a temporary directory and keeps it under the
# virtual environment, one file per MLflow version, without the Default experiment (id 0) MLflow adds
# on first open: its artifact location is that of the process that creates it, so each home's store
# creates its own on first open, as a new database does. MLflow still checks on open that the schema
# is at its head revision.


def mlflow_template_path() -> Path:
    """The migrated MLflow database of this MLflow version (flows.env.template_dir)."""
    return template_dir() / f"mlflow-{mlflow.__version__}.db"


def build_mlflow_template(path: Path | None = None) -> Path:
    """Have MLflow create a new SQLite store (every table, every migration: MLflow's own code), delete
    the Default experiment it adds, and keep the file at `path` (default `mlflow_template_path()`)."""
    path = Path(path) if path is not None else mlflow_template_path()
    with tempfile.TemporaryDirectory(prefix="csmf-mlflow-template-") as tmp:
        db = Path(tmp) / "mlflow.db"
        _open_stores(f"sqlite:///{db}")  # not open_stores: a template is built by MLflow, not seeded
        con = sqlite3.connect(db)
        try:
            with con:
                con.execute("DELETE FROM experiment_tags WHERE experiment_id = 0")
                con.execute("DELETE FROM experiments WHERE experiment_id = 0")
            if con.execute("SELECT count(*) FROM experiments").fetchone()[0] != 0:
                raise RuntimeError(f"{db}: a new MLflow store holds experiments other than Default")
        finally:
            con.close()
        return keep_template(db, path)


def seed_mlflow_database(tracking_uri: str, template: Path | None = None) -> bool:
    """Copy the migrated template to the SQLite file of `tracking_uri` when it has no database yet
    (`flows.env.seed_from_template`); True when copied. Other stores (a server, PostgreSQL) and a
    missing template: nothing happens, MLflow creates the store as before."""
    db = sqlite_path(tracking_uri)
    template = Path(template) if template is not None else mlflow_template_path()
    return db is not None and seed_from_template(db, template)


if __name__ == "__main__":  # `python -m flows.tracking --build-template` (make venv)
    if sys.argv[1:] != ["--build-template"]:
        sys.exit("usage: python -m flows.tracking --build-template")
    print(f"MLflow database template: {build_mlflow_template()}")
