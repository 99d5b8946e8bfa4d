"""What the pipeline logs, and where (the MLflow layout of one `csmf-daily` run).

Experiment "csmf"; one parent run per flow run, named `csmf-daily-<date>`:

    tags     csmf.date, csmf.dataset, csmf.dataset_dir, csmf.dataset_digest (+ _kind), csmf.config_digest,
             csmf.training_digest, csmf.code_version, csmf.workdir, prefect.flow_run_id,
             prefect.flow_run_name, csmf.model_version, csmf.registered, csmf.gate, csmf.gate_reason,
             csmf.resumed_stages (names: flows/names.py; set by flows/runs.py open_run and the tasks);
             mlflow.source.name, mlflow.source.type, mlflow.user, mlflow.note.content (description;
             every child run has them too)
    inputs   datasets "<name> train <first>..<last>" (context training) and "<name> eval <days>"
             (context evaluation): source = the dataset directory, digest = that part's files
    params   the flattened config (`train.lr`, ...), run.train_dates, run.eval_dates
    metrics  test/by_step/<objective>/{recall,ndcg}@K at step = step index (0 = first cascade step),
             val/<objective>/... at step = step index (train steps, data.val_days > 0), and
             test/<objective>/<scorer>/{recall,ndcg}@K (scorer: an objective's own mode, fused,
             popularity, random)
    files    config/config.yaml, metrics/test_metrics.{json,md}, figures/{recall_at_k,ownership}.png,
             figures/cascade.png + metrics/by_step.{json,md} (every objective after every cascade
             step, by step name: the cascade at a glance)

Child runs (tag mlflow.parentRunId), named after the step, tagged csmf.step / csmf.kind / csmf.stage:

    ingest                  validation/report.md, model_ready/meta.json; data/rows, data/errors,
                            data/warnings, data/positives/<objective>, data/quarantined/<rule>,
                            data/train_rows, data/eval_users
    <cascade step>          params = flattened config + step.name/kind/stage/index;
      (pretrain_exposure,   checkpoint/ (model.pt, masks/, checkpoint.json);
       cpp_prune_exposure,  test/by_step/<objective>/{recall,ndcg}@K for every objective trained so far
       recover_exposure,      (own mode, evaluation day(s));
       finetune_click,      train/recover steps: train/loss (mean of each 10 steps), train/{rows,steps,seconds,
       ...)                   samples_per_s,final_loss}, train/opt_state_mib/<table> (optimiser state
                              of every embedding table the step trains); with data.val_days > 0 the train steps also
                              val/<objective>/{best_epoch,start_recall@K,best_recall@K,last_recall@K}
                            prune steps and the first step: masks/ (masks.pt, masks.json)
                            prune steps: prune/layers.{json,md}, figures/ownership.png,
                              prune/<group>/{mass_share_pruned,units_freed,units_kept},
                              prune/{units_freed,weights_freed,edges_removed,mass_share_pruned}
    build_index             index/ (index.faiss, ids.npy, index.json), bundle/bundle.json; index/n_items
    evaluate                the same files and test/ metrics as the parent
    register                the pyfunc model "model" (registered as a version of "csmf")
    gate                    gate/gate.md; gate/{challenger,champion}/..., gate/check/..., gate/users/...

The comparison flow (flows/compare.py) uses the same parent/child layout in experiment
"csmf-compare": one child run per (method, seed) tagged method, seed (flows/compare.py).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from csmf_core.metrics import md_cell
from csmf_core.serving import metrics_table
from data_contracts import ValidationReport, clean_events_lazy
from flows.figures import DRAWERS, BackgroundFigures
from flows.tracking import Tracker


def plain(value: Any) -> Any:
    """Tuples -> lists, recursively (for YAML/JSON dumps of configs)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# ---- ingest ----------------------------------------------------------------------------------------
def log_validation(tracker: Tracker, report: ValidationReport) -> None:
    """The validation report (markdown) and its counts."""
    tracker.log_text(report.to_markdown(), "validation/report.md")
    counts = report.counts
    metrics = {
        "data/rows": counts.get("rows", 0),
        "data/partitions": len(report.partitions),
        "data/errors": len(report.errors),
        "data/warnings": len(report.warnings),
    }
    metrics |= {f"data/{k}": counts[k] for k in ("users", "items") if counts.get(k) is not None}
    metrics |= {f"data/positives/{k}": v for k, v in counts.get("positives", {}).items()}
    metrics |= {f"data/quarantined/{k}": v for k, v in report.quarantined.items()}
    tracker.log_metrics(metrics)


def clean_copy(dataset: Path, dates: list[str], out: Path) -> Path:
    """A canonical copy of `dataset` (only `dates`) without the rows of any row-level rule.

    Used when validation quarantined rows: prep reads source files as they are.
    """
    if out.exists():
        shutil.rmtree(out)
    for f in ("dataset.yaml", "users.parquet", "items.parquet"):
        if (dataset / f).is_file():
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy2(dataset / f, out / f)
    for d in dates:
        part = out / "events" / f"dt={d}"
        part.mkdir(parents=True, exist_ok=True)
        clean_events_lazy(dataset, dates=[d]).collect().write_parquet(part / "part-00000.parquet")
    return out


def log_prep(tracker: Tracker, summary: Any) -> None:
    """Row counts of the model-ready dataset and its meta.json."""
    metrics = {
        "data/train_rows": summary.n_train,
        "data/eval_users": summary.n_eval,
        "data/n_users": summary.n_users,
        "data/n_items": summary.n_items,
    }
    metrics |= {f"data/train_rows/level{k}": n for k, n in enumerate(summary.train_by_level)}
    for side, m in (summary.meta.get("id_maps") or {}).items():  # csmf_core/idmap.py
        if isinstance(m, dict):
            metrics |= {f"prep/{side}/id_{k}": v for k, v in m.items() if k != "buckets" and v is not None}
    tracker.log_metrics(metrics)
    tracker.log_artifact(summary.out_dir / "meta.json", "model_ready")


# ---- cascade steps ---------------------------------------------------------------------------------
class LossCurve:
    """`on_step` callback: the `train/loss` curve (the mean loss of every `mean_of` steps, logged at the
    window's last step; a last partial window at its last step), a progress line every `every` steps,
    and `bar` (a flows.progress.StepBar) drawn at every step on a terminal. The curve's points are
    sent to the tracker at most once every `flush_seconds` seconds (so it grows live in the MLflow
    UI); `flush()` sends the rest.

    Why means and batches (docs/performance.md, 2-core VM): MLflow's SQLite store takes ~0.1 ms per
    metric point and ~10 ms per `log_batch`; one point per step (~2,700 in a default `make run`) was
    ~0.26 s of its orchestration, one `log_batch` per progress line (~140) ~0.5 s. A 10-step mean is
    also the curve a reader wants from per-batch losses; the progress lines show single steps."""

    def __init__(
        self,
        tracker: Tracker,
        logger: Any,
        name: str,
        every: int = 50,
        bar: Any = None,
        flush_seconds: float = 5.0,
        clock: Any = time.monotonic,
        mean_of: int = 10,
    ):
        self.tracker, self.logger, self.name, self.every = tracker, logger, name, max(1, every)
        self.bar, self.mean_of = bar, max(1, mean_of)
        self.flush_seconds, self.clock = float(flush_seconds), clock
        self.sent_at = clock()
        self.pending: list[tuple[int, float]] = []  # (step, mean loss of the window ending there)
        self.window: list[float] = []
        self.last: tuple[int, float] | None = None

    def __call__(self, step: int, loss: float) -> None:
        self.window.append(loss)
        self.last = (step, loss)
        if len(self.window) == self.mean_of:
            self._close_window(step)
        if self.bar is not None:
            self.bar.update(step, loss)
        if step % self.every == 0:
            self.logger.info("%s: step %d loss %.4f", self.name, step, loss)
            if self.clock() - self.sent_at >= self.flush_seconds:
                self._send()

    def _close_window(self, step: int) -> None:
        finite = [v for v in self.window if math.isfinite(v)]
        if finite:
            self.pending.append((step, sum(finite) / len(finite)))
        self.window = []

    def _send(self) -> None:
        if self.pending:
            self.tracker.log_series("train/loss", self.pending)
            self.pending = []
        self.sent_at = self.clock()

    def flush(self) -> None:
        if self.window and self.last is not None:
            self._close_window(self.last[0])
        self._send()
        if self.last is not None and self.last[0] % self.every:
            self.logger.info("%s: step %d loss %.4f (last)", self.name, *self.last)
            self.last = None


def log_pruning(
    tracker: Tracker, info: dict, stages: list[str], step_name: str, figures: BackgroundFigures | None = None
) -> None:
    """Per-layer pruning table (csmf_core.cpp.LayerPruneStats), summary metrics, ownership figure
    (queued on `figures` when given, else drawn here)."""
    layers = info["layers"]
    tracker.log_table(layers, "prune/layers.json")
    cols = list(layers[0]) if layers else []
    md = ["| " + " | ".join(map(md_cell, cols)) + " |", "|" + "---|" * len(cols)]
    md += [
        "| " + " | ".join(f"{r[c]:.4f}" if isinstance(r[c], float) else md_cell(r[c]) for c in cols) + " |"
        for r in layers
    ]
    tracker.log_text("\n".join(md) + "\n", "prune/layers.md")
    metrics: dict[str, float] = {}
    for r in layers:
        for k in ("mass_share_pruned", "units_freed", "units_kept"):
            metrics[f"prune/{r['group']}/{k}"] = r[k]
    for k in ("units_before", "units_freed", "weights_freed", "edges_removed"):
        metrics[f"prune/{k}"] = sum(r[k] for r in layers)
    mass = sum(r["mass_total"] for r in layers)
    metrics["prune/mass_share_pruned"] = (
        sum(r["mass_total"] * r["mass_share_pruned"] for r in layers) / mass if mass > 0 else 0.0
    )
    tracker.log_metrics(metrics)
    args = {"snapshots": {f"after {step_name}": info["units"]}, "stages": stages}
    queue_or_log_figure(figures, [tracker], "ownership", args, "figures/ownership.png")


# ---- the cascade at a glance ----------------------------------------------------------------------------
def cascade_rows(
    steps: list[tuple[int, str, str, str]], history: dict[str, dict[int, float]], objectives: list[str], ks
) -> list[dict]:
    """One row per cascade step: step (index), name, kind, stage (objective name), and for every
    objective and K "<objective> recall@K" / "<objective> ndcg@K" on the evaluation day(s), None before
    that objective's stage.

    steps: (index, name, kind, stage name) in plan order; history: {metric key on the parent, e.g.
    test/by_step/click/recall_at_50: {step index: value}} (what the cascade steps logged)."""
    out = []
    for index, name, kind, stage in steps:
        row: dict = {"step": index, "name": name, "kind": kind, "stage": stage}
        for k in ks:
            for o in objectives:
                for m in ("recall", "ndcg"):
                    row[f"{o} {m}@{k}"] = history.get(f"test/by_step/{o}/{m}_at_{k}", {}).get(index)
        out.append(row)
    return out


def log_cascade(
    tracker: Tracker,
    rows: list[dict],
    objectives: list[str],
    k: int,
    days: str,
    figures: BackgroundFigures | None = None,
) -> None:
    """metrics/by_step.{json,md} (every step's metrics, named) and figures/cascade.png (at K = k);
    the figure queued on `figures` when given (drawn by its child process), else drawn here."""
    from csmf_core.metrics import format_metrics_table

    tracker.log_table(rows, "metrics/by_step.json")
    head = (
        f"Every objective under its own mode after each cascade step, on the evaluation day(s) {days} "
        "(test split; the parent's test/by_step/<objective>/<metric>_at_K at step = the step index); "
        "empty before the objective's stage.\n\n"
    )
    tracker.log_text(head + format_metrics_table(rows) + "\n", "metrics/by_step.md")
    args = {"rows": rows, "objectives": objectives, "k": k, "days": days}
    queue_or_log_figure(figures, [tracker], "cascade", args, "figures/cascade.png")


# ---- the flow run's summary (Prefect artifact csmf-summary) ---------------------------------------------
def gate_verdict(gate: dict) -> str:
    """The gate's decision in a few words (the flow's `gate` result): promoted, the champion kept, or
    not promoted with no champion at all (a first model the evaluation days could not measure)."""
    champ = gate.get("champion_version")
    if gate.get("promoted"):
        return f"promoted to champion (champion: v{champ})"
    if champ is None:
        return "not promoted (no champion yet)"
    return f"champion kept (champion: v{champ})"


def run_summary(result: dict, k: int, date: str) -> str:
    """Markdown summary of a daily flow run (its `publish` result): model version, gate decision,
    the metrics at K = k against popularity, and where the details are."""
    from csmf_core.metrics import md_cell

    gate = result.get("gate") or {}
    lines = [
        f"## csmf-daily {date}: model version {result.get('model_version', '?')}",
        "",
        f"**Gate: {gate_verdict(gate)}**. {gate.get('reason', '')}",
        "",
        f"Recall@{k} / nDCG@{k} on the evaluation day(s):",
        "",
        "| objective | users | own mode | fused | popularity |",
        "|---|---:|---:|---:|---:|",
    ]
    at_k = {(r["objective"], r["scorer"]): r for r in result.get("metrics", []) if r["k"] == k}
    for o in dict.fromkeys(o for o, _ in at_k):
        cells = [at_k.get((o, s)) for s in (o, "fused", "popularity")]
        text = ["" if r is None else f"{r['recall']:.4f} / {r['ndcg']:.4f}" for r in cells]
        users = next((r["users"] for r in cells if r is not None), "")
        lines.append(f"| {md_cell(o)} | {users} | " + " | ".join(text) + " |")
    lines += [
        "",
        f"MLflow parent run `{result.get('mlflow_run_id')}` (experiment {result.get('experiment')}): "
        "figures/cascade.png and metrics/by_step.md (every objective after every step), "
        "metrics/test_metrics.md (every K and scorer); the registered version's description is its "
        "model card. Resumed stages: " + (", ".join(result.get("resumed_stages") or []) or "none") + ".",
    ]
    return "\n".join(lines) + "\n"


# ---- evaluation ------------------------------------------------------------------------------------
def log_evaluation(
    tracker: Tracker | Sequence[Tracker],
    rows: list[dict],
    prunes: dict[str, Path],
    objectives: list[str],
    figures: BackgroundFigures | None = None,
) -> None:
    """test/ metrics, the metrics table (JSON + markdown), Recall@K and ownership figures.

    tracker: one run's tracker, or several (the evaluate step's child run and the parent): each gets
    the same files, the figures rendered once and the same PNG logged to every run.
    prunes: {prune step name: its checkpoint dir} (ownership snapshots from masks/masks.json).
    figures: the figures are queued on it (drawn by its child process, logged by its `finish`)
    instead of drawn here.
    """
    from csmf_core.evaluate import metric_dict

    targets = list(tracker) if isinstance(tracker, Sequence) else [tracker]
    for t in targets:
        t.log_metrics(metric_dict(rows, prefix="test", own_only=False))
        t.log_table(rows, "metrics/test_metrics.json")
        t.log_text(metrics_table(rows) + "\n", "metrics/test_metrics.md")
    snapshots = {
        f"after {name}": read_json(ckpt / "masks" / "masks.json")["units_per_stage"]
        for name, ckpt in prunes.items()
        if (ckpt / "masks" / "masks.json").is_file()
    }
    queue_or_log_figure(figures, targets, "recall_at_k", {"rows": rows}, "figures/recall_at_k.png")
    if snapshots:
        args = {"snapshots": snapshots, "stages": objectives}
        queue_or_log_figure(figures, targets, "ownership", args, "figures/ownership.png")


def queue_or_log_figure(
    figures: BackgroundFigures | None, targets: Sequence[Tracker], kind: str, args: dict, artifact_file: str
) -> None:
    """Figure `kind` of flows.figures (DRAWERS[kind](**args)) as `artifact_file` of every target run:
    queued on `figures` (drawn by its child process, logged by its `finish`), or, without it, drawn
    and logged here (`log_figure`)."""
    if figures is not None:
        figures.add(kind, args, artifact_file, targets)
    else:
        log_figure(targets, DRAWERS[kind](**args), artifact_file)


def log_figure(targets: Sequence[Tracker], figure: Any, artifact_file: str) -> None:
    """`figure` as `artifact_file` of every target run. One target: its own `log_figure`; several:
    rendered once (`savefig` with MLflow's defaults, so the same PNG bytes as `log_figure`) and that
    file logged to each run."""
    if len(targets) == 1:
        targets[0].log_figure(figure, artifact_file)
        return
    import posixpath
    import tempfile

    folder, name = posixpath.split(posixpath.normpath(artifact_file))
    with tempfile.TemporaryDirectory(prefix="csmf-figure-") as tmp:
        path = Path(tmp) / name
        figure.savefig(path)
        for t in targets:
            t.log_artifact(path, folder or None)
