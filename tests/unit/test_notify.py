"""The failure hook (flows/notify.py): every csmf flow carries it for Failed and Crashed; with
$CSMF_FAILURE_WEBHOOK set it POSTs one JSON notice to a real (loopback) HTTP server; unset it sends
nothing; a webhook that is down is a logged warning, never an exception."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import SimpleNamespace

import pytest

from flows.notify import WEBHOOK_ENV, failure_payload, notify_failure


@pytest.fixture
def webhook():
    """A loopback HTTP server recording the JSON bodies POSTed to it."""
    got: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            n = int(self.headers["Content-Length"])
            got.append(
                {"path": self.path, "type": self.headers["Content-Type"], **json.loads(self.rfile.read(n))}
            )
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hook", got
    server.shutdown()
    server.server_close()


FLOW = SimpleNamespace(name="csmf-daily")
RUN = SimpleNamespace(
    name="csmf-daily-2026-01-08", id="f1e2", parameters={"date": "2026-01-08", "data": "/d", "config": None}
)
STATE = SimpleNamespace(
    name="Failed", message="Flow run encountered an exception: TrainingDiverged: loss nan"
)


def test_a_failed_run_posts_one_notice(webhook, monkeypatch):
    url, got = webhook
    monkeypatch.setenv(WEBHOOK_ENV, url)
    notify_failure(FLOW, RUN, STATE)
    assert len(got) == 1
    body = got[0]
    assert body["path"] == "/hook" and body["type"] == "application/json"
    assert body["flow"] == "csmf-daily" and body["flow_run"] == "csmf-daily-2026-01-08"
    assert body["flow_run_id"] == "f1e2" and body["state"] == "Failed"
    assert body["parameters"] == {"date": "2026-01-08", "data": "/d"}  # None values left out
    assert body["text"] == (
        "csmf: flow run csmf-daily-2026-01-08 (csmf-daily) failed: Flow run encountered an exception: "
        "TrainingDiverged: loss nan | date=2026-01-08, data=/d"
    )


def test_unset_sends_nothing(webhook, monkeypatch):
    url, got = webhook
    monkeypatch.delenv(WEBHOOK_ENV, raising=False)
    notify_failure(FLOW, RUN, STATE)
    monkeypatch.setenv(WEBHOOK_ENV, "  ")
    notify_failure(FLOW, RUN, STATE)
    assert got == []


def test_a_webhook_that_is_down_is_a_warning_not_an_error(monkeypatch, caplog):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(WEBHOOK_ENV, f"http://127.0.0.1:{port}/hook")
    with caplog.at_level(logging.WARNING, logger="flows.notify"):
        notify_failure(FLOW, RUN, STATE)  # does not raise
    assert f"failure notice to 127.0.0.1:{port} not sent" in caplog.text
    monkeypatch.setenv(WEBHOOK_ENV, "file:///etc/passwd")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flows.notify"):
        notify_failure(FLOW, RUN, STATE)
    assert "must be an http:// or https:// URL" in caplog.text


def test_every_csmf_flow_has_the_hook_for_failed_and_crashed():
    from flows.compare import csmf_compare
    from flows.pipeline import csmf_daily
    from flows.tune import csmf_tune

    for f in (csmf_daily, csmf_compare, csmf_tune):
        assert notify_failure in f.on_failure_hooks and notify_failure in f.on_crashed_hooks, f.name


def test_payload_without_message_or_parameters():
    p = failure_payload("csmf-tune", "csmf-tune-latest", "x", "Crashed", "", {})
    assert p["text"] == "csmf: flow run csmf-tune-latest (csmf-tune) crashed: no message"


def test_the_documented_prefect_automation_is_valid():
    """prefect-automation.yaml is what `prefect automation create --from-file` reads: it validates as a
    Prefect automation once its block id is filled in, and triggers on the three csmf flows only."""
    from pathlib import Path
    from uuid import uuid4

    import yaml
    from prefect.events.schemas.automations import AutomationCore

    raw = yaml.safe_load((Path(__file__).resolve().parents[2] / "prefect-automation.yaml").read_text())
    assert raw["actions"][0]["block_document_id"] == "REPLACE-WITH-YOUR-NOTIFICATION-BLOCK-ID"
    raw["actions"][0]["block_document_id"] = str(uuid4())
    a = AutomationCore.model_validate(raw)
    assert a.trigger.expect == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
    assert a.trigger.match_related.root["prefect.resource.name"] == [
        "csmf-daily",
        "csmf-compare",
        "csmf-tune",
    ]
    assert a.actions[0].type == "send-notification"
