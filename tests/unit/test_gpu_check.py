"""bench/gpu_check.py (#18 item 5) without a GPU: the metric-match rule on hand-made figures, and the
driver's CPU path at --quick size (the tiny generated world, 1 epoch per stage).

No CUDA device exists where these tests normally run, so the CUDA arm itself is not exercised here;
`--device cpu` runs the whole comparison path (second cascade, forward parity, metric table, serving
arms) with the CPU standing in for the GPU: the same seed twice under deterministic kernels must give
identical metrics, which checks the comparison machinery, not the GPU.
"""

from __future__ import annotations

import importlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def gc(tmp_path, monkeypatch):
    monkeypatch.setenv("CSMF_BENCH_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("CSMF_BENCH_RESULTS", str(tmp_path / "results"))
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    monkeypatch.syspath_prepend(str(REPO))
    return importlib.import_module("bench.gpu_check")


def test_tolerance_is_the_seed_range_doubled_with_a_floor(gc):
    cpu = [
        {"click/own/recall@50": 0.180, "conversion/own/recall@50": 0.150, "exposure/own/recall@50": 0.1730},
        {"click/own/recall@50": 0.190, "conversion/own/recall@50": 0.170, "exposure/own/recall@50": 0.1732},
        {
            "click/own/recall@50": 0.185,
            "conversion/own/recall@50": float("nan"),
            "exposure/own/recall@50": 0.1731,
        },
    ]
    tol = gc.tolerances(cpu)
    assert tol["click/own/recall@50"] == pytest.approx(2 * 0.010)
    assert tol["conversion/own/recall@50"] == pytest.approx(2 * 0.020)  # the NaN seed is left out
    assert tol["exposure/own/recall@50"] == gc.FLOOR  # seeds agree closely: the floor
    assert gc.tolerances(cpu[:1]) == dict.fromkeys(cpu[0], gc.FLOOR)  # one seed: the floor only


def test_metrics_match_within_tolerance_and_not_outside(gc):
    cpu = {"click/own/recall@50": 0.180, "click/fused/ndcg@50": 0.060, "conversion/own/ndcg@50": float("nan")}
    tol = {"click/own/recall@50": 0.02, "click/fused/ndcg@50": 0.005, "conversion/own/ndcg@50": 0.01}
    within = {"click/own/recall@50": 0.195, "click/fused/ndcg@50": 0.056, "conversion/own/ndcg@50": 0.05}
    rows = {r["metric"]: r for r in gc.compare_metrics(within, cpu, tol)}
    assert rows["click/own/recall@50"]["match"] is True
    assert rows["click/own/recall@50"]["diff"] == pytest.approx(0.015)
    assert rows["click/fused/ndcg@50"]["match"] is True
    assert rows["conversion/own/ndcg@50"]["match"] is None  # NaN on the CPU side: nothing to compare
    assert gc.all_match(list(rows.values())) is True
    outside = dict(within, **{"click/fused/ndcg@50": 0.0545})  # 0.0055 > 0.005
    rows = gc.compare_metrics(outside, cpu, tol)
    assert [r["match"] for r in rows if r["metric"] == "click/fused/ndcg@50"] == [False]
    assert gc.all_match(rows) is False
    missing = {"click/own/recall@50": 0.18}  # a metric absent (or NaN) on the device side does not match
    assert gc.all_match(gc.compare_metrics(missing, cpu, tol)) is False
    nan = dict(within, **{"click/own/recall@50": float("nan")})
    assert gc.all_match(gc.compare_metrics(nan, cpu, tol)) is False
    assert gc.all_match([]) is False  # nothing compared is not a match


def test_metrics_from_rows_own_and_fused(gc):
    rows = [
        {"objective": "click", "scorer": "click", "k": 50, "recall": 0.2, "ndcg": 0.1, "users": 3},
        {"objective": "click", "scorer": "exposure", "k": 50, "recall": 0.9, "ndcg": 0.9, "users": 3},
        {"objective": "click", "scorer": "fused", "k": 50, "recall": 0.3, "ndcg": 0.15, "users": 3},
        {"objective": "click", "scorer": "click", "k": 10, "recall": 0.1, "ndcg": 0.05, "users": 3},
        {"objective": "click", "scorer": "popularity", "k": 50, "recall": 0.5, "ndcg": 0.5, "users": 3},
    ]
    assert gc.metrics_from_rows(rows, 50) == {
        "click/own/recall@50": 0.2,
        "click/own/ndcg@50": 0.1,
        "click/fused/recall@50": 0.3,
        "click/fused/ndcg@50": 0.15,
    }


def _records(tmp_path) -> list[dict]:
    lines = (tmp_path / "results" / "gpu_check.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    for r in recs:
        assert r["bench"] == "gpu_check"
        assert set(r) >= {"figure", "value", "unit", "target", "met", "machine", "date", "params"}
        assert isinstance(r["value"], int | float) and math.isfinite(r["value"])
    return recs


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_quick_cpu_path_without_gpu(gc, tmp_path, capsys):
    res = gc.main(["--quick", "--cpu-seeds", "2"])
    out = capsys.readouterr().out
    assert out.startswith("NO GPU") and "CPU path only" in out
    assert res["device"] is None and res["match"] is None and len(res["cpu"]) == 2
    figs = {r["figure"]: r for r in _records(tmp_path)}
    assert not any("cuda" in f for f in figs)
    assert figs["cpu training samples/s"]["value"] > 0
    metrics = [r for f, r in figs.items() if f.startswith("cpu ") and "@50" in f]
    assert len(metrics) == 12  # 3 objectives x own/fused x recall/ndcg
    for r in metrics:
        assert 0.0 <= r["value"] <= 1.0
        assert r["params"]["tolerance"] >= gc.FLOOR
    assert figs["serving latency per query, tower on cpu, batch 1"]["value"] > 0


@pytest.mark.slow
def test_quick_comparison_path_with_the_cpu_standing_in(gc, tmp_path, capsys):
    res = gc.main(["--quick", "--device", "cpu", "--cpu-seeds", "1"])
    out = capsys.readouterr().out
    assert "not a GPU figure" in out and "== metrics, cpu-arm vs CPU" in out
    assert res["match"] is True
    assert all(r["diff"] == 0.0 for r in res["comparison"])  # deterministic kernels: same seed, same model
    figs = {r["figure"]: r for r in _records(tmp_path)}
    ratio = figs["training samples/s ratio cpu-arm/cpu"]["value"]
    assert ratio == pytest.approx(
        figs["cpu-arm training samples/s"]["value"] / figs["cpu training samples/s"]["value"]
    )
    for what in ("items", "users"):
        r = figs[f"forward parity: max |cpu-arm - cpu| of {what} vectors, same weights"]
        assert r["value"] == 0.0 and r["met"] is True
    assert figs["metrics match cpu within noise (Recall/nDCG@50, own and fused)"]["value"] == 1
    assert sum(f.startswith("|cpu-arm - cpu| ") for f in figs) == 12
    assert figs["serving latency ratio cpu-arm/cpu tower, batch 1"]["value"] > 0


def test_shell_script_parses():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    assert subprocess.run([bash, "-n", str(REPO / "bench" / "gpu_check.sh")]).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="checks the no-GPU path")
def test_shell_script_without_gpu_runs_the_cpu_path(tmp_path):
    """No nvidia-smi: says so, installs nothing (CSMF_GPU_CHECK_PYTHON), runs the driver's CPU path, exit 0."""
    env = {
        "PATH": "/usr/bin:/bin",
        "CSMF_GPU_CHECK_PYTHON": sys.executable,
        "CSMF_BENCH_DIR": str(tmp_path / "work"),
        "CSMF_BENCH_RESULTS": str(tmp_path / "results"),
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "HOME": str(tmp_path),
    }
    p = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--quick", "--cpu-seeds", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.startswith("NO GPU: nvidia-smi") and "nothing installed" in p.stdout
    assert "cuda available: False" in p.stdout and "only the CPU path ran (exit 0)" in p.stdout
    assert (tmp_path / "results" / "gpu_check.jsonl").exists()


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="checks the no-GPU path")
def test_shell_script_names_the_missing_packages_of_the_python_it_is_given(tmp_path):
    """A machine's own CUDA Python (CSMF_GPU_CHECK_PYTHON) without the pinned polars / faiss-cpu (as on
    the H200 this project was lent): exit 2 naming them, before any work. Here a Python that sees torch
    but neither of them: the project's interpreter started with an import hook that hides them."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('polars', 'faiss'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Hide())\n"
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "CSMF_GPU_CHECK_PYTHON": sys.executable,
        "PYTHONPATH": f"{hide}:{REPO}",
        "HOME": str(tmp_path),
    }
    p = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--quick"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2, p.stdout + p.stderr
    assert "cannot import: polars faiss" in p.stdout
    assert "gpu_check.py" not in p.stdout  # stopped before the driver ran
