"""Operations around the gate: the per-date run lock, the stage-result cache, retention."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from csmf_core.config import build_config
from flows.lock import RunLocked, date_lock
from flows.resume import StageCache, training_digest
from flows.retention import apply_retention

WINDOW = SimpleNamespace(
    date="2026-01-06", train_dates=["2026-01-04", "2026-01-05"], eval_dates=["2026-01-06"]
)


# ---- lock ------------------------------------------------------------------------------------------
def test_second_run_for_the_same_date_is_refused(tmp_path):
    with date_lock(tmp_path, "2026-01-06", who="flow run A"):
        with pytest.raises(RunLocked) as err:
            with date_lock(tmp_path, "2026-01-06", who="flow run B"):
                pass
        msg = str(err.value)
        assert "2026-01-06 is training" in msg and f"pid {os.getpid()}" in msg and "flow run A" in msg
        with date_lock(tmp_path, "2026-01-07"):  # another date is independent
            pass
    with date_lock(tmp_path, "2026-01-06"):  # released after the block
        pass


def test_lock_of_a_killed_process_is_released(tmp_path):
    code = (
        "import sys, time; sys.path.insert(0, sys.argv[2]); from flows.lock import date_lock\n"
        "with date_lock(sys.argv[1], '2026-01-06', who='child'):\n"
        "    print('locked', flush=True); time.sleep(60)\n"
    )
    root = str(Path(__file__).resolve().parents[2])
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path), root], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked, match=f"pid {child.pid}"):
            with date_lock(tmp_path, "2026-01-06"):
                pass
    finally:
        child.kill()
        child.wait(timeout=10)
    with date_lock(tmp_path, "2026-01-06"):  # kill -9 left no stale lock
        pass


def test_a_second_gate_waits_for_the_registry_lock(tmp_path):
    """Two runs of different dates gating at once both read the same champion and the later promotion
    won; the gate now runs under one lock per home: the second waits, and names the holder when its
    wait runs out."""
    import threading
    import time

    from flows.lock import registry_lock

    held, release = threading.Event(), threading.Event()

    def first():
        with registry_lock(tmp_path, who="gate of v1"):
            held.set()
            release.wait(10)

    t = threading.Thread(target=first)
    t.start()
    try:
        assert held.wait(10)
        with pytest.raises(RunLocked, match=r"locked for over 0.2 s by pid \d+ .*gate of v1"):
            with registry_lock(tmp_path, who="gate of v2", timeout=0.2):
                pass
        threading.Timer(0.3, release.set).start()
        t0 = time.monotonic()
        with registry_lock(tmp_path, who="gate of v2", timeout=10):  # waits for the first to end
            waited = time.monotonic() - t0
        assert waited >= 0.25
    finally:
        release.set()
        t.join(10)


# ---- stage cache -----------------------------------------------------------------------------------
def _checkpoint(d: Path, content: str = "w") -> Path:
    d.mkdir(parents=True)
    (d / "checkpoint.json").write_text("{}")
    (d / "model.pt").write_text(content)
    return d


def test_training_digest_ignores_gate_and_retention_only():
    base = build_config()
    assert training_digest(base) == training_digest(build_config(None, ["gate.tolerance=0.5"]))
    assert training_digest(base) == training_digest(build_config(None, ["retention.keep_days=1"]))
    assert training_digest(base) != training_digest(build_config(None, ["train.lr=0.01"]))


def test_stage_cache_round_trip_and_keys(tmp_path):
    cache = StageCache.for_run(tmp_path, "d1", "c1", "0.1.0+gabc", WINDOW)
    assert cache.lookup("pretrain_exposure", 0) is None
    ckpt = _checkpoint(tmp_path / "runs" / "2026-01-06" / "r1" / "pretrain_exposure" / "checkpoint")
    cache.record("pretrain_exposure", 0, {"checkpoint": ckpt}, metrics={"val/x": 0.5}, source_run="p1")
    hit = cache.lookup("pretrain_exposure", 0)
    assert hit["source_run"] == "p1" and hit["metrics"] == {"val/x": 0.5}
    # a new run with identical inputs finds it; any changed input does not
    assert StageCache.for_run(tmp_path, "d1", "c1", "0.1.0+gabc", WINDOW).lookup("pretrain_exposure", 0)
    for other in (
        StageCache.for_run(tmp_path, "d2", "c1", "0.1.0+gabc", WINDOW),
        StageCache.for_run(tmp_path, "d1", "c2", "0.1.0+gabc", WINDOW),
        StageCache.for_run(tmp_path, "d1", "c1", "0.1.0+gdef", WINDOW),
        StageCache.for_run(
            tmp_path,
            "d1",
            "c1",
            "0.1.0+gabc",
            SimpleNamespace(**{**vars(WINDOW), "train_dates": ["2026-01-05"]}),
        ),
    ):
        assert other.lookup("pretrain_exposure", 0) is None
    assert cache.lookup("pretrain_exposure", 1) is None and cache.lookup("finetune_click", 0) is None
    dest = StageCache.restore(hit["outputs"]["checkpoint"], tmp_path / "runs" / "2026-01-06" / "r2" / "ck")
    assert (dest / "model.pt").read_text() == "w" and (dest / "checkpoint.json").is_file()
    # an incomplete output (no checkpoint.json) or a deleted one is not a hit
    (ckpt / "checkpoint.json").unlink()
    assert cache.lookup("pretrain_exposure", 0) is None


# ---- retention -------------------------------------------------------------------------------------
def test_retention_keeps_last_days_and_the_champion(tmp_path):
    runs = tmp_path / "runs"
    dirs = {}
    for day in range(1, 11):
        dirs[day] = _checkpoint(runs / f"2026-01-{day:02d}" / f"run{day}" / "bundle" / "checkpoint").parents[
            1
        ]
    champion = dirs[2]
    cache = StageCache.for_run(tmp_path, "d", "c", "v", WINDOW)
    cache.record("s_old", 0, {"checkpoint": dirs[1] / "bundle" / "checkpoint"})
    cache.record("s_new", 0, {"checkpoint": dirs[9] / "bundle" / "checkpoint"})
    assert apply_retention(tmp_path, 0, [champion]) == []  # 0 = keep all
    removed = apply_retention(tmp_path, 3, [champion, dirs[10]])
    assert sorted(removed) == sorted(dirs[d] for d in (1, 3, 4, 5, 6, 7))
    left = sorted(p.name for p in runs.iterdir())
    assert left == ["2026-01-02", "2026-01-08", "2026-01-09", "2026-01-10"]
    assert (champion / "bundle" / "checkpoint" / "model.pt").is_file()
    assert cache.lookup("s_old", 0) is None and cache.lookup("s_new", 0) is not None
    assert len(list((tmp_path / "cache" / "stages").glob("*.json"))) == 1
    assert json.loads(next((tmp_path / "cache" / "stages").glob("*.json")).read_text())["stage"] == "s_new"


def test_retention_never_deletes_the_dirs_of_a_run_going_on_for_an_old_date(tmp_path):
    """A backfill of an old date, running while a daily run applies retention, lost its run dir and
    failed in register ("No such artifact")."""
    from flows.lock import date_lock

    runs = tmp_path / "runs"
    dirs = {
        d: _checkpoint(runs / f"2026-01-{d:02d}" / f"run{d}" / "bundle" / "checkpoint").parents[1]
        for d in (1, 2, 9, 10)
    }
    with date_lock(tmp_path, "2026-01-02", who="a backfill"):
        removed = apply_retention(tmp_path, 3, [dirs[10]])
        assert removed == [dirs[1]] and (dirs[2] / "bundle" / "checkpoint" / "model.pt").is_file()
    assert apply_retention(tmp_path, 3, [dirs[10]]) == [dirs[2]]  # once it has finished


def test_the_flow_refuses_a_date_that_is_training(tmp_path):
    """csmf_daily takes the date's lock after planning the window and before any task or MLflow run:
    with the lock held elsewhere it fails at once with the holder in the message."""
    from csmf_core.synth import generate
    from flows.pipeline import csmf_daily

    data = generate(tmp_path / "tiny", "tiny", seed=0).out_dir
    home = tmp_path / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
        mp.setenv("PREFECT_HOME", str(home / "prefect"))
        mp.setenv("CSMF_HOME", str(home))  # the flow sets it: restored with the others
        with date_lock(home, "2026-01-05", who="flow run A"):
            with pytest.raises(
                RunLocked, match="another csmf-daily run for 2026-01-05 is training .*flow run A"
            ):
                try:
                    csmf_daily.fn(date="2026-01-05", data=str(data), home=str(home))
                finally:
                    import mlflow

                    mlflow.set_tracking_uri(None)  # the flow sets the process-wide tracking URI
    assert not (home / "runs").exists() and not (home / "mlflow.db").exists()


def test_non_finite_loss_stops_the_stage(tiny_world):
    """With max_loss out of reach, only a non-finite loss can stop training: lr 1e30 blows the
    weights up within a few steps and the stage raises TrainingDiverged naming it."""
    import dataclasses

    from csmf_core.cascade import run_cascade
    from csmf_core.optim import TrainingDiverged

    cfg = tiny_world["cfg"]
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=1e30, max_loss=1e308))
    with pytest.raises(TrainingDiverged) as err:
        run_cascade(tiny_world["data"], cfg)
    msg = str(err.value)
    assert msg.startswith("pretrain_exposure (train): loss nan") and "Lower train.lr" in msg


def test_a_reused_version_promoted_before_is_not_promoted_again():
    """An operator rolled the champion back from v1 to v2; re-running v1's date reused v1 (identical
    inputs), found no metric below v2 and promoted v1 again, undoing the rollback."""
    from types import SimpleNamespace

    from flows.promotion import was_promoted_before

    run = SimpleNamespace(parent_run_id="b" * 32)
    v = lambda **tags: SimpleNamespace(tags=tags)  # noqa: E731
    assert was_promoted_before(v(**{"csmf.parent_run_id": "a" * 32, "csmf.gate": "promoted"}), run)
    assert not was_promoted_before(v(**{"csmf.parent_run_id": "a" * 32, "csmf.gate": "kept"}), run)
    assert not was_promoted_before(v(**{"csmf.parent_run_id": "a" * 32}), run)  # killed before its gate
    assert not was_promoted_before(
        v(**{"csmf.parent_run_id": "b" * 32, "csmf.gate": "promoted"}), run
    )  # a retry


def test_the_gate_decides_under_the_registry_lock(tmp_path, monkeypatch):
    """flows.promotion.gate takes the home's registry lock before it reads the champion."""
    import flows.promotion as promotion

    taken = []

    class Taken(Exception):
        pass

    def lock(home, who="", timeout=600.0):
        taken.append((home, who))
        raise Taken

    monkeypatch.setattr(promotion, "registry_lock", lock)
    monkeypatch.setattr(
        promotion, "champion", lambda client=None: pytest.fail("champion read before the lock")
    )
    run = SimpleNamespace(parent=lambda: SimpleNamespace(client=None), home=tmp_path)
    with pytest.raises(Taken):
        promotion.gate.fn(tmp_path / "bundle", "7", {}, None, build_config(), run)
    assert taken == [(tmp_path, "gate of v7")]


def test_a_champion_of_another_dataset_is_kept_and_not_compared(tiny_world, tmp_path, monkeypatch):
    """One registry per home: a run on dataset B re-scored dataset A's champion on B's days (where A's
    users and items are unknown, so it loses by construction) and replaced it. The champion here is the
    very model of the challenger, loadable, so a comparison would find no drop and promote: only the
    dataset tag keeps it."""
    import flows.promotion as promotion
    from flows.names import DATASET_TAG

    monkeypatch.setattr(promotion, "resolve_bundle", lambda ref, home=None: tiny_world["bundle"])
    cfg = build_config(None, ["gate.min_users=1"])
    d = tiny_world["dates"]
    window = SimpleNamespace(date=d[5], eval_dates=[d[5]], train_dates=list(d[:5]))
    run = SimpleNamespace(dataset_dir=tiny_world["ds"], data_digest="d", window=window, home=tmp_path)
    ready = SimpleNamespace(model_ready=tiny_world["mr"])

    def decide(dataset):
        current = SimpleNamespace(version="3", tags={DATASET_TAG: dataset})
        return promotion._decide(tiny_world["bundle"], "4", {}, current, False, ready, cfg, run)

    same = decide("synth-tiny")
    assert same.promote and "no metric below champion v3" in same.reason
    other = decide("another-world")
    assert not other.promote
    assert other.reason.startswith(
        "champion v3 could not be compared: it is a model of dataset 'another-world'"
    )
    assert "one home (registry) per dataset" in other.reason
