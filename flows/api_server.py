"""Prefect's temporary API server process: `python -m uvicorn --factory
prefect.server.api.server:create_app ...` (the command prefect 3.8.8's `SubprocessASGIServer` runs,
built by `flows.local_api.uvicorn_command`), with the Prefect server's modules imported first inside
`flows.env.startup_imports` (the cyclic GC paused while they load, then frozen).

That import is most of the server's start (~2.4 s of CPU on this project's 2-core VM, 1.9 s this
way, 2026-12-05), and `csmf run` waits for the server after its own imports: on a 2-core machine the
two processes share the cores while both start. Everything else is uvicorn's own command line.

    python -m flows.api_server --app-dir ... --factory prefect.server.api.server:create_app --port N ...
"""

from __future__ import annotations

import sys

from flows.env import startup_imports


def main() -> None:
    with startup_imports():
        import prefect.server.api.server  # noqa: F401  (what the app factory imports)
    import uvicorn

    sys.argv[0] = "uvicorn"
    uvicorn.main()  # uvicorn's click command, on this process's arguments


if __name__ == "__main__":
    main()
