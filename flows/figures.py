"""Figures for the tracking store (matplotlib, Agg backend, object-oriented API: safe in task threads).

    fig = recall_at_k_figure(rows)                 # rows of csmf_core.evaluate.evaluate_model
    fig = ownership_figure({"cpp_prune_exposure": units_per_stage, ...}, stages)
    tracker.log_figure(fig, "figures/recall_at_k.png")

Figures are built with `matplotlib.figure.Figure` directly (no pyplot global state to leak).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402  (after choosing the backend)

SCORERS = ("own", "fused", "popularity")
_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")


def recall_at_k_figure(rows: list[dict], scorers: tuple[str, ...] = SCORERS) -> Figure:
    """Recall@K vs K, one panel per objective, one line per scorer ("own" = the objective's own mode)."""
    objectives = list(dict.fromkeys(r["objective"] for r in rows))
    fig = Figure(figsize=(4.2 * max(1, len(objectives)), 3.4), layout="constrained")
    axes = fig.subplots(1, max(1, len(objectives)), squeeze=False)[0]
    for ax, obj in zip(axes, objectives):
        for j, scorer in enumerate(scorers):
            name = obj if scorer == "own" else scorer
            pts = sorted((r["k"], r["recall"]) for r in rows if r["objective"] == obj and r["scorer"] == name)
            if pts:
                ax.plot([k for k, _ in pts], [v for _, v in pts], marker="o", color=_COLORS[j], label=scorer)
        ks = sorted({r["k"] for r in rows if r["objective"] == obj})
        ax.set_title(obj)
        ax.set_xlabel("K")
        ax.set_xscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Recall@K")
    axes[0].legend(loc="upper left", fontsize="small")
    return fig


def ownership_figure(snapshots: dict[str, dict[str, list[int]]], stages: list[str]) -> Figure:
    """Share of units per owner stage in every unit group (stacked; unit count in the tick label),
    one panel per snapshot (e.g. after each pruning).

    snapshots: {title: {group: [units owned by stage 0, stage 1, ...]}} (masks.json units_per_stage).
    """
    fig = Figure(
        figsize=(max(6.0, 0.5 * _n_groups(snapshots) + 2), 2.8 * max(1, len(snapshots))), layout="constrained"
    )
    axes = fig.subplots(max(1, len(snapshots)), 1, squeeze=False)[:, 0]
    for ax, (title, groups) in zip(axes, snapshots.items()):
        names = list(groups)
        totals = [max(1, sum(groups[g])) for g in names]
        bottom = [0.0] * len(names)
        for s, stage in enumerate(stages):
            values = [(groups[g][s] if s < len(groups[g]) else 0) / n for g, n in zip(names, totals)]
            ax.bar(range(len(names)), values, bottom=bottom, color=_COLORS[s % len(_COLORS)], label=stage)
            bottom = [b + v for b, v in zip(bottom, values)]
        labels = [f"{g} ({sum(groups[g])})" for g in names]
        ax.set_xticks(range(len(names)), labels, rotation=45, ha="right", fontsize="x-small")
        ax.set_ylim(0, 1)
        ax.set_ylabel("share of units")
        ax.set_title(title, fontsize="small")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=len(stages), fontsize="small")
    return fig


def _n_groups(snapshots: dict[str, dict[str, list[int]]]) -> int:
    return max((len(g) for g in snapshots.values()), default=1)


def cascade_figure(rows: list[dict], objectives: list[str], k: int, days: str) -> Figure:
    """Every objective's metric after each cascade step (the cascade at a glance): one panel per metric
    (Recall@k, nDCG@k), x = the steps in plan order labelled with their names, one line per objective
    (its own mode; absent before the objective's stage is trained).

    rows: `flows.reporting.cascade_rows` (one per step: "step", "name", and "<objective> recall@k" /
    "<objective> ndcg@k" values or None); days: the evaluation day(s) the metrics were measured on."""
    names = [r["name"] for r in rows]
    fig = Figure(figsize=(max(7.0, 0.85 * len(names) + 2.5), 4.4), layout="constrained")
    axes = fig.subplots(1, 2, squeeze=False)[0]
    xs = list(range(len(names)))
    for ax, metric, label in zip(axes, ("recall", "ndcg"), (f"Recall@{k}", f"nDCG@{k}")):
        for j, o in enumerate(objectives):
            pts = [
                (x, r[f"{o} {metric}@{k}"])
                for x, r in zip(xs, rows)
                if r.get(f"{o} {metric}@{k}") is not None
            ]
            if pts:
                ax.plot([x for x, _ in pts], [v for _, v in pts], marker="o", color=_COLORS[j % 6], label=o)
        ax.set_xticks(xs, names, rotation=35, ha="right", fontsize="small")
        ax.set_ylabel(f"{label} (test: {days})")
        ax.set_title(f"{label} after each step")  # short: two panels' long titles ran into each other
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best", fontsize="small", title="objective (own mode)")
    fig.suptitle("Each objective after every cascade step")
    return fig
