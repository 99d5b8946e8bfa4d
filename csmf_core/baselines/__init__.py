"""Comparison methods (issue 5): the paper's baselines and CSMF's ablations behind one interface.

`METHODS[name](data, cfg, seed, on_step=None) -> MethodResult` (csmf_core/baselines/base.py);
score any result with `evaluate_result`. See docs/comparison.md for each method's source paper
and simplifications. Methods whose module does not exist are left out of METHODS (`MISSING` lists
them with the import error) so the harness can run whatever is available.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from csmf_core.baselines.base import MethodResult, evaluate_result

# CLI name -> (module, function). Order = order in reports.
_REGISTRY: dict[str, tuple[str, str]] = {
    "youtubednn_sep": ("youtubednn_sep", "fit"),
    "youtubednn_mix": ("youtubednn_mix", "fit"),
    "mvke": ("mvke", "fit"),
    "moppr": ("moppr", "fit"),
    "dtml": ("dtml", "fit"),
    "dmmp": ("dmmp", "fit"),
    "resflow": ("resflow", "fit"),
    "csmf": ("csmf", "fit"),
    "csmf_no_cpp": ("csmf", "fit_no_cpp"),
    "csmf_no_aml": ("csmf", "fit_no_aml"),
    "csmf_no_ar": ("csmf", "fit_no_ar"),
    "csmf_weight_masks": ("weight_masks", "fit"),
}

ABLATIONS = ("csmf", "csmf_no_cpp", "csmf_no_aml", "csmf_no_ar", "csmf_weight_masks")

METHODS: dict[str, Callable[..., MethodResult]] = {}
MISSING: dict[str, str] = {}
for _name, (_mod, _fn) in _REGISTRY.items():
    try:
        METHODS[_name] = getattr(importlib.import_module(f"csmf_core.baselines.{_mod}"), _fn)
    except ModuleNotFoundError as exc:  # only "module not written yet"; real import bugs propagate
        if exc.name != f"csmf_core.baselines.{_mod}":
            raise
        MISSING[_name] = f"module csmf_core/baselines/{_mod}.py does not exist"


def resolve_methods(spec: str) -> list[str]:
    """'all' or a comma list -> method names in report order; ValueError naming unknown/missing ones."""
    if spec.strip() == "all":
        return list(METHODS)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in _REGISTRY]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(_REGISTRY)}")
    missing = [n for n in names if n not in METHODS]
    if missing:
        raise ValueError("method(s) not available: " + "; ".join(f"{n} ({MISSING[n]})" for n in missing))
    return [n for n in _REGISTRY if n in names]


__all__ = ["ABLATIONS", "METHODS", "MISSING", "MethodResult", "evaluate_result", "resolve_methods"]
