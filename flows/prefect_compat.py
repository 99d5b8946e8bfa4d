"""Where csmf changes the behaviour of the pinned Prefect (3.8.8), each with its reason and a test.

One so far: **a flow run's end does not wait for its heartbeat thread.** Against a Prefect API a
flow run sends heartbeats (`csmf run`'s temporary API turns them off, flows/local_api.py) (every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds, 180 by default; `make
serve`'s zombie automation counts on them, flows/automations.py) from a daemon thread that sleeps in
1-s steps and checks a stop event between them (`prefect.flow_engine._send_heartbeats`). When the
flow body returns, prefect 3.8.8's sync engine sets the event and joins the thread, i.e. waits for
the rest of the current 1-s sleep: 0-1 s at the end of every deployment run (0.56 s in a profile
of one `csmf run` against a server, 2026-12-06; docs/performance.md), while its async engine does
not join (`join_on_exit=False`). `install` makes the sync engine do what the async one does: the
event is set as before and heartbeats stop as before: the thread returns at its next 1-s step (a
heartbeat already being sent completes, the engine no longer waits for it) and, a daemon thread,
never holds up the process's exit.

Installed by each module that defines a flow (the daily run, tune, compare, the sharded ingest), so
a deployment's flow process gets it when it imports the flow. On any other Prefect version nothing
is changed (the upstream code may differ)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

PREFECT_VERSION = "3.8.8"  # the version whose engine this was written against
_MARK = "_csmf_no_join"


def install() -> bool:
    """Wrap `prefect.flow_engine._send_heartbeats` so that it never joins its thread on exit (module
    docstring); idempotent. True when the wrapper is in place, False on another Prefect version or
    when the function is gone."""
    import prefect
    from prefect import flow_engine

    original = getattr(flow_engine, "_send_heartbeats", None)
    if prefect.__version__ != PREFECT_VERSION or original is None:
        return False
    if getattr(original, _MARK, False):
        return True

    @contextmanager
    def send_heartbeats(engine: Any, join_on_exit: bool = True) -> Iterator[None]:
        with original(engine, join_on_exit=False):
            yield

    setattr(send_heartbeats, _MARK, True)
    send_heartbeats.__wrapped__ = original  # type: ignore[attr-defined]
    send_heartbeats.__doc__ = f"{original.__doc__}\n\n(csmf: never joins the thread; flows/prefect_compat.py)"
    flow_engine._send_heartbeats = send_heartbeats
    return True
