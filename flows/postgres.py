"""A PostgreSQL cluster of the csmf home, for `make serve BACKEND=postgres` (flows/deploy.py).

    binaries = find_binaries()            # initdb, pg_ctl, postgres of Debian's `postgresql` package
    binaries = ensure_binaries(log)       # ... installed with apt-get when missing (root only)
    cluster = Cluster(home / "serve" / "postgres", binaries)
    cluster.start(port)                   # initdb the first time, then pg_ctl start on 127.0.0.1:port
    cluster.create_database("mlflow")     # idempotent
    cluster.url("mlflow", "postgresql+psycopg2")
    cluster.stop()                        # pg_ctl stop -m fast

Layout, all under `<home>/serve/postgres/` (kept across `make stop` / `make serve`, like the SQLite
files of the default stack): `data/` (the cluster, mode 0700), the unix socket `.s.PGSQL.<port>`,
`postgres.log`; the superuser `csmf`'s password is in `<home>/serve/postgres.password` (mode 0600,
generated at initdb). PostgreSQL refuses to run as root: as root every initdb / pg_ctl runs as the
`postgres` system user (`runuser`), which owns the directory; as any other user they run as that
user. The server listens on 127.0.0.1 only, and every connection (TCP or socket) needs the password
(scram-sha-256).
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

PG_USER = "csmf"
RUN_AS = "postgres"  # the system user Debian's package creates; used when csmf runs as root
SOCKET_PATH_MAX = 100  # sun_path is 108 bytes; ".s.PGSQL.<port>" and a NUL must fit after the directory
TOOLS = ("initdb", "pg_ctl", "postgres")


class PostgresUnavailable(RuntimeError):
    """PostgreSQL's server binaries are missing and cannot be installed here."""


def find_binaries() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres: $CSMF_PG_BIN, else the newest
    /usr/lib/postgresql/<version>/bin (Debian), else the directory of `pg_ctl` on the PATH."""
    candidates: list[Path] = []
    if os.environ.get("CSMF_PG_BIN"):
        candidates.append(Path(os.environ["CSMF_PG_BIN"]))
    debian = Path("/usr/lib/postgresql")
    if debian.is_dir():
        versions = [p for p in debian.iterdir() if re.fullmatch(r"\d+(\.\d+)?", p.name)]
        candidates += [p / "bin" for p in sorted(versions, key=lambda p: float(p.name), reverse=True)]
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for c in candidates:
        if all(os.access(c / tool, os.X_OK) for tool in TOOLS):
            return c
    return None


def can_install() -> str | None:
    """None when `ensure_binaries` can install the package here (root with apt-get), else why not."""
    if os.geteuid() != 0:
        return "not running as root"
    if shutil.which("apt-get") is None:
        return "no apt-get on this machine"
    return None


def ensure_binaries(log: Callable[[str], None] = print) -> Path:
    """find_binaries(), installing Debian's `postgresql` package first when it is missing
    (`apt-get update && apt-get install -y postgresql`, as root). Raises PostgresUnavailable."""
    found = find_binaries()
    if found is not None:
        return found
    why = can_install()
    if why is not None:
        raise PostgresUnavailable(
            "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found in /usr/lib/postgresql/*/bin, "
            f"$CSMF_PG_BIN or the PATH, and they cannot be installed automatically ({why}): install "
            "Debian's `postgresql` package (apt-get install postgresql) or set CSMF_PG_BIN to their directory"
        )
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    t0 = time.monotonic()
    log(
        "PostgreSQL not found: installing Debian's postgresql package (apt-get update && apt-get install -y postgresql)"
    )
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "postgresql"]):
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if res.returncode != 0:
            raise PostgresUnavailable(
                f"{' '.join(cmd)} failed (exit {res.returncode}):\n{res.stdout[-2000:]}{res.stderr[-2000:]}"
            )
    found = find_binaries()
    if found is None:
        raise PostgresUnavailable(
            "apt-get install postgresql succeeded but initdb/pg_ctl/postgres are still not found"
        )
    log(f"installed PostgreSQL in {time.monotonic() - t0:.0f}s ({found})")
    return found


@dataclass(frozen=True)
class Cluster:
    root: Path  # <home>/serve/postgres
    bin: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        return self.root / "postgres.log"

    @property
    def password_file(self) -> Path:
        return self.root.parent / "postgres.password"

    @property
    def run_as(self) -> str | None:
        """The system user the server runs as when we are root (it refuses root), else None (ourselves)."""
        return RUN_AS if os.geteuid() == 0 else None

    def _cmd(self, tool: str, *args: str) -> list[str]:
        cmd = [str(self.bin / tool), *args]
        return ["runuser", "-u", self.run_as, "--", *cmd] if self.run_as else cmd

    def _run(self, tool: str, *args: str, timeout: float = 300) -> str:
        res = subprocess.run(self._cmd(tool, *args), capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(
                f"{tool} failed (exit {res.returncode}): {' '.join(self._cmd(tool, *args))}\n"
                f"{res.stdout[-2000:]}{res.stderr[-2000:]}"
                + (f"\n(server log: {self.log_file})" if self.log_file.exists() else "")
            )
        return res.stdout + res.stderr

    def password(self) -> str:
        return self.password_file.read_text().strip()

    def _prepare_root(self) -> None:
        """The cluster's directory, owned by the user the server runs as, reachable by that user."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.run_as is None:
            return
        try:
            user = pwd.getpwnam(self.run_as)
        except KeyError:
            raise PostgresUnavailable(
                f"running as root, and there is no `{self.run_as}` system user to run PostgreSQL as "
                "(PostgreSQL refuses to run as root; Debian's postgresql package creates that user)"
            ) from None
        os.chown(self.root, user.pw_uid, user.pw_gid)
        os.chmod(self.root, 0o755)
        probe = subprocess.run(["runuser", "-u", self.run_as, "--", "test", "-w", str(self.root)])
        if probe.returncode != 0:
            blocked = next(
                (p for p in [*reversed(self.root.parents)] if p.is_dir() and not (p.stat().st_mode & 0o001)),
                None,
            )
            raise PostgresUnavailable(
                f"PostgreSQL runs as the `{self.run_as}` user (it refuses root), which cannot reach {self.root}"
                + (f": {blocked} is not searchable by other users (chmod o+x {blocked})" if blocked else "")
                + "; or choose a csmf home under a directory other users can enter (--home / $CSMF_HOME)"
            )

    def initialized(self) -> bool:
        return (self.data / "PG_VERSION").is_file()

    def init(self) -> None:
        """initdb with superuser `csmf` and a new random password (scram-sha-256 for every connection)."""
        self._prepare_root()
        if self.initialized():
            if not self.password_file.is_file():
                raise RuntimeError(
                    f"{self.data} exists but its password file {self.password_file} is missing: restore it, "
                    f"or remove {self.data} to start with an empty database"
                )
            return
        password = secrets.token_urlsafe(24)
        fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        # initdb reads the password from a file the server's user can read; removed right after
        pwfile = self.root / ".initdb-password"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        if self.run_as:
            user = pwd.getpwnam(self.run_as)
            os.chown(pwfile, user.pw_uid, user.pw_gid)
        try:
            self._run(
                "initdb", "-D", str(self.data), "-U", PG_USER, "--auth=scram-sha-256", f"--pwfile={pwfile}",
                "-E", "UTF8", "--no-locale", "--no-sync",
            )  # fmt: skip
        finally:
            pwfile.unlink(missing_ok=True)

    def socket_dir(self) -> str:
        """The unix socket's directory (the cluster's root), or '' (TCP only) when the path is too long."""
        return str(self.root) if len(str(self.root)) <= SOCKET_PATH_MAX - len("/.s.PGSQL.65535") else ""

    def start(self, port: int, timeout: int = 120) -> dict:
        """initdb when needed, then `pg_ctl start` on 127.0.0.1:port; returns the postmaster's pid."""
        self.init()
        self._check_not_running()
        opts = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories='{self.socket_dir()}'"
        self._run(
            "pg_ctl", "start", "-D", str(self.data), "-l", str(self.log_file), "-w", "-t", str(timeout), "-o", opts,
            timeout=timeout + 30,
        )  # fmt: skip
        pid = self.postmaster_pid()
        if pid is None:
            raise RuntimeError(f"pg_ctl start returned but {self.data / 'postmaster.pid'} is missing")
        return {"pid": pid}

    def _check_not_running(self) -> None:
        pid = self.postmaster_pid()
        if pid is not None:
            import psutil

            if psutil.pid_exists(pid) and "postgres" in " ".join(_cmdline(pid)):
                raise RuntimeError(
                    f"a PostgreSQL server (pid {pid}) already runs on {self.data}, not recorded by this stack: "
                    f"stop it (pg_ctl stop -D {self.data}) first"
                )

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def stop(self, timeout: int = 60) -> None:
        """`pg_ctl stop -m fast` (rolls back open transactions, closes connections, checkpoints)."""
        self._run(
            "pg_ctl",
            "stop",
            "-D",
            str(self.data),
            "-m",
            "fast",
            "-w",
            "-t",
            str(timeout),
            timeout=timeout + 30,
        )

    def url(self, port: int, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://{PG_USER}:{quote(self.password(), safe='')}@127.0.0.1:{port}/{database}"

    def create_database(self, port: int, name: str) -> bool:
        """CREATE DATABASE name (owner csmf) unless it exists; True when created."""
        import psycopg2

        conn = psycopg2.connect(
            host="127.0.0.1",
            port=port,
            user=PG_USER,
            password=self.password(),
            dbname="postgres",
            connect_timeout=30,
        )
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone():
                    return False
                cur.execute(f'CREATE DATABASE "{name}" OWNER {PG_USER}')
                return True
        finally:
            conn.close()


def _cmdline(pid: int) -> list[str]:
    import psutil

    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return []
