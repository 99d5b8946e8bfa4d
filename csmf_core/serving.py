"""Serving: a `Recommender` over a bundle directory written by `write_bundle` (csmf_core.bundle).

How to run:

    from csmf_core.serving import Recommender, write_bundle
    write_bundle("bundle", checkpoint_dir="ckpt", model_ready_dir="mr", dataset_dir="data/synth-small",
                 config=cfg)
    rec = Recommender.load("bundle")
    rec.recommend([42, 7], k=50)                         # fused, the bundle's default weights
    rec.recommend([42], k=10, weights=[1.0, 3.0, 0.5])   # per-request objective weights
    rec.recommend([42], k=10, mode=1)                    # one stage's own score (click)
    queries, cold = rec.user_vectors([42, 7], weights=[1.0, 1.8, 1.2])   # (2, D) float32

Exact fusion: the fused score sum_t k_t s_t(u, i) is the inner product of the item's full-mode
vector with the user's full-mode vector scaled per output segment (csmf_core.fusion), so one FAISS
index of full-mode item vectors answers every weighting and every single mode.

Cold start: a user id missing from the bundle's user vocabulary is served as user index 0, the
model's "unknown user" row (every categorical code 0 = unknown, every numeric feature 0 = the
standardised mean) with an empty behaviour history: the model's generic vector. Such users are
flagged (`cold` / `cold_start`) so callers can route them elsewhere if they wish.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from csmf_core.bundle import (
    FORMAT_VERSION,
    lookup_index,
    read_feature_tables,
    read_parquet,
    read_vocab,
    vocab_order,
    write_bundle,
)
from csmf_core.checkpoint import load_checkpoint
from csmf_core.data import load_model_ready
from csmf_core.evaluate import EvalRows, Ranked, evaluate_model, item_matrix
from csmf_core.evaluate import popularity_gaps as _popularity_gaps
from csmf_core.fusion import fuse_queries_np, mode_queries, validate_weights
from csmf_core.ids import as_id_array
from csmf_core.index import ItemIndex
from csmf_core.item_stats import model_ready_item_stats
from csmf_core.rows import FeatureTables

__all__ = ["MAX_K", "Recommender", "write_bundle"]

MAX_K = 10_000
_BATCH = 65536


def _as_ids(user_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """Exact (n,) int64 ids, or ValueError for anything outside int64 or not an integer (csmf_core/ids.py)."""
    return as_id_array(user_ids, "user_ids")


class Recommender:
    """A loaded bundle: the model (eval mode), feature tables, user state and the item index.

    Attributes: objectives (names in cascade order), n_stages, dim (D), output_owners ((D,) int64
    owner stage of each output dimension), default_weights ((N,) float32), info (bundle.json).
    """

    def __init__(
        self, bundle_dir: Path, info: dict, model, owners, tables, index, user_vocab, item_vocab, hists
    ):
        # Use Recommender.load(); the constructor trusts its arguments.
        self.bundle_dir = bundle_dir
        self.info = info
        self.model = model
        self._owners = owners  # (D,) torch int64
        self.tables = tables
        self.index = index
        # (U-1,) original ids of user indices >= 1, in row order: ascending for a model trained from
        # scratch, the kept rows first for a warm-started one (csmf_core/idmap.py)
        self.user_vocab = user_vocab
        self.item_vocab = item_vocab  # (N-1,)
        self._user_order, self._item_order = vocab_order(user_vocab), vocab_order(item_vocab)
        self._hists = hists  # [(U, L) int64] per objective after the first, row 0 = empty
        self._items: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def load(cls, bundle_dir: str | Path, device: str = "cpu") -> Recommender:
        """Open a bundle directory; the model and tables go to `device`, the FAISS index stays on CPU."""
        bundle_dir = Path(bundle_dir)
        if not (bundle_dir / "bundle.json").is_file():
            raise FileNotFoundError(
                f"{bundle_dir} is not a csmf serving bundle (no bundle.json); write one with "
                "csmf_core.serving.write_bundle or train one with `csmf run`"
            )
        info = json.loads((bundle_dir / "bundle.json").read_text())
        if info.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{bundle_dir}/bundle.json: unsupported format_version {info.get('format_version')!r}"
            )
        model, owners, _ = load_checkpoint(bundle_dir / "checkpoint", device=device)
        feat = bundle_dir / "features"
        meta = json.loads((feat / "meta.json").read_text())
        tables = read_feature_tables(feat, meta).to(device)
        index = ItemIndex.load(bundle_dir / "index")
        if index.dim != info["dim"]:
            raise ValueError(f"{bundle_dir}: index has D={index.dim} but bundle.json says dim={info['dim']}")
        user_vocab = read_vocab(feat / "users.parquet", "user_id")
        state = read_parquet(bundle_dir / "user_state.parquet")
        u = state["u"].to_numpy().astype(np.int64)
        L = int(info["seq_len"])
        hists = []
        for o in info["objectives"][1:]:
            h = np.zeros((len(user_vocab) + 1, L), np.int64)
            col = state[f"hist_{o}"].combine_chunks()
            h[u] = col.flatten().to_numpy(zero_copy_only=False).reshape(len(u), L)
            hists.append(torch.from_numpy(h))
        return cls(
            bundle_dir,
            info,
            model,
            owners.output_owners().long().cpu(),
            tables,
            index,
            user_vocab,
            read_vocab(feat / "items.parquet", "item_id"),
            hists,
        )

    # ---- properties -------------------------------------------------------------------------------
    @property
    def objectives(self) -> list[str]:
        return list(self.info["objectives"])

    @property
    def n_stages(self) -> int:
        return len(self.info["objectives"])

    @property
    def dim(self) -> int:
        return int(self.info["dim"])

    @property
    def output_owners(self) -> np.ndarray:
        return self._owners.numpy().copy()

    @property
    def default_weights(self) -> np.ndarray:
        return np.asarray(self.info["default_weights"], np.float32)

    def stage_index(self, stage: int | str) -> int:
        """A stage given by name ("click") or index (1, "1") -> its index, checked."""
        if isinstance(stage, str) and stage in self.objectives:
            return self.objectives.index(stage)
        try:
            t = int(stage)
        except (TypeError, ValueError):
            t = -1
        if not 0 <= t < self.n_stages:
            raise ValueError(
                f"unknown stage {stage!r}; use a name in {self.objectives} or an index 0..{self.n_stages - 1}"
            )
        return t

    def item_features(self, item_ids: Sequence[int]) -> dict[str, list]:
        """The items' feature values as the dataset had them, decoded from the bundle's model-ready
        table (features/items.parquet + meta.json): categorical codes back to their values, numeric
        columns un-standardised (z * std + mean; a null was stored as the mean). {column: [value per
        id]}, None for an id the bundle does not know (or an unknown category)."""
        feat = self.bundle_dir / "features"
        specs = [
            s
            for s in json.loads((feat / "meta.json").read_text())["features"]["items"]
            if s["name"] != "c_iid" and s.get("source") != "item_id"
        ]
        idx = lookup_index(self.item_vocab, _as_ids(item_ids), self._item_order)
        table = read_parquet(feat / "items.parquet", columns=[s["name"] for s in specs])
        out: dict[str, list] = {}
        for s in specs:
            col = table[s["name"]].to_numpy()[idx]
            if s["kind"] == "categorical":
                values = s.get("values") or []
                out[s["source"]] = [
                    values[c - 1] if i > 0 and 1 <= c <= len(values) else None
                    for i, c in zip(idx, col.tolist())
                ]
            else:
                out[s["source"]] = [
                    float(z) * s["std"] + s["mean"] if i > 0 else None for i, z in zip(idx, col.tolist())
                ]
        return out

    # ---- vectors ----------------------------------------------------------------------------------
    def user_indices(self, user_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Original user ids (U,) -> (model user indices (U,) int64, cold (U,) bool); unknown -> 0."""
        idx = lookup_index(self.user_vocab, _as_ids(user_ids), self._user_order)
        return idx, idx == 0

    @torch.no_grad()
    def user_vectors(
        self,
        user_ids: Sequence[int],
        *,
        mode: int | str | None = None,
        weights: Sequence[float] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Query vectors (U, D) float32 and cold-start flags (U,) bool for original user ids.

        Neither mode nor weights: the full-mode user vector. mode=t: the mode-t vector (dimensions
        owned by stages > t zeroed), whose inner product with an item vector is the stage-t score.
        weights=<k_0..k_{N-1}>: the fused query, inner product = sum_t k_t s_t. Not both.
        Users come with the state stored in the bundle (features + histories as of history_until);
        unknown ids are cold-start users (module docstring).
        """
        if mode is not None and weights is not None:
            raise ValueError("pass either mode (one stage's score) or weights (fused score), not both")
        u, cold = self.user_indices(user_ids)
        ut = torch.from_numpy(u)
        dev = next(self.model.parameters()).device
        full = torch.zeros(len(u), self.dim)
        for s in range(0, len(u), _BATCH):
            b = ut[s : s + _BATCH]
            x = self.tables.user_inputs(b.to(dev), [h[b].to(dev) for h in self._hists])
            full[s : s + _BATCH] = self.model.user_vectors(x).float().cpu()
        if mode is not None:
            q = mode_queries(full, self._owners, self.stage_index(mode)).numpy()
        elif weights is not None:
            try:
                w = validate_weights(weights, self.n_stages)
            except ValueError as exc:
                raise ValueError(
                    f"{exc}; give one weight per objective ({', '.join(self.objectives)})"
                ) from None
            # numpy: the same values as fusion.fuse_queries, without torch's dispatch (bench_serving)
            q = fuse_queries_np(full.numpy(), self._owners.numpy(), w.numpy())
        else:
            q = full.numpy()
        return q.astype(np.float32, copy=False), cold

    def item_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids (N,) int64 original item ids, vectors (N, D) float32): the full-mode item vectors that
        are indexed. There are no separate per-mode item vectors to serve: a mode masks only the user
        side (mode_queries zeroes the later stages' user dimensions), and an item unit owned by stage s
        computes the same value in every mode >= s, so full-mode item vectors give every mode's score."""
        if self._items is None:
            vecs = item_matrix(self.model, self.tables).numpy()[1:]
            self._items = (self.item_vocab.copy(), np.ascontiguousarray(vecs, dtype=np.float32))
        return self._items

    # ---- retrieval --------------------------------------------------------------------------------
    def recommend(
        self,
        user_ids: Sequence[int],
        *,
        k: int = 50,
        weights: Sequence[float] | None = None,
        mode: int | str | None = None,
    ) -> list[dict[str, Any]]:
        """Top-k items per user from the FAISS index, best first.

        Ranking: fused score with `weights` (default: bundle.json default_weights), or one stage's own
        score with `mode` (not both). k in 1..MAX_K; fewer than k items come back when the catalog
        (or an approximate index) has fewer. Returns one dict per user:
        {"user_id": int, "items": [item_id, ...], "scores": [float, ...], "cold_start": bool}.
        """
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= MAX_K:
            raise ValueError(f"k must be an integer from 1 to {MAX_K}, got {k!r}")
        if mode is None and weights is None:
            weights = self.default_weights
        ids = _as_ids(user_ids)
        queries, cold = self.user_vectors(ids, mode=mode, weights=weights)
        res = self.index.search(queries, int(k)) if len(ids) else None
        out = []
        for r, uid in enumerate(ids.tolist()):
            c = int(res.counts[r])
            out.append(
                {
                    "user_id": uid,
                    "items": res.ids[r, :c].tolist(),
                    "scores": res.scores[r, :c].tolist(),
                    "cold_start": bool(cold[r]),
                }
            )
        return out

    # ---- offline evaluation -----------------------------------------------------------------------
    def evaluate(self, model_ready_dir: str | Path, ks: Sequence[int] = (50,)) -> list[dict]:
        """Recall@K / nDCG@K of this model on the eval rows of another model-ready dataset.

        Rows as csmf_core.evaluate.evaluate_model(scorers="all") with the bundle's default fused
        weights and the popularity baseline of that dataset: {objective, scorer, k, recall, ndcg, users}.

        Index spaces: the other dataset was prepared on its own, so its user/item indices are mapped
        to this model's through the original ids. Eval users unknown to the model get user index 0
        (cold start) with their own (mapped) history; history items unknown to the model become
        padding 0. Relevant items unknown to the model get distinct indices beyond the catalog: they
        stay in the recall denominator but can never be retrieved. Popularity counts of unknown items
        are dropped. Users keep this bundle's feature rows (the encoding the model was trained on).
        """
        return self.evaluate_with_gaps(model_ready_dir, ks=ks, gaps_k=None)[0]

    def popularity_gaps(self, model_ready_dir: str | Path, k: int = 50) -> list[dict]:
        """Model minus popularity per objective (own mode and fused) on another dataset's eval rows, with
        paired 95% bootstrap intervals over users (csmf_core.evaluate.popularity_gaps)."""
        return self.evaluate_with_gaps(model_ready_dir, ks=(), gaps_k=k)[1]

    def evaluate_with_gaps(
        self, model_ready_dir: str | Path, ks: Sequence[int] = (50,), gaps_k: int | None = 50
    ) -> tuple[list[dict], list[dict]]:
        """`evaluate` rows at `ks` (none when empty) and `popularity_gaps` rows at `gaps_k` (none when
        None), mapping the other dataset, encoding its users and the catalog, and ranking once for both."""
        ev, popularity, tables = self._mapped_eval(model_ready_dir)
        owners = self._owners.to(next(self.model.parameters()).device)
        weights = tuple(self.info["default_weights"])
        ranked = Ranked(self.model, owners, tables, ev)
        rows = (
            evaluate_model(
                self.model,
                owners,
                tables,
                ev,
                self.objectives,
                ks=tuple(int(k) for k in ks),
                scorers="all",
                fused_weights=weights,
                popularity=popularity,
                ranked=ranked,
            )  # fmt: skip
            if ks
            else []
        )
        gaps = (
            _popularity_gaps(
                self.model,
                owners,
                tables,
                ev,
                self.objectives,
                popularity,
                weights,
                int(gaps_k),
                ranked=ranked,
            )  # fmt: skip
            if gaps_k is not None
            else []
        )
        return rows, gaps

    def _mapped_eval(self, model_ready_dir: str | Path) -> tuple[EvalRows, list[np.ndarray], FeatureTables]:
        """The other dataset's eval rows and popularity counts in this model's index space (see evaluate),
        and the feature tables to encode the catalog with: this bundle's, except that with item
        statistics (data.item_stats) the items carry the other dataset's statistics as of its first
        evaluation day, standardised as this model was trained (items it never saw: zero counts)."""
        mr = Path(model_ready_dir)
        other = load_model_ready(mr, load_train=False)
        if other.objectives != self.objectives:
            raise ValueError(f"{mr} has objectives {other.objectives}, the model {self.objectives}")
        n_items = len(self.item_vocab) + 1
        umap = np.concatenate(
            [
                [0],
                lookup_index(self.user_vocab, read_vocab(mr / "users.parquet", "user_id"), self._user_order),
            ]
        )
        imap = np.concatenate(
            [
                [0],
                lookup_index(self.item_vocab, read_vocab(mr / "items.parquet", "item_id"), self._item_order),
            ]
        )
        rel_map = imap.copy()
        unseen = np.flatnonzero(imap == 0)[1:]
        rel_map[unseen] = n_items + np.arange(unseen.size)
        ev = EvalRows(
            torch.from_numpy(umap[other.eval.u.numpy()]),
            [torch.from_numpy(imap[other.eval.hist[o].numpy()]) for o in self.objectives[1:]],
            [[rel_map[p] for p in other.eval.pos[o]] for o in self.objectives],
        )
        pop_t = pq.read_table(mr / "popularity.parquet")
        pop_idx = imap[pop_t["i"].to_numpy().astype(np.int64)]
        popularity = [
            np.bincount(pop_idx, weights=pop_t[f"count_{o}"].to_numpy(), minlength=n_items).astype(np.int64)
            for o in self.objectives
        ]
        return ev, popularity, self._tables_with_stats_of(mr, imap)

    def _tables_with_stats_of(self, mr: Path, imap: np.ndarray) -> FeatureTables:
        st = self.info.get("item_stats")
        if not st:
            return self.tables
        k = len(st["columns"])
        mean, std = np.array(st["mean"]), np.array(st["std"])
        other = model_ready_item_stats(mr, st["windows"], mean=mean, std=std)
        if other.columns != st["columns"]:
            raise ValueError(
                f"{mr}: item statistics {other.columns}, the model was trained on {st['columns']}"
            )
        zero = (0.0 - mean) / np.where(std > 0, std, 1.0)  # log(1 + 0) standardised
        values = np.tile(zero, (len(self.item_vocab) + 1, 1))
        values[0] = 0.0
        known = np.flatnonzero(imap > 0)
        values[imap[known]] = other.at(other.eval_day)[known]
        num = self.tables.items_num
        num = torch.cat([num[:, : num.shape[1] - k], torch.from_numpy(values).to(num.device, num.dtype)], 1)
        return dataclasses.replace(self.tables, items_num=num)


def summary_table(rows: list[dict], k: int) -> str:
    """evaluate_model rows at one K -> a compact text table for a terminal: one line per objective,
    "recall / ndcg" under its own mode, the fused score, popularity and random (whichever are present)."""
    cols = [("own mode", None), ("fused", "fused"), ("popularity", "popularity"), ("random", "random")]
    at_k = [r for r in rows if int(r["k"]) == int(k)]
    objectives = list(dict.fromkeys(r["objective"] for r in at_k))
    present = [(h, s) for h, s in cols if s is None or any(r["scorer"] == s for r in at_k)]
    header = ["objective", "users"] + [h for h, _ in present]
    body = []
    for o in objectives:
        cell = {r["scorer"]: r for r in at_k if r["objective"] == o}
        users = cell[o]["users"] if o in cell else next(iter(cell.values()))["users"]
        line = [o, str(users)]
        for _, s in present:
            r = cell.get(o if s is None else s)
            line.append("-" if r is None else f"{r['recall']:.4f} / {r['ndcg']:.4f}")
        body.append(line)
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]
    fmt = lambda xs: "  ".join(x.ljust(w) for x, w in zip(xs, widths)).rstrip()  # noqa: E731
    title = f"Recall@{k} / nDCG@{k} per objective (evaluation users with >= 1 positive of it):"
    return "\n".join([title, fmt(header), fmt(["-" * w for w in widths]), *map(fmt, body)])


def metrics_table(rows: list[dict]) -> str:
    """evaluate_model rows -> a markdown table (objective x scorer x k)."""
    lines = ["| objective | scorer | k | recall | ndcg | users |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['objective']} | {r['scorer']} | {r['k']} | {r['recall']:.4f} | {r['ndcg']:.4f} | {r['users']} |"
        )
    return "\n".join(lines)
