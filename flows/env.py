"""The csmf state directory ("home") and the environment Prefect and MLflow read from it.

    from flows.env import setup_home
    home = setup_home(None)      # --home, else $CSMF_HOME, else ./.csmf
    import prefect, mlflow       # only now: both read their settings from the environment at import

Call `setup_home` before prefect is imported: Prefect reads PREFECT_HOME once, at import time. Only
unset variables get defaults, so anything the user exported (a tracking server, a Prefect server
via PREFECT_API_URL, ...) wins. PREFECT_API_URL is never set here: unset, a flow starts Prefect's
temporary local API in-process (SQLite under PREFECT_HOME), which is what a laptop run wants.

Imports nothing heavy (no prefect, mlflow or torch): the CLI calls it first thing.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_HOME = ".csmf"


def resolve_home(home: str | os.PathLike | None = None) -> Path:
    """`home`, else $CSMF_HOME, else ./.csmf, as an absolute path (not created)."""
    return Path(home or os.environ.get("CSMF_HOME") or DEFAULT_HOME).expanduser().resolve()


def home_defaults(root: Path) -> dict[str, str]:
    """The environment defaults of a home directory (applied only where unset)."""
    return {
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "PREFECT_HOME": str(root / "prefect"),
        # Prefect's telemetry on the embedded server only adds "database is locked" noise.
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # Prefect's default 20 s for the temporary local API to come up is too short on a busy
        # 2-core machine ("Timed out while attempting to connect to ephemeral Prefect API server").
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    }


def setup_home(home: str | os.PathLike | None = None) -> Path:
    """Create the home directory and set the environment defaults; returns the absolute home path.

    Sets CSMF_HOME to the resolved home (so code that only reads $CSMF_HOME, and subprocesses such
    as `mlflow ui`, agree with an explicit --home) and, only where unset, MLFLOW_TRACKING_URI =
    sqlite:///<home>/mlflow.db, PREFECT_HOME = <home>/prefect, PREFECT_SERVER_ANALYTICS_ENABLED =
    false. Idempotent.
    """
    root = resolve_home(home)
    root.mkdir(parents=True, exist_ok=True)
    os.environ["CSMF_HOME"] = str(root)
    for key, value in home_defaults(root).items():
        os.environ.setdefault(key, value)
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    return root


def tracking_uri() -> str:
    """The MLflow tracking URI in effect (after setup_home)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or home_defaults(resolve_home())["MLFLOW_TRACKING_URI"]
