"""The comparison harness: shared interface, my methods on a tiny world, serving costs, report statistics."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from csmf_core.baselines import METHODS, resolve_methods
from csmf_core.baselines.base import MethodResult, check_result, evaluate_result
from csmf_core.baselines.common import with_seed
from csmf_core.baselines.serving_cost import fused_vectors, index_bytes
from csmf_core.baselines.weight_masks import _train_phase, initial_owners, prune_weights
from csmf_core.baselines.youtubednn_mix import mixed_rows
from csmf_core.config import build_config
from csmf_core.model import TwoTower
from flows import compare_report as rep
from flows.compare import parse_sweeps

MINE = [
    "youtubednn_sep",
    "youtubednn_mix",
    "csmf",
    "csmf_no_cpp",
    "csmf_no_aml",
    "csmf_no_ar",
    "csmf_weight_masks",
]


def _fake(data, seed=0, d=4, shared=False) -> MethodResult:
    g = torch.Generator().manual_seed(seed)
    n_items, n_eval = data.tables.items_cat.shape[0], len(data.eval)
    v = torch.randn(n_items, d, generator=g)
    users = {o: torch.randn(n_eval, d, generator=g) for o in data.objectives}
    items = {o: (v if shared else torch.randn(n_items, d, generator=g)) for o in data.objectives}
    n_mats = 1 if shared else len(data.objectives)
    return MethodResult("fake", users, items, 0.0, 0, 4 * d * n_mats)


# ---- statistics (by hand) -----------------------------------------------------------------------
def test_t_interval_by_hand():
    m, h, n = rep.mean_ci([0.1, 0.2, 0.4])
    s = math.sqrt(((0.1 - 0.7 / 3) ** 2 + (0.2 - 0.7 / 3) ** 2 + (0.4 - 0.7 / 3) ** 2) / 2)
    assert n == 3 and m == pytest.approx(0.7 / 3)
    assert h == pytest.approx(4.302653 * s / math.sqrt(3), rel=1e-6)  # t_{0.975, 2} from a printed table
    m2, h2, n2 = rep.mean_ci([0.5, 0.7])
    assert (m2, n2) == (pytest.approx(0.6), 2) and h2 == pytest.approx(
        12.706205 * math.sqrt(0.02) / math.sqrt(2)
    )
    m1, h1, n1 = rep.mean_ci([0.3, float("nan")])
    assert m1 == 0.3 and n1 == 1 and math.isnan(h1)


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 5, 29, 30, 31, 45, 100, 1000):
        assert rep.t975(df) == pytest.approx(float(stats.t.ppf(0.975, df)), abs=2e-4)
    with pytest.raises(ValueError):
        rep.t975(0)


def test_verdicts_say_when_csmf_does_not_win():
    runs = [
        {
            "method": m,
            "seed": s,
            "metrics": [
                {"objective": "click", "scorer": "click", "k": 50, "recall": v, "ndcg": v / 2, "users": 10}
            ],
        }
        for m, vals in (("csmf", (0.30, 0.31, 0.29)), ("other", (0.40, 0.41, 0.39)))
        for s, v in enumerate(vals)
    ]
    text = rep.verdicts(runs, ["csmf", "other"], ["click"], 50)
    assert len(text) == 2 and all("does NOT have the best mean" in t and "do not overlap" in t for t in text)
    table, rows = rep.accuracy_table(runs, ["csmf", "other"], ["click"], 50)
    assert rows[1]["click/recall@50"] == pytest.approx(0.40) and "0.4000 ± " in table
    # one seed: no interval, so neither "overlap" nor "do not overlap" (it said "not a significant win")
    one = [r for r in runs if r["seed"] == 0]
    for text in (
        rep.verdicts(one, ["csmf", "other"], ["click"], 50),
        rep.verdicts(one, ["other", "csmf"], ["click"], 50, focus="other"),
    ):
        assert len(text) == 2 and all(
            t.endswith("(one seed: no interval, so no claim of significance either way).") for t in text
        )
    close = [
        dict(r, method={"csmf": "other", "other": "csmf"}[r["method"]]) for r in runs if r["method"] == "csmf"
    ] + [
        r for r in runs if r["method"] == "csmf"
    ]  # both methods with the same three values: the best one's intervals overlap the runner-up's
    assert all(
        "intervals overlap: not a significant win" in t
        for t in rep.verdicts(close, ["csmf", "other"], ["click"], 50)
    )


# ---- interface ---------------------------------------------------------------------------------
def test_registry_and_arguments():
    assert set(MINE) <= set(METHODS)
    assert resolve_methods("csmf,youtubednn_sep") == ["youtubednn_sep", "csmf"]  # report order
    with pytest.raises(ValueError, match="unknown method"):
        resolve_methods("csmf,nope")
    assert parse_sweeps("tau, weights") == ["tau", "weights"]
    with pytest.raises(ValueError, match="unknown sweep"):
        parse_sweeps("tau,gamma")


def test_evaluate_result_matches_brute_force(tiny_world):
    data = tiny_world["data"]
    res = _fake(data)
    rows = evaluate_result(res, data, (10, 50))
    t = data.objectives.index("click")
    scores = (res.user_vecs["click"] @ res.item_vecs["click"].T).numpy()
    scores[:, 0] = -np.inf
    recalls, ndcgs = [], []
    for e, rel in enumerate(data.eval.pos[t]):
        rel = set(np.asarray(rel).tolist())
        if not rel:
            continue
        top = np.argsort(-scores[e], kind="stable")[:50]
        hits = [int(i) in rel for i in top]
        recalls.append(sum(hits) / len(rel))
        dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
        ndcgs.append(dcg / sum(1 / math.log2(r + 2) for r in range(min(len(rel), 50))))
    got = next(r for r in rows if r["objective"] == "click" and r["k"] == 50)
    assert got["users"] == len(recalls)
    assert got["recall"] == pytest.approx(np.mean(recalls)) and got["ndcg"] == pytest.approx(np.mean(ndcgs))


def test_bad_results_are_rejected_with_the_method_name(tiny_world):
    data = tiny_world["data"]
    res = _fake(data)
    res.user_vecs["click"] = res.user_vecs["click"][:-1]
    with pytest.raises(ValueError, match="method 'fake', click: user_vecs shape"):
        check_result(res, data)
    res = _fake(data)
    res.item_vecs["click"][3, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        check_result(res, data)


@pytest.mark.parametrize("shared", [False, True])
def test_fused_query_is_exact_weighted_sum(tiny_world, shared):
    data = tiny_world["data"]
    res = _fake(data, shared=shared)
    w = {"exposure": 1.0, "click": 1.8, "conversion": 1.2}
    q, items = fused_vectors(res, w)
    want = sum(w[o] * (res.user_vecs[o] @ res.item_vecs[o].T) for o in data.objectives)
    torch.testing.assert_close(q @ items.T, want, rtol=1e-5, atol=1e-4)
    assert items.shape[1] == (4 if shared else 12)
    assert index_bytes(items) >= 4 * (items.shape[0] - 1) * items.shape[1]


def test_mixed_rows_repeat_each_row_once_per_later_objective(tiny_world):
    data = tiny_world["data"]
    rows = mixed_rows(data)
    lv = data.rows.level
    assert len(rows) == int((lv >= 1).sum() + (lv >= 2).sum())
    assert int((rows.level == 2).sum()) == 2 * int((lv == 2).sum())


# ---- the methods train ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def method_cfg(tiny_world):
    return build_config(
        {
            "model": {"dim": 16, "hidden": [32]},
            "train": {"batch_size": 256, "epochs": [2, 2, 2]},
            "data": {"seq_len": 5, "n_req_neg": 4},
        }
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", MINE)
def test_method_trains_and_beats_random(tiny_world, method_cfg, name):
    data = tiny_world["data"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = METHODS[name](data, method_cfg, 0)
    finally:
        torch.set_num_threads(threads)
    rows = evaluate_result(res, data, (50,))
    assert rows and all(math.isfinite(r["recall"]) and math.isfinite(r["ndcg"]) for r in rows)
    n_items = data.tables.items_cat.shape[0]
    random_recall = 50 / (n_items - 1)  # expected Recall@50 of a uniformly random ranking
    click = next(r for r in rows if r["objective"] == "click")
    assert click["recall"] > 1.15 * random_recall, (name, click)
    assert res.train_seconds > 0 and res.n_params > 0
    dims = {id(v): v.shape[1] for v in res.item_vecs.values()}
    assert res.item_bytes_per_item == 4 * sum(dims.values())


def test_weight_masks_freeze_and_prune_per_weight(tiny_world, method_cfg):
    data = tiny_world["data"]
    cfg = with_seed(
        dataclasses.replace(method_cfg, train=dataclasses.replace(method_cfg.train, epochs=(1,))), 0
    )
    model = TwoTower(data.user_spec, data.item_spec, cfg.model, 3)
    owners = initial_owners(model)
    model.set_owners(owners)
    _train_phase(model, owners, data, cfg, 0, "train", 1, None, 0)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    new, stats = prune_weights(model, owners, 0, cfg, 0)
    # CPP per weight: the freed entries are the smallest |w|, and they hold at most tau of the mass
    w = before["user.layers.0.weight"].abs().flatten()
    freed = new["user.layers.0.weight"].flatten() == 1
    assert freed.any() and (~freed).any()
    assert w[freed].max() <= w[~freed].min()
    assert float(w[freed].sum()) <= cfg.cpp.tau * float(w.sum()) + 1e-6
    assert all((new[k][owners[k] == 0] <= 1).all() for k in new)
    model.set_owners(new)
    _train_phase(model, new, data, cfg, 0, "recover", 2, None, 0)
    after_recover = {k: v.detach().clone() for k, v in model.named_parameters()}
    _train_phase(model, new, data, cfg, 1, "train", 3, None, 0)
    for k, p in model.named_parameters():
        own0 = (new[k] == 0).expand(p.shape)
        assert torch.equal(p.detach()[own0], after_recover[k][own0]), k  # stage-0 entries bit-identical
        assert not torch.equal(p.detach(), after_recover[k]) or not (new[k] == 1).any()


def test_cli_rejects_bad_arguments_before_any_work(tmp_path, capsys, monkeypatch):
    from flows.cli import main

    home = str(tmp_path / "home")
    # set (not delete) so that monkeypatch restores whatever setup_home changes
    monkeypatch.setenv("CSMF_HOME", home)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    assert main(["compare", "--data", str(tmp_path), "--methods", "csmf,nope", "--home", home]) == 2
    assert "unknown method(s) ['nope']" in capsys.readouterr().err
    assert main(["compare", "--data", str(tmp_path), "--sweeps", "gamma", "--home", home]) == 2
    assert "unknown sweep(s) ['gamma']" in capsys.readouterr().err
    assert main(["compare", "--data", str(tmp_path / "missing"), "--home", home]) == 2
    assert "no such directory" in capsys.readouterr().err
