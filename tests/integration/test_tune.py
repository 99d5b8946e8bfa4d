"""`csmf tune` for real (Prefect test harness, MLflow and the Optuna study in a tmp home, tiny data):
a seeded tune is reproducible, never reads the evaluation days, respects --trials and --timeout,
and resumes after kill -9 without repeating finished trials.

    .venv/bin/pytest -m integration tests/integration/test_tune.py
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest
import yaml

from csmf_core.synth import generate
from flows.tune import csmf_tune
from tests.integration.conftest import temporary_api

pytestmark = pytest.mark.integration

SPACE = {
    "train.lr": {"low": 1.0e-3, "high": 5.0e-3, "log": True},
    "train.epochs": {"per_stage": [[1, 1]]},
    "loss.aml": {"choices": [True, False]},
    "loss.eta": {"low": 1.0, "high": 3.0, "when": {"loss.aml": True}},
    "data.item_stats": {"choices": ["none", "[1]"]},
}
CONFIG = {
    "model": {"dim": 16, "hidden": [32]},
    "train": {"batch_size": 256, "threads": 1},
    "recover": {"epochs": 1},
    "data": {"seq_len": 5, "n_req_neg": 4},
}


@pytest.fixture(scope="module")
def harness():
    with temporary_api():
        yield


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tune")
    generate(root / "tiny", "tiny", seed=0)
    (root / "space.yaml").write_text(yaml.safe_dump(SPACE))
    (root / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    return {"root": root, "data": root / "tiny", "space": root / "space.yaml", "config": root / "config.yaml"}


@contextmanager
def _home(home: Path):
    uri = f"sqlite:///{home / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("CSMF_HOME", str(home))
        try:
            yield mlflow.MlflowClient(uri)
        finally:
            mlflow.set_tracking_uri(None)


def _tune(files, home: Path, data: Path | None = None, **kw) -> dict:
    with _home(home):
        return csmf_tune(
            data=str(data or files["data"]),
            space=str(files["space"]),
            config=str(files["config"]),
            home=str(home),
            seed=kw.pop("seed", 7),
            **{"trials": 3, **kw},
        )


def _trials(result: dict) -> list[tuple]:
    return [
        (t["number"], t["state"], t["value"], tuple(sorted(t["params"].items()))) for t in result["trials"]
    ]


@pytest.fixture(scope="module")
def first(harness, files, tmp_path_factory):
    return _tune(files, tmp_path_factory.mktemp("home-a"))


def test_tune_writes_the_changed_keys_and_tracks_every_trial(first, files):
    assert [t["state"] for t in first["trials"]] == ["COMPLETE"] * 3
    best = max(first["trials"], key=lambda t: t["value"])
    assert first["best_trial"] == best["number"] and first["best_value"] == best["value"]
    tuned = yaml.safe_load(Path(first["config_path"]).read_text())
    assert tuned == first["tuned"]
    # only keys that differ from the base config; the best trial's lr is one of them
    assert tuned["train"]["lr"] == pytest.approx(best["params"]["train.lr"])
    assert "model" not in tuned and "dim" not in tuned.get("model", {})
    # the header names the days the tune read (those before its run date: the tiny world's 01-06)
    from flows.tune import tuned_reads_before

    assert tuned_reads_before(Path(first["config_path"])) == "2026-01-06"
    home = Path(first["config_path"]).parents[1]
    client = mlflow.MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    parent = client.get_run(first["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["csmf.tuned_config"] == first["config_path"]
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(r.info.run_name for r in children) == ["trial-0", "trial-1", "trial-2"]
    assert all("val/score" in r.data.metrics for r in children)
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "tune")}
    assert {"tune/report.md", "tune/trials.png"} <= arts


def test_seeded_tune_is_reproducible(first, files, tmp_path):
    again = _tune(files, tmp_path / "home-b")
    assert _trials(again) == _trials(first)


def test_keys_fixed_by_set_are_not_searched_and_go_into_the_tuned_config(harness, files, tmp_path):
    """--set loss.aml=false: trials used to replace it with the space's choice, silently, and the tuned
    file (keys that differ from a base holding the --set) left it out for the runs that apply it."""
    fixed = _tune(files, tmp_path / "home-f", trials=1, overrides=["loss.aml=false", "train.batch_size=128"])
    (trial,) = fixed["trials"]
    assert "loss.aml" not in trial["params"] and "loss.eta" not in trial["params"]  # eta: only when aml
    assert "train.lr" in trial["params"]
    tuned = yaml.safe_load(Path(fixed["config_path"]).read_text())
    # a searched key fixed by --set is written; one that only shaped this run (not searched) is not
    assert tuned["loss"]["aml"] is False and "batch_size" not in tuned.get("train", {})
    assert "fixed by --set" in Path(fixed["config_path"]).read_text().splitlines()[3]


def test_evaluation_days_are_never_read(first, files, tmp_path):
    """Poison the evaluation partition (the run date's): the same study, trial for trial."""
    data = tmp_path / "poisoned"
    shutil.copytree(files["data"], data)
    last = sorted((data / "events").iterdir())[-1]
    for f in last.glob("*.parquet"):
        f.write_bytes(b"this is not parquet")
    poisoned = _tune(files, tmp_path / "home-c", data=data)
    assert _trials(poisoned) == _trials(first)


def test_trials_and_timeout_bound_the_study(harness, files, tmp_path):
    short = _tune(files, tmp_path / "home-d", trials=2)
    assert len(short["trials"]) == 2
    # a timeout lets no new trial start once it has passed; the first trial of a call always runs.
    # 1 microsecond has passed by the time the first trial ends, on any machine: only that one
    timed = _tune(files, tmp_path / "home-e", trials=10, timeout=1e-6)
    assert len(timed["trials"]) == 1


def _states(db: Path) -> list[str]:
    if not db.is_file():
        return []
    with sqlite3.connect(db) as con:
        try:
            return [r[0] for r in con.execute("select state from trials order by number")]
        except sqlite3.OperationalError:
            return []


def test_kill_9_then_rerun_resumes_without_repeating(harness, files, tmp_path):
    home = tmp_path / "home-k"
    script = textwrap.dedent(
        f"""
        import time
        import flows.tune
        from flows.tune import csmf_tune
        # trial 1 is held until the kill, so the test never races a fast machine to catch it RUNNING
        real, calls = flows.tune.run_trial, []
        def held(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                time.sleep(3600)
            return real(*args, **kwargs)
        flows.tune.run_trial = held
        csmf_tune(data={str(files["data"])!r}, space={str(files["space"])!r}, config={str(files["config"])!r},
                  home={str(home)!r}, seed=7, trials=3)
        """
    )
    env = {
        **os.environ,
        "CSMF_HOME": str(home),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "PREFECT_HOME": str(home / "prefect"),
    }
    env.pop("PREFECT_API_URL", None)
    (home / "prefect").mkdir(parents=True)  # as setup_home would, before prefect is imported
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True)
    db = home / "tune" / "studies.db"
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and _states(db)[:2] != ["COMPLETE", "RUNNING"]:
            assert proc.poll() is None, "the tune ended before it could be killed"
            time.sleep(0.2)
        assert _states(db)[:2] == ["COMPLETE", "RUNNING"]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with sqlite3.connect(db) as con:
        before = con.execute("select number, value from trial_values join trials using (trial_id)").fetchall()
    resumed = _tune(files, home, trials=3)
    states = [t["state"] for t in resumed["trials"]]
    assert states[1] == "FAIL"  # the killed trial
    assert states.count("COMPLETE") == 3 and len(states) == 4
    # the finished trial was kept, not run again; the killed trial's parameters were asked again first
    assert [(t["number"], t["value"]) for t in resumed["trials"] if t["number"] == 0] == before
    # (a kill between the ask and the last suggestion leaves part of them: those are asked again)
    killed, again = resumed["trials"][1]["params"], resumed["trials"][2]["params"]
    assert killed.items() <= again.items()


def test_an_objective_without_training_positives_fails_before_any_trial(tmp_path):
    """As a run's ingest does: the objective, column, days and count, before the first trial; and a
    fused-weight list of the wrong length is refused before any work."""
    import polars as pl

    from csmf_core.config import ConfigError, build_config
    from flows.tune import prepare_tune_data

    tiny = generate(tmp_path / "tiny", "tiny", seed=0).out_dir
    for part in (tiny / "events").glob("dt=*/*.parquet"):
        if part.parent.name < "dt=2026-01-06":
            pl.read_parquet(part).with_columns(converted=pl.lit(False)).write_parquet(part)
    with pytest.raises(
        ValueError, match=r"objective conversion \(column converted\): 0 positive row\(s\) in the 5"
    ):
        prepare_tune_data(tmp_path / "home", tiny, "2026-01-06", build_config())
    with pytest.raises(ConfigError, match=r"eval.fused_weights has 2 values"):
        prepare_tune_data(
            tmp_path / "home", tiny, "2026-01-06", build_config(None, ["eval.fused_weights=[1,1]"])
        )
