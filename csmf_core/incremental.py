"""Incremental training (`train.mode: incremental`): continue a previous model on the newest day(s).

A full run trains the cascade from scratch: pretrain, CPP-prune and recover every stage but the last,
then fine-tune the last. An incremental run starts from a previous model (the champion, or
`csmf run --from-model REF`), warm-started with its checkpoint, masks and id maps
(csmf_core/warm.py, csmf_core/idmap.py), and runs one train step per stage, in cascade order:

    incremental_<o_0> -> incremental_<o_1> -> ... -> incremental_<o_{N-1}>

Step t trains exactly what stage t owns (`train_stage` masks every other entry, as in a full run's
fine-tuning), so ownership never changes: no pruning, no recovery, and the entries of stages < t stay
bit-identical through step t and after. The AML margins of step t are computed from the model's
current upstream modes, i.e. from stages < t as already updated by this run's earlier steps. Exact
fusion holds as for any model with unit-level ownership.

Epochs: as in a full run (flows/epoch_selection.py), a selection pass on validation days chooses
them: the run's window is `train.incremental_days` + v days, v = `data.val_days` (auto = 1, 0 = no
selection), and the `train.rehearsal_days` before them when rehearsal is on; the pass continues the
previous model on the `incremental_days` days before the validation day(s), keeps each step's best
epoch (its starting point, epoch 0, included: a stage may stay as it was) by own-mode Recall@K on the
last v days, and the refit then continues the previous model on the last `incremental_days` days
only, for those epochs. `train.epochs` are the caps. Rehearsal (`train.incremental_rehearsal`, auto by
default) adds to each step a draw of rows from the earlier days, its ratio per stage chosen by the
same pass (flows/incremental.py, csmf_core.tuning.best_of).

New days: an incremental run trains on the days its starting model has not seen, at least
`train.incremental_days`: a champion trained for D-1 gives one new day (D-1's partition is the
newest training day of a run for D); a champion the gate kept through a rejected day, or a skipped
day, gives more (`ModeDecision.new_days`, from the model's run date), so no day is lost to the line.
The flow counts them in partitions (a day missing from the data is no new day) and takes the last
that many partitions before the run's date (flows/pipeline.py, `flows.inputs.plan_window`). It is
bounded: a full retrain comes after `train.full_every_days` days. With `train.start_from: line`
the run continues the newest model the gate verified, promoted or not (flows/incremental.py), so it
has one new day even after a rejected challenger.

`decide_mode` is the schedule: incremental only when asked for, with a starting model trained for an
earlier date, and while that model's last full retrain is less than `train.full_every_days` days
old; otherwise a full retrain, with a line saying why.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from csmf_core.cascade import Step

FULL, INCREMENTAL = "full", "incremental"
# the csmf.last_full_date of a model that continued one named by its path (not a registered version):
# its line's last full retrain is unknown, and the next scheduled run of the line retrains in full
UNKNOWN_FULL = "unknown"


def incremental_plan(objectives: list[str]) -> list[Step]:
    """One train step per stage, in cascade order (no pruning, no recovery); a stage whose objective
    has fewer than 2 positive rows in the days trained is kept as the model had it (`keep_if_few`)."""
    return [Step(f"incremental_{o}", "train", t, keep_if_few=True) for t, o in enumerate(objectives)]


def val_days_for(val_days: int | str) -> int:
    """Validation days of an incremental run: data.val_days auto -> 1, else as configured (0 = none)."""
    return 1 if val_days == "auto" else int(val_days)


@dataclass(frozen=True)
class ModeDecision:
    """How a run trains: mode, why (one line for the log), and the previous model's facts."""

    mode: str
    reason: str
    parent_version: str | None = None  # the model it continues (None: a full run)
    last_full_date: str | None = None  # the run date of the last full retrain in its line
    # days since the model it continues was trained (its run date .. the day before this run's):
    # the days it has not seen; None when its run date is unknown (a bundle named by path)
    new_days: int | None = None

    def train_days(self, incremental_days: int) -> int:
        """The days an incremental run trains on: `train.incremental_days`, or more when the model it
        continues has not seen them (a champion the gate kept for several days, a skipped day)."""
        return max(incremental_days, self.new_days or 0)


def decide_mode(
    requested: str,
    run_date: str,
    full_every_days: int,
    parent: dict | None,
    *,
    explicit: bool = False,
) -> ModeDecision:
    """The training mode of a run for `run_date`.

    requested: train.mode. parent: the model to continue ({"version", "last_full_date", "date": the
    run date it was trained for, "role": "champion" (default) or "line's head", for the messages}), None when there is none (no champion yet); a champion trained for
    this date or a later one (a re-run, a backfill) is not continued. explicit: the parent was named (`--from-model`), so the schedule
    of full retrains does not apply. A full run is its own last full retrain."""
    if requested == FULL:
        return ModeDecision(FULL, "train.mode=full: the cascade from scratch", None, run_date)
    if parent is None:
        return ModeDecision(
            FULL,
            "train.mode=incremental but there is no champion to start from: falling back to a full "
            "retrain (the cascade from scratch)",
            None,
            run_date,
        )
    last_full = parent.get("last_full_date")
    role = parent.get("role", "champion")  # "champion", or "line's head" (train.start_from=line)
    # the last day its line learned from (bundle lineage: a model continued from one trained for a
    # later date has seen what that one saw), when known
    through = parent.get("trained_through")
    if not explicit and parent.get("date") and parent["date"] >= run_date:
        return ModeDecision(
            FULL,
            f"train.mode=incremental, but the {role} (v{parent['version']}) was trained for "
            f"{parent['date']}, not before {run_date} (a re-run or a backfill): a full retrain",
            None,
            run_date,
        )
    if not explicit and through and through >= run_date:
        return ModeDecision(
            FULL,
            f"train.mode=incremental, but the {role} (v{parent['version']}) has learned from days up to "
            f"{through} through the model it continued, not only before {run_date}: a full retrain",
            None,
            run_date,
        )
    if not explicit and last_full == UNKNOWN_FULL:
        return ModeDecision(
            FULL,
            f"train.mode=incremental, but the {role} (v{parent['version']}) continued a model named by its "
            "path, so the last full retrain of its line is unknown: a full retrain",
            None,
            run_date,
        )
    if not explicit and last_full:
        age = (dt.date.fromisoformat(run_date) - dt.date.fromisoformat(last_full)).days
        if age >= full_every_days:
            return ModeDecision(
                FULL,
                f"train.mode=incremental, but the {role} (v{parent['version']}) descends from the full "
                f"retrain of {last_full}, {age} days before {run_date} (train.full_every_days="
                f"{full_every_days}): a full retrain is due",
                None,
                run_date,
            )
    new_days = None
    if parent.get("date") and parent["date"] < run_date:
        new_days = (dt.date.fromisoformat(run_date) - dt.date.fromisoformat(parent["date"])).days
    since = (
        f"; it was trained for {parent['date']}, so the {new_days} day(s) from then to the day before "
        f"{run_date} are new to it"
        if new_days and new_days > 1
        else ""
    )
    if parent.get("date") and parent["date"] > run_date:  # only when named (explicit): see above
        # a model trained for P trained on the days before P: it saw run_date (this run's evaluation
        # day) only when P is later
        since += (
            f"; NOTE: it was trained for {parent['date']}, on days up to the day before, so it has seen "
            f"{run_date}: this run's evaluation figures are not out of sample"
        )
    elif through and through >= run_date:
        since += (
            f"; NOTE: its line has learned from days up to {through}, so it has seen {run_date}: this "
            "run's evaluation figures are not out of sample"
        )
    return ModeDecision(
        INCREMENTAL,
        f"train.mode=incremental: continuing model v{parent['version']} (last full retrain {last_full}){since}",
        str(parent["version"]),
        last_full,
        new_days,
    )
