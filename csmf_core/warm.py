"""Warm start: the model of a run that starts from a previous model (`train.mode: incremental`).

    model, owners, info = warm_start(checkpoint_dir, data, cfg, recycled)

`data` was prepared with the previous model's id maps (`prep.prepare(base=BaseMaps.read(...))`,
csmf_core/idmap.py), so every id, category and history item the previous model knew has the same row
and every table only grew. The new model is built exactly as a model from scratch would be (the run's
`model` config, `init_seed`), then every entry of the previous model is copied into it: dense layers
whole, embedding tables row for row. What is not copied keeps the fresh initialisation of its row:
rows of ids new since the previous model, and recycled rows (a row of an evicted id given to a new id,
`recycled`). The previous model's unit owners (its masks) are installed unchanged, so stage t still
owns what it owned and exact fusion holds as before. Before any training, every known id's embedding
rows, and so its user / item vectors for the same inputs, are bit-identical to the previous model's.

A previous model that does not fit the run is refused with `WarmStartError` naming each difference:
other objectives (cascade), model shape (`model.dim`, `hidden`, the embedding sizes, `id_buckets`),
other feature columns, or a table that would shrink (maps not from that model).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from csmf_core.checkpoint import load_checkpoint
from csmf_core.config import CSMFConfig
from csmf_core.masks import UnitOwners, param_owners
from csmf_core.model import TowerSpec, TwoTower, module_key

SHAPE_KEYS = ("dim", "hidden", "emb_dim", "id_emb_dim", "hist_emb_dim", "id_buckets")


class WarmStartError(ValueError):
    """The previous model cannot be continued by this run (different objectives, shape or features)."""


def compatibility_problems(
    old: TwoTower, stages: tuple[str, ...], objectives: list[str], user_spec: TowerSpec, item_spec: TowerSpec,
    cfg: CSMFConfig,
) -> list[str]:  # fmt: skip
    """Every reason the previous model (`old`, its stage names) cannot be continued; [] when it can."""
    problems = []
    if list(stages) != list(objectives):
        problems.append(f"objectives: the model has {list(stages)}, the run {list(objectives)}")
    for key in SHAPE_KEYS:
        a, b = getattr(old.cfg, key, None), getattr(cfg.model, key)
        if (tuple(a) if isinstance(a, list | tuple) else a) != b:
            problems.append(f"model.{key}: the model has {a!r}, the run {b!r}")
    for side, o, n in (("users", old.user.spec, user_spec), ("items", old.item.spec, item_spec)):
        if [c for c, _ in o.cat] != [c for c, _ in n.cat]:
            problems.append(
                f"{side} categorical features: the model has {[c for c, _ in o.cat]}, the run {[c for c, _ in n.cat]}"
            )
        if o.n_num != n.n_num:
            problems.append(f"{side} numeric columns: the model has {o.n_num}, the run {n.n_num}")
        if o.hist != n.hist:
            problems.append(
                f"{side} behaviour sequences: the model has {list(o.hist)}, the run {list(n.hist)}"
            )
        shrunk = [(c, a, b) for (c, a), (_, b) in zip(o.cat, n.cat) if b < a]
        if n.hist and n.n_items < o.n_items:
            shrunk.append(("history items", o.n_items, n.n_items))
        problems.extend(
            f"{side} table {c} would shrink from {a} to {b} rows: prepare the data with this model's id maps"
            for c, a, b in shrunk
        )
    return problems


def warm_start(
    checkpoint_dir: str | Path,
    data,
    cfg: CSMFConfig,
    recycled: dict[str, np.ndarray] | None = None,
) -> tuple[TwoTower, UnitOwners, dict]:
    """The previous model continued on `data` (a CascadeData prepared with its id maps), on CPU.

    recycled: {"users": (U,) bool, "items": (N,) bool} rows given to a new id this run
    (idmap.read_recycled); they start from a fresh row. Returns (model, owners, info) with info the
    counts of copied, new and recycled rows per table."""
    old, owners, _ = load_checkpoint(checkpoint_dir)
    problems = compatibility_problems(
        old, owners.stages, data.objectives, data.user_spec, data.item_spec, cfg
    )
    if problems:
        raise WarmStartError(
            f"cannot start from the model in {checkpoint_dir}: it differs from this run's configuration or "
            "data:\n  " + "\n  ".join(problems) + "\nrun with train.mode=full (a model from scratch) instead"
        )
    model = TwoTower(data.user_spec, data.item_spec, cfg.model, len(data.objectives))
    recycled = recycled or {}
    old_state = old.state_dict()
    info: dict[str, dict] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            src = old_state[name]
            table = name.split(".")[1] in ("emb", "hist")
            if table and src.shape[1] == p.shape[1] and src.shape[0] <= p.shape[0]:
                fresh = _recycled_rows(name, model, recycled, src.shape[0])
                keep = p[fresh].clone()  # the fresh initialisation of recycled rows
                p[: src.shape[0]].copy_(src)
                p[fresh] = keep
                info[name] = {
                    "copied": int(src.shape[0] - fresh.size),
                    "new": int(p.shape[0] - src.shape[0]),
                    "recycled": int(fresh.size),
                }
            elif src.shape == p.shape:
                p.copy_(src)
            else:
                raise WarmStartError(
                    f"{name}: the model has shape {tuple(src.shape)}, the run {tuple(p.shape)}"
                )
        # row 0 of an id table (the unknown id; items the window does not train, csmf_core/prep.py) gets
        # no gradient: zero, as a model from scratch starts it (a model from before 2026-12-05 left it random)
        for tower in (model.user, model.item):
            tower.emb[module_key(tower.spec.id_feature)].weight[0].zero_()
    model.set_owners(param_owners(model, owners))
    return model, owners, info


def _recycled_rows(name: str, model: TwoTower, recycled: dict[str, np.ndarray], old_rows: int) -> np.ndarray:
    """Rows < old_rows of table `name` that belong to a new id this run (they start fresh)."""
    side = None
    if name == f"user.emb.{model.user.spec.id_feature}.weight" and model.cfg.id_buckets is None:
        side = "users"
    elif name == f"item.emb.{model.item.spec.id_feature}.weight" and model.cfg.id_buckets is None:
        side = "items"
    elif name.startswith("user.hist."):  # behaviour sequences are item rows
        side = "items"
    if side is None or side not in recycled or not len(recycled[side]):
        return np.zeros(0, np.int64)
    return np.flatnonzero(np.asarray(recycled[side])[:old_rows]).astype(np.int64)
