"""Choosing from validation days only: how many days to hold out, one validation score, and the
default fusion weights.

Everything a run or `csmf tune` chooses is chosen here, on the validation days (the last days of the
training window, csmf_core/validation.py), never on the evaluation days.

**Held-out days** (`data.val_days: auto`, `resolve_val_days`): with a training window of n days and
an evaluation period of E days, hold out V = min(E, n // 4) days, so that validation mirrors the
evaluation period and still leaves at least three quarters of the window to train on. A window of
fewer than 4 days has no room for it (V = 0, logged). Epoch selection is single-process and reads
rows in memory, so with `train.loader: parquet` or `train.processes > 1` auto means 0 (logged).

**The validation score** (`validation_score`): one scalar that puts every objective on the same
scale. For objective t, take the validation users with at least one positive of t; compute the
model's Recall@K under t's own mode and under the fused score, and the popularity ranking's
Recall@K on the same users (items by positives of t in the training rows before the validation
days: what a popularity ranking knew when those days began). The score is the mean over objectives
and the two scorers of model / popularity. 1.0 = as good as popularity; a sparse objective (a few
hundred conversions) weighs as much as a dense one. Objectives without a validation positive are
left out (and named). `csmf tune` maximises it; the fused part alone chooses the weights below.

**Default fusion weights** (`eval.fused_weights: auto`, `choose_weights`): after training, every
weighting of `weight_grid(N)` is scored on the validation users by the fused part of the score
(mean over objectives of fused Recall@K / popularity's); the best becomes the model's default
weights (requests still pass their own). The grid fixes k_0 = 1 (rankings do not change when every
weight is scaled) and takes k_t for t >= 1 from `WEIGHT_STEPS`, plus the paper's weights. Ties keep
the paper's weights, then the earlier grid entry.

The full grid has len(WEIGHT_STEPS) ** (N - 1) weightings: 37 with three objectives, but 216 with
four and 1,296 with five, each one top-k ranking of every validation user against the whole catalog
(measured: 1,296 weightings doubled a 5-objective selection pass on the generated `small` world, 35 ->
67 s; on KuaiRand's catalog one weighting takes ~0.45 s). So the full grid is scanned only while it
has at most `FULL_GRID_MAX` weightings (N <= 3: unchanged); beyond that `search_weights` runs a
coordinate search over the same steps (module `search_weights`), at most
1 + SEARCH_PASSES * (N - 1) * (len(WEIGHT_STEPS) - 1) weightings (81 for five objectives): exact on
scores that add up over objectives' weights one at a time; in general a local optimum (no single k_t
change improves it) when a pass moved nothing before the pass limit, else the best found. The weight
table logged with the run shows every weighting scored.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from csmf_core.evaluate import EvalRows, Ranked
from csmf_core.metrics import Relevant, popularity_topk, recall_ndcg
from csmf_core.model import TwoTower
from csmf_core.rows import FeatureTables, TrainRows

AUTO = "auto"
PAPER_WEIGHTS = (1.0, 1.8, 1.2)  # <k_d, k_o, k_r> of the paper (three objectives)
WEIGHT_STEPS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)  # k_t / k_0 for t >= 1
FULL_GRID_MAX = 64  # the whole grid is scored up to this size (three objectives: 37); above, a search
SEARCH_PASSES = 4  # coordinate passes of that search at most (it stops at the first that moves nothing)
MIN_TRAIN_DAYS_PER_VAL_DAY = 3  # auto holds out at most a quarter of the window


def resolve_val_days(
    setting: int | str, n_train_days: int, eval_days: int, *, loader: str = "memory", processes: int = 1
) -> tuple[int, str]:
    """(validation days, why) for `data.val_days` = an int or "auto" (module docstring)."""
    if setting != AUTO:
        return int(setting), f"data.val_days={int(setting)} (set explicitly)"
    if loader != "memory" or processes != 1:
        return 0, (
            f"data.val_days=auto -> 0: epoch selection needs train.loader=memory and train.processes=1 "
            f"(got {loader}, {processes})"
        )
    v = min(int(eval_days), n_train_days // (MIN_TRAIN_DAYS_PER_VAL_DAY + 1))
    if v < 1:
        return 0, (
            f"data.val_days=auto -> 0: the training window has {n_train_days} day(s); holding out "
            f"validation days needs at least {MIN_TRAIN_DAYS_PER_VAL_DAY + 1}"
        )
    return v, (
        f"data.val_days=auto -> {v}: the last {v} of {n_train_days} training days are validation days "
        f"(min(eval_days={eval_days}, {n_train_days} // {MIN_TRAIN_DAYS_PER_VAL_DAY + 1}))"
    )


def positives_per_item(rows: TrainRows, n_items: int, n_objectives: int) -> list[np.ndarray]:
    """counts[t]: (n_items,) positives of objective t per item index among `rows` (level >= t)."""
    i, level = rows.i.numpy(), rows.level.numpy()
    return [np.bincount(i[level >= t], minlength=n_items).astype(np.int64) for t in range(n_objectives)]


def weight_grid(n_objectives: int) -> list[tuple[float, ...]]:
    """The default-weight candidates: k_0 = 1, k_t in WEIGHT_STEPS for t >= 1, the paper's first."""
    grid = [(1.0, *rest) for rest in itertools.product(WEIGHT_STEPS, repeat=n_objectives - 1)]
    if n_objectives == len(PAPER_WEIGHTS):
        grid = [PAPER_WEIGHTS] + [w for w in grid if w != PAPER_WEIGHTS]
    return grid


def search_weights(
    n_objectives: int,
    score: Callable[[tuple[float, ...]], float],
    grid: Sequence[tuple[float, ...]] | None = None,
    keep: Callable[[tuple[float, ...]], bool] | None = None,
) -> tuple[tuple[float, ...], list[tuple[float, ...]]]:
    """(best weighting, the weightings scored in the order they were scored) under `score` (higher is
    better; each weighting scored once). keep(w) False: w is skipped unscored (e.g. no weight on any
    objective a method serves).

    With `grid`, or when `weight_grid(n_objectives)` has at most FULL_GRID_MAX entries: every entry in
    order, ties keeping the earlier one. Otherwise a coordinate search from equal weights: for
    t = 1 .. N-1 in turn, every WEIGHT_STEPS value of k_t with the others held, moving to the best
    (strictly better only, so ties keep the current weighting); up to SEARCH_PASSES passes, stopping
    after one that moves nothing (then no single k_t change improves the result)."""
    keep = keep or (lambda w: True)
    full = list(grid) if grid is not None else None
    if full is None and len(WEIGHT_STEPS) ** (n_objectives - 1) + 1 <= FULL_GRID_MAX:
        full = weight_grid(n_objectives)
    if full is not None:
        full = [tuple(float(x) for x in w) for w in full]
        order, best, best_score = [], full[0], float("-inf")
        for w in full:
            if not keep(w):
                continue
            order.append(w)
            s = score(w)
            if s > best_score:  # strict: ties keep the earlier candidate (the paper's weights first)
                best, best_score = w, s
        return best, order
    seen: dict[tuple[float, ...], float] = {}

    def value(w: tuple[float, ...]) -> float:
        if w not in seen:
            seen[w] = score(w) if keep(w) else float("-inf")
        return seen[w]

    best = (1.0,) * n_objectives
    best_score = value(best)
    for _ in range(SEARCH_PASSES):
        moved = False
        for t in range(1, n_objectives):
            start = best
            for step in WEIGHT_STEPS:
                w = start[:t] + (step,) + start[t + 1 :]
                if w != start and value(w) > best_score:
                    best, best_score, moved = w, seen[w], True
        if not moved:
            break
    return best, [w for w in seen if keep(w)]


def choose_by_fused_score(
    n_objectives: int,
    fused: Callable[[tuple[float, ...]], ValidationScore],
    grid: Sequence[tuple[float, ...]] | None = None,
    keep: Callable[[tuple[float, ...]], bool] | None = None,
) -> tuple[tuple[float, ...], list[dict]]:
    """`search_weights` by fused(w).score (a fused-only `ValidationScore` of weighting w): (best, one row
    {weights, score, <objective>: fused recall} per weighting scored, in the order scored). What
    `choose_weights` and the comparison protocol's `choose_vector_weights` share."""
    rows = {}

    def score(w: tuple[float, ...]) -> float:
        s = fused(w)
        rows[w] = {"weights": list(w), "score": s.score} | {o: s.recall[(o, "fused")] for o in s.users}
        return s.score

    best, order = search_weights(n_objectives, score, grid, keep)
    return best, [rows[w] for w in order]


@dataclass
class ValidationScore:
    """The validation score and what it is made of (module docstring).

    recall[(objective, scorer)]: the model's Recall@k, scorer = "own" or "fused";
    popularity[objective]: the popularity ranking's; ratio[(objective, scorer)] = recall / popularity;
    users[objective]: validation users with a positive; skipped: objectives without one."""

    score: float
    k: int
    weights: tuple[float, ...]
    recall: dict[tuple[str, str], float] = field(default_factory=dict)
    popularity: dict[str, float] = field(default_factory=dict)
    ratio: dict[tuple[str, str], float] = field(default_factory=dict)
    users: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def metrics(self, prefix: str = "val") -> dict[str, float]:
        """Flat tracker keys: `val/score`, `val/<objective>/<scorer>/recall@k`, `.../vs_popularity`."""
        out = {f"{prefix}/score": self.score}
        for (o, s), r in self.recall.items():
            out[f"{prefix}/{o}/{s}/recall@{self.k}"] = r
            out[f"{prefix}/{o}/{s}/ratio_to_popularity"] = self.ratio[(o, s)]
        out |= {f"{prefix}/{o}/popularity/recall@{self.k}": p for o, p in self.popularity.items()}
        return out


def _popularity_recall(counts: np.ndarray, rel: Relevant, k: int) -> tuple[float, int]:
    res = recall_ndcg(popularity_topk(np.asarray(counts), len(rel), k), rel, (k,))[k]
    return float(res["recall"]), int(res["users"])


def popularity_recalls(val: EvalRows, counts: Sequence[np.ndarray], k: int) -> list[tuple[float, int]]:
    """Per objective t, (popularity Recall@k, validation users with a positive of t): the part of
    `validation_score` that depends on neither the model nor the weights. A caller scoring several
    weightings of one model (`choose_weights`) computes it once and passes it as `popularity=`."""
    return [_popularity_recall(counts[t], val.relevant(t), k) for t in range(len(counts))]


def _ratio(model: float, pop: float) -> float:
    """model / popularity; a popularity recall of 0 (it found none of the positives) counts as 1e-3."""
    return model / max(pop, 1e-3)


def validation_score(
    ranked: Ranked,
    val: EvalRows,
    objectives: Sequence[str],
    counts: Sequence[np.ndarray],
    weights: Sequence[float],
    k: int,
    *,
    scorers: Sequence[str] = ("own", "fused"),
    popularity: Sequence[tuple[float, int]] | None = None,
) -> ValidationScore:
    """The score of one model on the validation users (`ranked` = Ranked(model, owners, tables, val)).

    counts[t]: popularity of objective t before the validation days (`positives_per_item` of the
    rows trained on). scorers: which parts enter the mean ("fused" alone for choosing weights).
    popularity: `popularity_recalls(val, counts, k)` when already computed (the same values)."""
    w = tuple(float(x) for x in weights)
    out = ValidationScore(float("nan"), k, w)
    ratios = []
    for t, o in enumerate(objectives):
        rel = val.relevant(t)
        pop, n = _popularity_recall(counts[t], rel, k) if popularity is None else popularity[t]
        if n == 0:
            out.skipped.append(o)
            continue
        out.popularity[o], out.users[o] = pop, n
        for s in scorers:
            top = ranked.mode(t, k, rows=rel.rows_with_positives()) if s == "own" else ranked.fused(w, k)
            r = float(recall_ndcg(top, rel, (k,))[k]["recall"])
            out.recall[(o, s)], out.ratio[(o, s)] = r, _ratio(r, pop)
            ratios.append(out.ratio[(o, s)])
    out.score = float(np.mean(ratios)) if ratios else float("nan")
    return out


@torch.no_grad()
def choose_weights(
    model: TwoTower,
    output_owners: torch.Tensor,
    tables: FeatureTables,
    val: EvalRows,
    objectives: Sequence[str],
    counts: Sequence[np.ndarray],
    k: int,
    grid: Sequence[tuple[float, ...]] | None = None,
    *,
    ranked: Ranked | None = None,
) -> tuple[tuple[float, ...], list[dict]]:
    """(best weights, one row per candidate {weights, score, <objective>: fused recall}), best first
    in the returned choice; rows in the order scored (the grid's, or `search_weights`' beyond
    FULL_GRID_MAX weightings; an explicit `grid` is scanned whole). The encoding is shared by every candidate (one
    `Ranked`), and so is the popularity reference (computed once per objective), so the grid costs
    one top-k and its recalls per weighting. ranked: `Ranked(model, output_owners, tables, val)`
    when the caller already has it (e.g. to score the chosen weights next: its top-k is kept)."""
    ranked = Ranked(model, output_owners, tables, val) if ranked is None else ranked
    pop = popularity_recalls(val, counts, k)

    def fused(w: tuple[float, ...]) -> ValidationScore:
        return validation_score(ranked, val, objectives, counts, w, k, scorers=("fused",), popularity=pop)

    best, rows = choose_by_fused_score(len(objectives), fused, grid)
    return tuple(best), rows
