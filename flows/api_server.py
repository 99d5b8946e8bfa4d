"""Prefect's temporary API server process: `python -m uvicorn --factory
prefect.server.api.server:create_app ...` (the command prefect 3.8.8's `SubprocessASGIServer` runs,
built by `flows.local_api.uvicorn_command`), with the Prefect server's modules imported first inside
`flows.env.startup_imports` (the cyclic GC paused while they load, then frozen).

That import is most of the server's start (~2.4 s of CPU on this project's 2-core VM, 1.9 s this
way, 2026-12-05), and `csmf run` waits for the server after its own imports: on a 2-core machine the
two processes share the cores while both start. `--csmf-prepare TEMPLATE` first (taken off before
uvicorn reads the rest): the checks that need Prefect's settings, made here so that `csmf run` can
launch this before importing Prefect (`flows.local_api.prepare`: is a temporary API wanted? seed a
new home's database from TEMPLATE). Everything else is uvicorn's own command line.

Once it answers /api/health, the server sends itself one GET /api/admin/version (`warm_up`, a
daemon thread): the first GET a fresh server answers costs it ~0.22 s whatever the route (/api/hello
the same; later ones ~2 ms; 2-core Intel VM, 2026-12-06), and the flow's first request is that very
call (Prefect's client checks the API version before creating the flow run). Made here, that cost
falls while `csmf run` is still importing, not after it.

    python -m flows.api_server --csmf-prepare TEMPLATE --app-dir ... --factory prefect.server.api.server:create_app --port N ...
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from flows.env import startup_imports
from flows.local_api import PREPARE, _healthy, prepare

WARM_UP_PATH = "/api/admin/version"


def warm_up(port: int, timeout: float = 60.0) -> bool:
    """Wait until http://127.0.0.1:<port>/api/health answers, then GET WARM_UP_PATH once; True when
    both answered within `timeout` seconds. Never raises (the server's own errors are its output)."""
    base = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while not _healthy(f"{base}/api/health"):
        if time.monotonic() - t0 >= timeout:
            return False
        time.sleep(0.05)
    return _healthy(f"{base}{WARM_UP_PATH}", timeout=10)


def _port(argv: list[str]) -> int | None:
    """uvicorn's --port N / --port=N in `argv`, None when absent or not a number."""
    for i, arg in enumerate(argv):
        if arg == "--port":
            value = argv[i + 1] if i + 1 < len(argv) else ""
        elif arg.startswith("--port="):
            value = arg.removeprefix("--port=")
        else:
            continue
        return int(value) if value.isdigit() else None
    return None


def main() -> None:
    with startup_imports():
        if sys.argv[1:2] == [PREPARE]:  # flows.local_api.uvicorn_command: the checks that need Prefect
            template = Path(sys.argv[2])
            del sys.argv[1:3]
            if not prepare(template):  # the CLI reads the same settings and stops waiting for it
                print("Prefect's settings name an API: no temporary server started", file=sys.stderr)
                return
        import prefect.server.api.server  # noqa: F401  (what the app factory imports)
    import uvicorn

    port = _port(sys.argv[1:])
    if port is not None:
        threading.Thread(target=warm_up, args=(port,), name="csmf-api-warm-up", daemon=True).start()
    sys.argv[0] = "uvicorn"
    uvicorn.main()  # uvicorn's click command, on this process's arguments


if __name__ == "__main__":
    main()
