"""flows/registry.py `_no_package_scan`: MLflow still checks the model's pinned requirements against
the installed versions while a model is logged, without mapping every installed distribution first,
and the process sees MLflow's state unchanged afterwards."""

from __future__ import annotations

from importlib import metadata

import pytest
from mlflow.utils import requirements_utils as ru

from flows.registry import _no_package_scan, pinned_requirements


@pytest.fixture
def scan_refused(monkeypatch):
    """MLflow's module map unbuilt, building it an error, and its warnings collected."""
    monkeypatch.setattr(ru, "_MODULES_TO_PACKAGES", None)
    monkeypatch.setattr(ru, "_PACKAGES_TO_MODULES", None)

    def refuse():
        raise AssertionError("scanned every installed distribution")

    monkeypatch.setattr(ru.importlib_metadata, "packages_distributions", refuse)
    warnings: list[str] = []
    monkeypatch.setattr(ru._logger, "warning", lambda msg, *a, **k: warnings.append(str(msg)))
    return warnings


def test_requirements_are_still_checked_against_installed_versions_without_the_scan(scan_refused):
    numpy = metadata.version("numpy")
    reqs = [*pinned_requirements(), "numpy==0.0.1"]
    with _no_package_scan():
        ru.warn_dependency_requirement_mismatches(reqs)
    assert len(scan_refused) == 1, scan_refused
    assert f"numpy (current: {numpy}, required: numpy==0.0.1)" in scan_refused[0]
    assert "unexpected error" not in scan_refused[0]
    # only the deliberately wrong pin is reported: every pinned requirement matches this environment
    assert scan_refused[0].count("current:") == 1
    # MLflow's state is as it was: the next caller builds the map as MLflow would
    assert ru._MODULES_TO_PACKAGES is None and ru._PACKAGES_TO_MODULES is None


def test_without_it_mlflow_scans_first(scan_refused):
    """The reference: the same call outside the context reaches the (refused) scan."""
    ru.warn_dependency_requirement_mismatches([*pinned_requirements(), "numpy==0.0.1"])
    assert len(scan_refused) == 1 and "scanned every installed distribution" in scan_refused[0]


def test_a_map_mlflow_already_built_is_left_alone(monkeypatch):
    built = {"numpy": ["numpy"]}
    monkeypatch.setattr(ru, "_MODULES_TO_PACKAGES", built)
    with _no_package_scan():
        assert ru._MODULES_TO_PACKAGES is built
    assert ru._MODULES_TO_PACKAGES is built


def test_the_state_is_restored_when_logging_fails(monkeypatch):
    monkeypatch.setattr(ru, "_MODULES_TO_PACKAGES", None)
    with pytest.raises(RuntimeError), _no_package_scan():
        assert ru._MODULES_TO_PACKAGES == {}
        raise RuntimeError("log_model failed")
    assert ru._MODULES_TO_PACKAGES is None


def test_log_and_register_logs_the_model_without_the_scan(tmp_path, monkeypatch):
    """The registry's `log_model` call is the one wrapped (a fake log_model sees the empty map)."""
    import mlflow

    from flows import registry

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    try:
        client = mlflow.MlflowClient(uri)
        run_id = client.create_run(client.create_experiment("x")).info.run_id
        monkeypatch.setattr(ru, "_MODULES_TO_PACKAGES", None)
        seen = []

        class Logged(Exception):
            pass

        def fake_log_model(**kwargs):
            seen.append(ru._MODULES_TO_PACKAGES)
            raise Logged

        monkeypatch.setattr(registry, "pyfunc_spec", lambda bundle_dir: {})
        monkeypatch.setattr(mlflow.pyfunc, "log_model", fake_log_model)
        with pytest.raises(Logged):
            registry.log_and_register(run_id, tmp_path / "bundle")
        assert seen == [{}] and ru._MODULES_TO_PACKAGES is None
    finally:
        mlflow.set_tracking_uri(None)
