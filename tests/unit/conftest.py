"""A tiny end-to-end world (synth -> prep -> 3-stage cascade -> checkpoint -> serving bundle), built once."""

from __future__ import annotations

import pytest

from csmf_core import synth
from csmf_core.cascade import load_cascade_data
from csmf_core.serving import write_bundle


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory, tiny_trainer):
    """Paths and objects of a trained tiny model: ds (canonical), mr (model-ready), ckpt, bundle.

    Synth preset "tiny" (6 days from 2026-01-01): train on days 1-5, evaluate on day 6. ~7 s.
    """
    root = tmp_path_factory.mktemp("world")
    s = synth.generate(root / "ds", "tiny", seed=0)
    cfg, _, model, owners = tiny_trainer(root / "ds", root, s.dates)
    data = load_cascade_data(root / "mr")
    write_bundle(
        root / "bundles" / "b1",
        checkpoint_dir=root / "ckpt",
        model_ready_dir=root / "mr",
        dataset_dir=root / "ds",
        config=cfg,
    )
    return {
        "root": root,
        "ds": root / "ds",
        "mr": root / "mr",
        "ckpt": root / "ckpt",
        "bundle": root / "bundles" / "b1",
        "cfg": cfg,
        "model": model,
        "owners": owners,
        "data": data,
        "dates": s.dates,
    }
