"""Serving costs of a comparison method (the paper's Table 4): stored bytes, index size, query time.

A method serves objective o with `user_vecs[o] @ item_vecs[o].T`. A *fused* request with weights
k_o ranks items by sum_o k_o * s_o(u, i); whatever the method, that is one inner product between

    query = [ sum_{o in group g} k_o * u_o  for each distinct item matrix g ]   (concatenated)
    item  = [ item matrix g                 for each distinct item matrix g ]   (concatenated)

so the exact fused top-K of every method is a search in one FAISS index over the concatenation
of its distinct item matrices (CSMF: one dim-d matrix shared by all objectives; YouTubeDNN-Sep:
one per objective, so N * d; a method sharing one vector across objectives counts it once).
Latency is measured on that index (exact inner product, `faiss.IndexFlatIP`), which is what a
server storing these vectors has to search to answer a fused request exactly.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import faiss
import numpy as np
import torch

from csmf_core.baselines.base import MethodResult
from csmf_core.metrics import recall_ndcg, topk_items


def item_groups(result: MethodResult) -> tuple[list[torch.Tensor], dict[str, int]]:
    """Distinct item matrices (by identity, in objective order) and objective -> matrix position."""
    mats: list[torch.Tensor] = []
    where: dict[str, int] = {}
    for o, v in result.item_vecs.items():
        pos = next((j for j, m in enumerate(mats) if m is v), None)
        if pos is None:
            mats.append(v)
            pos = len(mats) - 1
        where[o] = pos
    return mats, where


def fused_vectors(result: MethodResult, weights: Mapping[str, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, D) fused queries and (N_items, D) concatenated item vectors; objectives missing from
    `weights` get weight 0, objectives the method does not serve are ignored."""
    mats, where = item_groups(result)
    blocks = [torch.zeros(next(iter(result.user_vecs.values())).shape[0], m.shape[1]) for m in mats]
    for o, u in result.user_vecs.items():
        blocks[where[o]] = blocks[where[o]] + float(weights.get(o, 0.0)) * u.float()
    return torch.cat(blocks, dim=1), torch.cat([m.float() for m in mats], dim=1)


def fused_rows(
    result: MethodResult, relevant: Mapping[str, Sequence[np.ndarray]], weights: Mapping[str, float], ks=(50,)
) -> list[dict]:
    """Recall/nDCG of the fused ranking for each objective in `relevant` ({objective: eval.pos[t]})."""
    q, items = fused_vectors(result, weights)
    top = topk_items(q, items, max(ks))
    rows = []
    for o, rel in relevant.items():
        for k, v in sorted(recall_ndcg(top, rel, ks).items()):
            rows.append(
                {
                    "method": result.method,
                    "objective": o,
                    "scorer": "fused",
                    "k": k,
                    "recall": v["recall"],
                    "ndcg": v["ndcg"],
                    "users": v["users"],
                }
            )
    return rows


def index_bytes(items: torch.Tensor) -> int:
    """Serialized size of a flat inner-product FAISS index over items[1:] (row 0 is padding)."""
    index = faiss.IndexFlatIP(items.shape[1])
    index.add(np.ascontiguousarray(items[1:].numpy(), dtype=np.float32))
    return int(faiss.serialize_index(index).nbytes)


def query_latency(
    queries: torch.Tensor,
    items: torch.Tensor,
    *,
    k: int = 50,
    min_items: int = 100_000,
    batch: int = 256,
    single: int = 200,
    rounds: int = 3,
) -> dict[str, float]:
    """Milliseconds per request of exact fused top-k search, one request per call and `batch` per call.

    The catalog items[1:] is tiled to at least `min_items` rows so that search time, not call
    overhead, dominates on small catalogs. Each figure is the best of `rounds` timed passes.
    """
    base = np.ascontiguousarray(items[1:].numpy(), dtype=np.float32)
    reps = max(1, -(-min_items // base.shape[0]))
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(np.tile(base, (reps, 1)))
    q = np.ascontiguousarray(queries.numpy(), dtype=np.float32)
    if q.shape[0] < batch:
        q = np.tile(q, (-(-batch // q.shape[0]), 1))
    one = q[:single]
    many = q[:batch]
    index.search(many[:8], k)  # warm-up
    best1 = bestb = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for row in one:
            index.search(row[None, :], k)
        best1 = min(best1, (time.perf_counter() - t0) / one.shape[0])
        t0 = time.perf_counter()
        index.search(many, k)
        bestb = min(bestb, (time.perf_counter() - t0) / many.shape[0])
    return {
        "latency_ms_batch1": best1 * 1e3,
        f"latency_ms_batch{batch}": bestb * 1e3,
        "latency_items": index.ntotal,
        "faiss_threads": faiss.omp_get_max_threads(),
    }


def serving_costs(result: MethodResult, weights: Mapping[str, float], **latency_kw) -> dict[str, float]:
    """Table-4 figures: bytes per item and in total, flat index size, fused query latency, dims."""
    q, items = fused_vectors(result, weights)
    n = items.shape[0] - 1
    return {
        "item_bytes_per_item": result.item_bytes_per_item,
        "item_bytes_total": result.item_bytes_per_item * n,
        "index_bytes": index_bytes(items),
        "serving_dim": int(items.shape[1]),
        "n_items": n,
        **query_latency(q, items, **latency_kw),
    }
