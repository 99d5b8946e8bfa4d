"""Model selection on validation days held out from the training window (`data.val_days`).

Why: with few positives (KuaiRand's conversion = click & like: ~2,600 training rows) a stage's
fixed epoch count either over- or under-fits, and the evaluation days must not be used to choose
it. With `data.val_days = V > 0` the last V days of the training window are held out:

* the train rows of those days are removed from training (`split_validation` returns the rest);
* they become validation users exactly like evaluation users: a user's behaviour sequences are
  those of their earliest row in the validation days (built point in time by prep, so as of
  that moment), and their positives for objective t are the items with level >= t on those days;
* every *train* step of the cascade scores its objective under its own mode on those users
  (Recall@eval.primary_k over the whole catalog, csmf_core.metrics) before its first epoch and
  after each epoch, and ends with the parameters of the best (`EpochSelector`). "Before the first
  epoch" is a candidate: for a late stage that is the starting point the cascade handed over.

The item counts the selection pass trains with (log-Q correction) and its popularity reference are
those of the rows it trains on, before the validation days (`CascadeData.log_q_counts`, `val_counts`):
what an evaluation sees of its own days. Until 2026-12-05 the log-Q counts covered the whole window,
validation days included, so the pass trained on item frequencies of the days it was judged on. An
incremental run's `train.incremental_logq: history` counts cover every partition before its
evaluation day; its selection pass subtracts the validation days' positives from them (since
2026-12-05 evening; before, they were included).

Only entries the stage owns change during a step, so restoring the best snapshot leaves every
earlier stage's entries bit-identical (the no-forgetting guarantee is unaffected).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from csmf_core.data import TrainData
from csmf_core.evaluate import EvalRows, item_matrix, user_matrix
from csmf_core.fusion import mode_queries
from csmf_core.metrics import padded_rows, recall_ndcg, spread_rows, topk_items
from csmf_core.model import TwoTower
from csmf_core.rows import FeatureTables

DAY_US = 86_400_000_000


def split_validation(
    tr: TrainData, objectives: list[str], val_days: int
) -> tuple[torch.Tensor, EvalRows, tuple[int, int]]:
    """(indices of the train rows before the validation days, validation users, (first, last) day).

    Day numbers are UTC days since the epoch (ts // 86,400,000,000 us). The validation days are the
    last `val_days` calendar days up to the latest train row's day.
    """
    if val_days < 1:
        raise ValueError(f"val_days must be >= 1, got {val_days}")
    hist_names = objectives[1:]
    day = torch.div(tr.ts, DAY_US, rounding_mode="floor")
    last = int(day.max()) if len(day) else 0
    first = last - val_days + 1
    is_val = day >= first
    keep = torch.nonzero(~is_val).flatten()
    if keep.numel() < 2:
        raise ValueError(
            f"data.val_days={val_days} leaves {keep.numel()} training rows: the training window is too "
            "short to hold out validation days (lower data.val_days or widen data.train_days)"
        )
    vi = torch.nonzero(is_val).flatten().numpy()
    u = tr.u.numpy()[vi]
    order = np.lexsort((tr.ts.numpy()[vi], u))  # by user, then time
    vi, u = vi[order], u[order]
    users, first_row = np.unique(u, return_index=True)
    earliest = torch.from_numpy(vi[first_row])
    hists = [tr.hist[o][earliest] for o in hist_names]
    items, level = tr.i.numpy()[vi], tr.level.numpy()[vi]
    pos: list[list[np.ndarray]] = []
    for t in range(len(objectives)):
        m = level >= t
        pairs = np.unique(np.stack([u[m], items[m]], 1), axis=0) if m.any() else np.zeros((0, 2), np.int64)
        cuts = np.searchsorted(pairs[:, 0], users)
        ends = np.searchsorted(pairs[:, 0], users, side="right")
        pos.append([pairs[a:b, 1].astype(np.int64) for a, b in zip(cuts, ends)])
    val = EvalRows(torch.from_numpy(users.astype(np.int64)), hists, pos)
    return keep, val, (first, last)


@torch.no_grad()
def own_mode_recall(
    model: TwoTower,
    output_owners: torch.Tensor,
    tables: FeatureTables,
    val: EvalRows,
    stage: int,
    k: int,
) -> float:
    """Recall@k of objective `stage` under mode `stage` on the validation users (NaN if none has a positive).
    Only the users with a positive of the objective are encoded and ranked (padded as `topk_items(rows=)`
    pads them, so each is scored bit for bit as among every user): the others do not count. At a late
    stage that is a few percent of the users (KuaiRand's conversion: 515 of 16,241)."""
    rel = val.relevant(stage)
    asked, want = padded_rows(rel.rows_with_positives(), len(val.u))
    items = item_matrix(model, tables)
    idx = torch.as_tensor(want)
    users = user_matrix(model, tables, val.u[idx], [h[idx] for h in val.hists])
    top = topk_items(mode_queries(users, output_owners, stage), items, k)
    return float(recall_ndcg(spread_rows(top, asked, want, len(val.u)), rel, (k,))[k]["recall"])


@dataclass
class BestEpoch:
    """Epoch selection's bookkeeping, shared by `EpochSelector` (CSMF's train steps) and the comparison
    protocol's `Selector` (every method's parts, csmf_core/baselines/protocol.py): the considered
    epochs and their scores, and the best of them. Only a finite score can be best, and a later epoch
    must beat it strictly (ties keep the earlier epoch: fewer steps on sparse data). Early stopping:
    `stop` once `patience` (> 0) considered epochs in a row have not beaten a best (never before one)."""

    patience: int = 0
    epochs: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    best_epoch: int | None = None
    best_score: float = float("-inf")
    since: int = 0  # considered epochs since the best

    def offer(self, epoch: int, score: float) -> bool:
        """Record `score` after `epoch`; True when it is the new best."""
        self.epochs.append(int(epoch))
        self.scores.append(score)
        if math.isfinite(score) and score > self.best_score:
            self.best_epoch, self.best_score, self.since = int(epoch), score, 0
            return True
        self.since += 1
        return False

    @property
    def stop(self) -> bool:
        return self.patience > 0 and self.best_epoch is not None and self.since >= self.patience


class EpochSelector:
    """`on_epoch` callback of `train_stage`: scores the model after each epoch, keeps the best.

    Call `consider(0)` before training (the starting point is a candidate), pass `consider` as
    `train_stage(..., on_epoch=...)`, then `restore()` loads the best parameters back. The best epoch
    and patience as `BestEpoch` says (ties keep the earlier epoch; `consider` returns True to stop);
    without any finite score the first epoch considered is what `restore` loads.
    """

    def __init__(
        self,
        model: TwoTower,
        output_owners: torch.Tensor,
        tables: FeatureTables,
        val: EvalRows,
        stage: int,
        k: int,
        patience: int = 0,
    ):
        self.model, self.k = model, k
        self.track = BestEpoch(int(patience))
        self._score = functools.partial(own_mode_recall, model, output_owners, tables, val, stage, k)
        self._best_state: dict[str, torch.Tensor] | None = None

    @property
    def scores(self) -> list[float]:
        return self.track.scores

    @property
    def best_epoch(self) -> int:
        """The kept epoch (the first considered while no score is finite; -1 before any)."""
        if self.track.best_epoch is not None:
            return self.track.best_epoch
        return self.track.epochs[0] if self.track.epochs else -1

    @property
    def best_score(self) -> float:
        return self.track.best_score if self.track.best_epoch is not None else float("nan")

    def consider(self, epoch: int) -> bool:
        """Score the model after `epoch`, keep it if best; True when training should stop (patience)."""
        if self.track.offer(epoch, self._score()) or self._best_state is None:
            self._best_state = {n: p.detach().clone() for n, p in self.model.state_dict().items()}
        return self.track.stop

    def restore(self) -> None:
        if self._best_state is None:
            raise RuntimeError("EpochSelector.restore() before any consider()")
        self.model.load_state_dict(self._best_state)

    def summary(self) -> dict[str, float]:
        return {
            "val_best_epoch": float(self.best_epoch),
            f"val_best_recall@{self.k}": self.best_score,
            f"val_start_recall@{self.k}": self.scores[0] if self.scores else float("nan"),
            f"val_last_recall@{self.k}": self.scores[-1] if self.scores else float("nan"),
        }
