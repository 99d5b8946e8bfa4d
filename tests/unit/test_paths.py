"""Paths built from input stay where they belong (issue 13 item 4): dataset names, report directories,
model references and the registry's model cache, partition names (tests/unit/test_ids.py)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from csmf_core.fsutil import write_manifest
from data_contracts import SpecError, parse_spec, validate_dataset
from flows import registry
from flows.cli import main as csmf
from flows.inputs import contained, safe_name

SPEC = {
    "name": "tiny",
    "provenance": "hand-built in tests/unit/test_paths.py",
    "objectives": [{"name": "exposure", "column": "exposed"}, {"name": "click", "column": "clicked"}],
}
BAD_NAMES = [
    "../../../x",
    "..",
    ".",
    "/etc",
    "/tmp/x",
    "a/b",
    "a\\b",
    "",
    " x",
    "x\n",
    "café",
    "-x",
    "a" * 129,
]
GOOD_NAMES = ["tiny", "synth-small", "kuairand-pure-slice", "my_data.v2", "A", "0", "a" * 128]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("name", BAD_NAMES)
def test_dataset_yaml_name_must_be_one_safe_directory_name(name):
    with pytest.raises(SpecError) as exc:
        parse_spec({**SPEC, "name": name})
    assert "name: must be" in str(exc.value) and repr(name) in str(exc.value)


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_ordinary_dataset_names_pass(name):
    assert parse_spec({**SPEC, "name": name}).name == name
    assert safe_name(name, "name") == name


def test_validation_reports_a_traversing_name(tmp_path):
    (tmp_path / "dataset.yaml").write_text(yaml.safe_dump({**SPEC, "name": "../../../x"}))
    report = validate_dataset(tmp_path)
    spec = [v for v in report.errors if v.rule == "spec"]
    assert len(spec) == 1 and "name: must be" in spec[0].message and "'../../../x'" in spec[0].message


def test_contained_refuses_every_way_out(tmp_path):
    base = tmp_path / "base"
    (base / "a").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (base / "link").symlink_to(outside)
    assert contained(base, "a", "b") == (base / "a" / "b").resolve()
    for parts in (
        ("..",),
        ("a", "..", ".."),
        ("/etc",),
        (str(outside),),
        ("link",),
        ("link", "x"),
        ("a/../../x",),
    ):
        with pytest.raises(ValueError, match="leads outside"):
            contained(base, *parts)


# ---- csmf compare: the report directory ----------------------------------------------------------------
def _dataset(root: Path, name: str) -> Path:
    root.mkdir(parents=True)
    (root / "dataset.yaml").write_text(yaml.safe_dump({**SPEC, "name": name}))
    return root


@pytest.mark.parametrize("name", ["../../../x", "/tmp/csmf-escape", "a/b", ".."])
def test_report_dir_from_a_bad_dataset_name_is_refused(tmp_path, name):
    from flows.compare import report_out_dir

    ds = _dataset(tmp_path / "ds", name)
    cwd = tmp_path / "work" / "deep" / "er"
    cwd.mkdir(parents=True)
    before = _tree(tmp_path)
    with pytest.raises(ValueError, match="cannot name a directory"):
        report_out_dir(ds, None, cwd=cwd)
    assert _tree(tmp_path) == before


def test_report_dir_from_a_good_name_is_under_reports(tmp_path):
    from flows.compare import report_out_dir

    ds = _dataset(tmp_path / "ds", "synth-small")
    assert report_out_dir(ds, None, cwd=tmp_path) == (tmp_path / "reports" / "synth-small").resolve()


def test_report_dir_that_is_a_symlink_out_of_reports_is_refused(tmp_path):
    from flows.compare import report_out_dir

    ds = _dataset(tmp_path / "ds", "synth-small")
    (tmp_path / "reports").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "reports" / "synth-small").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="leads outside"):
        report_out_dir(ds, None, cwd=tmp_path)


def test_explicit_report_dir_must_be_new_empty_or_a_report(tmp_path):
    from flows.compare import report_out_dir

    ds = _dataset(tmp_path / "ds", "synth-small")
    (tmp_path / "empty").mkdir()
    (tmp_path / "old-report").mkdir()
    (tmp_path / "old-report" / "comparison.md").write_text("# old\n")
    (tmp_path / "a-file").write_text("x")
    for ok in ("new/dir", "empty", "old-report"):
        assert report_out_dir(ds, str(tmp_path / ok)) == tmp_path / ok
    with pytest.raises(FileExistsError, match="is a file"):
        report_out_dir(ds, str(tmp_path / "a-file"))
    # `--report-dir ..`, an absolute system directory: non-empty and not a report
    for bad in (str(tmp_path / "ds" / ".."), "/", str(Path.home()) if any(Path.home().iterdir()) else "/usr"):
        with pytest.raises(FileExistsError, match="non-empty directory without a csmf report"):
            report_out_dir(ds, bad)


def test_csmf_compare_refuses_a_traversing_name_before_any_work(tmp_path, capsys, monkeypatch):
    ds = _dataset(tmp_path / "ds", "../../../x")
    work = tmp_path / "a" / "b" / "c"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    before = _tree(tmp_path)
    code = csmf(
        ["compare", "--data", str(ds), "--methods", "csmf", "--seeds", "1", "--home", str(tmp_path / "h")]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "'../../../x' cannot name a directory" in err
    assert {p for p in _tree(tmp_path) - before if not p.startswith("h")} == set()  # nothing but the home


# ---- model references and the registry's cache ------------------------------------------------------------
@pytest.mark.parametrize("ref", ["models:/..@champion", "models:/../1", "models:/.@x", "models:/a\\..@x"])
def test_model_reference_names_are_checked(ref):
    with pytest.raises(ValueError, match="cannot name a directory"):
        registry._version_for(ref, client=None)  # refused before any registry call


def _fake_registry(monkeypatch, name="csmf", version="1"):
    monkeypatch.setattr(registry.mlflow, "MlflowClient", lambda *a, **k: None)
    monkeypatch.setattr(
        registry, "_version_for", lambda ref, client: SimpleNamespace(name=name, version=version)
    )


def test_resolve_bundle_refuses_a_manifest_pointing_outside_the_cache(tmp_path, monkeypatch):
    _fake_registry(monkeypatch)
    dest = tmp_path / "home" / "cache" / "models" / "csmf" / "1"
    dest.mkdir(parents=True)
    victim = tmp_path / "victim"
    (victim / "x").mkdir(parents=True)
    (victim / "x" / "bundle.json").write_text("{}")
    rel = os.path.relpath(victim / "x", dest)
    mlmodel = {"flavors": {"python_function": {"artifacts": {"bundle": {"path": rel}}}}}
    (dest / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    write_manifest(dest)  # a whole cache entry, as a download leaves it
    with pytest.raises(ValueError, match="the bundle path in .* leads outside"):
        registry.resolve_bundle("models:/csmf@champion", home=tmp_path / "home")
    mlmodel["flavors"]["python_function"]["artifacts"]["bundle"]["path"] = str(victim / "x")  # absolute
    (dest / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    write_manifest(dest)
    with pytest.raises(ValueError, match="leads outside"):
        registry.resolve_bundle("models:/csmf@champion", home=tmp_path / "home")


@pytest.mark.parametrize(
    "name, version", [("..", "1"), ("csmf", "../../x"), ("a/b", "1"), ("csmf", "1/../..")]
)
def test_resolve_bundle_refuses_registry_names_that_are_not_directory_names(
    tmp_path, monkeypatch, name, version
):
    _fake_registry(monkeypatch, name, version)
    with pytest.raises(ValueError, match="cannot name a directory|expected a number"):
        registry.resolve_bundle(None, home=tmp_path / "home")
    assert not (tmp_path / "home" / "cache" / "models").exists() or not any(
        (tmp_path / "home" / "cache" / "models").rglob("*")
    )


def test_a_reference_that_misses_names_what_the_registry_holds(tmp_path):
    """models:/csmf/7 and @nosuch were MLflow's RESOURCE_DOES_NOT_EXIST, with no word of what exists;
    a missing bundle path was told the reference forms without 'bundle directory'."""
    client = registry.mlflow.MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    client.create_registered_model("csmf")
    for _ in range(2):
        client.create_model_version("csmf", source=str(tmp_path))
    client.set_registered_model_alias("csmf", "champion", "1")
    for ref, what in (("models:/csmf/7", "version"), ("models:/csmf@nosuch", "alias")):
        with pytest.raises(LookupError) as exc:
            registry._version_for(ref, client)
        assert (
            str(exc.value)
            == f"model reference {ref!r}: no such {what}; 'csmf' has versions 1, 2 and aliases champion (v1)"
        )
    with pytest.raises(ValueError, match=r"use a serving-bundle directory, .* \(no such directory\)"):
        registry._version_for(str(tmp_path / "nope"), client)
    with pytest.raises(ValueError, match="a path, but not a serving-bundle directory"):
        registry._version_for(str(tmp_path), client)


def test_a_reused_version_loses_the_failure_tag_doctor_left(tmp_path):
    """A version registered by a run killed before the gate is tagged csmf.failure_reason by csmf
    doctor; a re-run that reuses it (identical inputs) and goes on to promote it left the tag on the
    serving champion."""
    from flows.promotion import clear_failure, note_reuse
    from flows.tracking import FAILURE_TAG

    client = registry.mlflow.MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    client.create_registered_model("csmf")
    client.create_model_version("csmf", source=str(tmp_path), tags={"csmf.parent_run_id": "a" * 32})
    client.set_model_version_tag(
        "csmf", "1", FAILURE_TAG, "registered by pipeline run aaa, which ended FAILED"
    )
    note_reuse(client, "1", "b" * 32)  # at register: doctor would tag it again until the verdict
    assert FAILURE_TAG in client.get_model_version("csmf", "1").tags
    clear_failure(client, "1")  # with the gate's verdict tags
    tags = client.get_model_version("csmf", "1").tags
    assert FAILURE_TAG not in tags and tags["csmf.reused_by"] == "b" * 32
    assert tags["csmf.parent_run_id"] == "a" * 32  # who registered it stays recorded
    note_reuse(client, "1", "c" * 32)
    clear_failure(client, "1")  # no tag to remove: fine
    assert client.get_model_version("csmf", "1").tags["csmf.reused_by"] == "c" * 32
