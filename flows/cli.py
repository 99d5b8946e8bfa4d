"""The `csmf` command line: data, the daily pipeline, serving and the MLflow UI.

How to run:

    csmf synth --out data/synth-tiny --preset tiny        # generate a canonical dataset
    csmf import kuairand ../shared/data/kuairand --out data/kuairand
    csmf validate data/synth-tiny                         # exit 1 when the contract is broken
    csmf run                                              # whole pipeline on generated data
    csmf run --data data/kuairand --date 2022-05-08 --set train.epochs=1,2,2
    csmf recommend --user-id 40 --k 10 --weights 1,1.8,1.2
    csmf embed --side user --mode click --out users.parquet
    csmf evaluate --model models:/csmf@champion --data data/synth-small
    csmf compare --data data/synth-small --methods all --seeds 3       # baselines + ablations report
    csmf ui                                               # MLflow UI on http://127.0.0.1:5000
    csmf doctor                                           # clean up after a killed run (flows/doctor.py)

State lives in one directory: --home, else $CSMF_HOME, else ./.csmf (flows.env.setup_home), set up
before prefect or mlflow are imported (they read their settings at import). Those, torch and the
flow are imported lazily inside the commands that need them so that `csmf --help` stays fast.
Errors from the data contract, the configuration, bad arguments, a failed run (a held date lock, a
diverged loss, a full disk or an unwritable file) print one paragraph and exit 2; while a flow runs,
Prefect's log lines about the failure keep their message but not their traceback on the console (the
Prefect API and UI keep it). `--debug` shows every traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

from csmf_core.allocator import tune_allocator
from flows.console import Progress, check_output_file, iso_date, partition_dates, port_number, text_table
from flows.env import DEFAULT_HOME, check_writable, existing_home, setup_home, startup_imports, tracking_uri
from flows.inputs import dataset_location, default_eval_day

SYNTH_DEFAULT = ("small", 0)  # preset and seed of the data `csmf run` generates when given no --data
# Errors that are the user's to fix (data, config, arguments, disk, a run already training): one
# paragraph, exit 2. The named ones are matched by class name so that this module imports neither
# mlflow nor torch: MlflowException, flows.lock.RunLocked, csmf_core.optim.TrainingDiverged.
_USER_ERRORS = (ValueError, OSError, LookupError)
_USER_ERROR_NAMES = {"MlflowException", "RunLocked", "TrainingDiverged"}
_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")  # Prefect's flow and task run loggers


# ---- data commands ---------------------------------------------------------------------------------
def cmd_synth(args: argparse.Namespace) -> int:
    from csmf_core import synth
    from csmf_core.fsutil import check_replaceable, fresh_temp_dir

    check_replaceable(args.out, "dataset.yaml")  # a folder of other files, a file: never, whatever the flag
    try:  # the library's own refusal names its Python argument (overwrite=True)
        fresh_temp_dir(args.out, args.overwrite, check_only=True, marker="dataset.yaml")
    except FileExistsError:
        raise FileExistsError(f"{args.out} exists and is not empty; add --overwrite to replace it") from None
    with Progress(f"generating synthetic dataset ({args.preset}, seed {args.seed}) in {args.out}"):
        s = synth.generate(args.out, args.preset, args.seed, overwrite=args.overwrite)
    cfg = s.config
    print(
        f"Wrote {s.out_dir}: {cfg.n_users:,} users, {cfg.n_items:,} items, {s.n_requests:,} requests, "
        f"{s.n_rows:,} event rows, dates {s.dates[0]} .. {s.dates[-1]} ({len(s.dates)} partitions)"
    )
    print(text_table(["objective", "positives"], list(s.counts.items())))
    print(f"\nNext: csmf validate {s.out_dir}   |   csmf run --data {s.out_dir}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from data_contracts import import_kuairand
    from data_contracts.location import check_replaceable

    check_replaceable(args.out, "dataset.yaml")  # before reading the source, not after
    if args.out.exists() and not args.overwrite:  # the library would name its Python argument
        raise FileExistsError(
            f"{args.out} already exists; add --overwrite to replace it (the old dataset is replaced "
            "only once the new one is complete)"
        )
    with Progress(f"importing KuaiRand from {args.src} into {args.out}"):
        s = import_kuairand(args.src, args.out, conversion=args.conversion, overwrite=args.overwrite)
    print(
        f"Wrote {s.out_dir} (dataset {s.name}): {s.rows:,} event rows, {s.users:,} users, {s.items:,} items, "
        f"partitions {s.partitions[0]} .. {s.partitions[-1]} ({len(s.partitions)})"
    )
    print(text_table(["objective", "positives"], list(s.positives.items())))
    if s.unknown_user_rows or s.unknown_item_rows:
        print(
            f"{s.unknown_user_rows:,} rows with users and {s.unknown_item_rows:,} with items lacking a feature row"
        )
    print(f"\nNext: csmf validate {s.out_dir}   |   csmf run --data {s.out_dir}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from data_contracts import validate_dataset
    from data_contracts.location import redact

    with Progress(f"validating {redact(args.dir)}"):  # a URI's query can hold credentials
        report = validate_dataset(args.dir, dates=args.dates)
    print(report.to_markdown())
    if not report.ok:
        print(
            "The dataset breaks the contract (docs/architecture.md section 1): fix the errors above, "
            "then validate again.",
            file=sys.stderr,
        )
        return 1
    return 0


# ---- pipeline --------------------------------------------------------------------------------------
def default_dataset(home: Path) -> Path:
    """<home>/data/synth-small, generated on first use and reused afterwards."""
    from csmf_core import synth

    preset, seed = SYNTH_DEFAULT
    out = home / "data" / f"synth-{preset}"
    if (out / "dataset.yaml").is_file():
        print(f"Using the generated dataset {out} (delete it to regenerate)")
        return out
    with Progress(f"no --data given: generating the '{preset}' synthetic dataset in {out} (once)"):
        synth.generate(out, preset, seed, overwrite=True)
    return out


# the home a later command finds without --home ($CSMF_HOME of the user's shell, else ./.csmf), read
# before setup_home sets $CSMF_HOME for this process
_SHELL_HOME = os.environ.get("CSMF_HOME")


def home_flag(home: Path) -> str:
    """' --home H' for the commands a hint suggests, unless they find H without it: a hint that
    leaves it out would query another home (the default one's champion, its MLflow store)."""
    found = Path(_SHELL_HOME or DEFAULT_HOME).expanduser().resolve()
    return "" if Path(home).resolve() == found else f" --home {home}"


def cmd_run(args: argparse.Namespace) -> int:

    json_out = check_output_file(args.json_out, "--json-out")
    home = setup_home(args.home)  # before the flow module imports prefect and mlflow
    check_writable(home)  # a read-only home: one message now, not Prefect's retry loop later
    api_line = prefect_api(home)  # a running `make serve` stack: its API (no temporary server)
    # the cyclic GC off while torch, Prefect and MLflow import, then what they loaded frozen
    # (flows/env.py `startup_imports`: ~1 s less import, ~1 s less at exit)
    with startup_imports():
        from flows.doctor import claim
        from flows.local_api import start_temporary_api

        claim(home)  # before Prefect starts its temporary server: it carries this process as its owner
        # Prefect's temporary API (when no server is configured) starts now, in its own process, while
        # this one imports torch and mlflow, reads the config and the data; waited for before the flow
        api = start_temporary_api()
        data = dataset_location(args.data, home) if args.data else default_dataset(home)
        from flows.tune import describe_tuned, settle_tuned

        dates = partition_dates(data)

        def first_day(c) -> str:  # --date: checked by iso_date
            return args.date or default_eval_day(dates, c.data.eval_days)

        # fail fast, before Prefect starts, on a bad config (the flow settles the tuned config the same)
        tuned, cfg, why = settle_tuned(home, data, args.tuned, args.config, args.set, first_day)
        if tuned is not None:
            print(
                f"csmf run: applying the tuned config {describe_tuned(tuned)} (--tuned none to train without)"
            )
        elif why:
            print(f"csmf run: {why}")
        from flows.runs import device

        device(cfg)  # train.device=cuda on a machine without CUDA: refused now, not in a task
        date = first_day(cfg)
        n_eval = cfg.data.eval_days
        window = (
            f"evaluation day {date}"
            if n_eval == 1
            else f"evaluation days {date} and the {n_eval - 1} after it"
        ) + " (training on the partitions before it)"
        print(f"csmf run: data {data}, {window}, home {home}")
        print(f"csmf run: {api_line}")
        from flows.pipeline import csmf_daily

        _open_tracking_store()  # the flow's first MLflow work, done now (while a temporary API starts)
    if api is not None:
        api = api.wait()  # the flow's Prefect client uses this server (flows/local_api.py)
    with _run_console(args), api.use() if api is not None else nullcontext():
        result = csmf_daily(
            date=date,
            data=str(data),
            config=args.config,
            overrides=list(args.set),
            home=str(home),
            tuned=args.tuned,
            from_model=args.from_model,
        )
    print(summarize_run(result, cfg.eval.primary_k, home))
    if json_out is not None:  # for scripts (csmf replay reads it): the flow's return value
        import json

        json_out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0


def _open_tracking_store() -> None:
    """The MLflow stores the flow opens first thing (flows/tracking.py `open_stores`), opened now; a
    store that cannot be opened is left for the flow to report (its message, its retries)."""
    from flows.tracking import open_stores

    try:
        open_stores(tracking_uri())
    except Exception:  # noqa: BLE001  (reported by the flow's open_run)
        pass


def prefect_api(home: Path) -> str:
    """Which Prefect API the flow run goes to, set up before prefect is imported; returns the line
    `csmf run` prints. $PREFECT_API_URL when set (kept as is); else the API of this home's running
    `make serve` stack (PREFECT_API_URL is set to it, so the run appears in that persistent UI); else
    Prefect's temporary local server, which keeps no UI after the run."""
    import os

    if os.environ.get("PREFECT_API_URL"):
        return f"Prefect API {os.environ['PREFECT_API_URL']} (from PREFECT_API_URL): the run shows in its UI"
    from flows.deploy import running_api

    api = running_api(home)
    if api:
        os.environ["PREFECT_API_URL"] = api
        ui = api.removesuffix("/api")
        return f"Prefect API {api} (the `make serve` stack of this home): the run shows in its UI, {ui}"
    return (
        "Prefect API: a temporary local server for this run only (no UI afterwards; `make serve` "
        "starts a persistent one that later runs use, or export PREFECT_API_URL)"
    )


def cmd_replay(args: argparse.Namespace) -> int:
    """`csmf replay`: the daily schedule over past days, one process per day and line (flows/replay.py)."""
    import datetime as _dt
    import time

    from csmf_core.config import load_config

    home = setup_home(args.home)
    check_writable(home)
    data = dataset_location(args.data, home)
    from flows import replay
    from flows.compare_render import machine
    from flows.runs import dataset_name
    from flows.tune import find_tuned, tuned_named

    tuned = find_tuned(home, data, args.tuned)
    cfg = load_config(args.config, args.set, tuned=tuned)  # fail fast on a bad config
    bad = [o for o in args.set if o.split("=", 1)[0].strip() == "train.mode"]
    if bad:
        raise ValueError(f"csmf replay sets train.mode per line (--mode); drop {bad[0]!r}")
    days = replay.replay_days(partition_dates(data), args.from_, args.to)
    name = dataset_name(data)
    out = replay.report_dir(name, args.report_dir)
    lines = replay.LINES if args.mode == "both" else (args.mode,)
    homes = replay.line_homes(home, name, days[0], days[-1], lines)
    command = " ".join(
        [
            "csmf replay",
            f"--data {args.data}",
            f"--from {args.from_}",
            f"--to {args.to}",
            f"--mode {args.mode}",
        ]
        + ([f"--config {args.config}"] if args.config else [])
        + [f"--set {o}" for o in args.set]
    )
    print(
        f"csmf replay: {len(days)} day(s) {days[0]} .. {days[-1]} of {data}, line(s) {', '.join(lines)}; "
        f"each line's state in {homes[lines[0]].parent} (the home's champion is not touched); report in {out}"
    )
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "replay.partial.jsonl"
    partial.unlink(missing_ok=True)
    started, t0 = _dt.datetime.now(_dt.UTC), time.perf_counter()
    # the load average before the runs; the runs' own torch threads are the config's (this process
    # only orchestrates them), which machine() cannot know
    threads = cfg.train.threads or "as torch starts"
    meta = {"machine": f"{machine()}, training threads per run: {threads} (train.threads)"}
    signal.signal(signal.SIGTERM, _raise_signalled)  # stop the day's run with the replay (flows/replay.py)
    result = replay.replay(
        data,
        days,
        homes,
        config=args.config,
        overrides=list(args.set),
        tuned=tuned,
        k=cfg.eval.primary_k,
        partial=partial,
        tuned_explicit=tuned_named(args.tuned),
    )
    meta |= {
        "dataset": name,
        "data": str(args.data),
        "from": days[0],
        "to": days[-1],
        "k": cfg.eval.primary_k,
        "lines": list(lines),
        "overrides": list(args.set),
        "command": command,
        "started": started.strftime("%Y-%m-%d %H:%M"),
        "ended": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M"),
        "seconds": time.perf_counter() - t0,
        "homes": {ln: str(h) for ln, h in homes.items()},
    }
    summary = replay.summarize(result)
    replay.write_report(out, result, summary, meta)
    partial.unlink(missing_ok=True)
    run_id = replay.log_to_mlflow(result, summary, meta, out, home)
    print((out / "replay.md").read_text().split("## Per day")[0].rstrip())  # the summary just written
    print(
        f"\nreport: {out / 'replay.md'}\nMLflow run: {run_id} (experiment csmf-replay; open with "
        f"`csmf ui{home_flag(home)}`)"
    )
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """`csmf compare`: the arguments checked before Prefect starts, the flow, where the report is."""
    from csmf_core.config import load_config

    home = setup_home(args.home)  # before flows.compare imports prefect and mlflow
    check_writable(home)
    from flows.doctor import claim

    claim(home)
    with startup_imports():  # torch, Prefect, MLflow: GC paused, then frozen (flows/env.py)
        from flows.compare import check_arguments, csmf_compare, report_out_dir
        from flows.names import COMPARE_EXPERIMENT

    cfg = load_config(args.config, args.set)  # fail fast on a bad config
    names, _ = check_arguments(args.methods, args.seeds, args.sweeps)
    data = dataset_location(args.data, home)
    if not data.is_dir():
        raise FileNotFoundError(f"--data {data}: no such directory")
    report_out_dir(data, args.report_dir)  # a bad dataset name or --report-dir fails before Prefect starts
    command = "csmf compare " + " ".join(
        [f"--data {args.data}", f"--methods {args.methods}", f"--seeds {args.seeds}"]
        + ([f"--date {args.date}"] if args.date else [])
        + ([f"--config {args.config}"] if args.config else [])
        + [f"--set {o}" for o in args.set]
        + ([f"--sweeps {args.sweeps}"] if args.sweeps else [])
        + ([f"--report-dir {args.report_dir}"] if args.report_dir else [])
        + ([f"--tune-trials {args.tune_trials}"] if args.tune_trials else [])
    )
    if args.tune_trials < 0:
        raise ValueError(f"--tune-trials must be >= 0, got {args.tune_trials}")
    print(
        f"csmf compare: {len(names)} method(s) x {args.seeds} seed(s) on {data}; home {home}; "
        f"epoch caps {list(cfg.train.epochs)}, chosen on the validation days"
        + (f", {args.tune_trials} tuning trial(s) per method" if args.tune_trials else "")
    )
    with _run_console(args):
        out = csmf_compare(
            data=str(data),
            date=args.date,
            methods=args.methods,
            seeds=args.seeds,
            config=args.config,
            overrides=list(args.set),
            home=str(home),
            sweeps=args.sweeps,
            report_dir=args.report_dir,
            command=command,
            tune_trials=args.tune_trials,
        )
    print(
        f"\nreport: {out['report']}\nMLflow parent run: {out['mlflow_run_id']} (experiment "
        f"{COMPARE_EXPERIMENT}; open with `csmf ui{home_flag(home)}`)"
    )
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """`csmf tune`: an Optuna study on the validation days; prints the best trial and the tuned config."""
    from csmf_core.config import load_config, read_yaml_file
    from csmf_core.tuning import load_space

    home = setup_home(args.home)
    check_writable(home)
    cfg = load_config(args.config, args.set)  # fail fast on a bad config or search space
    if args.space:
        load_space(read_yaml_file(args.space, "search space file") or {}, cfg)
    if args.trials < 1:
        raise ValueError(f"--trials must be >= 1, got {args.trials}")
    if args.timeout is not None and args.timeout <= 0:
        raise ValueError(f"--timeout must be > 0 seconds, got {args.timeout}")
    if not 0 <= args.seed < 2**32:
        raise ValueError(f"--seed must be between 0 and 2**32 - 1 (the sampler's seed), got {args.seed}")
    data = dataset_location(args.data, home)
    if not data.is_dir():
        raise FileNotFoundError(f"--data {data}: no such directory")
    from flows.doctor import claim

    claim(home)
    with startup_imports():  # torch, Prefect, MLflow, Optuna: GC paused, then frozen (flows/env.py)
        from flows.tune import csmf_tune

    print(f"csmf tune: {args.trials} trial(s) on {data}, home {home} (the evaluation days are not read)")
    with _run_console(args):
        out = csmf_tune(
            data=str(data),
            date=args.date,
            trials=args.trials,
            timeout=args.timeout,
            space=args.space,
            config=args.config,
            overrides=list(args.set),
            home=str(home),
            seed=args.seed,
            out=args.out,
        )
    print(out["report"])
    flag = home_flag(home)
    # the tune's own --set (what its trials ran with: only searched keys among them are in the file)
    sets = "".join(f" --set {shlex.quote(o)}" for o in args.set)
    apply = (
        f"apply it with: csmf run{flag} --data {args.data}{sets} --tuned {out['config_path']}"
        if args.out
        else f"a daily run on this home applies it: csmf run{flag} --data {args.data}{sets}"
    )
    print(
        f"tuned config: {out['config_path']} (best trial {out['best_trial']}, validation score "
        f"{out['best_value']:.4f}; {apply})\n"
        f"MLflow parent run: {out['mlflow_run_id']} (experiment csmf-tune; open with `csmf ui{flag}`)"
    )
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    home = existing_home(args.home)  # a mistyped --home: refused, not made and reported clean
    check_writable(home)
    from flows.doctor import cleanup

    report = cleanup(home)
    print(report.summary())
    return 1 if report.errors else 0


class _WithoutTraceback(logging.Formatter):
    """The console formatter of Prefect's flow/task run records, minus their traceback.

    Formats a copy of the record (the Prefect API handler, which ran first, keeps the traceback)."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info and record.name.startswith(_RUN_LOGGERS):
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
        return self.inner.format(record)


@contextmanager
def quiet_run_tracebacks() -> Iterator[None]:
    """While a flow runs: Prefect's console shows its failure records ("Task run failed with exception:
    TrainingDiverged(...)") without the traceback; the error is reported once more, by `main`, as
    `csmf run: error: ...`. Restores the console formatter afterwards."""
    from prefect.logging.handlers import PrefectConsoleHandler

    consoles = [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]
    saved = [(h, h.formatter) for h in consoles]
    for handler, formatter in saved:
        handler.setFormatter(_WithoutTraceback(formatter))
    try:
        yield
    finally:
        for handler, formatter in saved:
            handler.setFormatter(formatter)


def _run_console(args: argparse.Namespace):
    return nullcontext() if getattr(args, "debug", False) else quiet_run_tracebacks()


def summarize_run(result: dict, k: int = 50, home: Path | None = None) -> str:
    """The end-of-run message: where the run is, how to look at it, and the final metrics at K=k."""
    from csmf_core.serving import summary_table
    from flows.reporting import gate_verdict

    uri = result.get("tracking_uri") or tracking_uri()
    flag = home_flag(home) if home is not None else ""
    gate = result.get("gate")
    # no champion at all: recommend's default (the champion) would fail, so name this run's version
    model = f" --model models:/csmf/{result['model_version']}" if (
        gate and gate.get("champion_version") is None and result.get("model_version")
    ) else ""  # fmt: skip
    lines = [
        "",
        f"MLflow run:        {result['mlflow_run_id']}  (experiment {result.get('experiment', '?')})",
        f"Registered model:  csmf version {result.get('model_version', '?')}",
        *([f"Gate:              {gate_verdict(gate)}: {gate.get('reason', '')}"] if gate else []),
        *(
            [f"Resumed stages:    {', '.join(result['resumed_stages'])} (identical inputs, earlier run)"]
            if result.get("resumed_stages")
            else []
        ),
        f"Serving bundle:    {result.get('bundle_dir', '?')}",
        f"Tracking store:    {uri}",
        f"Open the UI:       csmf ui{flag}   (then http://127.0.0.1:5000)   or: "
        f"mlflow ui --backend-store-uri {uri}",
        f"Try the model:     csmf recommend{flag}{model} --user-id <id> --k 10",
        "",
        summary_table(result["metrics"], k)
        if result.get("metrics")
        else result.get("metrics_table", "").rstrip(),
        "(every K and every mode: the MLflow run's metrics/test_metrics.md, or `csmf evaluate`)",
    ]
    return "\n".join(lines)


class _Signalled(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)


def _raise_signalled(signum: int, frame) -> None:
    raise _Signalled(signum)


def cmd_ui(args: argparse.Namespace) -> int:
    """`mlflow ui` in its own process group, stopped with everything it started (its uvicorn server
    and workers) when csmf ui ends: on SIGTERM, on SIGINT (Ctrl+C), or when mlflow exits by itself.

    Own group: a SIGTERM to csmf alone (a supervisor, `kill PID`) would otherwise leave mlflow ui
    running; csmf forwards SIGTERM to the whole group instead, SIGKILL after 10 s."""
    import socket

    from flows.lock import stop_process_group

    with socket.socket() as probe:  # mlflow's server would log the clash and exit 0
        # as uvicorn binds (SO_REUSEADDR): a closed UI's connections in TIME_WAIT do not count as in
        # use; a socket listening there still does
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", args.port))
        except OSError as exc:
            raise OSError(
                f"--port {args.port}: 127.0.0.1:{args.port} is in use ({exc.strerror}); another csmf ui or "
                "server may be running there: open it, or choose another --port"
            ) from None
    existing_home(args.home)
    uri = tracking_uri()
    url = f"http://127.0.0.1:{args.port}"
    print(f"MLflow UI for {uri} on {url} (Ctrl+C to stop)", flush=True)
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(args.port),
    ]
    handlers = {sig: signal.signal(sig, _raise_signalled) for sig in (signal.SIGTERM, signal.SIGINT)}
    proc = None
    try:
        proc = subprocess.Popen(cmd, start_new_session=True)
        code = proc.wait()  # it serves until stopped: ending by itself is a failure whatever its status
        print(
            f"csmf ui: the MLflow UI stopped by itself (exit status {code}); see its messages above",
            file=sys.stderr,
        )
        return code or 1
    except _Signalled as got:
        print(f"{got}: stopping the MLflow UI", file=sys.stderr, flush=True)
        return 0
    finally:
        for sig in handlers:  # a second Ctrl+C must not interrupt the stop
            signal.signal(sig, signal.SIG_IGN)
        try:
            if proc is not None:
                stop_process_group(proc.pid, timeout=10)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)


# ---- parser and entry point ------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from flows import cli_serving

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    homed = argparse.ArgumentParser(add_help=False)
    homed.add_argument("--home", help="state directory (default: $CSMF_HOME or ./.csmf)")

    p = argparse.ArgumentParser(
        prog="csmf",
        description="CSMF multi-objective retrieval: data, pipeline, serving.",
        epilog="Run `csmf COMMAND --help` for the options of a command.",
        parents=[common],
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser(
        "synth",
        parents=[common],
        help="generate a synthetic canonical dataset",
        description="Generate a synthetic exposure -> click -> conversion dataset. "
        "How to run: csmf synth --out data/synth-tiny --preset tiny",
    )
    s.add_argument("--out", required=True, type=Path, help="output directory")
    s.add_argument("--preset", default="small", choices=["tiny", "small", "large"])
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier dataset at --out (never a folder without dataset.yaml)",
    )
    s.set_defaults(func=cmd_synth)

    imp = sub.add_parser("import", parents=[common], help="import a public dataset into the canonical format")
    isub = imp.add_subparsers(dest="source", metavar="SOURCE", required=True)
    k = isub.add_parser(
        "kuairand",
        parents=[common],
        help="KuaiRand: the slice in ../shared/data/kuairand or the official download (Pure, 1K, 27K)",
        description="How to run: csmf import kuairand ../shared/data/kuairand --out data/kuairand, or "
        "csmf import kuairand KuaiRand-Pure/data --out data/kuairand-pure for the official CSV files "
        "(log_standard_*.csv, user_features_*.csv, video_features_basic_*.csv; log_random_* is not read)",
    )
    k.add_argument(
        "src",
        type=Path,
        help="directory with the KuaiRand files (the slice, or the official data/ directory)",
    )
    k.add_argument("--out", required=True, type=Path)
    k.add_argument(
        "--conversion",
        default="like",
        choices=["like", "long_view"],
        help="label of the third objective: click & like (sparse) or click & long view (dense)",
    )
    k.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier dataset at --out (never a folder without dataset.yaml)",
    )
    k.set_defaults(func=cmd_import)

    v = sub.add_parser(
        "validate",
        parents=[common],
        help="check a dataset against the contract (exit 1 on errors)",
        description="How to run: csmf validate data/synth-small [--dates 2026-01-07 2026-01-08]",
    )
    v.add_argument("dir", help="dataset directory or URI (file://, s3://, gs://)")
    v.add_argument("--dates", nargs="+", help="partitions to check (default: all)")
    v.set_defaults(func=cmd_validate)

    # the commands that run a flow: besides their data, an evaluation day and the configuration
    flowed = argparse.ArgumentParser(add_help=False)
    flowed.add_argument(
        "--date",
        type=iso_date,
        help="evaluation day YYYY-MM-DD (default: the day whose data.eval_days window ends on the last partition)",
    )
    flowed.add_argument("--config", help="YAML config (csmf_core.config sections)")
    flowed.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. --set train.epochs=1,2,2 (repeatable)",
    )

    def flow_command(name: str, func, what: str, description: str) -> argparse.ArgumentParser:
        """A command that runs a flow (`func`): --home, --debug, --date, --config, --set."""
        cmd = sub.add_parser(name, parents=[common, homed, flowed], help=what, description=description)
        cmd.set_defaults(func=func)
        return cmd

    r = flow_command(
        "run",
        cmd_run,
        "run the daily pipeline (Prefect + MLflow)",
        "Train the cascade on the partitions before --date, evaluate on --date, register the model. "
        "How to run: csmf run [--data DIR] [--date YYYY-MM-DD]",
    )
    r.add_argument("--data", help="canonical dataset (default: generated synth-small under the home)")
    r.add_argument(
        "--tuned",
        default="auto",
        help="tuned config applied over --config: auto (the one csmf tune wrote for this dataset, if "
        "any), none, or a file",
    )
    r.add_argument(
        "--from-model",
        default=None,
        metavar="REF",
        help="train incrementally from this model (REF as for recommend) instead of the one "
        "train.start_from picks: its checkpoint, masks and id maps (train.mode incremental)",
    )
    r.add_argument(
        "--json-out", metavar="FILE", help="also write the run's result (metrics, model, gate) as JSON"
    )
    rp = sub.add_parser(
        "replay",
        parents=[common, homed],
        help="replay the daily schedule over past days: full retrain and incremental side by side",
        description="For each day from --from to --to, run the daily flow for that day as the schedule "
        "would (one process per run), in full-retrain and/or incremental mode, each line in a home of its "
        "own (the home's champion is not touched); write reports/<dataset>/replay.md (+ figure) and an "
        "MLflow run (experiment csmf-replay). How to run: csmf replay --data DIR --from D1 --to D2 "
        "[--mode both]",
    )
    rp.add_argument("--data", required=True, help="canonical dataset directory")
    rp.add_argument(
        "--from", dest="from_", required=True, metavar="D1", help="first evaluation day YYYY-MM-DD"
    )
    rp.add_argument("--to", required=True, metavar="D2", help="last evaluation day YYYY-MM-DD")
    rp.add_argument("--mode", default="both", choices=["incremental", "full", "both"])
    rp.add_argument("--config", help="YAML config (csmf_core.config sections)")
    rp.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)"
    )
    rp.add_argument("--tuned", default="auto", help="tuned config: auto, none or a file (as for run)")
    rp.add_argument("--report-dir", help="where the report goes (default: ./reports/<dataset name>)")
    rp.set_defaults(func=cmd_replay)
    t = flow_command(
        "tune",
        cmd_tune,
        "tune the configuration on the validation days (Optuna), write the tuned config",
        "An Optuna study (TPE, seeded; pruning after each cascade stage) over a search space, scored on "
        "the validation days at the end of the training window of --date; the evaluation days are never "
        "read. How to run: csmf tune --data DIR [--trials 30] [--timeout S] [--space FILE]",
    )
    t.add_argument("--data", required=True, help="canonical dataset directory")
    t.add_argument("--trials", type=int, default=30, help="finished trials in the study in all (resumes)")
    t.add_argument(
        "--timeout", type=float, help="seconds after which no new trial starts (the first trial always runs)"
    )
    t.add_argument("--space", help="search space YAML (default: configs/tune_space.yaml)")
    t.add_argument("--seed", type=int, default=0, help="the TPE sampler's seed")
    t.add_argument("--out", help="where the tuned config goes (default: <home>/tuned/<dataset>.yaml)")
    c = flow_command(
        "compare",
        cmd_compare,
        "compare CSMF with the paper's baselines and ablations (Prefect + MLflow, report)",
        "Train every method x seed on one dataset window and write the comparison report "
        "(reports/<dataset>/comparison.md). How to run: csmf compare --data DIR [--methods all|a,b] [--seeds 3]",
    )
    c.add_argument("--data", required=True, help="canonical dataset directory")
    c.add_argument("--methods", default="all", help="all, or a comma list (csmf_core.baselines.METHODS)")
    c.add_argument("--seeds", type=int, default=3, help="seeds per method (95%% t-intervals need >= 2)")
    c.add_argument("--sweeps", default="", help="optional sensitivity sweeps: tau,eta,weights")
    c.add_argument("--report-dir", help="where the report goes (default: ./reports/<dataset name>)")
    c.add_argument(
        "--tune-trials",
        type=int,
        default=0,
        help="Optuna trials per method over its own search space, on the validation days (default 0)",
    )

    cli_serving.add_commands(sub, [common, homed])

    u = sub.add_parser(
        "ui",
        parents=[common, homed],
        help="open the MLflow UI on the local tracking store",
        description="How to run: csmf ui [--port 5000]",
    )
    u.add_argument("--port", type=port_number, default=5000)
    u.set_defaults(func=cmd_ui)

    d = sub.add_parser(
        "doctor",
        parents=[common, homed],
        help="clean up after killed runs: FAILED runs, orphaned servers, unfinished model versions",
        description="Mark the MLflow runs of csmf processes that died (kill -9, out of memory) FAILED with "
        "tag csmf.failure_reason, stop the Prefect servers they left running, tag model versions their "
        "runs registered. Every `csmf run` does this first. How to run: csmf doctor [--home DIR]",
    )
    d.set_defaults(func=cmd_doctor)
    return p


def _is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, _USER_ERRORS) or any(c.__name__ in _USER_ERROR_NAMES for c in type(exc).__mro__)


def _hint(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:  # raised by the OS, not a csmf message
        return "\n(a file could not be read or written: free space or fix the permissions of that path, then re-run)"
    return ""


def _stdout_closed() -> bool:
    """Is stdout a pipe whose reader has gone? (poll reports POLLERR on such a pipe's write end.)"""
    import select

    try:
        p = select.poll()
        p.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in p.poll(0))
    except (OSError, ValueError, AttributeError):  # no fileno (captured), no poll on this platform
        return False


def main(argv: Sequence[str] | None = None) -> int:
    """Parse argv (default sys.argv[1:]) and run the command; returns the exit code."""
    args = build_parser().parse_args(argv)
    tune_allocator()  # glibc keeps freed step-sized buffers (csmf_core/allocator.py)
    debug = getattr(args, "debug", False)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, not at exit: a reader that has gone is seen below
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if debug or not _stdout_closed():  # a pipe of MLflow's, Prefect's, a subprocess's: an error
            raise
        # `csmf recommend ... | head`: the reader has gone, which is not an error. Python would report
        # it again on flushing stdout at exit: point stdout at /dev/null first
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell reports a process ended by SIGPIPE (128 + 13)
    except Exception as exc:
        if debug or not _is_user_error(exc):
            raise  # a bug, not a usage problem: keep the traceback
        print(
            f"csmf {args.command}: error: {exc}{_hint(exc)}\n(run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
