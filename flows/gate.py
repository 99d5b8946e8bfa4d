"""Champion/challenger gate: may this run's model replace the champion?

    checks = verify_model(rec, stage_ends, sample_users=256)          # list[Check]
    late = trained_too_late(window.eval_dates, champion_rec.info["train_dates"])  # None: compare here
    days = comparison_dates(partitions, [champion_train, window.train_dates], eval_days)  # else here
    new, old, why, users = same_day_metrics(rec, champion_rec, model_ready, 50)   # SAME eval days
    d = decide(checks, new, old, champion_version="3", users=users, min_users=10, days=days)
    d.promote, d.reason

Every run registers a version with alias "challenger" (flows/registry.py); the flow's `gate` task
then calls these functions and moves "champion" only when `decide` says so. Rules, in order:

1. Verification must pass (`verify_model`): exact fusion on a sample (the fused query's inner
   product with the indexed item vector equals sum_t k_t s_t, where s_t comes from the model's own
   mode-t forward pass on both towers), frozen parameters (entries owned by stage t are
   bit-identical between the end of stage t and the final model) and index == towers (the FAISS
   index holds exactly the item tower's full-mode vectors, and its top-k equals brute force).
2. `gate.enabled=false` never promotes.
3. The evaluation data must be able to measure the model: every objective needs at least
   `gate.min_users` evaluation users with a positive, and at least one metric must be computable.
   Otherwise nothing is promoted, not even a first model: a day without positives (a broken export)
   scores every model NaN, and NaN metrics dropped from a comparison used to let an untrained model
   through. An operator can still promote by hand.
4. No champion yet: promote (the first measurable model becomes champion).
5. The champion was trained on identical inputs (dataset digest, training-config digest, code
   version, date): keep it, so re-running a date never promotes twice.
6. The champion could not be re-evaluated (another dataset's model, other objectives, bundle not
   loadable, no training dates, no day after both training windows): keep it.
7. Metrics: recall and nDCG at eval.primary_k, per objective, under the objective's own score and
   the fused score, of the challenger and of the champion re-evaluated on the SAME days, days that
   come after every training day of both models (`trained_too_late`, `comparison_dates`): a
   backfill's evaluation day lies inside a newer champion's training window, where the champion
   would be scored on data it learned from. Both metric sets must have the same keys and at least one;
   any drop larger than `gate.tolerance` (absolute) keeps the champion.

No prefect or mlflow here: pure functions over a `Recommender`, testable on their own.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from csmf_core.checkpoint import load_checkpoint
from csmf_core.config import GateConfig
from csmf_core.masks import param_owners
from csmf_core.metrics import md_cell

FUSION_RTOL = 1e-4  # float32 sums of 64 products, relative to the score scale
INDEX_ATOL = 1e-5


@dataclass(frozen=True)
class Check:
    name: str  # "exact_fusion" | "frozen_parameters" | "index_matches_towers"
    ok: bool
    detail: str


@dataclass
class Decision:
    promote: bool
    reason: str
    checks: list[Check] = field(default_factory=list)
    challenger: dict[str, float] = field(default_factory=dict)
    champion: dict[str, float] = field(default_factory=dict)
    champion_version: str | None = None
    days: list[str] = field(default_factory=list)  # evaluation days the metrics come from
    users: dict[str, int] = field(default_factory=dict)  # evaluation users with a positive, per objective

    @property
    def verified(self) -> bool:
        """Every verification check ran and passed (rule 1), whatever the decision."""
        return bool(self.checks) and all(c.ok for c in self.checks)

    def verdict(self) -> str:
        if self.promote:
            return "promoted to champion"
        return "champion kept" if self.champion_version else "not promoted (no champion)"

    def to_markdown(self) -> str:
        """The Prefect artifact: verdict, checks, the evaluation data, and the metric comparison."""
        lines = [f"**Gate: {self.verdict()}.** {self.reason}", "", "| check | ok | detail |", "|---|---|---|"]
        # cells escaped: the exact_fusion detail reads "max |fused - sum k_t s_t| = ..."
        lines += [
            f"| {md_cell(c.name)} | {'yes' if c.ok else 'NO'} | {md_cell(c.detail)} |" for c in self.checks
        ]
        if self.days or self.users:
            users = ", ".join(f"{o} {n}" for o, n in self.users.items()) or "unknown"
            lines += ["", f"Evaluated on {', '.join(self.days) or '?'}; users with a positive: {users}."]
        if self.challenger:
            old = f"champion v{self.champion_version}" if self.champion_version else "champion"
            lines += ["", f"| metric | challenger | {old} | diff |", "|---|---:|---:|---:|"]
            for k, v in self.challenger.items():
                c = self.champion.get(k)
                diff = "" if c is None else f"{v - c:+.4f}"
                lines.append(f"| {md_cell(k)} | {v:.4f} | {'' if c is None else f'{c:.4f}'} | {diff} |")
        return "\n".join(lines)


# ---- verification ----------------------------------------------------------------------------------
def unknown_id(vocab: np.ndarray) -> int:
    """An int64 id not in `vocab`: max + 1, else min - 1 when max is int64's largest, else (both
    extremes taken) the smallest id >= 0 not in it (one of 0..len(vocab) always is)."""
    vocab = np.asarray(vocab, dtype=np.int64)
    if not len(vocab):
        return 1
    info = np.iinfo(np.int64)
    if int(vocab.max()) < info.max:
        return int(vocab.max()) + 1
    if int(vocab.min()) > info.min:
        return int(vocab.min()) - 1
    free = np.arange(len(vocab) + 1, dtype=np.int64)
    return int(free[~np.isin(free, vocab)][0])


def _sample_users(rec, n: int, seed: int) -> np.ndarray:
    """Up to n known user ids (random, fixed seed) plus one unknown id (the cold-start row)."""
    vocab = np.asarray(rec.user_vocab, dtype=np.int64)
    rng = np.random.default_rng(seed)
    known = vocab if len(vocab) <= n else rng.choice(vocab, size=n, replace=False)
    return np.concatenate([known, np.array([unknown_id(vocab)], dtype=np.int64)])


@torch.no_grad()
def check_exact_fusion(rec, users: np.ndarray, weights: list[np.ndarray]) -> Check:
    """Fused query . indexed item vector == sum_t k_t (mode-t user vector . mode-t item vector).

    The right side runs the model's towers in mode t (csmf_core.model), independently of the
    segment scaling serving uses (csmf_core.fusion)."""
    idx, _ = rec.user_indices(users)
    ut = torch.from_numpy(idx)
    hists = [h[ut] for h in rec._hists]  # the bundle's user state, as Recommender.user_vectors reads it
    dev = next(rec.model.parameters()).device
    x_u = rec.tables.user_inputs(ut.to(dev), [h.to(dev) for h in hists])
    items = torch.arange(1, rec.tables.items_cat.shape[0], device=dev)
    x_i = rec.tables.item_inputs(items)
    per_mode = [
        (rec.model.user_vectors(x_u, t).float() @ rec.model.item_vectors(x_i, t).float().T).cpu()
        for t in range(rec.n_stages)
    ]
    _, item_vecs = rec.item_vectors()
    worst, scale = 0.0, 1.0
    for w in weights:
        q, _ = rec.user_vectors(users, weights=w)
        served = torch.from_numpy(q) @ torch.from_numpy(item_vecs).T
        exact = sum(float(k) * s for k, s in zip(w, per_mode))
        worst = max(worst, float((served - exact).abs().max()))
        scale = max(scale, float(exact.abs().max()))
    ok = worst <= FUSION_RTOL * scale
    return Check(
        "exact_fusion",
        ok,
        f"{len(users)} users x {len(items)} items x {len(weights)} weightings: max |fused - sum k_t s_t| "
        f"= {worst:.2e} (limit {FUSION_RTOL * scale:.2e})",
    )


def check_frozen(final_checkpoint: Path, stage_ends: Mapping[int, Path]) -> Check:
    """Entries whose final owner is <= t are bit-identical between stage t's last checkpoint and the
    final model (CPP only ever hands units from the current stage to the next, so these owners never
    change after stage t ends)."""
    model, owners, _ = load_checkpoint(final_checkpoint)
    final = dict(model.named_parameters())
    own = param_owners(model, owners)
    bad, checked = [], 0
    for t, path in sorted(stage_ends.items()):
        old = dict(load_checkpoint(path)[0].named_parameters())
        for name, o in own.items():
            p = final[name]
            mask = (o.long() <= t).expand(p.shape) if o.shape != p.shape else o.long() <= t
            n = int(mask.sum())
            if n == 0:
                continue
            checked += n
            changed = int((final[name].detach()[mask] != old[name].detach()[mask]).sum())
            if changed:
                bad.append(f"{name}: {changed} of {n} stage<={t} entries changed after stage {t}")
    if not stage_ends:
        return Check("frozen_parameters", True, "single-stage model: nothing frozen")
    detail = (
        "; ".join(bad[:5])
        if bad
        else f"{checked} frozen entries bit-identical across {len(stage_ends)} stages"
    )
    return Check("frozen_parameters", not bad, detail)


def check_index(rec, users: np.ndarray, k: int = 10) -> Check:
    """The index holds the towers' item vectors (same ids, same vectors) and, for a flat index,
    its top-k for fused queries equals a brute-force top-k over the towers' vectors."""
    ids, vecs = rec.item_vectors()
    index = rec.index
    if sorted(index.ids.tolist()) != sorted(ids.tolist()):
        return Check("index_matches_towers", False, f"index has {index.ntotal} ids, the towers {len(ids)}")
    problems = []
    try:
        stored = index.index.reconstruct_n(0, index.ntotal)
    except RuntimeError:  # an index type without reconstruction: fall back to the search check only
        stored = None
    if stored is not None:
        pos = {int(v): r for r, v in enumerate(ids.tolist())}
        order = np.array([pos[int(v)] for v in index.ids.tolist()])
        diff = float(np.abs(stored - vecs[order]).max()) if len(order) else 0.0
        if diff > INDEX_ATOL:
            problems.append(f"stored vectors differ from the item tower by up to {diff:.2e}")
    if index.kind == "flat" and len(ids) and len(users):
        q, _ = rec.user_vectors(users, weights=rec.default_weights)
        kk = min(k, len(ids))
        got = index.search(q, kk).scores
        brute = np.sort(q @ vecs.T, axis=1)[:, ::-1][:, :kk]
        gap = float(np.abs(got - brute).max())
        if gap > FUSION_RTOL * max(1.0, float(np.abs(brute).max())):
            problems.append(f"top-{kk} scores differ from brute force by up to {gap:.2e}")
    detail = "; ".join(problems) or f"{index.ntotal} item vectors identical; top-{k} equals brute force"
    return Check("index_matches_towers", not problems, detail)


def verify_model(
    rec, final_checkpoint: Path, stage_ends: Mapping[int, Path], sample_users: int = 256, seed: int = 0
) -> list[Check]:
    """The three verification checks (module docstring, rule 1) on a loaded Recommender."""
    users = _sample_users(rec, sample_users, seed)
    rng = np.random.default_rng(seed)
    weights = [rec.default_weights, rng.uniform(0.1, 3.0, rec.n_stages).astype(np.float32)]
    return [
        check_exact_fusion(rec, users, weights),
        check_frozen(final_checkpoint, stage_ends),
        check_index(rec, users),
    ]


# ---- metrics and the decision ----------------------------------------------------------------------
def gate_metrics(rows: list[dict], objectives: list[str], k: int) -> dict[str, float]:
    """{"click/click/recall@50": ..., "click/fused/ndcg@50": ...}: own and fused scorers at k.

    NaN values (no evaluation users with that objective) are left out; `gate_users` says why, and
    `decide` refuses to promote on such data (rule 3)."""
    out = {}
    for r in rows:
        if r["k"] != k or r["objective"] not in objectives or r["scorer"] not in (r["objective"], "fused"):
            continue
        for m in ("recall", "ndcg"):
            v = float(r[m])
            if v == v:
                out[f"{r['objective']}/{r['scorer']}/{m}@{k}"] = v
    return out


def gate_users(rows: list[dict], objectives: list[str], k: int) -> dict[str, int]:
    """{objective: evaluation users with at least one positive of it}: the `users` count of the
    objective's own-scorer row at k (the users its recall is averaged over); 0 when it has no row."""
    out = dict.fromkeys(objectives, 0)
    for r in rows:
        if r["k"] == k and r["objective"] in out and r["scorer"] == r["objective"]:
            out[r["objective"]] = int(r["users"])
    return out


def unmeasured(users: Mapping[str, int], min_users: int) -> list[str]:
    """One entry ("click: 3 users with a positive") per objective with fewer than `min_users` such users.

    Below a handful of users one user moves recall by a tenth or more: the comparison would be
    noise, and with none every metric is NaN."""
    return [f"{o}: {n} users with a positive" for o, n in users.items() if n < min_users]


def _dates(days) -> list[str]:
    return sorted({str(d) for d in days})


def _span(days: list[str]) -> str:
    return days[0] if len(days) == 1 else f"{days[0]}..{days[-1]}"


def trained_too_late(eval_dates, train_dates) -> str | None:
    """Why a model trained on `train_dates` cannot be judged on `eval_dates`, or None when every one
    of its training days precedes the first evaluation day (the situation a served model is in).

    Not only a training day equal to an evaluation day counts: a model trained on later days has
    seen those users' later behaviour (their histories include the evaluation day's positives)."""
    train, ev = _dates(train_dates), _dates(eval_dates)
    if not train or not ev or train[-1] < ev[0]:
        return None
    inside = [d for d in ev if d in set(train)]
    what = f"on {', '.join(inside)}" if inside else "on later days"
    return f"trained {what} (its window {_span(train)}), not before the evaluation day(s) {', '.join(ev)}"


def comparison_dates(partitions, train_windows, eval_days: int) -> list[str] | None:
    """The newest `eval_days` consecutive calendar days that all have a partition and all come after
    every training day of every window; None when the dataset has no such days."""
    last = max((d for w in train_windows for d in _dates(w)), default="")
    have = set(_dates(partitions))
    for start in sorted(have, reverse=True):
        if start <= last:
            return None
        first = dt.date.fromisoformat(start)
        days = [(first + dt.timedelta(days=i)).isoformat() for i in range(eval_days)]
        if all(d in have for d in days):
            return days
    return None


def same_day_metrics(challenger, champion, model_ready: Path, k: int):
    """(challenger metrics, champion metrics or None, why not comparable or None, challenger users per
    objective), both models evaluated with the same function on the same model-ready data.

    `Recommender.evaluate` maps the data's users and items to each model's own vocabulary through
    the original ids, so a champion trained on an older window is scored on these days' events."""
    rows = challenger.evaluate(model_ready, ks=(k,))
    new, users = gate_metrics(rows, challenger.objectives, k), gate_users(rows, challenger.objectives, k)
    if champion is None:
        return new, None, None, users
    if champion.objectives != challenger.objectives:
        return new, None, f"objectives {champion.objectives} differ from {challenger.objectives}", users
    old = gate_metrics(champion.evaluate(model_ready, ks=(k,)), challenger.objectives, k)
    return new, old, None, users


def regressions(
    challenger: Mapping[str, float], champion: Mapping[str, float], tolerance: float
) -> list[str]:
    """Metrics where the challenger is below the champion by more than `tolerance` (absolute)."""
    return [
        f"{key} {challenger[key]:.4f} < champion {champion[key]:.4f} - {tolerance:g}"
        for key in champion
        if key in challenger and challenger[key] < champion[key] - tolerance
    ]


def decide(
    checks: list[Check],
    challenger: Mapping[str, float],
    champion: Mapping[str, float] | None,
    *,
    champion_version: str | None,
    users: Mapping[str, int],
    min_users: int = GateConfig.min_users,
    days=(),
    note: str | None = None,
    identical_inputs: bool = False,
    tolerance: float = 0.005,
    enabled: bool = True,
    incomparable: str | None = None,
) -> Decision:
    """Apply the rules of the module docstring. champion: its metrics on the same days (None when
    there is no champion or it was not evaluated); users: evaluation users with a positive per
    objective on those days (`gate_users`); days: those days; note: why they are not this run's own
    evaluation days, if so; incomparable: why the champion could not be re-evaluated, if so."""
    days = _dates(days)
    on = f" on {', '.join(days)}" if days else ""
    tail = f". Why these days: {note}" if note else ""

    def d(promote: bool, reason: str) -> Decision:
        return Decision(
            promote,
            reason + tail,
            list(checks),
            dict(challenger),
            dict(champion or {}),
            champion_version,
            days,
            dict(users),
        )

    failed = [c for c in checks if not c.ok]
    if failed:
        return d(False, "verification failed: " + "; ".join(f"{c.name}: {c.detail}" for c in failed))
    if not enabled:
        return d(False, "gate.enabled is false: versions are never promoted automatically")
    problems = unmeasured(users, min_users) or ([] if challenger else ["no metric could be computed"])
    if problems:
        what = (
            f"the evaluation data{on} cannot measure the model: {'; '.join(problems)} "
            f"(gate.min_users {min_users})"
        )
        if champion_version is None:
            return d(
                False,
                f"{what}; not promoted although there is no champion yet: a model that was not measured "
                "never becomes champion by itself. Check the export of those days and re-run, or "
                "promote this version by hand (flows.registry.promote)",
            )
        return d(False, f"{what}; champion v{champion_version} kept")
    if champion_version is None:
        return d(True, f"first model: no champion yet (measured{on}: {len(challenger)} metrics)")
    if identical_inputs:
        return d(
            False,
            f"champion v{champion_version} was trained on identical inputs (dataset digest, config "
            "digest, code version, date): re-running a date does not promote again",
        )
    if incomparable:
        return d(False, f"champion v{champion_version} could not be compared: {incomparable}")
    old = dict(champion or {})
    lacking, extra = sorted(set(old) - set(challenger)), sorted(set(challenger) - set(old))
    if lacking or extra:
        return d(
            False,
            f"champion v{champion_version} kept: the metric sets differ{on} (challenger lacks {lacking}, "
            f"champion lacks {extra})",
        )
    if not old:
        return d(False, f"champion v{champion_version} kept: no metric could be compared{on}")
    worse = regressions(challenger, old, tolerance)
    if worse:
        return d(
            False,
            f"worse than champion v{champion_version}{on} beyond tolerance {tolerance:g}: "
            + "; ".join(worse),
        )
    return d(
        True,
        f"no metric below champion v{champion_version}{on} by more than {tolerance:g} "
        f"({len(challenger)} metrics compared)",
    )
