"""The comparison's protocol (flows/compare.py): one for every method, stated in the report.

    protocol = compare_protocol(ready, cfg, tune_trials)      # what the report says, validation days
    data_val, data = protocol_data(ready.model_ready, cfg)     # held-out days / whole window (or None)
    cfg_m = tune_method(method, trials, ready, cfg, run)       # --tune-trials: the best of N trials
    protocol["statement"] = protocol_statement(protocol, cfg, {method: cfg_m, ...})  # as tuned

Every method, CSMF and its ablations included, is trained as the daily run trains CSMF: epochs chosen
on the validation days at the end of the training window, default fused weights chosen there, then
a refit on the whole window (csmf_core/baselines/protocol.py). With `--tune-trials N` each method
first gets N Optuna trials (TPE, seed 0) over its own documented search space
(configs/tune_spaces/<method>.yaml; CSMF: configs/tune_space.yaml), each the selection pass scored
on the validation days: the same budget for every method, and nothing chosen on the evaluation days.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from csmf_core.baselines.protocol import load_protocol_data, selection_score, space_path
from csmf_core.cascade import CascadeData, load_cascade_data
from csmf_core.config import CSMFConfig
from csmf_core.optim import deterministic_kernels
from csmf_core.selection import PAPER_WEIGHTS, resolve_val_days
from csmf_core.tuning import changed_keys, fix_space, load_space, suggest, trial_config
from flows.ingest import Ingested
from flows.runs import RunContext, child_run


def protocol_val_days(cfg: CSMFConfig, n_train_days: int, n_eval_days: int) -> tuple[int, str]:
    """(validation days, why) of a comparison over a window of that many training and evaluation
    days, resolved like the daily run's (0 and auto: auto): what the report states, what
    `protocol_data` loads and what `flows.compare.check_fixed_weights` refuses against."""
    return resolve_val_days(
        "auto" if cfg.data.val_days in (0, "auto") else cfg.data.val_days,
        n_train_days,
        n_eval_days,
        loader=cfg.train.loader,
        processes=cfg.train.processes,
    )


def _window_days(model_ready: Path) -> tuple[int, int]:
    """(training days, evaluation days) of a model-ready directory (its meta.json)."""
    meta = json.loads((Path(model_ready) / "meta.json").read_text())
    return len(meta["train_dates"]), len(meta["eval_dates"])


def item_stats_sentence(configs: dict[str, CSMFConfig]) -> str:
    """The report's item-statistics sentence from each method's configuration (a tuned one may differ)."""
    per = {name: list(c.data.item_stats) or "off" for name, c in configs.items()}
    if len({str(v) for v in per.values()}) <= 1:
        return f"Item statistics: {next(iter(per.values()), 'off')} for every method."
    return "Item statistics (as tuned): " + ", ".join(f"{n} {v}" for n, v in per.items()) + "."


def compare_protocol(ready: Ingested, cfg: CSMFConfig, tune_trials: int) -> dict:
    """What the report states: the validation days (resolved like the daily run's), the refit, the
    fused weights and the tuning budget; without room for validation days, fixed epochs. Once methods
    are tuned, `protocol_statement(protocol, cfg, configs)` states their item statistics."""
    v, why = protocol_val_days(cfg, *_window_days(ready.model_ready))
    if v > 0 and protocol_data(ready.model_ready, cfg)[0] is None:  # e.g. data.val_days=9 on 5 days
        v, why = 0, f"{why}, which leave no training rows before them"
    protocol = {"val_days": v, "why": why, "tune_trials": tune_trials if v else 0}
    return protocol | {"statement": protocol_statement(protocol, cfg)}


def protocol_statement(protocol: dict, cfg: CSMFConfig, configs: dict[str, CSMFConfig] | None = None) -> str:
    """The report's protocol sentence for `compare_protocol`'s resolution (val_days, why, tune_trials);
    configs: each method's configuration once tuned, default `cfg` for every method."""
    v, why, tune_trials = protocol["val_days"], protocol["why"], protocol["tune_trials"]
    if v == 0:
        return (
            f"No validation days ({why}): every method trains train.epochs {list(cfg.train.epochs)} on the "
            "whole window with the configured fused weights; no tuning."
        )
    return (
        f"One protocol for every method ({why}): each method trains on the window without its last {v} "
        "day(s), keeps, for every independently trained part, the epoch with the best validation score "
        "(model / popularity Recall@K on the validation users), chooses its default fused weights there "
        "from the same grid, then is retrained from the same seed on the whole window for the epochs it "
        "kept (csmf_core/baselines/protocol.py). "
        + item_stats_sentence(configs or {"every method": cfg})
        + " "
        + (
            f"Tuning budget: {tune_trials} Optuna trials (TPE, seed 0) per method over its own search "
            "space (configs/tune_spaces/), scored on the validation days; the seeds train the best."
            if tune_trials > 0
            else "No tuning: every method uses the same configuration."
        )
    )


_PROTOCOL_DATA: dict = {}


def protocol_data(model_ready: Path, cfg: CSMFConfig) -> tuple[CascadeData | None, CascadeData]:
    """(data with the validation days held out or None when the window has none, the whole window),
    both with cfg.data.item_stats; the last pair is kept for the next run of the same settings."""
    v, _ = protocol_val_days(cfg, *_window_days(model_ready))  # the days compare_protocol states
    key = (str(model_ready), tuple(cfg.data.item_stats), v)
    if key not in _PROTOCOL_DATA:
        _PROTOCOL_DATA.clear()
        pair = None
        if v > 0:  # v = 0: too short a window, the Parquet loader or DDP (compare_protocol says which)
            try:
                pair = load_protocol_data(model_ready, cfg, val_days=v)
            except ValueError:  # no room for validation days after all: fixed epochs
                pair = None
        if pair is None:
            pair = (None, load_cascade_data(model_ready, item_stats_windows=tuple(cfg.data.item_stats)))
        _PROTOCOL_DATA[key] = pair
    data_val, data = _PROTOCOL_DATA[key]
    return data_val, dataclasses.replace(data)


def fixed_weights(cfg: CSMFConfig, objectives: list[str]) -> list[float]:
    if cfg.eval.fused_weights == "auto":
        return list(PAPER_WEIGHTS) if len(objectives) == len(PAPER_WEIGHTS) else [1.0] * len(objectives)
    return list(cfg.eval.fused_weights)


@task(name="tune-method", cache_policy=NO_CACHE)
def tune_method(
    method: str, trials: int, ready: Ingested, cfg: CSMFConfig, run: RunContext, fixed: list[str] = ()
) -> CSMFConfig:
    """`trials` Optuna trials (TPE, seed 0; in memory) over the method's own search space, each the
    protocol's selection pass scored on the validation days (seed 0); returns the best configuration.
    One child run per method with the trials table. `fixed`: keys the user set (`--set`), never searched
    (`csmf_core.tuning.fix_space`)."""
    import optuna

    logger = get_run_logger()
    space, dropped = fix_space(load_space(space_path(method).read_text(), cfg), list(fixed), cfg)
    if dropped:
        logger.info("%s: search space without %s (fixed by --set)", method, ", ".join(dropped))
    if not space:
        logger.warning("%s: every parameter of its search space is fixed by --set: not tuned", method)
        return cfg
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    rows = []
    with child_run(run, f"{method}/tune", {"method": method}, method=method, kind="compare-tune") as tracker:
        for _ in range(trials):
            trial = study.ask()
            values = suggest(space, trial, len(ready.objectives))
            tcfg = trial_config(cfg, values)
            try:
                dv, _ = protocol_data(ready.model_ready, tcfg)
                with deterministic_kernels(tcfg.train.deterministic):
                    score, _ = selection_score(method, dv, tcfg, 0)
            except Exception as exc:  # a diverged trial is a failed trial, not a failed comparison
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                rows.append(
                    {"trial": trial.number, "state": "fail", "error": f"{type(exc).__name__}: {exc}"[:200]}
                )
                continue
            study.tell(trial, score)
            rows.append({"trial": trial.number, "state": "complete", "score": score, **trial.params})
            logger.info("%s trial %d: validation score %.4f", method, trial.number, score)
        tracker.log_table(rows, "tune/trials.json")
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if not done:
            logger.warning("%s: no tuning trial completed; the untuned configuration is used", method)
            return cfg
        best = study.best_trial
        tracker.log_metrics({"tune/best_score": best.value, "tune/complete": len(done)})
        tuned = trial_config(cfg, suggest(space, optuna.trial.FixedTrial(best.params), len(ready.objectives)))
        tracker.log_dict(changed_keys(cfg, tuned), "tune/tuned.json")
    _PROTOCOL_DATA.clear()
    return tuned
