"""flows/api_server.py (the temporary API's process: its warm-up request) and the block registration
that flows/local_api.py turns off for it."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time

import pytest

from flows.api_server import WARM_UP_PATH, _port, warm_up


def test_port_is_read_from_uvicorns_arguments():
    assert _port(["--app-dir", "x", "--port", "8123", "--log-level", "error"]) == 8123
    assert _port(["--port=8124"]) == 8124
    assert _port(["--host", "127.0.0.1"]) is None
    assert _port(["--port"]) is None and _port(["--port", "abc"]) is None


@pytest.fixture
def server():
    """A local HTTP server whose /api/health answers only after `ready` is set; records every path."""
    seen: list[str] = []
    ready = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802  (http.server's name)
            seen.append(self.path)
            ok = self.path == WARM_UP_PATH or (self.path == "/api/health" and ready.is_set())
            self.send_response(200 if ok else 503)
            self.end_headers()
            self.wfile.write(b'"3.8.8"' if ok else b"")

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1], seen, ready
    httpd.shutdown()
    httpd.server_close()


def test_warm_up_waits_for_health_then_asks_the_version_once(server):
    port, seen, ready = server
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(warm_up(port, timeout=20)))
    thread.start()
    time.sleep(0.3)
    assert WARM_UP_PATH not in seen and "/api/health" in seen  # still waiting for health
    ready.set()
    thread.join(10)
    assert result == [True]
    assert seen.count(WARM_UP_PATH) == 1 and seen[-1] == WARM_UP_PATH


def test_warm_up_gives_up_quietly(server):
    port, seen, _ = server  # health never answers 200
    t0 = time.monotonic()
    assert warm_up(port, timeout=0.3) is False
    assert time.monotonic() - t0 < 5 and WARM_UP_PATH not in seen


def test_the_temporary_server_registers_no_blocks_unless_the_user_says_so(monkeypatch):
    from flows.local_api import NO_BLOCK_REGISTRATION, PREPARE, block_registration_off, uvicorn_command

    for name in (
        "PREFECT_SERVER_REGISTER_BLOCKS_ON_START",
        "PREFECT_API_BLOCKS_REGISTER_ON_START",
        "PREFECT_SERVER_MEMOIZE_BLOCK_AUTO_REGISTRATION",
        "PREFECT_MEMOIZE_BLOCK_AUTO_REGISTRATION",
    ):
        monkeypatch.delenv(name, raising=False)  # fmt: skip
    command = uvicorn_command(8000)
    env, args = command["env"], command["args"]
    assert {k: env[k] for k in NO_BLOCK_REGISTRATION} == NO_BLOCK_REGISTRATION
    assert args[3:6] == ["flows.api_server", PREPARE, args[5]] and args[5].endswith(".db")
    # Prefect reads these names (its settings, not a guess): both off in a process with that environment
    from prefect.settings import Settings

    with monkeypatch.context() as m:
        for k, v in NO_BLOCK_REGISTRATION.items():
            m.setenv(k, v)
        server = Settings().server
    assert server.register_blocks_on_start is False and server.memoize_block_auto_registration is False
    # a user's own setting, under any of Prefect's names for it, is left as it is
    assert block_registration_off({"PREFECT_API_BLOCKS_REGISTER_ON_START": "true"}) == {
        "PREFECT_SERVER_MEMOIZE_BLOCK_AUTO_REGISTRATION": "false"
    }
    assert block_registration_off({"PREFECT_SERVER_MEMOIZE_BLOCK_AUTO_REGISTRATION": "true"}) == {
        "PREFECT_SERVER_REGISTER_BLOCKS_ON_START": "false"
    }
    monkeypatch.setenv("PREFECT_API_BLOCKS_REGISTER_ON_START", "true")
    env = uvicorn_command(8000)["env"]
    assert "PREFECT_SERVER_REGISTER_BLOCKS_ON_START" not in env
    with monkeypatch.context() as m:
        m.delenv("PREFECT_SERVER_MEMOIZE_BLOCK_AUTO_REGISTRATION", raising=False)
        for k, v in env.items():
            if k.startswith("PREFECT_"):
                m.setenv(k, v)
        assert Settings().server.register_blocks_on_start is True


def test_uvicorn_command_imports_no_prefect():
    """The temporary API is launched before `csmf run` imports Prefect (~0.7 s): building its command
    must not import it."""
    code = (
        "import sys\n"
        "from flows.local_api import uvicorn_command\n"
        "uvicorn_command(8000)\n"
        "print(sorted(m for m in sys.modules if m == 'prefect' or m.startswith('prefect.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_profile_that_names_an_api_stops_the_launched_server(tmp_path, monkeypatch):
    """`start_temporary_api` launches before Prefect's settings are read; when they name an API after
    all, the server process returns before seeding anything and `wait` stops it and returns None."""
    from flows import local_api

    monkeypatch.setattr(local_api, "temporary_api_wanted", lambda: False)
    template = tmp_path / "template.db"
    template.write_bytes(b"not used")
    monkeypatch.setattr(local_api, "seed_database", lambda t=None: (_ for _ in ()).throw(AssertionError(t)))
    assert local_api.prepare(template) is False
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    api = local_api.TemporaryApi(process=process, port=1)
    assert api.wait(timeout=5) is None
    assert process.poll() is not None and api.process is None
