"""Typed, validated configuration for the CSMF library.

One frozen dataclass per concern, one root (`CSMFConfig`). Configs come from YAML files
plus dotted overrides (`train.lr=3e-4`); unknown keys and bad values are all reported
together in one `ConfigError`. Modules take plain arguments; only builders read config.

Every key has a rule (`_check_ranges`: enums, positive ints, probabilities, finite floats, list
lengths), checked when the config is built, so that `csmf run` refuses a bad value before Prefect
starts instead of after hours of training: NaN and inf are refused for every float key, whatever its
range. Rules that need the dataset (one fused weight per objective) are in `check_objectives`,
which the pipeline calls right after validation, before prep and training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """Raised with every problem found in a configuration, one per line."""


@dataclass(frozen=True)
class ModelConfig:
    dim: int = 64  # output vector size (user and item), split into per-stage segments by CPP
    hidden: tuple[int, ...] = (256, 128)  # hidden layer widths of each tower
    emb_dim: int = 8  # columns per categorical feature embedding
    id_emb_dim: int = 32  # columns of the user-id / item-id embeddings
    hist_emb_dim: int = 32  # columns of each behaviour-sequence item embedding (mean pooled)
    init_seed: int = 0
    # hash user and item ids into this many id-embedding rows (unbounded vocabularies; collisions are
    # counted and logged by prep); None = one row per id (csmf_core/idmap.py)
    id_buckets: int | None = None
    # a warm start (train.mode incremental) recycles the row of an id unseen for this many days for a
    # new id (csmf_core/idmap.py); None = never evict
    evict_after_days: int | None = None


@dataclass(frozen=True)
class CPPConfig:
    rule: str = "cpp"  # "cpp" (cumulative share of information mass) or "fixed" (PackNet ratio)
    tau: float = 0.75  # CPP: prune units whose running information sum <= tau * total
    ratio: float = 0.5  # fixed rule: fraction of the stage's units freed per layer
    min_keep: int = 1  # per layer, units the pruned stage always keeps
    min_free: int = 1  # per layer, units always handed to the next stage
    min_free_output: int = 4  # the same for the output layer (the next stage's vector segment)
    # what freed units start from: "keep" | "zero" | "random" | "continue" (the next mode starts
    # exactly at this mode's scores: the user-side rows of the freed output dimensions are zeroed)
    freed_init: str = "keep"


@dataclass(frozen=True)
class LossConfig:
    temperature: float = 1.0  # logits = score / temperature (a per-mode scalar, fusion unaffected)
    logq: bool = True  # subtract log of in-batch sampling probability (Yi et al. 2019)
    request_negatives: str = "first"  # same-request unexposed negatives: "first" stage | "all" | "none"
    aml: bool = True  # cross-stage adaptive margin for stages >= 1
    sigma: float = 0.0  # AML minimum margin
    eta: float = 1.8  # AML correction factor when upstream disagrees
    upstream: str = "log_prob"  # AML upstream: "log_prob" (sum of log sigmoid of modes < t) | "last_logit"
    # "log_prob" computed as the log of the product of the sigmoids (losses.upstream_scores): the same
    # margins up to float32 rounding at about half the cost (~0.2 ms a conversion step at batch 512).
    # Selection-pass validation score, 3 seeds, off -> on: `small` 1.3485 / 1.4770 / 1.3991 -> 1.3485 /
    # 1.4744 / 1.3697, KuaiRand 1.2478 / 1.3124 / 1.2763 -> 1.2519 / 1.2953 / 1.2770: within the spread a
    # rounding-level change gives (docs/performance.md); false = bit for bit the runs before 2026-12-06
    fast_upstream: bool = True


@dataclass(frozen=True)
class TrainConfig:
    # Measured (docs/method-notes.md, small world): batch 512 with epochs (4, 8, 16) lifted
    # Recall@50 by 0.04-0.14 per objective over batch 1024 with (2, 4, 8), at 1.6x the time.
    batch_size: int = 512
    lr: float = 2e-3
    epochs: tuple[int, ...] = (4, 8, 16)  # per stage; the last value repeats for more stages
    # With validation days: a step (a comparison method's part) stops after this many considered epochs
    # in a row without a better validation score, keeping its best (0 = off: every step trains to its
    # cap). 5: on KuaiRand and the generated `small` world (3 seeds, CSMF and MOPPR) every step keeps the
    # epoch it keeps without it (bit-identical models), at 37% / 12% fewer selection epochs; 4 changed
    # one choice on `small` (docs/performance.md, "Early stopping")
    patience: int = 5
    weight_decay: float = 0.0  # decoupled, applied to the trained stage's entries only
    grad_clip: float = 0.0  # 0 = off
    max_loss: float = 1e4  # a loss above this (or non-finite) stops the stage
    seed: int = 0
    threads: int = 0  # torch threads; 0 = leave as is
    device: str = "cpu"  # "cpu" | "cuda" | "auto"
    # torch deterministic kernels while training: the same data, config and seed give the same model
    # (without them, multi-threaded CPU reductions made two identical runs differ; no measured cost)
    deterministic: bool = True
    # Where batches come from: "memory" loads the train table (fastest for data that fits),
    # "parquet" streams it from the model-ready Parquet in bounded memory (csmf_core/loader.py).
    loader: str = "memory"
    shuffle_window: int = 1048576  # parquet loader: rows shuffled together (exact permutation below it)
    processes: int = 1  # > 1: each training step runs under torchrun with this many ranks (DDP)
    dist_backend: str = "auto"  # "auto" (nccl on CUDA, else gloo) | "gloo" | "nccl"
    # How embedding tables are updated (docs/performance.md): "dense" = fused Adam over every row of every
    # table at every step (cost grows with the catalog); "lazy_adam" / "rowwise_adagrad" = sparse row
    # gradients, only the rows a batch touches are updated (csmf_core/rowwise.py); dense layers keep fused
    # Adam. "auto" (the default) = dense while the embedding tables hold at most
    # optim.AUTO_SPARSE_MIN_ENTRIES entries in all (the generated worlds, KuaiRand: unchanged), lazy_adam
    # above (single-process): on the small world (2 seeds) lazy_adam's Recall@50 is ~0.02 lower on exposure
    # and click, rowwise_adagrad's ~0.08 lower, and neither is faster at such sizes; dense Adam's step
    # grows with every table entry (2.1x at 100k users / 50k items, 49-72x at 10M / 1M; docs/performance.md)
    embedding_optimizer: str = "auto"
    # A stage t >= 1 (or a recovery) differentiates the in-batch score matmul over the output dims it owns
    # only, adding the earlier stages' part (frozen, AML computes it anyway) as a constant summed with the
    # log-Q and margin bias first (margins in the exact-branch form); where its sub-network is a small part
    # of the towers (the recoveries) only that sub-network runs under autograd (TwoTower.train_subnet).
    # The same loss and updates up to float rounding, less work (csmf_core.train.stage_columns); false =
    # one matmul over every dim through the masked network, bit for bit the runs before 2026-12-04
    split_scores: bool = True
    # "full": train the cascade from scratch on the window; "incremental": start from the model
    # `start_from` names (or `csmf run --from-model REF`): its checkpoint, masks and id maps, and train
    # each stage's owned entries on the last `incremental_days` days only (flows/incremental.py)
    mode: str = "full"
    incremental_days: int = 1
    # incremental: a full retrain instead when the model continued descends from a full retrain this many
    # days old
    full_every_days: int = 7
    # incremental: the model continued. "line" (default): the newest registered model trained for an
    # earlier date that passed the gate's verification, promoted or not (the training line continues
    # its own last model, so a run trains one new day whatever the gate decided; the gate only decides
    # what serves). "champion": the serving champion (a challenger the gate kept out is dropped and
    # the champion is caught up on every day since its run). Measured in docs/method-notes.md
    start_from: str = "line"
    # incremental: the log-Q item counts. "rows": positives of the rows trained on (the new day(s));
    # "history": for every objective after the first, its positives over every partition before the
    # evaluation day that prep reads for the behaviour histories (default: the rarer objectives' item
    # frequencies from one day are too noisy to correct in-batch sampling; docs/method-notes.md)
    incremental_logq: str = "history"
    # incremental: the model the selection pass continues (it trains on the days before the validation
    # day(s) to choose each step's epochs). "unseen": the newest model of the line (the start, its
    # parent, ...) that has not trained on those days, so the pass measures epochs on new data as the
    # refit will use them; the start itself when the line has none (its first runs after a full
    # retrain). "start": the run's starting model, which has usually trained on them already
    incremental_select_from: str = "unseen"
    # incremental: rehearsal. Each incremental step also trains on `incremental_rehearsal` x as many rows
    # as the new day(s) give it, drawn uniformly (train.seed) from the window's earlier days: the run's
    # ingest reads `rehearsal_days` more partitions (as many as the data has); the selection pass draws
    # from those, never from its validation day(s), the refit from those and the pass's own day(s).
    # 0 = off: the new day(s) only. A list: one ratio per stage (the last repeats, as train.epochs).
    # "auto": each stage's ratio is chosen by the selection pass on the validation day(s) among
    # `rehearsal_candidates` (every candidate trains the step from the same point; the best validation
    # Recall@K of the stage's own objective wins, the smaller ratio on a tie), and the refit trains each
    # stage with its choice. Measured in docs/method-notes.md
    incremental_rehearsal: tuple[float, ...] | str = "auto"
    rehearsal_days: int = 6
    rehearsal_candidates: tuple[float, ...] = (0.0, 2.0)


@dataclass(frozen=True)
class RecoverConfig:
    enabled: bool = True
    # Measured (docs/method-notes.md): after CPP at tau 0.75, 20% / 1 epoch / half lr restored
    # exposure Recall@50 from 0.13 to 0.42 of 0.60; 50% / 2 epochs / full lr restored 0.59.
    fraction: float = 0.5  # share of the stage's training rows used for accuracy recovery
    epochs: int = 2
    lr_scale: float = 1.0  # recovery lr = train.lr * lr_scale


@dataclass(frozen=True)
class EvalConfig:
    ks: tuple[int, ...] = (10, 20, 50, 100)
    primary_k: int = 50
    # <k_0..k_{N-1}> (the paper's <k_d, k_o, k_r> = 1, 1.8, 1.2), or "auto": chosen after training on the
    # validation users from a grid (csmf_core/selection.py; the paper's weights without validation days)
    fused_weights: tuple[float, ...] | str = (1.0, 1.8, 1.2)
    max_users: int = 0  # 0 = every eval user


@dataclass(frozen=True)
class DataConfig:
    seq_len: int = 20
    n_req_neg: int = 10
    train_days: int = 0  # 0 = every partition before the evaluation day(s)
    eval_days: int = 1
    # last days of the training window held out as validation days (csmf_core/selection.py): "auto" =
    # min(eval_days, window // 4) days, none for a window under 4 days; 0 = off (train.epochs as given)
    val_days: int | str = "auto"
    # with validation days: choose each train step's epochs (and auto fusion weights) on them, then
    # train the model on the whole window with those epochs (flows/epoch_selection.py); false = the
    # model keeps its best epochs and never trains on the validation days
    val_refit: bool = True
    # point-in-time item statistics as item-tower inputs: windows in days (csmf_core/item_stats.py);
    # empty = off. Each window adds one column per objective: log(1 + positives per day before).
    item_stats: tuple[int, ...] = ()


@dataclass(frozen=True)
class GateConfig:
    """Champion/challenger gate (flows/gate.py): when a new version may replace the champion."""

    enabled: bool = True  # false = never promote automatically (every run stays a challenger)
    # Largest allowed drop (absolute) of any gated metric vs the champion re-evaluated on the same day:
    # recall and nDCG at eval.primary_k, per objective, under the objective's own score and the fused one.
    tolerance: float = 0.005
    sample_users: int = 256  # users checked for exact fusion and index == towers
    # Fewest evaluation users with a positive, per objective, that can measure a model: below it the
    # gate promotes nothing (no champion change, no first champion). With 10 users one user moves
    # recall by 0.1, twenty times the default tolerance; with none every metric is NaN.
    min_users: int = 10


@dataclass(frozen=True)
class RetentionConfig:
    keep_days: int = 7  # run dirs (checkpoints, indexes) of the last N run dates kept; 0 = keep all


@dataclass(frozen=True)
class IngestConfig:
    # sharded prep (csmf_core/prep_sharded.py) on prefect-dask's DaskTaskRunner: "off" = one process,
    # "local" = a local Dask cluster of `workers` processes, else a scheduler address (tcp://host:8786)
    dask: str = "off"
    workers: int = 2  # "local": worker processes (1 thread each)
    shards: int = 0  # user shards; 0 = 2 x workers


@dataclass(frozen=True)
class CSMFConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cpp: CPPConfig = field(default_factory=CPPConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    recover: RecoverConfig = field(default_factory=RecoverConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    data: DataConfig = field(default_factory=DataConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, for experiment trackers."""
        out: dict[str, Any] = {}
        for section, values in self.to_dict().items():
            for k, v in values.items():
                out[f"{section}.{k}"] = v
        return out

    def digest(self) -> str:
        """Stable content hash of the configuration (12 hex chars)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=list).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def epochs_for(self, stage: int) -> int:
        e = self.train.epochs
        return int(e[min(stage, len(e) - 1)])

    def rehearsal_for(self, stage: int) -> float:
        """Stage `stage`'s `train.incremental_rehearsal` ratio (the last one repeats). "auto" is resolved
        by an incremental run's selection pass (flows/incremental.py) and has no ratio before it, but
        with data.val_days=0 (no validation day to choose on), where it means no rehearsal: 0."""
        r = self.train.incremental_rehearsal
        if r == "auto":
            if self.data.val_days == 0:
                return 0.0
            raise ValueError(
                "train.incremental_rehearsal=auto has no ratio until a selection pass chooses one"
            )
        return float(r[min(stage, len(r) - 1)])

    def rehearsal_ratios(self) -> tuple[float, ...]:
        """Every rehearsal ratio this config may train with: the candidates under "auto" (none but 0 with
        data.val_days=0), else the list."""
        r = self.train.incremental_rehearsal
        if r == "auto":
            return (0.0,) if self.data.val_days == 0 else tuple(self.train.rehearsal_candidates)
        return tuple(r)


_CHOICES = {
    ("cpp", "rule"): {"cpp", "fixed"},
    ("cpp", "freed_init"): {"keep", "zero", "random", "continue"},
    ("loss", "request_negatives"): {"first", "all", "none"},
    ("loss", "upstream"): {"log_prob", "last_logit"},
    ("train", "device"): {"cpu", "cuda", "auto"},
    ("train", "loader"): {"memory", "parquet"},
    ("train", "dist_backend"): {"auto", "gloo", "nccl"},
    ("train", "embedding_optimizer"): {"auto", "dense", "lazy_adam", "rowwise_adagrad"},
    ("train", "mode"): {"full", "incremental"},
    ("train", "start_from"): {"champion", "line"},
    ("train", "incremental_logq"): {"rows", "history"},
    ("train", "incremental_select_from"): {"unseen", "start"},
}


MAY_BE_EMPTY = {"data.item_stats"}  # list settings where [] means "off"
# settings where null (YAML) or none / null (--set) means "off"
MAY_BE_NONE = {"model.id_buckets", "model.evict_after_days"}
# settings that also take the string "auto": resolved from the data (csmf_core/selection.py)
AUTO_KEYS = {"data.val_days", "eval.fused_weights", "train.incremental_rehearsal"}
MAX_SEED = 2**32 - 1  # numpy's SeedSequence needs seeds >= 0; torch seeds are derived as seed * 1009 + ...


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str, errors: list[str]) -> Any:
    if where in MAY_BE_NONE and (
        value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
    ):
        return None
    if where in AUTO_KEYS and str in typing.get_args(tp):
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        concrete = next(a for a in typing.get_args(tp) if a is not str)
        mine: list[str] = []
        out = _coerce(value, concrete, where, mine)
        if mine:
            errors.append(f"{where}: expected 'auto' or {_type_name(concrete)}, got {value!r}")
        return out
    origin = typing.get_origin(tp)
    if origin is tuple:
        (inner, *_rest) = typing.get_args(tp)
        if value is None and where in MAY_BE_EMPTY:
            value = []
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = [value]
        if isinstance(value, str):
            value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
        if not isinstance(value, list | tuple) or (not value and where not in MAY_BE_EMPTY):
            errors.append(f"{where}: expected a non-empty list, got {value!r}")
            return None
        return tuple(_coerce(v, inner, where, errors) for v in value)
    if origin in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    try:
        if tp is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes", "on"):
                    return True
                if value.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError
            if isinstance(value, bool | int):
                return bool(value)
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if where == "ingest.dask" and value is False:  # YAML reads a bare `off` as false
                return "off"
            return str(value)
    except (TypeError, ValueError):
        errors.append(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
        return None
    return value


def _non_finite(cfg: CSMFConfig) -> dict[str, Any]:
    """Dotted key -> value of every float setting (or list of floats) holding NaN or +-inf."""
    bad = {}
    for key, value in cfg.flat().items():
        values = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            bad[key] = value
    return bad


def _shown(value: Any) -> Any:
    """A setting as a message shows it: a list for a tuple (as YAML wrote it)."""
    return list(value) if isinstance(value, tuple) else value


def _check_ranges(cfg: CSMFConfig, errors: list[str]) -> None:
    """One rule per key (enums, then finiteness, then ranges); messages start with the dotted key."""
    for (section, key), allowed in _CHOICES.items():
        v = getattr(getattr(cfg, section), key)
        if v not in allowed:
            errors.append(f"{section}.{key}: {v!r} is not one of {sorted(allowed)}")
    # NaN fails every comparison and inf passes "> 0": finiteness first, for every float key.
    non_finite = _non_finite(cfg)
    errors.extend(f"{k} must be finite (no NaN or inf), got {v!r}" for k, v in non_finite.items())
    m, t, fw = cfg.model, cfg.train, cfg.eval.fused_weights
    fw = (1.0,) if fw == "auto" else fw
    val_days = 0 if cfg.data.val_days == "auto" else cfg.data.val_days  # auto: resolved per window
    checks = [
        (0.0 < cfg.cpp.tau < 1.0, f"cpp.tau must be in (0, 1), got {cfg.cpp.tau}"),
        (0.0 < cfg.cpp.ratio < 1.0, f"cpp.ratio must be in (0, 1), got {cfg.cpp.ratio}"),
        (cfg.cpp.min_keep >= 1, f"cpp.min_keep must be >= 1, got {cfg.cpp.min_keep}"),
        (cfg.cpp.min_free >= 1, f"cpp.min_free must be >= 1, got {cfg.cpp.min_free}"),
        (cfg.cpp.min_free_output >= 1, f"cpp.min_free_output must be >= 1, got {cfg.cpp.min_free_output}"),
        (cfg.model.dim >= 2, f"model.dim must be >= 2, got {cfg.model.dim}"),
        (
            all(h >= 2 for h in cfg.model.hidden),
            f"model.hidden widths must be >= 2, got {list(cfg.model.hidden)}",
        ),
        (m.emb_dim >= 1, f"model.emb_dim must be >= 1 (columns per feature embedding), got {m.emb_dim}"),
        (m.id_emb_dim >= 1, f"model.id_emb_dim must be >= 1, got {m.id_emb_dim}"),
        (m.hist_emb_dim >= 1, f"model.hist_emb_dim must be >= 1, got {m.hist_emb_dim}"),
        (0 <= m.init_seed <= MAX_SEED, f"model.init_seed must be in [0, {MAX_SEED}], got {m.init_seed}"),
        (
            m.id_buckets is None or m.id_buckets >= 1,
            f"model.id_buckets must be >= 1 (rows ids are hashed into) or null (off), got {m.id_buckets}",
        ),
        (
            m.evict_after_days is None or m.evict_after_days >= 1,
            f"model.evict_after_days must be >= 1 or null (off), got {m.evict_after_days}",
        ),
        (t.patience >= 0, f"train.patience must be >= 0 (0 = off), got {t.patience}"),
        (t.incremental_days >= 1, f"train.incremental_days must be >= 1, got {t.incremental_days}"),
        (
            t.incremental_rehearsal == "auto" or all(r >= 0 for r in t.incremental_rehearsal),
            "train.incremental_rehearsal must be >= 0 (0 = off), one per stage, or auto, got "
            f"{_shown(t.incremental_rehearsal)}",
        ),
        (
            all(r >= 0 for r in t.rehearsal_candidates),
            f"train.rehearsal_candidates must be >= 0, got {list(t.rehearsal_candidates)}",
        ),
        (t.rehearsal_days >= 1, f"train.rehearsal_days must be >= 1, got {t.rehearsal_days}"),
        (t.full_every_days >= 1, f"train.full_every_days must be >= 1, got {t.full_every_days}"),
        (cfg.loss.temperature > 0, f"loss.temperature must be > 0, got {cfg.loss.temperature}"),
        (cfg.loss.eta > 0, f"loss.eta must be > 0, got {cfg.loss.eta}"),
        (cfg.loss.sigma >= 0, f"loss.sigma must be >= 0 (the minimum AML margin), got {cfg.loss.sigma}"),
        (
            cfg.train.batch_size >= 2,
            f"train.batch_size must be >= 2 (in-batch negatives), got {cfg.train.batch_size}",
        ),
        (cfg.train.lr > 0, f"train.lr must be > 0, got {cfg.train.lr}"),
        (t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}"),
        (t.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 = off), got {t.grad_clip}"),
        (t.max_loss > 0, f"train.max_loss must be > 0, got {t.max_loss}"),
        (0 <= t.seed <= MAX_SEED, f"train.seed must be in [0, {MAX_SEED}], got {t.seed}"),
        (t.threads >= 0, f"train.threads must be >= 0 (0 = leave torch's setting), got {t.threads}"),
        (
            t.dist_backend != "nccl" or t.device != "cpu",
            "train.dist_backend=nccl needs CUDA: set train.device to cuda or auto, or use gloo",
        ),
        (cfg.train.processes >= 1, f"train.processes must be >= 1, got {cfg.train.processes}"),
        (
            t.processes <= 1 or t.embedding_optimizer in ("dense", "auto"),
            f"train.embedding_optimizer={t.embedding_optimizer} (sparse row updates) is single-process: "
            "with train.processes > 1 set train.embedding_optimizer=dense (or auto)",
        ),
        (cfg.train.shuffle_window >= 1, f"train.shuffle_window must be >= 1, got {cfg.train.shuffle_window}"),
        (all(e >= 0 for e in cfg.train.epochs), f"train.epochs must be >= 0, got {list(cfg.train.epochs)}"),
        (
            0.0 < cfg.recover.fraction <= 1.0,
            f"recover.fraction must be in (0, 1], got {cfg.recover.fraction}",
        ),
        (cfg.recover.epochs >= 0, f"recover.epochs must be >= 0, got {cfg.recover.epochs}"),
        (cfg.recover.lr_scale > 0, f"recover.lr_scale must be > 0, got {cfg.recover.lr_scale}"),
        (all(k >= 1 for k in cfg.eval.ks), f"eval.ks must be >= 1, got {list(cfg.eval.ks)}"),
        (len(set(cfg.eval.ks)) == len(cfg.eval.ks), f"eval.ks must be distinct, got {list(cfg.eval.ks)}"),
        (
            cfg.eval.primary_k in cfg.eval.ks,
            f"eval.primary_k must be one of eval.ks {list(cfg.eval.ks)}, got {cfg.eval.primary_k}",
        ),
        (
            all(x >= 0 for x in fw) and sum(fw) > 0,
            f"eval.fused_weights must be >= 0 and not all zero (one weight per objective), got {list(fw)}",
        ),
        (cfg.eval.max_users >= 0, f"eval.max_users must be >= 0 (0 = every user), got {cfg.eval.max_users}"),
        (cfg.data.seq_len >= 1, f"data.seq_len must be >= 1, got {cfg.data.seq_len}"),
        (
            cfg.data.n_req_neg >= 1,
            f"data.n_req_neg must be >= 1, got {cfg.data.n_req_neg} "
            "(to train without request negatives set loss.request_negatives=none)",
        ),
        (cfg.data.eval_days >= 1, f"data.eval_days must be >= 1, got {cfg.data.eval_days}"),
        (cfg.data.train_days >= 0, f"data.train_days must be >= 0 (0 = all), got {cfg.data.train_days}"),
        (val_days >= 0, f"data.val_days must be >= 0 (0 = off) or auto, got {cfg.data.val_days}"),
        (
            all(w >= 1 for w in cfg.data.item_stats)
            and len(set(cfg.data.item_stats)) == len(cfg.data.item_stats),
            "data.item_stats must be distinct windows of >= 1 day (empty = off)",
        ),
        (
            val_days == 0 or cfg.data.train_days == 0 or val_days < cfg.data.train_days,
            "data.val_days must be smaller than data.train_days (some days must remain to train on)",
        ),
        (
            val_days == 0 or (cfg.train.loader == "memory" and cfg.train.processes == 1),
            "data.val_days needs train.loader=memory and train.processes=1 (epoch selection is single-process)",
        ),
        (cfg.gate.tolerance >= 0, "gate.tolerance must be >= 0"),
        (cfg.gate.sample_users >= 1, "gate.sample_users must be >= 1"),
        (
            cfg.gate.min_users >= 1,
            "gate.min_users must be >= 1 (evaluation users with a positive, per objective)",
        ),
        (cfg.retention.keep_days >= 0, "retention.keep_days must be >= 0 (0 = keep all)"),
        (
            cfg.ingest.dask in ("off", "local")
            or bool(re.fullmatch(r"(tcp|tls|inproc|ucx)://\S+", cfg.ingest.dask)),
            f"ingest.dask must be off, local or a Dask scheduler address (tcp://host:8786), got {cfg.ingest.dask!r}",
        ),
        (cfg.ingest.workers >= 1, f"ingest.workers must be >= 1, got {cfg.ingest.workers}"),
        (cfg.ingest.shards >= 0, f"ingest.shards must be >= 0 (0 = 2 x workers), got {cfg.ingest.shards}"),
    ]
    # a NaN/inf key already has its message; its range message would only restate it less clearly
    errors.extend(msg for ok, msg in checks if not ok and msg.split(" ", 1)[0] not in non_finite)


DEFAULT_FUSED_WEIGHTS = EvalConfig().fused_weights  # the paper's <k_d, k_o, k_r>: three objectives


def fit_objectives(cfg: CSMFConfig, objectives: Sequence[str]) -> tuple[CSMFConfig, str | None]:
    """The config for a dataset with these objectives, and a line saying what changed (None: nothing).

    The shipped `eval.fused_weights` is the paper's three-objective weighting; on a dataset with
    another number of objectives it becomes equal weights (one each), so a user's two- or
    four-objective data runs with no config of theirs. Any other list of the wrong length is the
    user's and stays an error (`check_objectives`). Every other per-objective setting already
    fits any count (`train.epochs`: the last cap serves every later stage)."""
    n, w = len(objectives), cfg.eval.fused_weights
    if w == "auto" or len(w) == n or tuple(w) != DEFAULT_FUSED_WEIGHTS:
        return cfg, None
    equal = (1.0,) * n
    new = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, fused_weights=equal))
    return new, (
        f"eval.fused_weights: the default {list(w)} is the paper's for three objectives; this dataset has "
        f"{n} {list(objectives)}: equal weights {list(equal)} (set eval.fused_weights=[...] or auto to choose)"
    )


def check_objectives(cfg: CSMFConfig, objectives: Sequence[str]) -> None:
    """The rules that depend on the dataset: raise `ConfigError` naming the key when `cfg` does not fit
    a dataset with these objectives (cascade order). Called before prep, so no training is wasted."""
    n, w = len(objectives), cfg.eval.fused_weights
    if w != "auto" and len(w) != n:
        raise ConfigError(
            f"invalid configuration:\n  eval.fused_weights has {len(w)} values {list(w)} but the dataset "
            f"has {n} objectives {list(objectives)}; set eval.fused_weights=[...] with one weight each"
        )


def build_config(raw: dict[str, Any] | None = None, overrides: list[str] | None = None) -> CSMFConfig:
    """Build a validated config from a nested dict and `section.key=value` overrides."""
    raw = {} if raw is None else raw
    errors: list[str] = []
    if isinstance(raw, dict) and all(isinstance(v, dict | None) for v in raw.values()):
        raw = {k: dict(v or {}) for k, v in raw.items()}
    else:
        raise ConfigError(f"config must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            errors.append(f"override {item!r}: expected section.key=value")
            continue
        key, value = item.split("=", 1)
        section, name = key.strip().split(".", 1)
        try:
            raw.setdefault(section, {})[name] = yaml.safe_load(value) if value.strip() else value
        except yaml.YAMLError as exc:
            errors.append(f"override {item!r}: the value is not valid YAML ({yaml_problem(exc)})")
    sections = {f.name: f.type for f in dataclasses.fields(CSMFConfig)}
    hints = typing.get_type_hints(CSMFConfig)
    built: dict[str, Any] = {}
    bad_keys: set[str] = set()  # keys refused by name or type: their range rules are not applied
    for section, values in raw.items():
        if section not in sections:
            errors.append(f"unknown section {section!r} (known: {', '.join(sections)})")
            continue
        cls = hints[section]
        fields = typing.get_type_hints(cls)
        kwargs = {}
        for k, v in values.items():
            if k not in fields:
                errors.append(f"unknown key {section}.{k} (known: {', '.join(fields)})")
                bad_keys.add(f"{section}.{k}")
                continue
            mine: list[str] = []
            value = _coerce(v, fields[k], f"{section}.{k}", mine)
            if mine:
                errors.extend(mine)
                bad_keys.add(f"{section}.{k}")
                continue
            kwargs[k] = value
        built[section] = cls(**kwargs)
    # the range rules run on every key that parsed, so every problem is reported at once; a rule that
    # names a refused key (e.g. eval.primary_k against refused eval.ks) would judge its default: left out
    cfg = CSMFConfig(**built)
    ranges: list[str] = []
    _check_ranges(cfg, ranges)
    errors += [e for e in ranges if not any(re.search(rf"\b{re.escape(k)}\b", e) for k in bad_keys)]
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
    return cfg


def yaml_problem(exc: yaml.YAMLError) -> str:
    """One line for a YAML syntax error: the problem and where (line and column, 1-based)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(exc, 'problem', None) or exc}{where}"


def read_yaml_file(path: str | Path, what: str = "config file") -> Any:
    """The YAML document of a file given on the command line; `ConfigError` naming the file when it is
    missing, a directory, not UTF-8 text or not valid YAML (never a parser traceback)."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what} {p} is a directory, not a YAML file")
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {p} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {p} is not valid YAML: {yaml_problem(exc)}") from None


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, *, tuned: str | Path | None = None
) -> CSMFConfig:
    """Read a YAML config (or none), then a tuned config over it (`csmf tune`'s output: keys that
    differ from the base, section by section), then the dotted overrides."""
    raw: dict[str, Any] = {}
    for layer in (path, tuned):
        if layer is None:
            continue
        p = Path(layer)
        data = read_yaml_file(p) or {}
        if not isinstance(data, dict) or not all(isinstance(v, dict | None) for v in data.values()):
            raise ConfigError(f"{p}: expected a mapping of sections (model:, train:, ...)")
        for section, values in data.items():
            raw.setdefault(section, {}).update(values or {})
    return build_config(raw, overrides)
