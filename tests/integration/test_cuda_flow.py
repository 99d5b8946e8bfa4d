"""The daily flow with `train.device=cuda` (Prefect harness + MLflow on SQLite, tiny data): two days,
the second incremental, then serving from the champion's bundle on the GPU and on the CPU.

Only the parts of the product that run on CUDA in a deployment: every cascade step and the selection
pass load their checkpoint or warm start onto the device, the gate verifies the challenger there, the
recommender serves with the user tower there. The first CUDA session (bench/gpu_check.sh on an H200)
found that a model moved between devices after a masked forward failed; these runs cover the moves
the flow makes. Marked `gpu`: bench/gpu_check.sh runs it on a CUDA machine (it needs Prefect and
MLflow there, i.e. the pinned stack). `CSMF_TEST_DEVICE=cpu` runs the same test on the CPU, which is
how its own logic is checked where there is no GPU:

    CSMF_TEST_DEVICE=cpu .venv/bin/python -m pytest -m gpu tests/integration/test_cuda_flow.py
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

DEVICE = os.environ.get("CSMF_TEST_DEVICE", "cuda")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def days(tmp_path_factory):
    pytest.importorskip("prefect", reason="the flow needs the pinned stack (Prefect)")
    pytest.importorskip("mlflow", reason="the flow needs the pinned stack (MLflow)")
    from csmf_core.synth import generate
    from flows.pipeline import csmf_daily
    from flows.registry import REGISTERED_MODEL, resolve_bundle
    from tests.integration.conftest import temporary_api
    from tests.integration.test_gate_flow import OVERRIDES, _store

    root = tmp_path_factory.mktemp("cuda-flow")
    tiny = generate(root / "tiny", "tiny", seed=0).out_dir
    home = root / "home"
    overrides = [*OVERRIDES, "train.mode=incremental", f"train.device={DEVICE}"]
    out = SimpleNamespace(home=home)
    with temporary_api(), _store(home):
        out.a = csmf_daily(date="2026-01-05", data=str(tiny), home=str(home), overrides=overrides)
        out.b = csmf_daily(date="2026-01-06", data=str(tiny), home=str(home), overrides=overrides)
        out.bundle = resolve_bundle(f"models:/{REGISTERED_MODEL}@champion", home=home)
    return out


def test_two_days_on_the_device_full_then_incremental_pass_the_gate(days):
    assert days.a["model_version"] == "1" and days.a["gate"]["promoted"]
    assert days.b["model_version"] == "2"
    checks = days.b["gate"]["checks"]
    assert checks == {"exact_fusion": True, "frozen_parameters": True, "index_matches_towers": True}


def test_the_champion_serves_the_same_items_with_the_tower_on_the_device_and_on_the_cpu(days):
    from csmf_core.serving import Recommender

    on_device = Recommender.load(days.bundle, device=DEVICE)
    on_cpu = Recommender.load(days.bundle, device="cpu")
    users = np.asarray(on_cpu.user_vocab[:64])
    a = on_device.recommend(users, k=10)
    b = on_cpu.recommend(users, k=10)
    assert [r["user_id"] for r in a] == [r["user_id"] for r in b]
    # float32 rounding may swap two items with nearly equal scores: compare scores, not only ids
    for ra, rb in zip(a, b):
        np.testing.assert_allclose(ra["scores"], rb["scores"], rtol=1e-4, atol=1e-4)
