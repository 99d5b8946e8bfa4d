"""The KuaiRand importer's file discovery and log rules on small hand-written files (no real data needed).

The official KuaiRand-1K layout: `log_standard_*_1k.csv`, `log_random_*_1k.csv`, `user_features_1k.csv`,
`video_features_basic_1k.csv`. Every expected value below is written by hand from the rows.
"""

from __future__ import annotations

import datetime as dt

import polars as pl
import pytest

from data_contracts import import_kuairand, load_spec
from data_contracts.kuairand import (
    ITEM_CATEGORICAL,
    ITEM_NUMERIC,
    USER_CATEGORICAL,
    USER_NUMERIC,
    USER_RENAMES,
)

# 2022-05-01 00:30 UTC and 2022-05-01 17:00 UTC (= 05-02 01:00 in Beijing, still 05-01 in UTC)
T0 = int(dt.datetime(2022, 5, 1, 0, 30, tzinfo=dt.UTC).timestamp() * 1000)
T1 = int(dt.datetime(2022, 5, 1, 17, 0, tzinfo=dt.UTC).timestamp() * 1000)
T2 = int(dt.datetime(2022, 5, 2, 9, 0, tzinfo=dt.UTC).timestamp() * 1000)


def _log(rows: list[tuple[int, int, int, int, int, int]]) -> pl.DataFrame:
    """(user_id, video_id, time_ms, is_click, is_like, long_view) rows with the official extra columns."""
    df = pl.DataFrame(
        rows, schema=["user_id", "video_id", "time_ms", "is_click", "is_like", "long_view"], orient="row"
    )
    return df.with_columns(date=pl.lit(20220501), hourmin=pl.lit(0), tab=pl.lit(1))


def _official_dir(path, suffix="1k"):
    path.mkdir(parents=True)
    _log([(7, 100, T0, 1, 1, 0), (7, 101, T1, 1, 0, 1), (8, 100, T2, 0, 0, 0)]).write_csv(
        path / f"log_standard_4_22_to_5_08_{suffix}.csv"
    )
    _log([(8, 101, T0, 1, 1, 1)]).write_csv(path / f"log_random_4_22_to_5_08_{suffix}.csv")
    source = {new: old for old, new in USER_RENAMES.items()}
    users = {"user_id": [7, 8]}
    users |= {
        source.get(c, c): ["high_active", "full_active"] if c == "user_active_degree" else [0, 1]
        for c in USER_CATEGORICAL
    }
    users |= {c: [3, 4] for c in USER_NUMERIC}
    pl.DataFrame(users).write_csv(path / f"user_features_{suffix}.csv")
    items = (
        {"video_id": [100, 101]}
        | {c: [1, 2] for c in ITEM_CATEGORICAL}
        | {c: [1.5, 2.5] for c in ITEM_NUMERIC}
    )
    items["tag"] = ["11,12", "13"]
    items["video_type"], items["upload_type"] = ["NORMAL", "AD"], ["ShortImport", "LongImport"]
    pl.DataFrame(items).write_csv(path / f"video_features_basic_{suffix}.csv")
    return path


def test_official_1k_layout(tmp_path):
    src = _official_dir(tmp_path / "KuaiRand-1K" / "data")
    s = import_kuairand(src, tmp_path / "out")
    # 3 standard-log rows (the random log's row is not read); UTC days 05-01 (2 rows) and 05-02 (1)
    assert s.rows == 3 and s.positives == {"exposure": 3, "click": 2, "conversion": 1}
    assert s.rows_per_partition == {"2022-05-01": 2, "2022-05-02": 1}
    assert (s.users, s.items, s.unknown_user_rows, s.unknown_item_rows) == (2, 2, 0, 0)
    spec = load_spec(tmp_path / "out")
    assert spec.name == s.name == "kuairand-1k" and "log_standard_4_22_to_5_08_1k.csv" in spec.provenance
    ev = pl.read_parquet(tmp_path / "out" / "events" / "dt=2022-05-01" / "part-0.parquet")
    assert ev.select("user_id", "item_id", "clicked", "converted").rows() == [
        (7, 100, True, True),
        (7, 101, True, False),
    ]
    items = pl.read_parquet(tmp_path / "out" / "items.parquet")
    assert items["tag"].to_list() == [11, 13]  # the first of the comma-separated tags
    lv = import_kuairand(src, tmp_path / "lv", conversion="long_view")
    assert lv.positives["conversion"] == 1  # (7, 101): click and long_view; (8, 100) has neither


def test_bad_logs_and_ambiguous_files_are_named(tmp_path):
    src = _official_dir(tmp_path / "a")
    _log([(7, 100, T0, 2, 0, 0), (7, 100, T0, 1, 0, 0), (8, 100, T0, 1, 0, 0)]).write_csv(
        src / "log_standard_4_08_to_4_21_1k.csv"
    )
    # file, column, rule and row count; nothing written
    with pytest.raises(
        ValueError, match=r"log_standard_4_08_to_4_21_1k.csv.*column is_click: 1 row not 0 or 1 \(of 3\)"
    ):
        import_kuairand(src, tmp_path / "o1")
    assert not (tmp_path / "o1").exists()
    bad = src / "log_standard_4_08_to_4_21_1k.csv"
    bad.write_text(
        f"user_id,video_id,time_ms,is_click,is_like,long_view\n,100,{T0},1,0,0\n7,100,{T0},1,0,0\n"
    )
    with pytest.raises(ValueError, match=r"4_21_1k.csv: column user_id: 1 row null \(of 2\)"):
        import_kuairand(src, tmp_path / "o1")
    bad.write_text(f"user_id,video_id,time_ms,is_click,is_like,long_view\n7,100,{T0}.5,1,0,0\n")
    with pytest.raises(ValueError, match=r"4_21_1k.csv: columns .* must be integers"):
        import_kuairand(src, tmp_path / "o1")
    bad.write_text(f"user_id,video_id,ts,is_click,is_like,long_view\n7,100,{T0},1,0,0\n")
    with pytest.raises(ValueError, match=r"4_21_1k.csv: missing columns \['time_ms'\]"):
        import_kuairand(src, tmp_path / "o1")
    assert not (tmp_path / "o1").exists()

    src = _official_dir(tmp_path / "b")
    (src / "user_features_pure.csv").write_bytes((src / "user_features_1k.csv").read_bytes())
    with pytest.raises(
        ValueError, match=r"2 files match user_features\*.csv .*user_features_1k.csv, user_features_pure.csv"
    ):
        import_kuairand(src, tmp_path / "o2")

    src = _official_dir(tmp_path / "c")
    (src / "log_standard_4_22_to_5_08_1k.csv").unlink()
    with pytest.raises(
        FileNotFoundError,
        match=r"no log_standard_\*.parquet or log_standard_\*.csv.*log_random_\* files are not read",
    ):
        import_kuairand(src, tmp_path / "o3")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        import_kuairand(tmp_path / "missing", tmp_path / "o4")
