"""The champion/challenger gate in real flow runs (Prefect harness + MLflow on SQLite, tiny data).

Issue #13: (1) an untrained model was promoted on an evaluation day without positives; (2) a backfill
was compared with a champion that had trained on the backfill's evaluation day; (9) every re-run with
identical inputs added a registry version. One tracking store, runs in this order:

    A  2026-01-05, tiny data                       -> v1, champion (first model, measurable)
    B  2026-01-06, every label of that day false,  -> v2, champion v1 kept: the day cannot measure it
       train.epochs=0,0,0 recover.epochs=0
    C  2026-01-04 (backfill), tiny data            -> v3; v1 trained on 2026-01-04, so both are
                                                      re-evaluated on 2026-01-06 (after both windows)
    D  = A again (identical inputs)                -> no new version: v1 reused, still champion

and, in a second store, the first model ever on the label-free day: registered, not champion.

    .venv/bin/pytest -m integration tests/integration/test_gate_flow.py
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import mlflow
import polars as pl
import pytest

from csmf_core.prep import prepare
from csmf_core.serving import Recommender
from csmf_core.synth import generate
from flows.gate import gate_metrics
from flows.pipeline import csmf_daily
from flows.registry import REGISTERED_MODEL, resolve_bundle
from tests.integration.conftest import temporary_api

pytestmark = pytest.mark.integration

OVERRIDES = [
    "model.dim=16",
    "model.hidden=[32]",
    "train.epochs=[1,1,1]",
    "train.batch_size=256",
    "train.threads=1",
    "recover.epochs=1",
    "eval.ks=[10,50]",
    "data.seq_len=5",
    "data.n_req_neg=4",
    "data.item_stats=[1,2]",  # the re-evaluation data must carry point-in-time item statistics too
]
UNTRAINED = [*OVERRIDES, "train.epochs=[0,0,0]", "recover.epochs=0"]
LABELS = ("exposed", "clicked", "converted")


@contextmanager
def _store(home: Path) -> Iterator[mlflow.MlflowClient]:
    """MLflow and the csmf home variables pointed at `home`, restored afterwards."""
    uri = f"sqlite:///{home / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("CSMF_HOME", str(home))
        mp.setenv("PREFECT_HOME", str(home / "prefect"))
        mp.setenv("CSMF_CODE_VERSION", "test-gate-flow")  # a commit during the test changes nothing
        try:
            yield mlflow.MlflowClient(uri)
        finally:
            mlflow.set_tracking_uri(None)


def _without_labels(src: Path, dst: Path, day: str) -> Path:
    """A copy of the dataset where every label of `day` is false (the events are still there)."""
    shutil.copytree(src, dst)
    for f in sorted((dst / "events" / f"dt={day}").glob("*.parquet")):
        pl.read_parquet(f).with_columns([pl.lit(False).alias(c) for c in LABELS]).write_parquet(f)
    return dst


def _gate_child(client: mlflow.MlflowClient, parent_run_id: str):
    parent = client.get_run(parent_run_id)
    kids = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return next(r for r in kids if r.info.run_name == "gate")


def _gate_artifact(flow_run_id: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return str(next(a for a in arts if a.key == "csmf-gate").data)


@pytest.fixture(scope="module")
def flows(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate-flow")
    tiny = generate(root / "tiny", "tiny", seed=0).out_dir
    nolabels = _without_labels(tiny, root / "tiny-no-labels-0106", "2026-01-06")
    home, fresh = root / "home", root / "fresh-home"
    out = SimpleNamespace(root=root, tiny=tiny, nolabels=nolabels, home=home, fresh=fresh)
    with temporary_api():
        with _store(home) as client:
            out.client = client
            out.a = csmf_daily(date="2026-01-05", data=str(tiny), home=str(home), overrides=OVERRIDES)
            out.b = csmf_daily(date="2026-01-06", data=str(nolabels), home=str(home), overrides=UNTRAINED)
            out.c = csmf_daily(date="2026-01-04", data=str(tiny), home=str(home), overrides=OVERRIDES)
            out.d = csmf_daily(date="2026-01-05", data=str(tiny), home=str(home), overrides=OVERRIDES)
            out.versions = {
                str(v.version): v for v in client.search_model_versions(f"name='{REGISTERED_MODEL}'")
            }
            out.champion = str(client.get_model_version_by_alias(REGISTERED_MODEL, "champion").version)
            out.artifacts = {
                k: _gate_artifact(out.versions[v].tags["prefect.flow_run_id"])
                for k, v in (("b", "2"), ("c", "3"))
            }
            out.gate_c = _gate_child(client, out.c["mlflow_run_id"])
            out.bundles = {
                v: resolve_bundle(f"models:/{REGISTERED_MODEL}/{v}", home=home) for v in ("1", "3")
            }
        with _store(fresh) as client:
            out.first = csmf_daily(
                date="2026-01-06", data=str(nolabels), home=str(fresh), overrides=UNTRAINED
            )
            out.first_versions = client.search_model_versions(f"name='{REGISTERED_MODEL}'")
            try:
                client.get_model_version_by_alias(REGISTERED_MODEL, "champion")
                out.first_champion = True
            except mlflow.exceptions.MlflowException:
                out.first_champion = False
            out.first_artifact = _gate_artifact(
                out.first_versions[0].tags["prefect.flow_run_id"] if out.first_versions else ""
            )
    return out


def test_first_measurable_model_becomes_champion(flows):
    assert flows.a["model_version"] == "1" and flows.a["gate"]["promoted"]
    assert flows.versions["1"].tags["csmf.gate"] == "promoted"
    assert flows.versions["1"].tags["csmf.train_dates"] == "2026-01-01..2026-01-04 (4 days)"


def test_eval_day_without_positives_keeps_the_champion(flows):
    """Case 1: every label of 2026-01-06 false and an untrained model: v2 is registered, v1 stays."""
    b = flows.b
    assert b["model_version"] == "2" and not b["gate"]["promoted"] and b["gate"]["champion_version"] == "1"
    tags = flows.versions["2"].tags
    assert tags["csmf.gate"] == "kept" and tags["csmf.gate_verified"] == "true"  # kept, not broken
    reason = tags["csmf.gate_reason"]
    assert reason == b["gate"]["reason"]
    assert "cannot measure" in reason and "2026-01-06" in reason and "champion v1 kept" in reason
    for objective in ("exposure", "click", "conversion"):
        assert f"{objective}: 0 users with a positive" in reason
    assert "gate.min_users" in reason
    assert "champion kept" in flows.artifacts["b"] and "cannot measure" in flows.artifacts["b"]
    parent = flows.client.get_run(b["mlflow_run_id"])
    assert parent.data.tags["csmf.gate"] == "kept" and parent.data.tags["csmf.gate_reason"] == reason


def test_first_unmeasurable_model_is_not_promoted(flows):
    """With no champion at all, a model the evaluation day cannot measure still does not become one."""
    assert [str(v.version) for v in flows.first_versions] == ["1"]
    assert not flows.first_champion and not flows.first["gate"]["promoted"]
    assert flows.first["gate"]["champion_version"] is None
    reason = flows.first_versions[0].tags["csmf.gate_reason"]
    assert "cannot measure" in reason and "no champion yet" in reason and "promote" in reason
    assert flows.first_versions[0].tags["csmf.gate"] == "kept" and "cannot measure" in flows.first_artifact


def _expected_on(bundle: Path, tiny: Path, out: Path, train: tuple[str, str], day: str) -> dict[str, float]:
    """Gate metrics of a bundle on `day`, from model-ready data prepared here by hand."""
    prepare(tiny, out, train_dates=train, eval_dates=day, seq_len=5, n_req_neg=4)
    rec = Recommender.load(bundle)
    return gate_metrics(rec.evaluate(out, ks=(50,)), rec.objectives, 50)


def test_backfill_is_compared_after_both_training_windows(flows, tmp_path):
    """Case 2: the backfill for 2026-01-04 meets champion v1, which trained on 2026-01-01..04. Both
    are scored on 2026-01-06, the newest day after both windows, and the reason says so."""
    c = flows.c
    assert c["model_version"] == "3"
    assert c["gate"]["champion_version"] == ("3" if c["gate"]["promoted"] else "1")
    reason = c["gate"]["reason"]
    verdict = "no metric below" if c["gate"]["promoted"] else "worse than"
    assert reason.startswith(f"{verdict} champion v1 on 2026-01-06")
    assert flows.versions["3"].tags["csmf.gate_reason"] == reason
    assert "trained on 2026-01-04" in reason and "re-evaluated on 2026-01-06" in reason
    assert "2026-01-06" in flows.artifacts["c"] and "re-evaluated" in flows.artifacts["c"]
    metrics = flows.gate_c.data.metrics
    got_old = {
        k.removeprefix("gate/champion/"): v for k, v in metrics.items() if k.startswith("gate/champion/")
    }
    got_new = {
        k.removeprefix("gate/challenger/"): v for k, v in metrics.items() if k.startswith("gate/challenger/")
    }
    from flows.tracking import metric_key

    day6 = ("2026-01-01", "2026-01-05")  # the window a regular run for 2026-01-06 prepares
    want_old = _expected_on(flows.bundles["1"], flows.tiny, tmp_path / "mr6", day6, "2026-01-06")
    want_new = _expected_on(flows.bundles["3"], flows.tiny, tmp_path / "mr6b", day6, "2026-01-06")
    assert got_old == pytest.approx({metric_key(k): v for k, v in want_old.items()}, abs=1e-9)
    assert got_new == pytest.approx({metric_key(k): v for k, v in want_new.items()}, abs=1e-9)
    assert len(got_old) == 12
    # what the old gate compared: the champion on 2026-01-04, a day it trained on; other numbers
    in_window = _expected_on(
        flows.bundles["1"], flows.tiny, tmp_path / "mr4", ("2026-01-01", "2026-01-03"), "2026-01-04"
    )
    assert got_old != pytest.approx({metric_key(k): v for k, v in in_window.items()}, abs=1e-6)


def test_identical_rerun_registers_no_new_version(flows):
    """Run D repeats run A's inputs: the model is bit-identical, so v1 is reused, not v4 added."""
    assert sorted(flows.versions, key=int) == ["1", "2", "3"]
    d = flows.d
    assert d["model_version"] == "1" and d["gate"]["champion_version"] == flows.champion
    if flows.c["gate"]["champion_version"] == "1":  # v1 was still champion: nothing to decide
        assert d["gate"]["promoted"] and d["gate"]["reason"] == "v1 is already champion"
        assert flows.versions["1"].tags["csmf.gate_reason"].startswith("first model")  # not overwritten
    else:  # v1 (promoted first) was replaced: a re-run of its date never promotes it again
        assert not d["gate"]["promoted"] and flows.champion != "1"
        assert flows.versions["1"].tags["csmf.gate"] == "promoted"  # its verdict kept
    assert flows.versions["1"].tags["csmf.reused_by"] == d["mlflow_run_id"]
    parent = flows.client.get_run(d["mlflow_run_id"])
    assert parent.data.tags["csmf.model_version"] == "1"
    assert parent.data.tags["csmf.registered"].startswith("reused v1")
    assert flows.versions["1"].tags["csmf.parent_run_id"] == flows.a["mlflow_run_id"]
