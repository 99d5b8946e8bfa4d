"""bench/ui_screenshots.py without a browser: the pages it opens, how it finds Chromium, the command
it runs, and the clear skip (exit 0) where no Chromium is installed. The screenshots themselves
(docs/screenshots/) come from running the script against a home with a finished `csmf run`."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def shots(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    return importlib.import_module("bench.ui_screenshots")


def test_urls_are_the_mlflow_3_routes_of_run_artifact_and_version(shots):
    t = shots.Targets(experiment_id="7", run_id="abc123", model="my model", version="3")
    urls = shots.ui_urls("http://127.0.0.1:5123/", t)
    view = "?workflowType=machine_learning"  # the UI's "Model training" view, not its GenAI default
    assert urls == {
        "parent_run": f"http://127.0.0.1:5123/#/experiments/7/runs/abc123{view}",
        "cascade_figure": f"http://127.0.0.1:5123/#/experiments/7/runs/abc123/artifacts/figures/cascade.png{view}",
        "model_version": f"http://127.0.0.1:5123/#/models/my%20model/versions/3{view}",
    }


def test_chromium_is_found_by_env_then_by_name(shots):
    on_path = {"chromium-browser": "/usr/bin/chromium-browser", "/opt/chrome": "/opt/chrome"}
    which = on_path.get
    assert shots.find_chromium({}, which) == "/usr/bin/chromium-browser"
    assert shots.find_chromium({"CHROMIUM": "/opt/chrome"}, which) == "/opt/chrome"
    # an explicit $CHROMIUM that does not exist is not silently replaced by another browser
    assert shots.find_chromium({"CHROMIUM": "/nope"}, which) is None
    assert shots.find_chromium({}, lambda name: None) is None


def test_skip_message_says_why_and_how_to_fix(shots):
    msg = shots.skip_message({})
    assert "skipped" in msg and "chromium, chromium-browser" in msg and "apt-get install chromium" in msg
    assert "$CHROMIUM=/nope is not an executable" in shots.skip_message({"CHROMIUM": "/nope"})


def test_no_chromium_exits_0_with_the_message_before_touching_anything(shots, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no browser on it
    monkeypatch.delenv("CHROMIUM", raising=False)
    out = tmp_path / "out"
    assert shots.main(["--home", str(tmp_path / "no-home"), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == shots.skip_message({})
    assert not out.exists()


def test_chromium_command_is_headless_sized_and_waits_for_the_app(shots, tmp_path):
    cmd = shots.chromium_command("/usr/bin/chromium", "http://x/#/a", tmp_path / "a.png", tmp_path / "p")
    assert cmd[0] == "/usr/bin/chromium" and cmd[-1] == "http://x/#/a"
    assert "--headless=new" in cmd and "--window-size=1600,1000" in cmd
    assert f"--screenshot={tmp_path / 'a.png'}" in cmd and f"--user-data-dir={tmp_path / 'p'}" in cmd
    assert any(a.startswith("--virtual-time-budget=") and int(a.split("=")[1]) >= 5000 for a in cmd)


def test_free_ports_can_be_bound_and_never_repeat(shots):
    """flows.env.free_port (the one every server start uses): bindable, and never a port this process
    was given before, so two servers started together never get the same one."""
    import socket

    ports = [shots.free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", ports[-2]))
        b.bind(("127.0.0.1", ports[-1]))
    assert sys.modules["bench.ui_screenshots"] is shots
