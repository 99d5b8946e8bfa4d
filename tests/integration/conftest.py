"""Fixtures shared by the integration modules."""

from __future__ import annotations

import contextlib
import os

import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.local_api import no_heartbeats

# A server start on a fresh database runs every Prefect migration: a busy shared machine has needed
# more than 60 s (and a 120-s limit once failed a loaded run). The limit only matters on failure.
SERVER_STARTUP_S = int(os.environ.get("CSMF_TEST_SERVER_STARTUP_S", "300"))
# A tiny daily run takes ~1 min on an idle 2-core machine and 5 min and more when it is shared.
RUN_TIMEOUT_S = int(os.environ.get("CSMF_TEST_RUN_TIMEOUT_S", "900"))


@contextlib.contextmanager
def temporary_api():
    """Prefect's test harness (a temporary API on a fresh database) with the suite's startup limit,
    and no flow-run heartbeats, as `csmf run` against its temporary API (flows.local_api.no_heartbeats)."""
    with prefect_test_harness(server_startup_timeout=SERVER_STARTUP_S), no_heartbeats():
        yield


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the session (modules that need their own start their own)."""
    with temporary_api():
        yield
