"""`csmf replay`: the daily schedule over past days, full retrain and incremental side by side.

    csmf replay --data DIR --from 2026-01-08 --to 2026-01-14 [--mode incremental|full|both]
                [--config FILE] [--set KEY=VALUE ...] [--report-dir DIR]

For each day D from --from to --to, in order, each line runs the daily flow for D as the schedule
would: `csmf run --date D --set train.mode=M` in a child process (its own interpreter and Prefect
flow run, trained on the partitions before D, evaluated on D). The `full` line retrains the cascade
from scratch every day; the `incremental` line continues its champion (flows/incremental.py): its
first day has no champion and falls back to a full retrain, as the deployment's first run does, and
a full retrain comes back every `train.full_every_days` days. With `both`, the two lines alternate
day by day (full, then incremental, for each D), so both see the same machine load.

Each line has a home of its own, `<home>/replay/<dataset>/<from>_<to>-<timestamp>/<line>`, with its own
MLflow store and model registry: a replay never touches the home's champion, and a line never sees
the other's models. The children inherit the environment (PREFECT_API_URL, PREFECT_HOME), except
CSMF_HOME and MLFLOW_TRACKING_URI, which point at the line's home.

Per day and line the report gives Recall@K and nDCG@K per objective under its own mode, the fused
ranking and popularity (K = eval.primary_k), the time of the cascade steps (the child runs of kind
train / prune / recover: pretrain .. finetune, or incremental_<objective>), of the selection pass,
the whole run's wall time (the child process, start to exit), the rows the cascade steps trained on
and the gate's decision. The summary compares the lines over the days the incremental line trained
incrementally: the time ratio (cascade steps, and the whole run) and, per objective, the incremental
line's mean Recall@K against the full line's mean and 95% t-interval over those days, with the mean
paired difference. The report (replay.md, replay.png, replay.json) goes to reports/<dataset>/ (or
--report-dir) and to a run of the home's MLflow experiment csmf-replay (per-day figures as metrics,
step = the day's index).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flows.compare_report import mean_ci
from flows.inputs import contained, report_directory, safe_name

LINES = ("full", "incremental")
MODES = ("full", "incremental", "both")
CASCADE_KINDS = ("train", "prune", "recover")  # the cascade's steps (csmf_core.cascade.Step.kind)
SELECT_KINDS = ("select", "choose_weights")  # the selection on the validation days
REPORT_FILES = ("replay.md", "replay.png", "replay.json", "replay.partial.jsonl")
TIME_TARGET = 0.3  # issue 16: incremental cascade time per day <= 0.3x a full retrain's


@dataclass
class Day:
    """One line's run for one day."""

    date: str
    line: str  # the train.mode asked for: full | incremental
    mode: str  # what the run did (csmf.train_mode): an incremental line's first day is "full"
    version: str
    promoted: bool
    gate_reason: str
    wall_s: float  # the child process, start to exit
    cascade_s: float  # the cascade steps' child runs
    select_s: float  # the selection pass's child runs
    rows: int  # rows the cascade's train/recover steps trained on (train/rows summed)
    metrics: dict[str, float] = field(default_factory=dict)  # "<objective>/<scorer>/recall" -> value
    mlflow_run_id: str = ""
    home: str = ""
    parent: str = ""  # the registry version an incremental run continued (csmf.parent_model_version)


# ---- days and places -------------------------------------------------------------------------------
def replay_days(dates: Sequence[str], first: str, last: str) -> list[str]:
    """The partitions from `first` to `last` (inclusive, in order); ValueError when either is not a
    partition, they are out of order, or `first` has no earlier partition to train on."""
    for flag, d in (("--from", first), ("--to", last)):
        try:
            dt.date.fromisoformat(d)
        except ValueError as exc:
            raise ValueError(f"{flag} {d!r} is not YYYY-MM-DD") from exc
        if d not in dates:
            raise ValueError(
                f"{flag} {d}: the dataset has no partition for that day (it has {dates[0]} .. {dates[-1]})"
            )
    if first > last:
        raise ValueError(f"--from {first} is after --to {last}")
    if first == dates[0]:
        raise ValueError(
            f"--from {first} is the dataset's first day: a run for it has no earlier day to train on"
        )
    return [d for d in dates if first <= d <= last]


def report_dir(dataset_name: str, explicit: str | os.PathLike | None, cwd: Path | None = None) -> Path:
    """--report-dir (new, empty or holding an earlier replay report), else ./reports/<dataset name>."""
    return report_directory(dataset_name, explicit, REPORT_FILES, "replay report", cwd)


def line_homes(home: Path, dataset_name: str, first: str, last: str, lines: Sequence[str]) -> dict[str, Path]:
    """A new home per line under <home>/replay/<dataset>/<first>_<last>-<UTC timestamp>/."""
    safe_name(dataset_name, "the dataset name in dataset.yaml")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    base = contained(home / "replay", dataset_name, f"{first}_{last}-{stamp}", what="replay directory")
    return {line: base / line for line in lines}


# ---- one day of one line ---------------------------------------------------------------------------
def run_day(
    line: str,
    line_home: Path,
    data: Path,
    date: str,
    *,
    config: str | None,
    overrides: Sequence[str],
    tuned: Path | None,
    k: int,
) -> Day:
    """`csmf run` for `date` in a child process on the line's home; its figures read back from the
    run's result and the line's MLflow store. RuntimeError (with the log's last lines) on failure."""
    line_home.mkdir(parents=True, exist_ok=True)
    result_file = line_home / f"result-{date}.json"
    log_file = line_home / f"run-{date}.log"
    argv = [
        sys.executable,
        "-m",
        "flows.cli",
        "run",
        "--home",
        str(line_home),
        "--data",
        str(data),
        "--date",
        date,
        "--tuned",
        str(tuned) if tuned is not None else "none",
        "--json-out",
        str(result_file),
        *(["--config", str(config)] if config else []),
        *[a for o in overrides for a in ("--set", o)],
        "--set",
        f"train.mode={line}",
    ]
    env = dict(os.environ)
    env["CSMF_HOME"] = str(line_home)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{line_home / 'mlflow.db'}"
    root = Path(__file__).resolve().parent.parent  # flows/ and csmf_core/ importable in the child
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    t0 = time.perf_counter()
    with log_file.open("w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            rc = proc.wait()
        except BaseException:  # Ctrl+C, or SIGTERM raised by cmd_replay's handler: stop the run too
            proc.terminate()  # csmf run ends its flow run and MLflow runs as when a scheduler stops it
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    wall = time.perf_counter() - t0
    if rc != 0 or not result_file.is_file():
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(
            f"replay: the {line} line's run for {date} failed (exit {rc}); its log is {log_file}:\n{tail}"
        )
    result = json.loads(result_file.read_text())
    return read_day(line, date, result, env["MLFLOW_TRACKING_URI"], wall, k, line_home)


def read_day(line: str, date: str, result: dict, uri: str, wall: float, k: int, line_home: Path) -> Day:
    """A Day from the run's result (metrics, gate) and its child runs in the store at `uri`."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    parent = client.get_run(result["mlflow_run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=1000
    )
    cascade = select = 0.0
    rows = 0
    for c in children:
        kind = c.data.tags.get("csmf.kind", "")
        seconds = ((c.info.end_time or c.info.start_time) - c.info.start_time) / 1000
        if kind in CASCADE_KINDS:
            cascade += seconds
            rows += int(c.data.metrics.get("train/rows", 0))
        elif kind in SELECT_KINDS:
            select += seconds
    metrics = {}
    for r in result.get("metrics", []):
        if int(r["k"]) != k:
            continue
        scorer = "own" if r["scorer"] == r["objective"] else r["scorer"]
        if scorer in ("own", "fused", "popularity"):
            metrics[f"{r['objective']}/{scorer}/recall"] = float(r["recall"])
            metrics[f"{r['objective']}/{scorer}/ndcg"] = float(r["ndcg"])
    gate = result.get("gate") or {}
    return Day(
        date=date,
        line=line,
        mode=parent.data.tags.get("csmf.train_mode", line),
        version=str(result.get("model_version", "")),
        promoted=bool(gate.get("promoted")),
        gate_reason=str(gate.get("reason", "")),
        wall_s=round(wall, 2),
        cascade_s=round(cascade, 2),
        select_s=round(select, 2),
        rows=rows,
        metrics=metrics,
        mlflow_run_id=result["mlflow_run_id"],
        home=str(line_home),
        parent=parent.data.tags.get("csmf.parent_model_version", ""),
    )


def replay(
    data: Path,
    days: Sequence[str],
    homes: dict[str, Path],
    *,
    config: str | None,
    overrides: Sequence[str],
    tuned: Path | None,
    k: int,
    partial: Path | None = None,
    say: Callable[[str], None] = print,
    tuned_explicit: bool = False,
) -> list[Day]:
    """Every day in order; per day, each line of `homes` (full first). Each Day is appended to
    `partial` (JSON lines) as soon as it is known. tuned: the tuned config found for the replay
    (`--tuned`); a day it was chosen on (flows.tune.tuned_applies) trains without it, with a line
    saying why, unless the file was named (`tuned_explicit`: that day's run refuses it)."""
    from flows.tune import tuned_applies

    out: list[Day] = []
    for i, date in enumerate(days):
        day_tuned = tuned
        if tuned is not None and not tuned_explicit:
            applies, why = tuned_applies(tuned, date, explicit=False)
            if not applies:
                say(f"csmf replay: {date}: {why}")
                day_tuned = None
        for line in (ln for ln in LINES if ln in homes):
            say(f"csmf replay: day {i + 1}/{len(days)} {date}, {line} line ...")
            day = run_day(
                line, homes[line], data, date, config=config, overrides=overrides, tuned=day_tuned, k=k
            )
            out.append(day)
            if partial is not None:
                with partial.open("a") as f:
                    f.write(json.dumps(asdict(day)) + "\n")
            say(
                f"csmf replay: {date} {line} line: trained as {day.mode}, cascade steps {day.cascade_s:.1f} s, "
                f"whole run {day.wall_s:.1f} s, model v{day.version} "
                f"({'promoted' if day.promoted else 'champion kept'})"
            )
    return out


# ---- the comparison --------------------------------------------------------------------------------
def objectives_of(days: Sequence[Day]) -> list[str]:
    return list(dict.fromkeys(key.split("/")[0] for d in days for key in d.metrics))


def summarize(days: Sequence[Day], target: float = TIME_TARGET) -> dict:
    """The lines compared over the days the incremental line trained incrementally (both lines run).

    Returns {"days": [...], "time": {...}, "recall": {objective: {...}}}; empty "days" when there is
    nothing to compare (one line only, or no incremental day)."""
    by = {(d.date, d.line): d for d in days}
    compared = [
        date
        for date in dict.fromkeys(d.date for d in days)
        if (date, "full") in by
        and (date, "incremental") in by
        and by[(date, "incremental")].mode == "incremental"
    ]
    out: dict = {"days": compared, "time": {}, "recall": {}}
    if not compared:
        return out
    full = [by[(d, "full")] for d in compared]
    inc = [by[(d, "incremental")] for d in compared]

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    f_cascade, i_cascade = mean([d.cascade_s for d in full]), mean([d.cascade_s for d in inc])
    f_wall, i_wall = mean([d.wall_s for d in full]), mean([d.wall_s for d in inc])
    ratio = i_cascade / f_cascade if f_cascade > 0 else float("nan")
    out["time"] = {
        "full_cascade_s": f_cascade,
        "incremental_cascade_s": i_cascade,
        "cascade_ratio": ratio,
        "full_wall_s": f_wall,
        "incremental_wall_s": i_wall,
        "wall_ratio": i_wall / f_wall if f_wall > 0 else float("nan"),
        "full_rows": mean([float(d.rows) for d in full]),
        "incremental_rows": mean([float(d.rows) for d in inc]),
        "target": target,
        "met": bool(ratio <= target),
    }
    for obj in objectives_of(days):
        key = f"{obj}/own/recall"
        fv = [d.metrics.get(key, float("nan")) for d in full]
        iv = [d.metrics.get(key, float("nan")) for d in inc]
        f_mean, f_half, n = mean_ci(fv)
        i_mean, _, _ = mean_ci(iv)
        diff, diff_half, _ = mean_ci([b - a for a, b in zip(fv, iv)])
        if not math.isfinite(i_mean) or not math.isfinite(f_mean):
            verdict = "not measured"
        elif i_mean >= f_mean:
            verdict = "better or equal"
        elif not math.isfinite(f_half):
            verdict = "lower, no interval (one day)"
        elif i_mean >= f_mean - f_half:
            verdict = "within the interval"
        else:
            verdict = "below the interval"
        out["recall"][obj] = {
            "full_mean": f_mean,
            "full_half": f_half,
            "incremental_mean": i_mean,
            "diff": diff,
            "diff_half": diff_half,
            "n": n,
            "verdict": verdict,
        }
    return out


# ---- report ----------------------------------------------------------------------------------------
def _f(v: float, digits: int = 4) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def render(days: Sequence[Day], summary: dict, meta: dict) -> str:
    """The markdown report."""
    k = meta["k"]
    objectives = objectives_of(days)
    lines = [
        f"# Replay of the daily schedule: {meta['dataset']}, {meta['from']} .. {meta['to']}",
        "",
        f"`{meta['command']}`",
        "",
        f"Machine: {meta['machine']}. Run {meta['started']} .. {meta['ended']} UTC, {meta['seconds'] / 60:.1f} min in all.",
        f"Each day D: the daily flow trained on the partitions before D and evaluated on D (`csmf run --date D "
        f"--set train.mode=<line>`, one process per run; flows/replay.py). Lines: {', '.join(meta['lines'])}. "
        "The incremental line's first day has no champion: it falls back to a full retrain, as the "
        "deployment's first run does.",
        "",
        "## Summary",
        "",
    ]
    if not summary["days"]:
        lines += [
            "Nothing to compare: the replay ran one line only, or no day of the incremental line trained incrementally.",
            "",
        ]
    else:
        t = summary["time"]
        n = len(summary["days"])
        lines += [
            f"Over the {n} day(s) the incremental line trained incrementally ({summary['days'][0]} .. {summary['days'][-1]}), "
            "means per day:",
            "",
            "| | full retrain | incremental | incremental / full |",
            "|---|---:|---:|---:|",
            f"| cascade steps, s (target <= {t['target']}x) | {t['full_cascade_s']:.1f} | {t['incremental_cascade_s']:.1f} | "
            f"**{t['cascade_ratio']:.3f}** ({'met' if t['met'] else 'not met'}) |",
            f"| whole run (process wall time), s | {t['full_wall_s']:.1f} | {t['incremental_wall_s']:.1f} | {t['wall_ratio']:.3f} |",
            f"| rows trained by the cascade steps | {t['full_rows']:,.0f} | {t['incremental_rows']:,.0f} | "
            f"{(t['incremental_rows'] / t['full_rows'] if t['full_rows'] else float('nan')):.3f} |",
            "",
            f"Recall@{k} under each objective's own mode (mean over those days; full retrain's 95% t-interval "
            "over the days; the paired difference incremental - full with its 95% t-interval):",
            "",
            f"| objective | full retrain R@{k} | incremental R@{k} | incremental - full | verdict |",
            "|---|---:|---:|---:|---|",
        ]
        for obj, r in summary["recall"].items():
            lines.append(
                f"| {obj} | {_f(r['full_mean'])} ± {_f(r['full_half'])} | {_f(r['incremental_mean'])} | "
                f"{r['diff']:+.4f} ± {_f(r['diff_half'])} | {r['verdict']} |"
            )
        lines.append("")
    head = (
        "| day | line | trained as | "
        + " | ".join(f"{o} own | {o} fused | {o} pop." for o in objectives)
        + " |"
    )
    for metric, label in (("recall", "Recall"), ("ndcg", "nDCG")):
        lines += [f"## Per day: {label}@{k} (own mode / fused / popularity)", "", head]
        lines.append("|---|---|---|" + "---:|" * (3 * len(objectives)))
        for d in days:
            cells = [
                _f(d.metrics.get(f"{o}/{s}/{metric}", float("nan")))
                for o in objectives
                for s in ("own", "fused", "popularity")
            ]
            lines.append(f"| {d.date} | {d.line} | {d.mode} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "## Per day: cost and gate",
        "",
        "| day | line | trained as | cascade steps s | selection s | whole run s | rows trained | model (from) | gate |",
        "|---|---|---|---:|---:|---:|---:|---|---|",
    ]
    for d in days:
        gate = "promoted" if d.promoted else "champion kept"
        source = f" (from v{d.parent})" if d.parent and d.parent != "none" else ""
        lines.append(
            f"| {d.date} | {d.line} | {d.mode} | {d.cascade_s:.1f} | {d.select_s:.1f} | {d.wall_s:.1f} | {d.rows:,} | "
            f"v{d.version}{source} | {gate} |"
        )
    lines += [
        "",
        "Cascade steps: the child runs of kind train / prune / recover (pretrain .. finetune in a full retrain, "
        "incremental_<objective> in an incremental run), each including its per-step evaluation and checkpoint. "
        "Selection: the epoch (and weight) selection pass on the validation days. Whole run: the `csmf run` "
        "process from start to exit (Python start, Prefect's temporary API, ingest, selection, cascade, index, "
        "evaluation, registration, gate). Popularity is measured in each run on its own training window. "
        "Model (from): the version the run registered in its line's registry and, for an incremental run, the "
        "version it continued (`train.start_from`: `line`, the default, continues the line's newest version "
        "the gate verified, promoted or not; `champion` continues the serving champion, so a day whose model "
        "the gate kept out is not continued and the next run catches the champion up on every day since).",
        "",
        f"Each line's MLflow store: {', '.join(f'{ln}: `{h}`' for ln, h in meta['homes'].items())}.",
        "",
    ]
    return "\n".join(lines)


def figure(days: Sequence[Day], k: int):
    """Recall@K (own mode) per objective over the days, both lines and popularity; cascade seconds."""
    from flows.figures import new_figure

    objectives = objectives_of(days)
    fig = new_figure(figsize=(4.0 * (len(objectives) + 1), 3.4), layout="constrained")
    axes = fig.subplots(1, len(objectives) + 1, squeeze=False)[0]
    dates = list(dict.fromkeys(d.date for d in days))
    xs = range(len(dates))
    styles = {"full": ("#4c72b0", "o"), "incremental": ("#dd8452", "s")}
    for ax, obj in zip(axes, objectives):
        for line, (color, marker) in styles.items():
            pts = {d.date: d.metrics.get(f"{obj}/own/recall") for d in days if d.line == line}
            if pts:
                ax.plot(xs, [pts.get(x, float("nan")) for x in dates], marker=marker, color=color, label=line)
        pop = {}
        for d in days:
            pop.setdefault(d.date, d.metrics.get(f"{obj}/popularity/recall"))
        ax.plot(xs, [pop.get(x, float("nan")) for x in dates], ls="--", color="#888888", label="popularity")
        ax.set_title(f"{obj}: Recall@{k}")
        ax.set_xticks(list(xs), [x[5:] for x in dates], rotation=45)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    ax = axes[-1]
    width = 0.4
    for j, (line, (color, _)) in enumerate(styles.items()):
        secs = {d.date: d.cascade_s for d in days if d.line == line}
        if secs:
            ax.bar(
                [x + (j - 0.5) * width for x in xs],
                [secs.get(x, 0.0) for x in dates],
                width,
                color=color,
                label=line,
            )
    ax.set_title("cascade steps, seconds")
    ax.set_xticks(list(xs), [x[5:] for x in dates], rotation=45)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3, axis="y")
    return fig


def rebuild(out: Path) -> Path:
    """Re-read every day of the replay report in `out` from its line's result file and MLflow store (the
    wall times kept), rewrite replay.md / .png / .json; for a report written by an earlier version."""
    saved = json.loads((out / "replay.json").read_text())
    meta, days = saved["meta"], []
    for d in saved["days"]:
        home = Path(d["home"])
        result = json.loads((home / f"result-{d['date']}.json").read_text())
        uri = f"sqlite:///{home / 'mlflow.db'}"
        days.append(read_day(d["line"], d["date"], result, uri, d["wall_s"], meta["k"], home))
    summary = summarize(days)
    write_report(out, days, summary, meta)
    return out / "replay.md"


def write_report(out: Path, days: Sequence[Day], summary: dict, meta: dict) -> None:
    """replay.md, replay.png and replay.json in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "replay.md").write_text(render(days, summary, meta))
    figure(days, meta["k"]).savefig(out / "replay.png", dpi=110)
    (out / "replay.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "days": [asdict(d) for d in days]}, indent=1) + "\n"
    )


def log_to_mlflow(days: Sequence[Day], summary: dict, meta: dict, out: Path, home: Path) -> str:
    """A run in the home's experiment csmf-replay (artifacts under <home>/mlartifacts, or the
    server's, as for every csmf experiment): parameters, per-day metrics (step = day index), the
    summary, the report files. Returns its run id."""
    from flows.env import tracking_uri
    from flows.names import REPLAY_EXPERIMENT
    from flows.tracking import MlflowTracker, ensure_experiment, metric_key

    exp_id = ensure_experiment(REPLAY_EXPERIMENT, home / "mlartifacts", tracking_uri())
    tracker = MlflowTracker.start(
        exp_id,
        f"csmf-replay-{meta['dataset']}-{meta['from']}..{meta['to']}",
        tags={"csmf.kind": "replay", "csmf.dataset": meta["dataset"]},
        tracking_uri=tracking_uri(),
    )
    tracker.log_params(
        {
            "data": meta["data"],
            "from": meta["from"],
            "to": meta["to"],
            "lines": ",".join(meta["lines"]),
            "overrides": " ".join(meta["overrides"]) or "none",
        }
    )
    dates = list(dict.fromkeys(d.date for d in days))
    for d in days:
        step = dates.index(d.date)
        values = {f"{d.line}/{key}_at_{meta['k']}": v for key, v in d.metrics.items()}
        values |= {
            f"{d.line}/cascade_seconds": d.cascade_s,
            f"{d.line}/wall_seconds": d.wall_s,
            f"{d.line}/rows_trained": d.rows,
        }
        tracker.log_metrics({metric_key(key): v for key, v in values.items()}, step=step)
    t = summary.get("time") or {}
    if t:
        tracker.log_metrics(
            {"summary/cascade_ratio": t["cascade_ratio"], "summary/wall_ratio": t["wall_ratio"]}
        )
    for f in REPORT_FILES[:3]:
        if (out / f).is_file():
            tracker.log_artifact(out / f)
    tracker.finish()
    return tracker.run_id
