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


def wait_for(condition, limit: float = 5.0) -> bool:
    t0 = time.monotonic()
    while not condition():
        if time.monotonic() - t0 > limit:
            return False
        time.sleep(0.005)
    return True


def run_once(send) -> tuple[Engine, float, list[threading.Thread]]:
    """Enter the heartbeat context, wait for the first heartbeat (the thread then sleeps in 1-s
    steps), leave it; returns the engine, the seconds leaving took and the context's thread."""
    engine, before = Engine(), set(heartbeat_threads())
    with send(engine):
        assert wait_for(lambda: engine.beats), "no heartbeat within 5 s"
        mine = [t for t in heartbeat_threads() if t not in before]
        time.sleep(0.05)  # well inside the thread's first 1-s sleep
        t_exit = time.monotonic()
    return engine, time.monotonic() - t_exit, mine


def test_the_end_of_a_run_does_not_wait_for_the_heartbeat_thread():
    assert prefect_compat.install()
    patched = flow_engine._send_heartbeats
    original = patched.__wrapped__

    engine, waited, _ = run_once(original)  # the reference: prefect's own joins the sleeping thread
    assert len(engine.beats) == 1 and waited > 0.3  # ~0.95 s: the rest of its 1-s sleep

    engine, waited, threads = run_once(patched)
    assert len(engine.beats) == 1  # the heartbeat at the run's start was sent
    assert len(threads) == 1 and threads[0].is_alive()  # not joined: still in its 1-s sleep
    assert waited < 0.2
    assert wait_for(lambda: not threads[0].is_alive(), 3.0)  # stops by itself at its next step
    assert len(engine.beats) == 1  # nothing sent after the run ended


def test_an_error_in_the_run_still_stops_the_heartbeats():
    prefect_compat.install()
    engine, before = Engine(), set(heartbeat_threads())
    with pytest.raises(RuntimeError, match="the flow failed"), flow_engine._send_heartbeats(engine):
        assert wait_for(lambda: engine.beats), "no heartbeat within 5 s"
        mine = [t for t in heartbeat_threads() if t not in before]
        raise RuntimeError("the flow failed")
    assert len(mine) == 1 and wait_for(lambda: not mine[0].is_alive(), 3.0)
    assert len(engine.beats) == 1


def test_every_module_that_defines_a_flow_installs_it():
    from pathlib import Path

    import flows

    defining = [p for p in Path(flows.__file__).parent.glob("*.py") if "\n@flow(" in p.read_text()]
    assert len(defining) >= 4, defining  # the daily run, tune, compare, the sharded ingest
    for path in defining:
        assert "\nprefect_compat.install()" in path.read_text(), f"{path.name} defines a flow without it"


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
