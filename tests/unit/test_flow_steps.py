"""The daily flow's cascade steps outside Prefect: what a step logs, and the checkpoints the flow hands on.

A step task's body runs through `task.fn` against a real MLflow store (SQLite in tmp_path); Prefect's
run logger is replaced by a plain one, since no flow run is active.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest

from csmf_core.cascade import plan
from csmf_core.config import build_config
from flows import cascade_step as steps
from flows.cascade_step import Checkpoints
from flows.ingest import Ingested
from flows.inputs import Window
from flows.runs import LOADED, RunContext
from flows.tracking import MlflowTracker

OBJECTIVES = ["exposure", "click", "conversion"]


def test_checkpoints_name_the_steps_evaluate_and_gate_read():
    for recover in (True, False):
        cfg = build_config(None, [f"recover.enabled={str(recover).lower()}"])
        done = Checkpoints()
        assert done.last is None
        for s in plan(OBJECTIVES, cfg):
            done = done.add(s, Path("w") / s.name / "checkpoint")
            assert done.last == Path("w") / s.name / "checkpoint"
        assert done.final == Path("w/finetune_conversion/checkpoint")
        assert done.after_pruning() == {
            "cpp_prune_exposure": Path("w/cpp_prune_exposure/checkpoint"),
            "cpp_prune_click": Path("w/cpp_prune_click/checkpoint"),
        }
        last = "recover" if recover else "cpp_prune"  # the last step of each stage but the final one
        assert done.stage_ends() == {
            0: Path(f"w/{last}_exposure/checkpoint"),
            1: Path(f"w/{last}_click/checkpoint"),
        }
    with pytest.raises(ValueError, match="no cascade step"):
        _ = Checkpoints().final


def test_validation_figures_go_under_val_and_not_train():
    info = {
        "epochs": 3,
        "final_loss": 1.5,
        "val_best_epoch": 2.0,
        "val_best_recall@50": 0.3,
        "val_start_recall@50": 0.1,
        "val_last_recall@50": 0.25,
    }
    got = steps._validation(SimpleNamespace(info=info), "click")
    assert got == {
        "val/click/best_epoch": 2.0,
        "val/click/best_recall@50": 0.3,
        "val/click/start_recall@50": 0.1,
        "val/click/last_recall@50": 0.25,
    }
    assert steps._validation(SimpleNamespace(info={"epochs": 3}), "click") == {}  # data.val_days = 0


@pytest.fixture
def step_run(tiny_world, tmp_path, monkeypatch):
    """A RunContext on a fresh SQLite store, the tiny world's model-ready data, Prefect's logger replaced."""
    monkeypatch.setattr(steps, "get_run_logger", lambda: logging.getLogger("test_flow_steps"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("csmf", artifact_location=(tmp_path / "art").as_uri())
    parent = MlflowTracker.start(exp, "csmf-daily-2026-01-06", tracking_uri=uri)
    window = Window("2026-01-06", [f"2026-01-0{d}" for d in range(1, 6)], ["2026-01-06"], [])
    run = RunContext(tmp_path / "work", tiny_world["ds"], window, uri, exp, parent.run_id, "digest")
    ready = Ingested(tiny_world["mr"], tiny_world["ds"], OBJECTIVES)
    yield SimpleNamespace(run=run, ready=ready, client=client, parent=parent)
    LOADED.clear()  # what the flow does when it ends


def test_a_train_step_logs_its_evaluation_and_validation_metrics(tiny_world, step_run):
    """With data.val_days > 0 a train step's child run and the parent (step = step index) carry
    test/by_step/<objective>/... (evaluation days) and val/<objective>/... (the epoch selection on the
    held-out days); a prune step has no validation, so no val/ keys."""
    cfg = dataclasses.replace(tiny_world["cfg"], data=dataclasses.replace(tiny_world["cfg"].data, val_days=1))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, threads=1))
    first, prune = plan(OBJECTIVES, cfg)[:2]
    ckpt = steps.cascade_step.fn(first, 0, None, step_run.ready, cfg, step_run.run)
    assert ckpt == step_run.run.workdir / "pretrain_exposure" / "checkpoint" and (ckpt / "model.pt").is_file()
    steps.cascade_step.fn(prune, 1, ckpt, step_run.ready, cfg, step_run.run)
    children = {
        r.info.run_name: r
        for r in step_run.client.search_runs(
            [step_run.run.experiment_id], f"tags.mlflow.parentRunId = '{step_run.parent.run_id}'"
        )
    }
    got = children["pretrain_exposure"].data.metrics
    ks = cfg.eval.ks
    by_step = {f"test/by_step/exposure/{m}_at_{k}" for m in ("recall", "ndcg") for k in ks}
    val = {
        f"val/exposure/{n}"
        for n in ("best_epoch", "best_recall_at_50", "start_recall_at_50", "last_recall_at_50")
    }
    assert by_step | val <= set(got)
    assert not [k for k in got if k.startswith(("val/click", "train/val_"))]
    assert 0.0 <= got["val/exposure/best_recall_at_50"] <= 1.0
    assert got["val/exposure/best_recall_at_50"] >= got["val/exposure/start_recall_at_50"]
    assert children["pretrain_exposure"].data.tags["csmf.step"] == "pretrain_exposure"
    pruned = children["cpp_prune_exposure"].data.metrics
    assert by_step <= set(pruned) and not [k for k in pruned if k.startswith("val/")]
    history = step_run.client.get_metric_history(step_run.parent.run_id, "val/exposure/best_recall_at_50")
    assert [(m.step, m.value) for m in history] == [(0, got["val/exposure/best_recall_at_50"])]
    steps_logged = step_run.client.get_metric_history(
        step_run.parent.run_id, "test/by_step/exposure/recall_at_50"
    )
    assert sorted(m.step for m in steps_logged) == [0, 1]
