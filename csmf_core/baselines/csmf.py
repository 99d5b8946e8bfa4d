"""CSMF (Deng et al., SIGIR 2025; seeds/000) and its ablations, as comparison methods.

`fit` runs the library's cascade (`csmf_core.cascade`) with the given config and returns, per
objective t, the mode-t query vectors (the user's full-mode vector with the dimensions of stages
> t zeroed) and the ONE shared full-mode item vector, so serving stores 4 * dim bytes per item
whatever the number of objectives. Ablations (the paper's Table 3) change one setting:

* w/o CPP (`fit_no_cpp`): fixed-ratio pruning (PackNet's rule, cpp.rule="fixed") at a ratio equal
  to cpp.tau (the paper's ablation used a fixed ratio of 0.75 against tau 0.75).
* w/o AML (`fit_no_aml`): plain sampled softmax in the later stages (loss.aml=false).
* w/o AR (`fit_no_ar`): no accuracy recovery after pruning (recover.enabled=false).

The weight-level-mask variant is a different model (per-weight ownership) in weight_masks.py.
Under the comparison protocol (baselines/protocol.py) CSMF and these ablations run `tuning.run_trial`
(every train step keeps its best epoch on the validation users, weights chosen there), then
`train_csmf` on the whole window with `tuning.refit_config`; `variant_config` is the ablation's setting.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from csmf_core.baselines.base import MethodResult
from csmf_core.baselines.common import OnStep, count_params, with_seed
from csmf_core.cascade import CascadeData, apply_threads, build_model, plan, run_step
from csmf_core.config import CSMFConfig
from csmf_core.evaluate import item_matrix, user_matrix
from csmf_core.fusion import mode_queries
from csmf_core.masks import UnitOwners
from csmf_core.model import TwoTower


@dataclasses.dataclass
class TrainedCSMF:
    """A trained cascade with its vectors (kept for fusion-weight sweeps and serving benchmarks)."""

    result: MethodResult
    model: TwoTower
    owners: UnitOwners
    user_full: torch.Tensor  # (E, dim) full-mode vectors of the evaluation users
    item_full: torch.Tensor  # (N_items, dim)


def train_csmf(
    data: CascadeData, cfg: CSMFConfig, seed: int, on_step: OnStep = None, *, method: str = "csmf"
) -> TrainedCSMF:
    """Run the whole cascade with seed `seed` and build the per-objective vectors."""
    cfg = with_seed(cfg, seed)
    apply_threads(cfg)
    t0 = time.perf_counter()
    model, owners = build_model(data, cfg)
    steps, infos = 0, {}

    def counted(step: int, loss: float) -> None:
        if on_step is not None:
            on_step(steps + step, loss)

    for step in plan(data.objectives, cfg):
        owners, rep = run_step(step, model, owners, data, cfg, on_step=counted)
        steps += len(rep.losses)
        infos[step.name] = rep.info if step.kind != "prune" else {"units": rep.info["units"]["output"]}
    train_seconds = time.perf_counter() - t0
    model.eval()
    cat = data.catalog_tables("eval")  # with item statistics: as of the first evaluation day
    items = item_matrix(model, cat)
    users = user_matrix(model, cat, data.eval.u, data.eval.hists)
    out = owners.output_owners()
    result = MethodResult(
        method=method,
        user_vecs={o: mode_queries(users, out, t) for t, o in enumerate(data.objectives)},
        item_vecs={o: items for o in data.objectives},
        train_seconds=train_seconds,
        n_params=count_params(model),
        item_bytes_per_item=4 * items.shape[1],
        info={
            "steps": infos,
            "segments": torch.bincount(out.long(), minlength=len(data.objectives)).tolist(),
        },
    )
    return TrainedCSMF(result, model, owners, users, items)


def _no_cpp(cfg: CSMFConfig) -> CSMFConfig:
    return dataclasses.replace(cfg, cpp=dataclasses.replace(cfg.cpp, rule="fixed", ratio=cfg.cpp.tau))


def _no_aml(cfg: CSMFConfig) -> CSMFConfig:
    return dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, aml=False))


def _no_ar(cfg: CSMFConfig) -> CSMFConfig:
    return dataclasses.replace(cfg, recover=dataclasses.replace(cfg.recover, enabled=False))


# method name -> the config it trains (the ablation's one setting applied to the given config)
VARIANTS = {"csmf": lambda cfg: cfg, "csmf_no_cpp": _no_cpp, "csmf_no_aml": _no_aml, "csmf_no_ar": _no_ar}


def variant_config(method: str, cfg: CSMFConfig) -> CSMFConfig:
    """The config CSMF variant `method` trains ("csmf" = cfg itself)."""
    return VARIANTS[method](cfg)


def fit(data: CascadeData, cfg: CSMFConfig, seed: int, on_step: OnStep = None) -> MethodResult:
    """CSMF as configured."""
    return train_csmf(data, cfg, seed, on_step).result


def fit_no_cpp(data: CascadeData, cfg: CSMFConfig, seed: int, on_step: OnStep = None) -> MethodResult:
    """w/o CPP: fixed-ratio (PackNet) pruning with ratio = cpp.tau."""
    return train_csmf(data, _no_cpp(cfg), seed, on_step, method="csmf_no_cpp").result


def fit_no_aml(data: CascadeData, cfg: CSMFConfig, seed: int, on_step: OnStep = None) -> MethodResult:
    """w/o AML: plain sampled softmax in every stage."""
    return train_csmf(data, _no_aml(cfg), seed, on_step, method="csmf_no_aml").result


def fit_no_ar(data: CascadeData, cfg: CSMFConfig, seed: int, on_step: OnStep = None) -> MethodResult:
    """w/o AR: no accuracy recovery after pruning."""
    return train_csmf(data, _no_ar(cfg), seed, on_step, method="csmf_no_ar").result
