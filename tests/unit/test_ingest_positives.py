"""flows.ingest.check_positives: every objective needs 2 positive training rows (counts by hand)."""

from __future__ import annotations

import pytest

from csmf_core.config import build_config
from data_contracts.schema import Objective
from flows.ingest import check_positives


class _Spec:
    objectives = (Objective("exposure", "exposed"), Objective("click", "clicked"), Objective("buy", "bought"))


DAYS = ["2026-01-01", "2026-01-02", "2026-01-03"]


def test_counts_are_rows_at_or_past_each_level():
    # level 0: 100 rows exposed only; level 1: 5 clicked, not bought; level 2: 2 bought
    check_positives([100, 5, 2], _Spec(), DAYS, build_config())  # buy has 2: enough
    with pytest.raises(
        ValueError, match=r"objective buy \(column bought\): 1 positive row\(s\) in the 3 training"
    ):
        check_positives([100, 5, 1], _Spec(), DAYS, build_config())
    # click counts the bought rows too (the cascade: bought implies clicked): 0 + 2 = 2, enough
    check_positives([100, 0, 2], _Spec(), DAYS, build_config())
    with pytest.raises(ValueError, match=r"objective click .*: 1 positive"):
        check_positives([100, 1, 0], _Spec(), DAYS, build_config())


@pytest.mark.parametrize(
    ("overrides", "advice"),
    [
        ([], "Every partition before the evaluation day is already used"),
        (["data.train_days=3"], r"Train on more days \(data.train_days=3"),
    ],
)
def test_the_advice_fits_the_run(overrides, advice):
    with pytest.raises(ValueError, match=advice):
        check_positives([50, 3, 0], _Spec(), DAYS, build_config(None, overrides))


def test_incremental_runs_are_not_checked():
    """An incremental step keeps a stage with too few rows (csmf_core.cascade.Step.keep_if_few)."""
    check_positives([50, 3, 0], _Spec(), DAYS, build_config(None, ["train.mode=incremental"]))
