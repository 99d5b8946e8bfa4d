"""Point-in-time item statistics (data.item_stats): the counts against a brute-force loop, no look-ahead,
the row-day / catalog-day inputs of the item tower, the training loss with per-row days, both
loaders, and the serving bundle (index vectors and re-evaluation on another dataset)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from csmf_core import prep
from csmf_core.cascade import build_model, load_cascade_data, plan, run_cascade, run_step
from csmf_core.checkpoint import save_checkpoint
from csmf_core.config import build_config
from csmf_core.evaluate import evaluate_model, item_matrix
from csmf_core.item_stats import DAY_US, item_rates, model_ready_item_stats
from csmf_core.losses import aml_margins, item_log_q, sampled_softmax, upstream_scores
from csmf_core.rows import FeatureTables, TrainRows
from csmf_core.serving import Recommender, write_bundle
from csmf_core.train import _batch_loss, segment_columns, stage_columns

TINY_CONFIG = {  # as tests/unit/conftest.py's tiny_world
    "model": {"dim": 16, "hidden": [32]},
    "train": {"batch_size": 256, "epochs": [1, 1, 1]},
    "data": {"seq_len": 5, "n_req_neg": 4},
}


def brute_rates(day, item, level, n_items, n_obj, first, last, windows):
    """The definition, one cell at a time."""
    n_days = last - first + 1
    out = np.zeros((n_days, n_items, n_obj * len(windows)))
    rows = [(d, i, lv) for d, i, lv in zip(day, item, level) if first <= d < last]
    data_days = {d for d, _, _ in rows}
    for d in range(n_days):
        for k, w in enumerate(windows):
            span = [x for x in range(first + d - w, first + d) if x >= first]
            seen = sum(x in data_days for x in span)
            for t in range(n_obj):
                for i in range(n_items):
                    n = sum(1 for rd, ri, rl in rows if rd in span and ri == i and rl >= t)
                    out[d, i, t * len(windows) + k] = math.log1p(n / seen) if seen else 0.0
    return out


def test_rates_match_the_definition_cell_by_cell():
    g = np.random.default_rng(0)
    n = 400
    day = g.integers(100, 110, n)
    day[day == 104] = 103  # a day without data inside the range
    item, level = g.integers(0, 7, n), g.integers(0, 3, n)
    got = item_rates(day, item, level, n_items=7, n_objectives=3, first_day=100, last_day=110, windows=(1, 3))
    want = brute_rates(day, item, level, 7, 3, 100, 110, (1, 3))
    assert got.shape == (11, 7, 6)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert not got[0].any()  # the first day has no earlier day
    # day 105's 1-day window counts day 104, which has no rows: no data, zeros (not a rate of 0/0)
    assert not got[5, :, 0::2].any()


def test_no_row_sees_its_own_day_or_later():
    g = np.random.default_rng(1)
    day, item, level = g.integers(0, 8, 300), g.integers(0, 5, 300), g.integers(0, 3, 300)
    base = item_rates(day, item, level, n_items=5, n_objectives=3, first_day=0, last_day=8, windows=(2, 7))
    for d in range(8):
        later = day >= d
        changed = item_rates(
            day, np.where(later, 4 - item, item), np.where(later, 2 - level, level),
            n_items=5, n_objectives=3, first_day=0, last_day=8, windows=(2, 7),
        )  # fmt: skip
        np.testing.assert_array_equal(changed[: d + 1], base[: d + 1])


@pytest.fixture(scope="module")
def stats_world(tiny_world):
    data = load_cascade_data(tiny_world["mr"], item_stats_windows=(1, 2))
    return data


def test_model_ready_statistics_count_the_train_rows(tiny_world, stats_world):
    mr = tiny_world["mr"]
    st = model_ready_item_stats(mr, (1, 2))
    meta = json.loads((mr / "meta.json").read_text())
    t = pa.concat_tables([pq.read_table(mr / p, columns=["ts", "i", "level"]) for p in meta["train_parts"]])
    raw = item_rates(
        np.floor_divide(t["ts"].cast("int64").to_numpy(), DAY_US), t["i"].to_numpy(), t["level"].to_numpy(),
        n_items=st.values.shape[1], n_objectives=3, first_day=st.first_day, last_day=st.eval_day, windows=(1, 2),
    )  # fmt: skip
    # the eval-day row, un-standardised, equals the definition: every train day before it counts
    np.testing.assert_allclose(
        st.values[-1, 1:] * np.where(st.std > 0, st.std, 1) + st.mean, raw[-1, 1:], atol=1e-5
    )
    train = st.values[:-1, 1:].reshape(-1, 6)
    np.testing.assert_allclose(train.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(train.std(0), 1, atol=1e-4)
    assert not st.values[:, 0].any()  # the unknown item
    assert st.columns == [f"stat_{o}_{w}d" for o in ("exposure", "click", "conversion") for w in (1, 2)]
    assert stats_world.item_spec.n_num == tiny_world["data"].item_spec.n_num + 6
    assert stats_world.eval_day == st.eval_day
    assert stats_world.rows.day is not None and int(stats_world.rows.day.max()) < st.eval_day


def test_item_inputs_read_the_row_day_and_refuse_to_guess(stats_world):
    tables = stats_world.tables
    i = torch.tensor([3, 3, 5])
    day = torch.tensor([tables.stats_day0 + 1, tables.stats_day0 + 3, tables.stats_day0 + 3])
    got = tables.item_inputs(i, day).num
    n_base = tables.items_num.shape[1]
    assert torch.equal(got[:, :n_base], tables.items_num[i])
    assert torch.equal(got[0, n_base:], tables.item_stats[1, 3]) and torch.equal(
        got[1, n_base:], tables.item_stats[3, 3]
    )
    with pytest.raises(ValueError, match="as_of"):
        tables.item_inputs(i)
    cat = stats_world.catalog_tables("eval")
    assert torch.equal(cat.item_inputs(i).num[:, n_base:], tables.item_stats[-1, i])
    with pytest.raises(ValueError, match="cover days"):
        tables.as_of(stats_world.eval_day + 1)


@pytest.mark.parametrize("stage", [0, 2])
def test_every_row_scores_the_batch_as_of_its_own_day(stats_world, stage):
    """_batch_loss encodes (distinct day) x (distinct item) once; the same loss built row by row: row r
    scores every in-batch item and its request negatives with the statistics of r's day (as the
    catalog is encoded at serving), AML margins from those scores too."""
    cfg = build_config(TINY_CONFIG)
    data = stats_world
    model, owners = build_model(data, cfg)
    b = data.rows.select(torch.randperm(len(data.rows), generator=torch.Generator().manual_seed(0))[:120])
    assert len(torch.unique(b.day)) > 2
    log_q = item_log_q(torch.as_tensor(data.counts[stage]))
    out_owners = torch.arange(16) % 3  # three output segments, to exercise the AML upstream scores
    use_aml = stage > 0
    got = _batch_loss(
        model, data.tables, b, stage, cfg, "cpu", True, use_aml, segment_columns(out_owners, stage), log_q
    )

    uvec = model.user_vectors(data.tables.user_inputs(b.u, b.hists), stage)
    rows, negs, segs, neg_segs = [], [], [[] for _ in range(stage)], [[] for _ in range(stage)]
    for r in range(len(b)):
        day = b.day[r].expand(len(b))
        v = model.item_vectors(data.tables.item_inputs(b.i, day), stage)  # the batch as of r's day
        n = model.item_vectors(data.tables.item_inputs(b.neg[r], day[: b.neg.shape[1]]), stage)
        rows.append(v @ uvec[r])
        negs.append(n @ uvec[r])
        for s in range(stage):
            c = out_owners == s
            segs[s].append(v[:, c] @ uvec[r, c])
            neg_segs[s].append(n[:, c] @ uvec[r, c])
    scores, extra = torch.stack(rows), torch.stack(negs)
    margins = extra_margins = None
    if use_aml:
        up = upstream_scores([torch.stack(x) for x in segs], stage, cfg.loss.upstream)
        up_n = upstream_scores([torch.stack(x) for x in neg_segs], stage, cfg.loss.upstream)
        margins = aml_margins(up.diagonal(), up, cfg.loss.sigma, cfg.loss.eta)
        extra_margins = aml_margins(up.diagonal(), up_n, cfg.loss.sigma, cfg.loss.eta)
    want = sampled_softmax(
        scores, b.i, temperature=cfg.loss.temperature, log_q=log_q[b.i], margins=margins,
        extra_scores=extra, extra_items=b.neg, extra_margins=extra_margins,
    ).loss  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if stage == 2:  # train.split_scores on the day-group path: the upper dims' part added per row
        split = _batch_loss(
            model, data.tables, b, stage, cfg, "cpu", True, use_aml, segment_columns(out_owners, stage),
            log_q, stage_columns(out_owners, stage),
        )  # fmt: skip
        torch.testing.assert_close(split, want, rtol=1e-5, atol=1e-6)
        # another temperature: the split path scales the own dims' scores and adds them to the bias
        cfg_t = build_config({**TINY_CONFIG, "loss": {**TINY_CONFIG.get("loss", {}), "temperature": 0.6}})
        both = [
            _batch_loss(
                model, data.tables, b, stage, cfg_t, "cpu", True, use_aml, segment_columns(out_owners, stage),
                log_q, sp,
            )
            for sp in (None, stage_columns(out_owners, stage))
        ]  # fmt: skip
        torch.testing.assert_close(both[1], both[0], rtol=1e-5, atol=1e-6)
        assert abs(float(both[0].detach()) - float(want.detach())) > 1e-3  # the temperature changed the loss
    no_day = dataclasses.replace(b, day=None)
    with pytest.raises(ValueError, match="no row days"):
        _batch_loss(
            model,
            data.tables,
            no_day,
            stage,
            cfg,
            "cpu",
            True,
            use_aml,
            segment_columns(out_owners, stage),
            log_q,
        )


def test_parquet_loader_batches_carry_the_same_days(tiny_world, stats_world):
    streamed = load_cascade_data(tiny_world["mr"], loader="parquet", item_stats_windows=(1, 2))
    b = next(iter(streamed.rows.batches(0, 64, seed=0, epoch=0)))
    mem: TrainRows = stats_world.rows
    assert torch.equal(b.day, mem.day[b.row])


@pytest.fixture(scope="module")
def stats_bundle(tiny_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("stats")
    cfg = build_config(TINY_CONFIG, ["data.item_stats=[1,2]"])
    data = load_cascade_data(tiny_world["mr"], item_stats_windows=cfg.data.item_stats)
    torch.set_num_threads(1)
    model, owners, _ = run_cascade(data, cfg)
    save_checkpoint(root / "ckpt", model, owners)
    write_bundle(
        root / "bundle", checkpoint_dir=root / "ckpt", model_ready_dir=tiny_world["mr"],
        dataset_dir=tiny_world["ds"], config=cfg,
    )  # fmt: skip
    return root, cfg, data, model, owners


def _counted(ds, vocab, last: str, mean, std) -> np.ndarray:
    """Windows 1 and 2 of the statistics as of the day after `last`, counted from the canonical events by
    partition, standardised with mean / std."""
    ev = pl.read_parquet(ds / "events" / "**" / "*.parquet", hive_partitioning=True)
    ev = ev.with_columns(pl.col("dt").cast(pl.String)).filter(pl.col("exposed"))
    day = dt.date.fromisoformat(last)
    want = np.zeros((len(vocab) + 1, 6))
    for w_k, w in enumerate((1, 2)):
        days = [(day - dt.timedelta(days=k)).isoformat() for k in range(w)]
        part = ev.filter(pl.col("dt").is_in(days))
        for t, col in enumerate(["exposed", "clicked", "converted"]):
            c = part.filter(pl.col(col)).group_by("item_id").len()
            idx = np.searchsorted(vocab, c["item_id"].to_numpy()) + 1
            want[idx, t * 2 + w_k] = np.log1p(c["len"].to_numpy() / w)
    want = (want - mean) / np.where(std > 0, std, 1.0)
    want[0] = 0.0
    return want


def test_bundle_serves_the_statistics_of_the_day_after_its_histories(tiny_world, stats_bundle):
    """The index's items carry the statistics as of the day after history_until (the last evaluation
    day): counted here straight from the canonical events, standardised with the training's mean/std."""
    root, cfg, data, model, owners = stats_bundle
    rec = Recommender.load(root / "bundle")
    dates = tiny_world["dates"]
    st = rec.info["item_stats"]
    assert (
        st["windows"] == [1, 2]
        and st["as_of"] == (dt.date.fromisoformat(dates[-1]) + dt.timedelta(days=1)).isoformat()
    )
    mean, std = np.array(st["mean"]), np.array(st["std"])
    np.testing.assert_allclose(mean, model_ready_item_stats(tiny_world["mr"], (1, 2)).mean)
    want = _counted(tiny_world["ds"], rec.item_vocab, dates[-1], mean, std)
    got = rec.tables.items_num[:, -6:].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the index holds exactly these vectors
    served = dataclasses.replace(
        data.tables,
        item_stats=None,
        items_num=torch.cat([data.tables.items_num, torch.from_numpy(want).float()], 1),
    )
    np.testing.assert_allclose(
        rec.item_vectors()[1], item_matrix(model, served).numpy()[1:], rtol=1e-5, atol=1e-5
    )


def test_bundle_re_evaluated_on_its_own_data_matches_the_flow(tiny_world, stats_bundle):
    """Evaluation (flow, gate, csmf evaluate) encodes the catalog as of the first evaluation day."""
    root, cfg, data, model, owners = stats_bundle
    rec = Recommender.load(root / "bundle")
    rows = rec.evaluate(tiny_world["mr"], ks=(10,))
    ref = evaluate_model(
        model, owners.output_owners(), data.catalog_tables("eval"), data.eval, data.objectives, ks=(10,),
        scorers="all", fused_weights=cfg.eval.fused_weights, popularity=data.counts,
    )  # fmt: skip
    key = lambda r: (r["objective"], r["scorer"])  # noqa: E731
    got = {key(r): (r["recall"], r["ndcg"]) for r in rows}
    for r in ref:
        assert got[key(r)] == pytest.approx((r["recall"], r["ndcg"]), abs=1e-9), key(r)


def test_re_evaluation_uses_the_other_datasets_statistics(tiny_world, stats_bundle, tmp_path):
    """On a dataset evaluated a day earlier, the catalog carries that dataset's statistics as of its own
    evaluation day, standardised as the model was trained."""
    root, cfg, data, model, owners = stats_bundle
    dates = tiny_world["dates"]
    prep.prepare(
        tiny_world["ds"], tmp_path / "mr", train_dates=(dates[0], dates[-3]), eval_dates=dates[-2],
        seq_len=cfg.data.seq_len, n_req_neg=cfg.data.n_req_neg,
    )  # fmt: skip
    rec = Recommender.load(root / "bundle")
    _, _, tables = rec._mapped_eval(tmp_path / "mr")
    st = rec.info["item_stats"]
    other = model_ready_item_stats(
        tmp_path / "mr", (1, 2), mean=np.array(st["mean"]), std=np.array(st["std"])
    )
    k = len(st["columns"])
    # the same item vocabulary here (same canonical dataset, every item seen in the first days)
    assert torch.equal(tables.items_num[:, -k:], torch.from_numpy(other.at(other.eval_day)))
    assert not torch.equal(tables.items_num[:, -k:], rec.tables.items_num[:, -k:])
    assert torch.equal(tables.items_num[:, :-k], rec.tables.items_num[:, :-k])


def test_validation_encodes_the_catalog_as_of_the_first_validation_day(tiny_world):
    data = load_cascade_data(tiny_world["mr"], val_days=1, item_stats_windows=(1,))
    assert data.val_day == data.eval_day - 1
    assert int(data.rows.day.max()) < data.val_day
    cat = data.catalog_tables("val")
    i = torch.arange(data.tables.items_cat.shape[0])
    assert torch.equal(
        cat.item_inputs(i).num[:, -3:], data.tables.item_stats[data.val_day - data.tables.stats_day0]
    )
    cfg = build_config(TINY_CONFIG, ["data.item_stats=[1]", "data.val_days=1"])
    model, owners = build_model(data, cfg)
    _, rep = run_step(plan(data.objectives, cfg)[0], model, owners, data, cfg)
    assert "val_best_epoch" in rep.info


def test_tables_move_with_their_statistics(stats_world):
    t = stats_world.tables.as_of(stats_world.eval_day).to("cpu")
    assert isinstance(t, FeatureTables) and t.stats_day == stats_world.eval_day and t.item_stats is not None


def test_days_outside_the_statistics_are_refused(stats_world):
    tables = stats_world.tables
    first, last = tables.stats_days
    i = torch.tensor([1, 2])
    for bad in (first - 1, last + 1):
        with pytest.raises(ValueError, match="cover days"):
            tables.item_inputs(i, torch.tensor([first, bad]))


def test_one_training_day_is_refused_with_what_to_do(tiny_world, tmp_path):
    dates = tiny_world["dates"]
    prep.prepare(
        tiny_world["ds"], tmp_path / "mr", train_dates=dates[-2], eval_dates=dates[-1], seq_len=5, n_req_neg=4
    )
    with pytest.raises(ValueError, match="at least 2 days .*found 1.*data.train_days"):
        load_cascade_data(tmp_path / "mr", item_stats_windows=(1,))


def test_config_windows(tmp_path):
    assert build_config(None, ["data.item_stats=[]"]).data.item_stats == ()
    assert build_config({"data": {"item_stats": None}}).data.item_stats == ()
    assert build_config(None, ["data.item_stats=[28]"]).data.item_stats == (28,)
    for bad in ("[0]", "[7,7]", "[-3]"):
        with pytest.raises(ValueError, match="data.item_stats must be distinct windows"):
            build_config(None, [f"data.item_stats={bad}"])


def test_re_evaluation_maps_the_other_datasets_items(tiny_world, stats_bundle):
    """Other-dataset index k -> this model's index imap[k]; this model's items the other dataset lacks get
    the standardised zero count; unknown items (imap 0) are dropped."""
    root, *_ = stats_bundle
    rec = Recommender.load(root / "bundle")
    st = rec.info["item_stats"]
    n = len(rec.item_vocab) + 1
    imap = np.zeros(n, np.int64)
    imap[1:11] = np.arange(20, 10, -1)  # other items 1..10 are this model's 20..11, the rest unknown
    tables = rec._tables_with_stats_of(tiny_world["mr"], imap)
    mean, std = np.array(st["mean"]), np.array(st["std"])
    st_other = model_ready_item_stats(tiny_world["mr"], (1, 2), mean=mean, std=std)
    other = st_other.at(st_other.eval_day)
    k = len(st["columns"])
    got = tables.items_num[:, -k:].numpy()
    np.testing.assert_array_equal(got[20:10:-1], other[1:11])
    zero = (0.0 - mean) / np.where(std > 0, std, 1.0)
    np.testing.assert_allclose(got[21:], np.tile(zero, (n - 21, 1)), rtol=1e-6)
    np.testing.assert_allclose(got[1:11], np.tile(zero, (10, 1)), rtol=1e-6)
    assert not got[0].any()


def test_parquet_loader_days_over_many_parts(tiny_world, tmp_path):
    dates = tiny_world["dates"]
    prep.prepare(
        tiny_world["ds"], tmp_path / "mr", train_dates=(dates[0], dates[-2]), eval_dates=dates[-1],
        seq_len=5, n_req_neg=4, part_rows=700,
    )  # fmt: skip
    mem = load_cascade_data(tmp_path / "mr", item_stats_windows=(1,))
    streamed = load_cascade_data(tmp_path / "mr", loader="parquet", item_stats_windows=(1,))
    assert len(streamed.rows.groups) > 5
    for b in streamed.rows.batches(0, 512, seed=1, epoch=0):
        assert torch.equal(b.day, mem.rows.day[b.row]) and torch.equal(b.i, mem.rows.i[b.row])


def test_bundle_statistics_follow_history_until(tiny_world, stats_bundle, tmp_path):
    """history_until inside the training window: the evaluation-day row, no evaluation event. After the
    last evaluation day: every partition up to it counts, not only the evaluation dates."""
    root, cfg, *_ = stats_bundle
    dates = tiny_world["dates"]
    early = write_bundle(
        tmp_path / "early", checkpoint_dir=root / "ckpt", model_ready_dir=tiny_world["mr"],
        dataset_dir=tiny_world["ds"], config=cfg, history_until=dates[-2],
    )  # fmt: skip
    st = model_ready_item_stats(tiny_world["mr"], (1, 2))
    got = pq.read_table(early / "features" / "item_stats.parquet").drop(["i"]).to_pandas().to_numpy()
    np.testing.assert_allclose(got, st.at(st.eval_day), rtol=1e-6, atol=1e-6)
    prep.prepare(
        tiny_world["ds"], tmp_path / "mr", train_dates=(dates[0], dates[-3]), eval_dates=dates[-2],
        seq_len=cfg.data.seq_len, n_req_neg=cfg.data.n_req_neg,
    )  # fmt: skip
    late = write_bundle(
        tmp_path / "late", checkpoint_dir=root / "ckpt", model_ready_dir=tmp_path / "mr",
        dataset_dir=tiny_world["ds"], config=cfg, history_until=dates[-1],
    )  # fmt: skip
    info = json.loads((late / "bundle.json").read_text())["item_stats"]
    own = model_ready_item_stats(tmp_path / "mr", (1, 2))
    want = _counted(tiny_world["ds"], Recommender.load(late).item_vocab, dates[-1], own.mean, own.std)
    got = pq.read_table(late / "features" / "item_stats.parquet").drop(["i"]).to_pandas().to_numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert info["as_of"] == (dt.date.fromisoformat(dates[-1]) + dt.timedelta(days=1)).isoformat()
