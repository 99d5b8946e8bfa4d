"""Comparison methods (issue 5): the paper's baselines and CSMF's ablations behind one interface.

`METHODS[name](data, cfg, seed, on_step=None) -> MethodResult` (csmf_core/baselines/base.py);
score any result with `evaluate_result`. See docs/comparison.md for each method's source paper
and simplifications.
"""

from __future__ import annotations

from collections.abc import Callable

from csmf_core.baselines import (
    csmf,
    dmmp,
    dtml,
    moppr,
    mvke,
    resflow,
    weight_masks,
    youtubednn_mix,
    youtubednn_sep,
)
from csmf_core.baselines.base import MethodResult, evaluate_result

# CLI name -> fit function. Order = order in reports.
METHODS: dict[str, Callable[..., MethodResult]] = {
    "youtubednn_sep": youtubednn_sep.fit,
    "youtubednn_mix": youtubednn_mix.fit,
    "mvke": mvke.fit,
    "moppr": moppr.fit,
    "dtml": dtml.fit,
    "dmmp": dmmp.fit,
    "resflow": resflow.fit,
    "csmf": csmf.fit,
    "csmf_no_cpp": csmf.fit_no_cpp,
    "csmf_no_aml": csmf.fit_no_aml,
    "csmf_no_ar": csmf.fit_no_ar,
    "csmf_weight_masks": weight_masks.fit,
}

ABLATIONS = ("csmf", "csmf_no_cpp", "csmf_no_aml", "csmf_no_ar", "csmf_weight_masks")


def resolve_methods(spec: str) -> list[str]:
    """'all' or a comma list -> method names in report order; ValueError naming unknown ones."""
    if spec.strip() == "all":
        return list(METHODS)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ValueError(f"no method named in {spec!r}; give 'all' or a comma list of: {', '.join(METHODS)}")
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    return [n for n in METHODS if n in names]


__all__ = ["ABLATIONS", "METHODS", "MethodResult", "evaluate_result", "resolve_methods"]
