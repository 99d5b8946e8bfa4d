"""Champion/challenger gate: may this run's model replace the champion?

    checks = verify_model(rec, stage_ends, sample_users=256)          # list[Check]
    new = gate_metrics(rec.evaluate(model_ready, ks=(50,)), rec.objectives, 50)
    old = gate_metrics(champion_rec.evaluate(model_ready, ks=(50,)), ...)   # SAME eval day
    d = decide(checks, new, old, champion="3", identical_inputs=False, tolerance=0.005)
    d.promote, d.reason

Every run registers a version with alias "challenger" (flows/registry.py); the flow's `gate` task
then calls these functions and moves "champion" only when `decide` says so. Rules, in order:

1. Verification must pass (`verify_model`): exact fusion on a sample (the fused query's inner
   product with the indexed item vector equals sum_t k_t s_t, where s_t comes from the model's own
   mode-t forward pass on both towers), frozen parameters (entries owned by stage t are
   bit-identical between the end of stage t and the final model) and index == towers (the FAISS
   index holds exactly the item tower's full-mode vectors, and its top-k equals brute force).
2. `gate.enabled=false` never promotes.
3. No champion yet: promote (the first model becomes champion).
4. The champion was trained on identical inputs (dataset digest, training-config digest, code
   version, date): keep it, so re-running a date never promotes twice.
5. Metrics: recall and nDCG at eval.primary_k, per objective, under the objective's own score and
   the fused score, of the challenger and of the champion re-evaluated on THIS run's evaluation
   data. Any drop larger than `gate.tolerance` (absolute) keeps the champion.

No prefect or mlflow here: pure functions over a `Recommender`, testable on their own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from csmf_core.checkpoint import load_checkpoint
from csmf_core.masks import param_owners

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

    def to_markdown(self) -> str:
        """The Prefect artifact: verdict, checks, and the metric comparison."""
        verdict = "promoted to champion" if self.promote else "champion kept"
        lines = [f"**Gate: {verdict}.** {self.reason}", "", "| check | ok | detail |", "|---|---|---|"]
        lines += [f"| {c.name} | {'yes' if c.ok else 'NO'} | {c.detail} |" for c in self.checks]
        if self.challenger:
            old = f"champion v{self.champion_version}" if self.champion_version else "champion"
            lines += ["", f"| metric | challenger | {old} | diff |", "|---|---:|---:|---:|"]
            for k, v in self.challenger.items():
                c = self.champion.get(k)
                diff = "" if c is None else f"{v - c:+.4f}"
                lines.append(f"| {k} | {v:.4f} | {'' if c is None else f'{c:.4f}'} | {diff} |")
        return "\n".join(lines)


# ---- verification ----------------------------------------------------------------------------------
def _sample_users(rec, n: int, seed: int) -> np.ndarray:
    """Up to n known user ids (random, fixed seed) plus one unknown id (the cold-start row)."""
    vocab = np.asarray(rec.user_vocab)
    rng = np.random.default_rng(seed)
    known = vocab if len(vocab) <= n else rng.choice(vocab, size=n, replace=False)
    cold = int(vocab.max()) + 1 if len(vocab) else 1
    return np.concatenate([known, [cold]]).astype(np.int64)


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

    NaN values (no evaluation users with that objective) are left out."""
    out = {}
    for r in rows:
        if r["k"] != k or r["objective"] not in objectives or r["scorer"] not in (r["objective"], "fused"):
            continue
        for m in ("recall", "ndcg"):
            v = float(r[m])
            if v == v:
                out[f"{r['objective']}/{r['scorer']}/{m}@{k}"] = v
    return out


def same_day_metrics(challenger, champion, model_ready: Path, k: int):
    """(challenger metrics, champion metrics or None, why not comparable or None), both models
    evaluated with the same function on the same model-ready data: this run's evaluation day(s).

    `Recommender.evaluate` maps the data's users and items to each model's own vocabulary through
    the original ids, so a champion trained on an older window is scored on today's events."""
    new = gate_metrics(challenger.evaluate(model_ready, ks=(k,)), challenger.objectives, k)
    if champion is None:
        return new, None, None
    if champion.objectives != challenger.objectives:
        return new, None, f"objectives {champion.objectives} differ from {challenger.objectives}"
    return new, gate_metrics(champion.evaluate(model_ready, ks=(k,)), challenger.objectives, k), None


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
    identical_inputs: bool = False,
    tolerance: float = 0.005,
    enabled: bool = True,
    incomparable: str | None = None,
) -> Decision:
    """Apply the rules of the module docstring. champion: its metrics on this run's eval data (None
    when there is no champion); incomparable: why the champion could not be re-evaluated, if so."""

    def d(promote: bool, reason: str) -> Decision:
        return Decision(
            promote, reason, list(checks), dict(challenger), dict(champion or {}), champion_version
        )

    failed = [c for c in checks if not c.ok]
    if failed:
        return d(False, "verification failed: " + "; ".join(f"{c.name}: {c.detail}" for c in failed))
    if not enabled:
        return d(False, "gate.enabled is false: versions are never promoted automatically")
    if champion_version is None:
        return d(True, "first model: no champion yet")
    if identical_inputs:
        return d(
            False,
            f"champion v{champion_version} was trained on identical inputs (dataset digest, config "
            "digest, code version, date): re-running a date does not promote again",
        )
    if incomparable:
        return d(False, f"champion v{champion_version} could not be compared: {incomparable}")
    missing = sorted(set(champion or {}) - set(challenger))
    if missing:
        return d(False, f"challenger lacks metrics the champion has: {missing}")
    worse = regressions(challenger, champion or {}, tolerance)
    if worse:
        return d(
            False,
            f"worse than champion v{champion_version} on the same day beyond tolerance {tolerance:g}: "
            + "; ".join(worse),
        )
    return d(
        True,
        f"no metric below champion v{champion_version} on the same day by more than {tolerance:g} "
        f"({len(challenger)} metrics compared)",
    )
