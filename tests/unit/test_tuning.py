"""csmf_core/tuning.py: the search space, suggestions, the selection pass and its refit config."""

from __future__ import annotations

from pathlib import Path

import pytest

from csmf_core.cascade import load_cascade_data
from csmf_core.config import ConfigError, build_config
from csmf_core.tuning import (
    TrialPruned,
    changed_keys,
    load_space,
    refit_config,
    run_trial,
    suggest,
    trial_config,
)

DEFAULT_SPACE = Path(__file__).resolve().parents[2] / "configs" / "tune_space.yaml"


class FakeTrial:
    """Answers every suggestion with the low end (floats/ints) or the last choice (categoricals)."""

    def __init__(self):
        self.asked: list[str] = []

    def suggest_float(self, name, low, high, log=False):
        self.asked.append(name)
        return low

    def suggest_int(self, name, low, high, log=False):
        self.asked.append(name)
        return low

    def suggest_categorical(self, name, choices):
        self.asked.append(name)
        return choices[-1]


def test_default_space_parses_and_every_value_is_a_valid_config():
    space = load_space(DEFAULT_SPACE.read_text())
    keys = {p.key for p in space}
    # the minimum: lr, tau, temperature, per-stage epoch caps, batch size, freed_init,
    # item_stats windows including none, AML on/off and eta, recover.fraction
    assert {
        "train.lr",
        "cpp.tau",
        "loss.temperature",
        "train.epochs",
        "train.batch_size",
        "cpp.freed_init",
        "data.item_stats",
        "loss.aml",
        "loss.eta",
        "recover.fraction",
    } <= keys
    items = next(p for p in space if p.key == "data.item_stats")
    assert "none" in items.choices


def test_space_errors_are_reported_together():
    with pytest.raises(ConfigError) as e:
        load_space(
            {
                "train.nope": {"low": 1, "high": 2},
                "train.lr": {"low": 0.1, "high": 0.01},
                "loss.eta": {"low": 1, "high": 2, "when": {"loss.aml": True}},
                "train.epochs": {"per_stage": [[3, 1]]},
                "cpp.freed_init": {"choices": []},
            }
        )
    msg = str(e.value)
    for bit in ("train.nope", "train.lr", "'when' names 'loss.aml'", "per_stage", "choices"):
        assert bit in msg
    with pytest.raises(ConfigError, match="cpp.tau"):  # 1.0 is refused by the config itself
        load_space({"cpp.tau": {"low": 0.5, "high": 1.0}})


def test_suggest_respects_when_and_per_stage():
    space = load_space(
        {
            "loss.aml": {"choices": [True, False]},
            "loss.eta": {"low": 1.0, "high": 3.0, "when": {"loss.aml": True}},
            "train.epochs": {"per_stage": [[1, 4], [2, 8]]},
            "data.item_stats": {"choices": ["[1, 7]", "none"]},
        }
    )
    trial = FakeTrial()
    got = suggest(space, trial, n_stages=3)
    # last choices: aml False -> eta not asked; item_stats "none" -> []; stage 2 repeats the last range
    assert got == {"loss.aml": False, "train.epochs": [1, 2, 2], "data.item_stats": []}
    assert "loss.eta" not in trial.asked
    cfg = trial_config(build_config({}), got)
    assert cfg.loss.aml is False and cfg.train.epochs == (1, 2, 2) and cfg.data.item_stats == ()
    assert changed_keys(build_config({}), cfg) == {
        "loss": {"aml": False},
        "train": {"epochs": [1, 2, 2]},
    }  # item_stats [] is the default: not a change


def test_selection_pass_and_refit(tiny_world):
    data = load_cascade_data(tiny_world["mr"], val_days=1)
    cfg = build_config(
        {
            "model": {"dim": 16, "hidden": [32]},
            "train": {"batch_size": 256, "epochs": [2, 2, 2]},
            "data": {"seq_len": 5, "n_req_neg": 4, "val_days": 1},
            "eval": {"fused_weights": "auto"},
        }
    )
    seen = []
    res = run_trial(data, cfg, report=lambda i, s: seen.append((i, s)) or False)
    assert [i for i, _ in seen] == [0, 1, 2] and len(res.epochs) == 3
    assert all(0 <= e <= 2 for e in res.epochs)
    # the kept epochs are the train steps' own choices
    kept = [int(r.info["val_best_epoch"]) for r in res.reports if r.step.kind == "train"]
    assert res.epochs == kept
    assert res.score == res.score and res.weights in [tuple(r["weights"]) for r in res.weight_rows]
    refit = refit_config(cfg, res)
    assert refit.train.epochs == tuple(res.epochs) and refit.data.val_days == 0
    assert refit.eval.fused_weights == res.weights
    with pytest.raises(TrialPruned):
        run_trial(data, cfg, report=lambda i, s: i == 1)
    with pytest.raises(ValueError, match="validation days"):
        run_trial(load_cascade_data(tiny_world["mr"]), cfg)


def test_tuned_config_is_layered_between_the_file_and_the_overrides(tmp_path, tiny_world):
    from csmf_core.config import load_config
    from flows.tune import describe_tuned, find_tuned, tuned_config_path

    base = tmp_path / "base.yaml"
    base.write_text("train: {lr: 0.001, batch_size: 256}\nloss: {eta: 1.5}\n")
    home = tmp_path / "home"
    assert find_tuned(home, tiny_world["ds"], "auto") is None  # no tune yet: nothing applied
    tuned = tuned_config_path(home, "synth-tiny")
    tuned.parent.mkdir(parents=True)
    tuned.write_text("train: {lr: 0.004}\ncpp: {tau: 0.5}\n")
    found = find_tuned(home, tiny_world["ds"], "auto")
    assert found == tuned and find_tuned(home, tiny_world["ds"], "none") is None
    cfg = load_config(base, ["cpp.tau=0.6"], tuned=found)
    # the tuned lr replaces the file's, the file's batch size and eta stay, the override wins over both
    assert (cfg.train.lr, cfg.train.batch_size, cfg.loss.eta, cfg.cpp.tau) == (0.004, 256, 1.5, 0.6)
    assert describe_tuned(found).startswith(str(tuned)) and "sha256" in describe_tuned(found)
    with pytest.raises(ConfigError, match="no such file"):
        find_tuned(home, tiny_world["ds"], str(tmp_path / "missing.yaml"))


def test_tuned_config_header_names_the_days_it_read(tmp_path):
    from flows.tune import tuned_applies, tuned_reads_before

    new = tmp_path / "new.yaml"
    new.write_text(
        "# csmf tune synth-tiny 2026-01-06: best of 2 complete trials (study s)\n"
        "# read: the days before 2026-01-06 (a run evaluating any of them does not apply this file)\n"
        "train: {lr: 0.004}\n"
    )
    old = tmp_path / "old.yaml"  # written before the "read:" line: its first line names the date
    old.write_text("# csmf tune kuairand-pure-slice 2022-05-06: best of 9 complete trials (study s)\n{}\n")
    hand = tmp_path / "hand.yaml"
    hand.write_text("train: {lr: 0.004}\n")
    assert (tuned_reads_before(new), tuned_reads_before(old), tuned_reads_before(hand)) == (
        "2026-01-06",
        "2022-05-06",
        None,
    )
    assert tuned_applies(new, "2026-01-06", explicit=True) == (True, "")  # the tune never read 01-06
    assert tuned_applies(new, "2026-01-09", explicit=False) == (True, "")
    assert tuned_applies(hand, "2020-01-01", explicit=True) == (True, "")  # no header: nothing to check
    applies, why = tuned_applies(new, "2026-01-05", explicit=False)  # 01-05 was its validation day
    assert not applies and "chosen on the days before 2026-01-06" in why and "not applied" in why
    with pytest.raises(ConfigError, match="evaluates from 2026-01-05, whose labels.*--tuned none"):
        tuned_applies(new, "2026-01-05", explicit=True)


def test_the_daily_run_skips_a_tuned_config_chosen_on_its_evaluation_days(tmp_path, tiny_world, monkeypatch):
    """A tune for 2026-01-06 (validation day 01-05) was applied to a run evaluating 01-05: settings
    chosen on that day's labels, scored on them."""
    import flows.pipeline as pipeline
    from flows.tune import tuned_config_path

    class Started(Exception):
        pass

    def start(cfg, date, *args):  # the first step after the tuned config is settled: stop there
        raise Started(cfg, date)

    monkeypatch.setattr(pipeline, "choose_start", start)
    monkeypatch.setattr(pipeline.doctor, "before_run", lambda *a: None)
    home = tmp_path / "home"
    tuned = tuned_config_path(home, "synth-tiny")
    tuned.parent.mkdir(parents=True)
    tuned.write_text("# read: the days before 2026-01-06 (...)\ntrain: {lr: 0.004}\n")

    def lr_of_run(**kw):
        with pytest.raises(Started) as run:
            pipeline.csmf_daily.fn(data=str(tiny_world["ds"]), home=str(home), **kw)
        cfg, date = run.value.args
        return date, cfg.train.lr

    assert lr_of_run() == ("2026-01-06", 0.004)  # the newest day: the tune never read it
    assert lr_of_run(date="2026-01-05") == ("2026-01-05", 0.002)  # its validation day: not applied
    assert lr_of_run(overrides=["data.eval_days=2"]) == ("2026-01-05", 0.002)
    with pytest.raises(ConfigError, match="whose labels that choice has seen"):
        pipeline.csmf_daily.fn(
            data=str(tiny_world["ds"]), home=str(home), date="2026-01-05", tuned=str(tuned)
        )


def test_settle_tuned_finds_applies_or_drops_the_tuned_config(tmp_path, tiny_world):
    """`csmf run` and the flow settle the tuned config through one function: auto's file applies to a
    run evaluating after the tune's days, is dropped (the config loaded without it) for one evaluating
    them, and a file named by --tuned is refused there; none never reads it."""
    from flows.tune import settle_tuned, tuned_config_path, tuned_named

    assert [tuned_named(s) for s in (None, "", "auto", "none", "x.yaml")] == [
        False,
        False,
        False,
        False,
        True,
    ]
    home, ds = tmp_path / "home", tiny_world["ds"]
    tuned = tuned_config_path(home, "synth-tiny")
    tuned.parent.mkdir(parents=True)
    tuned.write_text("# read: the days before 2026-01-06 (...)\ntrain: {lr: 0.004}\n")
    asked = []

    def day(d):
        return lambda cfg: asked.append(cfg.train.lr) or d

    got, cfg, why = settle_tuned(home, ds, "auto", None, ["train.epochs=[1,1,1]"], day("2026-01-06"))
    assert (got, cfg.train.lr, why, cfg.train.epochs) == (tuned, 0.004, "", (1, 1, 1))
    got, cfg, why = settle_tuned(home, ds, "auto", None, [], day("2026-01-05"))
    assert got is None and cfg.train.lr == 0.002 and "not applied" in why
    assert asked == [0.004, 0.004]  # the first evaluation day is asked of the config with the file
    with pytest.raises(ConfigError, match="whose labels that choice has seen"):
        settle_tuned(home, ds, str(tuned), None, [], day("2026-01-05"))
    assert settle_tuned(home, ds, "none", None, [], day("2026-01-05"))[::2] == (None, "")


def test_the_search_space_table_lists_every_stage_sampled():
    """A 4-objective dataset samples train.epochs.3 (the last range repeats), but the report's table
    listed stages 0-2 only."""
    from csmf_core.tuning import Param, describe

    p = Param("train.epochs", "per_stage", ranges=((1, 6), (1, 10), (1, 16)))
    assert describe([p])[0]["range"] == "stage 0: 1 .. 6; stage 1: 1 .. 10; stage 2: 1 .. 16"
    assert describe([p], 4)[0]["range"].endswith("stage 2: 1 .. 16; stage 3: 1 .. 16")
    assert describe([p], 2)[0]["range"] == "stage 0: 1 .. 6; stage 1: 1 .. 10"  # the stages sampled
