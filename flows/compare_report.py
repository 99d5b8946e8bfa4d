"""The comparison report's numbers (issue 5): per-seed results -> Tables 2-4, sweeps, plots.

Pure functions over plain dicts (no Prefect, no MLflow), so the numbers can be recomputed and
tested. One *run record* per (method, seed):

    {"method": "csmf", "seed": 0, "metrics": [{"objective", "scorer", "k", "recall", "ndcg", "users"}],
     "train_seconds": 61.2, "n_params": 123456, "serving": {...serving_cost.serving_costs...}}

where scorer is the objective itself (the method's own per-objective ranking) or "fused".
Intervals are two-sided 95% Student-t intervals over seeds: mean +- t_{0.975, n-1} * s / sqrt(n)
with s the sample standard deviation (ddof = 1); with one seed there is no interval ("n=1").
The report page around these tables and figures: flows/compare_render.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402  (after choosing the backend)

# The sensitivity sweeps: the name `--sweeps` takes -> (the config key, its grid). Run by
# flows/compare.py (csmf retrained per value), tabulated and plotted here.
SWEEPS = {
    "tau": ("cpp.tau", (0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95)),  # paper Figure 4
    "eta": ("loss.eta", (1.2, 1.4, 1.6, 1.8, 2.0, 2.2)),  # paper Figure 5
}
# The fusion-weight sweep (`--sweeps weights`, no retraining): each objective's weight in turn takes
# these values, the others stay at eval.fused_weights.
WEIGHT_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)

# t_{0.975, df} for df = 1..30 (scipy.stats.t.ppf(0.975, df), 6 decimals)
_T975 = (
    12.706205,
    4.302653,
    3.182446,
    2.776445,
    2.570582,
    2.446912,
    2.364624,
    2.306004,
    2.262157,
    2.228139,
    2.200985,
    2.178813,
    2.160369,
    2.144787,
    2.13145,
    2.119905,
    2.109816,
    2.100922,
    2.093024,
    2.085963,
    2.079614,
    2.073873,
    2.068658,
    2.063899,
    2.059539,
    2.055529,
    2.051831,
    2.048407,
    2.04523,
    2.042272,
)
_Z975 = 1.959964


def t975(df: int) -> float:
    """Two-sided 95% Student-t quantile; beyond df 30 the Cornish-Fisher expansion (error < 1e-4)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, half-width of the 95% t-interval, n) of the finite values; half-width NaN when n < 2."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    n = len(v)
    if n == 0:
        return float("nan"), float("nan"), 0
    m = sum(v) / n
    if n < 2:
        return m, float("nan"), n
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1))
    return m, t975(n - 1) * s / math.sqrt(n), n


def metric_values(
    runs: list[dict], method: str, objective: str, metric: str, k: int, scorer: str | None = None
):
    """Per-seed values (seed order) of one metric of one method; scorer defaults to the own ranking."""
    scorer = scorer or objective
    out = []
    for r in sorted((r for r in runs if r["method"] == method), key=lambda r: r["seed"]):
        hit = [
            m[metric]
            for m in r["metrics"]
            if m["objective"] == objective and m["scorer"] == scorer and m["k"] == k
        ]
        if hit:
            out.append(hit[0])
    return out


def _fmt(m: float, h: float, n: int, digits: int = 4) -> str:
    if n == 0 or not math.isfinite(m):
        return "–"
    if not math.isfinite(h):
        return f"{m:.{digits}f} (n=1)"
    return f"{m:.{digits}f} ± {h:.{digits}f}"


def _methods(runs: list[dict], order: Sequence[str]) -> list[str]:
    have = {r["method"] for r in runs}
    return [m for m in order if m in have] + sorted(have - set(order))


def accuracy_table(
    runs: list[dict],
    methods: Sequence[str],
    objectives: Sequence[str],
    k: int,
    *,
    scorer: str | None = None,
    reference: str | None = None,
    fixed: Sequence[str] = (),
) -> tuple[str, list[dict]]:
    """Markdown table (mean ± 95% half-width over seeds) of Recall@k and nDCG@k per objective, and
    the same as rows. With `reference`, each cell also shows the relative change of the mean vs it.
    `fixed`: methods without training or seeds (popularity): one value, shown without an interval."""
    sc = None if scorer in (None, "own") else scorer
    cols = [(o, m) for o in objectives for m in ("recall", "ndcg")]
    head = (
        "| method | seeds | " + " | ".join(f"{o} {'R' if m == 'recall' else 'N'}@{k}" for o, m in cols) + " |"
    )
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    rows = []
    for meth in methods:
        cells, row = [], {"method": meth}
        nseeds = len({r["seed"] for r in runs if r["method"] == meth})
        for o, m in cols:
            mean, half, n = mean_ci(metric_values(runs, meth, o, m, k, sc))
            txt = _fmt(mean, half, n) if meth not in fixed or n == 0 else f"{mean:.4f}"
            if reference and meth != reference and n:
                ref, _, rn = mean_ci(metric_values(runs, reference, o, m, k, sc))
                if rn and ref > 0:
                    txt += f" ({100 * (mean / ref - 1):+.1f}%)"
            cells.append(txt)
            row[f"{o}/{m}@{k}"] = mean
            row[f"{o}/{m}@{k}/ci95"] = half
        row["seeds"] = nseeds
        label = f"{meth} (no training)" if meth in fixed else meth
        lines.append(f"| {label} | {'–' if meth in fixed else nseeds} | " + " | ".join(cells) + " |")
        rows.append(row)
    return "\n".join(lines), rows


def verdicts(
    runs: list[dict], methods: Sequence[str], objectives: Sequence[str], k: int, focus: str = "csmf"
) -> list[str]:
    """One honest sentence per (objective, metric): the best mean, and how `focus` compares to it
    (difference of means and whether the two 95% intervals overlap)."""
    out = []
    for o in objectives:
        for m in ("recall", "ndcg"):
            stats = {x: mean_ci(metric_values(runs, x, o, m, k)) for x in methods}
            stats = {x: s for x, s in stats.items() if s[2] > 0}
            if focus not in stats or len(stats) < 2:
                continue
            best = max(stats, key=lambda x: stats[x][0])
            fm = stats[focus][0]
            label = f"{o} {m}@{k}"
            if best == focus:
                runner = max((x for x in stats if x != focus), key=lambda x: stats[x][0])
                rm = stats[runner][0]
                out.append(
                    f"{label}: {focus} has the best mean ({fm:.4f}); runner-up {runner} {rm:.4f} "
                    f"({_overlap(stats[focus], stats[runner], 'not a significant win')})."
                )
            else:
                bm = stats[best][0]
                out.append(
                    f"{label}: {focus} does NOT have the best mean: {best} {bm:.4f} vs {focus} {fm:.4f} "
                    f"({_overlap(stats[focus], stats[best])})."
                )
    return out


def _overlap(a: tuple, b: tuple, if_overlap: str = "") -> str:
    """Whether two (mean, half-width, n) 95% intervals overlap, in words; with one seed there is none."""
    if min(a[2], b[2]) < 2:
        return "one seed: no interval, so no claim of significance either way"
    if _separated(a[0], a[1], b[0], b[1]):
        return "intervals do not overlap"
    return "intervals overlap" + (f": {if_overlap}" if if_overlap else "")


def floor_verdicts(
    runs: list[dict], objectives: Sequence[str], k: int, floor: str = "popularity", focus: str = "csmf"
) -> list[str]:
    """One sentence per (objective, metric): `focus` (mean and 95% interval over seeds) against the
    deterministic `floor` ranking: above or below it, and whether the interval clears it."""
    out = []
    for o in objectives:
        for m in ("recall", "ndcg"):
            fv = metric_values(runs, floor, o, m, k)
            fm, fh, n = mean_ci(metric_values(runs, focus, o, m, k))
            if not fv or n == 0:
                continue
            p = fv[0]
            side = "above" if fm > p else "BELOW"
            if math.isfinite(fh):
                clear = (fm - fh > p) if fm > p else (fm + fh < p)
                how = "the 95% interval clears it" if clear else "the 95% interval includes it"
            else:
                how = "one seed: no interval"
            out.append(f"{o} {m}@{k}: {focus} {fm:.4f} is {side} {floor} {p:.4f} ({how}).")
    return out


def _separated(m1: float, h1: float, m2: float, h2: float) -> bool:
    if not (math.isfinite(h1) and math.isfinite(h2)):
        return False
    return (m1 - h1) > (m2 + h2) or (m2 - h2) > (m1 + h1)


def serving_table(runs: list[dict], methods: Sequence[str]) -> tuple[str, list[dict]]:
    """Table-4-like markdown: storage, index size, fused latency (seed-mean), training time, params."""
    lines = [
        "| method | objectives | serving dim | bytes/item | item bytes total | FAISS index bytes | "
        "fused query ms/request (batch 1) | fused query ms/request (batched) | train s (mean ± 95%) | params |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for meth in methods:
        rs = [r for r in runs if r["method"] == meth]
        if not rs:
            continue
        s0 = rs[0]["serving"]
        bkey = next(k for k in s0 if k.startswith("latency_ms_batch") and k != "latency_ms_batch1")
        lat1 = sum(r["serving"]["latency_ms_batch1"] for r in rs) / len(rs)
        latb = sum(r["serving"][bkey] for r in rs) / len(rs)
        tm, th, tn = mean_ci([r["train_seconds"] for r in rs])
        objs = ",".join(
            sorted(
                {m["objective"] for r in rs for m in r["metrics"] if m["scorer"] == m["objective"]},
                key=lambda o: [m["objective"] for m in rs[0]["metrics"]].index(o),
            )
        )
        row = {
            "method": meth,
            "objectives": objs,
            "serving_dim": s0["serving_dim"],
            "item_bytes_per_item": s0["item_bytes_per_item"],
            "item_bytes_total": s0["item_bytes_total"],
            "index_bytes": s0["index_bytes"],
            "latency_ms_batch1": lat1,
            "latency_ms_batched": latb,
            "batch": int(bkey.removeprefix("latency_ms_batch")),
            "train_seconds": tm,
            "train_seconds_ci95": th,
            "n_params": rs[0]["n_params"],
        }
        rows.append(row)
        lines.append(
            f"| {meth} | {objs} | {row['serving_dim']} | {row['item_bytes_per_item']} | "
            f"{row['item_bytes_total']:,} | {row['index_bytes']:,} | {lat1:.3f} | {latb:.4f} | "
            f"{_fmt(tm, th, tn, 1)} | {row['n_params']:,} |"
        )
    return "\n".join(lines), rows


def per_seed_table(runs: list[dict], objectives: Sequence[str], k: int) -> str:
    """Every raw value behind the tables (own ranking and fused), one line per (method, seed)."""
    cols = [(o, s, m) for s in ("own", "fused") for o in objectives for m in ("recall", "ndcg")]
    lines = [
        "| method | seed | " + " | ".join(f"{o} {s} {m}@{k}" for o, s, m in cols) + " | train s |",
        "|" + "---|" * (len(cols) + 3),
    ]
    for r in sorted(runs, key=lambda r: (r["method"], r["seed"])):
        cells = []
        for o, s, m in cols:
            sc = o if s == "own" else "fused"
            v = [x[m] for x in r["metrics"] if x["objective"] == o and x["scorer"] == sc and x["k"] == k]
            cells.append(f"{v[0]:.4f}" if v and math.isfinite(v[0]) else "–")
        lines.append(
            f"| {r['method']} | {r['seed']} | " + " | ".join(cells) + f" | {r['train_seconds']:.1f} |"
        )
    return "\n".join(lines)


def sweep_table(points: list[dict], param: str, objectives: Sequence[str], k: int) -> str:
    """Sensitivity sweep: one line per value, Recall@k and nDCG@k (own ranking; fused where given)."""
    scorers = sorted({p["scorer"] for p in points}, key=lambda s: (s != "own", s))
    cols = [(o, s, m) for s in scorers for o in objectives for m in ("recall", "ndcg")]
    lines = [
        f"| {param} | " + " | ".join(f"{o} {s} {m}@{k}" for o, s, m in cols) + " |",
        "|" + "---|" * (len(cols) + 1),
    ]
    for value in sorted({p["value"] for p in points}, key=lambda v: (str(type(v)), v)):
        cells = []
        for o, s, m in cols:
            v = [
                p[m]
                for p in points
                if p["value"] == value and p["objective"] == o and p["scorer"] == s and p["k"] == k
            ]
            cells.append(f"{v[0]:.4f}" if v and math.isfinite(v[0]) else "–")
        lines.append(f"| {value} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- figures --------------------------------------------------------------------------------------
_COLORS = (
    "#4c72b0",
    "#dd8452",
    "#55a868",
    "#c44e52",
    "#8172b3",
    "#937860",
    "#da8bc3",
    "#8c8c8c",
    "#ccb974",
    "#64b5cd",
    "#2a9d8f",
    "#e76f51",
)


def accuracy_figure(runs: list[dict], methods: Sequence[str], objectives: Sequence[str], k: int) -> Figure:
    """Recall@k per method (bars = seed mean, error bars = 95% t half-width), one panel per objective."""
    fig = Figure(figsize=(max(5.0, 0.55 * len(methods) + 1.5) * len(objectives), 3.6), layout="constrained")
    axes = fig.subplots(1, len(objectives), squeeze=False)[0]
    for ax, o in zip(axes, objectives):
        xs, ms, hs, cs = [], [], [], []
        for j, meth in enumerate(methods):
            m, h, n = mean_ci(metric_values(runs, meth, o, "recall", k))
            if n:
                xs.append(meth)
                ms.append(m)
                hs.append(h if math.isfinite(h) else 0.0)
                cs.append(_COLORS[j % len(_COLORS)])
        ax.bar(range(len(xs)), ms, yerr=hs, color=cs, capsize=3)
        ax.set_xticks(range(len(xs)), xs, rotation=45, ha="right", fontsize="small")
        ax.set_title(f"{o}: Recall@{k}")
        ax.grid(axis="y", alpha=0.3)
        if ms:
            lo = min(m - h for m, h in zip(ms, hs))
            hi = max(m + h for m, h in zip(ms, hs))
            pad = 0.1 * max(hi - lo, 1e-3)
            ax.set_ylim(max(0.0, lo - pad), hi + pad)
    return fig


def sweep_figure(points: list[dict], param: str, objectives: Sequence[str], k: int) -> Figure:
    """Recall@k vs the swept value, one line per (objective, scorer)."""
    fig = Figure(figsize=(5.0, 3.4), layout="constrained")
    ax = fig.subplots()
    j = 0
    for s in sorted({p["scorer"] for p in points}):
        for o in objectives:
            pts = sorted(
                (p["value"], p["recall"])
                for p in points
                if p["objective"] == o
                and p["scorer"] == s
                and p["k"] == k
                and isinstance(p["value"], int | float)
            )
            if pts:
                ax.plot(
                    [a for a, _ in pts],
                    [b for _, b in pts],
                    marker="o",
                    color=_COLORS[j % len(_COLORS)],
                    label=f"{o} ({s})",
                )
                j += 1
    ax.set_xlabel(param)
    ax.set_ylabel(f"Recall@{k}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig
