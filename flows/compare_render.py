"""The comparison report's files, from run records: what `csmf compare` leaves in its report directory.

    path, md, t2, t3, t4 = render_report(records, sweep_records, meta, out_dir, seconds)
    rebuild_report("reports/synth-small")      # again, from runs.json or an interrupted run's partial files

Files: `comparison.md` (the markdown below), `runs.json` (meta, every run record, the sweeps: enough
to render the report again) and `figures/` (accuracy, one per sweep). The numbers come from
flows/compare_report.py (pure functions over the records: means, t-intervals, tables, figures); this
module only lays them out. It knows nothing of Prefect: the flow (flows/compare.py) hands it records,
and an interrupted comparison can be rendered from what it left on disk.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from pathlib import Path

import torch

from csmf_core.baselines import ABLATIONS
from flows import compare_report as rep
from flows.names import COMPARE_EXPERIMENT

REPORT_FILES = ("comparison.md", "runs.json", "runs.partial.jsonl", "meta.partial.json")
PARTIAL_FILES = REPORT_FILES[2:]  # written while the runs go on (flows/compare.py), replaced at the end


def machine() -> str:
    """One line describing where the run happened."""
    return (
        f"{platform.node()}: {platform.machine()} {platform.processor() or ''}".strip()
        + f", {os.cpu_count()} CPU cores visible, torch {torch.__version__}, torch threads: {torch.get_num_threads()}, "
        f"load average at start {os.getloadavg()[0]:.1f}"
    )


def render_report(
    records: list[dict], sweep_records: list[dict], meta: dict, out_dir: Path, seconds: float
) -> tuple[Path, str, list[dict], list[dict], list[dict]]:
    """Write comparison.md, runs.json and figures/ under out_dir; returns (path, markdown, table rows 2-4)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "figures").mkdir(exist_ok=True)
    meta = {**meta, "wall_seconds": seconds}
    k, objs = meta["k"], meta["objectives"]
    shown = [o for o in objs if any(m["objective"] == o for r in records for m in r["metrics"])]
    main_methods = [m for m in meta["methods"] if m not in ABLATIONS or m == "csmf"]
    abl_methods = [m for m in meta["methods"] if m in ABLATIONS]
    later = shown[1:] if len(shown) > 1 else shown  # click, conversion: the paper's Table 2 objectives
    # deterministic reference rankings on the same split (popularity), shown under the trained methods
    refs = [{"method": n, "seed": 0, "metrics": rows} for n, rows in meta.get("reference", {}).items()]
    fixed = [r["method"] for r in refs]
    t2, t2_rows = rep.accuracy_table(records + refs, main_methods + fixed, later, k, fixed=fixed)
    t2e, _ = rep.accuracy_table(records + refs, main_methods + fixed, shown[:1], k, fixed=fixed)
    t2f, _ = rep.accuracy_table(records, meta["methods"], shown, k, scorer="fused")
    t3, t3_rows = rep.accuracy_table(
        records, abl_methods, shown, k, reference="csmf" if "csmf" in abl_methods else None
    )
    if not any(m != "csmf" for m in abl_methods):  # csmf alone is not an ablation table
        t3, t3_rows = "", []
    t4, t4_rows = rep.serving_table(records, meta["methods"])
    verdict = rep.verdicts(records, main_methods, later, k) if "csmf" in main_methods else []
    if "csmf" in main_methods and "popularity" in fixed:
        verdict += rep.floor_verdicts(records + refs, shown, k)
    verdict3 = rep.verdicts(records, abl_methods, shown, k) if "csmf" in abl_methods else []
    figs = {"accuracy": rep.accuracy_figure(records, meta["methods"], later, k)}
    sweep_md = []
    for s in sorted({r["sweep"]["name"] for r in sweep_records}):
        pts = [
            {
                "value": r["sweep"]["value"],
                **m,
                "scorer": "own" if m["scorer"] == m["objective"] else m["scorer"],
            }
            for r in sweep_records
            if r["sweep"]["name"] == s
            for m in r["metrics"]
            if m["k"] == k
        ]
        sweep_md.append(
            f"### {s} sweep ({rep.SWEEPS[s][0]}; csmf retrained, seed 0)\n\n"
            + rep.sweep_table(pts, rep.SWEEPS[s][0], shown, k)
            + f"\n\n![{s}](figures/sweep_{s}.png)\n"
        )
        figs[f"sweep_{s}"] = rep.sweep_figure(pts, rep.SWEEPS[s][0], shown, k)
    wpts = [p for r in records for p in r.get("weight_sweep", [])]
    for param in sorted({p["param"] for p in wpts}):
        pts = [p for p in wpts if p["param"] == param]
        sweep_md.append(
            f"### fusion weight {param} (others at eval.fused_weights; trained csmf seed 0, no retraining)\n\n"
            + rep.sweep_table(pts, param, shown, k)
            + f"\n\n![{param}](figures/sweep_{param}.png)\n"
        )
        figs[f"sweep_{param}"] = rep.sweep_figure(pts, param, shown, k)
    for fname, fig in figs.items():
        fig.savefig(out_dir / "figures" / f"{fname}.png", dpi=110)
    md = _markdown(
        meta,
        seconds,
        t2,
        t2e,
        t2f,
        t3,
        t4,
        verdict,
        verdict3,
        sweep_md,
        rep.per_seed_table(records, shown, k),
        records,
    )
    path = out_dir / "comparison.md"
    path.write_text(md)
    (out_dir / "runs.json").write_text(
        json.dumps({"meta": meta, "runs": records, "sweeps": sweep_records}, indent=1, default=float)
    )
    return path, md, t2_rows, t3_rows, t4_rows


def rebuild_report(out_dir: str | Path) -> Path:
    """Render the report from the runs finished so far (runs.partial.jsonl) of an interrupted compare.

    The report says it is partial; wall time is the time from the start to the last finished run.
    A finished report (runs.json, no partial files) is rendered again from its own records, the same
    numbers in the current layout; its wall time is the one recorded in runs.json.
    """
    out_dir = Path(out_dir)
    if not (out_dir / "runs.partial.jsonl").exists() and (out_dir / "runs.json").exists():
        done = json.loads((out_dir / "runs.json").read_text())
        meta = done["meta"]
        if "wall_seconds" not in meta:
            raise ValueError(
                f"{out_dir / 'runs.json'} has no meta.wall_seconds (written before it was recorded)"
            )
        return render_report(done["runs"], done["sweeps"], meta, out_dir, meta["wall_seconds"])[0]
    meta = json.loads((out_dir / "meta.partial.json").read_text())
    recs = [json.loads(x) for x in (out_dir / "runs.partial.jsonl").read_text().splitlines() if x.strip()]
    meta["failures"] = [r for r in recs if "failed" in r]
    recs = [r for r in recs if "failed" not in r]
    records = [r for r in recs if "sweep" not in r]
    sweeps = [r for r in recs if "sweep" in r]
    seeds = sorted({r["seed"] for r in records})
    full = [s for s in seeds if {r["method"] for r in records if r["seed"] == s} >= set(meta["methods"])]
    meta = {
        **meta,
        "partial": f"interrupted: {len(records)} of {len(meta['methods']) * meta['seeds']} runs finished; "
        f"seeds with every method: {full}",
    }
    started = dt.datetime.fromisoformat(meta["started"])
    last = max(Path(out_dir / "runs.partial.jsonl").stat().st_mtime, started.timestamp())
    return render_report(records, sweeps, meta, out_dir, last - started.timestamp())[0]


def _protocol_lines(protocol: dict | None, records: list[dict]) -> list[str]:
    """The protocol paragraph: how every method was trained, tuned and given its fused weights."""
    if not protocol:
        return []
    lines = [f"- **Protocol**: {protocol['statement']}"]
    tuned = {m: keys for m, keys in (protocol.get("tuned") or {}).items() if keys}
    if protocol.get("tune_trials"):
        lines += [f"  - {m} tuned: `{json.dumps(keys, sort_keys=True)}`" for m, keys in sorted(tuned.items())]
    chosen: dict[str, list] = {}
    for r in records:
        if "protocol" in r:
            chosen.setdefault(r["method"], []).append(r["protocol"])
    for m, ps in chosen.items():
        lines.append(
            f"  - {m}: epochs kept {[p['epochs'] for p in ps]}; fused weights {[p['weights'] for p in ps]} "
            "(per seed)"
        )
    return lines


def _markdown(meta, seconds, t2, t2e, t2f, t3, t4, verdict, verdict3, sweep_md, per_seed, records) -> str:
    k = meta["k"]
    w = meta["window"]
    lines = [
        f"# Method comparison on `{meta['dataset']}`",
        "",
        "Generated by the `csmf-compare` Prefect flow; every number below comes from this run "
        f"(per-seed values at the end and in `runs.json`; MLflow parent run `{meta['mlflow_run_id']}`, "
        f"experiment `{COMPARE_EXPERIMENT}`).",
        "",
        *([f"- **Partial report**: {meta['partial']}"] if meta.get("partial") else []),
        f"- Command: `{meta['command']}`",
        f"- Machine: {meta['machine']}",
        *[f"- Note: {n}" for n in meta.get("notes", [])],
        *_protocol_lines(meta.get("protocol"), records),
        f"- Wall time: {seconds / 60:.1f} min ({len(records)} runs + sweeps, sequential)",
        f"- Data: `{meta['dataset_dir']}`; training days {w['train_dates'][0]} .. {w['train_dates'][-1]}, "
        f"evaluation day(s) {', '.join(w['eval_dates'])}",
        f"- Config digest {meta['config_digest']}, code {meta['code_version']}, train.epochs {meta['epochs']}"
        + (f", overrides {meta['overrides']}" if meta["overrides"] else ""),
        f"- Metrics: Recall@{k} / nDCG@{k} over the whole catalog (csmf_core.metrics), users with at least one "
        "positive of the objective on the evaluation day; cells are mean ± half-width of the 95% Student-t "
        f"interval over {meta['seeds']} seed(s) (n=1: no interval).",
        "",
        "## Accuracy (like the paper's Table 2): each objective ranked by the method's own score for it",
        "",
        t2,
        "",
        *[f"- {v}" for v in verdict],
        "",
        f"Exposure objective (methods that serve it):\n\n{t2e}",
        "",
        "![accuracy](figures/accuracy.png)",
        "",
        "## Fused ranking (weights "
        + (
            "chosen per method and seed on the validation users: Protocol above"
            if any("protocol" in r for r in records)
            else "eval.fused_weights"
        )
        + " over the objectives each method serves)",
        "",
        t2f,
        "",
    ]
    if t3:
        lines += [
            "## Ablations (like the paper's Table 3; relative change of the mean vs csmf)",
            "",
            t3,
            "",
            *[f"- {v}" for v in verdict3],
            "",
        ]
    lines += [
        "## Serving (like the paper's Table 4)",
        "",
        "Bytes/item: float32 item vectors a server stores per item (a vector shared by objectives counted once). "
        "Index: serialized flat inner-product FAISS index over the concatenation of the method's distinct item "
        "matrices, the index an exact fused query must search. Latency: exact fused top-"
        f"{k} per request (best of 3 passes), catalog tiled to {records[0]['serving']['latency_items']:,} rows, "
        f"FAISS threads: {records[0]['serving']['faiss_threads']}, on the machine above (noisy when shared).",
        "",
        t4,
        "",
    ]
    if sweep_md:
        lines += ["## Sensitivity (like the paper's Figures 4-5)", "", *sweep_md]
    if meta.get("failures"):
        lines += ["## Failed runs (left out of every table above)", ""]
        lines += [f"- {f['failed']} seed {f['seed']}: {f['error']}" for f in meta["failures"]] + [""]
    lines += ["## Per-seed values", "", per_seed, ""]
    return "\n".join(lines)
