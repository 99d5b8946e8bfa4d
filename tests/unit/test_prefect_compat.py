"""flows/prefect_compat.py: a flow run's end does not wait for its heartbeat thread, heartbeats are
sent and stop as before. Driven through prefect 3.8.8's own `_send_heartbeats` with a stand-in
engine that records each heartbeat instead of sending it."""

from __future__ import annotations

import logging
import threading
import time

import prefect
import pytest
from prefect import flow_engine

from flows import prefect_compat

pytestmark = pytest.mark.skipif(
    prefect.__version__ != prefect_compat.PREFECT_VERSION, reason="written against prefect 3.8.8's engine"
)


class Engine:
    """What `_send_heartbeats` reads of a flow run engine; heartbeats are recorded with their time."""

    heartbeat_seconds = 30
    flow_run = None
    logger = logging.getLogger("test-heartbeats")

    def __init__(self):
        self.beats: list[float] = []

    def _build_heartbeat_event_template(self):
        return {}, []

    def _emit_flow_run_heartbeat(self, resource, related):
        self.beats.append(time.monotonic())


def heartbeat_threads() -> list[threading.Thread]:
    """Live threads running prefect's `heartbeat_loop` (started as `context.run(heartbeat_loop)`)."""
    return [
        t
        for t in threading.enumerate()
        if any(getattr(a, "__name__", "") == "heartbeat_loop" for a in getattr(t, "_args", ()))
    ]


def run_once(send) -> tuple[Engine, float]:
    """Enter the heartbeat context, wait for the first heartbeat (the thread then sleeps in 1-s
    steps), leave it; returns the engine and the seconds leaving took."""
    engine = Engine()
    with send(engine):
        t0 = time.monotonic()
        while not engine.beats and time.monotonic() - t0 < 5:
            time.sleep(0.005)
        time.sleep(0.05)  # well inside the thread's first 1-s sleep
        t_exit = time.monotonic()
    return engine, time.monotonic() - t_exit


def test_the_end_of_a_run_does_not_wait_for_the_heartbeat_thread():
    assert prefect_compat.install()
    patched = flow_engine._send_heartbeats
    original = patched.__wrapped__

    engine, waited = run_once(original)  # the reference: prefect's own, joining the sleeping thread
    assert len(engine.beats) == 1 and waited > 0.5

    engine, waited = run_once(patched)
    assert len(engine.beats) == 1  # the heartbeat at the run's start was sent
    assert len(heartbeat_threads()) == 1  # not joined: still in its 1-s sleep
    assert waited < 0.2
    t0 = time.monotonic()  # the thread stops by itself at its next 1-s step
    while time.monotonic() - t0 < 3 and any(t.is_alive() for t in heartbeat_threads()):
        time.sleep(0.05)
    assert not any(t.is_alive() for t in heartbeat_threads())
    assert len(engine.beats) == 1  # nothing sent after the run ended


def test_an_error_in_the_run_still_stops_the_heartbeats():
    prefect_compat.install()
    engine = Engine()
    with pytest.raises(RuntimeError, match="the flow failed"), flow_engine._send_heartbeats(engine):
        while not engine.beats:
            time.sleep(0.005)
        raise RuntimeError("the flow failed")
    time.sleep(1.2)
    assert not any(t.is_alive() for t in heartbeat_threads()) and len(engine.beats) == 1


def test_installed_once_by_every_module_that_defines_a_flow():
    import flows.compare
    import flows.ingest_dask
    import flows.pipeline
    import flows.tune  # noqa: F401

    patched = flow_engine._send_heartbeats
    assert getattr(patched, prefect_compat._MARK) and prefect_compat.install()
    assert flow_engine._send_heartbeats is patched  # a second install wraps nothing again
    assert not getattr(patched.__wrapped__, prefect_compat._MARK, False)


def test_another_prefect_version_is_left_alone(monkeypatch):
    monkeypatch.setattr(prefect, "__version__", "3.9.0")
    before = flow_engine._send_heartbeats
    assert prefect_compat.install() is False
    assert flow_engine._send_heartbeats is before
