"""Consumers load the champion by default (issue #17 item 1), and say which version they used.

Two versions of "csmf" in a temporary SQLite store, as the daily flow leaves them after a rejected
challenger: v1 promoted to champion, v2 registered later (alias "challenger", gate tag "kept"), with a
different model (v1's weights plus noise), so that the latest version and the champion recommend
different items. `csmf recommend`, `csmf embed` and `csmf evaluate` with no --model must use v1 and
print "csmf version 1"; `--model latest` still reaches v2.

    .venv/bin/pytest -m integration tests/integration/test_model_default.py
"""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from csmf_core import synth
from csmf_core.checkpoint import load_checkpoint, save_checkpoint
from csmf_core.serving import Recommender, write_bundle
from flows.cli import main as csmf
from flows.registry import REGISTERED_MODEL, log_and_register, promote, resolve_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_trainer):
    root = tmp_path_factory.mktemp("default-model")
    home = root / "home"
    home.mkdir()
    s = synth.generate(root / "ds", "tiny", seed=0)
    cfg, _, model, owners = tiny_trainer(root / "ds", root, s.dates)
    (root / "ckpt").rename(root / "ckpt1")
    other, owners2, _ = load_checkpoint(root / "ckpt1")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # another model of the same shape: the challenger the gate rejected
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * p.abs().mean().clamp_min(1e-3))
    save_checkpoint(root / "ckpt2", other, owners2)
    bundles = {
        v: write_bundle(
            root / f"bundle{v}",
            checkpoint_dir=root / f"ckpt{v}",
            model_ready_dir=root / "mr",
            dataset_dir=root / "ds",
            config=cfg,
        )
        for v in ("1", "2")
    }
    uri = f"sqlite:///{home / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("CSMF_HOME", str(home))
        mlflow.set_tracking_uri(uri)
        client = mlflow.MlflowClient(uri)
        exp = client.create_experiment("csmf", artifact_location=str(home / "mlartifacts"))
        v1 = log_and_register(client.create_run(exp).info.run_id, bundles["1"])
        promote(v1.version, client)
        client.set_model_version_tag(REGISTERED_MODEL, v1.version, "csmf.gate", "promoted")
        v2 = log_and_register(client.create_run(exp).info.run_id, bundles["2"])
        client.set_model_version_tag(REGISTERED_MODEL, v2.version, "csmf.gate", "kept")  # rejected
        try:
            yield {"home": home, "root": root, "bundles": bundles, "versions": (v1, v2), "client": client}
        finally:
            mlflow.set_tracking_uri(None)


def _recommended(text: str) -> list[int]:
    rows = [ln.split() for ln in text.splitlines()]
    return [int(r[1]) for r in rows if len(r) == 3 and r[0].isdigit()]


def test_recommend_without_model_uses_the_champion_and_says_so(store, capsys):
    v1, v2 = store["versions"]
    assert (str(v1.version), str(v2.version)) == ("1", "2")
    champ, latest = (Recommender.load(store["bundles"][v]) for v in ("1", "2"))
    users = champ.user_vocab[:20]
    # the two models must disagree somewhere, or this test could not tell them apart
    differ = [
        int(u)
        for u in users
        if champ.recommend([int(u)], k=10)[0]["items"] != latest.recommend([int(u)], k=10)[0]["items"]
    ]
    assert differ, "the perturbed challenger recommends the same items as the champion"
    uid = differ[0]
    capsys.readouterr()
    assert csmf(["recommend", "--user-id", str(uid), "--k", "10", "--home", str(store["home"])]) == 0
    out = capsys.readouterr().out
    assert "Model: csmf version 1 (models:/csmf@champion; aliases champion; gate: promoted)" in out
    assert _recommended(out) == champ.recommend([uid], k=10)[0]["items"]

    assert csmf(["recommend", "--user-id", str(uid), "--k", "10", "--model", "latest"]) == 0
    out = capsys.readouterr().out
    assert "Model: csmf version 2 (latest; aliases challenger; gate: kept)" in out
    assert _recommended(out) == latest.recommend([uid], k=10)[0]["items"]


def test_embed_and_evaluate_default_to_the_champion(store, capsys, tmp_path):
    champ = Recommender.load(store["bundles"]["1"])
    out = tmp_path / "u.parquet"
    capsys.readouterr()
    assert csmf(["embed", "--side", "user", "--out", str(out)]) == 0
    assert "Model: csmf version 1 (models:/csmf@champion" in capsys.readouterr().out
    got = np.stack(pq.read_table(out)["vector"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(got, champ.user_vectors(champ.user_vocab, mode=2)[0], rtol=1e-6, atol=1e-6)
    assert csmf(["evaluate", "--data", str(store["root"] / "ds"), "--k", "10"]) == 0
    assert "Model: csmf version 1 (models:/csmf@champion" in capsys.readouterr().out


def test_no_champion_is_a_clear_error(store, capsys):
    client = store["client"]
    client.delete_registered_model_alias(REGISTERED_MODEL, "champion")
    try:
        with pytest.raises(LookupError, match=r"no champion .*\(versions 1, 2 exist.*@challenger"):
            resolve_model(None)
        assert csmf(["recommend", "--user-id", "1"]) == 2
        assert "no champion" in capsys.readouterr().err
    finally:
        promote("1", client)
    assert Path(resolve_model(None).bundle, "bundle.json").is_file()


def test_resolution_cache_skips_mlflow_until_the_registry_changes(store, capsys):
    """Item 7: a warm `csmf recommend` resolves the champion without importing mlflow (a fresh process
    says so), and any registry change (here: the champion moved to v2) invalidates that shortcut."""
    import subprocess
    import sys

    home, client = store["home"], store["client"]
    champ, latest = (Recommender.load(store["bundles"][v]) for v in ("1", "2"))
    uid = int(champ.user_vocab[0])
    assert csmf(["recommend", "--user-id", str(uid), "--k", "3"]) == 0  # warms the cache
    assert "Model: csmf version 1" in capsys.readouterr().out
    assert (home / "cache" / "models" / "resolved.json").is_file()
    code = (
        "import sys; from flows.cli import main; "
        f"rc = main(['recommend', '--user-id', '{uid}', '--k', '3']); "
        "print('MLFLOW_IMPORTED', 'mlflow' in sys.modules); sys.exit(rc)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Model: csmf version 1 (models:/csmf@champion" in out.stdout
    assert "MLFLOW_IMPORTED False" in out.stdout
    assert _recommended(out.stdout) == champ.recommend([uid], k=3)[0]["items"]

    promote("2", client)  # the registry changes: the cached answer must not be used
    try:
        assert csmf(["recommend", "--user-id", str(uid), "--k", "3"]) == 0
        text = capsys.readouterr().out
        assert "Model: csmf version 2 (models:/csmf@champion" in text
        assert _recommended(text) == latest.recommend([uid], k=3)[0]["items"]
    finally:
        promote("1", client)


def test_line_head_is_the_newest_verified_version_before_the_run(store):
    """train.start_from=line continues flows.registry.line_head: read back from a real registry."""
    from flows.registry import line_head

    client = store["client"]
    v1, v2 = (str(v.version) for v in store["versions"])
    tags = {v1: {"csmf.date": "2026-01-05", "csmf.gate_verified": "true"}}
    tags[v2] = {"csmf.date": "2026-01-06", "csmf.gate_verified": "true"}  # v2: the gate kept it
    for v, t in tags.items():
        for k, x in t.items():
            client.set_model_version_tag(REGISTERED_MODEL, v, k, x)
    try:
        assert str(line_head("2026-01-07", client).version) == v2  # the newer one, promoted or not
        assert str(line_head("2026-01-06", client).version) == v1  # v2 was trained for the run's own date
        assert line_head("2026-01-05", client) is None
        client.set_model_version_tag(REGISTERED_MODEL, v2, "csmf.gate_verified", "false")
        assert str(line_head("2026-01-07", client).version) == v1  # failed verification: never continued
        client.delete_model_version_tag(REGISTERED_MODEL, v2, "csmf.gate_verified")
        assert str(line_head("2026-01-07", client).version) == v1  # the gate never saw it
        client.set_model_version_tag(REGISTERED_MODEL, v2, "csmf.date", "2026-01-05")
        client.set_model_version_tag(REGISTERED_MODEL, v2, "csmf.gate_verified", "true")
        assert str(line_head("2026-01-07", client).version) == v2  # same date: the later version
        client.set_model_version_tag(REGISTERED_MODEL, v2, "csmf.dataset", "other-world")
        tags[v2]["csmf.dataset"] = "other-world"
        assert str(line_head("2026-01-07", client, dataset="other-world").version) == v2
        assert line_head("2026-01-07", client, dataset="a-third") is None  # only the run's dataset's
    finally:
        for v, t in tags.items():
            for k in t:
                try:
                    client.delete_model_version_tag(REGISTERED_MODEL, v, k)
                except mlflow.exceptions.MlflowException:
                    pass


def test_a_damaged_model_cache_is_downloaded_again(store, tmp_path):
    """The local model cache was trusted as soon as its MLmodel existed: a deleted or truncated
    model.pt failed every run that loaded the version, though the registry's copy was intact."""
    from flows.registry import resolve_bundle

    home = tmp_path / "home"
    bundle = resolve_bundle("models:/csmf/1", home=home)
    weights = bundle / "checkpoint" / "model.pt"
    want = weights.read_bytes()
    weights.unlink()
    assert resolve_bundle("models:/csmf/1", home=home) == bundle and weights.read_bytes() == want
    weights.write_bytes(want[:100])  # truncated
    assert resolve_bundle("models:/csmf/1", home=home) == bundle and weights.read_bytes() == want
    before = weights.stat().st_mtime_ns
    assert resolve_bundle("models:/csmf/1", home=home) == bundle  # whole: used as it is
    assert weights.stat().st_mtime_ns == before


def test_logged_model_pins_the_installed_requirements(store):
    """log_and_register logs under `_no_package_scan`: the model's requirements.txt is still the
    pinned list (tests/unit/test_registry_requirements.py: the check itself, MLflow's state after)."""
    from flows.registry import pinned_requirements

    v1, _ = store["versions"]
    local = mlflow.artifacts.download_artifacts(f"models:/{REGISTERED_MODEL}/{v1.version}")
    lines = (Path(local) / "requirements.txt").read_text().split()
    assert lines == pinned_requirements()
