"""The daily CSMF pipeline: one Prefect flow run per evaluation date, tracked in MLflow.

How to run:

    .venv/bin/python -m flows.pipeline                    # generated data, last date, home ./.csmf
    from flows.pipeline import csmf_daily
    csmf_daily(date="2026-01-08", data="data/synth-small", overrides=["train.epochs=[1,1,1]"])

The flow body reads like the design card (the middle is `csmf_core.cascade.plan`, so N objectives work):

    ingest -> select -> pretrain_exposure -> cpp_prune_exposure -> recover_exposure -> finetune_click
    -> cpp_prune_click -> recover_click -> finetune_conversion -> build_index -> evaluate -> register
    -> gate (champion or not, flows/gate.py) -> retention -> publish

Where each step lives: the run's bookkeeping (work dir, parent and child runs, the loaded data) in
flows/runs.py, `ingest` in flows/ingest.py (shared with the compare flow), the cascade steps in
flows/cascade_step.py, `register` and `gate` in flows/promotion.py; `build_index`, `evaluate`,
`retention` and `publish` here. Tasks pass paths, ids and small metadata, never tensors; each step's
checkpoint is handed on by the flow (`Checkpoints`). Every output goes to the run's own work dir
`<home>/runs/<date>/<flow-run-id>/` (`<step>/checkpoint`, `model_ready`, `bundle`, `quarantine`).
Only a run that got through evaluate registers a model, so a failed run (bad data, a diverged loss)
never replaces a good one; a registered model becomes champion only through the gate. One run per
date at a time (flows/lock.py); completed stages of an earlier run with identical inputs are
resumed (flows/resume.py). MLflow layout: flows/reporting.py; operations: docs/operations.md.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from csmf_core.checkpoint import load_checkpoint
from csmf_core.config import CSMFConfig, load_config
from csmf_core.evaluate import Ranked, evaluate_model, gaps_table, popularity_gaps
from csmf_core.incremental import val_days_for
from csmf_core.serving import metrics_table, write_bundle
from csmf_core.tuning import trial_config
from flows import doctor, prefect_compat, reporting
from flows.cascade_step import Checkpoints, train_cascade
from flows.env import check_writable, freeze_startup, setup_home, tracking_uri
from flows.epoch_selection import choose_default_weights, select_on_validation
from flows.figures import BackgroundFigures
from flows.incremental import (
    Start,
    choose_start,
    incremental_overrides,
    rehearsal_window,
    select_incremental,
    selection_from,
    selection_start,
    train_incremental,
)
from flows.ingest import Ingested, ingest
from flows.inputs import Window, dataset_location, fit_to_dataset, plan_window
from flows.lock import date_lock
from flows.names import (
    BY_STEP,
    RESUMED_PREFIX,
    RESUMED_STAGES_TAG,
    RUN_TAG,
    TEST,
    TUNED_CONFIG_TAG,
    WORKDIR_TAG,
)
from flows.notify import notify_failure
from flows.promotion import gate, register
from flows.registry import champion
from flows.retention import apply_retention
from flows.runs import DAILY, RunContext, child_run, device, loaded_data, open_run, run_lifecycle
from flows.tracking import metric_key
from flows.tune import describe_tuned, find_tuned, settle_tuned

prefect_compat.install()  # a flow run's end does not wait for its heartbeat thread (flows/prefect_compat.py)


# ---- the flow --------------------------------------------------------------------------------------
def _count_new_partitions(start: Start, window: Window, dataset) -> Start:
    """The days new to an incremental run's starting model, counted in partitions: a day missing from
    the data between the model's run date and this run's is not new data, and the run's window is the
    last partitions before its date (`plan_window(last_partitions=)`), so it is stepped over instead of
    failing every run until the next full retrain."""
    days = start.decision.new_days
    if not days:
        return start
    run_date = window.date
    since = (dt.date.fromisoformat(run_date) - dt.timedelta(days=days)).isoformat()
    new = window.partitions_from(since)
    if new < days:
        _log_line(
            f"incremental: {days - new} of the {days} day(s) from {since} to the day before {run_date} have "
            f"no partition in {dataset}; "
            + (
                f"the model has {new} new day(s) of data"
                if new
                else "none is new to the model: it is trained again on the last one"
            )
        )
    return dataclasses.replace(start, decision=dataclasses.replace(start.decision, new_days=new))


def daily_run_name() -> str:
    """The flow run's name, `csmf-daily-<evaluation day>`: the MLflow parent run's name too. Given no
    date, the day the run will pick (`flows.inputs.default_eval_day`: with data.eval_days = N the
    first of the last N partitions, from the run's config, tuned config and overrides); "latest" when
    that cannot be read here (the flow itself then fails with the reason)."""
    from data_contracts import list_partitions
    from flows.env import resolve_home
    from flows.inputs import default_eval_day

    params = flow_run.parameters or {}
    date = params.get("date")
    if not date:
        data = params.get("data")
        home = resolve_home(params.get("home"))
        try:  # a URI is staged where the flow stages it (<home>/staged): the flow then finds it there
            root = dataset_location(data, home) if data else home / "data" / "synth-small"
            partitions, _ = list_partitions(root)
            tuned = find_tuned(home, root, params.get("tuned", "auto"))
            eval_days = load_config(params.get("config"), params.get("overrides"), tuned=tuned).data.eval_days
            dates = [p.date.isoformat() for p in partitions]
            date = default_eval_day(dates, eval_days) if dates else "latest"
        except (OSError, ValueError):
            date = "latest"
    return f"csmf-daily-{date}"


@flow(
    name="csmf-daily",
    flow_run_name=daily_run_name,
    on_failure=[notify_failure],
    on_crashed=[notify_failure],
)
def csmf_daily(
    date: str | None = None,
    data: str | None = None,
    config: str | None = None,
    overrides: list[str] | None = None,
    home: str | None = None,
    max_violation_rate: float = 0.0,
    train_days: int | None = None,
    tuned: str | None = "auto",
    from_model: str | None = None,
) -> dict:
    """Train, evaluate and register the CSMF model for evaluation day `date` (default: the last one).

    data: canonical dataset dir (default: generated `small` data under <home>/data); config: YAML
    file; overrides: ["train.lr=1e-3", ...]; home: state dir (default $CSMF_HOME or ./.csmf);
    max_violation_rate: share of rows per row-level rule that is quarantined instead of failing;
    train_days: training window length in days before `date` (= override data.train_days; 0 = all).
    tuned: the tuned config applied between `config` and `overrides`: "auto" = the one `csmf tune` wrote
    for this dataset under the home, if any (flows/tune.py), "none", or a file; tag csmf.tuned_config.
    from_model: a model reference (csmf recommend's REF) an incremental run continues instead of the
    model train.start_from picks (flows/incremental.py); implies train.mode=incremental.
    Returns mlflow_run_id, tracking_uri, experiment, model_version, bundle_dir, metrics, metrics_table,
    gate (promoted, reason, champion_version) and resumed_stages.

    Production semantics (docs/operations.md): one run per date at a time (file lock), stages
    resumed from earlier runs with identical inputs, the gate decides on the champion, retention
    trims old local run dirs.
    """
    freeze_startup()  # a worker's flow-run process imported everything already (flows/env.py)
    root = setup_home(home)
    check_writable(root)  # a read-only home fails here, not in Prefect's or MLflow's retries
    if train_days is not None:
        overrides = [*(overrides or []), f"data.train_days={int(train_days)}"]
    dataset = dataset_location(data, root) if data else generate_data(root)  # a path or a URI
    # chosen on this run's evaluation days: refused, or skipped under auto
    tuned_file, raw, why = settle_tuned(
        root, dataset, tuned, config, overrides, lambda c: plan_window(dataset, date, c.data).date
    )
    if why:
        _log_line(why)
    window = plan_window(dataset, date, raw.data)  # missing partitions fail here, before any work
    cfg = fit_to_dataset(raw, dataset, _log_line)  # (the fused weights only: the window stands)
    doctor.before_run(root, tracking_uri())  # what killed csmf processes left (flows/doctor.py)
    start = choose_start(cfg, window.date, dataset, from_model, root, _log_line)
    if start.incremental:  # the new day(s) and the validation day(s) only (flows/incremental.py)
        start = _count_new_partitions(start, window, dataset)
        asked = start.decision.train_days(cfg.train.incremental_days)
        cfg = trial_config(cfg, incremental_overrides(cfg, start.decision, len(window.train_dates)))
        older = cfg.data.train_days - cfg.train.incremental_days - val_days_for(cfg.data.val_days)
        if rehearsal_window(cfg) > older:
            _log_line(
                f"incremental rehearsal: {older} of train.rehearsal_days={cfg.train.rehearsal_days} earlier "
                f"partition(s) before {window.date} to draw from"
            )
        if cfg.train.incremental_days < asked:
            _log_line(
                f"incremental: {asked} training day(s) asked, {len(window.train_dates)} partition(s) before "
                f"{window.date}: training on the last {cfg.train.incremental_days} (the rest are validation days)"
            )
        window = plan_window(dataset, window.date, cfg.data, last_partitions=cfg.data.train_days)
        if val_days_for(cfg.data.val_days):  # the selection pass trains on the day(s) before them
            start = selection_start(start, selection_from(window.train_dates, cfg), cfg, root, _log_line)
    elif cfg.train.mode != "full":  # fell back to a full retrain: configured (and resumed) as one
        cfg = trial_config(cfg, {"train.mode": "full"})
    if window.missing:
        _log_line(
            f"no partition for {', '.join(window.missing)} in {dataset}: the {len(window.train_dates)} "
            f"training day(s) ({window.train_dates[0]} .. {window.train_dates[-1]}) step over them"
        )
    with date_lock(root, window.date, who=f"prefect flow run {flow_run.id or 'local'}"):
        run = open_run(DAILY, root, cfg, dataset, window)
        if start.incremental:  # stages continue a model: never resumed from a run with another parent
            run = dataclasses.replace(run, cache=None)
        # the run's figures (pruning steps, evaluate) are drawn by one child process while the index,
        # evaluate, register and gate run, and logged after them (flows/figures.py)
        run = dataclasses.replace(run, figures=BackgroundFigures(run.workdir / "figures"))
        with run_lifecycle(run):
            run.parent().set_tags({TUNED_CONFIG_TAG: describe_tuned(tuned_file), **start.tags()})
            if tuned_file is not None:
                get_run_logger().info("tuned config applied: %s", describe_tuned(tuned_file))
            ready = ingest(run, cfg, max_violation_rate, start.features)
            if start.incremental:  # incremental_<objective> per stage, from the starting model
                cfg = select_incremental(ready, cfg, run, start)
                checkpoints = train_incremental(ready, cfg, run, start)
            else:
                # validation days: epochs and weights, then the refit; pretrain_exposure -> ... -> finetune_conversion
                cfg = select_on_validation(ready, cfg, run)
                checkpoints = train_cascade(ready, cfg, run)
            if cfg.eval.fused_weights == "auto":  # data.val_refit false: chosen after the cascade
                cfg = choose_default_weights(checkpoints.final, ready, cfg, run)
            # the pruning steps' figures, drawn by a child process from now on (flows/figures.py)
            run.figures.start()
            bundle = build_index(
                checkpoints.final, ready, cfg, run, start.trained_through(window.train_dates)
            )
            rows = evaluate(checkpoints, ready, cfg, run)  # adds its figures to the child's
            version = register(bundle, rows, cfg, run)
            decision = gate(bundle, version, checkpoints.stage_ends(), ready, cfg, run)
            log_figures(run.figures)
        retain(run, cfg)
        result = publish(run, rows, version, bundle, decision)
    # in the flow body, not in a task: the summary belongs to the flow run itself
    create_markdown_artifact(
        reporting.run_summary(result, cfg.eval.primary_k, window.date),
        key="csmf-summary",
        description=f"csmf-daily {window.date}: model v{version}, {decision.get('reason', '')[:200]}",
    )
    return result


def _log_line(line: str) -> None:
    """A line in the flow run's log (the module's logger when called outside a flow run)."""
    from prefect.exceptions import MissingContextError

    try:
        get_run_logger().info(line)
    except MissingContextError:
        import logging

        logging.getLogger(__name__).info(line)


# ---- tasks -----------------------------------------------------------------------------------------
@task(name="generate-data", task_run_name="generate_data", cache_policy=NO_CACHE)
def generate_data(home: Path) -> Path:
    """The `small` synthetic dataset under <home>/data/synth-small (generated once)."""
    from csmf_core.synth import generate

    out = home / "data" / "synth-small"
    if not (out / "dataset.yaml").is_file():
        get_run_logger().info("no --data given: generating the small synthetic dataset into %s", out)
        generate(out, "small", seed=0, overwrite=True)
    return out


@task(name="build-index", task_run_name="build_index", cache_policy=NO_CACHE)
def build_index(
    checkpoint: Path, ready: Ingested, cfg: CSMFConfig, run: RunContext, trained_through: str | None = None
) -> Path:
    """The serving bundle (checkpoint, FAISS index + id map, user state) in `<workdir>/bundle`;
    `trained_through`: the last day the model has learned from, its lineage included (Start)."""
    with child_run(run, "build_index", kind="build_index") as tracker:
        bundle = write_bundle(
            run.workdir / "bundle",
            checkpoint_dir=checkpoint,
            model_ready_dir=ready.model_ready,
            dataset_dir=ready.source,
            config=cfg,
            index_kind="flat",
            data_digest=run.data_digest,
            extra={
                "mlflow_parent_run_id": run.parent_run_id,
                "date": run.window.date,
                "trained_through": trained_through or max(run.window.train_dates),
            },
            overwrite=True,
        )
        tracker.log_artifact(bundle / "index", "index")
        tracker.log_artifact(bundle / "bundle.json", "bundle")
        info = reporting.read_json(bundle / "bundle.json")
        tracker.log_metrics({"index/n_items": info["n_items"], "index/n_users": info["n_users"]})
    return bundle


@task(name="evaluate", task_run_name="evaluate", cache_policy=NO_CACHE)
def evaluate(checkpoints: Checkpoints, ready: Ingested, cfg: CSMFConfig, run: RunContext) -> list[dict]:
    """The final model (`checkpoints.final`) under every scorer (own modes, fused, popularity, random)
    on the evaluation day(s), and the model-minus-popularity gaps; the ownership figure comes from
    the pruning steps' checkpoints. With `run.figures`, its figures go to the child process drawing
    the pruning steps' (started here if it was not; the flow logs them all: `log_figures`); else drawn
    and logged here."""
    with child_run(run, "evaluate", kind="evaluate") as tracker:
        model, owners, _ = load_checkpoint(checkpoints.final, device=device(cfg))
        data = loaded_data(ready.model_ready, cfg, load_train=False)
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
        # the same files on the step's run and the parent (figures rendered once for both)
        prunes = checkpoints.after_pruning()
        reporting.log_evaluation([tracker, run.parent()], rows, prunes, data.objectives, run.figures)
        log_cascade_at_a_glance(checkpoints, data.objectives, cfg, run)
        if run.figures is not None:
            # to the child drawing the pruning figures (or started now): drawn on another core while
            # the gaps, register and gate run; until `log_figures` this process's torch uses one
            # thread fewer, leaving that core to the child (flows/figures.py)
            run.figures.start()
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
        for target in (tracker, run.parent()):
            target.log_metrics(_gap_metrics(gaps))
        tracker.log_text(gaps_table(gaps) + "\n", "metrics/vs_popularity.md")
    logger = get_run_logger()
    # the table itself is printed once, by `csmf run` at the end (and is the Prefect artifact csmf-metrics)
    logger.info(
        "evaluation: %d objective x scorer x K rows in metrics/test_metrics.md (%s)",
        len(rows),
        ", ".join(
            f"{r['objective']} fused recall@{r['k']} {r['recall']:.4f}"
            for r in rows
            if r["scorer"] == "fused" and r["k"] == cfg.eval.primary_k
        ),
    )
    logger.info("model minus popularity, paired 95%% bootstrap over users:\n%s", gaps_table(gaps))
    return rows


def log_cascade_at_a_glance(
    checkpoints: Checkpoints, objectives: list[str], cfg: CSMFConfig, run: RunContext
):
    """The parent's figures/cascade.png and metrics/by_step.{json,md}: every objective after every
    cascade step, named, from the test/by_step metrics the steps logged on the parent (read back, so the
    figure and the table show exactly what the run logged)."""
    parent = run.parent()
    history = {}
    for o in objectives:
        for m in ("recall", "ndcg"):
            for k in cfg.eval.ks:
                key = metric_key(f"{BY_STEP}/{o}/{m}@{k}")
                history[key] = {
                    h.step: h.value for h in parent.client.get_metric_history(run.parent_run_id, key)
                }
    steps = [(i, s.name, s.kind, objectives[s.stage]) for i, (s, _) in enumerate(checkpoints.steps)]
    rows = reporting.cascade_rows(steps, history, objectives, cfg.eval.ks)
    days = ", ".join(run.window.eval_dates)
    reporting.log_cascade(parent, rows, objectives, cfg.eval.primary_k, days, run.figures)
    return rows


@task(name="figures", task_run_name="figures", cache_policy=NO_CACHE)
def log_figures(figures: BackgroundFigures) -> list[str]:
    """Wait for the run's figures (drawn by a child process while register and gate ran) and log each
    PNG to its runs: every pruning step's ownership, the evaluate step's and the parent's recall_at_k
    and ownership, the parent's cascade figure. Returns the artifact files logged. The gate has
    decided by now: figures that cannot be drawn are a warning, not a failed run (`finish_figures`).
    A run that fails earlier has its queued figures drawn as far as that goes (`run_lifecycle`)."""
    return finish_figures(figures, get_run_logger().warning)


def finish_figures(figures: BackgroundFigures, warn) -> list[str]:
    """`figures.finish()`; on a drawing or logging error, `warn(message)` and [] instead of raising."""
    try:
        return figures.finish()
    except (RuntimeError, OSError) as exc:
        warn(f"the run's figures were not logged: {exc}")
        return []


def _gap_metrics(gaps: list[dict]) -> dict[str, float]:
    """test/<objective>/[fused/]vs_popularity/<metric>@K with its interval (/lo, /hi)."""
    out = {}
    for g in gaps:
        fused = "fused/" if g["scorer"] == "fused" else ""
        key = f"{TEST}/{g['objective']}/{fused}vs_popularity/{g['metric']}@{g['k']}"
        out |= {key: g["diff"], f"{key}/lo": g["lo"], f"{key}/hi": g["hi"]}
    return out


@task(name="retention", task_run_name="retention", cache_policy=NO_CACHE)
def retain(run: RunContext, cfg: CSMFConfig) -> list[str]:
    """Delete local run dirs older than retention.keep_days, never the champion's or this run's."""
    logger = get_run_logger()
    client = run.parent().client
    protect = [run.workdir]
    current = champion(client)
    if current is not None:
        tags = current.tags or {}
        workdir = tags.get(WORKDIR_TAG)
        if not workdir and tags.get(RUN_TAG):
            workdir = client.get_run(tags[RUN_TAG]).data.tags.get(WORKDIR_TAG)
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


@task(name="publish", task_run_name="publish", cache_policy=NO_CACHE)
def publish(
    run: RunContext, rows: list[dict], version: str, bundle: Path, decision: dict | None = None
) -> dict:
    """Prefect artifacts (metrics table, link to the MLflow run) and the flow's return value."""
    parent = run.parent()
    resumed = sorted(
        k.removeprefix(RESUMED_PREFIX)
        for k in parent.client.get_run(run.parent_run_id).data.tags
        if k.startswith(RESUMED_PREFIX)
    )
    parent.set_tags({RESUMED_STAGES_TAG: ",".join(resumed) or "none"})
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
        "experiment": DAILY.experiment,
        "experiment_id": run.experiment_id,
        "model_version": version,
        "bundle_dir": str(bundle),
        "workdir": str(run.workdir),
        "metrics": rows,
        "metrics_table": metrics_table(rows),
        "gate": decision or {},
        "resumed_stages": resumed,
    }


if __name__ == "__main__":
    print(csmf_daily()["metrics_table"])
