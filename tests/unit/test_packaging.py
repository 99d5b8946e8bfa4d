"""pyproject.toml reads without a setuptools warning (issue #17: `project.license` as a TOML table was
deprecated, and every install printed a boxed warning about it)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_configures_without_warnings():
    setuptools = pytest.importorskip("setuptools")
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert [str(w.message) for w in caught] == [], setuptools.__version__
    assert dist.metadata.license_expression == "Apache-2.0"
