"""A tiny end-to-end world (synth -> prep -> 3-stage cascade -> checkpoint -> serving bundle), built once."""

from __future__ import annotations

import pytest
import torch

from csmf_core import prep, synth
from csmf_core.cascade import load_cascade_data, run_cascade
from csmf_core.checkpoint import save_checkpoint
from csmf_core.config import build_config
from csmf_core.serving import write_bundle

TINY_CONFIG = {
    "model": {"dim": 16, "hidden": [32]},
    "train": {"batch_size": 256, "epochs": [1, 1, 1]},
    "data": {"seq_len": 5, "n_req_neg": 4},
}


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """Paths and objects of a trained tiny model: ds (canonical), mr (model-ready), ckpt, bundle.

    Synth preset "tiny" (6 days from 2026-01-01): train on days 1-5, evaluate on day 6. ~7 s.
    """
    root = tmp_path_factory.mktemp("world")
    s = synth.generate(root / "ds", "tiny", seed=0)
    cfg = build_config(TINY_CONFIG)
    prep.prepare(
        root / "ds",
        root / "mr",
        train_dates=(s.dates[0], s.dates[-2]),
        eval_dates=s.dates[-1],
        seq_len=cfg.data.seq_len,
        n_req_neg=cfg.data.n_req_neg,
    )
    data = load_cascade_data(root / "mr")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is ~5x faster on a busy 2-core machine
    try:
        model, owners, _ = run_cascade(data, cfg)
    finally:
        torch.set_num_threads(threads)
    save_checkpoint(root / "ckpt", model, owners)
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
