"""`csmf replay`'s days, comparison and report (flows/replay.py), on hand-made days; the real runs are
in tests/integration/test_replay.py."""

from __future__ import annotations

import math

import pytest

from flows.replay import Day, render, replay_days, report_dir, summarize

DATES = ["2026-01-01", "2026-01-02", "2026-01-03", "2026-01-04"]


def test_replay_days_are_the_partitions_in_the_range():
    assert replay_days(DATES, "2026-01-02", "2026-01-03") == ["2026-01-02", "2026-01-03"]
    assert replay_days(DATES, "2026-01-04", "2026-01-04") == ["2026-01-04"]


@pytest.mark.parametrize(
    ("first", "last", "message"),
    [
        ("2026-01-01", "2026-01-03", "first day: a run for it has no earlier day"),
        ("2026-01-03", "2026-01-02", "is after --to"),
        ("2026-01-02", "2026-01-09", "--to 2026-01-09: the dataset has no partition"),
        ("2026-1-2", "2026-01-03", "is not YYYY-MM-DD"),
    ],
)
def test_replay_days_refuses(first, last, message):
    with pytest.raises(ValueError, match=message):
        replay_days(DATES, first, last)


def _day(date, line, mode, cascade, wall, rows, recall, version="1"):
    return Day(
        date=date,
        line=line,
        mode=mode,
        version=version,
        promoted=True,
        gate_reason="",
        wall_s=wall,
        cascade_s=cascade,
        select_s=1.0,
        rows=rows,
        metrics={"click/own/recall": recall, "click/own/ndcg": recall / 2, "click/popularity/recall": 0.1},
    )


DAYS = [
    # the incremental line's first day fell back to a full retrain: not compared
    _day("2026-01-02", "full", "full", 90.0, 120.0, 1000, 0.40),
    _day("2026-01-02", "incremental", "full", 90.0, 120.0, 1000, 0.40),
    _day("2026-01-03", "full", "full", 100.0, 130.0, 1100, 0.50),
    _day("2026-01-03", "incremental", "incremental", 20.0, 40.0, 100, 0.55),
    _day("2026-01-04", "full", "full", 120.0, 150.0, 1200, 0.60),
    _day("2026-01-04", "incremental", "incremental", 30.0, 50.0, 120, 0.50),
]


def test_summary_compares_the_incremental_days_only():
    s = summarize(DAYS)
    assert s["days"] == ["2026-01-03", "2026-01-04"]
    t = s["time"]
    # by hand: full cascade (100 + 120) / 2 = 110, incremental (20 + 30) / 2 = 25 -> 25 / 110
    assert t["full_cascade_s"] == 110.0 and t["incremental_cascade_s"] == 25.0
    assert t["cascade_ratio"] == pytest.approx(0.227272727)
    assert t["wall_ratio"] == pytest.approx(45.0 / 140.0)
    assert t["full_rows"] == 1150.0 and t["incremental_rows"] == 110.0
    assert t["met"] is True
    r = s["recall"]["click"]
    # full 0.5, 0.6: mean 0.55, s = 0.0707107, half = t(0.975, 1) 12.706205 * s / sqrt(2) = 0.6353102
    assert r["full_mean"] == pytest.approx(0.55)
    assert r["full_half"] == pytest.approx(0.6353102, rel=1e-6)
    assert r["incremental_mean"] == pytest.approx(0.525)
    # paired: +0.05, -0.10 -> mean -0.025, s = 0.1060660, half = 12.706205 * 0.075 = 0.9529654
    assert r["diff"] == pytest.approx(-0.025)
    assert r["diff_half"] == pytest.approx(0.9529654, rel=1e-6)
    assert r["verdict"] == "within the interval" and r["n"] == 2


def test_summary_verdicts_and_target():
    slow = [
        _day("2026-01-03", "full", "full", 100.0, 130.0, 1100, 0.50),
        _day("2026-01-03", "incremental", "incremental", 31.0, 40.0, 100, 0.40),
        _day("2026-01-04", "full", "full", 100.0, 130.0, 1100, 0.51),
        _day("2026-01-04", "incremental", "incremental", 31.0, 40.0, 100, 0.41),
    ]
    s = summarize(slow)
    assert s["time"]["cascade_ratio"] == pytest.approx(0.31) and s["time"]["met"] is False
    # full 0.50, 0.51: half = 12.706205 * 0.0070711 / sqrt(2) = 0.0635310; 0.405 < 0.505 - 0.0635
    assert s["recall"]["click"]["verdict"] == "below the interval"
    better = summarize(
        [*DAYS[:2], DAYS[2], _day("2026-01-03", "incremental", "incremental", 20.0, 40.0, 100, 0.7)]
    )
    assert better["recall"]["click"]["verdict"] == "better or equal"
    assert math.isnan(better["recall"]["click"]["full_half"])  # one day: no interval


def test_summary_with_one_line_has_nothing_to_compare():
    s = summarize([d for d in DAYS if d.line == "full"])
    assert s == {"days": [], "time": {}, "recall": {}}


def test_render_lists_every_day_and_line():
    meta = {
        "dataset": "synth-tiny",
        "from": "2026-01-02",
        "to": "2026-01-04",
        "k": 50,
        "command": "csmf replay ...",
        "machine": "test",
        "started": "s",
        "ended": "e",
        "seconds": 60.0,
        "lines": ["full", "incremental"],
        "homes": {"full": "/h/full", "incremental": "/h/incremental"},
    }
    md = render(DAYS, summarize(DAYS), meta)
    assert "| cascade steps, s (target <= 0.3x) | 110.0 | 25.0 | **0.227** (met) |" in md
    assert "| click | 0.5500 ± 0.6353 | 0.5250 | -0.0250 ± 0.9530 | within the interval |" in md
    assert "| 2026-01-03 | incremental | incremental | 0.5500 | - | 0.1000 |" in md
    assert "| 2026-01-02 | incremental | full | 90.0 | 1.0 | 120.0 | 1,000 | v1 | promoted |" in md


def test_report_dir_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="without a replay report"):
        report_dir("x", tmp_path)
    assert report_dir("synth", None, cwd=tmp_path) == (tmp_path / "reports" / "synth").resolve()
    with pytest.raises(ValueError, match="cannot name a directory"):
        report_dir("../etc", None, cwd=tmp_path)


def test_replay_trains_without_a_tuned_config_on_the_days_it_was_chosen_on(tmp_path, monkeypatch):
    """`csmf replay` handed the home's tuned file to every day's run as a named file, so a replay of
    days before the tune's date stopped on its first day (a named file chosen on them is refused)."""
    from flows import replay

    tuned = tmp_path / "tuned.yaml"
    tuned.write_text("# read: the days before 2026-01-06 (...)\ntrain: {lr: 0.004}\n")
    given = []

    def run_day(line, home, data, date, *, config, overrides, tuned, k):
        given.append((date, tuned))
        return replay.Day(date, line, "full", "1", True, "first model", 1.0, 0.5, 0.1, 10)

    monkeypatch.setattr(replay, "run_day", run_day)
    said = []
    days = ["2026-01-05", "2026-01-06"]
    kw = dict(config=None, overrides=[], tuned=tuned, k=50, say=said.append)
    replay.replay(tmp_path, days, {"full": tmp_path / "full"}, **kw)
    assert given == [("2026-01-05", None), ("2026-01-06", tuned)]
    assert any("2026-01-05: the tuned config" in s and "not applied" in s for s in said)
    given.clear()
    replay.replay(tmp_path, days, {"full": tmp_path / "full"}, **kw, tuned_explicit=True)  # named: as given
    assert given == [("2026-01-05", tuned), ("2026-01-06", tuned)]
