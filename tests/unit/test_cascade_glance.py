"""The cascade at a glance (issue #17 item 5): the per-step table and figure the daily flow logs on its
parent run, from the test/by_step metrics the steps logged (flows/reporting.py cascade_rows and
log_cascade, flows/figures.py cascade_figure). The integration run checks the same artifacts in the
store (tests/integration/test_pipeline.py::test_cascade_at_a_glance)."""

from __future__ import annotations

import io

from csmf_core.cascade import plan
from csmf_core.config import build_config
from flows.reporting import cascade_rows, log_cascade
from flows.tracking import NullTracker

OBJECTIVES = ["exposure", "click", "conversion"]


def _history(steps) -> dict[str, dict[int, float]]:
    """What the steps log on the parent: objective o from its stage on, at step = the step index; the
    values encode (step, objective, metric, k) so a misplaced cell cannot match."""
    out: dict[str, dict[int, float]] = {}
    for i, step in enumerate(steps):
        for t, o in enumerate(OBJECTIVES[: step.stage + 1]):
            for m_i, m in enumerate(("recall", "ndcg")):
                for k in (10, 50):
                    out.setdefault(f"test/by_step/{o}/{m}_at_{k}", {})[i] = i + t / 10 + m_i / 100 + k / 1e5
    return out


def test_rows_name_every_step_and_match_the_logged_metrics():
    steps = plan(OBJECTIVES, build_config(None, ["recover.epochs=1"]))
    history = _history(steps)
    rows = cascade_rows(
        [(i, s.name, s.kind, OBJECTIVES[s.stage]) for i, s in enumerate(steps)], history, OBJECTIVES, (10, 50)
    )
    assert [r["name"] for r in rows] == [s.name for s in steps]
    assert rows[0]["name"] == "pretrain_exposure" and rows[-1]["name"] == "finetune_conversion"
    for i, (row, step) in enumerate(zip(rows, steps)):
        for t, o in enumerate(OBJECTIVES):
            for m_i, m in enumerate(("recall", "ndcg")):
                for k in (10, 50):
                    want = i + t / 10 + m_i / 100 + k / 1e5 if t <= step.stage else None
                    assert row[f"{o} {m}@{k}"] == want, (step.name, o, m, k)


def test_log_cascade_writes_table_markdown_and_a_labelled_figure():
    steps = plan(OBJECTIVES, build_config(None, ["recover.epochs=1"]))
    rows = cascade_rows(
        [(i, s.name, s.kind, OBJECTIVES[s.stage]) for i, s in enumerate(steps)],
        _history(steps),
        OBJECTIVES,
        (50,),
    )
    logged: dict[str, object] = {}

    class Recording(NullTracker):
        def log_table(self, rows, artifact_file):
            logged[artifact_file] = rows

        def log_text(self, text, artifact_file):
            logged[artifact_file] = text

        def log_figure(self, figure, artifact_file):
            logged[artifact_file] = figure

    log_cascade(Recording(), rows, OBJECTIVES, 50, "2026-01-06")
    assert logged["metrics/by_step.json"] == rows
    md = logged["metrics/by_step.md"]
    assert "2026-01-06" in md and "test split" in md
    assert all(f"| {s.name} |" in md for s in steps)
    fig = logged["figures/cascade.png"]
    recall_ax, ndcg_ax = fig.axes
    assert [t.get_text() for t in recall_ax.get_xticklabels()] == [s.name for s in steps]
    assert "Recall@50" in recall_ax.get_ylabel() and "2026-01-06" in recall_ax.get_ylabel()
    lines = {ln.get_label(): ln for ln in recall_ax.get_lines()}
    assert sorted(lines) == sorted(OBJECTIVES)
    click = [r["click recall@50"] for r in rows]
    xs = [i for i, v in enumerate(click) if v is not None]
    assert list(lines["click"].get_xdata()) == xs
    assert list(lines["click"].get_ydata()) == [click[i] for i in xs]
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue()[:4] == b"\x89PNG"
