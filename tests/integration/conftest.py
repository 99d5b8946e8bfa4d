"""Fixtures shared by the integration modules."""

from __future__ import annotations

import os

import pytest
from prefect.testing.utilities import prefect_test_harness


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the session (modules that need their own start their own)."""
    # a busy shared machine needs more than 60 s; CSMF_TEST_SERVER_STARTUP_S raises it further
    with prefect_test_harness(
        server_startup_timeout=int(os.environ.get("CSMF_TEST_SERVER_STARTUP_S", "180"))
    ):
        yield
