"""Selective masks: CPP (cumulative percentile-based pruning) and the fixed-ratio rule.

CPP on one unit group, among the units stage t owns (csmf-method.md section 3):
information(j) = sum of |w| over unit j's incoming weights that stage t owns (the column of an
embedding; the row of a linear weight; for the tied output group, the user row plus the item
row). Sort ascending (stable, so ties go by unit index), take the running sum c_1..c_n, and
prune every unit whose running sum is <= tau * c_n. The count is then clamped so that the stage
keeps at least `min_keep` units and frees at least `min_free`.

The fixed-ratio rule (PackNet's, the "w/o CPP" ablation) frees round(ratio * n) units with the
least information, with the same clamps.

Pruned ("freed") units are handed to stage t + 1: their incoming weights and bias now belong to
t + 1, and their outgoing edges into units stage t keeps are removed (held at zero), which is
why accuracy recovery follows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from csmf_core.masks import UnitOwners, expand_to_param, linear_groups, param_owners, zero_disallowed
from csmf_core.model import TwoTower


@dataclass(frozen=True)
class LayerPruneStats:
    group: str
    units_before: int  # units the stage owned before pruning
    units_kept: int
    units_freed: int
    weights_kept: int  # parameter entries the stage still owns in this group
    weights_freed: int  # entries handed to the next stage (incoming weights + biases of freed units)
    edges_removed: int  # edges from freed units into kept units of the next layer, now zero
    mass_total: float
    mass_share_pruned: float  # information of the freed units / information of all stage units

    def as_dict(self) -> dict:
        return asdict(self)


def cpp_count(info: torch.Tensor, tau: float) -> int:
    """Number of lowest-information units CPP prunes before clamping. info: (n,) >= 0."""
    if info.numel() == 0:
        return 0
    c = torch.cumsum(torch.sort(info.double(), stable=True).values, dim=0)
    return int((c <= tau * c[-1]).sum())


def select_pruned(
    info: torch.Tensor, *, rule: str, tau: float, ratio: float, min_keep: int, min_free: int
) -> torch.Tensor:
    """Indices (into `info`) of the units to free, lowest information first.

    info: (n,) information of the stage's units in one group.
    """
    n = info.numel()
    if rule == "cpp":
        k = cpp_count(info, tau)
    elif rule == "fixed":
        k = int(round(ratio * n))
    else:
        raise ValueError(f"unknown pruning rule {rule!r} (expected 'cpp' or 'fixed')")
    k = max(k, min_free)
    k = min(k, n - min_keep)
    if k <= 0:
        return torch.zeros(0, dtype=torch.long)
    order = torch.sort(info.double(), stable=True).indices
    return order[:k]


def unit_information(model: TwoTower, owners: UnitOwners, stage: int) -> dict[str, torch.Tensor]:
    """Per group, (size,) information of every unit (0 for units stage `stage` does not own)."""
    params = dict(model.named_parameters())
    owned = param_owners(model, owners)
    info: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for g in model.unit_groups():
            if g.kind == "emb":
                w = params[g.params[0]].detach().abs().double()  # (V, d): a unit is a column
                info[g.name] = w.sum(dim=0)
        for g, owner_group in linear_groups(model):
            w = params[f"{g.name}.weight"].detach().abs().double()  # (out, in): a unit is a row
            keep = (owned[f"{g.name}.weight"].to(w.device) == stage).double()
            row = (w * keep).sum(dim=1)
            info[owner_group] = info.get(owner_group, torch.zeros_like(row)) + row
    for name, v in info.items():
        info[name] = torch.where(owners.units[name].to(v.device) == stage, v, torch.zeros_like(v)).cpu()
    return info


def _reinit_freed(model: TwoTower, groups_freed: dict[str, torch.Tensor], how: str, seed: int) -> None:
    """Apply the `freed_init` policy to the incoming weights and biases of freed units."""
    if how == "keep":
        return
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    if how == "continue":  # the next mode starts exactly at this one: freed output dims are 0 for
        # every user (user-side rows zeroed); their item side keeps its values, so gradients flow
        idx = groups_freed.get("output")
        if idx is not None and idx.numel():
            user_out = model.output_layers()[0]
            with torch.no_grad():
                params[f"{user_out}.weight"][idx] = 0.0
                params[f"{user_out}.bias"][idx] = 0.0
        return
    with torch.no_grad():
        for g in model.unit_groups():
            idx = groups_freed.get(g.name)
            if g.kind != "emb" or idx is None or idx.numel() == 0:
                continue
            w = params[g.params[0]]
            new = (
                torch.zeros(w.shape[0], idx.numel())
                if how == "zero"
                else torch.randn(w.shape[0], idx.numel(), generator=gen) * 0.1
            )
            w[:, idx] = new.to(w.device, w.dtype)
        for g, owner_group in linear_groups(model):
            idx = groups_freed.get(owner_group)
            if idx is None or idx.numel() == 0:
                continue
            w, b = params[f"{g.name}.weight"], params[f"{g.name}.bias"]
            bound = 1.0 / w.shape[1] ** 0.5
            if how == "zero":
                w[idx] = 0.0
                b[idx] = 0.0
            else:
                w[idx] = (torch.rand(idx.numel(), w.shape[1], generator=gen) * 2 - 1).to(w) * bound
                b[idx] = (torch.rand(idx.numel(), generator=gen) * 2 - 1).to(b) * bound


def prune_stage(
    model: TwoTower,
    owners: UnitOwners,
    stage: int,
    *,
    rule: str = "cpp",
    tau: float = 0.75,
    ratio: float = 0.5,
    min_keep: int = 1,
    min_free: int = 1,
    min_free_output: int = 1,
    freed_init: str = "keep",
    seed: int = 0,
) -> tuple[UnitOwners, list[LayerPruneStats]]:
    """Free the least informative units of `stage` to `stage + 1` in every unit group.

    Returns the new unit owners (the input is not modified) and per-group statistics. The
    model's owner tensors are updated, removed edges are zeroed, and freed units are
    re-initialised according to `freed_init` ("keep" | "zero" | "random" | "continue").
    """
    if stage + 1 >= model.n_stages:
        raise ValueError(f"stage {stage} is the last stage: there is no next stage to free units to")
    before = param_owners(model, owners)
    info = unit_information(model, owners, stage)
    new = owners.clone()
    freed: dict[str, torch.Tensor] = {}
    for name, values in info.items():
        mine = torch.nonzero(owners.units[name] == stage).flatten()
        if mine.numel() == 0:
            continue
        m_free = min_free_output if name == "output" else min_free
        local = select_pruned(
            values[mine], rule=rule, tau=tau, ratio=ratio, min_keep=min_keep, min_free=m_free
        )
        idx = mine[local]
        freed[name] = idx
        new.units[name][idx] = stage + 1
    _reinit_freed(model, freed, freed_init, seed)
    after = param_owners(model, new)
    model.set_owners(after)
    zero_disallowed(model, after)
    stats = []
    params = dict(model.named_parameters())
    for name, values in info.items():
        mine = owners.units[name] == stage
        idx = freed.get(name, torch.zeros(0, dtype=torch.long))
        total = float(values[mine].sum())
        pnames = _params_of(model, name)
        # owner tensors of embeddings are per column: count real entries (rows x columns)
        w_kept = sum(int(expand_to_param(after[p] == stage, params[p]).sum()) for p in pnames)
        w_freed = sum(
            int(expand_to_param((before[p] == stage) & (after[p] == stage + 1), params[p]).sum())
            for p in pnames
        )
        edges = _edges_removed(model, name, before, after)
        stats.append(
            LayerPruneStats(
                group=name,
                units_before=int(mine.sum()),
                units_kept=int(mine.sum()) - idx.numel(),
                units_freed=idx.numel(),
                weights_kept=w_kept,
                weights_freed=w_freed,
                edges_removed=edges,
                mass_total=total,
                mass_share_pruned=float(values[idx].sum()) / total if total > 0 else 0.0,
            )
        )
    return new, stats


def _params_of(model: TwoTower, group: str) -> list[str]:
    if group == "output":
        return [f"{n}.{p}" for n in model.output_layers() for p in ("weight", "bias")]
    return [p for g in model.unit_groups() if g.name == group for p in g.params]


def _edges_removed(model: TwoTower, group: str, before: dict, after: dict) -> int:
    """Edges leaving `group`'s units that pruning removed, in every layer that reads the group."""
    sizes = {g.name: g.size for g in model.unit_groups()}
    total = 0
    for g, _ in linear_groups(model):
        offset = 0
        for src in g.inputs:
            width = int(src.rsplit(":", 1)[1]) if src.startswith("num:") else sizes[src]
            if src == group:
                w = f"{g.name}.weight"
                cols = slice(offset, offset + width)
                total += int(((before[w][:, cols] != 255) & (after[w][:, cols] == 255)).sum())
            offset += width
    return total
