"""Checkpoints: state dict + masks + JSON metadata, never pickled objects.

Layout of a checkpoint directory (written to a temp dir and renamed into place):

    model.pt          state dict (torch.save of tensors; loaded with weights_only=True)
    masks/            masks.pt + masks.json (csmf_core.masks)
    checkpoint.json   tower specs, model config, stage names, stages completed, free metadata
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from csmf_core.config import ModelConfig
from csmf_core.masks import UnitOwners, load_masks, param_owners, save_masks
from csmf_core.model import TowerSpec, TwoTower

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint directory that is missing files or does not describe a loadable model."""


def _spec_to_json(spec: TowerSpec) -> dict[str, Any]:
    d = dataclasses.asdict(spec)
    d["cat"] = [list(c) for c in spec.cat]
    d["hist"] = list(spec.hist)
    return d


def _spec_from_json(d: dict[str, Any]) -> TowerSpec:
    return TowerSpec(
        cat=tuple((str(n), int(c)) for n, c in d["cat"]),
        n_num=int(d["n_num"]),
        hist=tuple(d["hist"]),
        n_items=int(d["n_items"]),
        id_feature=d.get("id_feature"),
    )


def save_checkpoint(
    directory: str | Path, model: TwoTower, owners: UnitOwners, meta: dict[str, Any] | None = None
) -> Path:
    """Write model + masks + metadata to `directory` atomically; returns the directory."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".ckpt-", dir=directory.parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        torch.save(state, tmp / "model.pt")
        save_masks(tmp / "masks", model, owners)
        info = {
            "format_version": FORMAT_VERSION,
            "user_spec": _spec_to_json(model.user.spec),
            "item_spec": _spec_to_json(model.item.spec),
            "model": dataclasses.asdict(model.cfg),
            "n_stages": model.n_stages,
            "stages": list(owners.stages),
            "meta": meta or {},
        }
        (tmp / "checkpoint.json").write_text(json.dumps(info, indent=1, default=str))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_checkpoint(
    directory: str | Path, device: str = "cpu"
) -> tuple[TwoTower, UnitOwners, dict[str, Any]]:
    """Rebuild the model from its metadata, load weights strictly, install validated masks."""
    directory = Path(directory)
    for f in ("model.pt", "checkpoint.json", "masks/masks.json"):
        if not (directory / f).exists():
            raise CheckpointError(f"{directory}: missing {f}; is this a csmf checkpoint directory?")
    try:
        info = json.loads((directory / "checkpoint.json").read_text())
    except (OSError, ValueError) as exc:  # unreadable, not UTF-8, not JSON
        raise CheckpointError(f"{directory}/checkpoint.json: cannot be read ({exc})") from exc
    if info.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{directory}/checkpoint.json: unsupported format {info.get('format_version')!r}"
        )
    mcfg = info["model"]
    mcfg["hidden"] = tuple(mcfg["hidden"])
    model = TwoTower(
        _spec_from_json(info["user_spec"]),
        _spec_from_json(info["item_spec"]),
        ModelConfig(**mcfg),
        int(info["n_stages"]),
    )
    try:
        state = torch.load(directory / "model.pt", weights_only=True, map_location="cpu")
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:  # truncated, overwritten
        raise CheckpointError(
            f"{directory}/model.pt: cannot be read, the file is damaged or truncated "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    model.load_state_dict(state, strict=True)
    owners = load_masks(directory / "masks", model)
    model.to(device)
    model.set_owners(param_owners(model, owners))
    model.eval()
    return model, owners, info.get("meta", {})
