"""Prefect's temporary local API, started early: `csmf run` launches it before its own imports and
checks, so that the server's start-up overlaps them instead of preceding the flow.

    api = start_temporary_api()   # None when PREFECT_API_URL is set (a persistent server is used)
    ...                           # imports, config, data: the server starts meanwhile
    api.wait()                    # up and answering; the flow's client then uses this same server

Without a PREFECT_API_URL, the first Prefect client of a process starts the temporary server
(prefect 3.8.8: `prefect.client.orchestration.get_client` -> `SubprocessASGIServer().start()`), a
`uvicorn` subprocess that imports the Prefect server, checks the database migrations of
PREFECT_HOME and registers block types, then answers /api/health. `SubprocessASGIServer` is one
instance per port (port None: the temporary one) and `start` does nothing once it is `running`, so
the server launched here is the one the flow's client, its events and its log workers use; no second
one starts. What `start` does is split in two: `start_temporary_api` = the same subprocess on a free
port (launched before the Prefect server's modules are imported here: `uvicorn_command`), handed to
the singleton, marked running, stopped at exit (`atexit`, as `start` does); `TemporaryApi.wait` = its
loop, polling /api/health until the server answers (a port taken meanwhile: exit code 3, relaunched
on another port, as `start` does), within PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.

Call after `flows.env.setup_home` (Prefect reads PREFECT_HOME at import) and after
`flows.doctor.claim` (the server carries this process as its owner).
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any


class TemporaryApi:
    """A launched temporary Prefect API server (the singleton the flow's client will use)."""

    def __init__(self, server: Any, launched: bool):
        self.server = server
        self.launched = launched  # False: it was already running in this process
        self.seconds_waited = 0.0

    @property
    def api_url(self) -> str:
        return self.server.api_url

    def wait(self, timeout: float | None = None) -> TemporaryApi:
        """Block until /api/health answers 200; raise RuntimeError (with the server's exit code) when it
        does not within `timeout` (default PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)."""
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

        server = self.server
        limit = timeout or PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < limit:
                process = server.server_process
                if process is None:  # stopped meanwhile (atexit, a test): nothing to wait for
                    raise RuntimeError("the temporary Prefect API server was stopped while starting")
                if process.poll() == 3:  # the port was taken: what SubprocessASGIServer.start does
                    server.port = server.find_available_port()
                    server.server_process = server._run_uvicorn_command()
                    continue
                if process.poll() is not None:
                    raise RuntimeError(
                        f"the temporary Prefect API server exited with code {process.returncode} while "
                        "starting (its error is above)"
                    )
                if _healthy(f"{server.api_url}/health"):
                    return self
                time.sleep(0.1)
            raise RuntimeError(
                f"Timed out while attempting to connect to ephemeral Prefect API server ({limit:g} s, "
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)."
            )
        except BaseException:
            server.stop()  # the flow's client would otherwise take a half-started server for a live one
            raise
        finally:
            self.seconds_waited = time.monotonic() - t0


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def temporary_api_wanted() -> bool:
    """Whether this process's first Prefect client would start the temporary server: no API URL
    (environment or profile) and ephemeral servers enabled (prefect 3.8.8 `get_client`'s test)."""
    if os.environ.get("PREFECT_API_URL"):
        return False
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    return not settings.api.url and bool(settings.server.ephemeral.enabled)


def start_temporary_api() -> TemporaryApi | None:
    """Launch Prefect's temporary API server now, without waiting for it (`TemporaryApi.wait`); None
    when a persistent server is configured (PREFECT_API_URL), where nothing is started.

    The subprocess is launched before this process imports the Prefect server's own modules (seconds
    of CPU that the flow's client would import anyway), with `SubprocessASGIServer`'s command and
    environment (`uvicorn_command`), and then handed to the singleton as if its `start` had launched
    it."""
    if not temporary_api_wanted():
        return None
    process = port = None
    if "prefect.server.api.server" not in sys.modules:
        port = _free_port()
        process = subprocess.Popen(**uvicorn_command(port))
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the per-port singleton get_client() uses (port None)
    if server.running:  # already started in this process: ours is not needed
        if process is not None:
            process.terminate()
            process.wait()
        return TemporaryApi(server, launched=False)
    server.running = True
    try:
        if process is None:
            server.port = server.port or server.find_available_port()
            process = server._run_uvicorn_command()
        else:
            server.port = port
        server.server_process = process
    except BaseException:
        server.running = False
        raise
    atexit.register(server.stop)
    return TemporaryApi(server, launched=True)


def uvicorn_command(port: int) -> dict[str, Any]:
    """`subprocess.Popen` arguments of prefect 3.8.8's `SubprocessASGIServer._run_uvicorn_command`
    (the temporary API: uvicorn on 127.0.0.1:<port>, UI off, ephemeral services, the explicitly set
    settings in its environment), built without importing the Prefect server."""
    import prefect
    from prefect.settings import get_current_settings

    server_env = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    return {
        "args": [
            sys.executable,
            "-m",
            "uvicorn",
            "--app-dir",
            str(prefect.__module_path__.parent),
            "--factory",
            "prefect.server.api.server:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "error",
            "--lifespan",
            "on",
        ],  # fmt: skip
        "env": {
            **os.environ,
            **server_env,
            **get_current_settings().to_environment_variables(exclude_unset=True),
        },
    }


def _free_port() -> int:
    """A free port in 8000-8999, chosen like `SubprocessASGIServer.find_available_port`."""
    import random
    import socket

    for _ in range(10):
        port = random.choice(range(8000, 9000))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
                return port
            except OSError:
                time.sleep(random.uniform(0.1, 0.5))
    raise RuntimeError("Unable to find an available port after multiple attempts")
