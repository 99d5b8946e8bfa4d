"""Prefect's temporary local API, started early: `csmf run` launches it before its own imports and
checks, so that the server's start-up overlaps them instead of preceding the flow.

    api = start_temporary_api()   # None when PREFECT_API_URL is set (a persistent server is used)
    ...                           # imports, config, data: the server starts meanwhile
    api = api.wait()              # up and answering (None: Prefect's settings name an API after all)
    with api.use():               # this process's Prefect clients talk to it
        csmf_daily(...)

Without a PREFECT_API_URL, the first Prefect client of a process starts the temporary server
(prefect 3.8.8: `prefect.client.orchestration.get_client` -> `SubprocessASGIServer().start()`), a
`uvicorn` subprocess that imports the Prefect server, checks the database migrations of
PREFECT_HOME and registers block types, then answers /api/health. Here the same subprocess (same
command and environment: `uvicorn_command`, less the block registration:
`NO_BLOCK_REGISTRATION`) is launched on a free port before this process imports
anything heavy; `TemporaryApi.wait` polls /api/health as `start` does (a port taken meanwhile: exit
code 3, relaunched on another port), within PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS; the
flow then runs with PREFECT_API_URL set to it (`use`, Prefect's `temporary_settings`), so its
client, events and log workers use this server and none of them imports the Prefect server's
modules into this process (they would for an ephemeral one: ~1.5 s of CPU measured). It is stopped
at exit (`atexit`, registered before Prefect's own exit handlers, so those drain first). When this
process has already imported the Prefect server (a test harness), the launched server is handed to
Prefect's singleton instead, as before.

Call after `flows.env.setup_home` (Prefect reads PREFECT_HOME at import) and after
`flows.doctor.claim` (the server carries this process as its owner).

A new PREFECT_HOME's database starts from a migrated template. On a new home the server runs all of
Prefect's database migrations (114 alembic revisions on SQLite, ~4 s of CPU on the 2-core development
VM, half of its start-up), which the flow then waits for. `build_template` runs Prefect's documented
`prefect server database upgrade -y` once, on an empty home, and keeps the resulting `prefect.db`
under the virtual environment (`template_path`: one file per Prefect version; `make venv` builds it
after installing). The server process copies it in before it starts (`prepare`, launched by
`start_temporary_api` with `--csmf-prepare`) when the home has no database yet and the
database is the default SQLite file of PREFECT_HOME; the server still runs `alembic upgrade head` on
start (PREFECT_API_DATABASE_MIGRATE_ON_START stays on), which finds nothing to do. An existing
database, another database URL (PostgreSQL) or a missing template: nothing is copied, Prefect
migrates as before.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flows.env import keep_template, seed_from_template, template_dir


class TemporaryApi:
    """A launched temporary Prefect API server.

    Two kinds: this module's own uvicorn process (`process`, `port`), which the flow's client reaches
    through PREFECT_API_URL set for the duration of `use()`, so the Prefect server's modules are never
    imported by the CLI; or, when this process had already imported them, Prefect's own per-port
    singleton (`server`), which `get_client()` finds by itself."""

    def __init__(self, server: Any = None, process: Any = None, port: int | None = None):
        self.server = server
        self.process = process
        self.port = port
        self.seconds_waited = 0.0

    @property
    def api_url(self) -> str:
        return self.server.api_url if self.server is not None else f"http://127.0.0.1:{self.port}/api"

    @contextmanager
    def use(self) -> Iterator[None]:
        """Within: this process's Prefect clients talk to this server (PREFECT_API_URL for the own
        process; nothing to set for Prefect's singleton, which they find by themselves), and flow runs
        send no heartbeats (`no_heartbeats`)."""
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with no_heartbeats():
            if self.server is not None:
                yield
                return
            with temporary_settings(updates={PREFECT_API_URL: self.api_url}):
                yield

    def stop(self) -> None:
        """Stop the server (at exit; idempotent), as SubprocessASGIServer.stop does."""
        if self.server is not None:
            self.server.stop()
            return
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _relaunch(self) -> None:
        """The port was taken between choosing and binding (exit code 3): another port, as
        SubprocessASGIServer.start does."""
        if self.server is not None:
            self.server.port = self.server.find_available_port()
            self.server.server_process = self.server._run_uvicorn_command()
        else:
            self.port = _free_port()
            self.process = subprocess.Popen(**uvicorn_command(self.port))

    def wait(self, timeout: float | None = None) -> TemporaryApi | None:
        """Block until /api/health answers 200 and return self; raise RuntimeError (with the server's
        exit code) when it does not within `timeout` (default
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS). None, the server stopped, when Prefect's
        settings name an API after all (a profile's PREFECT_API_URL: `start_temporary_api` does not
        read them)."""
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

        if self.server is None and not temporary_api_wanted():  # a profile names an API: not needed
            self.stop()
            return None
        limit = timeout or PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < limit:
                process = self.server.server_process if self.server is not None else self.process
                if process is None:  # stopped meanwhile (atexit, a test): nothing to wait for
                    raise RuntimeError("the temporary Prefect API server was stopped while starting")
                if process.poll() == 3:
                    self._relaunch()
                    continue
                if process.poll() is not None:
                    raise RuntimeError(
                        f"the temporary Prefect API server exited with code {process.returncode} while "
                        "starting (its error is above)"
                    )
                if _healthy(f"{self.api_url}/health"):
                    return self
                time.sleep(0.1)
            raise RuntimeError(
                f"Timed out while attempting to connect to ephemeral Prefect API server ({limit:g} s, "
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)."
            )
        except BaseException:
            self.stop()  # the flow's client would otherwise take a half-started server for a live one
            raise
        finally:
            self.seconds_waited = time.monotonic() - t0


@contextmanager
def no_heartbeats() -> Iterator[None]:
    """Within: flow runs send no heartbeats, for a temporary API (`TemporaryApi.use`, and the tests'
    Prefect harness). Heartbeats (every 180 s by default) let a persistent server mark a run whose
    process died as crashed (the automation `make serve` creates, flows/automations.py); a temporary
    server dies with the process, so they tell it nothing, and
    each flow run paid for them at its end: prefect 3.8.8's heartbeat thread sleeps in 1-s steps and
    the engine joins it when the run finishes (0.86-0.88 s measured on the 2-core VM, a tenth of
    `make run`'s orchestration; docs/performance.md; flows/prefect_compat.py now spares every run
    that wait, and the thread stays off here)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def _healthy(url: str, timeout: float = 2) -> bool:
    """Whether a GET of `url` answers 200 within `timeout` seconds."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
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
    when a persistent server is configured (PREFECT_API_URL), where nothing is started. Run the flow
    inside `api.use()`.

    The subprocess is Prefect's own command (`uvicorn_command`: uvicorn with the same arguments, the
    environment less the block registration), on a free port, over
    a database seeded from the migrated template when the home has none (`seed_database`, done by the
    server process before it starts: `flows.api_server.prepare`). Nothing here imports Prefect (~0.7 s
    of CPU before the launch otherwise): the server process checks Prefect's settings itself and exits
    when they name an API (a profile's PREFECT_API_URL), which `wait` then sees from this process's
    settings. The CLI process does not import the Prefect server's modules (~1.5 s of CPU): its
    clients reach the server through PREFECT_API_URL inside `use()`. Only when this process has
    already imported them (and may have started Prefect's singleton) is the server handed to that
    singleton as before."""
    if os.environ.get("PREFECT_API_URL"):
        return None
    if "prefect.server.api.server" in sys.modules:
        if not temporary_api_wanted():
            return None
        seed_database()
        return _singleton_api()
    port = _free_port()
    api = TemporaryApi(process=subprocess.Popen(**uvicorn_command(port)), port=port)
    atexit.register(api.stop)
    return api


def _singleton_api() -> TemporaryApi:
    """Prefect's per-port singleton (port None, what get_client() uses), started like its `start`
    but not waited for; the one already running in this process when there is one."""
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    if server.running:
        return TemporaryApi(server)
    server.running = True
    try:
        server.port = server.port or server.find_available_port()
        server.server_process = server._run_uvicorn_command()
    except BaseException:
        server.running = False
        raise
    atexit.register(server.stop)
    return TemporaryApi(server)


def uvicorn_command(port: int) -> dict[str, Any]:
    """`subprocess.Popen` arguments of prefect 3.8.8's `SubprocessASGIServer._run_uvicorn_command`
    (the temporary API: uvicorn on 127.0.0.1:<port>, UI off, ephemeral services), built without
    importing Prefect: uvicorn runs through `flows.api_server`, which first checks that a temporary
    API is wanted and seeds the database from `template_path()` (`PREPARE`), then imports the
    server's modules with the cyclic GC paused. Prefect's own command also passes this process's
    explicitly set settings in the environment; the server process reads the same environment,
    profile and files itself."""
    import importlib.util

    server_env = {
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
        **block_registration_off(os.environ),
    }
    prefect_dir = Path(importlib.util.find_spec("prefect").origin).parent  # found, not imported
    return {
        "args": [
            sys.executable,
            "-P",  # not the working directory on sys.path: a user's own `flows` folder cannot shadow ours
            "-m",
            "flows.api_server",  # `-m uvicorn` with the server's imports GC-paused (flows/api_server.py)
            PREPARE,
            str(template_path()),
            "--app-dir",
            str(prefect_dir.parent),
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
        "env": {**os.environ, **server_env},
    }


PREPARE = "--csmf-prepare"  # flows.api_server: `PREPARE <template>` first, taken off before uvicorn


def prepare(template: Path) -> bool:
    """In the server process, before the server starts: False when Prefect's settings name an API
    (nothing to serve); else seed a new home's database from `template` and return True."""
    if not temporary_api_wanted():
        return False
    seed_database(template)
    return True


# The temporary server registers no block types on start (unless this process's environment sets either
# setting, under any of its names: a user's choice stays). Prefect's start-up otherwise imports
# every installed collection (prefect-dask, and through it dask.distributed) to hash the block registry,
# and on a new home writes every block type to the database: 0.26 s of a 2.3 s start with a kept home
# and 0.8 s of 2.9 s with a new one (2-core Intel VM, 2026-12-06, flows/api_server.py timed to
# /api/health). No csmf flow uses blocks, and the server lives for one run; a persistent `prefect server
# start` (make serve) on the same home registers them as usual.
NO_BLOCK_REGISTRATION = {
    "PREFECT_SERVER_REGISTER_BLOCKS_ON_START": "false",
    "PREFECT_SERVER_MEMOIZE_BLOCK_AUTO_REGISTRATION": "false",
}
# every environment name Prefect 3.8.8 reads for each (its settings' validation aliases)
_BLOCK_SETTING_NAMES = {
    "PREFECT_SERVER_REGISTER_BLOCKS_ON_START": ("PREFECT_API_BLOCKS_REGISTER_ON_START",),
    "PREFECT_SERVER_MEMOIZE_BLOCK_AUTO_REGISTRATION": ("PREFECT_MEMOIZE_BLOCK_AUTO_REGISTRATION",),
}


def block_registration_off(environ: Mapping[str, str]) -> dict[str, str]:
    """NO_BLOCK_REGISTRATION less each setting `environ` already sets (any of its names)."""
    return {
        name: value
        for name, value in NO_BLOCK_REGISTRATION.items()
        if not any(n in environ for n in (name, *_BLOCK_SETTING_NAMES[name]))
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


def template_path() -> Path:
    """Where the migrated database template of this Prefect version lives: under the virtual
    environment (`flows.env.template_dir`), next to the Prefect it belongs to (its installed version,
    read without importing it)."""
    from importlib.metadata import version

    return template_dir() / f"prefect-{version('prefect')}.db"


def build_template(path: Path | None = None) -> Path:
    """Migrate an empty Prefect database with Prefect's own CLI (`prefect server database upgrade -y`,
    in a temporary PREFECT_HOME) and keep it at `path` (default `template_path()`), written atomically.
    Returns the path. Raises CalledProcessError with Prefect's output when the upgrade fails."""
    path = Path(path) if path is not None else template_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="csmf-prefect-template-") as tmp:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("PREFECT_API_DATABASE", "PREFECT_SERVER_DATABASE"))
        }
        env |= {"PREFECT_HOME": tmp, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
        env.pop("PREFECT_API_URL", None)
        subprocess.run(
            [sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
            env=env, check=True, capture_output=True, text=True,
        )  # fmt: skip
        return keep_template(Path(tmp) / "prefect.db", path)


def default_database() -> Path | None:
    """The SQLite file the temporary server will use when it is the default one of PREFECT_HOME
    (`sqlite+aiosqlite:///<PREFECT_HOME>/prefect.db`), else None (another URL, e.g. PostgreSQL)."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    url = settings.server.database.connection_url
    url = url.get_secret_value() if url is not None else None
    db = Path(settings.home).expanduser() / "prefect.db"
    return db if url in (None, f"sqlite+aiosqlite:///{db}") else None


def seed_database(template: Path | None = None) -> bool:
    """Copy the migrated template into a PREFECT_HOME that has no database yet (see the module
    docstring); True when copied. Never touches an existing database (or its -wal / -shm files)."""
    template = Path(template) if template is not None else template_path()
    db = default_database()
    return db is not None and seed_from_template(db, template)


if __name__ == "__main__":  # `python -m flows.local_api --build-template` (make venv)
    if sys.argv[1:] != ["--build-template"]:
        sys.exit("usage: python -m flows.local_api --build-template")
    print(f"Prefect database template: {build_template()}")
