"""What `csmf tune` searches and how one trial is scored; the Optuna study itself is flows/tune.py.

A **search space** is a YAML mapping from config keys to ranges (configs/tune_space.yaml is the
default; `csmf tune --space FILE` replaces it):

    train.lr: {low: 3.0e-4, high: 1.0e-2, log: true}     # float range (log scale)
    train.batch_size: {choices: [256, 512, 1024]}         # categorical
    recover.epochs: {low: 1, high: 3, int: true}          # integer range
    train.epochs: {per_stage: [[1, 6], [1, 12], [2, 20]]} # one integer range per cascade stage
    loss.eta: {low: 1.2, high: 3.0, when: {loss.aml: true}}   # only when another parameter has a value
    data.item_stats: {choices: [none, "[1]", "[7]", "[1, 7]"]}   # YAML text of the value; none = off

Every key must be a config key (`csmf_core.config`); `per_stage` ranges repeat their last entry for
more stages. `suggest` asks an Optuna trial (anything with suggest_float/int/categorical) for a value
of each parameter; `trial_config` applies them over the base config; `run_trial` trains the cascade
on the study's data (validation days held out) with epoch selection, reports the validation score
after every train step (the pruner's view), and returns the final validation score
(`csmf_core.selection`), with the fusion weights chosen on the validation users when
`eval.fused_weights` is auto. Nothing here reads an evaluation day: the study's data has none.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

from csmf_core.cascade import CascadeData, Step, build_model, plan, run_step
from csmf_core.config import ConfigError, CSMFConfig, build_config, yaml_problem
from csmf_core.evaluate import Ranked
from csmf_core.selection import choose_weights, validation_score


class TrialPruned(Exception):
    """The pruner stopped this trial after a train step (flows/tune.py maps it to optuna's)."""


@dataclass(frozen=True)
class Param:
    key: str  # a config key ("train.lr") or "train.epochs" with per-stage ranges
    kind: str  # "float" | "int" | "categorical" | "per_stage"
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple = ()
    ranges: tuple[tuple[int, int], ...] = ()
    when: tuple[tuple[str, Any], ...] = ()  # (param key, value) that must all hold


def load_space(spec: Mapping | str, base: CSMFConfig | None = None) -> list[Param]:
    """Parse a search space (a mapping or YAML text); every problem is reported together.

    Each parameter's values are checked against the config rules (a range end that the config would
    refuse, e.g. cpp.tau = 1.0, is an error here, before any trial)."""
    try:
        raw = yaml.safe_load(spec) if isinstance(spec, str) else spec
    except yaml.YAMLError as exc:
        raise ConfigError(f"search space: not valid YAML: {yaml_problem(exc)}") from None
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError("search space: expected a non-empty mapping of config keys to ranges")
    base = base or build_config({})
    known = set(base.flat())
    errors: list[str] = []
    params: list[Param] = []
    for key, r in raw.items():
        where = f"search space {key!r}"
        if key not in known:
            errors.append(f"{where}: not a config key")
            continue
        if not isinstance(r, Mapping):
            errors.append(f"{where}: expected a mapping such as {{low: .., high: ..}} or {{choices: [..]}}")
            continue
        when = tuple((str(k), v) for k, v in (r.get("when") or {}).items())
        unknown = set(r) - {"low", "high", "log", "int", "choices", "per_stage", "when"}
        if unknown:
            errors.append(f"{where}: unknown fields {sorted(unknown)}")
            continue
        if "choices" in r:
            ch = r["choices"]
            if not isinstance(ch, list) or not ch:
                errors.append(f"{where}: choices must be a non-empty list")
                continue
            params.append(Param(key, "categorical", choices=tuple(ch), when=when))
        elif "per_stage" in r:
            rs = r["per_stage"]
            ok = (
                isinstance(rs, list)
                and rs
                and all(
                    isinstance(x, list)
                    and len(x) == 2
                    and all(isinstance(v, int) for v in x)
                    and 0 <= x[0] <= x[1]
                    for x in rs
                )
            )
            if not ok:
                errors.append(
                    f"{where}: per_stage must be a list of [low, high] integer ranges, 0 <= low <= high"
                )
                continue
            params.append(Param(key, "per_stage", ranges=tuple(tuple(x) for x in rs), when=when))
        elif "low" in r and "high" in r:
            lo, hi = r["low"], r["high"]
            if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (lo, hi)):
                errors.append(f"{where}: low and high must be numbers")
                continue
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi) or (r.get("log") and lo <= 0):
                errors.append(f"{where}: need finite low < high (and low > 0 on a log scale), got {lo}, {hi}")
                continue
            kind = "int" if r.get("int") else "float"
            params.append(Param(key, kind, float(lo), float(hi), bool(r.get("log", False)), when=when))
        else:
            errors.append(f"{where}: give low/high, choices or per_stage")
    names = {p.key for p in params}
    for p in params:
        for k, _ in p.when:
            if k not in names:
                errors.append(f"search space {p.key!r}: 'when' names {k!r}, which is not searched")
    if not errors:
        errors += _check_ends(params, base)
    if errors:
        raise ConfigError("invalid search space:\n  " + "\n  ".join(errors))
    return params


def _value(p: Param, v: Any) -> Any:
    """The config value of a suggestion (categorical YAML text -> its value; 'none' -> [] for lists)."""
    if p.kind == "categorical" and isinstance(v, str):
        parsed = yaml.safe_load(v)
        return [] if parsed is None or v.strip().lower() == "none" else parsed
    return v


def _check_ends(params: list[Param], base: CSMFConfig) -> list[str]:
    errors = []
    for p in params:
        ends = (
            [p.low, p.high]
            if p.kind in ("float", "int")
            else [[lo for lo, _ in p.ranges], [hi for _, hi in p.ranges]]
            if p.kind == "per_stage"
            else list(p.choices)
        )
        for v in ends:
            v = int(v) if p.kind == "int" else v
            try:
                build_config(_nested(base.to_dict(), {p.key: _value(p, v)}))
            except ConfigError as exc:
                errors.append(f"search space {p.key!r}: value {v!r} is refused by the config: {exc}")
    return errors


def _nested(base: dict, flat: Mapping[str, Any]) -> dict:
    out = copy.deepcopy(base)
    for key, v in flat.items():
        section, name = key.split(".", 1)
        out.setdefault(section, {})[name] = list(v) if isinstance(v, tuple) else v
    return out


def override_keys(overrides: list[str] | None) -> list[str]:
    """The config keys a list of `section.key=value` overrides sets (`--set`), in order."""
    return [o.split("=", 1)[0].strip() for o in overrides or () if "=" in o]


def fix_space(space: list[Param], fixed: list[str], base: CSMFConfig) -> tuple[list[Param], list[str]]:
    """The search space without the keys the user fixed (`--set`): (parameters kept, keys left out).

    A fixed key is not searched (a trial would have replaced the user's value); a parameter whose
    `when` names a fixed key keeps that condition only as the fixed value decides it: searched
    unconditionally when `base` (which holds the fixed values) satisfies it, left out otherwise."""
    flat, fixed_set = base.flat(), set(fixed)
    kept: list[Param] = []
    dropped: list[str] = []
    for p in space:
        if p.key in fixed_set:
            dropped.append(p.key)
            continue
        decided = [(k, v) for k, v in p.when if k in fixed_set]
        if any(_as_config_value(flat[k]) != v for k, v in decided):
            dropped.append(p.key)
            continue
        kept.append(replace(p, when=tuple(c for c in p.when if c[0] not in fixed_set)))
    return kept, dropped


def _as_config_value(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def suggest(space: list[Param], trial, n_stages: int) -> dict[str, Any]:
    """Config key -> value for this trial (parameters whose `when` does not hold are not asked)."""
    out: dict[str, Any] = {}
    for p in space:
        if any(out.get(k, _MISSING) != v for k, v in p.when):
            continue
        if p.kind == "float":
            out[p.key] = trial.suggest_float(p.key, p.low, p.high, log=p.log)
        elif p.kind == "int":
            out[p.key] = trial.suggest_int(p.key, int(p.low), int(p.high), log=p.log)
        elif p.kind == "categorical":
            out[p.key] = _value(p, trial.suggest_categorical(p.key, list(p.choices)))
        else:
            out[p.key] = [
                trial.suggest_int(f"{p.key}.{t}", *p.ranges[min(t, len(p.ranges) - 1)])
                for t in range(n_stages)
            ]
    return out


_MISSING = object()


def trial_config(base: CSMFConfig, params: Mapping[str, Any]) -> CSMFConfig:
    """The base config with the trial's values (validated like any config)."""
    return build_config(_nested(base.to_dict(), params))


def changed_keys(base: CSMFConfig, tuned: CSMFConfig) -> dict[str, dict[str, Any]]:
    """{section: {key: value}} of the settings where `tuned` differs from `base`: the tuned config file."""
    a, b = base.to_dict(), tuned.to_dict()
    out: dict[str, dict[str, Any]] = {}
    for section, values in b.items():
        for k, v in values.items():
            if a[section][k] != v:
                out.setdefault(section, {})[k] = list(v) if isinstance(v, tuple) else v
    return out


@dataclass
class TrialResult:
    """One selection pass: what `csmf tune` scores a trial by, and what a run refits from."""

    score: float
    weights: tuple[float, ...]
    epochs: list[int]  # the epoch each train step kept (validation selection)
    step_scores: list[float]  # the pruner's view after each train step
    metrics: dict[str, float] = field(default_factory=dict)  # validation metrics (selection.ValidationScore)
    weight_rows: list[dict] = field(default_factory=list)  # the auto-weight grid, when used
    model: Any = None  # the selection pass's model (validation days held out) and unit owners
    owners: Any = None
    reports: list = field(default_factory=list)  # cascade.StepReport of every step
    # with `choices`: the rehearsal ratio each train step kept (train.incremental_rehearsal per stage)
    rehearsal: list[float] | None = None


def step_score(model, owners, data: CascadeData, upto: int, k: int) -> float:
    """After the train step of stage `upto`: mean over objectives 0..upto of own-mode Recall@k on the
    validation users / popularity's (the score's own-mode part, comparable across trials)."""
    ranked = Ranked(model, owners.output_owners(), data.catalog_tables("val"), data.val)
    objs = data.objectives[: upto + 1]
    s = validation_score(
        ranked, data.val, objs, data.val_counts[: upto + 1], (1.0,) * len(objs), k, scorers=("own",)
    )
    return s.score


def best_of(
    step: Step,
    model,
    owners,
    choices: list[tuple[float, CascadeData]],
    cfg: CSMFConfig,
    on_step: Callable[[int, float], None] | None = None,
):
    """Train step `step` on each choice's rows from the same starting point (`model` as it is) and keep
    the one whose best validation score (own-mode Recall@K of the step's objective, the epoch
    selection's `StepReport.val_scores`) is highest; the first of equal ones (list the cheaper first).
    A choice whose rows leave the stage as it was (`Step.keep_if_few`: too few positives) scores what
    the starting model scores (the other choices' epoch 0), so it ties with a trained choice that kept
    epoch 0. Returns (owners, report, ratio): `model` holds the kept result; the report's info carries
    `rehearsal` (the ratio kept) and `val_score_rehearsal_<r>` for every ratio scored. One choice: that
    one, trained as `run_step` would. The model's parameters are held twice more while it runs."""
    if len(choices) == 1:
        r, d = choices[0]
        owners, rep = run_step(step, model, owners, d, cfg, on_step=on_step)
        rep.info["rehearsal"] = r
        return owners, rep, r

    def score(rep) -> float | None:  # None: the stage was not trained (or not scored) on these rows
        finite = [x for x in rep.val_scores if math.isfinite(x)]
        return max(finite) if finite else None

    def state() -> dict:
        return {n: p.detach().clone() for n, p in model.state_dict().items()}

    base = state()
    # best: (score, state) of the best scored choice; first: the first choice's state (kept when
    # nothing is scored: no validation positives for the stage, the same for every choice)
    tried, start, best, first = [], None, None, None
    for j, (r, d) in enumerate(choices):
        if j:
            model.load_state_dict(base)
        o, rep = run_step(step, model, owners, d, cfg, on_step=on_step)
        s = score(rep)
        tried.append((r, s, o, rep))
        if j == 0:
            first = base if rep.info.get("kept") else state()
        if s is not None:
            if start is None and math.isfinite(rep.val_scores[0]):
                start = rep.val_scores[0]  # the starting model's score: every choice's epoch 0
            if best is None or s > best[0]:
                best = (s, first if j == 0 else state())
    scores = [start if s is None and rep.info.get("kept") else s for _, s, _, rep in tried]
    known = [x for x in scores if x is not None]
    j = scores.index(max(known)) if known else 0  # the first of the best (a kept choice scores the start)
    r, _, o, rep = tried[j]
    if rep.info.get("kept"):
        model.load_state_dict(base)
    else:
        model.load_state_dict(first if j == 0 else best[1])
    rep.info["rehearsal"] = r
    rep.info |= {f"val_score_rehearsal_{x:g}": v for (x, _, _, _), v in zip(tried, scores) if v is not None}
    return o, rep, r


def run_trial(
    data: CascadeData,
    cfg: CSMFConfig,
    *,
    report: Callable[[int, float], bool] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    on_begin: Callable[[Step], None] | None = None,
    start: tuple | None = None,
    steps: list | None = None,
    choices: Callable[[Step], list[tuple[float, CascadeData]]] | None = None,
) -> TrialResult:
    """The selection pass: train the cascade of `cfg` on `data` (validation days held out: data.val),
    every train step keeping its best epoch there, and score it on the validation users.

    report(step_index, score) after each train step returns True to stop the trial (TrialPruned).
    on_begin(step) before each cascade step runs; on_step(k, loss) after each optimiser step, k
    counted from 1 within the step (what a per-step progress bar needs).
    The score is `selection.validation_score` with the chosen (auto) or configured fusion weights.
    start: (model, owners) to continue instead of a fresh model, steps: the steps to run instead of
    the cascade's plan (an incremental run: csmf_core/incremental.py). choices(step): for a train step,
    the (rehearsal ratio, data) pairs it is trained on, the best kept (`best_of`; the ratios kept are
    TrialResult.rehearsal); each pair's data differs from `data` in its train rows only."""
    if data.val is None or data.val_counts is None:
        raise ValueError("run_trial needs data loaded with validation days (load_cascade_data(val_days=...))")
    k = cfg.eval.primary_k
    model, owners = build_model(data, cfg) if start is None else start
    epochs, step_scores, reports, ratios = [], [], [], []
    n_train = 0
    for step in plan(data.objectives, cfg) if steps is None else steps:
        if on_begin is not None:
            on_begin(step)
        if choices is not None and step.kind == "train":
            owners, rep, r = best_of(step, model, owners, choices(step), cfg, on_step=on_step)
            ratios.append(r)
        else:
            owners, rep = run_step(step, model, owners, data, cfg, on_step=on_step)
        reports.append(rep)
        if step.kind != "train":
            continue
        # a step kept as it was (cascade.Step.keep_if_few) trains no epoch in the refit either
        kept_epochs = 0 if rep.info.get("kept") else cfg.epochs_for(step.stage)
        epochs.append(int(rep.info.get("val_best_epoch", kept_epochs)))
        s = step_score(model, owners, data, step.stage, k)
        step_scores.append(s)
        if report is not None and report(n_train, s):
            raise TrialPruned(f"stopped after {step.name}: step score {s:.4f}")
        n_train += 1
    model.eval()
    out = owners.output_owners()
    tables = data.catalog_tables("val")
    rows: list[dict] = []
    ranked = Ranked(model, out, tables, data.val)  # one encoding: the weight grid, then the score
    if cfg.eval.fused_weights == "auto":
        weights, rows = choose_weights(
            model, out, tables, data.val, data.objectives, data.val_counts, k, ranked=ranked
        )
    else:
        weights = tuple(float(w) for w in cfg.eval.fused_weights)
    score = validation_score(ranked, data.val, data.objectives, data.val_counts, weights, k)
    return TrialResult(
        score.score,
        weights,
        epochs,
        step_scores,
        score.metrics(),
        rows,
        model,
        owners,
        reports,
        ratios if choices is not None else None,
    )


def refit_config(cfg: CSMFConfig, result: TrialResult) -> CSMFConfig:
    """The config of the refit: every train step trains for the epochs the selection pass kept, on
    the whole window (no held-out days), with the chosen default weights
    (docs/method-notes.md, "Validation days and the refit")."""
    params = {
        "train.epochs": list(result.epochs),
        "data.val_days": 0,
        "eval.fused_weights": list(result.weights),
    }
    if result.rehearsal is not None:  # an incremental pass's ratios (train.incremental_rehearsal auto)
        params["train.incremental_rehearsal"] = list(result.rehearsal)
    return trial_config(cfg, params)


def describe(space: list[Param], n_stages: int | None = None) -> list[dict]:
    """One row per parameter, for the tune report. n_stages: the cascade's stages, every one of which a
    `per_stage` range samples (the last range repeats for stages past the list, as `sample` does;
    ranges past the stages are not listed)."""
    rows = []
    for p in space:
        stages = n_stages or len(p.ranges or ())
        rng = (
            f"{p.low:g} .. {p.high:g}{' (log)' if p.log else ''}"
            if p.kind in ("float", "int")
            else ", ".join(map(str, p.choices))
            if p.kind == "categorical"
            else "; ".join(
                f"stage {t}: {lo} .. {hi}"
                for t, (lo, hi) in ((t, p.ranges[min(t, len(p.ranges) - 1)]) for t in range(stages))
            )
        )
        when = ", ".join(f"{k} = {v}" for k, v in p.when)
        rows.append({"parameter": p.key, "kind": p.kind, "range": rng, "when": when})
    return rows
