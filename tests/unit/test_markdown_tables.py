"""Every markdown table csmf writes keeps one cell per column in every row (issue #17 item 2).

gate.md's exact_fusion detail reads "max |fused - sum k_t s_t| = ...": unescaped, its `|` split the row
and the cell showed only "max". The tables are rendered from real objects (a trained tiny bundle's
gate checks, evaluation rows, pruning and validation reports) and parsed here with GitHub's rule: a
row splits on every `|` not preceded by a backslash.
"""

from __future__ import annotations

import re

import pytest

from csmf_core.evaluate import gaps_table
from csmf_core.metrics import format_metrics_table, md_cell
from csmf_core.serving import Recommender, metrics_table
from data_contracts import validate_dataset
from flows import gate
from flows.reporting import log_pruning
from flows.tracking import NullTracker

_SPLIT = re.compile(r"(?<!\\)\|")


def cells(line: str) -> list[str]:
    """The cells of one table row, unescaped (`\\|` -> `|`, `\\\\` -> `\\`)."""
    inner = line.strip()
    assert inner.startswith("|") and inner.endswith("|") and not inner.endswith("\\|"), line
    parts = _SPLIT.split(inner[1:-1])
    return [re.sub(r"\\(.)", r"\1", p.strip()) for p in parts]


def tables(markdown: str) -> list[list[list[str]]]:
    """Each table (consecutive lines starting with `|`) as its rows of cells, the delimiter row dropped."""
    out, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.strip().startswith("|"):
            current.append(line)
        elif current:
            out.append([cells(r) for r in current if not re.fullmatch(r"\|[\s:|-]+\|", r.strip())])
            current = []
    return out


def assert_rectangular(markdown: str, n_tables: int | None = None) -> list[list[list[str]]]:
    found = tables(markdown)
    assert found, markdown
    if n_tables is not None:
        assert len(found) == n_tables, markdown
    for table in found:
        header = table[0]
        for row in table[1:]:
            assert len(row) == len(header), f"{len(row)} cells for {len(header)} columns: {row}"
    return found


def test_md_cell_round_trips():
    for text in ("max |fused - sum k_t s_t| = 1e-07", "a\\|b", "plain", "|", "back\\slash|"):
        assert cells(f"| {md_cell(text)} | x |") == [text, "x"]
    assert md_cell("two\nlines") == "two lines"


@pytest.fixture(scope="module")
def rec(tiny_world):
    return Recommender.load(tiny_world["bundle"])


def test_gate_md_has_one_cell_per_column(rec, tiny_world):
    users = gate._sample_users(rec, 20, seed=0)
    check = gate.check_exact_fusion(rec, users, [rec.default_weights])
    assert "max |fused - sum k_t s_t|" in check.detail  # the text that split the row
    decision = gate.Decision(
        True,
        "first model | no champion yet",
        [check, gate.Check("frozen_parameters", True, "a | b")],
        {"exposure/fused/recall@50": 0.3, "click|odd/recall@50": 0.2},
        {"exposure/fused/recall@50": 0.25},
        "1",
        ["2026-01-06"],
        {"exposure": 10},
    )
    checks, comparison = assert_rectangular(decision.to_markdown(), n_tables=2)
    assert checks[0] == ["check", "ok", "detail"]
    assert checks[1] == ["exact_fusion", "yes", check.detail]  # the whole detail, not "max"
    assert checks[2] == ["frozen_parameters", "yes", "a | b"]
    assert comparison[2][0] == "click|odd/recall@50" and comparison[1][3] == "+0.0500"


def test_metric_gap_pruning_and_validation_tables(rec, tiny_world):
    rows, gaps = rec.evaluate_with_gaps(tiny_world["mr"], ks=(10, 50), gaps_k=50)
    (t,) = assert_rectangular(metrics_table(rows), n_tables=1)
    assert len(t) == len(rows) + 1
    (t,) = assert_rectangular(gaps_table(gaps), n_tables=1)
    assert len(t) == len(gaps) + 1
    (t,) = assert_rectangular(format_metrics_table([{"name": "a|b", "v": 1.0}, {"name": "c", "w": None}]), 1)
    assert t == [["name", "v", "w"], ["a|b", "1.0000", ""], ["c", "", ""]]

    texts: dict[str, str] = {}

    class Recording(NullTracker):
        def log_text(self, text, artifact_file):
            texts[artifact_file] = text

    layer = {"group": "user.mlp|0", "units_before": 8, "units_freed": 2, "units_kept": 6, "weights_freed": 4}
    layer |= {"edges_removed": 3, "mass_total": 1.5, "mass_share_pruned": 0.25}
    log_pruning(Recording(), {"layers": [layer], "units": {"user.mlp|0": [6, 2, 0]}}, rec.objectives, "cpp")
    (t,) = assert_rectangular(texts["prune/layers.md"], n_tables=1)
    assert t[1][0] == "user.mlp|0"
    assert_rectangular(validate_dataset(tiny_world["ds"]).to_markdown())


def test_model_card_tables_and_gate_section(rec, tiny_world):
    from flows.model_card import GATE_PENDING, version_card, with_gate

    rows = rec.evaluate(tiny_world["mr"], ks=(10, 50))
    facts = {"date": "2026-01-06", "train_dates": ["2026-01-01", "2026-01-05"], "eval_dates": ["2026-01-06"]}
    facts |= {"objectives": rec.objectives, "dataset_dir": "/data/a|b"}
    card = version_card(facts, rows, 50)
    fields, metrics = assert_rectangular(card, n_tables=2)
    assert ["dataset directory", "/data/a|b"] in fields
    assert [r[0] for r in metrics[1:]] == rec.objectives
    fused = {r["objective"]: r for r in rows if r["scorer"] == "fused" and r["k"] == 50}
    pop = {r["objective"]: r for r in rows if r["scorer"] == "popularity" and r["k"] == 50}
    for row in metrics[1:]:
        o = row[0]
        assert row[3] == f"{fused[o]['recall']:.4f} / {fused[o]['ndcg']:.4f}"
        assert row[5] == f"{fused[o]['recall'] - pop[o]['recall']:+.4f}"
    assert GATE_PENDING in card
    decided = with_gate(with_gate(card, "kept", "worse than champion v1"), "promoted", "no metric below v1")
    assert GATE_PENDING not in decided and decided.count("## Gate decision") == 1
    assert decided.endswith("**promoted to champion**. no metric below v1\n")
    assert decided.startswith(card.split("## Gate decision")[0])
