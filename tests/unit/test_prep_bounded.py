"""The bounded-memory prep (request ids as integer codes, streaming engine, part-by-part output)
writes exactly what the previous implementation (tests/unit/prep_reference_v1.py) wrote."""

from __future__ import annotations

import json
from pathlib import Path

import prep_reference_v1 as ref  # tests/unit is on sys.path (pytest rootdir conftest)
import pyarrow.parquet as pq
import pytest
from test_prep import _ts, _write_hand_dataset

from csmf_core import prep, synth
from csmf_core.idmap import SEEN_FILES


def _same_output(a: Path, b: Path) -> None:
    """`b` (prep now) wrote exactly what `a` (the reference) wrote, plus only the id maps' additions
    (csmf_core/idmap.py: the *_seen.parquet files, meta.json `id_maps`) and the history counts
    (checked in tests/unit/test_prep.py)."""
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.parquet"))
    files_b = sorted(p.relative_to(b) for p in b.rglob("*.parquet"))
    added = [*SEEN_FILES.values(), prep.HISTORY_COUNTS]
    assert sorted(set(files_b) - set(files_a)) == sorted(Path(f) for f in added)
    assert set(files_a) <= set(files_b)
    for f in files_a:
        ta, tb = pq.read_table(a / f), pq.read_table(b / f)
        assert ta.schema == tb.schema, f
        assert ta.equals(tb), f"{f} differs"
    meta_a, meta_b = (json.loads((d / "meta.json").read_text()) for d in (a, b))
    assert meta_b.pop("id_maps")["base"] is None
    assert meta_a == meta_b


def _both(src: Path, tmp: Path, **kw) -> None:
    new = prep.prepare(src, tmp / "new", overwrite=True, **kw)
    old = ref.prepare(src, tmp / "old", overwrite=True, **kw)
    assert new.n_train == old.n_train and new.train_by_level == old.train_by_level
    _same_output(tmp / "old", tmp / "new")


@pytest.mark.slow
def test_tiny_world_identical_to_reference(tmp_path):
    s = synth.generate(tmp_path / "ds", "tiny", seed=3)
    # small parts so the part-by-part path writes several parts
    _both(s.out_dir, tmp_path, train_dates=(s.dates[0], s.dates[-2]), eval_dates=s.dates[-1], part_rows=2000)


def test_hand_dataset_identical_to_reference(tmp_path):
    src = _write_hand_dataset(tmp_path / "hand")
    _both(src, tmp_path, train_dates=("2026-01-01", "2026-01-03"), eval_dates="2026-01-04", seq_len=3,
          n_req_neg=2)  # fmt: skip


def test_request_spanning_days_identical_to_reference(tmp_path):
    """A request id seen on two train days (and ts outside its partition, a warning in the contract):
    its negatives are still gathered across both days, as before."""
    src = _write_hand_dataset(tmp_path / "hand")
    import polars as pl

    day3 = next((src / "events" / "dt=2026-01-03").glob("*.parquet"))
    df = pl.read_parquet(day3)
    extra = df.head(1).with_columns(
        pl.lit("r1").alias("request_id"), pl.lit(500).cast(df.schema["item_id"]).alias("item_id"),
        pl.lit(False).alias("exposed"), pl.lit(False).alias("clicked"), pl.lit(False).alias("converted"),
    )  # fmt: skip
    pl.concat([df, extra]).write_parquet(day3)
    _both(src, tmp_path, train_dates=("2026-01-01", "2026-01-03"), eval_dates="2026-01-04", seq_len=3,
          n_req_neg=3)  # fmt: skip
    items = pq.read_table(tmp_path / "new" / "items.parquet").to_pydict()
    i500 = items["c_iid"][items["item_id"].index(500)]
    train = pq.read_table(tmp_path / "new" / "train").to_pydict()
    r1_rows = [k for k, t in enumerate(train["ts"]) if t == _ts(1, 10)]  # r1's exposed rows (day 1)
    assert r1_rows and all(i500 in train["neg"][k] for k in r1_rows)
