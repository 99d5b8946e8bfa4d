"""The CSMF cascade as a plan of steps, runnable in memory (library) or one step per task (flows).

For objectives o_0..o_{N-1}, the plan is

    pretrain_<o_0> -> cpp_prune_<o_0> -> recover_<o_0> -> finetune_<o_1> -> cpp_prune_<o_1>
    -> recover_<o_1> -> ... -> finetune_<o_{N-1}>

(`recover_*` steps are left out when accuracy recovery is disabled). `run_step` executes one
step on a model in memory; `run_cascade` runs the whole plan and reports after every step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from csmf_core.config import CSMFConfig
from csmf_core.cpp import prune_stage
from csmf_core.evaluate import EvalRows
from csmf_core.item_stats import day_number, model_ready_item_stats
from csmf_core.losses import item_log_q
from csmf_core.masks import UnitOwners, param_owners
from csmf_core.model import TowerSpec, TwoTower
from csmf_core.prep import DAY_US, HISTORY_COUNTS
from csmf_core.rows import BatchSource, FeatureTables, TrainRows
from csmf_core.selection import positives_per_item, resolve_val_days
from csmf_core.train import MIN_STAGE_ROWS, stage_positives, train_stage
from csmf_core.validation import EpochSelector, split_validation


@dataclass(frozen=True)
class Step:
    name: str  # e.g. "finetune_click"
    kind: str  # "train" | "prune" | "recover"
    stage: int
    # a train step that continues a model (incremental): with fewer than 2 positive rows of its
    # objective (a sparse objective's quiet day) it keeps the stage as the model had it instead of
    # failing; a cascade from scratch has no stage to keep, so there it stays an error
    keep_if_few: bool = False


@dataclass
class CascadeData:
    """Everything training and evaluation need, in memory.

    objectives: names in cascade order. counts[t]: (N_items,) positives of objective t per item
    in the training window (the popularity baseline, and the log-Q correction unless `logq_counts`
    says otherwise: `log_q_counts(t)`). rows: the train rows
    in memory, or a BatchSource streaming them (`load_cascade_data(..., loader="parquet")`).
    """

    objectives: list[str]
    user_spec: TowerSpec
    item_spec: TowerSpec
    tables: FeatureTables
    rows: TrainRows | BatchSource
    eval: EvalRows
    counts: list[np.ndarray]
    val: EvalRows | None = None  # validation users (data.val_days > 0): csmf_core/validation.py
    eval_day: int | None = None  # UTC day number of the first evaluation date
    val_day: int | None = None  # UTC day number of the first validation day (data.val_days > 0)
    val_days: int = 0  # validation days held out (data.val_days resolved: csmf_core/selection.py)
    val_why: str = ""  # how data.val_days was resolved, for the run's log
    # val_counts[t]: positives of objective t per item in the rows trained on (before the validation
    # days): the popularity reference of the validation score (csmf_core/selection.py)
    val_counts: list[np.ndarray] | None = None
    # the log-Q correction's counts when they are not `counts` (validation days held out: those of the
    # rows trained on, so the selection pass never trains on its validation days' item frequencies,
    # while `counts` stays the whole window's popularity); read them through `log_q_counts(t)`
    logq_counts: list[np.ndarray] | None = None
    rehearsal_rows: int = 0  # of `rows`, those drawn from the days before train_from (the last ones)

    def log_q_counts(self, t: int) -> np.ndarray:
        """(N_items,) the counts objective t's log-Q correction is computed from."""
        return (self.logq_counts if self.logq_counts is not None else self.counts)[t]

    def catalog_tables(self, split: str = "eval") -> FeatureTables:
        """The feature tables a catalog encoding of `split` ("eval" or "val") reads: with item
        statistics, those as of that split's first day (csmf_core/item_stats.py)."""
        if self.tables.item_stats is None:
            return self.tables
        day = {"eval": self.eval_day, "val": self.val_day}[split]
        if day is None:
            raise ValueError(f"no {split} day is known for these item statistics")
        return self.tables.as_of(day)


@dataclass
class StepReport:
    step: Step
    info: dict = field(default_factory=dict)  # training summary or pruning table
    losses: list[float] = field(default_factory=list)
    # with validation days, a train step's own-mode validation Recall@K before its first epoch and after
    # each epoch (validation.EpochSelector.scores); kept out of `info`, which is logged as metrics
    val_scores: list[float] = field(default_factory=list)


def plan(objectives: list[str], cfg: CSMFConfig) -> list[Step]:
    steps = []
    for t, name in enumerate(objectives):
        steps.append(Step(("pretrain_" if t == 0 else "finetune_") + name, "train", t))
        if t < len(objectives) - 1:
            steps.append(Step(f"cpp_prune_{name}", "prune", t))
            if cfg.recover.enabled:
                steps.append(Step(f"recover_{name}", "recover", t))
    return steps


def apply_threads(cfg: CSMFConfig) -> None:
    """`train.threads` > 0: torch's intra-op threads in this process, set by everything that trains or
    scores (0 leaves torch's own setting). Process-wide: each training task sets it, so none runs with
    what an earlier task or the process's start left (two runs side by side each on its share)."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)


def build_model(data: CascadeData, cfg: CSMFConfig) -> tuple[TwoTower, UnitOwners]:
    """A fresh model with every unit owned by stage 0, on the device of `data.tables`.

    Initialised on the CPU (its generator is seeded from model.init_seed, so the initial weights are
    the same on every device), then moved to where the feature tables are: callers that put the
    tables on CUDA (train.device, flows/runs.py::loaded_data, the `select` task) train there."""
    model = TwoTower(data.user_spec, data.item_spec, cfg.model, len(data.objectives))
    model.to(data.tables.users_cat.device)
    owners = UnitOwners.initial(model, tuple(data.objectives))
    model.set_owners(param_owners(model, owners))
    return model, owners


def run_step(
    step: Step,
    model: TwoTower,
    owners: UnitOwners,
    data: CascadeData,
    cfg: CSMFConfig,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[UnitOwners, StepReport]:
    """Execute one step in place on `model`; returns the (possibly new) unit owners and a report."""
    if step.kind == "prune":
        c = cfg.cpp
        new, stats = prune_stage(
            model,
            owners,
            step.stage,
            rule=c.rule,
            tau=c.tau,
            ratio=c.ratio,
            min_keep=c.min_keep,
            min_free=c.min_free,
            min_free_output=c.min_free_output,
            freed_init=c.freed_init,
            seed=cfg.train.seed + step.stage,
        )
        return new, StepReport(step, {"layers": [s.as_dict() for s in stats], "units": new.counts()})
    if step.keep_if_few and step.kind == "train":
        n = stage_positives(data.rows, step.stage)
        if n < MIN_STAGE_ROWS:  # kept as it is: what a selection pass's epoch 0 would keep
            return owners, StepReport(step, {"rows": n, "epochs": 0, "steps": 0, "kept": 1})
    log_q = item_log_q(torch.as_tensor(data.log_q_counts(step.stage)))
    selector = None
    if step.kind == "train" and data.val is not None and any(len(p) for p in data.val.pos[step.stage]):
        selector = EpochSelector(
            model,
            owners.output_owners(),
            data.catalog_tables("val"),
            data.val,
            step.stage,
            cfg.eval.primary_k,
            patience=cfg.train.patience,
        )
        selector.consider(0)  # the starting point is a candidate
    res = train_stage(
        model,
        data.tables,
        data.rows,
        step.stage,
        cfg,
        phase="recover" if step.kind == "recover" else "train",
        log_q=log_q,
        output_owners=owners.output_owners(),
        on_step=on_step,
        stage_name=step.name,
        on_epoch=None if selector is None else selector.consider,
    )
    info = res.summary()
    if selector is not None:
        selector.restore()
        info.update(selector.summary())
    return owners, StepReport(step, info, res.losses, list(selector.scores) if selector is not None else [])


def run_cascade(
    data: CascadeData,
    cfg: CSMFConfig,
    *,
    after_step: Callable[[StepReport, TwoTower, UnitOwners], None] | None = None,
) -> tuple[TwoTower, UnitOwners, list[StepReport]]:
    """Run the whole plan in memory, calling `after_step(report, model, owners)` after each step."""
    apply_threads(cfg)
    model, owners = build_model(data, cfg)
    reports = []
    for step in plan(data.objectives, cfg):
        owners, rep = run_step(step, model, owners, data, cfg)
        reports.append(rep)
        if after_step is not None:
            after_step(rep, model, owners)
    return model, owners, reports


def rehearsal_rows(day: torch.Tensor, train_from: str, n_new: int, ratio: float, seed: int) -> torch.Tensor:
    """Indices (sorted) of the rehearsal rows of an incremental step: round(ratio x n_new) rows drawn
    uniformly without replacement (torch.randperm under `seed`) among the rows whose day (`day`: (R,)
    day numbers) is before `train_from`, or all of them when there are fewer; empty when ratio is 0."""
    if ratio <= 0:
        return torch.zeros(0, dtype=torch.long)
    old = torch.nonzero(day < day_number(train_from)).flatten()
    n = min(len(old), int(round(ratio * n_new)))
    pick = torch.randperm(len(old), generator=torch.Generator().manual_seed(int(seed)))[:n]
    return old[pick].sort().values


def load_cascade_data(
    path,
    *,
    load_train: bool = True,
    loader: str = "memory",
    shuffle_window: int = 1 << 20,
    rank: int = 0,
    world_size: int = 1,
    val_days: int | str = 0,
    item_stats_windows: tuple[int, ...] = (),
    eval_days: int | None = None,
    processes: int = 1,
    train_from: str | None = None,
    logq_history: bool = False,
    rehearsal: float = 0.0,
    rehearsal_seed: int = 0,
) -> CascadeData:
    """Read a model-ready dataset directory (docs/architecture.md section 2) into CascadeData.

    loader "memory" loads the train rows (unless `load_train=False`); "parquet" leaves them on
    disk and streams them through `csmf_core.loader.ParquetTrainSource` (shard `rank` of
    `world_size`, shuffle window `shuffle_window` rows). val_days > 0 (memory loader): the last
    val_days days of the train rows become `val` instead of training rows (csmf_core/validation.py);
    "auto" resolves it from the window (`selection.resolve_val_days`: the number of training dates in
    meta.json, `eval_days` or the number of evaluation dates, the loader and `processes`). A model-ready
    dataset without evaluation dates (`prep.prepare(eval_dates=[])`, what `csmf tune` trains on) has
    an empty `eval`. train_from (YYYY-MM-DD, memory loader): only the train rows of that day and later
    are trained on (an incremental run's last days, csmf_core/incremental.py; with validation days,
    the non-validation rows from that day on: an incremental selection pass); the log-Q counts are
    then those of the rows kept. rehearsal (with train_from): besides those rows, round(rehearsal x
    their number) rows drawn uniformly without replacement (seed `rehearsal_seed`) from the rows before
    `train_from` (never validation rows), or all of them when fewer (`train.incremental_rehearsal`).
    logq_history: the log-Q counts of every objective after the first
    are its positives before the first evaluation day over every partition prep read for the
    behaviour histories (`history_counts.parquet`; `train.incremental_logq: history`), not those of
    the rows trained on; the first objective's stay the rows'. With validation days held out, the
    selection pass's history counts leave out the validation days' positives (those of their train
    rows: the data contract's cascade rule makes every positive an exposure row).
    """
    return _load_cascade(
        path,
        (rehearsal,),
        load_train=load_train,
        loader=loader,
        shuffle_window=shuffle_window,
        rank=rank,
        world_size=world_size,
        val_days=val_days,
        item_stats_windows=item_stats_windows,
        eval_days=eval_days,
        processes=processes,
        train_from=train_from,
        logq_history=logq_history,
        rehearsal_seed=rehearsal_seed,
    )[0]


def load_rehearsal_variants(
    path,
    ratios,
    *,
    train_from: str,
    val_days: int | str = 0,
    item_stats_windows: tuple[int, ...] = (),
    logq_history: bool = False,
    rehearsal_seed: int = 0,
) -> dict[float, CascadeData]:
    """{ratio: `load_cascade_data(path, train_from=..., rehearsal=ratio, ...)`} for every distinct ratio
    of `ratios`, reading the model-ready data once (an incremental selection pass trains every stage
    with each rehearsal candidate, flows/incremental.py). The variants share every table they have in
    common (features, evaluation and validation rows: the same objects) and differ in their train rows
    (the new rows, then each ratio's draw: a prefix of one permutation under `rehearsal_seed`), the
    counts of those and `rehearsal_rows`."""
    ratios = tuple(dict.fromkeys(float(r) for r in ratios))
    loaded = _load_cascade(
        path,
        ratios,
        val_days=val_days,
        item_stats_windows=item_stats_windows,
        train_from=train_from,
        logq_history=logq_history,
        rehearsal_seed=rehearsal_seed,
    )
    return dict(zip(ratios, loaded, strict=True))


def _load_cascade(
    path,
    rehearsals: tuple[float, ...],
    *,
    load_train: bool = True,
    loader: str = "memory",
    shuffle_window: int = 1 << 20,
    rank: int = 0,
    world_size: int = 1,
    val_days: int | str = 0,
    item_stats_windows: tuple[int, ...] = (),
    eval_days: int | None = None,
    processes: int = 1,
    train_from: str | None = None,
    logq_history: bool = False,
    rehearsal_seed: int = 0,
) -> list[CascadeData]:
    """`load_cascade_data` for each ratio of `rehearsals` (one CascadeData each, in order), reading the
    data once."""
    from pathlib import Path

    import pyarrow.parquet as pq

    from csmf_core.data import load_model_ready

    if loader not in ("memory", "parquet"):
        raise ValueError(f"loader must be 'memory' or 'parquet', got {loader!r}")
    mr = load_model_ready(path, load_train=load_train and loader == "memory")
    objs = mr.objectives
    hist_names = tuple(objs[1:])
    user_spec = TowerSpec(
        cat=tuple((c, int(mr.cardinalities[c])) for c in mr.user_cat_names),
        n_num=len(mr.user_num_names),
        hist=hist_names,
        n_items=mr.n_items,
        id_feature="c_uid",
    )
    item_spec = TowerSpec(
        cat=tuple((c, int(mr.cardinalities[c])) for c in mr.item_cat_names),
        n_num=len(mr.item_num_names),
        id_feature="c_iid",
    )
    tables = FeatureTables(mr.users_cat, mr.users_num, mr.items_cat, mr.items_num)
    val, val_counts = None, None
    n_eval_days = len(mr.meta["eval_dates"]) if eval_days is None else eval_days
    val_days, val_why = resolve_val_days(
        val_days, len(mr.meta["train_dates"]), n_eval_days, loader=loader, processes=processes
    )
    if not load_train:
        val_days = 0
    if val_days > 0 and load_train and loader != "memory":
        raise ValueError("data.val_days needs train.loader=memory (validation rows are split in memory)")
    eval_day = day_number(mr.meta["eval_dates"][0]) if mr.meta["eval_dates"] else None
    val_day = None
    if item_stats_windows:
        st = model_ready_item_stats(path, item_stats_windows)
        tables = FeatureTables(
            mr.users_cat, mr.users_num, mr.items_cat, mr.items_num, torch.from_numpy(st.values), st.first_day
        )
        item_spec = dataclasses.replace(item_spec, n_num=item_spec.n_num + len(st.columns))
    variants = None  # [(train rows, rehearsal rows among them)] per ratio, when train_from draws them
    if mr.train is not None:
        tr = mr.train
        rows = TrainRows(
            tr.u, tr.i, tr.level, [tr.hist[o] for o in hist_names], tr.neg if tr.neg.shape[1] else None,
            day=torch.div(tr.ts, DAY_US, rounding_mode="floor") if item_stats_windows else None,
        )  # fmt: skip
        if item_stats_windows and eval_day is not None and len(tr.ts) and int(rows.day.max()) >= eval_day:
            raise ValueError(
                f"{path}: train rows on or after the first evaluation day {mr.meta['eval_dates'][0]}: "
                "point-in-time item statistics need every train row before it"
            )
        at = None  # indices into the train table of `rows`, once rows are selected (None: all)
        if val_days > 0:
            keep, val, (val_day, _) = split_validation(tr, objs, val_days)
            window_pos = positives_per_item(rows, mr.n_items, len(objs)) if logq_history else None
            rows, at = rows.select(keep), keep
            val_counts = positives_per_item(rows, mr.n_items, len(objs))
        if train_from is not None:
            day = torch.div(tr.ts if at is None else tr.ts[at], DAY_US, rounding_mode="floor")
            new = torch.nonzero(day >= day_number(train_from)).flatten()
            if len(new) < 2:
                raise ValueError(f"{path}: fewer than 2 train rows on or after {train_from}")
            variants = []
            for r in rehearsals:
                drawn = rehearsal_rows(day, train_from, len(new), r, rehearsal_seed)
                variants.append((rows.select(torch.cat([new, drawn])), len(drawn)))
    else:
        empty = torch.zeros(0, dtype=torch.long)
        rows = TrainRows(
            empty, empty, empty.to(torch.int8), [torch.zeros(0, 1, dtype=torch.long) for _ in hist_names]
        )
    if load_train and loader == "parquet":
        from csmf_core.loader import ParquetTrainSource

        rows = ParquetTrainSource(
            path,
            window_rows=shuffle_window,
            rank=rank,
            world_size=world_size,
            with_days=bool(item_stats_windows),
        )
    if variants is None:
        variants = [(rows, 0)] * len(rehearsals)
    ev = EvalRows(mr.eval.u, [mr.eval.hist[o] for o in hist_names], [mr.eval.pos[o] for o in objs])
    pop = pq.read_table(Path(path) / "popularity.parquet")
    idx = pop["i"].to_numpy().astype(np.int64)
    window_counts = []
    for o in objs:
        c = np.zeros(mr.n_items, dtype=np.int64)
        c[idx] = pop[f"count_{o}"].to_numpy()
        window_counts.append(c)
    hist_counts = {}  # logq_history: objective t >= 1 -> its history counts
    if logq_history:
        f = Path(path) / HISTORY_COUNTS
        if not f.is_file():
            raise ValueError(
                f"{path}: no {HISTORY_COUNTS} (prepared by an older csmf): train.incremental_logq=history "
                "needs the model-ready data prepared again"
            )
        hist = pq.read_table(f)
        hidx = hist["i"].to_numpy().astype(np.int64)
        for t, o in enumerate(objs[1:], start=1):
            c = np.zeros(mr.n_items, dtype=np.int64)
            c[hidx] = hist[f"count_{o}"].to_numpy()
            hist_counts[t] = c
    out = []
    for rows, n_drawn in variants:
        counts = list(window_counts)
        # validation days held out: log-Q from the rows trained on, as a refit's (the window's) and an
        # evaluation's, none of the validation days' labels; `counts` stays the window's popularity
        logq_counts = None if val_counts is None else list(val_counts)
        if train_from is not None and isinstance(rows, TrainRows):
            trained = positives_per_item(rows, mr.n_items, len(objs))
            if val_counts is None:
                counts = trained
            else:  # an incremental selection pass: val_counts stays the popularity of the non-validation rows
                logq_counts = list(trained)
        for t, c in hist_counts.items():
            counts[t] = c
            if logq_counts is not None:  # less the validation days' positives (their train rows)
                logq_counts[t] = np.maximum(c - (window_pos[t] - val_counts[t]), 0)
        data = CascadeData(
            objs, user_spec, item_spec, tables, rows, ev, counts, val, eval_day, val_day, val_days, val_why,
            val_counts, logq_counts, n_drawn,
        )  # fmt: skip
        out.append(data)
    return out
