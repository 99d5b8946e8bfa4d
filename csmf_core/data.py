"""Load a model-ready dataset (docs/architecture.md section 2) into torch tensors.

Memory-simple on purpose: the whole train table is loaded (R rows x (3 + L * (N - 1) + M) int64).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch


@dataclass
class TrainData:
    """Train rows. ``u``, ``i``, ``level``, ``ts``: (R,) int64; ``hist[obj]``: (R, L) int64 for every
    objective after the first; ``neg``: (R, M) int64 (0 = padding)."""

    u: torch.Tensor
    i: torch.Tensor
    level: torch.Tensor
    ts: torch.Tensor
    hist: dict[str, torch.Tensor]
    neg: torch.Tensor

    def __len__(self) -> int:
        return len(self.u)


@dataclass
class EvalData:
    """Eval rows. ``u``: (E,) int64; ``hist[obj]``: (E, L) int64; ``pos[obj]``: E arrays of item indices."""

    u: torch.Tensor
    hist: dict[str, torch.Tensor]
    pos: dict[str, list[np.ndarray]]

    def __len__(self) -> int:
        return len(self.u)


@dataclass
class ModelReadyData:
    """Feature tables: ``users_cat`` (n_users, n_ucat) int64, ``users_num`` (n_users, n_unum) float32,
    same for items; column names in ``*_names`` (the first categorical column is ``c_uid`` / ``c_iid``)."""

    meta: dict
    users_cat: torch.Tensor
    users_num: torch.Tensor
    items_cat: torch.Tensor
    items_num: torch.Tensor
    user_cat_names: list[str]
    user_num_names: list[str]
    item_cat_names: list[str]
    item_num_names: list[str]
    train: TrainData | None
    eval: EvalData
    cardinalities: dict[str, int] = field(default_factory=dict)  # c_* column -> number of codes

    @property
    def objectives(self) -> list[str]:
        return [o["name"] for o in self.meta["objectives"]]

    @property
    def n_users(self) -> int:
        return self.meta["n_users"]

    @property
    def n_items(self) -> int:
        return self.meta["n_items"]


def _fixed(col: pa.ChunkedArray, width: int) -> torch.Tensor:
    """fixed_size_list<int32>[width] column -> (rows, width) int64 tensor."""
    flat = col.combine_chunks().flatten().to_numpy(zero_copy_only=False)  # flatten honours slice offsets
    return torch.from_numpy(flat.astype(np.int64).reshape(len(col), width))


def _vec(col: pa.ChunkedArray, dtype=np.int64) -> torch.Tensor:
    return torch.from_numpy(col.to_numpy().astype(dtype))


def _features(path: Path, specs: list[dict]) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
    table = pq.read_table(path)
    cat = [s["name"] for s in specs if s["kind"] == "categorical"]
    num = [s["name"] for s in specs if s["kind"] == "numeric"]
    n = table.num_rows
    c = np.stack([table[x].to_numpy() for x in cat], 1) if cat else np.zeros((n, 0))
    v = np.stack([table[x].to_numpy() for x in num], 1) if num else np.zeros((n, 0))
    return torch.from_numpy(c.astype(np.int64)), torch.from_numpy(v.astype(np.float32)), cat, num


def load_model_ready(path: str | Path, *, load_train: bool = True) -> ModelReadyData:
    """Read ``meta.json``, the feature tables, the train parts (unless ``load_train=False``) and eval."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    objs = [o["name"] for o in meta["objectives"]]
    L, M = meta["seq_len"], meta["n_req_neg"]
    uc, un, ucn, unn = _features(path / "users.parquet", meta["features"]["users"])
    ic, inum, icn, inn = _features(path / "items.parquet", meta["features"]["items"])
    train = None
    if load_train:
        t = pa.concat_tables([pq.read_table(path / p) for p in meta["train_parts"]])
        train = TrainData(
            u=_vec(t["u"]),
            i=_vec(t["i"]),
            level=_vec(t["level"]),
            ts=_vec(t["ts"]),
            hist={o: _fixed(t[f"hist_{o}"], L) for o in objs[1:]},
            neg=_fixed(t["neg"], M),
        )
    e = pq.read_table(path / "eval.parquet")
    pos = {}
    for o in objs:
        col = e[f"pos_{o}"].combine_chunks()
        values = col.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        pos[o] = np.split(values, np.cumsum(col.value_lengths().to_numpy())[:-1]) if len(col) else []
    ev = EvalData(u=_vec(e["u"]), hist={o: _fixed(e[f"hist_{o}"], L) for o in objs[1:]}, pos=pos)
    card = {
        s["name"]: s["cardinality"]
        for side in ("users", "items")
        for s in meta["features"][side]
        if s["kind"] == "categorical"
    }
    return ModelReadyData(meta, uc, un, ic, inum, ucn, unn, icn, inn, train, ev, card)
