"""A persistent local Prefect stack for the csmf deployments: server, work pool, deployments, worker.

    python -m flows.deploy up   [--home DIR] [--port 4200] [--data DIR] [--config FILE]   # make serve
                                [--backend postgres [--mlflow-port 5000] [--pg-port 0]]  # make serve BACKEND=postgres
    python -m flows.deploy status [--home DIR]
    python -m flows.deploy down [--home DIR]                                           # make stop

`up` starts, all on 127.0.0.1 and all state under the home (default $CSMF_HOME or ./.csmf):

0. with `--backend postgres` only: PostgreSQL (flows/postgres.py: Debian's package, installed with
   apt-get when missing; the cluster in <home>/serve/postgres, on a free port or --pg-port, databases
   `mlflow` and `prefect`), then `mlflow server` on it (backend store
   postgresql+psycopg2://.../mlflow, artifacts served from <home>/mlflow-server/artifacts, on
   --mlflow-port), waiting until its /health answers;
1. `prefect server start` (PREFECT_HOME=<home>/prefect-server; its database is SQLite there, or with
   `--backend postgres` PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://.../prefect, so
   scheduled and past runs survive a restart), and waits until /api/health answers;
2. the process work pool (default `csmf-process`) whose base job template sets the flow runs'
   environment: CSMF_HOME, MLFLOW_TRACKING_URI (sqlite:///<home>/mlflow.db, or the MLflow server's
   http://127.0.0.1:<mlflow-port>), OMP_NUM_THREADS, PREFECT_SERVER_ANALYTICS_ENABLED,
   MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR, PREFECT_FLOWS_HEARTBEAT_FREQUENCY (also in the worker's own
   environment, which reaches the deployments' runs);
3. the zombie flow-run automation (flows/automations.py: a run with no heartbeat or state change for
   three heartbeats, 540 s at the default 180 s, is set Crashed), then `prefect deploy --all` with prefect.yaml (deployments `csmf-daily/daily`, cron 03:00 UTC, and
   `csmf-daily/adhoc`), from the project root so the worker runs this checkout;
4. `prefect worker start --pool csmf-process`.

The MLflow and Prefect servers and the worker run in their own sessions; their pids, start times and
commands go to `<home>/serve/state.json` and their logs to `<home>/serve/*.log`; PostgreSQL's
postmaster pid is recorded there too. `down` stops exactly those processes, in reverse order (it
checks each pid's start time against the recorded one before signalling its process group, so a
recycled pid is never touched; PostgreSQL with `pg_ctl stop -m fast`) and removes the state file.
`up` refuses to start a second stack on the same home while the recorded one is alive. The database
passwords are never on a command line: the servers get their store URLs from the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from csmf_core.fsutil import is_uri
from flows.automations import HEARTBEAT_VARS, heartbeat_seconds
from flows.env import free_port, resolve_home
from flows.local_api import _healthy as url_answers
from flows.lock import process_alive, stop_process_group

PROJECT = Path(__file__).resolve().parents[1]
DEFAULT_PORT = 4200
DEFAULT_MLFLOW_PORT = 5000
DEFAULT_POOL = "csmf-process"
BACKENDS = ("sqlite", "postgres")
STATE = "state.json"
STOP_ORDER = ("worker", "server", "mlflow", "postgres")  # the reverse of the start order


@dataclass(frozen=True)
class Stack:
    home: Path
    port: int
    pool: str

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def dir(self) -> Path:
        return self.home / "serve"


def _prefect() -> list[str]:
    return [sys.executable, "-m", "prefect"]


def job_env(home: Path, threads: str | None = None, tracking_uri: str | None = None) -> dict[str, str]:
    """The environment of every flow run (pool base job template and prefect.yaml job_variables):
    MLFLOW_TRACKING_URI is `tracking_uri` (the stack's MLflow server), else $MLFLOW_TRACKING_URI, else
    the home's SQLite file; PREFECT_FLOWS_HEARTBEAT_FREQUENCY the one the zombie automation counts on
    (flows/automations.py: $PREFECT_FLOWS_HEARTBEAT_FREQUENCY, else prefect's 180 s)."""
    return {
        "CSMF_HOME": str(home),
        "MLFLOW_TRACKING_URI": tracking_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{home / 'mlflow.db'}",
        "OMP_NUM_THREADS": threads or os.environ.get("OMP_NUM_THREADS") or "2",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # as flows.env.home_defaults: no tqdm bars in logs
        HEARTBEAT_VARS[0]: str(heartbeat_seconds()),
    }


def _base_env(stack: Stack) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {
        "PREFECT_HOME": str(stack.home / "prefect-server"),
        "PREFECT_API_URL": stack.api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # the venv's bin first: subprocesses that exec tools by name find the pinned ones
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    }
    return env


def _spawn(name: str, cmd: list[str], env: dict[str, str], stack: Stack) -> dict:
    log = (stack.dir / f"{name}.log").open("ab")
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=PROJECT, start_new_session=True
    )
    log.close()
    return {"pid": proc.pid, "create_time": psutil.Process(proc.pid).create_time(), "cmd": cmd}


def _run(cmd: list[str], env: dict[str, str], stack: Stack, what: str) -> str:
    res = subprocess.run(cmd, env=env, cwd=PROJECT, capture_output=True, text=True, timeout=300)
    with (stack.dir / "setup.log").open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n{res.stdout}{res.stderr}\n")
    if res.returncode != 0:
        raise RuntimeError(
            f"{what} failed (exit {res.returncode}): {' '.join(cmd)}\n{res.stdout[-2000:]}{res.stderr[-2000:]}"
        )
    return res.stdout


def _healthy(url: str) -> bool:
    """Whether the server at base `url` (Prefect's /api or MLflow's root) answers `<url>/health`."""
    return url_answers(f"{url}/health")


def _wait_healthy(url: str, entry: dict, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not _healthy(url):
        if not _alive(entry):
            raise RuntimeError(f"{what} exited at start; see {log}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not become healthy on {url} within {timeout:.0f}s; see {log}")
        time.sleep(0.5)


def _alive(entry: dict) -> bool:
    return process_alive(entry["pid"], entry["create_time"])


def running_api(home: Path) -> str | None:
    """The API URL of this home's `make serve` stack when its server is alive and healthy, else None
    (`csmf run` sends its flow run there, so it shows in that persistent UI)."""
    state = read_state(home)
    if not state or not state.get("api_url"):
        return None
    server = (state.get("processes") or {}).get("server")
    if server is not None and not _alive(server):
        return None
    return state["api_url"] if _healthy(state["api_url"]) else None


def read_state(home: Path) -> dict | None:
    path = home / "serve" / STATE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def pool_template(home: Path, tracking_uri: str | None = None) -> dict:
    """The process worker's default base job template with our environment as the default `env`."""
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    template["variables"]["properties"]["env"]["default"] = job_env(home, tracking_uri=tracking_uri)
    return template


def _start_postgres(stack: Stack, state: dict, pg_port: int, log) -> tuple[str, str]:
    """PostgreSQL with databases `mlflow` and `prefect`; returns their SQLAlchemy URLs (MLflow's
    psycopg2 one, Prefect's asyncpg one). Records the postmaster in `state` as soon as it runs."""
    from flows import postgres

    cluster = postgres.Cluster(stack.dir / "postgres", postgres.ensure_binaries(log))
    port = pg_port or free_port()
    started = cluster.start(port)
    state["processes"]["postgres"] = {
        "pid": started["pid"],
        "create_time": psutil.Process(started["pid"]).create_time(),
        "cmd": ["pg_ctl", "start", "-D", str(cluster.data)],
        "data": str(cluster.data),
        "bin": str(cluster.bin),
    }
    state["postgres"] = {
        "port": port,
        "data": str(cluster.data),
        "socket_dir": cluster.socket_dir() or None,
        "user": postgres.PG_USER,
        "password_file": str(cluster.password_file),
        "databases": ["mlflow", "prefect"],
    }
    _write(stack, state)
    for db in ("mlflow", "prefect"):
        cluster.create_database(port, db)
    return cluster.url(port, "mlflow", "postgresql+psycopg2"), cluster.url(
        port, "prefect", "postgresql+asyncpg"
    )


def _start_mlflow(stack: Stack, state: dict, env: dict, store: str, port: int) -> str:
    """`mlflow server` on the PostgreSQL store, serving the artifacts of <home>/mlflow-server/artifacts
    (experiments created through it get mlflow-artifacts:/ locations); returns its URL. Does not wait:
    its first start (the schema migrations) overlaps the Prefect server's."""
    artifacts = stack.home / "mlflow-server" / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    mlflow_env = env | {
        "MLFLOW_BACKEND_STORE_URI": store,  # not on the command line: it holds the password
        # the GenAI job runner (huey consumers) is not used by csmf: on a 2-core machine it only costs
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--artifacts-destination", str(artifacts), "--serve-artifacts",
        "--host", "127.0.0.1", "--port", str(port), "--workers", os.environ.get("CSMF_MLFLOW_WORKERS", "1"),
    ]  # fmt: skip
    state["processes"]["mlflow"] = _spawn("mlflow", cmd, mlflow_env, stack)
    state["mlflow_uri"] = url
    _write(stack, state)
    return url


def up(
    home: str | os.PathLike | None = None,
    *,
    port: int = DEFAULT_PORT,
    pool: str = DEFAULT_POOL,
    data: str | os.PathLike | None = None,
    config: str | os.PathLike | None = None,
    backend: str = "sqlite",
    mlflow_port: int = DEFAULT_MLFLOW_PORT,
    pg_port: int = 0,
    timeout: float = 120.0,
    log=print,
) -> dict:
    """Start the stack (module docstring); returns the recorded state. Stops what it started on failure.

    backend "sqlite": the Prefect server on SQLite, the flows on MLflow's SQLite file (no MLflow
    server). "postgres": PostgreSQL, an MLflow server and the Prefect server on it (pg_port 0 = a
    free port)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    # a bad $PREFECT_FLOWS_HEARTBEAT_FREQUENCY fails here, before anything starts
    heartbeat = str(heartbeat_seconds())
    root = resolve_home(home)
    stack = Stack(root, int(port), pool)
    stack.dir.mkdir(parents=True, exist_ok=True)
    old = read_state(root)
    if old and any(_alive(e) for e in old["processes"].values()):
        raise RuntimeError(
            f"a csmf Prefect stack for {root} is already running ({old['api_url']}); `make stop` first"
        )
    data_dir = (
        data if is_uri(data) else Path(data).resolve() if data else _default_data(root)
    )  # URIs as given
    cfg = Path(config).resolve() if config else PROJECT / "configs" / "default.yaml"
    env = _base_env(stack)
    state = {
        "home": str(root),
        "backend": backend,
        "api_url": stack.api_url,
        "port": stack.port,
        "pool": pool,
        "mlflow_uri": None,
        "processes": {},
    }
    try:
        server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
        tracking = None
        if backend == "postgres":
            mlflow_store, prefect_db = _start_postgres(stack, state, int(pg_port), log)
            tracking = _start_mlflow(stack, state, env, mlflow_store, int(mlflow_port))
            server_env["PREFECT_API_DATABASE_CONNECTION_URL"] = prefect_db
        else:
            state["mlflow_uri"] = job_env(root)["MLFLOW_TRACKING_URI"]
        state["processes"]["server"] = _spawn(
            "server",
            [*_prefect(), "server", "start", "--host", "127.0.0.1", "--port", str(stack.port)],
            server_env,
            stack,
        )
        _write(stack, state)
        _wait_healthy(
            stack.api_url,
            state["processes"]["server"],
            timeout,
            "the Prefect server",
            stack.dir / "server.log",
        )
        if tracking:
            _wait_healthy(
                tracking, state["processes"]["mlflow"], timeout, "the MLflow server", stack.dir / "mlflow.log"
            )
        template = stack.dir / "pool-template.json"
        template.write_text(json.dumps(pool_template(root, tracking), indent=1))
        _run(
            [*_prefect(), "work-pool", "create", pool, "--type", "process", "--base-job-template", str(template), "--overwrite"],
            env,
            stack,
            "creating the work pool",
        )  # fmt: skip
        deploy_env = (
            env
            | job_env(root, tracking_uri=tracking)
            | {"CSMF_DATA": str(data_dir), "CSMF_CONFIG": str(cfg), "CSMF_POOL": pool}
        )
        # a run whose process dies is marked Crashed after 3 missed heartbeats (flows/automations.py)
        log(
            _run(
                [sys.executable, "-m", "flows.automations", "--heartbeat", heartbeat],
                env,
                stack,
                "creating the zombie flow-run automation",
            ).strip()
        )
        _run([*_prefect(), "--no-prompt", "deploy", "--all"], deploy_env, stack, "prefect deploy --all")
        worker_env = env | {
            "PREFECT_WORKER_QUERY_SECONDS": os.environ.get("PREFECT_WORKER_QUERY_SECONDS", "5"),
            # the process worker passes its environment to the flow runs (the deployments' env has no
            # heartbeat: prefect.yaml), so every run heartbeats as the zombie automation expects
            HEARTBEAT_VARS[0]: heartbeat,
        }
        state["processes"]["worker"] = _spawn(
            "worker", [*_prefect(), "worker", "start", "--pool", pool, "--type", "process"], worker_env, stack
        )
        _write(stack, state)
        time.sleep(1.0)
        if not _alive(state["processes"]["worker"]):
            raise RuntimeError(f"the worker exited at start; see {stack.dir / 'worker.log'}")
    except BaseException as exc:
        try:
            down(root)
        except RuntimeError as stop_error:
            exc.add_note(f"and stopping what had started failed: {stop_error}")
        raise
    return state


def _default_data(home: Path) -> Path:
    """<home>/data/synth-small, generated once (the dataset `csmf run` uses without --data)."""
    out = home / "data" / "synth-small"
    if not (out / "dataset.yaml").is_file():
        from csmf_core.synth import generate

        print(f"generating the small synthetic dataset in {out} (once)", flush=True)
        generate(out, "small", seed=0, overwrite=True)
    return out


def _write(stack: Stack, state: dict) -> None:
    tmp = stack.dir / f"{STATE}.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, stack.dir / STATE)


def down(home: str | os.PathLike | None = None, *, timeout: float = 30.0) -> list[str]:
    """Stop the processes `up` recorded (worker first, PostgreSQL last), nothing else; returns what
    was stopped. Raises (keeping the state file) when a recorded process is still alive afterwards."""
    root = resolve_home(home)
    state = read_state(root)
    if not state:
        return []
    stopped, failed = [], []
    names = [n for n in STOP_ORDER if n in state["processes"]]
    names += [n for n in state["processes"] if n not in names]
    for name in names:
        entry = state["processes"][name]
        if not _alive(entry):
            continue
        try:
            _stop(name, entry, timeout)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            failed.append(f"{name} (pid {entry['pid']}): {exc}")
            continue
        if _alive(entry):
            failed.append(f"{name} (pid {entry['pid']}) still runs")
        else:
            stopped.append(f"{name} (pid {entry['pid']})")
    if failed:
        raise RuntimeError(f"could not stop {'; '.join(failed)} (stopped: {', '.join(stopped) or 'nothing'})")
    (root / "serve" / STATE).unlink(missing_ok=True)
    return stopped


def _stop(name: str, entry: dict, timeout: float) -> None:
    """PostgreSQL: `pg_ctl stop -m fast`, then SIGINT (its own fast shutdown) and at last SIGKILL to
    the recorded postmaster if it still runs (pg_ctl failed, or timed out). The others: SIGTERM to
    the process group (the process and the children it spawned), SIGKILL after timeout."""
    if name != "postgres":
        stop_process_group(entry["pid"], timeout)
        return
    from flows.postgres import Cluster

    try:
        Cluster(Path(entry["data"]).parent, Path(entry["bin"])).stop(int(timeout * 2))
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        print(f"pg_ctl stop failed ({exc}); signalling the postmaster (pid {entry['pid']})", file=sys.stderr)
    if _alive(entry):
        proc = psutil.Process(entry["pid"])
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except psutil.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--home", help="state directory (default: $CSMF_HOME or ./.csmf)")
    p.add_argument("--port", type=int, default=int(os.environ.get("CSMF_PREFECT_PORT", DEFAULT_PORT)))
    p.add_argument("--pool", default=os.environ.get("CSMF_POOL", DEFAULT_POOL))
    p.add_argument("--data", default=os.environ.get("CSMF_DATA"), help="dataset of the deployments")
    p.add_argument("--config", default=os.environ.get("CSMF_CONFIG"), help="YAML config of the deployments")
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default=os.environ.get("CSMF_BACKEND") or "sqlite",
        help="sqlite (default): Prefect on SQLite, flows on MLflow's SQLite file; postgres: PostgreSQL, "
        "an MLflow server and the Prefect server on it",
    )
    p.add_argument(
        "--mlflow-port",
        type=int,
        default=int(os.environ.get("CSMF_MLFLOW_PORT", DEFAULT_MLFLOW_PORT)),
        help="the MLflow server's port (--backend postgres)",
    )
    p.add_argument(
        "--pg-port",
        type=int,
        default=int(os.environ.get("CSMF_PG_PORT", 0)),
        help="PostgreSQL's port (--backend postgres; default 0: a free port)",
    )
    args = p.parse_args(argv)
    root = resolve_home(args.home)
    if args.action == "up":
        state = up(
            root,
            port=args.port,
            pool=args.pool,
            data=args.data,
            config=args.config,
            backend=args.backend,
            mlflow_port=args.mlflow_port,
            pg_port=args.pg_port,
        )
        ui = state["api_url"].removesuffix("/api")
        lines = [
            f"Prefect server {ui} (UI), work pool {state['pool']}, worker running; state in {root / 'serve'}",
            f"  export PREFECT_API_URL={state['api_url']}",
            "  prefect deployment run 'csmf-daily/daily' --param date=YYYY-MM-DD",
        ]
        if state["backend"] == "postgres":
            pg = state["postgres"]
            lines[0] = (
                f"PostgreSQL on 127.0.0.1:{pg['port']} (data {pg['data']}), MLflow server {state['mlflow_uri']} "
                f"(UI), Prefect server {ui} (UI) on it, work pool {state['pool']}, worker running; "
                f"state in {root / 'serve'}"
            )
            lines.append(f"  export MLFLOW_TRACKING_URI={state['mlflow_uri']}   # csmf recommend, mlflow CLI")
        else:
            lines.append(f"  csmf ui --home {root}      # MLflow UI on http://127.0.0.1:5000")
        default = resolve_home(None) == root and not os.environ.get("CSMF_HOME")
        stop = "make stop" if default else f"CSMF_HOME={root} make stop"
        lines.append(f"  {stop}                  # stops exactly these processes")
        print("\n".join(lines))
    elif args.action == "down":
        stopped = down(root)
        print(
            "stopped " + ", ".join(stopped)
            if stopped
            else f"nothing recorded as running for {root} (a stack started with another home: "
            "CSMF_HOME=<that home> make stop, or --home)"
        )
    else:
        state = read_state(root)
        if not state:
            print(f"no csmf Prefect stack recorded for {root}")
            return 1
        for name, entry in state["processes"].items():
            print(f"{name}: pid {entry['pid']} {'running' if _alive(entry) else 'not running'}")
        print(f"api: {state['api_url']} ({'healthy' if _healthy(state['api_url']) else 'not answering'})")
        if state.get("backend") == "postgres":
            mlflow_uri = state["mlflow_uri"]
            print(f"mlflow: {mlflow_uri} ({'healthy' if _healthy(mlflow_uri) else 'not answering'})")
            print(f"postgres: 127.0.0.1:{state['postgres']['port']}, data {state['postgres']['data']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
