"""data_contracts.import_kuairand on the real slice in ../shared/data/kuairand (skipped when absent).

Reference counts are the ones stated in that directory's README (all 228,329 log rows).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import polars as pl
import pytest

from data_contracts import import_kuairand, label_like, load_spec, validate_dataset

_REPO = Path(__file__).resolve().parents[2]
# The slice lives next to the repository (../shared/...); CSMF_KUAIRAND_DIR points elsewhere.
_CANDIDATES = [
    os.environ.get("CSMF_KUAIRAND_DIR", ""),
    _REPO.parent / "shared/data/kuairand",
    _REPO / "shared/data/kuairand",
]
SRC = next(
    (Path(c) for c in _CANDIDATES if c and (Path(c) / "user_features_pure.csv").is_file()),
    Path(_CANDIDATES[1]),
)
pytestmark = pytest.mark.skipif(
    not (SRC / "user_features_pure.csv").is_file(), reason=f"KuaiRand slice not at {SRC}"
)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    out = tmp_path_factory.mktemp("kuairand") / "ds"
    start = time.perf_counter()
    summary = import_kuairand(SRC, out)
    return summary, time.perf_counter() - start


def test_counts_match_the_readme(imported):
    summary, seconds = imported
    assert summary.rows == 228_329
    assert summary.positives == {"exposure": 228_329, "click": 100_900, "conversion": 3_212}
    assert (summary.event_users, summary.event_items) == (25_156, 6_361)
    assert (summary.users, summary.items) == (27_285, 7_583)
    assert summary.unknown_user_rows == summary.unknown_item_rows == 0
    assert sum(summary.rows_per_partition.values()) == 228_329
    # UTC days: the first Beijing day (04-25) starts at 2022-04-24 16:00 UTC.
    assert summary.partitions[0] == "2022-04-24" and summary.partitions[-1] == "2022-05-08"
    assert seconds < 60, f"import took {seconds:.1f} s"


def test_imported_dataset_validates(imported):
    summary, _ = imported
    start = time.perf_counter()
    report = validate_dataset(summary.out_dir)
    assert report.ok and report.violations == [], str(report)
    assert report.counts["positives"] == summary.positives
    assert report.counts["rows_per_partition"] == summary.rows_per_partition
    assert time.perf_counter() - start < 30


def test_layout_and_spec(imported):
    summary, _ = imported
    out = summary.out_dir
    spec = load_spec(out)
    assert (
        spec.name == "kuairand-pure-slice" and "59b6e922" in spec.provenance and "is_like" in spec.provenance
    )
    assert [(o.name, o.column) for o in spec.objectives] == [
        ("exposure", "exposed"),
        ("click", "clicked"),
        ("conversion", "converted"),
    ]
    for table, key, features in (
        ("users", "user_id", spec.features.users),
        ("items", "item_id", spec.features.items),
    ):
        schema = pl.read_parquet_schema(out / f"{table}.parquet")
        assert list(schema) == [key, *features.categorical, *features.numeric]
        assert schema[key] == pl.Int64
        assert [c for c in features.columns if label_like(c)] == []
    events = pl.read_parquet(out / "events" / "dt=2022-05-06" / "part-0.parquet")
    assert events.schema == pl.Schema(
        {
            "request_id": pl.String,
            "user_id": pl.Int64,
            "item_id": pl.Int64,
            "ts": pl.Datetime("us", "UTC"),
            "exposed": pl.Boolean,
            "clicked": pl.Boolean,
            "converted": pl.Boolean,
        }
    )
    assert events["request_id"].null_count() == events.height
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_existing_output_needs_overwrite_and_long_view_option(imported, tmp_path):
    summary, _ = imported
    with pytest.raises(FileExistsError, match="overwrite=True"):
        import_kuairand(SRC, summary.out_dir)
    out = tmp_path / "lv"
    out.mkdir()
    lv = import_kuairand(SRC, out, conversion="long_view", overwrite=True)
    assert lv.positives["conversion"] == 70_713
    assert "long_view" in load_spec(out).provenance
    with pytest.raises(ValueError, match="conversion must be one of"):
        import_kuairand(SRC, tmp_path / "x", conversion="follow")
