"""The daily flow's last two steps: `register` the model as a version of "csmf", then `gate` it.

    version = register(bundle, rows, cfg, run)                          # alias "challenger"
    decision = gate(bundle, version, checkpoints.stage_ends(), ready, cfg, run)   # "champion" or not

Every run that got through evaluate registers (or reuses an identical version), so the challenger
is always the latest model; "champion" moves only when the gate's rules (flows/gate.py) say so, and
the verdict is written where operators look: the version's and the parent run's tags, the `gate`
child run, the Prefect artifact `csmf-gate` (docs/operations.md "Champion and challenger").
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from csmf_core.config import CSMFConfig
from csmf_core.evaluate import metric_dict
from csmf_core.prep import prepare
from data_contracts import list_partitions, validate_dataset
from flows import gate as gating
from flows.incremental import lineage_end
from flows.ingest import Ingested
from flows.inputs import code_version, plan_window
from flows.lock import registry_lock
from flows.model_card import version_card, with_gate
from flows.names import (
    CODE_VERSION_TAG,
    CONFIG_DIGEST_TAG,
    DATASET_DIGEST_TAG,
    DATASET_TAG,
    DATE_TAG,
    FLOW_RUN_ID_TAG,
    GATE_DAYS_TAG,
    GATE_REASON_TAG,
    GATE_TAG,
    GATE_VERIFIED_TAG,
    LAST_FULL_TAG,
    MODEL_DIGEST_TAG,
    MODEL_ID_TAG,
    MODEL_VERSION_TAG,
    PARENT_VERSION_TAG,
    REGISTERED_TAG,
    REUSED_BY_TAG,
    RUN_TAG,
    TEST,
    TRAIN_DATES_TAG,
    TRAIN_MODE_TAG,
    TRAINING_DIGEST_TAG,
    WORKDIR_TAG,
)
from flows.registry import (
    CHALLENGER,
    REGISTERED_MODEL,
    champion,
    find_version,
    log_and_register,
    model_digest,
    promote,
    resolve_bundle,
)
from flows.resume import training_digest
from flows.runs import RunContext, child_run, dataset_name, transient
from flows.tracking import FAILURE_TAG, metric_key

# the parent-run tags a version inherits: where it came from
INHERITED_TAGS = (
    DATE_TAG,
    DATASET_TAG,
    DATASET_DIGEST_TAG,
    CONFIG_DIGEST_TAG,
    TRAINING_DIGEST_TAG,
    CODE_VERSION_TAG,
    FLOW_RUN_ID_TAG,
    TRAIN_MODE_TAG,
    PARENT_VERSION_TAG,
    LAST_FULL_TAG,
)
# version tags that say which inputs and which model a version is (a re-run matching all reuses it)
IDENTITY_TAGS = (DATASET_DIGEST_TAG, TRAINING_DIGEST_TAG, CODE_VERSION_TAG, DATE_TAG, MODEL_DIGEST_TAG)


@task(
    name="register",
    task_run_name="register",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=transient,
    cache_policy=NO_CACHE,
)
def register(bundle: Path, rows: list[dict], cfg: CSMFConfig, run: RunContext) -> str:
    """Log the bundle as a pyfunc, register a new version of "csmf", alias it "challenger" (the gate
    task decides on "champion").

    A version with this run's inputs and a bit-identical model (IDENTITY_TAGS; a re-run of a date,
    resumed or retrained deterministically) is reused instead of registering a copy: it becomes the
    challenger again and the parent run's tag `csmf.registered` says "reused vN"."""
    parent = run.parent()
    client = parent.client
    ptags = client.get_run(run.parent_run_id).data.tags
    primary = metric_dict([r for r in rows if r["k"] == cfg.eval.primary_k], prefix=TEST, own_only=False)
    tags = {k: ptags.get(k, "") for k in INHERITED_TAGS}
    train = sorted(run.window.train_dates)
    tags |= {
        RUN_TAG: run.parent_run_id,
        WORKDIR_TAG: str(run.workdir),
        # the gate compares models only on days after both training windows (flows/gate.py)
        TRAIN_DATES_TAG: f"{train[0]}..{train[-1]} ({len(train)} days)",
        MODEL_DIGEST_TAG: model_digest(bundle / "checkpoint"),
    }
    tags |= {metric_key(k): f"{v:.4f}" for k, v in primary.items() if "/fused/" in k and "recall" in k}
    objectives = list(dict.fromkeys(r["objective"] for r in rows))
    facts = {
        "date": run.window.date,
        "train_dates": train,
        "eval_dates": list(run.window.eval_dates),
        "dataset": tags[DATASET_TAG],
        "dataset_dir": str(run.dataset_dir),
        "dataset_digest": tags[DATASET_DIGEST_TAG],
        "objectives": objectives,
        "fused_weights": ",".join(
            f"{w:g}" for w in json.loads((bundle / "bundle.json").read_text())["default_weights"]
        ),
        "config_digest": tags[CONFIG_DIGEST_TAG],
        "training_digest": tags[TRAINING_DIGEST_TAG],
        "code_version": tags[CODE_VERSION_TAG],
        "parent_run_id": run.parent_run_id,
    }
    params = {k: v for k, v in facts.items() if k not in ("train_dates", "eval_dates", "objectives")}
    params |= {
        "train_window": tags[TRAIN_DATES_TAG],
        "eval_dates": ",".join(facts["eval_dates"]),
        "objectives": ",".join(objectives),
        "primary_k": cfg.eval.primary_k,
        "model.dim": cfg.model.dim,
        "model.hidden": ",".join(str(h) for h in cfg.model.hidden),
    }
    with child_run(run, "register", kind="register") as tracker:
        same = find_version(client, {k: tags[k] for k in IDENTITY_TAGS})
        if same is not None and (same.tags or {}).get(RUN_TAG) != run.parent_run_id:
            client.set_registered_model_alias(REGISTERED_MODEL, CHALLENGER, same.version)
            note_reuse(client, same.version, run.parent_run_id)
            version = client.get_model_version(REGISTERED_MODEL, same.version)
            how = (
                f"reused v{version.version}: identical inputs and bit-identical model (model digest "
                f"{tags[MODEL_DIGEST_TAG]}), registered by MLflow run {same.tags.get(RUN_TAG)}"
            )
        else:
            version = log_and_register(
                tracker.run_id,
                bundle,
                version_tags=tags,
                description=version_card(facts, rows, cfg.eval.primary_k),
                model_params=params,
                model_metrics={metric_key(k): v for k, v in primary.items()},
            )
            how = "new"
        tracker.set_tags(
            {MODEL_VERSION_TAG: version.version, MODEL_ID_TAG: version.source, REGISTERED_TAG: how}
        )
    parent.set_tags({MODEL_VERSION_TAG: version.version, REGISTERED_TAG: how})
    get_run_logger().info(
        "registered csmf version %s (%s; aliases %s)", version.version, how, version.aliases
    )
    return str(version.version)


def was_promoted_before(version, run: RunContext) -> bool:
    """A version this run reuses (registered by another run: identical inputs) that a gate promoted
    before: if it is no longer champion, an operator rolled it back or a later model replaced it, and a
    re-run of its date must not undo that (README: a re-run never promotes again)."""
    tags = version.tags or {}
    return tags.get(RUN_TAG) != run.parent_run_id and tags.get(GATE_TAG) == "promoted"


def note_reuse(client, version: str, parent_run_id: str) -> None:
    """A version reused by a run that goes on to the gate: `csmf.reused_by` names that run."""
    client.set_model_version_tag(REGISTERED_MODEL, version, REUSED_BY_TAG, parent_run_id)


def clear_failure(client, version: str) -> None:
    """The gate's verdict on a version finishes what the run that registered it began: a
    `csmf.failure_reason` that `csmf doctor` left on it (that run ended before its gate) is removed,
    so a champion never carries a failure tag. Done with the verdict tags, not at register: until
    the verdict, doctor (any flow's start) would tag the version again."""
    if FAILURE_TAG in (client.get_model_version(REGISTERED_MODEL, version).tags or {}):
        client.delete_model_version_tag(REGISTERED_MODEL, version, FAILURE_TAG)


@task(name="gate", task_run_name="gate", cache_policy=NO_CACHE)
def gate(
    bundle: Path,
    version: str,
    stage_ends: dict[int, Path],
    ready: Ingested,
    cfg: CSMFConfig,
    run: RunContext,
) -> dict:
    """Promote this run's version to champion only if flows/gate.py says so; say why either way.

    stage_ends: {stage t: the checkpoint of its last cascade step} (the frozen-parameter check).
    Challenger and champion are scored with the same function (Recommender.evaluate, ids mapped
    through the original ids) on the same days: this run's evaluation days, or, when the champion
    trained on them or later (a backfill), the newest days after both training windows
    (`_comparison_data`). Days that cannot measure the model promote nothing (flows/gate.py).
    Under the home's registry lock (`flows.lock.registry_lock`): a second run's gate waits."""
    client = run.parent().client
    # one gate at a time per home: the champion read here is still the champion at the promotion
    locked = contextlib.nullcontext() if run.home is None else registry_lock(run.home, f"gate of v{version}")
    with locked, child_run(run, "gate", kind="gate") as tracker:
        current = champion(client)
        already = current is not None and str(current.version) == version  # a retry, or a reused version
        decision = _decide(bundle, version, stage_ends, current, already, ready, cfg, run)
        demoted = not already and was_promoted_before(
            client.get_model_version(REGISTERED_MODEL, version), run
        )
        if decision.promote and demoted:
            decision = dataclasses.replace(
                decision,
                promote=False,
                reason=(
                    f"v{version} (reused: identical inputs) was promoted before and has since stopped being "
                    f"champion (now v{current.version if current is not None else '-'}): a re-run does not "
                    f"promote it again; to serve it, promote it by hand (flows.registry.promote('{version}') with MLFLOW_TRACKING_URI set to this home's registry, docs/operations.md). "
                    f"The gate's own finding: {decision.reason}"
                ),
            )
        if decision.promote and not already:
            promote(version, client)
        tags = {
            GATE_TAG: "promoted" if decision.promote else "kept",
            GATE_REASON_TAG: decision.reason[:4000],
            GATE_VERIFIED_TAG: str(decision.verified).lower(),
        }
        if not (
            (already and GATE_TAG in (current.tags or {})) or demoted
        ):  # keep the verdict that promoted it
            for key, value in tags.items():
                client.set_model_version_tag(REGISTERED_MODEL, version, key, value)
            clear_failure(client, version)
            card = client.get_model_version(REGISTERED_MODEL, version).description or ""
            card = with_gate(card, tags[GATE_TAG], decision.reason, decision.days)
            client.update_model_version(REGISTERED_MODEL, version, description=card)
        tracker.set_tags({**tags, GATE_DAYS_TAG: ",".join(decision.days)})
        run.parent().set_tags(tags)
        tracker.log_metrics({f"gate/challenger/{key}": v for key, v in decision.challenger.items()})
        tracker.log_metrics({f"gate/champion/{key}": v for key, v in decision.champion.items()})
        tracker.log_metrics({f"gate/check/{c.name}": float(c.ok) for c in decision.checks})
        tracker.log_metrics({f"gate/users/{o}": float(n) for o, n in decision.users.items()})
        (run.workdir / "gate.md").write_text(decision.to_markdown())
        tracker.log_artifact(run.workdir / "gate.md", "gate")
    create_markdown_artifact(
        decision.to_markdown(),
        key="csmf-gate",
        description=f"v{version}: {decision.verdict()}",
    )
    now = champion(client)
    get_run_logger().info("gate: v%s %s. %s", version, tags[GATE_TAG], decision.reason)
    return {
        "promoted": decision.promote,
        "reason": decision.reason,
        "champion_version": None if now is None else str(now.version),
        "checks": {c.name: c.ok for c in decision.checks},
        "days": decision.days,
        "users": decision.users,
    }


def _decide(
    bundle: Path,
    version: str,
    stage_ends: dict[int, Path],
    current,
    already: bool,
    ready: Ingested,
    cfg: CSMFConfig,
    run: RunContext,
) -> gating.Decision:
    """Verify the model, score it and the champion (`current`, None when there is none) on the same
    days, and apply the rules of flows/gate.py. `already`: this version is the champion."""
    from mlflow.exceptions import MlflowException

    from csmf_core.serving import Recommender

    rec = Recommender.load(bundle)
    checks = gating.verify_model(rec, bundle / "checkpoint", stage_ends, cfg.gate.sample_users)
    champ, why_not, identical = None, None, False
    if current is not None and not already:
        identical = _same_inputs(current.tags or {}, run, cfg)
        why_not = _other_dataset(current.tags or {}, run)
        if not identical and why_not is None:
            try:
                champ = Recommender.load(resolve_bundle(f"models:/csmf/{current.version}", home=run.home))
            except (OSError, ValueError, LookupError, MlflowException) as exc:
                why_not = f"{type(exc).__name__}: {exc}"
    data, days, note = ready.model_ready, run.window.eval_dates, None
    if champ is not None:
        data, days, note, why_not = _comparison_data(champ, str(current.version), ready, cfg, run, rec.info)
    k = cfg.eval.primary_k
    new, old, mismatch, users = gating.same_day_metrics(rec, None if why_not else champ, data, k)
    why_not = why_not or mismatch
    if already:
        return gating.Decision(True, f"v{version} is already champion", checks, new, {}, version, days, users)
    return gating.decide(
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


def _comparison_data(
    champ, champion_version: str, ready: Ingested, cfg: CSMFConfig, run: RunContext, mine: dict | None = None
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
    # each model's window with its lineage's last day (a model continued from one trained on later
    # data has seen those days too: flows/incremental.py lineage_end)
    trained = [*trained, *filter(None, [lineage_end(champ.info)])]
    challenger = [*run.window.train_dates, *filter(None, [lineage_end(mine or {})])]
    late = gating.trained_too_late(own, trained)
    if late is None:
        own_late = gating.trained_too_late(own, challenger)
        if own_late is None:
            return here(None)
        late = f"is compared with a challenger that {own_late}"
    partitions = [p.date.isoformat() for p in list_partitions(run.dataset_dir)[0]]
    days = gating.comparison_dates(partitions, [trained, challenger], cfg.data.eval_days)
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


def _other_dataset(tags: dict, run: RunContext) -> str | None:
    """Why a champion (its registry tags) of another dataset than this run's cannot be compared with
    it, or None. Its users and items are not this dataset's: re-scored on this run's days it would
    lose by construction, and this run's model would then replace the model serving that dataset."""
    theirs, mine = tags.get(DATASET_TAG), dataset_name(run.dataset_dir)
    if theirs is None or theirs == mine:
        return None
    return (
        f"it is a model of dataset {theirs!r} and this run's is {mine!r}: the registry has one champion, "
        "so use one home (registry) per dataset; to serve this version anyway, promote it by hand "
        "(docs/operations.md)"
    )


def _same_inputs(tags: dict, run: RunContext, cfg: CSMFConfig) -> bool:
    """Was a version (its registry tags) trained on exactly this run's inputs?"""
    mine = {
        DATASET_DIGEST_TAG: run.data_digest,
        CODE_VERSION_TAG: code_version(),
        DATE_TAG: run.window.date,
    }
    if TRAINING_DIGEST_TAG in tags:
        mine[TRAINING_DIGEST_TAG] = training_digest(cfg)
    else:
        mine[CONFIG_DIGEST_TAG] = cfg.digest()
    return all(tags.get(key) == value for key, value in mine.items())
