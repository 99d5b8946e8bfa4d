"""The csmf state directory ("home") and the environment Prefect and MLflow read from it.

    from flows.env import setup_home
    home = setup_home(None)      # --home, else $CSMF_HOME, else ./.csmf
    import prefect, mlflow       # only now: both read their settings from the environment at import

Call `setup_home` before prefect is imported: Prefect reads PREFECT_HOME once, at import time. Only
unset variables get defaults, so anything the user exported (a tracking server, a Prefect server
via PREFECT_API_URL, ...) wins. PREFECT_API_URL is never set here: unset, a flow starts Prefect's
temporary local API in-process (SQLite under PREFECT_HOME), which is what a laptop run wants.

`check_writable(home)` is for the commands that write state (`csmf run`, `compare`, `doctor`, the
flows): a read-only home fails there at once with one message. Without it, Prefect's temporary API
server cannot write its database in a read-only PREFECT_HOME, exits at start, and prefect 3.8.8
restarts it on a new port until PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (120 s here) have
passed, logging a traceback each time. Serving commands only read, so a read-only home serves.

Imports nothing heavy (no prefect, mlflow or torch): the CLI calls it first thing.
"""

from __future__ import annotations

import gc
import os
import shutil
import sqlite3
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DEFAULT_HOME = ".csmf"


class HomeNotWritable(PermissionError):
    """The csmf home, or the Prefect home or MLflow SQLite store it uses, cannot be written."""


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
        # ...and the client's: without it, `import prefect` in a terminal prints a first-run telemetry
        # notice ("Prefect collects anonymous usage data ...") that the setting above does not stop.
        "DO_NOT_TRACK": "1",
        # Prefect's default 20 s for the temporary local API to come up is too short on a busy
        # 2-core machine ("Timed out while attempting to connect to ephemeral Prefect API server").
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        # MLflow draws a tqdm bar for every artifact transfer: the register task's log_model reloads
        # the model to check the input example and printed "Downloading artifacts: 100%| 13/13" in
        # the middle of the task logs, which reads like something fetched from the network.
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        # MLflow 3's usage telemetry (a consumer thread that posts to MLflow's servers) reads
        # DO_NOT_TRACK only as "true", not the "1" above: a run with no server of any kind sends none.
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }


def existing_home(home: str | os.PathLike | None = None) -> Path:
    """`setup_home` for commands that only read a home (recommend, embed, evaluate, ui): a home that
    does not exist is an error naming it, not a new empty one (a mistyped --home would otherwise
    query an empty registry, and leave a directory behind). With MLFLOW_TRACKING_URI set the
    registry lives there, so the home may be new."""
    root = resolve_home(home)
    if not root.is_dir() and not os.environ.get("MLFLOW_TRACKING_URI"):
        raise FileNotFoundError(
            f"no csmf home at {root}: a home is made by the first `csmf run` there; check --home "
            "(or $CSMF_HOME), or set MLFLOW_TRACKING_URI to the registry's tracking server"
        )
    return setup_home(home)


def setup_home(home: str | os.PathLike | None = None) -> Path:
    """Create the home directory and set the environment defaults; returns the absolute home path.

    Sets CSMF_HOME to the resolved home (so code that only reads $CSMF_HOME, and subprocesses such
    as `mlflow ui`, agree with an explicit --home) and, only where unset, MLFLOW_TRACKING_URI =
    sqlite:///<home>/mlflow.db, PREFECT_HOME = <home>/prefect, PREFECT_SERVER_ANALYTICS_ENABLED =
    false, DO_NOT_TRACK = 1 (Prefect's client telemetry and its first-run notice),
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR = false (no tqdm bars for local artifact copies),
    MLFLOW_DISABLE_TELEMETRY = true (MLflow's usage telemetry). Idempotent.
    """
    root = resolve_home(home)
    _mkdir(root, root)
    os.environ["CSMF_HOME"] = str(root)
    for key, value in home_defaults(root).items():
        os.environ.setdefault(key, value)
    _mkdir(Path(os.environ["PREFECT_HOME"]).expanduser(), root)
    return root


_startup_frozen = False


@contextmanager
def startup_imports() -> Iterator[None]:
    """Import torch, Prefect, MLflow and the flow modules inside this block (`csmf run` does): the
    cyclic garbage collector is off while they load, and what they loaded is then frozen
    (`gc.freeze`), once per process.

    Those imports create ~700k long-lived objects and no garbage worth collecting; with the collector
    on, every allocation-count threshold crossed during them ran a collection over the growing heap,
    and every later full collection (9 in a `make run`, 1.15 s) and the interpreter's collections at
    exit walked them again. Measured on this project's 2-core VM (2026-12-05): the flow's imports
    4.1 s -> 3.0 s, the process's exit after them 1.16 s -> 0.16 s. Objects created later are
    collected as usual. A second call in the same process (tests call `cli.main` many times) only
    runs the block: freezing again would keep the garbage of earlier calls for good."""
    if _startup_frozen:
        yield
        return
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        freeze_startup()
        if enabled:
            gc.enable()


def freeze_startup() -> None:
    """`gc.freeze()` what this process holds now, the first time only. `startup_imports` ends with it;
    the daily flow calls it first thing, for the processes that a Prefect worker starts for a
    deployment run (they import the flow module themselves): their later full collections and exit
    then skip the imported modules' objects."""
    global _startup_frozen
    if not _startup_frozen:
        _startup_frozen = True
        gc.freeze()


def _mkdir(path: Path, root: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only mount, another user's directory, a file in the way
        raise _not_writable(root, path, exc) from None


def _not_writable(root: Path, path: Path, exc: OSError) -> HomeNotWritable:
    return HomeNotWritable(
        f"the csmf home {root} is not writable: {path}: {exc.strerror or exc}. Runs, locks, the MLflow "
        "store and the Prefect database are written there: make it writable (permissions, a read-write "
        "mount, free space) or point --home / $CSMF_HOME at a writable directory",
    )


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///...` tracking URI (None for other stores and in-memory SQLite)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :]).expanduser()


def check_writable(root: Path) -> None:
    """Raise HomeNotWritable unless the home, the Prefect home (when Prefect's temporary local API is
    used: no PREFECT_API_URL) and the MLflow SQLite store can be written (call after setup_home).

    Writes and removes an empty file in each directory and opens existing database files for writing
    without changing them: permission bits alone say nothing for root, and a read-only mount
    (EROFS) refuses root too."""
    dirs, files = [root], []
    if not os.environ.get("PREFECT_API_URL"):
        prefect_home = Path(os.environ.get("PREFECT_HOME") or root / "prefect").expanduser()
        dirs.append(prefect_home)
        files.append(prefect_home / "prefect.db")
    db = sqlite_path(tracking_uri())
    if db is not None:
        dirs.append(db.parent)
        files.append(db)
    for d in dict.fromkeys(dirs):
        try:
            fd, probe = tempfile.mkstemp(prefix=".csmf-write-check-", dir=d)
            os.close(fd)
            os.unlink(probe)
        except FileNotFoundError:
            continue  # created on first use, under a directory checked here
        except OSError as exc:
            raise _not_writable(root, d, exc) from None
    for f in files:
        try:
            os.close(os.open(f, os.O_RDWR))
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise _not_writable(root, f, exc) from None


def tracking_uri() -> str:
    """The MLflow tracking URI in effect (after setup_home)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or home_defaults(resolve_home())["MLFLOW_TRACKING_URI"]


# ---- migrated database templates (flows/local_api.py for Prefect, flows/tracking.py for MLflow) ----
def template_dir() -> Path:
    """Where `make venv` keeps migrated empty databases: under the virtual environment (sys.prefix),
    next to the Prefect and MLflow they belong to (one file per version)."""
    return Path(sys.prefix) / "share" / "csmf"


def keep_template(db: Path, path: Path) -> Path:
    """Copy the migrated SQLite database `db` to `path` as one self-contained file (its write-ahead log
    folded in first), atomically (a reader never sees half a template). Returns `path`. RuntimeError
    when `db` does not hold exactly one alembic version (its migrations did not complete)."""
    con = sqlite3.connect(db)
    try:
        if con.execute("SELECT count(*) FROM alembic_version").fetchone()[0] != 1:
            raise RuntimeError(f"{db}: not one alembic version after the migrations")
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        con.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    shutil.copyfile(db, part)
    os.replace(part, path)
    return path


def seed_from_template(db: Path, template: Path) -> bool:
    """Copy `template` to the database file `db` when there is no database there yet; True when copied.
    Never touches an existing database (nor its -wal / -shm / -journal files); the create is exclusive,
    so a database that appears meanwhile (another process's first run) is never replaced."""
    if not template.is_file():
        return False
    if any(Path(f"{db}{suffix}").exists() for suffix in ("", "-wal", "-shm", "-journal")):
        return False
    db.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(db, "xb") as out, open(template, "rb") as src:
            shutil.copyfileobj(src, out)
    except FileExistsError:
        return False
    return True


_PORTS_GIVEN: set[int] = set()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the kernel's choice), never one this process was given before:
    two calls in a row, for two servers started together, cannot return the same port."""
    import socket

    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _PORTS_GIVEN:
            _PORTS_GIVEN.add(port)
            return port
    raise OSError("no free TCP port on 127.0.0.1 that this process was not given before")
