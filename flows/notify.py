"""Being told when a run fails: a Prefect on_failure / on_crashed hook on every csmf flow.

    export CSMF_FAILURE_WEBHOOK=https://hooks.slack.com/services/...   # any URL taking a JSON POST
    csmf run ...        # or the make serve deployments: the worker's environment must have it too

When a `csmf-daily`, `csmf-compare` or `csmf-tune` flow run ends Failed or Crashed, the hook POSTs
`{"text": "...", "flow": ..., "flow_run": ..., "flow_run_id": ..., "state": ..., "message": ...,
"parameters": {...}}` to $CSMF_FAILURE_WEBHOOK (the `text` field is what Slack and Mattermost
incoming webhooks show). Unset, it does nothing: the failure is already in the flow run's state, its
logs and the FAILED MLflow runs. A webhook that does not answer is logged as a warning and never
hides the run's own error. For rules kept in Prefect instead (email, Slack, PagerDuty blocks, on any
flow), a Prefect automation on the persistent server does the same: docs/operations.md, "Being told
about a failure".
"""

from __future__ import annotations

import json
import logging
import os
import urllib.request
from typing import Any
from urllib.parse import urlsplit

WEBHOOK_ENV = "CSMF_FAILURE_WEBHOOK"
TIMEOUT_S = 10.0

_log = logging.getLogger(__name__)


def failure_payload(
    flow_name: str, run_name: str, run_id: str, state: str, message: str, parameters: dict
) -> dict:
    """The JSON body of one failure notice (module docstring)."""
    shown = {k: v for k, v in parameters.items() if v is not None}
    text = f"csmf: flow run {run_name} ({flow_name}) {state.lower()}: {message or 'no message'}"
    if shown:
        text += " | " + ", ".join(f"{k}={v}" for k, v in shown.items())
    return {
        "text": text,
        "flow": flow_name,
        "flow_run": run_name,
        "flow_run_id": run_id,
        "state": state,
        "message": message,
        "parameters": shown,
    }


def post_json(url: str, body: dict, timeout: float = TIMEOUT_S) -> int:
    """POST `body` as JSON to `url`; returns the HTTP status (raises on a network error or >= 400)."""
    if urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"{WEBHOOK_ENV} must be an http:// or https:// URL, not {url!r}")
    data = json.dumps(body, default=str).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (scheme checked above)
        return resp.status


def notify_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect flow-state hook (on_failure, on_crashed): the notice to $CSMF_FAILURE_WEBHOOK, if set."""
    url = os.environ.get(WEBHOOK_ENV, "").strip()
    if not url:
        return
    body = failure_payload(
        getattr(flow, "name", "?"),
        getattr(flow_run, "name", "?"),
        str(getattr(flow_run, "id", "?")),
        getattr(state, "name", None) or "Failed",
        getattr(state, "message", None) or "",
        dict(getattr(flow_run, "parameters", None) or {}),
    )
    host = urlsplit(url).netloc or url
    log = _logger(flow, flow_run)
    try:
        status = post_json(url, body)
    except Exception as exc:  # the run's own failure is what matters: never replace it with this one
        log.warning("failure notice to %s not sent: %s", host, exc)
        return
    log.info("failure notice sent to %s (HTTP %s)", host, status)


def _logger(flow: Any, flow_run: Any):
    """The flow run's logger (its lines reach the Prefect UI and the console), else this module's."""
    try:
        from prefect.logging.loggers import flow_run_logger

        return flow_run_logger(flow_run, flow)
    except Exception:  # a stand-in flow run (tests) or no Prefect logging set up
        return _log
