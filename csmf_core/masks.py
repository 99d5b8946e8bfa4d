"""Ownership masks as data.

Source of truth: `UnitOwners`, one uint8 owner per unit per unit group (see
`TwoTower.unit_groups`). From it, `param_owners()` derives one owner tensor per parameter,
keyed by the unwrapped model's parameter names:

- embedding weight (V, d): owner per column, shape (d,);
- linear weight (out, in): owner per entry, shape (out, in); NO_EDGE (255) where the edge
  runs from a later-stage unit into an earlier-stage one (held at zero);
- linear bias (out,): owner per unit.

Saved as `masks.pt` (the per-parameter tensors, weights only) + `masks.json` (stage names,
granularity, unit owners, shapes), validated on load.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from csmf_core.model import NO_EDGE, TwoTower, UnitGroup, edge_owners

FORMAT_VERSION = 1


class MaskError(ValueError):
    """A mask file or mask tensor that does not fit the model."""


@dataclass
class UnitOwners:
    """Owner stage of every unit, per unit group. units[name]: (size,) uint8."""

    units: dict[str, torch.Tensor]
    stages: tuple[str, ...]

    @classmethod
    def initial(cls, model: TwoTower, stages: tuple[str, ...]) -> UnitOwners:
        """Stage 0 owns everything before pre-training."""
        if len(stages) != model.n_stages:
            raise MaskError(f"{len(stages)} stage names for a model with {model.n_stages} stages")
        return cls({g.name: torch.zeros(g.size, dtype=torch.uint8) for g in model.unit_groups()}, stages)

    def clone(self) -> UnitOwners:
        return UnitOwners({k: v.clone() for k, v in self.units.items()}, self.stages)

    def counts(self) -> dict[str, list[int]]:
        """Units per stage for every group."""
        n = len(self.stages)
        return {k: torch.bincount(v.long(), minlength=n).tolist() for k, v in self.units.items()}

    def output_owners(self) -> torch.Tensor:
        """(dim,) owner of each output dimension: the vector segments."""
        return self.units["output"]


def _input_owners(group: UnitGroup, units: dict[str, torch.Tensor]) -> torch.Tensor:
    parts = []
    for src in group.inputs:
        if src.startswith("num:"):
            parts.append(torch.zeros(int(src.rsplit(":", 1)[1]), dtype=torch.uint8))
        else:
            parts.append(units[src])
    return torch.cat(parts)


def linear_groups(model: TwoTower) -> list[tuple[UnitGroup, str]]:
    """Every linear layer with the unit group that owns its units ("output" for the last)."""
    out = set(model.output_layers())
    res = []
    for g in model.user.unit_groups("user") + model.item.unit_groups("item"):
        if g.kind == "linear":
            res.append((g, "output" if g.name in out else g.name))
    return res


def param_owners(model: TwoTower, owners: UnitOwners) -> dict[str, torch.Tensor]:
    """Derive per-parameter owner tensors (uint8) from unit owners."""
    units = owners.units
    res: dict[str, torch.Tensor] = {}
    for g in model.unit_groups():
        if g.kind == "emb":
            res[g.params[0]] = units[g.name].clone()
    for g, owner_group in linear_groups(model):
        out = units[owner_group].long()
        inp = _input_owners(g, units).long()
        res[f"{g.name}.weight"] = edge_owners(inp, out).to(torch.uint8)
        res[f"{g.name}.bias"] = out.to(torch.uint8)
    return res


def trainable_masks(owners: dict[str, torch.Tensor], stage: int) -> dict[str, torch.Tensor]:
    """Per-parameter bool masks of the entries stage `stage` trains (owner == stage)."""
    return {k: v == stage for k, v in owners.items()}


def expand_to_param(owner: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Broadcast an owner tensor to the parameter's shape (embedding columns -> (V, d))."""
    if owner.shape == param.shape:
        return owner
    return owner.expand(param.shape)


def zero_disallowed(model: TwoTower, owners: dict[str, torch.Tensor]) -> None:
    """Hold removed edges at exactly zero in the stored weights (forward masks them anyway)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, o in owners.items():
            if name.endswith(".weight") and o.dim() == 2:
                params[name].masked_fill_(o.to(params[name].device) == NO_EDGE, 0.0)


def save_masks(directory: str | Path, model: TwoTower, owners: UnitOwners) -> Path:
    """Write masks.pt + masks.json into `directory` atomically (temp dir, then rename)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".masks-", dir=directory.parent))
    tensors = param_owners(model, owners)
    torch.save({k: v.contiguous() for k, v in tensors.items()}, tmp / "masks.pt")
    sidecar = {
        "format_version": FORMAT_VERSION,
        "granularity": "unit",
        "stages": list(owners.stages),
        "units": {k: v.tolist() for k, v in owners.units.items()},
        "shapes": {k: list(v.shape) for k, v in tensors.items()},
        "units_per_stage": owners.counts(),
    }
    (tmp / "masks.json").write_text(json.dumps(sidecar, indent=1))
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def load_masks(directory: str | Path, model: TwoTower) -> UnitOwners:
    """Read and validate masks written by `save_masks` against `model`."""
    directory = Path(directory)
    for f in ("masks.pt", "masks.json"):
        if not (directory / f).is_file():
            raise MaskError(f"{directory}: missing {f} (expected masks.pt + masks.json from save_masks)")
    meta = json.loads((directory / "masks.json").read_text())
    if meta.get("format_version") != FORMAT_VERSION or meta.get("granularity") != "unit":
        raise MaskError(
            f"{directory}/masks.json: unsupported format {meta.get('format_version')!r} / "
            f"granularity {meta.get('granularity')!r}"
        )
    stages = tuple(meta["stages"])
    if len(stages) != model.n_stages:
        raise MaskError(f"{directory}: masks have {len(stages)} stages, the model has {model.n_stages}")
    groups = {g.name: g.size for g in model.unit_groups()}
    units = {k: torch.tensor(v, dtype=torch.uint8) for k, v in meta["units"].items()}
    problems = [f"missing unit group {g}" for g in groups if g not in units]
    problems += [f"unknown unit group {g}" for g in units if g not in groups]
    problems += [
        f"unit group {g} has {units[g].numel()} units, the model {n}"
        for g, n in groups.items()
        if g in units and units[g].numel() != n
    ]
    problems += [
        f"unit group {g} has owner {int(v.max())} >= {len(stages)} stages"
        for g, v in units.items()
        if v.numel() and int(v.max()) >= len(stages)
    ]
    if problems:
        raise MaskError(f"{directory}: masks do not fit the model: " + "; ".join(problems))
    owners = UnitOwners(units, stages)
    stored = torch.load(directory / "masks.pt", weights_only=True)
    expected = param_owners(model, owners)
    params = dict(model.named_parameters())
    if set(stored) != set(expected):
        raise MaskError(
            f"{directory}/masks.pt: parameter names differ from the model "
            f"(missing {sorted(set(expected) - set(stored))}, unknown {sorted(set(stored) - set(expected))})"
        )
    for k, v in stored.items():
        if v.shape != expected[k].shape or not torch.equal(v, expected[k]):
            raise MaskError(
                f"{directory}/masks.pt: {k} (shape {list(v.shape)}) disagrees with the unit owners"
            )
        expand_to_param(v, params[k])  # raises if it cannot cover the parameter
    return owners
