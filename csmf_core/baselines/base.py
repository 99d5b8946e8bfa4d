"""What every comparison method returns, and how it is scored (docs/comparison.md).

A method is a function `fit(data, cfg, seed, on_step=None) -> MethodResult`. The result holds,
per objective, the query vectors of the evaluation users and the item vectors of the whole
catalog; objective o ranks items by `user_vecs[o] @ item_vecs[o].T`. `evaluate_result` scores
every method with the same exact top-K and the same Recall/nDCG definitions as CSMF
(`csmf_core.metrics`), so numbers across methods are comparable by construction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from csmf_core.cascade import CascadeData
from csmf_core.metrics import recall_ndcg, topk_items


@dataclass
class MethodResult:
    """One trained method's vectors and costs.

    user_vecs[o]: (E, d_o) float32, rows aligned with data.eval.u.
    item_vecs[o]: (N_items, d_o) float32, row = item index (row 0 included, never ranked).
    item_bytes_per_item: bytes of item vectors a server stores per item, all objectives together
        (a vector shared by several objectives is counted once).
    """

    method: str
    user_vecs: dict[str, torch.Tensor]
    item_vecs: dict[str, torch.Tensor]
    train_seconds: float
    n_params: int
    item_bytes_per_item: int
    info: dict = field(default_factory=dict)


def check_result(result: MethodResult, data: CascadeData) -> None:
    """Raise ValueError naming the method/objective if vectors have the wrong shape or are not finite."""
    n_items = data.tables.items_cat.shape[0]
    n_eval = len(data.eval)
    where = f"method {result.method!r}"
    if not result.user_vecs:
        raise ValueError(f"{where}: no objective vectors returned")
    if set(result.user_vecs) != set(result.item_vecs):
        raise ValueError(
            f"{where}: user objectives {sorted(result.user_vecs)} != item objectives {sorted(result.item_vecs)}"
        )
    for o, u in result.user_vecs.items():
        if o not in data.objectives:
            raise ValueError(f"{where}: objective {o!r} is not one of the data's {data.objectives}")
        v = result.item_vecs[o]
        if u.ndim != 2 or u.shape[0] != n_eval:
            raise ValueError(f"{where}, {o}: user_vecs shape {tuple(u.shape)}, expected ({n_eval}, d)")
        if v.ndim != 2 or v.shape[0] != n_items:
            raise ValueError(f"{where}, {o}: item_vecs shape {tuple(v.shape)}, expected ({n_items}, d)")
        if u.shape[1] != v.shape[1]:
            raise ValueError(f"{where}, {o}: user dim {u.shape[1]} != item dim {v.shape[1]}")
        if not (torch.isfinite(u).all() and torch.isfinite(v).all()):
            raise ValueError(f"{where}, {o}: non-finite vectors (training diverged?)")


def evaluate_result(result: MethodResult, data: CascadeData, ks: Sequence[int] = (50,)) -> list[dict]:
    """Recall@K / nDCG@K per objective the method serves, over the whole catalog.

    Returns rows {method, objective, k, recall, ndcg, users} in data.objectives order.
    Objectives without evaluation users get NaN metrics (users = 0).
    """
    check_result(result, data)
    kmax = max(int(k) for k in ks)
    rows: list[dict] = []
    for t, o in enumerate(data.objectives):
        if o not in result.user_vecs:
            continue
        top = topk_items(result.user_vecs[o].float(), result.item_vecs[o].float(), kmax)
        for k, v in sorted(recall_ndcg(top, data.eval.pos[t], ks).items()):
            rows.append(
                {
                    "method": result.method,
                    "objective": o,
                    "k": k,
                    "recall": v["recall"],
                    "ndcg": v["ndcg"],
                    "users": v["users"],
                }
            )
    return rows


def finite_rows(rows: list[dict]) -> bool:
    """True when every metric in rows is a finite number (NaN = no evaluation users)."""
    return all(math.isfinite(r["recall"]) and math.isfinite(r["ndcg"]) for r in rows)
