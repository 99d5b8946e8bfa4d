"""Prefect automations of the csmf stack (`make serve`, flows/deploy.py): zombie flow runs.

A flow run whose machine or container dies (power loss, OOM kill of the worker, an evicted pod) never
reports a final state: without help the server shows it `Running` forever. The daily deployment's
concurrency slot comes back when its lease expires (Prefect's repossessor, ~5 min), but the run itself
stays a zombie in the UI, in `prefect flow-run ls` and in anything that watches states. Prefect's
recipe for a self-hosted server (https://docs.prefect.io/v3/advanced/detect-zombie-flows):

- every flow run emits a `prefect.flow-run.heartbeat` event every PREFECT_FLOWS_HEARTBEAT_FREQUENCY
  seconds (180 by default since prefect 3.6.22; the stack's job environment sets it, `deploy.job_env`);
- a proactive automation expects, after each heartbeat of a flow run, another event of that same run
  (the next heartbeat or any state change, `prefect.flow-run.*`) within `within`, and otherwise sets
  the run Crashed. `within` is three heartbeats (540 s at 180 s), Prefect's rule of thumb, so one or
  two late heartbeats on a loaded machine never crash a live run.

`make serve` creates it once per server (`ensure_zombie_automation`: by name; a second `make serve`
updates it, e.g. to a new heartbeat frequency). The temporary API of `csmf run` needs none: it dies
with the process whose runs it shows, which send no heartbeats (flows/local_api.no_heartbeats).

    python -m flows.automations [--heartbeat SECONDS]     # against $PREFECT_API_URL
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from datetime import timedelta

ZOMBIE_AUTOMATION = "csmf: crash zombie flow runs"
HEARTBEAT_DEFAULT_S = 180  # prefect's default PREFECT_FLOWS_HEARTBEAT_FREQUENCY (>= 3.6.22)
HEARTBEAT_MIN_S = 30  # prefect refuses less
MISSED_HEARTBEATS = 3  # `within` = this many heartbeats
# the names prefect reads the frequency from, the current one first (the second is the legacy alias)
HEARTBEAT_VARS = ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY")


def heartbeat_seconds(environ: Mapping[str, str] | None = None) -> int:
    """The flow runs' heartbeat frequency: the first of HEARTBEAT_VARS set in `environ` (default
    os.environ), else HEARTBEAT_DEFAULT_S. An integer >= HEARTBEAT_MIN_S, else a ValueError that names
    the variable and the rule."""
    env = os.environ if environ is None else environ
    for name in HEARTBEAT_VARS:
        raw = env.get(name)
        if raw is None or not raw.strip():
            continue
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError(
                f"{name}={raw!r}: the flow-run heartbeat frequency must be whole seconds"
            ) from None
        if value < HEARTBEAT_MIN_S:
            raise ValueError(
                f"{name}={value}: the flow-run heartbeat frequency must be >= {HEARTBEAT_MIN_S} s"
            )
        return value
    return HEARTBEAT_DEFAULT_S


def zombie_automation(heartbeat: int = HEARTBEAT_DEFAULT_S):
    """The automation (prefect.automations.Automation, not created) that sets a flow run Crashed when
    `MISSED_HEARTBEATS` x `heartbeat` seconds pass after one of its heartbeats with no other event of it."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    if int(heartbeat) < HEARTBEAT_MIN_S:
        raise ValueError(f"heartbeat must be >= {HEARTBEAT_MIN_S} s, got {heartbeat}")
    within = MISSED_HEARTBEATS * int(heartbeat)
    return Automation(
        name=ZOMBIE_AUTOMATION,
        description=(
            f"Marks a flow run Crashed when {within} s ({MISSED_HEARTBEATS} heartbeats of {int(heartbeat)} s) "
            "pass after one of its heartbeats with no other event of it: its process died without "
            "reporting a state. Created by csmf's `make serve` (flows/automations.py)."
        ),
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.*"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"No heartbeat or state change for {within} s: the flow run's process is gone.",
            )
        ],
    )


def ensure_zombie_automation(heartbeat: int = HEARTBEAT_DEFAULT_S) -> tuple[str, str]:
    """Create the zombie automation on the configured API, or update the one with its name (one per
    server, whatever the number of `make serve` runs; of several with that name, prefect's
    `Automation.read` gives the last updated), keeping whether it is enabled. Returns
    ("created" | "updated", its id)."""
    from prefect.automations import Automation

    wanted = zombie_automation(heartbeat)
    try:
        current = Automation.read(name=ZOMBIE_AUTOMATION)
    except ValueError:  # prefect: "Automation with name ... not found"
        return "created", str(wanted.create().id)
    wanted.id, wanted.enabled = current.id, current.enabled  # one disabled in the UI stays disabled
    wanted.update()
    return "updated", str(current.id)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Create or update csmf's zombie flow-run automation.")
    p.add_argument(
        "--heartbeat",
        type=int,
        default=None,
        help=f"the flow runs' heartbeat frequency in seconds (default: ${HEARTBEAT_VARS[0]} or {HEARTBEAT_DEFAULT_S})",
    )
    a = p.parse_args(argv)
    hb = heartbeat_seconds() if a.heartbeat is None else a.heartbeat
    what, ident = ensure_zombie_automation(hb)
    print(
        f"{what} automation {ZOMBIE_AUTOMATION!r} ({ident}): Crashed after {MISSED_HEARTBEATS * hb} s without a heartbeat"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
