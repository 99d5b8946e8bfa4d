"""flows/postgres.py and flows/deploy.py without starting servers: where the binaries are looked for,
the refusal when they are missing and cannot be installed, the socket path limit, and `down`
reporting a recorded process it could not stop instead of forgetting it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil
import pytest

from flows import deploy, postgres


def _fake_bin(d, tools=postgres.TOOLS):
    d.mkdir(parents=True, exist_ok=True)
    for t in tools:
        f = d / t
        f.write_text("#!/bin/sh\n")
        f.chmod(0o755)
    return d


def test_csmf_pg_bin_is_used_only_when_it_holds_every_tool(tmp_path, monkeypatch):
    full = _fake_bin(tmp_path / "full")
    partial = _fake_bin(tmp_path / "partial", tools=("initdb", "pg_ctl"))
    monkeypatch.setenv("CSMF_PG_BIN", str(full))
    assert postgres.find_binaries() == full
    monkeypatch.setenv("CSMF_PG_BIN", str(partial))
    assert postgres.find_binaries() != partial  # falls through to /usr/lib/postgresql or the PATH


def test_missing_binaries_without_root_are_one_clear_error(monkeypatch):
    monkeypatch.setattr(postgres, "find_binaries", lambda: None)
    monkeypatch.setattr(postgres.os, "geteuid", lambda: 1000)
    assert postgres.can_install() == "not running as root"
    with pytest.raises(
        postgres.PostgresUnavailable, match=r"cannot be installed automatically \(not running as root\)"
    ):
        postgres.ensure_binaries(log=lambda _: None)


def test_a_socket_path_too_long_falls_back_to_tcp_only(tmp_path):
    short = postgres.Cluster(tmp_path / "pg", tmp_path)
    assert short.socket_dir() == str(tmp_path / "pg") or len(str(tmp_path)) > 80
    long = postgres.Cluster(tmp_path / ("x" * 120), tmp_path)
    assert long.socket_dir() == ""


def test_unknown_backend_is_refused_before_anything_starts(tmp_path):
    with pytest.raises(ValueError, match="backend must be one of sqlite, postgres"):
        deploy.up(tmp_path / "home", backend="mysql")
    assert not (tmp_path / "home").exists()


def test_down_stops_a_postmaster_that_pg_ctl_did_not_stop(tmp_path):
    """A recorded postgres entry that pg_ctl does not stop (here a fake pg_ctl, and a process that
    ignores SIGINT): down still stops exactly that pid (SIGKILL after the timeout), then forgets it."""
    home = tmp_path / "home"
    (home / "serve").mkdir(parents=True)
    code = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        entry = {
            "pid": proc.pid,
            "create_time": psutil.Process(proc.pid).create_time(),
            "cmd": ["pg_ctl"],
            "data": str(tmp_path / "missing" / "data"),
            "bin": str(_fake_bin(tmp_path / "bin")),
        }
        state = {"home": str(home), "api_url": "http://127.0.0.1:1/api", "processes": {"postgres": entry}}
        (home / "serve" / deploy.STATE).write_text(json.dumps(state))
        t0 = time.monotonic()
        stopped = deploy.down(home, timeout=1)
        assert stopped == [f"postgres (pid {proc.pid})"]
        assert not deploy._alive(entry) and time.monotonic() - t0 >= 1  # SIGINT ignored, then SIGKILL
        assert not (home / "serve" / deploy.STATE).exists()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, 9)
            proc.wait()


def test_stop_with_nothing_recorded_says_how_to_name_the_home(tmp_path, capsys):
    """`CSMF_HOME=x make serve` then a plain `make stop` said 'nothing recorded as running' and left
    the stack up, with no word of the home."""
    assert deploy.main(["down", "--home", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert (
        f"nothing recorded as running for {tmp_path.resolve()}" in out
        and "CSMF_HOME=<that home> make stop" in out
    )
