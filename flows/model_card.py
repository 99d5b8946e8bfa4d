"""What the registry says about the model: the registered model's description and each version's card.

    card = version_card(facts, rows, k=50)            # markdown; its last section says "gate pending"
    card = with_gate(card, "promoted", reason)          # the gate task fills that section in
    client.update_model_version("csmf", v, description=card)
    client.update_registered_model("csmf", description=registered_description(objectives))

A renderer, apart from the runners: the register and gate tasks (flows/promotion.py) hand it plain
values; it imports nothing from the flows, so it can be tested on its own. Tables go through
`csmf_core.metrics.md_cell`, so no value can split a row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from csmf_core.metrics import md_cell

GATE_HEADING = "## Gate decision"
GATE_PENDING = "pending: the gate task decides after registration (flows/gate.py)"


def registered_description(objectives: Sequence[str]) -> str:
    """The registered model "csmf": what it is, its input and output, what its aliases mean."""
    objs = ", ".join(objectives)
    return "\n".join(
        [
            "CSMF (Cascaded Selective Mask Fine-Tuning, SIGIR 2025): one two-tower retrieval model "
            f"trained stage by stage over the objectives {objs}. The item side is one float32 vector "
            "per item (a FAISS index); any weighting of the objectives is one inner product, chosen "
            "per request.",
            "",
            "Input (pandas DataFrame or JSON dataframe_records): `user_id` (int64, required), `k` "
            "(1..10000, default 50), `weights` (one number >= 0 per objective, e.g. '1,1.8,1.2'; "
            "empty = the version's default fused weights). Output per row: `user_id`, `item_ids` "
            "(int64 list, best first), `scores` (float list), `cold_start` (unknown user id).",
            "",
            "Aliases: `champion` = the version the gate promoted (what `csmf recommend`, `embed`, "
            "`evaluate` and `mlflow models serve -m models:/csmf@champion` use); `challenger` = the "
            "newest daily run's version. Each version's description is its model card: training "
            "window, dataset and digest, objectives, config digest, metrics against popularity, and "
            "the gate's decision and why.",
        ]
    )


def version_card(facts: Mapping[str, object], rows: Sequence[dict], k: int) -> str:
    """A version's model card (markdown).

    facts: date, train_dates (list), eval_dates (list), dataset, dataset_dir, dataset_digest,
    objectives (list), config_digest, training_digest, code_version, parent_run_id, fused_weights;
    rows: csmf_core.evaluate.evaluate_model rows (objective, scorer, k, recall, ndcg, users)."""
    train = list(facts.get("train_dates") or [])
    evals = list(facts.get("eval_dates") or [])
    objectives = list(facts.get("objectives") or [])
    window = f"{train[0]} .. {train[-1]} ({len(train)} days)" if train else "?"
    lines = [
        f"# csmf model card: daily run for {facts.get('date', '?')}",
        "",
        "| field | value |",
        "|---|---|",
    ]
    fields = [
        ("training window", window),
        ("evaluation day(s)", ", ".join(evals) or "?"),
        ("dataset", facts.get("dataset", "?")),
        ("dataset directory", facts.get("dataset_dir", "?")),
        ("dataset digest", facts.get("dataset_digest", "?")),
        ("objectives (cascade order)", " -> ".join(objectives) or "?"),
        ("default fused weights", facts.get("fused_weights", "?")),
        ("config digest", facts.get("config_digest", "?")),
        ("training digest", facts.get("training_digest", "?")),
        ("code version", facts.get("code_version", "?")),
        ("MLflow parent run", facts.get("parent_run_id", "?")),
    ]
    lines += [f"| {md_cell(name)} | {md_cell(value)} |" for name, value in fields]
    lines += [
        "",
        f"## Metrics on the evaluation day(s), K = {k}",
        "",
        "Recall / nDCG over the evaluation users with at least one positive of the objective; "
        "popularity = items ranked by their positives in the training window (the reference to beat).",
        "",
        "| objective | users | own mode | fused | popularity | fused - popularity (recall) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    at_k = {(r["objective"], r["scorer"]): r for r in rows if r["k"] == k}
    for o in objectives:
        own, fused, pop = (at_k.get((o, s)) for s in (o, "fused", "popularity"))
        cell = lambda r: "" if r is None else f"{r['recall']:.4f} / {r['ndcg']:.4f}"  # noqa: E731
        gap = "" if fused is None or pop is None else f"{fused['recall'] - pop['recall']:+.4f}"
        users = next((r["users"] for r in (own, fused, pop) if r is not None), "")
        lines.append(f"| {md_cell(o)} | {users} | {cell(own)} | {cell(fused)} | {cell(pop)} | {gap} |")
    lines += ["", GATE_HEADING, "", GATE_PENDING]
    return "\n".join(lines) + "\n"


def with_gate(card: str, verdict: str, reason: str, days: Sequence[str] = ()) -> str:
    """`card` with its gate section replaced by the decision: "promoted" or "kept", and why."""
    head = card.split(GATE_HEADING, 1)[0].rstrip("\n")
    on = f" (measured on {', '.join(days)})" if days else ""
    text = {"promoted": "**promoted to champion**", "kept": "**not promoted**: the champion was kept"}
    return f"{head}\n\n{GATE_HEADING}\n\n{text.get(verdict, verdict)}{on}. {reason}\n"
