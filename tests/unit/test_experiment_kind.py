"""Experiments open in the MLflow UI's "Model training" view: ensure_experiment tags new experiments
with mlflow.experimentKind, and tags an existing experiment that lacks it (a store made before)."""

from __future__ import annotations

import mlflow

from flows.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, ensure_experiment


def test_new_and_existing_experiments_get_the_training_kind(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    new = ensure_experiment("csmf", tmp_path / "mlartifacts", uri)
    assert client.get_experiment(new).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    old = client.create_experiment("made-before", artifact_location=(tmp_path / "a").as_uri())
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    assert ensure_experiment("made-before", tmp_path / "a", uri) == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    # a kind the user chose is left alone
    client.set_experiment_tag(old, EXPERIMENT_KIND_TAG, "finetuning")
    ensure_experiment("made-before", tmp_path / "a", uri)
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == "finetuning"
