"""Canonical -> model-ready prep and the loader, on a hand-made dataset and on the tiny synth world."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from csmf_core import prep, synth
from csmf_core.data import load_model_ready
from csmf_core.rows import TrainRows
from csmf_core.train import _memory_epochs

UTC = dt.UTC
# (request_id, user_id, item_id, day, hour, exposed, clicked, converted); day d = 2026-01-0d.
EVENTS = [
    ("r1", 10, 100, 1, 10, 1, 1, 0),
    ("r1", 10, 200, 1, 10, 1, 1, 1),
    ("r1", 10, 300, 1, 10, 0, 0, 0),
    ("r2", 20, 300, 1, 11, 1, 1, 0),
    ("r3", 10, 300, 2, 9, 1, 1, 0),
    ("r3", 10, 400, 2, 9, 1, 0, 0),
    ("r3", 10, 500, 2, 9, 0, 0, 0),
    ("r3", 10, 100, 2, 9, 0, 0, 0),
    ("r3", 10, 500, 2, 9, 0, 0, 0),  # duplicate unexposed candidate
    ("r3", 10, 300, 2, 9, 0, 0, 0),  # also exposed in r3: not a negative
    ("r4", 10, 200, 2, 9, 1, 1, 1),  # same user, same ts as r3
    (None, 40, 100, 2, 12, 1, 1, 0),  # user 40 has no feature row; no request id
    (None, 40, 200, 2, 12, 0, 0, 0),
    ("r6", 10, 500, 3, 8, 1, 0, 0),
    ("r6", 10, 400, 3, 8, 0, 0, 0),
    ("r8", 30, 400, 3, 13, 1, 1, 0),
    ("r8", 30, 100, 3, 13, 0, 0, 0),
    ("r8", 30, 200, 3, 13, 0, 0, 0),
    ("r8", 30, 500, 3, 13, 0, 0, 0),  # beyond M = 2
    ("r7", 20, 100, 3, 23, 1, 0, 0),
    ("e1", 10, 300, 4, 10, 1, 1, 0),
    ("e2", 10, 300, 4, 11, 1, 1, 0),
    ("e2", 10, 100, 4, 11, 1, 0, 0),
    ("e3", 20, 500, 4, 12, 1, 1, 1),
    ("e4", 30, 200, 4, 12, 0, 0, 0),
    ("z1", 50, 600, 5, 1, 1, 1, 1),  # after the eval window: never read
]
COLS = ("exposed", "clicked", "converted")


def _ts(day: int, hour: int) -> int:
    return int(dt.datetime(2026, 1, day, hour, tzinfo=UTC).timestamp()) * 10**6


def _write_hand_dataset(root: Path, events=EVENTS, extra_items: tuple[int, ...] = ()) -> Path:
    root.mkdir()
    meta = {
        "name": "hand",
        "provenance": "test",
        "objectives": [{"name": n, "column": c} for n, c in zip(("exposure", "click", "conversion"), COLS)],
        "features": {"users": {"categorical": ["age_bucket", "vip"], "numeric": ["score"]}},  # items inferred
    }
    (root / "dataset.yaml").write_text(yaml.safe_dump(meta))
    pq.write_table(
        pa.table(
            {
                "user_id": pa.array([30, 10, 20], pa.int64()),
                "age_bucket": ["b", None, "a"],
                "vip": [True, False, True],
                "score": [1.0, None, 3.0],
                "ignored": ["x", "y", "z"],  # not listed in dataset.yaml
            }
        ),
        root / "users.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "item_id": pa.array([200, 100, 300, 500, *extra_items], pa.int64()),
                "category": ["x", "y", "x", None, *["x"] * len(extra_items)],
                "tier": pa.array([1, 2, 1, 3, *[1] * len(extra_items)], pa.int32()),
                "price": [1.0, 2.0, 3.0, 6.0, *[1.0] * len(extra_items)],
            }
        ),
        root / "items.parquet",
    )
    for day in sorted({e[3] for e in events}):
        rows = [e for e in events if e[3] == day]
        d = root / "events" / f"dt=2026-01-0{day}"
        d.mkdir(parents=True)
        chunks = [rows[:5], rows[5:]] if day == 2 else [rows]  # two files in one partition
        for k, chunk in enumerate(chunks):
            table = pa.table(
                {
                    "request_id": pa.array([e[0] for e in chunk], pa.string()),
                    "user_id": pa.array([e[1] for e in chunk], pa.int64()),
                    "item_id": pa.array([e[2] for e in chunk], pa.int64()),
                    "ts": pa.array([_ts(e[3], e[4]) for e in chunk], pa.timestamp("us", tz="UTC")),
                    **{c: pa.array([bool(e[5 + j]) for e in chunk]) for j, c in enumerate(COLS)},
                }
            )
            pq.write_table(table, d / f"part-{k:05d}.parquet")
    return root


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()
    }


def reference_history(events, u: int, ts: int, seq_len: int) -> list[int]:
    """Slow, obviously-correct: items of ``events`` [(u, i, ts)] of user u strictly before ts,
    ordered by (ts, item), last seq_len, left-padded with 0."""
    seen = sorted((t, i) for uu, i, t in events if uu == u and t < ts)
    items = [i for _, i in seen][-seq_len:]
    return [0] * (seq_len - len(items)) + items


@pytest.fixture(scope="module")
def hand(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    src = _write_hand_dataset(root / "hand")
    before = _hashes(src)
    summary = prep.prepare(
        src,
        root / "mr",
        train_dates=("2026-01-02", "2026-01-03"),
        eval_dates=["2026-01-04"],
        seq_len=3,
        n_req_neg=2,
    )
    assert _hashes(src) == before  # source files untouched
    return src, root / "mr", summary


def test_vocab_and_feature_codes(hand):
    _, out, summary = hand
    users = pl.read_parquet(out / "users.parquet")
    assert users["user_id"].to_list() == [None, 10, 20, 30, 40]  # 50 only appears after the eval window
    assert users.columns == ["user_id", "c_uid", "c_age_bucket", "c_vip", "n_score"]
    assert users["c_uid"].to_list() == [0, 1, 2, 3, 4]
    assert users["c_age_bucket"].to_list() == [0, 0, 1, 2, 0]  # a=1, b=2, null/unknown=0
    assert users["c_vip"].to_list() == [0, 1, 2, 2, 0]  # False=1, True=2
    assert users["n_score"].to_list() == [0.0, 0.0, 1.0, -1.0, 0.0]  # mean 2, std 1
    items = pl.read_parquet(out / "items.parquet")
    assert items["item_id"].to_list() == [None, 100, 200, 300, 400, 500]
    assert items.columns == ["item_id", "c_iid", "c_category", "c_tier", "n_price"]  # inferred kinds
    assert items["c_category"].to_list() == [0, 2, 1, 1, 0, 0]
    assert items["c_tier"].to_list() == [0, 2, 1, 1, 0, 3]
    std = np.sqrt(14 / 4)
    np.testing.assert_allclose(items["n_price"].to_numpy(), [0, -1 / std, -2 / std, 0, 0, 3 / std], rtol=1e-6)
    assert items.schema["c_iid"] == pl.Int32 and items.schema["n_price"] == pl.Float32
    meta = json.loads((out / "meta.json").read_text())
    assert meta["n_users"] == 5 and meta["n_items"] == 6 and summary.n_users == 5
    cards = {f["name"]: f.get("cardinality") for f in meta["features"]["users"] + meta["features"]["items"]}
    assert cards == {"c_uid": 5, "c_age_bucket": 3, "c_vip": 3, "n_score": None, "c_iid": 6, "c_category": 3,
                     "c_tier": 4, "n_price": None}  # fmt: skip
    assert meta["train_dates"] == ["2026-01-02", "2026-01-03"] and meta["eval_dates"] == ["2026-01-04"]
    assert meta["rows"] == {"train": 7, "eval": 2, "train_by_level": [3, 3, 1]}


def test_train_rows_by_hand(hand):
    _, out, _ = hand
    t = pq.read_table(out / "train" / "part-00000.parquet")
    assert t.schema.field("hist_click").type == pa.list_(pa.int32(), 3)
    assert t.schema.field("neg").type == pa.list_(pa.int32(), 2)
    assert t.schema.field("level").type == pa.int8()
    rows = t.to_pylist()
    got = [(r["u"], r["i"], r["level"], r["neg"], r["hist_click"], r["hist_conversion"]) for r in rows]
    assert got == [
        (1, 2, 2, [0, 0], [0, 1, 2], [0, 0, 2]),  # r4 at 01-02 09:00: same-ts r3 click on 300 not seen
        (1, 3, 1, [5, 1], [0, 1, 2], [0, 0, 2]),  # r3: negs 500, 100 (dup and exposed 300 dropped)
        (1, 4, 0, [5, 1], [0, 1, 2], [0, 0, 2]),
        (4, 1, 1, [0, 0], [0, 0, 0], [0, 0, 0]),  # null request id: no negatives
        (1, 5, 0, [4, 0], [2, 2, 3], [0, 2, 2]),  # ties at 01-02 09:00 ordered by item index
        (3, 4, 1, [1, 2], [0, 0, 0], [0, 0, 0]),  # 3 unexposed, M = 2
        (2, 1, 0, [0, 0], [0, 0, 3], [0, 0, 0]),  # history from before the train window
    ]
    assert [r["ts"] for r in rows] == sorted(r["ts"] for r in rows)
    pop = pl.read_parquet(out / "popularity.parquet")
    assert pop["i"].to_list() == list(range(6))
    assert pop["count_exposure"].to_list() == [0, 2, 1, 1, 2, 1]
    assert pop["count_click"].to_list() == [0, 1, 1, 1, 1, 0]
    assert pop["count_conversion"].to_list() == [0, 0, 1, 0, 0, 0]


def test_history_counts_cover_every_partition_before_the_evaluation_day(hand):
    """history_counts.parquet (the log-Q counts of train.incremental_logq=history): positives per item
    of click and conversion over every event before 2026-01-04, also those before the train window,
    counted here from the hand-written events."""
    _, out, _ = hand
    items = pl.read_parquet(out / "items.parquet")["item_id"].to_list()  # row r holds items[r]
    hist = pl.read_parquet(out / prep.HISTORY_COUNTS)
    assert hist.columns == ["i", "count_click", "count_conversion"]
    assert hist["i"].to_list() == list(range(len(items)))
    for j, name in ((1, "click"), (2, "conversion")):
        expected = [0] * len(items)
        for e in EVENTS:
            if e[3] < 4 and e[5 + j] and e[2] in items:
                expected[items.index(e[2])] += 1
        assert hist[f"count_{name}"].to_list() == expected, name
    # the train window's own counts differ (day 1 is not in it): the two files say different things
    pop = pl.read_parquet(out / "popularity.parquet")
    assert hist["count_click"].sum() > pop["count_click"].sum()


def test_train_history_matches_reference(hand):
    src, out, _ = hand
    u_of, i_of = {10: 1, 20: 2, 30: 3, 40: 4}, {100: 1, 200: 2, 300: 3, 400: 4, 500: 5}
    ev = [e for e in EVENTS if e[3] <= 4]
    for r in pq.read_table(out / "train" / "part-00000.parquet").to_pylist():
        for j, name in ((1, "click"), (2, "conversion")):
            pos = [(u_of[e[1]], i_of[e[2]], _ts(e[3], e[4])) for e in ev if e[5 + j]]
            assert r[f"hist_{name}"] == reference_history(pos, r["u"], r["ts"], 3)


def test_eval_rows_by_hand(hand):
    _, out, _ = hand
    rows = pq.read_table(out / "eval.parquet").to_pylist()
    assert rows == [
        {"u": 1, "hist_click": [2, 2, 3], "hist_conversion": [0, 2, 2],
         "pos_exposure": [1, 3], "pos_click": [3], "pos_conversion": []},
        {"u": 2, "hist_click": [0, 0, 3], "hist_conversion": [0, 0, 0],
         "pos_exposure": [5], "pos_click": [5], "pos_conversion": [5]},
    ]  # fmt: skip


def test_guards(hand, tmp_path):
    src, out, _ = hand
    with pytest.raises(FileExistsError):
        prep.prepare(src, out, train_dates=("2026-01-02", "2026-01-03"), eval_dates="2026-01-04")
    with pytest.raises(ValueError):
        prep.prepare(src, tmp_path / "x", train_dates=("2026-01-02", "2026-01-04"), eval_dates="2026-01-04")


def test_loader_and_batches(hand):
    _, out, _ = hand
    data = load_model_ready(out)
    assert data.objectives == ["exposure", "click", "conversion"]
    assert data.users_cat.shape == (5, 3) and data.users_cat.dtype == torch.int64
    assert data.users_num.shape == (5, 1) and data.users_num.dtype == torch.float32
    assert data.items_cat.shape == (6, 3) and data.items_num.shape == (6, 1)
    assert data.user_cat_names == ["c_uid", "c_age_bucket", "c_vip"]
    tr = data.train
    assert len(tr) == 7 and tr.hist["click"].shape == (7, 3) and tr.neg.shape == (7, 2)
    assert tr.neg[1].tolist() == [5, 1] and tr.hist["click"][4].tolist() == [2, 2, 3]
    assert [p.tolist() for p in data.eval.pos["exposure"]] == [[1, 3], [5]]
    assert [p.tolist() for p in data.eval.pos["conversion"]] == [[], [5]]
    # the trainer's in-memory rows (csmf_core.cascade.load_cascade_data) and batches (train_stage)
    rows = TrainRows(
        tr.u, tr.i, tr.level, [tr.hist["click"], tr.hist["conversion"]], tr.neg, row=torch.arange(7)
    )

    def batches(data: TrainRows, bs: int, seed: int, epoch: int = 0) -> list[TrainRows]:
        epochs = _memory_epochs(data, bs, torch.Generator().manual_seed(seed), 0, 1)
        return [list(epochs(e)) for e in range(epoch + 1)][epoch]

    for stage, expected in ((0, 7), (1, 4), (2, 1)):
        sel = rows.for_stage(stage)  # the positives of stage `stage`
        assert sel.row.tolist() == torch.nonzero(tr.level >= stage).squeeze(1).tolist()
        assert len(sel) == expected
        assert torch.equal(sel.i, tr.i[sel.row]) and torch.equal(sel.hists[1], tr.hist["conversion"][sel.row])
        bs = batches(sel, 3, seed=1)
        got = torch.cat([b.row for b in bs]).tolist() if bs else []
        assert len(set(got)) == len(got) >= expected - 1  # each row once; a trailing 1-row batch dropped
        assert set(got) <= set(sel.row.tolist())
        for b in bs:
            assert torch.equal(b.i, tr.i[b.row]) and torch.equal(b.hists[1], tr.hist["conversion"][b.row])
    order = lambda **kw: torch.cat([b.row for b in batches(rows, 2, **kw)]).tolist()  # noqa: E731
    assert order(seed=3, epoch=1) == order(seed=3, epoch=1)
    assert len({tuple(order(seed=3, epoch=e)) for e in range(6)}) > 1
    assert sum(len(b) for b in batches(rows, 3, seed=0)) == 6  # 3 + 3, the trailing 1-row batch dropped


def test_tiny_synth_end_to_end(tmp_path):
    src = synth.generate(tmp_path / "ds", "tiny", seed=0).out_dir
    before = _hashes(src)
    s = prep.prepare(src, tmp_path / "mr", train_dates=("2026-01-01", "2026-01-05"), eval_dates="2026-01-06")
    assert _hashes(src) == before
    assert s.n_users == 301 and s.n_items == 201 and s.n_eval > 50
    assert s.n_train == int(
        pl.scan_parquet(src / "events" / "dt=2026-01-0[1-5]" / "*.parquet")
        .select(pl.col("exposed").sum())
        .collect()
        .item()
    )
    prep.prepare(src, tmp_path / "mr2", train_dates=("2026-01-01", "2026-01-05"), eval_dates="2026-01-06")
    h1, h2 = _hashes(tmp_path / "mr"), _hashes(tmp_path / "mr2")
    assert len(h1) == len(h2) > 4 and list(h1.values()) == list(h2.values())  # deterministic, byte for byte
    data = load_model_ready(tmp_path / "mr")
    tr = data.train
    assert (tr.neg != 0).float().mean() > 0.9  # every synth request has 10 unexposed candidates
    # History against the slow reference on a sample of rows (ids mapped through the vocab).
    ev = pl.read_parquet(src / "events" / "**" / "*.parquet").filter(pl.col("clicked"))
    users = pl.read_parquet(tmp_path / "mr" / "users.parquet")["user_id"].to_list()
    items = pl.read_parquet(tmp_path / "mr" / "items.parquet")["item_id"].to_list()
    u_of, i_of = {x: k for k, x in enumerate(users)}, {x: k for k, x in enumerate(items)}
    ts = ev["ts"].dt.epoch("us").to_list()
    pos = [(u_of[a], i_of[b], t) for a, b, t in zip(ev["user_id"].to_list(), ev["item_id"].to_list(), ts)]
    by_user: dict[int, list] = {}
    for p in pos:
        by_user.setdefault(p[0], []).append(p)
    rng = np.random.default_rng(0)
    for r in rng.choice(len(tr), 300, replace=False):
        u, t = int(tr.u[r]), int(tr.ts[r])
        assert tr.hist["click"][r].tolist() == reference_history(by_user.get(u, []), u, t, 20)
    start = _ts(6, 0)
    for k in range(len(data.eval)):
        u = int(data.eval.u[k])
        assert data.eval.hist["click"][k].tolist() == reference_history(by_user.get(u, []), u, start, 20)


def test_events_without_request_ids(tmp_path):
    src = _write_hand_dataset(tmp_path / "hand")
    for f in (src / "events").rglob("*.parquet"):
        pq.write_table(pq.read_table(f).drop_columns(["request_id"]), f)
    prep.prepare(
        src, tmp_path / "mr", train_dates=("2026-01-02", "2026-01-03"), eval_dates="2026-01-04", seq_len=3
    )
    t = pq.read_table(tmp_path / "mr" / "train" / "part-00000.parquet")
    assert t.num_rows == 7 and t.schema.field("neg").type == pa.list_(pa.int32(), 10)
    assert not np.asarray(t["neg"].combine_chunks().flatten()).any()
    assert t["hist_click"].to_pylist()[4] == [2, 2, 3]


def test_items_only_in_the_feature_table_get_id_code_0(tmp_path):
    """An item with no training exposure and no same-request negative in the window kept a random
    id-embedding row that no step updated; ranked over the whole catalog it came up anywhere (a catalog
    of 5,000 such items took the tiny world's exposure Recall@50 from 0.49 to 0.15). Its id code is now 0
    (row 0 of the id table, which starts at zero): item 700 is only in items.parquet; 900, exposed only
    on the evaluation day, and 800, only a same-request negative, are in the event logs and keep their
    rows; an incremental run keeps the code of an item its base model trained even if the new window
    does not."""
    from csmf_core.cascade import load_cascade_data
    from csmf_core.config import build_config
    from csmf_core.idmap import BaseMaps
    from csmf_core.model import TwoTower

    extra = [
        ("r9", 20, 800, 2, 13, 0, 0, 0),
        ("r9", 20, 300, 2, 13, 1, 0, 0),
        ("e5", 30, 900, 4, 13, 1, 0, 0),
    ]
    src = _write_hand_dataset(tmp_path / "hand", [*EVENTS, *extra], extra_items=(700,))
    prep.prepare(src, tmp_path / "mr", train_dates=("2026-01-02", "2026-01-03"), eval_dates=["2026-01-04"],
                 seq_len=3, n_req_neg=2)  # fmt: skip
    items = pl.read_parquet(tmp_path / "mr" / "items.parquet")
    code = dict(zip(items["item_id"].to_list()[1:], items["c_iid"].to_list()[1:]))
    row = {iid: r for r, iid in enumerate(items["item_id"].to_list()) if iid is not None}
    assert {i for i, c in code.items() if c == 0} == {700}
    assert all(code[i] == row[i] for i in (100, 200, 300, 400, 500, 800, 900))  # the row itself, as before
    meta = json.loads((tmp_path / "mr" / "meta.json").read_text())
    assert meta["id_maps"]["items"]["untrained"] == 1
    data = load_cascade_data(tmp_path / "mr")
    model = TwoTower(data.user_spec, data.item_spec, build_config(None).model, 3)
    assert not model.item.emb["c_iid"].weight[0].any() and not model.user.emb["c_uid"].weight[0].any()
    # the next day, from this model-ready's maps: 300 trained before, not exposed on day 4's rows
    base = BaseMaps.read(tmp_path / "mr")
    prep.prepare(src, tmp_path / "mr2", train_dates=["2026-01-04"], eval_dates=["2026-01-05"],
                 seq_len=3, n_req_neg=2, base=base)  # fmt: skip
    items2 = pl.read_parquet(tmp_path / "mr2" / "items.parquet")
    code2 = dict(zip(items2["item_id"].to_list()[1:], items2["c_iid"].to_list()[1:]))
    row2 = {iid: r for r, iid in enumerate(items2["item_id"].to_list()) if iid is not None}
    assert code2[900] == row[900] and code2[400] == row[400]  # 900 exposed on day 4; 400 trained before
    assert code2[700] == 0 and code2[600] == row2[600] != 0  # 600: new on day 5, an evaluation event


def test_a_request_id_reused_by_another_user_is_another_request(tmp_path):
    """Same-request negatives are those of one user's request: a request id another user reuses (r8
    of user 20) is another request, so its unexposed candidates are not pooled (they were: user 20's
    row got user 30's candidates). One user's id across days stays one request
    (tests/unit/test_prep_bounded.py: a request that spans midnight)."""
    reused = [
        *EVENTS,
        ("r8", 20, 300, 3, 14, 1, 1, 0),  # user 20 reuses user 30's request id r8
        ("r8", 20, 500, 3, 14, 0, 0, 0),
    ]
    src = _write_hand_dataset(tmp_path / "hand", events=reused)
    prep.prepare(
        src, tmp_path / "mr", train_dates=("2026-01-02", "2026-01-03"), eval_dates="2026-01-04", seq_len=3,
        n_req_neg=2,
    )  # fmt: skip
    rows = pq.read_table(tmp_path / "mr" / "train" / "part-00000.parquet").to_pylist()
    by = {(r["u"], r["i"], r["ts"]): r["neg"] for r in rows}
    # indices: users 10 -> 1, 20 -> 2, 30 -> 3; items 100 -> 1, 200 -> 2, 300 -> 3, 400 -> 4, 500 -> 5
    assert by[(3, 4, _ts(3, 13))] == [1, 2]  # user 30's r8: its own unexposed 100, 200
    assert by[(2, 3, _ts(3, 14))] == [5, 0]  # user 20's r8: only its own unexposed 500
