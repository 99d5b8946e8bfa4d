"""`csmf tune`: find a good configuration for the data given, on validation days only.

    csmf tune --data DIR [--date D] [--trials 30] [--timeout S] [--space FILE] [--config F] [--seed 0]
    from flows.tune import csmf_tune; csmf_tune(data="data/kuairand", trials=30)

The flow `csmf-tune`:

1. **Data.** The window of run date D (default: the newest partition), planned exactly as the daily
   run plans it; the validation days are the last V days of its training window (`data.val_days`,
   auto unless set: csmf_core/selection.py), the same days the daily run for D selects epochs on.
   **The evaluation days are never read**: validation covers the training dates only, and prep builds
   training rows only (`prep(eval_dates=[])`), opening no partition after the last training date.
2. **Study.** One Optuna study per (dataset, date, base config, search space, seed), stored in
   SQLite at `<home>/tune/studies.db`: TPE sampler seeded with `--seed`, median pruner reading the
   validation score after each train step of the cascade (csmf_core/tuning.py). A trial is the
   daily run's selection pass (every train step keeps its best epoch on the validation days) with
   the trial's settings; its value is the validation score: the mean over objectives of model /
   popularity Recall@K on the validation users, own mode and fused (1.0 = as good as popularity).
3. **Resume.** `--trials N` means N finished (complete or pruned) trials in the study in all. A tune
   killed mid-trial leaves that trial RUNNING; the next `csmf tune` with the same arguments (it holds
   the study's lock, so no live process owns it) marks it FAIL and asks its parameters again first.
   Finished trials are never repeated. `--timeout S`: no new trial starts after S seconds (the first
   trial of a call always runs).
4. **Tracking.** MLflow experiment `csmf-tune`: a parent run `csmf-tune-<D>` and one child run per
   trial (`trial-<n>`: its parameters, the validation score after every train step, the final
   validation metrics, the epochs kept, the chosen weights, its state). The report (markdown +
   figure of the trials + optuna's parameter importances) is logged on the parent and printed.
5. **Output.** The best trial's settings that differ from the base config, as a config YAML:
   `<home>/tuned/<dataset>.yaml` (where the daily run reads it, `--out` to write elsewhere), also
   logged to MLflow (`tuned/<dataset>.yaml`) so every tuned config is versioned with its study.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from csmf_core.cascade import CascadeData, load_cascade_data
from csmf_core.config import ConfigError, CSMFConfig, check_objectives, load_config, read_yaml_file
from csmf_core.metrics import md_cell
from csmf_core.prep import prepare
from csmf_core.selection import resolve_val_days
from csmf_core.tuning import (
    Param,
    TrialPruned,
    changed_keys,
    describe,
    fix_space,
    load_space,
    override_keys,
    run_trial,
    suggest,
    trial_config,
)
from data_contracts import load_spec, validate_dataset
from flows import doctor, prefect_compat
from flows.env import check_writable, setup_home, tracking_uri
from flows.ingest import check_positives
from flows.inputs import (
    code_version,
    dataset_digest,
    dataset_location,
    fit_to_dataset,
    plan_window,
    safe_name,
)
from flows.lock import date_lock
from flows.names import TUNE_EXPERIMENT, TUNED_CONFIG_TAG
from flows.notify import notify_failure
from flows.tracking import MlflowTracker, ensure_experiment, metric_key

prefect_compat.install()  # a flow run's end does not wait for its heartbeat thread (flows/prefect_compat.py)

EXPERIMENT = TUNE_EXPERIMENT
DEFAULT_SPACE = Path(__file__).resolve().parents[1] / "configs" / "tune_space.yaml"
STARTUP_TRIALS = 5  # trials before the pruner may stop one (median of the earlier ones)


@dataclass(frozen=True)
class TuneData:
    """The study's training-only model-ready data and how its validation days were chosen."""

    model_ready: Path
    dataset: str
    date: str
    train_dates: list[str]
    val_days: int
    val_why: str
    digest: str

    @property
    def n_stages(self) -> int:
        """The cascade's stages: the objectives of the model-ready data (meta.json)."""
        return len(json.loads((self.model_ready / "meta.json").read_text())["objectives"])


def tuned_config_path(home: Path, dataset_name: str) -> Path:
    """Where the daily run looks for the tuned config of a dataset."""
    return home / "tuned" / f"{safe_name(dataset_name, 'dataset name')}.yaml"


def find_tuned(home: Path, dataset: Path, tuned: str | None) -> Path | None:
    """The tuned config a daily run applies: "auto" = the dataset's `<home>/tuned/<name>.yaml` when a
    tune wrote one, "none" (or empty) = none, anything else = that file."""
    if not tuned or tuned == "none":
        return None
    if tuned == "auto":
        from flows.runs import dataset_name

        path = tuned_config_path(home, dataset_name(dataset))
        return path if path.is_file() else None
    path = Path(tuned)
    if not path.is_file():
        raise ConfigError(f"--tuned {tuned}: no such file (give a csmf tune output, auto or none)")
    return path


READ_BEFORE = re.compile(r"^# read: the days before (\d{4}-\d{2}-\d{2})\b", re.M)
OLD_HEADER = re.compile(r"^# csmf tune \S+ (\d{4}-\d{2}-\d{2}):", re.M)  # files written before that line


def tuned_reads_before(path: Path) -> str | None:
    """The day before which the tune that wrote `path` read its data (its validation days are the last
    days before it), from the file's header; None for a file without one (written by hand)."""
    head = path.read_text(errors="replace")[:2000]
    m = READ_BEFORE.search(head) or OLD_HEADER.search(head)
    return m.group(1) if m else None


def tuned_applies(path: Path, first_eval_day: str, explicit: bool) -> tuple[bool, str]:
    """(apply, why not): a tuned config chosen on days a run evaluates is not applied to that run: its
    choices saw those days' labels (as training or validation days), so the run's figures would not be
    out of sample. "auto" (`explicit` False) skips it with the reason; a file named by --tuned is
    refused (ConfigError). Files without a header line naming their days apply as before."""
    before = tuned_reads_before(path)
    if before is None or first_eval_day >= before:
        return True, ""
    why = (
        f"the tuned config {path} was chosen on the days before {before} (its validation days "
        f"included); this run evaluates from {first_eval_day}, whose labels that choice has seen"
    )
    if explicit:
        raise ConfigError(
            f"{why}: give --tuned none, or tune for this date (csmf tune --date {first_eval_day})"
        )
    return False, f"{why}: not applied (tune with --date {first_eval_day} to tune for this run)"


def tuned_named(spec: str | None) -> bool:
    """Does a `--tuned` value name a file (not auto, none or unset)? A named file that does not apply
    to a run is refused (`tuned_applies`); auto's is skipped."""
    return spec not in (None, "", "auto", "none")


def settle_tuned(
    home: Path,
    dataset: Path,
    spec: str | None,
    config: str | Path | None,
    overrides: list[str] | None,
    first_eval_day: Callable[[CSMFConfig], str],
) -> tuple[Path | None, CSMFConfig, str]:
    """The tuned config a run applies, and the run's config: `spec` (auto, none or a file: `find_tuned`)
    loaded between `config` and `overrides`, unless it was chosen on days the run evaluates
    (`tuned_applies`, the run's first evaluation day being `first_eval_day(config)`): a named file is
    then refused (ConfigError), auto's dropped and the config loaded without it. Returns (the file
    applied or None, the config, why a file found was not applied or "")."""
    tuned = find_tuned(home, dataset, spec)
    cfg = load_config(config, overrides, tuned=tuned)
    if tuned is None:
        return None, cfg, ""
    applies, why = tuned_applies(tuned, first_eval_day(cfg), explicit=tuned_named(spec))
    if applies:
        return tuned, cfg, ""
    return None, load_config(config, overrides), why


def describe_tuned(path: Path | None) -> str:
    """The csmf.tuned_config tag: the file and a digest of its content, or "none"."""
    if path is None:
        return "none"
    return f"{path} (sha256 {hashlib.sha256(path.read_bytes()).hexdigest()[:12]})"


def study_name(dataset: str, date: str, cfg: CSMFConfig, space: list[Param], seed: int) -> str:
    blob = json.dumps([cfg.to_dict(), [p.__dict__ for p in space], seed], sort_keys=True, default=list)
    return f"{dataset}-{date}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


# ---- the flow --------------------------------------------------------------------------------------
def _run_name() -> str:
    from prefect.runtime import flow_run

    return f"csmf-tune-{flow_run.parameters.get('date') or 'latest'}"


@flow(name="csmf-tune", flow_run_name=_run_name, on_failure=[notify_failure], on_crashed=[notify_failure])
def csmf_tune(
    data: str,
    date: str | None = None,
    trials: int = 30,
    timeout: float | None = None,
    space: str | None = None,
    config: str | None = None,
    overrides: list[str] | None = None,
    home: str | None = None,
    seed: int = 0,
    out: str | None = None,
) -> dict:
    """Run (or resume) the study and write the tuned config; returns best score, params, paths."""
    import optuna

    if trials < 1 or (timeout is not None and timeout <= 0):
        raise ConfigError(f"--trials must be >= 1 and --timeout > 0, got {trials}, {timeout}")
    logger = get_run_logger()
    root = setup_home(home)
    check_writable(root)
    doctor.before_run(root, tracking_uri())
    dataset = dataset_location(data, root)
    base = fit_to_dataset(load_config(config, overrides), dataset, logger.info)
    search = load_space(read_yaml_file(space or DEFAULT_SPACE, "search space file") or {}, base)
    search, dropped = fix_space(search, override_keys(overrides), base)
    fixed = [k for k in dropped if k in override_keys(overrides)]  # searched keys the user fixed
    if dropped:
        logger.info(
            "search space: %s not searched (fixed by --set, or conditioned on a fixed key)",
            ", ".join(dropped),
        )
    if not search:
        raise ConfigError("every parameter of the search space is fixed by --set: nothing to tune")
    td = prepare_tune_data(root, dataset, date, base)
    logger.info("%s; tuning on %s .. %s", td.val_why, td.train_dates[0], td.train_dates[-1])
    name = study_name(td.dataset, td.date, base, search, seed)
    with date_lock(root, name, who="csmf tune", kind="csmf-tune"):
        study = optuna.create_study(
            study_name=name,
            storage=f"sqlite:///{root / 'tune' / 'studies.db'}",
            direction="maximize",
            sampler=optuna.samplers.TPESampler(seed=seed),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=STARTUP_TRIALS, n_warmup_steps=0),
            load_if_exists=True,
        )
        requeued = requeue_dead_trials(study)
        if requeued:
            logger.info("resuming study %s: %d trial(s) of a killed tune asked again", name, requeued)
        parent = open_tune_run(root, td, base, search, name, trials, seed)
        try:
            cache: dict[tuple, CascadeData] = {}
            t0, started = time.monotonic(), 0
            # the first trial of a call always runs; after it, none starts once --timeout has passed
            while finished(study) < trials and (
                timeout is None or started == 0 or time.monotonic() - t0 < timeout
            ):
                started += 1
                trial = study.ask()
                number = trial.number
                outcome = tune_trial.with_options(task_run_name=f"trial-{number}")(
                    trial, search, base, td, cache, parent
                )
                study.tell(number, outcome["value"], state=outcome["state"])
                logger.info("trial %d: %s %s", number, outcome["state"].name.lower(), outcome["summary"])
            result = write_outputs(study, base, td, parent, out, root, search, fixed)
        except BaseException as exc:
            parent.fail(exc)
            raise
        parent.finish("FINISHED")
    create_markdown_artifact(
        result["report"], key="csmf-tune", description=f"csmf tune {td.dataset} {td.date}"
    )
    logger.info(
        "best trial %s: validation score %.4f; tuned config %s",
        result["best_trial"],
        result["best_value"],
        result["config_path"],
    )
    return result


def finished(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def requeue_dead_trials(study) -> int:
    """Trials left RUNNING by a killed tune: FAIL them, and ask their parameters again first.

    Safe because the caller holds the study's lock: no live process can be running them."""
    from optuna.trial import TrialState

    dead = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in dead:
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"requeued_from": t.number}, skip_if_exists=False)
    return len(dead)


def prepare_tune_data(home: Path, dataset: Path, date: str | None, base: CSMFConfig) -> TuneData:
    """Validate the training dates and build training-only model-ready data (cached by content)."""
    window = plan_window(dataset, date, base.data)
    spec = load_spec(dataset)
    v, why = resolve_val_days(
        "auto" if base.data.val_days in (0, "auto") else base.data.val_days,
        len(window.train_dates),
        base.data.eval_days,
        loader=base.train.loader,
        processes=base.train.processes,
    )
    if v == 0:
        raise ConfigError(
            f"cannot tune: {why}; tuning needs validation days inside the training window (--set "
            "data.val_days=1 holds out the last training day)"
        )
    check_objectives(base, spec.objective_names)  # one fused weight each, before any work
    history = [d for d in window.validate_dates if d <= window.train_dates[-1]]
    report = validate_dataset(dataset, dates=history)
    report.raise_if_errors()
    digest, _ = dataset_digest(dataset, history)
    key = hashlib.sha256(
        json.dumps(
            [digest, window.train_dates, base.data.seq_len, base.data.n_req_neg, code_version()]
        ).encode()
    ).hexdigest()[:16]
    mr = home / "tune" / "data" / key
    if not (mr / "meta.json").is_file():
        prepare(
            dataset,
            mr,
            train_dates=window.train_dates,
            eval_dates=[],
            seq_len=base.data.seq_len,
            n_req_neg=base.data.n_req_neg,
            overwrite=True,
        )
    # as a run's ingest: an objective with too few training positives fails here, not in every trial
    by_level = json.loads((mr / "meta.json").read_text())["rows"]["train_by_level"]
    check_positives(by_level, spec, window.train_dates, base)
    return TuneData(mr, safe_name(spec.name, "dataset name"), window.date, window.train_dates, v, why, digest)


def open_tune_run(root: Path, td: TuneData, base, search, name, trials, seed) -> MlflowTracker:
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    experiment_id = ensure_experiment(EXPERIMENT, root / "mlartifacts", uri)
    parent = MlflowTracker.start(
        experiment_id,
        f"csmf-tune-{td.date}",
        tags={
            "csmf.dataset": td.dataset,
            "csmf.date": td.date,
            "csmf.dataset_digest": td.digest,
            "csmf.config_digest": base.digest(),
            "csmf.code_version": code_version(),
            "csmf.study": name,
            "csmf.val_days": str(td.val_days),
            **doctor.owner_tags(),
        },
        tracking_uri=uri,
    )
    parent.log_params({"tune.trials": trials, "tune.seed": seed, "tune.val_days": td.val_days, **base.flat()})
    parent.log_table(describe(search, td.n_stages), "tune/search_space.json")
    return parent


# ---- one trial -------------------------------------------------------------------------------------
@task(name="tune-trial", cache_policy=NO_CACHE)
def tune_trial(trial, search, base: CSMFConfig, td: TuneData, cache: dict, parent: MlflowTracker) -> dict:
    """Train the selection pass with the trial's settings; report after each train step (pruning)."""
    from optuna.trial import TrialState

    n_stages = len(_objectives(td.model_ready))
    values = suggest(search, trial, n_stages)
    cfg = trial_config(base, {**values, "data.val_days": td.val_days})
    trial.set_user_attr("config", json.loads(json.dumps(values, default=list)))
    child = parent.child(f"trial-{trial.number}", tags={"csmf.trial": trial.number})
    child.log_params({k: json.dumps(v) if isinstance(v, list) else v for k, v in values.items()})
    data = _data(cache, td, cfg)

    def report(step: int, score: float) -> bool:
        child.log_metrics({"val/step_score": score}, step=step)
        trial.report(score, step)
        return trial.should_prune()

    try:
        res = run_trial(data, cfg, report=report)
    except TrialPruned as exc:
        child.set_tags({"csmf.trial_state": "pruned"})
        child.finish("FINISHED")
        return {"value": None, "state": TrialState.PRUNED, "summary": str(exc)}
    except Exception as exc:  # a diverged or broken trial is a failed trial, not a failed study
        child.fail(exc)
        return {"value": None, "state": TrialState.FAIL, "summary": f"{type(exc).__name__}: {exc}"}
    trial.set_user_attr("epochs", res.epochs)
    trial.set_user_attr("weights", list(res.weights))
    child.log_metrics({metric_key(k): v for k, v in res.metrics.items() if v == v})
    child.set_tags(
        {"csmf.trial_state": "complete", "csmf.epochs": res.epochs, "csmf.weights": list(res.weights)}
    )
    child.finish("FINISHED")
    return {
        "value": res.score,
        "state": TrialState.COMPLETE,
        "summary": f"score {res.score:.4f}, epochs {res.epochs}",
    }


def _objectives(model_ready: Path) -> list[str]:
    return [o["name"] for o in json.loads((model_ready / "meta.json").read_text())["objectives"]]


def _data(cache: dict, td: TuneData, cfg: CSMFConfig) -> CascadeData:
    """The study's data with the trial's item statistics, loaded once per window set."""
    key = tuple(cfg.data.item_stats)
    if key not in cache:
        if len(cache) >= 3:  # bounded memory: a few window sets at most
            cache.clear()
        cache[key] = load_cascade_data(td.model_ready, val_days=td.val_days, item_stats_windows=key)
    return cache[key]


# ---- outputs ---------------------------------------------------------------------------------------
def write_outputs(
    study, base: CSMFConfig, td: TuneData, parent, out, home: Path, search, fixed: list[str] = ()
) -> dict:
    """The tuned config file (the best trial's keys that differ from the base, plus the search-space
    keys fixed by --set: every trial was scored with them, and a later run without the same --set
    would not have them; other --set keys, such as data.train_days or train.device,
    shape the tuning run only and are not written), its MLflow logging and the report."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise RuntimeError(
            f"study {study.study_name}: no trial completed ({len(study.trials)} tried); see the trial runs in "
            "MLflow experiment csmf-tune for why, then raise --trials or widen the space"
        )
    best = study.best_trial
    tuned = changed_keys(base, trial_config(base, best.user_attrs["config"]))
    flat = base.flat()
    for key in fixed:
        section, name = key.split(".", 1)
        tuned.setdefault(section, {}).setdefault(
            name, list(flat[key]) if isinstance(flat[key], tuple) else flat[key]
        )
    path = Path(out) if out else tuned_config_path(home, td.dataset)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# csmf tune {td.dataset} {td.date}: best of {len(complete)} complete trials (study {study.study_name})\n"
        f"# read: the days before {td.date} (a run evaluating any of them does not apply this file)\n"
        f"# validation score {best.value:.4f} (mean model / popularity Recall@K on {td.val_why.split(':')[0]} days)\n"
        f"# written {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}; keys that differ from the base config"
        f"{', and those fixed by --set' if fixed else ''} only\n"
    )
    path.write_text(header + (yaml.safe_dump(tuned, sort_keys=True) if tuned else "{}\n"))
    parent.log_artifact(path, "tuned")
    parent.set_tags({TUNED_CONFIG_TAG: str(path), "csmf.best_trial": str(best.number)})
    parent.log_metrics(
        {"tune/best_score": best.value, "tune/complete": len(complete), "tune/trials": len(study.trials)}
    )
    importances = _importances(study)
    report = render_report(study, best, tuned, importances, td, search)
    parent.log_text(report, "tune/report.md")
    figure = trials_figure(study)
    if figure is not None:
        parent.log_figure(figure, "tune/trials.png")
    return {
        "best_value": best.value,
        "best_trial": best.number,
        "best_params": best.params,
        "tuned": tuned,
        "config_path": str(path),
        "mlflow_run_id": parent.run_id,
        "study": study.study_name,
        "report": report,
        "trials": [
            {"number": t.number, "state": t.state.name, "value": t.value, "params": t.params}
            for t in study.trials
        ],
    }


def _importances(study) -> dict[str, float]:
    import optuna

    try:
        return dict(optuna.importance.get_param_importances(study))
    except (RuntimeError, ValueError, ZeroDivisionError):  # too few complete trials to tell
        return {}


def render_report(study, best, tuned, importances, td: TuneData, search) -> str:
    from optuna.trial import TrialState

    counts = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
    lines = [
        f"# csmf tune: {td.dataset}, run date {td.date}",
        "",
        f"Validation days: {td.val_why}. Training dates {td.train_dates[0]} .. {td.train_dates[-1]};"
        " the evaluation days were not read.",
        f"Trials: {', '.join(f'{v} {k}' for k, v in counts.items() if v)}.",
        "",
        f"**Best trial {best.number}: validation score {best.value:.4f}** (1.0 = popularity), epochs kept "
        f"{best.user_attrs.get('epochs')}, fused weights {best.user_attrs.get('weights')}.",
        "",
        "Tuned config (keys that differ from the base):",
        "",
        "```yaml",
        (yaml.safe_dump(tuned, sort_keys=True) if tuned else "{}\n").rstrip(),
        "```",
        "",
        "| parameter | importance |",
        "|---|---|",
    ]
    lines += [f"| {md_cell(k)} | {v:.3f} |" for k, v in importances.items()] or [
        "| (too few complete trials) | |"
    ]
    lines += ["", "| trial | state | score | parameters |", "|---|---|---|---|"]
    for t in study.trials:
        score = "" if t.value is None else f"{t.value:.4f}"
        params = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items()
        )
        lines.append(f"| {t.number} | {t.state.name.lower()} | {score} | {md_cell(params)} |")
    lines += ["", "Search space:", "", "| parameter | kind | range | when |", "|---|---|---|---|"]
    lines += [
        "| " + " | ".join(md_cell(r[c]) for c in ("parameter", "kind", "range", "when")) + " |"
        for r in describe(search, td.n_stages)
    ]
    return "\n".join(lines) + "\n"


def trials_figure(study):
    """Score of every trial (pruned ones at their last reported step score) and the best so far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState

    done = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    if not done:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    comp = [t for t in done if t.state == TrialState.COMPLETE]
    pruned = [t for t in done if t.state == TrialState.PRUNED and t.intermediate_values]
    ax.plot([t.number for t in comp], [t.value for t in comp], "o", label="complete")
    ax.plot(
        [t.number for t in pruned],
        [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
        "x",
        label="pruned (last step score)",
    )
    best, xs, ys = float("-inf"), [], []
    for t in sorted(comp, key=lambda t: t.number):
        best = max(best, t.value)
        xs.append(t.number)
        ys.append(best)
    ax.step(xs, ys, where="post", label="best so far")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--", label="popularity")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation score (model / popularity)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
