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
    # another third objective is another dataset: its own name, so tuned configs and reports never mix
    assert lv.name == load_spec(out).name == "kuairand-pure-slice-long-view" != summary.name
    # overwrite replaces an earlier dataset, never a folder of other files (nothing read or written)
    other = tmp_path / "work"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds no dataset.yaml"):
        import_kuairand(SRC, other, overwrite=True)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    # nor is anything written into the source directory
    with pytest.raises(ValueError, match="inside the source directory"):
        import_kuairand(SRC, SRC / "out")
    assert not (SRC / "out").exists()
    with pytest.raises(ValueError, match="conversion must be one of"):
        import_kuairand(SRC, tmp_path / "x", conversion="follow")


# The official download (https://kuairand.com): CSV logs, `_pure` / `_1k` / `_27k` file names,
# plus files the importer must leave alone (the random-exposure log, the statistics table).
OFFICIAL_LOG_COLUMNS = [
    "user_id", "video_id", "date", "hourmin", "time_ms", "is_click", "is_like", "is_follow",
    "is_comment", "is_forward", "is_hate", "long_view", "play_time_ms", "duration_ms",
    "profile_stay_time", "comment_stay_time", "is_profile_enter", "is_rand", "tab",
]  # fmt: skip


def test_official_csv_files_import_as_the_slice(imported, tmp_path):
    """The slice's rows written as the official CSV download import to the same tables, row for row."""
    summary, _ = imported
    src = tmp_path / "KuaiRand-Pure" / "data"
    src.mkdir(parents=True)
    for path in sorted(SRC.glob("log_standard_*.parquet")):
        first, last = path.stem.split("_")[2:4]  # log_standard_20220425_20220430
        name = f"log_standard_{int(first[4:6])}_{int(first[6:])}_to_{int(last[4:6])}_{int(last[6:])}_pure.csv"
        pl.read_parquet(path, columns=OFFICIAL_LOG_COLUMNS).write_csv(src / name)
    # the random-exposure log: every row a click and a like of user 1; none of it may be imported
    pl.read_parquet(next(SRC.glob("log_standard_*.parquet")), columns=OFFICIAL_LOG_COLUMNS).head(
        500
    ).with_columns(
        user_id=pl.lit(1, pl.Int64), is_click=pl.lit(1, pl.Int64), is_like=pl.lit(1, pl.Int64)
    ).write_csv(src / "log_random_4_22_to_5_08_pure.csv")
    for name in ("user_features_pure.csv", "video_features_basic_pure.csv"):
        (src / name).write_bytes((SRC / name).read_bytes())
    (src / "video_features_statistic_pure.csv").write_text("video_id,not,read\n1,2,3\n")

    out = tmp_path / "ds"
    got = import_kuairand(src, out)
    assert (got.rows, got.positives, got.rows_per_partition) == (
        summary.rows,
        summary.positives,
        summary.rows_per_partition,
    )
    spec, ref_spec = load_spec(out), load_spec(summary.out_dir)
    assert spec.name == "kuairand-pure" and "log_standard_4_25_to_4_30_pure.csv" in spec.provenance
    assert "log_random" not in spec.provenance and spec.features == ref_spec.features
    for rel in (
        "users.parquet",
        "items.parquet",
        "events/dt=2022-04-24/part-0.parquet",
        "events/dt=2022-05-08/part-0.parquet",
    ):
        assert pl.read_parquet(out / rel).equals(pl.read_parquet(summary.out_dir / rel)), rel
    # both kinds of log in one directory would count every exposure twice
    (src / "log_standard_20220425_20220430.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match=r"both Parquet .* and CSV .*keep one kind"):
        import_kuairand(src, tmp_path / "twice")
    assert not (tmp_path / "twice").exists()
