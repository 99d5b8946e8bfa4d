"""Benchmark 4 (orchestration overhead): `csmf run` (Prefect flow `csmf-daily` + MLflow) vs the same stage functions called directly.

How to run:  .venv/bin/python bench/bench_orchestration.py [--rounds 1] [--overrides train.epochs=[4,8,16]] [--quick]
             [--arms embedded server direct]

Three arms, each in its own child process (Prefect reads its settings at import), each timed from the
child's first line to the end of its work, imports included (what a user waits for):

* embedded: `csmf run --data <small> --home <fresh dir> --tuned none` through `flows.cli.main`, no
  PREFECT_API_URL: the default `make run` (Prefect's temporary local API, launched by `csmf run`
  before its imports, flows/local_api.py; MLflow parent/child runs with metrics, artifacts
  (checkpoints, masks, index), the registry pyfunc, the gate, retention).
* server: the same command with PREFECT_API_URL set to a persistent `prefect server start` that the
  bench starts (own PREFECT_HOME, waited for until /api/health answers, then asked its version once
  as any client would have before: a fresh server's first request sets it up) and stops at the end: the
  flow run of a deployment against a running server, without the worker's polling and process
  start (scheduling latency, not orchestration of the run).
* direct: the same csmf_core work with no Prefect and no MLflow, as lean as the library allows:
  validate -> prepare -> the selection pass on the validation days and the refit config (the
  flow's `select`) -> load once -> every cascade step in memory with the same per-step
  validation -> final checkpoint -> serving bundle (flat index) -> final evaluation (every scorer
  and the model-minus-popularity gaps, ranked once, as the flow's `evaluate` computes them; the
  gaps since 2026-12-06, ~0.1 s: before, their bootstrap was counted as orchestration).

Overhead of a flow arm, the target line (<= 10% for each flow arm), per round then the median:
((arm - C_arm) - (direct - C_direct)) / arm, where C is the seconds a child spent inside the training
calls both arms make (`csmf_core.tuning.run_trial`, the selection pass, and
`csmf_core.cascade.run_step`, each cascade step; outermost calls only, less the time in their
`on_step` / `on_begin` callbacks, which log to MLflow and draw progress in the flow arms): the same
work in expectation, whose run-to-run noise (+-15% of ~65 s on the 2-core VM) dwarfs the overhead, so
it is taken out of both sides. The plain wall-clock difference (arm - direct) / arm is printed beside
it, no target.
Each flow round uses a fresh csmf home so nothing is resumed from an earlier run (the MLflow
database is created in the round, as on a first run); the temporary API's PREFECT_HOME is kept
across rounds under the bench work dir (its database migrated once), as a user's home keeps it.
The embedded arm also reports how long `csmf run` still waited for the temporary API after its own
work before the flow (`TemporaryApi.wait`; 0 when the server was up first).
"""

from __future__ import annotations

import time

T_START = time.perf_counter()  # a child's clock: before any import of its arm (benchlib imports torch)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _benchlib():
    """bench/benchlib.py, imported by the parent only (it imports torch: a child's clock would miss it)."""
    try:
        from bench import benchlib
    except ImportError:  # run as `python bench/bench_orchestration.py`
        import benchlib  # type: ignore[no-redef]
    return benchlib


def direct(data: str, work: Path, overrides: list[str]) -> dict:
    """The flow's work without Prefect or MLflow; returns seconds per phase."""
    from csmf_core.cascade import build_model, load_cascade_data, plan, run_step
    from csmf_core.checkpoint import save_checkpoint
    from csmf_core.config import load_config
    from csmf_core.evaluate import Ranked, evaluate_model, popularity_gaps
    from csmf_core.prep import prepare
    from csmf_core.serving import write_bundle
    from csmf_core.tuning import refit_config, run_trial, trial_config
    from data_contracts import validate_dataset
    from flows.inputs import plan_window  # pure date arithmetic, no Prefect/MLflow

    t = {"start": time.perf_counter()}
    cfg = load_config(None, overrides)
    window = plan_window(data, None, cfg.data)
    validate_dataset(data, dates=window.validate_dates).raise_if_errors()
    mr = prepare(data, work / "model_ready", train_dates=window.train_dates, eval_dates=window.eval_dates,
                 seq_len=cfg.data.seq_len, n_req_neg=cfg.data.n_req_neg, overwrite=True).out_dir  # fmt: skip
    t["ingest"] = time.perf_counter()
    # the flow's `select` task (flows/epoch_selection.py, default path): a selection pass on the
    # validation days, then the refit config (epochs kept, fused weights chosen there)
    cd = load_cascade_data(mr, val_days=cfg.data.val_days, item_stats_windows=cfg.data.item_stats)
    if cd.val_days and cfg.data.val_refit:
        cfg = refit_config(cfg, run_trial(cd, trial_config(cfg, {"data.val_days": cd.val_days})))
    else:
        cfg = trial_config(cfg, {"data.val_days": cd.val_days})
    t["select"] = time.perf_counter()
    cd = load_cascade_data(mr, item_stats_windows=cfg.data.item_stats)
    model, owners = build_model(cd, cfg)
    for step in plan(cd.objectives, cfg):
        owners, _ = run_step(step, model, owners, cd, cfg)
        evaluate_model(model, owners.output_owners(), cd.catalog_tables("eval"), cd.eval.head(cfg.eval.max_users), cd.objectives,
                       ks=cfg.eval.ks, objectives_upto=step.stage, scorers="own")  # fmt: skip
    t["cascade"] = time.perf_counter()
    ckpt = save_checkpoint(work / "checkpoint", model, owners)
    write_bundle(work / "bundle", checkpoint_dir=ckpt, model_ready_dir=mr, dataset_dir=data, config=cfg,
                 index_kind="flat", overwrite=True)  # fmt: skip
    # the flow's `evaluate`: every scorer, then the model-minus-popularity gaps, ranked once for both
    out, tables, ev = owners.output_owners(), cd.catalog_tables("eval"), cd.eval.head(cfg.eval.max_users)
    ranked = Ranked(model, out, tables, ev)
    evaluate_model(model, out, tables, ev, cd.objectives, ks=cfg.eval.ks, scorers="all",
                   fused_weights=cfg.eval.fused_weights, popularity=cd.counts, random_seed=0, ranked=ranked)  # fmt: skip
    popularity_gaps(model, out, tables, ev, cd.objectives, cd.counts, cfg.eval.fused_weights, cfg.eval.primary_k,
                    ranked=ranked)  # fmt: skip
    t["end"] = time.perf_counter()
    return {
        "ingest": t["ingest"] - t["start"],
        "select": t["select"] - t["ingest"],
        "cascade": t["cascade"] - t["select"],
        "final": t["end"] - t["cascade"],
    }


WARM_UP = (
    "import csmf_core.cascade, data_contracts, flows.pipeline, flows.tune, prefect.server.api.server, uvicorn"
)
FLOW_ARMS = ("embedded", "server")
ARMS = (*FLOW_ARMS, "direct")


def csmf_run(data: str, work: Path, overrides: list[str]) -> dict:
    """`csmf run` as a user types it (fresh home, given data, no tuned config); returns what it waited
    for Prefect's temporary API (embedded arm) and the model version."""
    from flows import cli, local_api

    waited = []
    wait = local_api.TemporaryApi.wait

    def timed_wait(self, timeout=None):
        try:
            return wait(self, timeout)
        finally:
            waited.append(self.seconds_waited)

    local_api.TemporaryApi.wait = timed_wait  # type: ignore[method-assign]
    out = work / "result.json"
    args = ["run", "--data", data, "--home", str(work / "home"), "--tuned", "none", "--json-out", str(out)]
    code = cli.main([*args, *(x for o in overrides for x in ("--set", o))])
    if code != 0:
        raise RuntimeError(f"csmf run exited {code}")
    return {"api_wait": sum(waited), "model_version": json.loads(out.read_text()).get("model_version")}


def after_import(wrap: dict[str, tuple[str, object]]) -> None:
    """When module M of `wrap` (name -> (attribute, wrapper factory)) has just been executed, replace
    M.attribute by factory(M.attribute), before any other module can import the name from it. An
    import hook rather than an import here: the embedded arm's `csmf run` starts Prefect's temporary
    API before its own imports (torch among them) so that the two overlap; importing torch first
    would take that overlap away and add to the arm's time."""
    import importlib.abc

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name not in wrap:
                return None
            sys.meta_path.remove(self)  # find the real spec, then put ourselves back
            try:
                import importlib.util

                spec = importlib.util.find_spec(name)
            finally:
                sys.meta_path.insert(0, self)
            exec_module = spec.loader.exec_module
            attr, factory = wrap[name]

            def exec_and_wrap(module):
                exec_module(module)
                setattr(module, attr, factory(getattr(module, attr)))

            spec.loader.exec_module = exec_and_wrap
            return spec

    sys.meta_path.insert(0, Finder())


def time_training_calls() -> dict:
    """Wrap `csmf_core.cascade.run_step` and `csmf_core.tuning.run_trial` as they are imported (so
    every `from ... import` of them gets the wrapper) to add up the seconds spent in their outermost
    calls, less their callbacks' seconds. Returns the running totals: {"compute": s, "callbacks": s}."""
    import functools

    acc = {"compute": 0.0, "callbacks": 0.0, "depth": 0}

    def timed_callback(cb):
        if cb is None:
            return None

        def inner(*a, **k):
            t = time.perf_counter()
            try:
                return cb(*a, **k)
            finally:
                acc["callbacks"] += time.perf_counter() - t

        return inner

    def timed(fn):
        @functools.wraps(fn)
        def inner(*a, **k):
            if acc["depth"]:  # run_trial's own run_step calls: counted once, in run_trial
                return fn(*a, **k)
            for name in ("on_step", "on_begin"):
                if name in k:
                    k[name] = timed_callback(k[name])
            acc["depth"] += 1
            cb0, t = acc["callbacks"], time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc["depth"] -= 1
                acc["compute"] += time.perf_counter() - t - (acc["callbacks"] - cb0)

        return inner

    after_import({"csmf_core.cascade": ("run_step", timed), "csmf_core.tuning": ("run_trial", timed)})
    return acc


def child(arm: str, data: str, work: str, overrides: list[str], t_start: float) -> None:
    """Entry point of a child process: run one arm, print one JSON line (seconds from `t_start`, the
    child's first line, so imports are included)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    acc = time_training_calls()
    if arm in FLOW_ARMS:
        phases = csmf_run(data, Path(work), overrides)
    else:
        from flows.env import startup_imports  # stdlib only

        t_import = time.perf_counter()
        # the modules `direct` uses, imported as `csmf run` imports its own (GC off, then frozen): only
        # what the flow adds is counted as its overhead, not what that treatment saves on torch
        with startup_imports():
            import csmf_core.cascade  # noqa: F401
            import csmf_core.checkpoint  # noqa: F401
            import csmf_core.evaluate  # noqa: F401
            import csmf_core.prep  # noqa: F401
            import csmf_core.serving  # noqa: F401
            import csmf_core.tuning  # noqa: F401
            import data_contracts  # noqa: F401
            import flows.inputs  # noqa: F401

        phases = {"imports": time.perf_counter() - t_import, **direct(data, Path(work), overrides)}
    total = time.perf_counter() - t_start
    phases.update(compute=acc["compute"], callbacks=acc["callbacks"])
    print("RESULT " + json.dumps({"arm": arm, "seconds": total, "phases": phases}))


def run_arm(
    arm: str, data: Path, work: Path, overrides: list[str], prefect_home: Path, api_url: str | None
) -> dict:
    env = dict(os.environ, PREFECT_HOME=str(prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    # the default 20 s is too short for the temporary API server on a loaded 2-core machine
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    for k in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "CSMF_HOME"):  # the fresh home's own stores
        env.pop(k, None)
    if arm == "server":
        env["PREFECT_API_URL"] = str(api_url)
    cmd = [sys.executable, __file__, "--child", arm, "--data", str(data), "--work", str(work),
           "--overrides", *overrides]  # fmt: skip
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"{arm} arm failed (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return {**json.loads(lines[-1][7:]), "wall": wall}


def _url_answers(url: str, timeout: float = 2) -> bool:
    """`flows.local_api._healthy`, imported by the parent only (a child's clock starts before it)."""
    from flows.local_api import _healthy

    return _healthy(url, timeout)


class PrefectServer:
    """A persistent `prefect server start` on a free local port for the server arm (own PREFECT_HOME,
    SQLite), started once before the rounds and stopped (its whole process group) after them."""

    def __init__(self, home: Path, timeout: float = 300.0):
        from flows.env import free_port  # the parent has the repository on sys.path (benchlib)

        self.port = free_port()
        home.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_UI_ENABLED="false")  # fmt: skip
        env.pop("PREFECT_API_URL", None)
        self.log = open(home / "server.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        t0 = time.perf_counter()
        while not self._healthy():
            if self.process.poll() is not None or time.perf_counter() - t0 > timeout:
                self.stop()
                raise RuntimeError(f"prefect server did not start (log: {home / 'server.log'})")
            time.sleep(0.5)
        self.start_seconds = time.perf_counter() - t0
        # A persistent server has served clients before a run reaches it; a fresh server process sets
        # itself up on its first API request (0.47 s for GET /admin/version on the 2-core Intel VM,
        # then 0.01 s), which the round-1 server arm paid (its client's first call). Once, here.
        t1 = time.perf_counter()
        if not _url_answers(f"{self.api_url}/admin/version", timeout=30):
            self.stop()
            raise RuntimeError(
                f"prefect server did not answer its first request (log: {home / 'server.log'})"
            )
        self.first_request_seconds = time.perf_counter() - t1

    def cpu_seconds(self) -> float:
        """CPU seconds (user + system) the server's processes have used so far."""
        import psutil

        try:
            procs = [
                psutil.Process(self.process.pid),
                *psutil.Process(self.process.pid).children(recursive=True),
            ]
        except psutil.Error:
            return float("nan")
        total = 0.0
        for proc in procs:
            try:
                t = proc.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                continue
        return total

    def idle_cpu_share(self, seconds: float = 10.0) -> float:
        """The share of one core the server uses with no client (its own services), over `seconds`."""
        c0, t0 = self.cpu_seconds(), time.perf_counter()
        time.sleep(seconds)
        return (self.cpu_seconds() - c0) / (time.perf_counter() - t0)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _healthy(self) -> bool:
        return _url_answers(f"{self.api_url}/health")

    def stop(self) -> None:
        import signal

        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


def run(
    rounds: int = 1,
    overrides: list[str] | None = None,
    data: dict | None = None,
    write: bool = True,
    arms: tuple[str, ...] = ARMS,
    idle_s: float = 10.0,
) -> list[dict]:
    import shutil

    benchlib = _benchlib()
    overrides = list(overrides or [])
    data = dict(data or {"name": "small"})
    ds, _, _ = benchlib.synth_dataset(data.pop("name"), **data)
    rec = benchlib.Recorder("orchestration", {"dataset": ds.name, "overrides": overrides}, write=write)
    base = benchlib.work_dir() / "orchestration"
    prefect_home = base / "prefect"
    server = PrefectServer(base / "prefect-server") if "server" in arms else None
    res: dict[str, list[dict]] = {a: [] for a in arms}
    # every arm's modules read once before the rounds: in `make bench` the benchmarks before this one
    # evict them from the page cache, and a round's first arm read them from disk (one round there:
    # embedded 12.5% on 12-05, against 8-11% in warm rounds)
    t_warm = time.perf_counter()
    subprocess.run([sys.executable, "-c", WARM_UP], cwd=REPO, check=True,
                   env=dict(os.environ, PREFECT_HOME=str(prefect_home)))  # fmt: skip
    print(f"warm-up (the arms' modules imported once, not timed): {time.perf_counter() - t_warm:.1f} s")
    try:
        idle = server.idle_cpu_share(idle_s) if server is not None else None
        for r in range(rounds):
            for arm in arms if r % 2 == 0 else arms[::-1]:
                work = base / f"{arm}-{r}"
                shutil.rmtree(work, ignore_errors=True)
                work.mkdir(parents=True)
                c0 = server.cpu_seconds() if server is not None else 0.0
                res[arm].append(run_arm(arm, ds, work, overrides, prefect_home, server and server.api_url))
                if arm == "server":  # the server shares this machine's cores with the run it serves
                    res[arm][-1]["server_cpu"] = server.cpu_seconds() - c0
                shutil.rmtree(work, ignore_errors=True)
    finally:
        if server is not None:
            server.stop()
    med = lambda arm, key: benchlib.median([x[key] for x in res[arm]])  # noqa: E731
    labels = {
        "embedded": "csmf run, temporary Prefect API (make run)",
        "server": "csmf run against a persistent prefect server",
    }
    rest = lambda x: x["seconds"] - x["phases"]["compute"]  # noqa: E731  (the arm less its training calls)
    for arm in FLOW_ARMS:
        if arm in arms and "direct" in arms:
            pairs = list(zip(res[arm], res["direct"]))
            ratios = [(rest(a) - rest(b)) / a["seconds"] for a, b in pairs]
            walls = [(a["seconds"] - b["seconds"]) / a["seconds"] for a, b in pairs]
            rec.add(f"orchestration overhead, {arm} ({labels[arm]})", benchlib.median(ratios), "", "<= 0.1",
                    rounds=rounds, per_round=[round(x, 4) for x in ratios])  # fmt: skip
            rec.add(f"wall-clock difference {arm} - direct, share of {arm} (training noise included)",
                    benchlib.median(walls), "", rounds=rounds, per_round=[round(x, 4) for x in walls])  # fmt: skip
            print(f"orchestration overhead per round, {arm}: " + ", ".join(f"{x:.1%}" for x in ratios))
            print(f"wall-clock difference per round, {arm}: " + ", ".join(f"{x:.1%}" for x in walls))
    for arm in arms:  # the rounds themselves: is one arm's training systematically slower?
        print(f"{arm} per round, seconds / of them in the training calls: "
              + ", ".join(f"{x['seconds']:.1f} / {x['phases']['compute']:.1f}" for x in res[arm]))  # fmt: skip
    for arm in arms:
        rec.add(f"{arm} seconds (imports included)", med(arm, "seconds"), "s")
        rec.add(f"{arm}: seconds in the training calls (run_trial, run_step)",
                benchlib.median([x["phases"]["compute"] for x in res[arm]]), "s")  # fmt: skip
        rec.add(f"{arm}: seconds in their callbacks (loss curve, progress)",
                benchlib.median([x["phases"]["callbacks"] for x in res[arm]]), "s")  # fmt: skip
    if "embedded" in arms:
        rec.add("embedded: csmf run waiting for the temporary API before the flow",
                benchlib.median([x["phases"]["api_wait"] for x in res["embedded"]]), "s")  # fmt: skip
    if server is not None:
        rec.add("server: prefect server start (once, not in the arm)", server.start_seconds, "s")
        rec.add("server: its first API request (once, before the rounds: the server sets itself up)",
                server.first_request_seconds, "s")  # fmt: skip
        rec.add(f"server: its CPU share of one core while idle (its own services, {idle_s:g} s)", idle, "")
        if "server" in arms:
            rec.add("server: its CPU seconds during the server arm (same cores as the run)",
                    benchlib.median([x["server_cpu"] for x in res["server"]]), "s")  # fmt: skip
    if "direct" in arms:
        for k in ("imports", "ingest", "select", "cascade", "final"):
            rec.add(f"direct phase: {k}", benchlib.median([x["phases"][k] for x in res["direct"]]), "s")
    for arm in arms:
        rec.add(f"{arm} process wall", med(arm, "wall"), "s")
    return rec.flush()


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=1, help="rounds of every arm (alternating order)")
    p.add_argument("--overrides", nargs="*", default=[], help="config overrides for both arms")
    p.add_argument("--quick", action="store_true", help="tiny world, 1 epoch per stage (smoke test)")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    p.add_argument("--no-write", action="store_true", help="do not append to bench/results/")
    p.add_argument("--child", choices=list(ARMS), help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child(a.child, a.data, a.work, a.overrides, T_START)
        return []
    if a.quick:
        tiny = {"name": "tiny", "n_users": 300, "n_items": 200, "n_days": 6, "requests_per_day": 340}
        quick = ["train.epochs=[1,1,1]", "recover.epochs=1", *a.overrides]
        return run(1, quick, tiny, write=not a.no_write, arms=tuple(a.arms), idle_s=2.0)
    return run(a.rounds, a.overrides, write=not a.no_write, arms=tuple(a.arms))


if __name__ == "__main__":
    main()
