"""One protocol for every method of `csmf compare` (issue #15 item 5): select on validation days, refit.

Fixed epochs and no validation are neither what a user would do nor a fair test of any method, so
every method, CSMF and its ablations included, is trained the way the product's own daily run is
(`tuning.run_trial`, then `tuning.refit_config`; the full statement is docs/comparison.md, "One
protocol for every method"):

1. **Selection pass** on `data_val` (`load_cascade_data(..., val_days=V)`: the training window minus
   its last V days). After every epoch each independently trained *part* of the method is scored on
   the validation users (`data_val.val`, catalog `data_val.catalog_tables("val")`, popularity
   `data_val.val_counts`) and keeps its best epoch (ties: the earlier). A part's score is
   `selection.validation_score` with the "own" scorer over the objectives the part serves: the mean
   of model Recall@K / popularity Recall@K. Parts (`common.EpochHook`): YouTubeDNN-Sep one per
   objective; YouTubeDNN-Mix and MOPPR "model"; MVKE, ResFlow, DTML, DMMP "joint" (a joint epoch is
   1/E of every task's budget, `multitask.joint_train_loop`); the weight-mask variant one per stage
   ("train_<objective>"); CSMF and its ablations every train step of the cascade (`tuning.run_trial`).
   Epoch 0 (the starting point) is a candidate where it means something: a later stage of a cascade
   (CSMF's `run_step` considers it for every train step); a freshly initialised model starts at 1.
   A part without a validation positive trains its cap (as CSMF's steps do). With `train.patience` P
   (default 5) a part stops after P considered epochs in a row without beating its best finite score,
   as CSMF's steps do (`validation.EpochSelector`); 0 trains every part to its cap.
2. **Fused weights** on the same validation users: every weighting of `selection.weight_grid` (with
   more than three objectives, `selection.search_weights`' coordinate search over it) is scored
   by the fused part of the validation score on the selection pass's final vectors (fusion as the
   report serves it, `serving_cost.fused_vectors`); the best becomes the method's default weights
   (ties: the paper's weights, then the earlier grid entry; in the search, the current weighting; weightings that give every served
   objective weight 0 are skipped). The selection pass's **validation score** is
   `selection.validation_score` over the objectives the method serves, own and fused scorers, with
   those weights: what a tuning trial of the method returns (`selection_score`).
3. **Refit** on `data_full` (`val_days=0`: the whole window), from the same seed, each part trained
   for exactly its chosen epochs (`Refit`; CSMF: `tuning.refit_config`). The refit's vectors are the
   result the report evaluates on the evaluation days.

Nothing here reads an evaluation user's labels: choices come from `data_val.val` only (a test swaps
the evaluation users and checks every choice is unchanged). Both datasets must be loaded with the
same item statistics as `cfg.data.item_stats` (`load_protocol_data`); every method's item tower then
reads them (`common.RowItems`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from csmf_core.baselines import METHODS
from csmf_core.baselines.base import MethodResult
from csmf_core.baselines.common import Encode, EpochHook, OnStep, Vectors, with_seed
from csmf_core.baselines.csmf import VARIANTS, train_csmf, variant_config
from csmf_core.baselines.serving_cost import fused_vectors
from csmf_core.cascade import CascadeData, apply_threads, load_cascade_data
from csmf_core.config import CSMFConfig
from csmf_core.evaluate import EvalRows
from csmf_core.metrics import TopKCache, popularity_topk, recall_ndcg
from csmf_core.selection import ValidationScore, choose_by_fused_score, popularity_recalls, validation_score
from csmf_core.tuning import refit_config, run_trial, trial_config
from csmf_core.validation import BestEpoch

SPACES = Path(__file__).resolve().parents[2] / "configs"


def space_path(method: str) -> Path:
    """The documented `--tune-trials` search space of `method`: configs/tune_spaces/<method>.yaml
    (CSMF's own is configs/tune_space.yaml, the space of `csmf tune`)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    return SPACES / "tune_space.yaml" if method == "csmf" else SPACES / "tune_spaces" / f"{method}.yaml"


# ---- scoring a method's vectors on the validation users ---------------------------------------------
class ResultRanked:
    """The view `selection.validation_score` needs (`mode(t, k)`, `fused(weights, k)`) of any method's
    vectors, with every top-k kept (the weight grid reuses them).

    served: the objectives scored, in order (mode t = served[t]); objectives: every objective of the
    data, the order of a weights tuple. The fused ranking is the report's (`serving_cost.fused_vectors`).
    """

    def __init__(self, vectors: Vectors, served: Sequence[str], objectives: Sequence[str]):
        self.users, self.items = vectors
        self.served, self.objectives = list(served), list(objectives)
        self._result = MethodResult("validation", self.users, self.items, 0.0, 0, 0)
        self._top = TopKCache()

    def mode(self, t: int, k: int, rows: np.ndarray | None = None) -> np.ndarray:
        o = self.served[t]
        return self._top.get(("mode", o), k, lambda: (self.users[o].float(), self.items[o].float()), rows)

    def fused(self, weights: Sequence[float], k: int) -> np.ndarray:
        w = tuple(float(x) for x in weights)

        def vectors():
            u, v = fused_vectors(self._result, dict(zip(self.objectives, w)))
            return u.float(), v.float()

        return self._top.get(("fused", w), k, vectors)


def vectors_score(
    vectors: Vectors,
    data_val: CascadeData,
    weights: Sequence[float],
    k: int,
    *,
    scorers: Sequence[str] = ("own", "fused"),
    ranked: ResultRanked | None = None,
    popularity: Sequence[tuple[float, int]] | None = None,
) -> ValidationScore:
    """`selection.validation_score` of a method's validation-user vectors over the objectives they serve
    (weights: one per objective of the data; those of objectives not served do not count).
    popularity: `served_popularity(vectors, data_val, k)` when already computed (the same values)."""
    served, sub, counts = _served(vectors, data_val)
    ranked = ranked or ResultRanked(vectors, served, list(data_val.objectives))
    return validation_score(ranked, sub, served, counts, weights, k, scorers=scorers, popularity=popularity)


def _served(vectors: Vectors, data_val: CascadeData) -> tuple[list[str], EvalRows, list[np.ndarray]]:
    """(objectives the vectors serve, their validation users' positives, their popularity counts)."""
    objectives = list(data_val.objectives)
    served = [o for o in objectives if o in vectors[0]]
    idx = [objectives.index(o) for o in served]
    val = data_val.val
    sub = val.objectives_subset(idx)
    return served, sub, [data_val.val_counts[i] for i in idx]


def served_popularity(vectors: Vectors, data_val: CascadeData, k: int) -> list[tuple[float, int]]:
    """`selection.popularity_recalls` over the objectives the vectors serve (in their order)."""
    _, sub, counts = _served(vectors, data_val)
    return popularity_recalls(sub, counts, k)


def choose_vector_weights(
    vectors: Vectors, data_val: CascadeData, k: int, grid: Sequence[tuple[float, ...]] | None = None
) -> tuple[tuple[float, ...], list[dict], ResultRanked]:
    """(best weights, one row per scored candidate, the ranking cache): `selection.choose_weights` for
    any method's vectors (the same grid, or the same search beyond `selection.FULL_GRID_MAX`
    weightings). Candidates giving every served objective weight 0 are skipped (no ranking)."""
    objectives = list(data_val.objectives)
    served = [o for o in objectives if o in vectors[0]]
    idx = [objectives.index(o) for o in served]
    ranked = ResultRanked(vectors, served, objectives)
    pop = served_popularity(vectors, data_val, k)  # once, not per weighting

    def fused(w: tuple[float, ...]) -> ValidationScore:
        return vectors_score(vectors, data_val, w, k, scorers=("fused",), ranked=ranked, popularity=pop)

    best, rows = choose_by_fused_score(
        len(objectives), fused, grid, keep=lambda w: any(w[i] > 0 for i in idx)
    )
    return best, rows, ranked


# ---- the hooks: selection pass and refit ----------------------------------------------------------
@dataclass
class PartRecord:
    """One part in the selection pass: every considered epoch and its validation score."""

    modules: list[nn.Module]
    encode: Encode
    track: BestEpoch = field(default_factory=BestEpoch)  # epochs, scores, the best, patience
    cap: int | None = None
    objectives: list[str] = field(default_factory=list)
    state: list[dict[str, torch.Tensor]] | None = None
    done: bool = False

    @property
    def epochs(self) -> list[int]:
        return self.track.epochs

    @property
    def scores(self) -> list[float]:
        return self.track.scores

    @property
    def best_epoch(self) -> int | None:
        return self.track.best_epoch

    @property
    def chosen(self) -> int:
        """The kept epoch; without any finite score (no validation positive) the cap, as CSMF's steps."""
        if self.best_epoch is not None:
            return self.best_epoch
        return self.cap if self.cap is not None else (self.epochs[-1] if self.epochs else 0)

    def summary(self) -> dict:
        return {
            "cap": self.cap,
            "chosen": self.chosen,
            "objectives": self.objectives,
            "epochs": list(self.epochs),
            "scores": list(self.scores),
        }


class Selector(EpochHook):
    """The selection pass's hook: scores a part after every epoch on the validation users, keeps a copy
    of its best epoch's parameters and puts them back at the part's end (module docstring, step 1)."""

    def __init__(self, data_val: CascadeData, k: int, patience: int = 0):
        self.data, self.k, self.patience = data_val, k, int(patience)
        self.tables = data_val.catalog_tables("val")
        self.parts: dict[str, PartRecord] = {}
        self.final: Vectors | None = None

    def epochs(self, part: str, cap: int) -> int:
        self._part(part).cap = int(cap)
        return int(cap)

    def begin(self, part: str, modules: Sequence[nn.Module], encode: Encode, *, start: bool = False) -> None:
        if part in self.parts:
            raise ValueError(f"part {part!r} began twice: a method's parts must have distinct names")
        self.parts[part] = PartRecord(list(modules), encode, BestEpoch(self.patience))
        if start:
            self._consider(part, 0)

    def on_epoch(self, part: str) -> Callable[[int], bool]:
        self._part(part)
        return lambda epoch: self._consider(part, epoch)

    def end(self, part: str) -> None:
        rec = self._part(part)
        if rec.state is not None:
            with torch.no_grad():
                for m, state in zip(rec.modules, rec.state):
                    m.load_state_dict(state)
        rec.state, rec.done = None, True

    def finish(self, encode: Encode) -> None:
        self.final = self._encode(encode, [m for r in self.parts.values() for m in r.modules])

    def _part(self, part: str) -> PartRecord:
        if part not in self.parts:
            raise ValueError(f"part {part!r} trains before hook.begin({part!r}, ...)")
        return self.parts[part]

    def _encode(self, encode: Encode, modules: Sequence[nn.Module]) -> Vectors:
        was = [m.training for m in modules]
        for m in modules:
            m.eval()
        try:
            return encode(self.data.val, self.tables)
        finally:
            for m, t in zip(modules, was):
                m.train(t)

    def _consider(self, part: str, epoch: int) -> bool:
        """Score `part` after `epoch`, keep it if best; True when the part should stop (train.patience
        considered epochs in a row without beating a finite best, as `validation.EpochSelector`)."""
        rec = self._part(part)
        vectors = self._encode(rec.encode, rec.modules)
        s = vectors_score(vectors, self.data, (1.0,) * len(self.data.objectives), self.k, scorers=("own",))
        rec.objectives = [o for o in self.data.objectives if o in vectors[0]]
        if rec.track.offer(epoch, s.score):
            rec.state = [{n: p.detach().clone() for n, p in m.state_dict().items()} for m in rec.modules]
        return rec.track.stop


class Refit(EpochHook):
    """The refit's hook: part p trains exactly `chosen[p]` epochs (at most its cap: a joint schedule on
    more rows can have one joint epoch fewer), nothing else happens between epochs."""

    def __init__(self, chosen: dict[str, int]):
        self.chosen = dict(chosen)
        self.trained: dict[str, int] = {}

    def epochs(self, part: str, cap: int) -> int:
        if part not in self.chosen:
            raise ValueError(
                f"the refit trains part {part!r}, which the selection pass did not ({self.chosen})"
            )
        self.trained[part] = min(int(self.chosen[part]), int(cap))
        return self.trained[part]


# ---- the protocol --------------------------------------------------------------------------------
def load_protocol_data(path, cfg: CSMFConfig, *, val_days: int | str | None = None):
    """(data_val, data_full) of a model-ready directory for the protocol: validation days held out
    (`val_days`, default cfg.data.val_days, where 0 means "auto": `selection.resolve_val_days`) and the
    whole window, both with cfg.data.item_stats. ValueError when the window has no room for them."""
    v = val_days if val_days is not None else cfg.data.val_days
    v = "auto" if v in (0, "auto") else int(v)
    windows = tuple(cfg.data.item_stats)
    data_val = load_cascade_data(path, val_days=v, item_stats_windows=windows)
    if data_val.val is None:
        raise ValueError(f"the protocol needs validation days; {data_val.val_why}")
    return data_val, load_cascade_data(path, item_stats_windows=windows)


def check_protocol_data(data_val: CascadeData, data_full: CascadeData | None, cfg: CSMFConfig) -> None:
    """Refuse data that would make the protocol something else: no validation users, a 'whole window'
    with days held out, different objectives, or item statistics other than cfg.data.item_stats."""
    if data_val.val is None or data_val.val_counts is None:
        raise ValueError("data_val needs validation days: load_cascade_data(..., val_days=V) with V > 0")
    want = len(data_val.objectives) * len(cfg.data.item_stats)
    for name, d in (("data_val", data_val), ("data_full", data_full)):
        if d is None:
            continue
        got = 0 if d.tables.item_stats is None else int(d.tables.item_stats.shape[2])
        if got != want:
            raise ValueError(
                f"{name} has {got} item-statistics columns but cfg.data.item_stats={list(cfg.data.item_stats)} "
                f"needs {want}: load it with item_stats_windows=cfg.data.item_stats (load_protocol_data)"
            )
    if data_full is not None:
        if data_full.val is not None:
            raise ValueError("data_full must be the whole window (val_days=0): the refit trains on every day")
        if list(data_full.objectives) != list(data_val.objectives):
            raise ValueError(f"objectives differ: {data_val.objectives} vs {data_full.objectives}")


def _resolve(method: str | Callable) -> tuple[str, Callable]:
    if callable(method):
        return getattr(method, "__name__", "custom"), method
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    return method, METHODS[method]


def _popularity_recall(counts: np.ndarray, rel, k: int) -> float:
    return float(recall_ndcg(popularity_topk(np.asarray(counts), len(rel), k), rel, (k,))[k]["recall"])


def _csmf_selection(name: str, data_val: CascadeData, cfg: CSMFConfig, seed: int, on_step: OnStep):
    """CSMF or an ablation: `tuning.run_trial` (weights auto) and the refit config it implies."""
    c = variant_config(name, with_seed(cfg, seed))
    apply_threads(c)
    steps = 0

    def counted(_: int, loss: float) -> None:  # run_step numbers each step's own steps from 1
        nonlocal steps
        steps += 1
        on_step(steps, loss)

    cfg_sel = trial_config(c, {"eval.fused_weights": "auto"})
    trial = run_trial(data_val, cfg_sel, on_step=None if on_step is None else counted)
    k = c.eval.primary_k
    parts = {}
    for rep, chosen in zip([r for r in trial.reports if r.step.kind == "train"], trial.epochs):
        t = rep.step.stage
        pop = _popularity_recall(data_val.val_counts[t], data_val.val.relevant(t), k)
        parts[rep.step.name] = {
            "cap": c.epochs_for(t),
            "chosen": chosen,
            "objectives": [data_val.objectives[t]],
            "epochs": list(range(len(rep.val_scores))),
            # own-mode Recall@K / popularity's: the part score of every other method
            "scores": [r / max(pop, 1e-3) for r in rep.val_scores],
        }
    info = {
        "parts": parts,
        "epochs": {p: v["chosen"] for p, v in parts.items()},
        "val_score": trial.score,
        "val_metrics": trial.metrics,
        "weights": list(trial.weights),
        "weight_rows": trial.weight_rows,
    }
    return info, refit_config(c, trial)


def _selection(method: str | Callable, data_val: CascadeData, cfg: CSMFConfig, seed: int, on_step: OnStep):
    """(info, what the refit needs): the selection pass of any method."""
    name, fit = _resolve(method)
    check_protocol_data(data_val, None, cfg)
    t0 = time.perf_counter()
    if name in VARIANTS:
        info, refit_cfg = _csmf_selection(name, data_val, cfg, seed, on_step)
        info["seconds"] = {"selection": time.perf_counter() - t0}
        return name, info, refit_cfg
    k = cfg.eval.primary_k
    sel = Selector(data_val, k, cfg.train.patience)
    fit(data_val, cfg, seed, on_step=on_step, hook=sel)
    if sel.final is None:
        raise RuntimeError(f"method {name!r} did not call hook.finish(encode) after training")
    unfinished = [p for p, r in sel.parts.items() if not r.done]
    if unfinished:
        raise RuntimeError(f"method {name!r} never called hook.end for part(s) {unfinished}")
    weights, rows, ranked = choose_vector_weights(sel.final, data_val, k)
    score = vectors_score(sel.final, data_val, weights, k, ranked=ranked)
    info = {
        "parts": {p: r.summary() for p, r in sel.parts.items()},
        "epochs": {p: r.chosen for p, r in sel.parts.items()},
        "val_score": score.score,
        "val_metrics": score.metrics(),
        "weights": list(weights),
        "weight_rows": rows,
        "seconds": {"selection": time.perf_counter() - t0},
    }
    return name, info, None


def selection_score(
    method: str | Callable, data_val: CascadeData, cfg: CSMFConfig, seed: int, on_step: OnStep = None
) -> tuple[float, dict]:
    """The selection pass alone: (validation score, info), what a `--tune-trials` trial of `method`
    returns (module docstring, steps 1-2). info: parts (per part: cap, chosen epoch, objectives,
    considered epochs and their scores), epochs (chosen per part), val_score, val_metrics, weights
    (one per objective of the data), weight_rows, seconds."""
    _, info, _ = _selection(method, data_val, cfg, seed, on_step)
    return info["val_score"], info


def fit_with_protocol(
    method: str | Callable,
    data_val: CascadeData,
    data_full: CascadeData,
    cfg: CSMFConfig,
    seed: int,
    on_step: OnStep = None,
    *,
    on_select_step: OnStep = None,
) -> tuple[MethodResult, dict]:
    """Select on the validation days, choose the fused weights there, refit on the whole window.

    method: a name of `METHODS`, or a fit function with their signature and a `hook` keyword.
    on_step: the refit's step callback (the trained model the report evaluates); on_select_step: the
    selection pass's. Returns the refit's MethodResult (evaluated on data_full.eval by the caller, with
    `info["weights"]` as its default fused weights) and info: what `selection_score` gives plus
    refit_epochs (epochs each part trained in the refit), seconds {selection, refit}, val_days, seed.
    The same info is kept as result.info["protocol"].
    """
    check_protocol_data(data_val, data_full, cfg)
    name, info, refit_cfg = _selection(method, data_val, cfg, seed, on_select_step)
    t0 = time.perf_counter()
    if refit_cfg is not None:  # CSMF or an ablation: the cascade with the kept epochs and weights
        result = train_csmf(data_full, refit_cfg, seed, on_step, method=name).result
        info["refit_epochs"] = dict(zip(info["parts"], refit_cfg.train.epochs))
    else:
        refit = Refit(info["epochs"])
        result = _resolve(method)[1](data_full, cfg, seed, on_step=on_step, hook=refit)
        missing = sorted(set(info["epochs"]) - set(refit.trained))
        if missing:
            raise RuntimeError(f"method {name!r}: the refit did not train part(s) {missing}")
        info["refit_epochs"] = refit.trained
    info["seconds"]["refit"] = time.perf_counter() - t0
    info |= {
        "protocol": "select-then-refit",
        "method": name,
        "seed": int(seed),
        "val_days": data_val.val_days,
    }
    result.info["protocol"] = info
    return result, info
