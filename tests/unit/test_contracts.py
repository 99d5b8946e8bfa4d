"""data_contracts: dataset.yaml parsing and every validation rule, on tiny hand-built datasets."""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from data_contracts import (
    RULES,
    ContractError,
    DatasetSpec,
    Objective,
    SpecError,
    clean_events_lazy,
    infer_features,
    label_like,
    load_spec,
    parse_spec,
    partition_files,
    read_name,
    validate_dataset,
    write_spec,
)

DAY = "2026-11-21"
FILE = f"events/dt={DAY}/part-0.parquet"
SPEC = {
    "name": "tiny",
    "provenance": "hand-built in tests/unit/test_contracts.py",
    "objectives": [
        {"name": "exposure", "column": "exposed"},
        {"name": "click", "column": "clicked"},
        {"name": "conversion", "column": "converted"},
    ],
    "features": {
        "users": {"categorical": ["age_bucket"], "numeric": ["activity"]},
        "items": {"categorical": ["category"], "numeric": ["price"]},
    },
}


def make_events(n: int = 10, day: str = DAY, req_offset: int = 0) -> pl.DataFrame:
    """`n` valid events on `day`: 2 candidates per request, every 2nd row clicked, every 4th converted."""
    base = dt.datetime.fromisoformat(day).replace(tzinfo=dt.UTC)
    return pl.DataFrame(
        {
            "request_id": [f"r{req_offset + i // 2}" for i in range(n)],
            "user_id": [1 + (i // 2) % 4 for i in range(n)],
            "item_id": [1 + i % 20 for i in range(n)],
            "ts": [base + dt.timedelta(minutes=i) for i in range(n)],
            "exposed": [True] * n,
            "clicked": [i % 2 == 0 for i in range(n)],
            "converted": [i % 4 == 0 for i in range(n)],
        },
        schema_overrides={"ts": pl.Datetime("us", "UTC")},
    )


def write_dataset(root: Path, events=None, users=None, items=None, spec=None) -> Path:
    """Write a canonical dataset: `events` maps a day to a DataFrame, a list of them (one file each),
    raw bytes (a corrupt file) or None (an empty partition directory)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.yaml").write_text(yaml.safe_dump(SPEC if spec is None else spec, sort_keys=False))
    if users is None:
        users = pl.DataFrame(
            {"user_id": [1, 2, 3, 4], "age_bucket": ["a", "b", "a", "c"], "activity": [0.1, 0.5, 0.2, 0.9]}
        )
    if items is None:
        items = pl.DataFrame(
            {
                "item_id": list(range(1, 21)),
                "category": [i % 3 for i in range(20)],
                "price": [float(i) for i in range(20)],
            }
        )
    users.write_parquet(root / "users.parquet")
    items.write_parquet(root / "items.parquet")
    for day, content in ({DAY: make_events()} if events is None else events).items():
        part = root / "events" / f"dt={day}"
        part.mkdir(parents=True, exist_ok=True)
        for i, frame in enumerate(content if isinstance(content, list) else [content]):
            if isinstance(frame, bytes):
                (part / f"part-{i}.parquet").write_bytes(frame)
            elif frame is not None:
                frame.write_parquet(part / f"part-{i}.parquet")
    return root


def only(report, rule: str):
    found = [v for v in report.violations if v.rule == rule]
    assert len(found) == 1, f"expected one {rule} violation, got {report.violations}"
    return found[0]


def assert_reported(v, *, rule, file, column, rows, severity="error"):
    assert (v.rule, v.file, v.column, v.rows, v.severity) == (rule, file, column, rows, severity)
    text = str(v)
    assert file in text and f"rule: {rule}" in text and (column is None or column in text)
    if rows:
        assert f"{rows} rows" in text


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()
    }


# ---------------------------------------------------------------- dataset.yaml


def test_spec_round_trip(tmp_path):
    spec = parse_spec(SPEC)
    assert spec.objective_columns == ("exposed", "clicked", "converted")
    write_spec(tmp_path, spec)
    assert load_spec(tmp_path) == spec


def test_spec_rejects_unknown_keys_and_lists_every_problem():
    bad = {**SPEC, "owner": "me", "objectives": [{"name": "click", "column": "clicked", "weight": 1}]}
    with pytest.raises(SpecError) as err:
        parse_spec(bad)
    msg = str(err.value)
    assert "unknown keys ['owner']" in msg and "unknown keys ['weight']" in msg and "at least 2" in msg
    with pytest.raises(SpecError, match="duplicate columns"):
        parse_spec(
            {**SPEC, "objectives": [{"name": "a", "column": "clicked"}, {"name": "b", "column": "clicked"}]}
        )
    with pytest.raises(SpecError, match=r"features.users: unknown keys \['text'\]"):
        parse_spec({**SPEC, "features": {"users": {"text": ["bio"]}}})


def test_a_feature_named_like_the_row_id_column_is_refused_or_not_inferred():
    """A users column `uid` (an items column `iid`) listed as a feature became the model-ready column
    c_uid, the row id's: the cascade trained with the user-id embedding replaced by that feature and
    only build_index failed, blaming the config. dataset.yaml refuses it; inference leaves it out."""
    with pytest.raises(
        SpecError, match=r"features.users: a categorical feature named 'uid' would take .*\(c_uid\)"
    ):
        parse_spec({**SPEC, "features": {"users": {"categorical": ["uid"]}}})
    with pytest.raises(SpecError, match=r"features.items: a categorical feature named 'iid'"):
        parse_spec({**SPEC, "features": {"items": {"categorical": ["iid"]}}})
    # numeric ones become n_uid / n_iid, and the other table's name is free
    parse_spec(
        {
            **SPEC,
            "features": {
                "users": {"categorical": ["iid"], "numeric": ["uid"]},
                "items": {"categorical": ["uid"]},
            },
        }
    )
    users = pl.DataFrame({"user_id": [1, 2], "uid": [7, 8], "age": ["a", "b"]})
    assert infer_features(users, "user_id") == {"categorical": ["age"], "numeric": []}


def test_spec_without_features_and_write_refuses_invalid(tmp_path):
    spec = parse_spec({k: v for k, v in SPEC.items() if k != "features"})
    assert spec.features is None
    bad = DatasetSpec("x", "y", (Objective("a", "a"), Objective("b", "user_id")))
    with pytest.raises(SpecError, match="key column"):
        write_spec(tmp_path, bad)


# ---------------------------------------------------------------- clean dataset, counts, selection


def test_clean_dataset_validates(tmp_path):
    root = write_dataset(
        tmp_path / "d", events={DAY: make_events(), "2026-11-22": make_events(6, "2026-11-22", 50)}
    )
    report = validate_dataset(root)
    assert report.ok and report.violations == [], str(report)
    assert report.counts["rows"] == 16
    assert report.counts["rows_per_partition"] == {DAY: 10, "2026-11-22": 6}
    assert report.counts["positives"] == {"exposure": 16, "click": 8, "conversion": 5}
    assert report.raise_if_errors() is report
    only_one = validate_dataset(root, dates=["2026-11-22"])
    assert only_one.partitions == ["2026-11-22"] and only_one.counts["rows"] == 6
    missing = validate_dataset(root, dates=[dt.date(2026, 11, 30)])
    assert_reported(
        only(missing, "missing_path"), rule="missing_path", file="events/dt=2026-11-30", column=None, rows=0
    )


def test_accepted_variants(tmp_path):
    """ts in ms, request_id categorical or all-null (Null type) are fine: canonicalised on read."""
    ev = make_events().with_columns(
        pl.col("ts").dt.cast_time_unit("ms"), pl.col("request_id").cast(pl.Categorical)
    )
    nul = make_events(4, req_offset=100).with_columns(request_id=pl.lit(None))
    assert nul.schema["request_id"] == pl.Null
    report = validate_dataset(write_dataset(tmp_path / "d", events={DAY: [ev, nul]}))
    assert report.ok and not report.violations, str(report)
    assert clean_events_lazy(tmp_path / "d").collect_schema()["ts"] == pl.Datetime("us", "UTC")


# ---------------------------------------------------------------- file-level rules


def test_missing_files(tmp_path):
    root = write_dataset(tmp_path / "d")
    (root / "users.parquet").unlink()
    (root / "dataset.yaml").unlink()
    report = validate_dataset(root)
    assert {(v.rule, v.file) for v in report.errors} == {
        ("missing_path", "users.parquet"),
        ("missing_path", "dataset.yaml"),
    }
    assert not validate_dataset(tmp_path / "nowhere").ok


def test_invalid_spec_is_reported(tmp_path):
    root = write_dataset(tmp_path / "d", spec={**SPEC, "labels": ["x"]})
    v = only(validate_dataset(root), "spec")
    assert v.file == "dataset.yaml" and "unknown keys ['labels']" in str(v)


def test_missing_column(tmp_path):
    report = validate_dataset(write_dataset(tmp_path / "d", events={DAY: make_events().drop("clicked")}))
    assert_reported(
        only(report, "missing_column"), rule="missing_column", file=FILE, column="clicked", rows=0
    )
    assert not report.ok


def test_wrong_type_user_id_as_string(tmp_path):
    ev = make_events().with_columns(pl.col("user_id").cast(pl.String))
    v = only(validate_dataset(write_dataset(tmp_path / "d", events={DAY: ev})), "wrong_type")
    assert_reported(v, rule="wrong_type", file=FILE, column="user_id", rows=0)
    assert "cast(pl.Int64)" in v.fix


@pytest.mark.parametrize("dtype", [pl.Int8, pl.Int16, pl.Int32, pl.UInt8, pl.UInt16, pl.UInt32])
def test_narrower_integer_ids_are_accepted(tmp_path, dtype):
    """Ids of any integer type whose values are all int64 values pass (read as int64 downstream);
    uint64 (half its range is not int64) and floats do not."""
    ev = make_events().with_columns(pl.col("user_id").cast(dtype), pl.col("item_id").cast(dtype))
    assert validate_dataset(write_dataset(tmp_path / "d", events={DAY: ev})).ok
    for bad in (pl.UInt64, pl.Float64):
        ev = make_events().with_columns(pl.col("item_id").cast(bad))
        v = only(validate_dataset(write_dataset(tmp_path / f"d{bad}", events={DAY: ev})), "wrong_type")
        assert v.column == "item_id" and "expected int64" in v.message


def test_narrow_ids_prepare_the_same_model_ready_data(tmp_path):
    """A dataset whose ids are int32 / uint32 (events, users, items) gives byte-identical model-ready
    tables to the same dataset with int64 ids."""
    import glob

    from csmf_core import prep, synth

    s = synth.generate(tmp_path / "wide", "tiny", seed=1)
    shutil.copytree(tmp_path / "wide", tmp_path / "narrow")
    narrow = tmp_path / "narrow"
    for f in glob.glob(str(narrow / "events" / "*" / "*.parquet")):
        ev = pl.read_parquet(f)
        ev.with_columns(pl.col("user_id").cast(pl.Int32), pl.col("item_id").cast(pl.UInt32)).write_parquet(f)
    for name, col, dtype in (("users.parquet", "user_id", pl.Int32), ("items.parquet", "item_id", pl.UInt32)):
        pl.read_parquet(narrow / name).with_columns(pl.col(col).cast(dtype)).write_parquet(narrow / name)
    assert pl.read_parquet_schema(narrow / "users.parquet")["user_id"] == pl.Int32
    # one partition in two files whose id types differ (int32 / uint32 and int64): each passes
    # the contract, and the readers stack them (data_contracts.scan_partition) in the files' order
    day = narrow / "events" / f"dt={s.dates[2]}"
    (f,) = sorted(day.glob("*.parquet"))
    ev = pl.read_parquet(f)
    half = ev.height // 2
    f.unlink()
    ev[:half].write_parquet(day / "part-00000.parquet")
    ev[half:].with_columns(pl.col("user_id", "item_id").cast(pl.Int64)).write_parquet(
        day / "part-00001.parquet"
    )
    assert validate_dataset(narrow).ok
    outs = {}
    for name in ("wide", "narrow"):
        out = tmp_path / f"mr_{name}"
        prep.prepare(tmp_path / name, out, train_dates=(s.dates[0], s.dates[-2]), eval_dates=s.dates[-1])
        outs[name] = out
    files = sorted(p.relative_to(outs["wide"]) for p in outs["wide"].rglob("*.parquet"))
    assert files and files == sorted(p.relative_to(outs["narrow"]) for p in outs["narrow"].rglob("*.parquet"))
    for rel in files:
        a, b = pl.read_parquet(outs["wide"] / rel), pl.read_parquet(outs["narrow"] / rel)
        assert a.schema == b.schema and a.equals(b), rel
    # the serving bundle's readers of the canonical events: histories and item statistics rows
    from csmf_core import bundle

    users = np.sort(pl.read_parquet(tmp_path / "wide" / "users.parquet")["user_id"].to_numpy())
    items = np.sort(pl.read_parquet(tmp_path / "wide" / "items.parquet")["item_id"].to_numpy())
    objectives = [o.name for o in load_spec(tmp_path / "wide").objectives]
    got = {}
    for name in ("wide", "narrow"):
        ds = tmp_path / name
        parts = [v for _, v in sorted(partition_files(ds).items())]
        hist = bundle.user_histories(ds, users, items, objectives, s.dates[-1], 5)
        got[name] = (hist, bundle.event_rows(ds, objectives, items, parts))
    for o in objectives[1:]:
        assert np.array_equal(got["wide"][0][o], got["narrow"][0][o]) and got["wide"][0][o].any()
    for a, b in zip(got["wide"][1], got["narrow"][1]):
        assert np.array_equal(a, b)


def test_label_as_int_is_wrong_type(tmp_path):
    ev = make_events().with_columns(pl.col("clicked").cast(pl.Int8))
    v = only(validate_dataset(write_dataset(tmp_path / "d", events={DAY: ev})), "wrong_type")
    assert v.column == "clicked" and "pl.Boolean" in v.fix


def test_naive_timestamp(tmp_path):
    ev = make_events().with_columns(pl.col("ts").dt.replace_time_zone(None))
    v = only(validate_dataset(write_dataset(tmp_path / "d", events={DAY: ev})), "naive_timestamp")
    assert_reported(v, rule="naive_timestamp", file=FILE, column="ts", rows=0)
    assert "replace_time_zone('UTC')" in str(v)


def test_corrupt_parquet_names_the_file_and_other_files_still_checked(tmp_path):
    root = write_dataset(
        tmp_path / "d",
        events={DAY: [make_events(), b"not parquet" * 20], "2026-11-22": make_events(4, "2026-11-22", 50)},
    )
    report = validate_dataset(root)
    v = only(report, "corrupt_file")
    assert_reported(v, rule="corrupt_file", file=f"events/dt={DAY}/part-1.parquet", column=None, rows=0)
    assert report.counts["rows_per_partition"] == {DAY: 10, "2026-11-22": 4}
    assert [v.rule for v in report.violations] == ["corrupt_file"]  # the other files are clean


def test_corrupt_data_pages_found_on_read(tmp_path):
    root = write_dataset(tmp_path / "d", events={DAY: [make_events(), make_events(4, req_offset=50)]})
    path = root / "events" / f"dt={DAY}" / "part-1.parquet"
    raw = path.read_bytes()
    path.write_bytes(raw[:20] + b"x" * 30 + raw[50:])  # footer intact, first data page broken
    report = validate_dataset(root)
    assert [(v.rule, v.file) for v in report.errors] == [("corrupt_file", f"events/dt={DAY}/part-1.parquet")]
    assert report.counts["rows"] == 10


def test_empty_partitions(tmp_path):
    root = write_dataset(
        tmp_path / "d", events={DAY: make_events(), "2026-11-22": None, "2026-11-23": make_events().head(0)}
    )
    report = validate_dataset(root)
    found = sorted((v.file, v.message) for v in report.violations if v.rule == "empty_partition")
    assert found == [
        ("events/dt=2026-11-22", "partition has no Parquet files"),
        ("events/dt=2026-11-23", "partition has zero event rows"),
    ]
    assert report.rules("error") == {"empty_partition"}


def test_stray_partition_name(tmp_path):
    root = write_dataset(tmp_path / "d")
    (root / "events" / "day=1").mkdir()
    (root / "events" / "_SUCCESS").write_text("")  # hidden marker files are ignored
    v = only(validate_dataset(root), "partition_name")
    assert v.file == "events/day=1"


def test_non_parquet_entries_in_a_partition_are_named(tmp_path):
    root = write_dataset(tmp_path / "d", events={DAY: make_events(), "2026-11-22": None})
    day = root / "events" / f"dt={DAY}"
    (day / "README.md").write_text("exported by job 7")
    make_events(4, req_offset=40).write_csv(day / "part-2.csv")  # events that would never be read
    (day / "nested").mkdir()
    (day / "_SUCCESS").write_text("")  # hidden marker files stay silent
    (root / "events" / "dt=2026-11-22" / "day.csv").write_text("a,b\n")
    report = validate_dataset(root)
    found = {v.file: v for v in report.violations if v.rule == "stray_file"}
    assert set(found) == {f"events/dt={DAY}", "events/dt=2026-11-22"}
    v = found[f"events/dt={DAY}"]
    assert v.severity == "warning" and v.rows == 0
    assert "3 entries are not *.parquet files and never read: README.md, nested, part-2.csv" in str(v)
    assert "convert it to Parquet" in v.fix
    assert "1 entry is not a *.parquet file and never read: day.csv" in found["events/dt=2026-11-22"].message
    # the CSV-only partition is still an empty partition (an error); the rows of day 1 are unchanged
    assert report.rules("error") == {"empty_partition"} and report.counts["rows_per_partition"] == {DAY: 10}


def test_partition_files_are_what_validation_lists(tmp_path):
    """Readers (prep, the serving bundle) scan exactly the partitions and files validation checks:
    ISO-named partitions with Parquet files, name order, hidden files and other names left out."""
    root = write_dataset(tmp_path / "d", events={DAY: [make_events(), make_events(4)], "2026-11-22": None})
    day = root / "events" / f"dt={DAY}"
    (day / "_SUCCESS").write_text("")
    (day / ".part-9.parquet").write_bytes(b"hidden")
    (day / "notes.csv").write_text("a\n")
    for stray in ("dt=20261123", "dt=..", "dt=2026-13-40"):
        (root / "events" / stray).mkdir()
        (root / "events" / stray / "part-0.parquet").write_bytes(b"never read")
    assert partition_files(root) == {DAY: [day / "part-0.parquet", day / "part-1.parquet"]}
    assert partition_files(tmp_path / "nothing") == {}


def test_read_name_is_the_written_name_or_none(tmp_path):
    """The label of a dataset before validation: as written (unchecked), None when it cannot be read."""
    root = write_dataset(tmp_path / "d")
    assert read_name(root) == "tiny"
    (root / "dataset.yaml").write_text(yaml.safe_dump({**SPEC, "name": "../x", "extra": 1}))
    assert read_name(root) == "../x"  # not load_spec's job here: report_out_dir checks it
    for text in ("name: [unclosed", "- a list", "provenance: p\n"):
        (root / "dataset.yaml").write_text(text)
        assert read_name(root) is None
    assert read_name(tmp_path / "missing") is None


# ---------------------------------------------------------------- row-level rules


def test_cascade_violation(tmp_path):
    ev = make_events().with_columns(  # rows 1, 3, 5: clicked=false, now converted=true
        converted=pl.when(pl.int_range(pl.len()).is_in([1, 3, 5])).then(True).otherwise(pl.col("converted"))
    )
    report = validate_dataset(write_dataset(tmp_path / "d", events={DAY: ev}))
    v = only(report, "cascade")
    assert_reported(v, rule="cascade", file=FILE, column="converted", rows=3)
    assert "3 rows have converted=true but clicked=false" in str(v)
    assert len(v.examples) == 3 and all(e["converted"] and not e["clicked"] for e in v.examples)
    with pytest.raises(ContractError) as err:
        report.raise_if_errors()
    assert str(v) in str(err.value) and err.value.report is report


def test_null_keys_and_labels(tmp_path):
    ev = make_events().with_columns(
        item_id=pl.when(pl.int_range(pl.len()) < 2).then(None).otherwise(pl.col("item_id")),
        request_id=pl.lit(None, pl.String),  # allowed
        clicked=pl.when(pl.int_range(pl.len()) == 9).then(None).otherwise(pl.col("clicked")),
    )
    report = validate_dataset(write_dataset(tmp_path / "d", events={DAY: ev}))
    assert_reported(only(report, "null_key"), rule="null_key", file=FILE, column="item_id", rows=2)
    assert_reported(only(report, "null_label"), rule="null_label", file=FILE, column="clicked", rows=1)
    assert report.rules() == {"null_key", "null_label"}


def test_duplicate_rows_within_a_partition_across_files(tmp_path):
    ev = make_events()
    copies = ev.head(2)  # same (request_id, user_id, item_id) again, in a second file
    no_req = make_events(4, req_offset=70).with_columns(request_id=pl.lit(None, pl.String))
    report = validate_dataset(write_dataset(tmp_path / "d", events={DAY: [ev, copies, no_req, no_req]}))
    v = only(report, "duplicate_event")
    col = "request_id, user_id, item_id"
    assert_reported(v, rule="duplicate_event", file=f"events/dt={DAY}/part-1.parquet", column=col, rows=2)


def test_unknown_ids_are_warnings(tmp_path):
    ev = make_events().with_columns(
        user_id=pl.when(pl.int_range(pl.len()) < 3).then(99).otherwise(pl.col("user_id"))
    )
    report = validate_dataset(write_dataset(tmp_path / "d", events={DAY: ev}))
    v = only(report, "unknown_id")
    assert_reported(v, rule="unknown_id", file=FILE, column="user_id", rows=3, severity="warning")
    assert "handled as unknown" in str(v) and report.ok


def _leaky(n_leaked: int = 3) -> dict:
    """Issue #13 item 6: training partition DAY also holds `n_leaked` events of the next day (the
    evaluation day), in a second file; the evaluation partition is clean."""
    leaked = make_events(n_leaked, "2026-11-22", 90)
    return {DAY: [make_events(), leaked], "2026-11-22": make_events(10, "2026-11-22", 50)}


def test_partition_date_mismatch_is_an_error(tmp_path):
    report = validate_dataset(write_dataset(tmp_path / "d", events=_leaky(3)))
    v = only(report, "partition_date")
    leak_file = f"events/dt={DAY}/part-1.parquet"
    assert_reported(v, rule="partition_date", file=leak_file, column="ts", rows=3)
    assert not report.ok and report.rules("error") == {"partition_date"}
    assert "3 rows have a UTC date of ts other than the partition's 2026-11-21" in str(v)
    assert [e["ts"][:10] for e in v.examples] == ["2026-11-22"] * 3 and "dt=<" in v.fix
    with pytest.raises(ContractError, match="partition_date"):
        report.raise_if_errors()


def test_partition_date_quarantine_drops_the_misfiled_rows(tmp_path):
    root = write_dataset(tmp_path / "d", events=_leaky(3))
    before = tree_hashes(root)
    qdir = tmp_path / "q"
    over = validate_dataset(root, max_violation_rate=0.1, quarantine_dir=qdir)  # 3 of 23 rows > 10%
    assert only(over, "partition_date").severity == "error" and not over.ok
    report = validate_dataset(root, max_violation_rate=0.2, quarantine_dir=qdir)  # 3/23 = 13% <= 20%
    assert report.ok and report.quarantined == {"partition_date": 3}, str(report)
    assert only(report, "partition_date").severity == "warning"
    assert report.quarantine_files == [qdir / f"dt={DAY}.parquet"]
    bad = pl.read_parquet(qdir / f"dt={DAY}.parquet")
    assert bad.height == 3 and set(bad["reason"]) == {"partition_date:ts"}
    assert set(bad["source_file"]) == {f"events/dt={DAY}/part-1.parquet"}
    day1 = clean_events_lazy(root, dates=[DAY]).collect()
    assert day1.equals(make_events())  # exactly the 10 rows that belong to the day
    assert clean_events_lazy(root).collect().height == 20
    assert tree_hashes(root) == before


def _no_clicks(day: str) -> pl.DataFrame:
    return make_events(8, day, 60).with_columns(clicked=pl.lit(False), converted=pl.lit(False))


def test_evaluation_day_without_positives_is_a_warning(tmp_path):
    root = write_dataset(tmp_path / "d", events={DAY: make_events(), "2026-11-22": _no_clicks("2026-11-22")})
    report = validate_dataset(root, eval_dates=["2026-11-22"])
    v = only(report, "no_positives")
    assert_reported(
        v,
        rule="no_positives",
        file="events/dt=2026-11-22",
        column="clicked, converted",
        rows=0,
        severity="warning",
    )
    assert v.message.startswith(
        "evaluation partition has no positives of click (clicked), conversion (converted)"
    )
    assert report.ok and report.counts["positives"] == {"exposure": 18, "click": 5, "conversion": 3}
    # without eval_dates (csmf validate) every partition is checked, worded for either use
    plain = only(validate_dataset(root), "no_positives")
    assert plain.file == "events/dt=2026-11-22" and plain.message.startswith("partition has no positives")


def test_positives_only_on_quarantined_rows_count_as_none(tmp_path):
    # day 2: 2 of 8 rows are converted without a click (cascade); no row is clicked
    day2 = _no_clicks("2026-11-22").with_columns(converted=pl.int_range(pl.len()) < 2)
    root = write_dataset(tmp_path / "d", events={DAY: make_events(), "2026-11-22": day2})
    report = validate_dataset(
        root, max_violation_rate=0.2, quarantine_dir=tmp_path / "q", eval_dates=["2026-11-22"]
    )
    assert report.ok and report.quarantined == {"cascade": 2}
    assert only(report, "no_positives").column == "clicked, converted"


# ---------------------------------------------------------------- users / items tables


def test_duplicate_ids_and_null_ids_in_tables(tmp_path):
    users = pl.DataFrame({"user_id": [1, 2, 2, 3, 4, None], "age_bucket": ["a"] * 6, "activity": [0.0] * 6})
    report = validate_dataset(write_dataset(tmp_path / "d", users=users))
    assert_reported(
        only(report, "duplicate_id"), rule="duplicate_id", file="users.parquet", column="user_id", rows=1
    )
    assert_reported(only(report, "null_key"), rule="null_key", file="users.parquet", column="user_id", rows=1)


def test_table_feature_columns_checked(tmp_path):
    items = pl.DataFrame({"item_id": list(range(1, 21)), "price": ["cheap"] * 20})
    report = validate_dataset(write_dataset(tmp_path / "d", items=items))
    assert_reported(
        only(report, "missing_column"), rule="missing_column", file="items.parquet", column="category", rows=0
    )
    assert_reported(
        only(report, "wrong_type"), rule="wrong_type", file="items.parquet", column="price", rows=0
    )


def test_categorical_feature_of_a_type_that_cannot_be_coded_is_wrong_type(tmp_path):
    # A list column listed as categorical passed validation and failed in prep with a polars
    # ShapeError; dates were coded but their values came back as strings from meta.json.
    n = 20
    items = pl.DataFrame(
        {
            "item_id": list(range(1, n + 1)),
            "category": [[i % 3, 7] for i in range(n)],
            "price": [float(i) for i in range(n)],
            "launch": [dt.date(2026, 1, 1 + i % 5) for i in range(n)],
            "grade": [0.5 * (i % 4) for i in range(n)],
            "promo": [i % 2 == 0 for i in range(n)],
        }
    )
    spec = {
        **SPEC,
        "features": {
            **SPEC["features"],
            "items": {"categorical": ["category", "launch", "grade", "promo"], "numeric": ["price"]},
        },
    }
    report = validate_dataset(write_dataset(tmp_path / "d", items=items, spec=spec))
    found = {v.column: v for v in report.violations if v.rule == "wrong_type"}
    assert set(found) == {"category", "launch"}  # floats and booleans are codable
    for col, v in found.items():
        assert_reported(v, rule="wrong_type", file="items.parquet", column=col, rows=0)
        assert f"categorical feature {col}" in v.message
    assert ".list.first()" in found["category"].fix and ".cast(pl.String)" in found["launch"].fix
    assert report.rules("error") == {"wrong_type"}


def test_inferred_features_name_the_columns_they_skip(tmp_path):
    n = 20
    users = pl.DataFrame(
        {
            "user_id": [1, 2, 3, 4],
            "age_bucket": ["a", "b", "a", "c"],
            "activity": [0.1, 0.5, 0.2, 0.9],
            "vip": [True, False, True, True],
            "signup": [dt.date(2025, 1, 1)] * 4,
            "last_seen": [dt.datetime(2026, 1, 1)] * 4,
        }
    )
    items = pl.DataFrame(
        {
            "item_id": list(range(1, n + 1)),
            "category": [i % 3 for i in range(n)],
            "price": [float(i) for i in range(n)],
            "tags": [[i, i + 1] for i in range(n)],
            "meta": [{"w": i, "h": 2 * i} for i in range(n)],
        }
    )
    no_features = {k: v for k, v in SPEC.items() if k != "features"}
    report = validate_dataset(write_dataset(tmp_path / "d", users=users, items=items, spec=no_features))
    skipped = {(v.file, v.column) for v in report.violations if v.rule == "unused_column"}
    assert skipped == {
        ("users.parquet", "signup"),
        ("users.parquet", "last_seen"),
        ("items.parquet", "tags"),
        ("items.parquet", "meta"),
    }
    assert all(v.severity == "warning" for v in report.violations if v.rule == "unused_column")
    assert not report.rules("error")
    # prep infers exactly the other columns (hand-listed), so the warning names what it leaves out;
    # the report lists them, and prep's model-ready tables hold exactly those features
    assert infer_features(users, "user_id") == {"categorical": ["age_bucket", "vip"], "numeric": ["activity"]}
    assert infer_features(items, "item_id") == {"categorical": ["category"], "numeric": ["price"]}
    assert report.counts["features"] == {
        "users.parquet": {
            "categorical": ["age_bucket", "vip"],
            "numeric": ["activity"],
            "source": "inferred from dtypes",
        },
        "items.parquet": {
            "categorical": ["category"],
            "numeric": ["price"],
            "source": "inferred from dtypes",
        },
    }
    text = report.to_markdown()
    assert "- users.parquet (inferred from dtypes): categorical age_bucket, vip; numeric activity" in text
    from csmf_core.prep import _encode_table

    _, specs = _encode_table(users, "user_id", np.array([1, 2, 3, 4]), None, "c_uid")
    assert [s.get("source") for s in specs] == ["user_id", "age_bucket", "vip", "activity"]
    # with feature lists the columns left out are the user's choice: nothing to warn about
    report = validate_dataset(write_dataset(tmp_path / "e", users=users, items=items))
    assert "unused_column" not in report.rules()
    assert report.counts["features"]["items.parquet"] == {
        "categorical": ["category"],
        "numeric": ["price"],
        "source": "dataset.yaml",
    }


def test_empty_feature_lists_are_checked_as_the_inferred_features_prep_reads(tmp_path):
    """Empty lists in dataset.yaml mean "inferred from dtypes" to prep, but the validator read them as
    "no features": an inf in a float column (prep standardises it) and a label-like column (prep trains
    on it) were let through, the second as a mere warning."""
    users = pl.DataFrame(
        {"user_id": [1, 2, 3, 4], "activity": [0.1, float("inf"), 0.2, 0.9], "clicked_before": [1, 0, 1, 0]}
    )
    empty = {
        **SPEC,
        "features": {"users": {"categorical": [], "numeric": []}, "items": SPEC["features"]["items"]},
    }
    report = validate_dataset(write_dataset(tmp_path / "d", users=users, spec=empty))
    found = {(v.rule, v.column, v.severity) for v in report.violations if v.file == "users.parquet"}
    assert ("non_finite", "activity", "error") in found and ("leakage", "clicked_before", "error") in found
    assert report.counts["features"]["users.parquet"]["source"] == "inferred from dtypes"


def test_integer_features_are_categorical_up_to_1000_distinct_values():
    ids = list(range(1, 1002))
    table = pl.DataFrame(
        {"item_id": ids, "few": [i % 1000 for i in ids], "many": ids, "ratio": [0.5] * len(ids)}
    )
    assert infer_features(table, "item_id") == {"categorical": ["few"], "numeric": ["many", "ratio"]}


def test_infinite_numeric_features_are_errors(tmp_path):
    inf = float("inf")
    price = [float(i) for i in range(20)]
    price[3], price[7], price[11], price[12] = inf, -inf, inf, float("nan")  # NaN is read as null
    items = pl.DataFrame(
        {"item_id": list(range(1, 21)), "category": [i % 3 for i in range(20)], "price": price}
    )
    users = pl.DataFrame(
        {
            "user_id": [1, 2, 3, 4],
            "age_bucket": ["a"] * 4,
            "activity": [0.1] * 4,
            "score": [inf, 1.0, 2.0, 3.0],
        }
    )
    report = validate_dataset(write_dataset(tmp_path / "d", users=users, items=items))
    v = only(report, "non_finite")  # users.score is not a listed feature: never read, not an error
    assert_reported(v, rule="non_finite", file="items.parquet", column="price", rows=3)
    assert [e["item_id"] for e in v.examples] == [4, 8, 12] and "is_infinite()" in v.fix
    assert report.rules("error") == {"non_finite"}
    # Without a features block every float column is a numeric feature: users.score counts too.
    no_features = {k: v for k, v in SPEC.items() if k != "features"}
    report = validate_dataset(write_dataset(tmp_path / "e", users=users, items=items, spec=no_features))
    found = {(v.file, v.column, v.rows) for v in report.violations if v.rule == "non_finite"}
    assert found == {("items.parquet", "price", 3), ("users.parquet", "score", 1)}


def test_leakage_columns(tmp_path):
    users = pl.DataFrame(
        {"user_id": [1, 2, 3, 4], "age_bucket": ["a"] * 4, "activity": [0.1] * 4, "click_rate": [0.3] * 4}
    )
    items = pl.DataFrame(
        {"item_id": list(range(1, 21)), "category": [1] * 20, "price": [1.0] * 20, "converted": [True] * 20}
    )
    spec = {
        **SPEC,
        "features": {
            **SPEC["features"],
            "users": {"categorical": ["age_bucket"], "numeric": ["activity", "click_rate"]},
        },
    }
    report = validate_dataset(write_dataset(tmp_path / "d", users=users, items=items, spec=spec))
    found = {(v.file, v.column, v.severity) for v in report.violations if v.rule == "leakage"}
    # click_rate is used as a feature (error); converted is present but not listed (warning).
    assert found == {("users.parquet", "click_rate", "error"), ("items.parquet", "converted", "warning")}
    assert "LABEL_NAME_PATTERNS" in str(report.errors[0])
    # Without a features block every column is a feature: both become errors.
    no_features = {k: v for k, v in SPEC.items() if k != "features"}
    report = validate_dataset(write_dataset(tmp_path / "e", users=users, items=items, spec=no_features))
    assert {(v.column, v.severity) for v in report.violations if v.rule == "leakage"} == {
        ("click_rate", "error"),
        ("converted", "error"),
    }


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("is_like", True),
        ("clicks", True),
        ("watch_ratio", True),
        ("play_time_ms", True),
        ("long_view", True),
        ("conversion_rate", True),
        ("label", True),
        ("is_follow", True),
        ("follow_user_num", False),
        ("video_duration", False),
        ("age_bucket", False),
        ("analysis_score", False),
    ],
)
def test_label_name_patterns(name, label):
    assert (label_like(name) is not None) == label


# ---------------------------------------------------------------- quarantine


def _cascade_breaking(n_bad: int, day: str = DAY) -> pl.DataFrame:
    bad = pl.int_range(pl.len()).is_in([1, 3, 5, 7, 9][:n_bad])
    return make_events(day=day).with_columns(converted=pl.when(bad).then(True).otherwise(pl.col("converted")))


def test_quarantine_within_rate(tmp_path):
    root = write_dataset(
        tmp_path / "d", events={DAY: _cascade_breaking(3), "2026-11-22": make_events(10, "2026-11-22", 50)}
    )
    before = tree_hashes(root)
    qdir = tmp_path / "q"
    report = validate_dataset(root, max_violation_rate=0.5, quarantine_dir=qdir)
    assert report.ok, str(report)
    v = only(report, "cascade")
    assert (v.severity, v.rows) == ("warning", 3) and str(qdir) in v.fix
    assert report.quarantined == {"cascade": 3}
    assert report.quarantine_files == [qdir / f"dt={DAY}.parquet"]  # the clean day writes nothing
    bad = pl.read_parquet(qdir / f"dt={DAY}.parquet")
    assert (
        bad.height == 3 and set(bad["reason"]) == {"cascade:converted"} and set(bad["source_file"]) == {FILE}
    )
    clean = clean_events_lazy(root).collect()
    assert clean.height == 17 and not (clean["converted"] & ~clean["clicked"]).any()
    assert clean.columns == ["request_id", "user_id", "item_id", "ts", "exposed", "clicked", "converted"]
    assert clean_events_lazy(root, dates=[DAY]).collect().height == 7
    assert tree_hashes(root) == before  # sources untouched, quarantine lives elsewhere
    # A rerun after the source was fixed removes the stale quarantine file.
    write_dataset(root, events={DAY: make_events()})
    assert validate_dataset(root, max_violation_rate=0.5, quarantine_dir=qdir).quarantine_files == []
    assert not (qdir / f"dt={DAY}.parquet").exists()


def test_quarantine_duplicates_keeps_first_copy(tmp_path):
    ev = make_events()
    root = write_dataset(tmp_path / "d", events={DAY: [ev, ev.head(1)]})
    report = validate_dataset(root, max_violation_rate=0.2, quarantine_dir=tmp_path / "q")
    assert report.ok and report.quarantined == {"duplicate_event": 1}
    assert clean_events_lazy(root).collect().equals(ev)


def test_quarantine_over_rate_or_zero_is_an_error(tmp_path):
    root = write_dataset(tmp_path / "d", events={DAY: _cascade_breaking(3)})
    strict = validate_dataset(root)
    assert only(strict, "cascade").severity == "error" and strict.quarantined == {}
    over = validate_dataset(root, max_violation_rate=0.2, quarantine_dir=tmp_path / "q")  # 3/10 > 0.2
    assert only(over, "cascade").severity == "error" and not (tmp_path / "q").exists()
    with pytest.raises(ValueError, match="quarantine_dir"):
        validate_dataset(root, max_violation_rate=0.5)


def test_file_level_problems_are_never_quarantined(tmp_path):
    root = write_dataset(tmp_path / "d", events={DAY: [make_events(), b"garbage" * 10]})
    report = validate_dataset(root, max_violation_rate=1.0, quarantine_dir=tmp_path / "q")
    assert only(report, "corrupt_file").severity == "error"


def test_contract_error_lists_every_error(tmp_path):
    ev = _cascade_breaking(2).with_columns(pl.col("item_id").cast(pl.UInt64))
    root = write_dataset(tmp_path / "d", events={DAY: ev, "2026-11-22": _cascade_breaking(1, "2026-11-22")})
    (root / "items.parquet").unlink()
    report = validate_dataset(root)
    with pytest.raises(ContractError) as err:
        report.raise_if_errors()
    assert len(report.errors) == 3
    for v in report.errors:
        assert str(v) in str(err.value)
    assert report.rules() <= set(RULES)
    assert "### Errors (3)" in report.to_markdown()


def test_clean_events_lazy_arguments(tmp_path):
    root = write_dataset(tmp_path / "d", events={DAY: _cascade_breaking(2)})
    assert clean_events_lazy(root, DAY, drop=()).collect().height == 10  # nothing dropped
    assert clean_events_lazy(root, [dt.date(2026, 11, 21)], drop={"cascade"}).collect().height == 8
    with pytest.raises(ValueError, match="not row-level rules"):
        clean_events_lazy(root, drop=["leakage"])
    with pytest.raises(FileNotFoundError, match="no partition for"):
        clean_events_lazy(root, ["2026-12-01"])
