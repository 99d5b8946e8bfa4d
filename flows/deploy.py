"""A persistent local Prefect stack for the csmf deployments: server, work pool, deployments, worker.

    python -m flows.deploy up   [--home DIR] [--port 4200] [--data DIR] [--config FILE]   # make serve
    python -m flows.deploy status [--home DIR]
    python -m flows.deploy down [--home DIR]                                           # make stop

`up` starts, all on 127.0.0.1 and all state under the home (default $CSMF_HOME or ./.csmf):

1. `prefect server start` (PREFECT_HOME=<home>/prefect-server: its SQLite database, so scheduled
   and past runs survive a restart), and waits until /api/health answers;
2. the process work pool (default `csmf-process`) whose base job template sets the flow runs'
   environment: CSMF_HOME, MLFLOW_TRACKING_URI, OMP_NUM_THREADS, PREFECT_SERVER_ANALYTICS_ENABLED,
   MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR;
3. `prefect deploy --all` with prefect.yaml (deployments `csmf-daily/daily`, cron 03:00 UTC, and
   `csmf-daily/adhoc`), from the project root so the worker runs this checkout;
4. `prefect worker start --pool csmf-process`.

Processes 1 and 4 run in their own sessions; their pids, start times and commands go to
`<home>/serve/state.json` and their logs to `<home>/serve/*.log`. `down` stops exactly those
processes (it checks each pid's start time against the recorded one before signalling its process
group, so a recycled pid is never touched) and removes the state file. `up` refuses to start a
second stack on the same home while the recorded one is alive.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

from csmf_core.fsutil import is_uri
from flows.env import resolve_home
from flows.lock import process_alive, stop_process_group

PROJECT = Path(__file__).resolve().parents[1]
DEFAULT_PORT = 4200
DEFAULT_POOL = "csmf-process"
STATE = "state.json"


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


def job_env(home: Path, threads: str | None = None) -> dict[str, str]:
    """The environment of every flow run (pool base job template and prefect.yaml job_variables)."""
    return {
        "CSMF_HOME": str(home),
        "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow.db'}",
        "OMP_NUM_THREADS": threads or os.environ.get("OMP_NUM_THREADS") or "2",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # as flows.env.home_defaults: no tqdm bars in logs
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
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


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


def pool_template(home: Path) -> dict:
    """The process worker's default base job template with our environment as the default `env`."""
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    template["variables"]["properties"]["env"]["default"] = job_env(home)
    return template


def up(
    home: str | os.PathLike | None = None,
    *,
    port: int = DEFAULT_PORT,
    pool: str = DEFAULT_POOL,
    data: str | os.PathLike | None = None,
    config: str | os.PathLike | None = None,
    timeout: float = 120.0,
) -> dict:
    """Start the stack (module docstring); returns the recorded state. Stops what it started on failure."""
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
    state = {"home": str(root), "api_url": stack.api_url, "port": stack.port, "pool": pool, "processes": {}}
    try:
        server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
        state["processes"]["server"] = _spawn(
            "server",
            [*_prefect(), "server", "start", "--host", "127.0.0.1", "--port", str(stack.port)],
            server_env,
            stack,
        )
        _write(stack, state)
        deadline = time.monotonic() + timeout
        while not _healthy(stack.api_url):
            if not _alive(state["processes"]["server"]) or time.monotonic() > deadline:
                raise RuntimeError(
                    f"Prefect server did not become healthy on {stack.api_url}; see {stack.dir / 'server.log'}"
                )
            time.sleep(0.5)
        template = stack.dir / "pool-template.json"
        template.write_text(json.dumps(pool_template(root), indent=1))
        _run(
            [*_prefect(), "work-pool", "create", pool, "--type", "process", "--base-job-template", str(template), "--overwrite"],
            env,
            stack,
            "creating the work pool",
        )  # fmt: skip
        deploy_env = (
            env | job_env(root) | {"CSMF_DATA": str(data_dir), "CSMF_CONFIG": str(cfg), "CSMF_POOL": pool}
        )
        _run([*_prefect(), "--no-prompt", "deploy", "--all"], deploy_env, stack, "prefect deploy --all")
        worker_env = env | {
            "PREFECT_WORKER_QUERY_SECONDS": os.environ.get("PREFECT_WORKER_QUERY_SECONDS", "5")
        }
        state["processes"]["worker"] = _spawn(
            "worker", [*_prefect(), "worker", "start", "--pool", pool, "--type", "process"], worker_env, stack
        )
        _write(stack, state)
        time.sleep(1.0)
        if not _alive(state["processes"]["worker"]):
            raise RuntimeError(f"the worker exited at start; see {stack.dir / 'worker.log'}")
    except BaseException:
        down(root)
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
    """Stop the processes `up` recorded (worker first), nothing else; returns what was stopped."""
    root = resolve_home(home)
    state = read_state(root)
    if not state:
        return []
    stopped = []
    for name in ("worker", "server"):
        entry = state["processes"].get(name)
        if entry and _alive(entry):
            _stop(entry, timeout)
            stopped.append(f"{name} (pid {entry['pid']})")
    (root / "serve" / STATE).unlink(missing_ok=True)
    return stopped


def _stop(entry: dict, timeout: float) -> None:
    """SIGTERM to the process group (the process and the children it spawned), SIGKILL after timeout."""
    stop_process_group(entry["pid"], timeout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--home", help="state directory (default: $CSMF_HOME or ./.csmf)")
    p.add_argument("--port", type=int, default=int(os.environ.get("CSMF_PREFECT_PORT", DEFAULT_PORT)))
    p.add_argument("--pool", default=os.environ.get("CSMF_POOL", DEFAULT_POOL))
    p.add_argument("--data", default=os.environ.get("CSMF_DATA"), help="dataset of the deployments")
    p.add_argument("--config", default=os.environ.get("CSMF_CONFIG"), help="YAML config of the deployments")
    args = p.parse_args(argv)
    root = resolve_home(args.home)
    if args.action == "up":
        state = up(root, port=args.port, pool=args.pool, data=args.data, config=args.config)
        ui = state["api_url"].removesuffix("/api")
        print(
            f"Prefect server {ui} (UI), work pool {state['pool']}, worker running; state in {root / 'serve'}\n"
            f"  export PREFECT_API_URL={state['api_url']}\n"
            "  prefect deployment run 'csmf-daily/daily' --param date=YYYY-MM-DD\n"
            f"  csmf ui --home {root}      # MLflow UI on http://127.0.0.1:5000\n"
            "  make stop                  # stops exactly these processes"
        )
    elif args.action == "down":
        stopped = down(root)
        print("stopped " + ", ".join(stopped) if stopped else f"nothing recorded as running for {root}")
    else:
        state = read_state(root)
        if not state:
            print(f"no csmf Prefect stack recorded for {root}")
            return 1
        for name, entry in state["processes"].items():
            print(f"{name}: pid {entry['pid']} {'running' if _alive(entry) else 'not running'}")
        print(f"api: {state['api_url']} ({'healthy' if _healthy(state['api_url']) else 'not answering'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
