"""Offline evaluation of a CSMF model (csmf-method.md section 6; definitions in metrics.py).

For objective t, the relevant items of a user are the items with objective t's label in the
evaluation period; users with none are skipped. Candidates are the whole catalog (every item
index >= 1); nothing is excluded. A *scorer* is how items are ranked: a stage's own mode
(`"exposure"`, `"click"`, ...), the fused score (`"fused"`, weights <k_0..k_{N-1}>), or a
baseline (`"popularity"`: items by positives of that objective in the training window).
Ranking by mode t uses the mode-t user vector against the full-mode item vectors, which is
exactly the mode-t score with unit-level ownership.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from csmf_core.fusion import fuse_queries, mode_queries
from csmf_core.metrics import (
    Relevant,
    TopKCache,
    md_cell,
    paired_bootstrap,
    popularity_topk,
    random_topk,
    recall_ndcg,
)
from csmf_core.model import TowerInputs, TwoTower
from csmf_core.rows import FeatureTables


@dataclass
class EvalRows:
    """Evaluation users. u: (E,) int64; hists: [(E, L) int64] as of the evaluation start;
    pos[t][e]: item indices with objective t's label for user e in the evaluation period."""

    u: torch.Tensor
    hists: list[torch.Tensor]
    pos: list[list[np.ndarray]]
    _relevant: dict[int, tuple[list, Relevant]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __len__(self) -> int:
        return int(self.u.numel())

    def head(self, n: int) -> EvalRows:
        if n <= 0 or n >= len(self):
            return self
        return EvalRows(self.u[:n], [h[:n] for h in self.hists], [p[:n] for p in self.pos])

    def relevant(self, t: int) -> Relevant:
        """pos[t] prepared for `recall_ndcg` once: every ranking of these users reuses it, until
        pos[t] is replaced by another list (its arrays are not to be changed in place)."""
        cached = self._relevant.get(t)
        if cached is None or cached[0] is not self.pos[t]:
            cached = self._relevant[t] = (self.pos[t], Relevant.of(self.pos[t]))
        return cached[1]

    def objectives_subset(self, idx: Sequence[int]) -> EvalRows:
        """The same users with objectives `idx` only (pos[idx[j]] becomes pos[j]), sharing what
        `relevant` has prepared."""
        sub = EvalRows(self.u, self.hists, [self.pos[i] for i in idx])
        sub._relevant.update({j: (self.pos[i], self.relevant(i)) for j, i in enumerate(idx)})
        return sub


@torch.no_grad()
def encode_items(
    fn: Callable[[TowerInputs], torch.Tensor], tables: FeatureTables, *, device=None, batch: int = 65536
) -> torch.Tensor:
    """(N_items, d) float32 CPU vectors of every item index (row 0 included): `fn` (a model's item
    side, any method's) over the catalog's tower inputs in chunks of `batch` items on `device`."""
    n = tables.items_cat.shape[0]
    out = []
    for s in range(0, n, batch):
        idx = torch.arange(s, min(n, s + batch), device=device)
        out.append(fn(tables.item_inputs(idx)).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def encode_users(
    fn: Callable[[TowerInputs], torch.Tensor],
    tables: FeatureTables,
    u: torch.Tensor,
    hists: list[torch.Tensor],
    *,
    device="cpu",
    batch: int = 65536,
    dim: int = 0,
) -> torch.Tensor:
    """(E, d) float32 CPU vectors of users `u` (E,) with behaviour sequences `hists` [(E, L)]: `fn`
    (a model's user side) in chunks of `batch` users on `device`; (0, dim) when there are none."""
    out = []
    for s in range(0, u.numel(), batch):
        sl = slice(s, s + batch)
        x = tables.user_inputs(u[sl].to(device), [h[sl].to(device) for h in hists])
        out.append(fn(x).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, dim)


def item_matrix(model: TwoTower, tables: FeatureTables, batch: int = 65536) -> torch.Tensor:
    """(N_items, D) full-mode item vectors for every item index (row 0 included)."""
    return encode_items(model.item_vectors, tables, device=next(model.parameters()).device, batch=batch)


def user_matrix(
    model: TwoTower, tables: FeatureTables, u: torch.Tensor, hists: list[torch.Tensor], batch: int = 65536
) -> torch.Tensor:
    """(E, D) full-mode user vectors."""
    dev = next(model.parameters()).device
    return encode_users(model.user_vectors, tables, u, hists, device=dev, batch=batch, dim=model.cfg.dim)


class Ranked:
    """One model on one eval set, encoded once (full-mode item and user vectors), with every top-k
    ranking computed from it kept: pass as `ranked=` to evaluate_model and popularity_gaps so the
    second neither encodes nor ranks again. A ranking computed at k serves every k' <= k (prefix)."""

    def __init__(self, model: TwoTower, output_owners: torch.Tensor, tables: FeatureTables, ev: EvalRows):
        self.items = item_matrix(model, tables)
        self.users = user_matrix(model, tables, ev.u, ev.hists)
        self.output_owners = output_owners
        self._top = TopKCache()

    def mode(self, m: int, k: int, rows: np.ndarray | None = None) -> np.ndarray:
        """(U, k) items by mode m's score; rows: only these users' rankings are needed (the others
        may be -1, see `metrics.topk_items`)."""
        return self._top.get(
            ("mode", m), k, lambda: (mode_queries(self.users, self.output_owners, m), self.items), rows
        )

    def fused(self, weights: tuple[float, ...], k: int) -> np.ndarray:
        """(U, k) items by the fused score with these weights."""
        w = tuple(float(x) for x in weights)
        return self._top.get(
            ("fused", w),
            k,
            lambda: (fuse_queries(self.users, self.output_owners, torch.tensor(w)), self.items),
        )


def _rows(objective: str, scorer: str, res: dict[int, dict[str, float]]) -> list[dict]:
    return [
        {
            "objective": objective,
            "scorer": scorer,
            "k": k,
            "recall": v["recall"],
            "ndcg": v["ndcg"],
            "users": v["users"],
        }
        for k, v in sorted(res.items())
    ]


def evaluate_model(
    model: TwoTower,
    output_owners: torch.Tensor,
    tables: FeatureTables,
    ev: EvalRows,
    objectives: list[str],
    *,
    ks: tuple[int, ...] = (50,),
    objectives_upto: int | None = None,
    scorers: str = "own",
    fused_weights: tuple[float, ...] | None = None,
    popularity: list[np.ndarray] | None = None,
    random_seed: int | None = None,
    ranked: Ranked | None = None,
) -> list[dict]:
    """Recall@K / nDCG@K rows for objectives 0..objectives_upto.

    scorers = "own": each objective under its own stage's mode only (the per-stage metrics);
    scorers = "all": every trained mode, plus "fused" (needs fused_weights), plus "popularity"
    (needs popularity[t]: (N_items,) counts) and "random" (needs random_seed).
    ranked: `Ranked(model, output_owners, tables, ev)` shared with popularity_gaps.
    Returns rows {objective, scorer, k, recall, ndcg, users}.
    """
    upto = len(objectives) - 1 if objectives_upto is None else objectives_upto
    ranked = Ranked(model, output_owners, tables, ev) if ranked is None else ranked
    kmax = max(ks)
    rows: list[dict] = []
    for t in range(upto + 1):
        rel = ev.relevant(t)
        modes = [t] if scorers == "own" else list(range(upto + 1))
        for m in modes:
            rows += _rows(objectives[t], objectives[m], recall_ndcg(ranked.mode(m, kmax), rel, ks))
        if scorers == "all" and fused_weights is not None:
            rows += _rows(objectives[t], "fused", recall_ndcg(ranked.fused(fused_weights, kmax), rel, ks))
        if scorers == "all" and popularity is not None:
            rows += _popularity(ev, t, objectives[t], popularity[t], ks)
        if scorers == "all" and random_seed is not None:
            top = random_topk(ranked.items.shape[0], len(ev), kmax, random_seed)
            rows += _rows(objectives[t], "random", recall_ndcg(top, rel, ks))
    return rows


def _popularity(ev: EvalRows, t: int, objective: str, counts, ks: tuple[int, ...]) -> list[dict]:
    top = popularity_topk(np.asarray(counts), len(ev), max(ks))
    return _rows(objective, "popularity", recall_ndcg(top, ev.relevant(t), ks))


def popularity_rows(
    ev: EvalRows, objectives: list[str], counts: list[np.ndarray], ks: tuple[int, ...] = (50,)
) -> list[dict]:
    """The popularity ranking's Recall/nDCG rows per objective (no model: items by their positives of
    that objective in the training window, `counts[t]`); the same rows evaluate_model gives it."""
    return [r for t, o in enumerate(objectives) for r in _popularity(ev, t, o, counts[t], ks)]


def popularity_gaps(
    model: TwoTower,
    output_owners: torch.Tensor,
    tables: FeatureTables,
    ev: EvalRows,
    objectives: list[str],
    counts: list[np.ndarray],
    fused_weights: tuple[float, ...],
    k: int = 50,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    ranked: Ranked | None = None,
) -> list[dict]:
    """Is the model better than popularity on these users? Per objective, for its own mode and the
    fused score: the mean per-user difference of Recall@k and nDCG@k minus the popularity ranking's,
    with a paired 95% bootstrap interval over users (metrics.paired_bootstrap).

    Returns rows {objective, scorer, k, metric, diff, lo, hi, users}; an interval that excludes 0
    is a difference these users can resolve, one that includes 0 is not. ranked: as evaluate_model.
    """
    ranked = Ranked(model, output_owners, tables, ev) if ranked is None else ranked
    fused = ranked.fused(fused_weights, k)
    out = []
    for t, o in enumerate(objectives):
        rel = ev.relevant(t)
        pop = recall_ndcg(popularity_topk(np.asarray(counts[t]), len(ev), k), rel, (k,), per_user=True)[k]
        for scorer, top in ((o, ranked.mode(t, k)), ("fused", fused)):
            res = recall_ndcg(top, rel, (k,), per_user=True)[k]
            for m in ("recall", "ndcg"):
                ci = paired_bootstrap(res[f"{m}_per_user"], pop[f"{m}_per_user"], n_boot=n_boot, seed=seed)
                n_users = ci.pop("n")
                out.append({"objective": o, "scorer": scorer, "k": k, "metric": m, **ci, "users": n_users})
    return out


def gaps_table(rows: list[dict]) -> str:
    """Markdown table of popularity_gaps rows."""
    lines = [
        "| objective | scorer | metric | model - popularity | 95% interval | users | resolved |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        verdict = "better" if r["lo"] > 0 else "worse" if r["hi"] < 0 else "not resolved"
        lines.append(
            f"| {md_cell(r['objective'])} | {md_cell(r['scorer'])} | {r['metric']}@{r['k']} | {r['diff']:+.4f} | "
            f"[{r['lo']:+.4f}, {r['hi']:+.4f}] | {r['users']} | {verdict} |"
        )
    return "\n".join(lines)


def metric_dict(rows: list[dict], prefix: str, own_only: bool = True) -> dict[str, float]:
    """Flatten rows to tracker keys under `prefix`, which says what the rows were measured on ("test":
    the evaluation days): `<prefix>/click/recall@50` for the own modes only, or with own_only=False
    `<prefix>/click/<scorer>/recall@50` for every scorer (`.../click/click/...`, `.../click/fused/...`)."""
    out = {}
    for r in rows:
        own = r["scorer"] == r["objective"]
        if own_only and not own:
            continue
        mid = r["objective"] if (own and own_only) else f"{r['objective']}/{r['scorer']}"
        for m in ("recall", "ndcg"):
            if r[m] == r[m]:  # skip NaN (no users with that objective)
                out[f"{prefix}/{mid}/{m}@{r['k']}"] = float(r[m])
    return out
