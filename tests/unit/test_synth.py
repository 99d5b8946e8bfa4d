"""Synthetic world generator: determinism, cascade, rates, layout (tiny preset)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from csmf_core import synth


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, synth.SynthSummary, float]:
    out = tmp_path_factory.mktemp("synth") / "tiny"
    t0 = time.perf_counter()
    summary = synth.generate(out, "tiny", seed=0)
    return out, summary, time.perf_counter() - t0


@pytest.fixture(scope="module")
def events(tiny) -> pl.DataFrame:
    return pl.read_parquet(tiny[0] / "events" / "**" / "*.parquet", hive_partitioning=True)


def test_layout_schema_and_yaml(tiny):
    out, summary, seconds = tiny
    assert seconds < 6.0  # target < 3 s; slack for a loaded machine
    meta = yaml.safe_load((out / "dataset.yaml").read_text())
    assert meta["name"] == "synth-tiny" and "--preset tiny --seed 0" in meta["provenance"]
    assert [(o["name"], o["column"]) for o in meta["objectives"]] == list(synth.OBJECTIVES)
    assert meta["features"] == synth.FEATURES
    assert summary.dates == [f"2026-01-0{d}" for d in range(1, 7)]
    assert sorted(p.name for p in (out / "events").iterdir()) == [f"dt={d}" for d in summary.dates]
    schema = pq.read_schema(summary.event_paths[0])
    assert schema.field("ts").type == pa.timestamp("us", tz="UTC")
    assert schema.field("request_id").type == pa.string()
    assert schema.field("user_id").type == schema.field("item_id").type == pa.int64()
    assert all(schema.field(c).type == pa.bool_() for _, c in synth.OBJECTIVES)
    users, items = pl.read_parquet(out / "users.parquet"), pl.read_parquet(out / "items.parquet")
    assert users.height == 300 and items.height == 200
    assert users["user_id"].n_unique() == 300 and items["item_id"].n_unique() == 200
    for side, table in (("users", users), ("items", items)):
        spec = synth.FEATURES[side]
        assert set(spec["categorical"] + spec["numeric"]) <= set(table.columns)
    assert users["age_bucket"].null_count() > 0  # nulls exist to exercise prep


def test_cascade_rates_and_requests(tiny, events):
    _, summary, _ = tiny
    e, c, v = events["exposed"], events["clicked"], events["converted"]
    assert not (c & ~e).any() and not (v & ~c).any()
    n_e, n_c, n_v = int(e.sum()), int(c.sum()), int(v.sum())
    assert summary.counts == {"exposure": n_e, "click": n_c, "conversion": n_v}
    assert 15_000 < n_e < 25_000
    assert 0.025 < n_c / n_e < 0.1  # target 5 %
    assert 0.05 < n_v / n_c < 0.2  # target 10 %
    assert (~e).sum() > 0.3 * events.height  # unexposed candidates are written
    per_req = events.group_by("request_id").agg(
        pl.len().alias("n"),
        pl.col("exposed").sum().alias("e"),
        pl.col("ts").n_unique().alias("n_ts"),
        pl.col("user_id").n_unique().alias("n_u"),
        pl.col("item_id").n_unique().alias("n_i"),
    )
    assert per_req.height == summary.n_requests == 6 * 340
    assert (
        (per_req["e"] == 10).all() and (per_req["n"] <= 20).all() and (per_req["n"] == per_req["n_i"]).all()
    )
    assert (per_req["n_ts"] == 1).all() and (per_req["n_u"] == 1).all()
    # Every event lands in the partition of its UTC date.
    assert (events["ts"].dt.date().cast(pl.String) == events["dt"].cast(pl.String)).all()
    users = pl.read_parquet(tiny[0] / "users.parquet")["user_id"]
    assert events["user_id"].is_in(users.implode()).all()


def test_deterministic_by_seed(tiny, tmp_path):
    out, _, _ = tiny
    again = synth.generate(tmp_path / "again", "tiny", seed=0)
    assert _hashes(out) == _hashes(again.out_dir)
    other = synth.generate(tmp_path / "other", "tiny", seed=1)
    h0, h1 = _hashes(out), _hashes(other.out_dir)
    assert h0.keys() == h1.keys()
    assert all(h0[k] != h1[k] for k in h0 if k.startswith("events") or k.endswith("parquet"))


def test_days_are_independent_of_run_length(tiny, tmp_path):
    out, _, _ = tiny
    short = synth.generate(tmp_path / "short", "tiny", seed=0, n_days=2)
    for p in short.event_paths:
        rel = p.relative_to(short.out_dir)
        assert p.read_bytes() == (out / rel).read_bytes()


def test_overwrite_guard(tmp_path):
    target = tmp_path / "ds"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        synth.generate(target, "tiny", n_days=1)
    assert (target / "keep.txt").exists()
    # overwrite replaces an earlier dataset only, never a folder of other files
    with pytest.raises(FileExistsError, match="holds no dataset.yaml"):
        synth.generate(target, "tiny", n_days=1, overwrite=True)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    (target / "dataset.yaml").write_text("name: old\n")
    s = synth.generate(target, "tiny", n_days=1, overwrite=True)
    assert not (target / "keep.txt").exists() and s.counts["exposure"] == 3400
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_truth_and_how_objectives_differ(tiny, events):
    out, summary, _ = tiny
    truth = np.load(out / "_truth" / "world.npz")
    P = truth["user_factors"]  # (n_users, T, r)
    assert P.shape == (300, 3, 8)
    np.testing.assert_array_equal(
        np.sort(truth["user_ids"]), np.sort(pl.read_parquet(out / "users.parquet")["user_id"])
    )
    # Objective factors share rho = 0.3 of their variance (the default): correlation ~ rho.
    corr = np.corrcoef(P[:, 0].ravel(), P[:, 1].ravel())[0, 1]
    assert 0.15 < corr < 0.45
    assert summary.intercepts["click"] == pytest.approx(float(truth["intercepts"][0]))
    # Conversion (not exposure or click) depends on price vs budget.
    uid = {int(x): k for k, x in enumerate(truth["user_ids"])}
    iid = {int(x): k for k, x in enumerate(truth["item_ids"])}
    u = np.array([uid[x] for x in events["user_id"].to_list()])
    i = np.array([iid[x] for x in events["item_id"].to_list()])
    over = truth["log_price"][i] > truth["log_budget"][u] + 0.5
    clicked, conv, exposed = (events[c].to_numpy() for c in ("clicked", "converted", "exposed"))
    cvr_over, cvr_under = conv[clicked & over].mean(), conv[clicked & ~over].mean()
    assert cvr_over < 0.6 * cvr_under
    ctr_over, ctr_under = clicked[exposed & over].mean(), clicked[exposed & ~over].mean()
    assert 0.6 < ctr_over / ctr_under < 1.6
