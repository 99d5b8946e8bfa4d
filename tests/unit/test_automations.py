"""flows.automations: the zombie flow-run automation `make serve` creates, and the heartbeat it counts on.

The automation against a real `prefect server` (a killed flow run set Crashed): tests/integration/
test_deployment.py::test_killed_flow_run_is_marked_crashed.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from flows import automations, deploy


def test_zombie_automation_follows_prefects_recipe():
    """Prefect's recipe (docs.prefect.io/v3/advanced/detect-zombie-flows), with `within` three heartbeats."""
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    a = automations.zombie_automation(180)
    assert a.name == "csmf: crash zombie flow runs" and a.enabled
    t = a.trigger
    assert isinstance(t, EventTrigger)
    assert t.after == {"prefect.flow-run.heartbeat"}
    assert t.expect == {"prefect.flow-run.*"}  # the next heartbeat or any state change disarms it
    assert t.for_each == {"prefect.resource.id"}  # one flow run at a time
    assert t.match.model_dump() == {"prefect.resource.id": ["prefect.flow-run.*"]}
    assert t.posture == Posture.Proactive and t.threshold == 1
    assert t.within == timedelta(seconds=540)
    (action,) = a.actions
    assert isinstance(action, ChangeFlowRunState) and action.state == StateType.CRASHED
    assert "540 s" in action.message
    assert automations.zombie_automation(30).trigger.within == timedelta(seconds=90)
    with pytest.raises(ValueError, match=">= 30 s"):
        automations.zombie_automation(29)


@pytest.mark.parametrize(
    "environ, want",
    [
        ({}, 180),
        ({"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "60"}, 60),
        ({"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": " 45 "}, 45),
        ({"PREFECT_RUNNER_HEARTBEAT_FREQUENCY": "90"}, 90),  # prefect's legacy name
        ({"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "60", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY": "90"}, 60),
        ({"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": ""}, 180),
    ],
)
def test_heartbeat_seconds(environ, want):
    assert automations.heartbeat_seconds(environ) == want


@pytest.mark.parametrize(
    "value, rule", [("10", ">= 30 s"), ("abc", "whole seconds"), ("1.5", "whole seconds"), ("0", ">= 30 s")]
)
def test_heartbeat_seconds_refuses(value, rule):
    with pytest.raises(ValueError, match=f"PREFECT_FLOWS_HEARTBEAT_FREQUENCY=.*{rule}"):
        automations.heartbeat_seconds({"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": value})


def test_flow_runs_get_the_heartbeat_the_automation_counts_on(monkeypatch, tmp_path):
    """The work pool's and the deployments' job environment carry the frequency `make serve` gives the
    automation: the user's $PREFECT_FLOWS_HEARTBEAT_FREQUENCY, else 180."""
    monkeypatch.delenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", raising=False)
    monkeypatch.delenv("PREFECT_RUNNER_HEARTBEAT_FREQUENCY", raising=False)
    assert deploy.job_env(tmp_path)["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "180"
    monkeypatch.setenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "60")
    assert deploy.job_env(tmp_path)["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "60"
    template = deploy.pool_template(tmp_path)
    assert template["variables"]["properties"]["env"]["default"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "60"
    monkeypatch.setenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "5")
    with pytest.raises(ValueError, match=">= 30 s"):  # before anything starts
        deploy.up(tmp_path / "home", port=1)
    assert not (tmp_path / "home").exists()
