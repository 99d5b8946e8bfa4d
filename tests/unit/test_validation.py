"""Epoch selection on held-out validation days (data.val_days): the split by hand, the selection
against an independent recomputation, and that frozen entries stay bit-identical through a restore."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from csmf_core.cascade import build_model, load_cascade_data, plan, run_step
from csmf_core.config import ConfigError, build_config
from csmf_core.data import TrainData
from csmf_core.masks import expand_to_param
from csmf_core.validation import DAY_US, BestEpoch, EpochSelector, own_mode_recall, split_validation


def test_split_by_hand():
    d0, d1 = 20_000 * DAY_US, 20_001 * DAY_US
    # rows: (u, i, level, ts); the click history of each row is [row number + 100] to see which is used
    rows = [
        (1, 1, 0, d0 + 5),
        (2, 2, 1, d0 + 9),
        (1, 3, 1, d1 + 10),
        (1, 4, 0, d1 + 5),  # user 1's earliest validation row
        (3, 3, 0, d1 + 7),
        (1, 3, 0, d1 + 20),  # the same item again, not a click
    ]
    u, i, lv, ts = (torch.tensor([r[k] for r in rows]) for k in range(4))
    tr = TrainData(u, i, lv, ts, {"click": torch.arange(len(rows))[:, None] + 100}, torch.zeros(len(rows), 0))
    keep, val, (first, last) = split_validation(tr, ["exposure", "click"], 1)
    assert (first, last) == (20_001, 20_001)
    assert keep.tolist() == [0, 1]  # the two rows of the first day: (1, 1) and (2, 2)
    assert val.u.tolist() == [1, 3]
    assert val.hists[0][:, 0].tolist() == [103, 104]  # user 1: row 3 (earliest), user 3: row 4
    assert [p.tolist() for p in val.pos[0]] == [[3, 4], [3]]
    assert [p.tolist() for p in val.pos[1]] == [[3], []]
    with pytest.raises(ValueError, match="too short"):
        split_validation(tr, ["exposure", "click"], 2)


def test_config_rules():
    with pytest.raises(ConfigError, match="val_days must be >= 0"):
        build_config(None, ["data.val_days=-1"])
    with pytest.raises(ConfigError, match="train.loader=memory"):
        build_config(None, ["data.val_days=1", "train.loader=parquet"])
    with pytest.raises(ConfigError, match="smaller than data.train_days"):
        build_config(None, ["data.val_days=3", "data.train_days=3"])


def test_each_train_step_ends_at_its_best_epoch(tiny_world):
    cfg = build_config(
        {"model": {"dim": 16, "hidden": [32]}, "train": {"batch_size": 256, "epochs": [2, 3, 3]}},
        ["data.val_days=1"],
    )
    data = load_cascade_data(tiny_world["mr"], val_days=1)
    full = load_cascade_data(tiny_world["mr"])
    assert len(data.rows) < len(full.rows) and len(data.val) > 0
    n = len(data.rows)  # prep writes train rows in time order: the kept rows are the first n
    assert torch.equal(data.rows.u, full.rows.u[:n]) and torch.equal(data.rows.i, full.rows.i[:n])
    assert torch.equal(data.rows.neg, full.rows.neg[:n])
    assert all(torch.equal(a, b[:n]) for a, b in zip(data.rows.hists, full.rows.hists))
    model, owners = build_model(data, cfg)
    k = cfg.eval.primary_k
    chosen = []
    for step in plan(data.objectives, cfg):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        owners, rep = run_step(step, model, owners, data, cfg)
        if step.kind != "train":
            assert "val_best_epoch" not in rep.info
            continue
        best = rep.info[f"val_best_recall@{k}"]
        # the restored model scores exactly the best score, recomputed independently of the selector
        again = own_mode_recall(model, owners.output_owners(), data.tables, data.val, step.stage, k)
        assert again == pytest.approx(best, abs=1e-12)
        assert best >= rep.info[f"val_start_recall@{k}"] and best >= rep.info[f"val_last_recall@{k}"]
        assert 0 <= rep.info["val_best_epoch"] <= cfg.epochs_for(step.stage)
        chosen.append(rep.info["val_best_epoch"])
        # entries owned by earlier stages are bit-identical through training and the restore
        for name, p in model.named_parameters():
            frozen = expand_to_param(model.owners[name] < step.stage, p)
            assert torch.equal(p.detach()[frozen], before[name][frozen]), name
    assert len(chosen) == 3
    assert np.isfinite(chosen).all()


def test_freed_init_continue_starts_the_next_mode_at_this_one(tiny_world):
    # with cpp.freed_init=continue the freed output dims are 0 for every user, so right after
    # pruning stage 0 the mode-1 score of every pair equals the mode-0 score (and keep does not)
    from csmf_core.cascade import Step

    data = load_cascade_data(tiny_world["mr"])
    u = data.tables.user_inputs(data.rows.u[:64], [h[:64] for h in data.rows.hists])
    i = data.tables.item_inputs(data.rows.i[:64])
    gaps = {}
    for how in ("continue", "keep"):
        cfg = build_config({"model": {"dim": 16, "hidden": [32]}}, [f"cpp.freed_init={how}"])
        model, owners = build_model(data, cfg)
        owners, _ = run_step(Step("cpp_prune_exposure", "prune", 0), model, owners, data, cfg)
        with torch.no_grad():
            s0, s1 = model.score(u, i, mode=0), model.score(u, i, mode=1)
        gaps[how] = float((s1 - s0).abs().max())
    assert gaps["continue"] <= 1e-6 * (1 + float(s0.abs().max()))
    assert gaps["keep"] > 1e-3  # the check can fail: without it the modes differ


def test_log_q_of_the_selection_pass_counts_only_the_rows_it_trains_on(tiny_world):
    """With validation days held out, the log-Q counts covered the whole window, validation days
    included: the selection pass trained on item frequencies of the very days it was judged on, which
    neither its refit nor an evaluation does. Recomputed here from the train Parquet with polars."""
    import polars as pl

    data = load_cascade_data(tiny_world["mr"], val_days=1)
    full = load_cascade_data(tiny_world["mr"])
    train = pl.read_parquet(tiny_world["mr"] / "train" / "*.parquet")
    day = (pl.col("ts") // DAY_US).cast(pl.Int64)
    before = train.filter(day < day.max())  # the last day is the validation day
    n = len(full.counts[0])
    for t in range(len(data.objectives)):
        got = before.filter(pl.col("level") >= t).group_by("i").len()
        want = np.zeros(n, np.int64)
        want[got["i"].to_numpy()] = got["len"].to_numpy()
        assert np.array_equal(data.log_q_counts(t), want), t
        whole = train.filter(pl.col("level") >= t).group_by("i").len()
        want_full = np.zeros(n, np.int64)
        want_full[whole["i"].to_numpy()] = whole["len"].to_numpy()
        assert np.array_equal(full.log_q_counts(t), want_full), t  # the refit's: the whole window
        assert data.log_q_counts(t).sum() < full.log_q_counts(t).sum()
        # the popularity counts stay the window's (an evaluation served from this load, e.g. with
        # data.val_refit false, compares with popularity over every training day)
        assert np.array_equal(data.counts[t], want_full), t


def _kept_with_patience(scores: list[float], patience: int) -> tuple[int, int]:
    """(epoch kept, last epoch trained) of a curve over epochs 0, 1, ... (hand rule, restated)."""
    best, kept, since = float("-inf"), 0, 0
    for e, s in enumerate(scores):
        if s > best:
            best, kept, since = s, e, 0
        else:
            since += 1
            if since >= patience:
                return kept, e
    return kept, len(scores) - 1


def test_run_epochs_stops_when_on_epoch_says_so():
    from csmf_core.optim import Optimiser, TrainLog, run_epochs

    w = torch.nn.Parameter(torch.ones(3))
    cfg = build_config()
    log = TrainLog("t", 4, 10)
    opt = Optimiser([w], 0.1, cfg, log)
    seen = []
    run_epochs(
        opt, 10, lambda e: [(4, None)], lambda b: (w**2).sum(), on_epoch=lambda e: seen.append(e) or e == 3
    )
    assert seen == [1, 2, 3] and len(log.epoch_losses) == 3


def test_early_stopping_keeps_the_epochs_of_the_whole_curve_when_the_best_comes_in_time(tiny_world):
    """train.patience: each train step stops after `patience` considered epochs without a better
    validation score. The epochs kept equal those the hand rule reads off the whole curve (patience
    off); where they equal the whole curve's choice, the selection pass ends with a bit-identical model."""
    from csmf_core.tuning import run_trial

    data = load_cascade_data(tiny_world["mr"], val_days=1)
    base = {
        "model": {"dim": 16, "hidden": [32]},
        "train": {"batch_size": 256, "epochs": [3, 6, 6], "patience": 0},
        "data": {"seq_len": 5, "n_req_neg": 4, "val_days": 1},
    }
    whole = run_trial(data, build_config(base))
    curves = [r.val_scores for r in whole.reports if r.step.kind == "train"]
    assert [len(c) for c in curves] == [4, 7, 7]  # epochs 0 .. cap, every step to its cap
    stopped_any = False
    for patience in (1, 2, 5):
        cfg = build_config(base, [f"train.patience={patience}"])
        res = run_trial(data, cfg)
        want = [_kept_with_patience(c, patience) for c in curves]
        assert res.epochs == [k for k, _ in want], (patience, curves)
        trained = [len(r.val_scores) - 1 for r in res.reports if r.step.kind == "train"]
        assert trained == [last for _, last in want]  # stopped where the rule says
        stopped_any |= trained != [3, 6, 6]
        if res.epochs == whole.epochs:
            for a, b in zip(res.model.state_dict().values(), whole.model.state_dict().values()):
                assert torch.equal(a, b)
    assert stopped_any  # the tiny world's curves do stop early at patience 1 or 2


@pytest.mark.parametrize(
    "scores, patience, best, stops_after",
    [
        # ties keep the earlier epoch; a strictly better later one wins
        ([0.2, 0.3, 0.3, 0.25, 0.31], 0, 4, None),
        # patience 2: epochs 2 and 3 do not beat epoch 1's 0.5 (a tie does not), so it stops after
        # epoch 3 and epoch 4's 0.9 is never seen
        ([0.1, 0.5, 0.4, 0.5, 0.9], 2, 1, 3),
        # non-finite scores are never best and patience never stops before a finite best exists
        ([float("nan"), float("-inf"), float("nan"), 0.1, 0.0, 0.0], 2, 3, 5),
        ([float("nan"), float("nan"), float("nan")], 1, None, None),
        # a NaN after a best counts as an epoch without a better score
        ([0.4, float("nan"), 0.39], 2, 0, 2),
    ],
)
def test_best_epoch_bookkeeping_by_hand(scores, patience, best, stops_after):
    """`BestEpoch` (EpochSelector's and the comparison protocol's Selector's bookkeeping) against
    expectations written out by hand: the epoch kept, and the first epoch after which `stop` holds."""
    track, first_stop = BestEpoch(patience), None
    for epoch, s in enumerate(scores):  # as training does: no epoch after the first stop
        track.offer(epoch, s)
        if track.stop:
            first_stop = epoch
            break
    assert track.best_epoch == best
    assert first_stop == stops_after
    n = len(scores) if stops_after is None else stops_after + 1
    assert track.epochs == list(range(n))
    assert [str(x) for x in track.scores] == [str(x) for x in scores[:n]]


def test_epoch_selector_restores_the_first_epoch_when_no_score_is_finite_and_the_best_otherwise():
    """EpochSelector on top of BestEpoch, scores stubbed: with no finite score it reports the first
    epoch considered (score NaN) and restores those parameters; once a finite score comes, that epoch."""

    def run(scores: list[float]) -> tuple[EpochSelector, torch.nn.Linear]:
        model = torch.nn.Linear(1, 1, bias=False)
        sel = EpochSelector.__new__(EpochSelector)  # no validation data needed: `_score` is stubbed
        sel.model, sel.k = model, 10
        sel.track, sel._best_state = BestEpoch(0), None
        feed = iter(scores)
        sel._score = lambda: next(feed)
        for epoch in range(len(scores)):
            with torch.no_grad():
                model.weight.fill_(float(epoch))  # the parameters after `epoch`
            sel.consider(epoch)
        sel.restore()
        return sel, model

    sel, model = run([float("nan"), float("nan")])
    assert sel.best_epoch == 0 and np.isnan(sel.best_score) and model.weight.item() == 0.0
    sel, model = run([float("nan"), 0.2, 0.1])
    assert sel.best_epoch == 1 and sel.best_score == 0.2 and model.weight.item() == 1.0
    assert sel.summary()["val_best_epoch"] == 1.0 and np.isnan(sel.summary()["val_start_recall@10"])
