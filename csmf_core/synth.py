"""Synthetic world with a known exposure -> click -> conversion cascade, written as a canonical dataset.

The world (all factors have rank ``r``, default 8)
-------------------------------------------------
* Every user has a shared factor ``s_u ~ N(0, I_r)`` and one own factor per objective; every item has
  ``s_i`` and own factors likewise. The factor of objective t mixes them,
  ``p_u^t = sqrt(rho_t) s_u + sqrt(1 - rho_t) own_u^t`` (same for ``q_i^t``), so objectives are
  correlated (default rho 0.3: 30% of the variance is shared) but not identical. The affinity of objective t
  is ``a_t(u, i) = p_u^t . q_i^t / sqrt(r)`` (unit variance).
* Items have a Zipf popularity prior ``pop_i ~ 1 / rank_i^zipf_exponent`` (ranks randomly permuted),
  users an activity ``~ LogNormal`` that sets how often they come back, a log budget, and items a
  log price.

How a request unfolds (and how the objectives differ)
-----------------------------------------------------
1. A user is drawn proportionally to activity, at a uniform time of the day.
2. Retrieval: ``pool_factor * C`` items are drawn from the popularity prior and the top C distinct ones
   by ``candidate_affinity * a_0 + Gumbel`` are kept, i.e. candidates ~ popularity x exp(exposure
   affinity), sampled without replacement.
3. Exposure: the top E candidates by ``exposure_affinity * a_0 + exposure_popularity * log pop +
   N(0, exposure_noise)`` are shown (``exposed=true``); the other C - E are written too, with
   ``exposed=false`` and the same ``request_id`` (the unexposed negatives of the paper).
4. Click given exposure: ``sigmoid(b_1 + click_affinity * a_1)``. The click factors share only rho of
   their variance with the exposure factors, so exposure ranks only partly predict clicks.
5. Conversion given click: ``sigmoid(b_2 + conversion_affinity * a_2 - price_sensitivity *
   max(0, log price_i - log budget_u))``. Besides its own factors, conversion depends on a price vs
   budget interaction that exposure and click ignore entirely, so a model trained on exposures cannot
   serve conversion by itself: expensive items are shown and clicked as often as cheap ones but
   convert far less for low-budget users.
The intercepts b_1, b_2 are calibrated by bisection on a separate sample of requests so that
P(click | exposed) = ``click_rate`` and P(conversion | click) = ``conversion_rate`` (defaults give
exposure:click:conversion ~ 100:5:0.5). The cascade holds by construction (a click is drawn only for
exposed rows, a conversion only for clicked rows).

How the features relate to the factors (each carries only part of them, with noise)
----------------------------------------------------------------------------------
users: ``age_bucket`` (string) = quantile bucket of the first exposure-factor coordinate + noise,
``region`` (string) = quantile bucket of log budget + noise, ``cluster`` (int) = nearest of 16 random
centroids to the noisy shared factor, ``activity`` (float) = log activity + noise, ``budget`` (float) =
exp(log budget + noise). items: ``category`` (int) = nearest of 24 centroids to the noisy shared
factor, ``brand`` (string) = nearest of ``max(10, n_items // 20)`` centroids to the noisy conversion
factor, ``price`` (float, exact), ``quality`` (float) = a fixed projection of the click factor + noise.
``age_bucket`` and ``quality`` are null for ``null_rate`` of the rows. The rest of the factors are only
visible through ids and behaviour, so a model must learn from both.

Determinism: the world comes from ``SeedSequence(seed, spawn_key=(0,))``, calibration from ``(1,)``,
day d from ``(2, d)`` and its request chunk k from ``(2, d, k)``, so each partition can be regenerated
on its own. Days are generated one at a time, in chunks of ``chunk_requests`` requests, one parquet file
per chunk: the event table is never held in memory. The latent ground truth goes to
``out_dir/_truth/world.npz``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from csmf_core.fsutil import commit_dir, fresh_temp_dir

OBJECTIVES = (("exposure", "exposed"), ("click", "clicked"), ("conversion", "converted"))
FEATURES = {
    "users": {"categorical": ["age_bucket", "region", "cluster"], "numeric": ["activity", "budget"]},
    "items": {"categorical": ["category", "brand"], "numeric": ["price", "quality"]},
}
AGE_BUCKETS = np.array(["18-24", "25-34", "35-44", "45-54", "55+"])
N_REGIONS, N_USER_CLUSTERS, N_CATEGORIES = 8, 16, 24
DAY_US = 86_400_000_000
# Saved to _truth/world.npz besides user_factors (n_users, T, r), item_factors, intercepts and config.
TRUTH_FIELDS = "user_ids item_ids user_shared item_shared popularity activity log_budget log_price".split()

PRESETS: dict[str, dict] = {
    "tiny": dict(n_users=300, n_items=200, n_days=6, requests_per_day=340),
    "small": dict(n_users=3000, n_items=1500, n_days=8, requests_per_day=3750),
    "large": dict(n_users=100_000, n_items=50_000, n_days=14, requests_per_day=71_500),
}


@dataclass(frozen=True)
class SynthConfig:
    """Every knob of the world. Defaults are the ``small`` preset; see the module docstring."""

    name: str = "synth-small"
    seed: int = 0
    n_users: int = 3000
    n_items: int = 1500
    n_days: int = 8
    requests_per_day: int = 3750
    n_candidates: int = 20  # C: rows per request
    n_exposed: int = 10  # E: exposed rows per request
    start_date: str = "2026-01-01"
    rank: int = 8
    # The defaults below were chosen by measurement (docs/method-notes.md, "the synthetic world"):
    # with a steep popularity prior (zipf 1.0, pool 3) a popularity ranking reached Recall@50 0.68
    # on clicks and no personalised model could beat it by a clear margin, which makes the
    # comparison meaningless; with rho 0.5 the conversion mode barely differed from the exposure one.
    rho: tuple[float, float, float] = (0.3, 0.3, 0.3)  # shared share of the factor, per objective
    click_rate: float = 0.05  # P(click | exposed)
    conversion_rate: float = 0.10  # P(conversion | click)
    zipf_exponent: float = 0.6
    pool_factor: int = 5
    candidate_affinity: float = 2.0
    exposure_affinity: float = 2.0
    exposure_popularity: float = 0.5
    exposure_noise: float = 1.0
    click_affinity: float = 2.0
    conversion_affinity: float = 2.0
    price_sensitivity: float = 3.0
    feature_noise: float = 0.5
    null_rate: float = 0.02
    chunk_requests: int = 50_000
    calibration_requests: int = 4000

    def __post_init__(self) -> None:
        if not 0 < self.n_exposed <= self.n_candidates:
            raise ValueError("need 0 < n_exposed <= n_candidates")
        if self.n_candidates > self.n_items:
            raise ValueError("n_candidates cannot exceed n_items")
        if len(self.rho) != len(OBJECTIVES):
            raise ValueError(f"rho needs {len(OBJECTIVES)} values")
        dt.date.fromisoformat(self.start_date)

    @classmethod
    def from_preset(cls, preset: str = "small", seed: int = 0, **overrides) -> SynthConfig:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        kw = {"name": f"synth-{preset}", **PRESETS[preset], "seed": seed, **overrides}
        if "rho" in kw:
            kw["rho"] = tuple(kw["rho"])
        return cls(**kw)

    @property
    def dates(self) -> list[str]:
        start = dt.date.fromisoformat(self.start_date)
        return [(start + dt.timedelta(days=d)).isoformat() for d in range(self.n_days)]


@dataclass
class SynthSummary:
    """What ``generate`` wrote. ``counts`` maps objective name -> number of positive rows."""

    out_dir: Path
    config: SynthConfig
    dates: list[str]
    n_rows: int
    n_requests: int
    counts: dict[str, int]
    intercepts: dict[str, float]
    event_paths: list[Path] = field(default_factory=list)
    users_path: Path | None = None
    items_path: Path | None = None
    truth_path: Path | None = None


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


def _nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid for every row of x (n, r) -> (n,) int64."""
    c2 = (centroids**2).sum(1)[None, :]
    # ||x||^2 is constant per row; chunks bound the (rows, K) temporary (K is ~2500 brands on `large`).
    return np.concatenate(
        [(c2 - 2 * x[lo : lo + 8192] @ centroids.T).argmin(1) for lo in range(0, len(x), 8192)]
    )


def _quantile_bucket(x: np.ndarray, k: int) -> np.ndarray:
    return np.digitize(x, np.quantile(x, np.linspace(0, 1, k + 1)[1:-1]))


class _World:
    """Latent factors and observed features. Factors: ``P`` (n_users, T, r), ``Q`` (n_items, T, r)."""

    def __init__(self, cfg: SynthConfig):
        rng, n_u, n_i, r, T = _rng(cfg.seed, 0), cfg.n_users, cfg.n_items, cfg.rank, len(OBJECTIVES)
        rho = np.asarray(cfg.rho)[None, :, None]
        a, b = np.sqrt(rho), np.sqrt(1 - rho)
        self.user_shared = rng.standard_normal((n_u, r))
        self.item_shared = rng.standard_normal((n_i, r))
        self.P = a * self.user_shared[:, None] + b * rng.standard_normal((n_u, T, r))
        self.Q = a * self.item_shared[:, None] + b * rng.standard_normal((n_i, T, r))
        ranks = rng.permutation(n_i) + 1
        pop = ranks.astype(np.float64) ** -cfg.zipf_exponent
        self.popularity = pop / pop.sum()
        self.log_pop = np.log(self.popularity * n_i)  # 0 = average item
        self.activity = rng.lognormal(0.0, 1.0, n_u)
        self.log_budget = rng.normal(3.3, 0.6, n_u)
        self.log_price = rng.normal(3.0, 0.8, n_i)
        # Ids are sparse and unordered on purpose: nothing downstream may assume id == index.
        self.user_ids = rng.choice(10 * n_u, n_u, replace=False).astype(np.int64) + 1
        self.item_ids = rng.choice(10 * n_i, n_i, replace=False).astype(np.int64) + 1_000_000
        self.users, self.items = self._features(cfg, rng)

    def _features(self, cfg: SynthConfig, rng: np.random.Generator) -> tuple[pa.Table, pa.Table]:
        n_u, n_i, r, s = cfg.n_users, cfg.n_items, cfg.rank, cfg.feature_noise
        noise = lambda *shape: s * rng.standard_normal(shape)  # noqa: E731
        age = AGE_BUCKETS[_quantile_bucket(self.P[:, 0, 0] + noise(n_u), len(AGE_BUCKETS))]
        age_null = rng.random(n_u) < cfg.null_rate
        region = np.char.add("r", _quantile_bucket(self.log_budget + noise(n_u), N_REGIONS).astype(str))
        cluster = _nearest(self.user_shared + noise(n_u, r), rng.standard_normal((N_USER_CLUSTERS, r)))
        users = pa.table(
            {
                "user_id": self.user_ids,
                "age_bucket": pa.array(age.tolist(), mask=age_null),
                "region": region.tolist(),
                "cluster": cluster.astype(np.int32),
                "activity": np.log(self.activity) + noise(n_u),
                "budget": np.exp(self.log_budget + 0.3 * rng.standard_normal(n_u)),
            }
        )
        n_brands = max(10, n_i // 20)
        category = _nearest(self.item_shared + noise(n_i, r), rng.standard_normal((N_CATEGORIES, r)))
        brand = _nearest(self.Q[:, 2] + noise(n_i, r), rng.standard_normal((n_brands, r)))
        w = rng.standard_normal(r)
        quality = self.Q[:, 1] @ (w / np.linalg.norm(w)) + noise(n_i)
        items = pa.table(
            {
                "item_id": self.item_ids,
                "category": category.astype(np.int32),
                "brand": [f"b{b:03d}" for b in brand],
                "price": np.round(np.exp(self.log_price), 2),
                "quality": pa.array(quality, mask=rng.random(n_i) < cfg.null_rate),
            }
        )
        return users, items

    def affinity(self, t: int, u: np.ndarray, i: np.ndarray) -> np.ndarray:
        """a_t(u, i) for index arrays of the same shape (any shape) -> float64 of that shape."""
        return np.einsum("...r,...r->...", self.P[u, t], self.Q[i, t]) / np.sqrt(self.P.shape[-1])


def _simulate(world: _World, cfg: SynthConfig, users: np.ndarray, rng: np.random.Generator) -> dict:
    """Candidates and exposure for one batch of requests (no click/conversion draws).

    users: (n_req,) user indices. Returns flat per-row arrays over the valid candidates, ordered by
    request then by exposure score descending: ``req`` (request position), ``item``, ``exposed``,
    ``z_click`` / ``z_conv`` (logits without intercept).
    """
    n_req, C, P = len(users), cfg.n_candidates, cfg.pool_factor * cfg.n_candidates
    pool = np.sort(rng.choice(cfg.n_items, size=(n_req, P), p=world.popularity), axis=1)
    uu = np.broadcast_to(users[:, None], pool.shape)
    key = cfg.candidate_affinity * world.affinity(0, uu, pool) + rng.gumbel(size=pool.shape)
    key[:, 1:][pool[:, 1:] == pool[:, :-1]] = -np.inf  # popular items repeat in the pool: keep one copy
    top = np.argpartition(-key, C - 1, axis=1)[:, :C]
    cand = np.take_along_axis(pool, top, 1)
    valid = np.isfinite(np.take_along_axis(key, top, 1))  # a short pool leaves < C distinct items
    uc = np.broadcast_to(users[:, None], cand.shape)
    score = (
        cfg.exposure_affinity * world.affinity(0, uc, cand) + cfg.exposure_popularity * world.log_pop[cand]
    )
    score = np.where(valid, score + cfg.exposure_noise * rng.standard_normal(cand.shape), -np.inf)
    order = np.argsort(-score, axis=1, kind="stable")
    cand, valid = np.take_along_axis(cand, order, 1), np.take_along_axis(valid, order, 1)
    exposed = (np.arange(C)[None, :] < cfg.n_exposed) & valid
    req = np.broadcast_to(np.arange(n_req)[:, None], cand.shape)[valid]
    item, exposed, u = cand[valid], exposed[valid], users[req]
    over_budget = np.maximum(0.0, world.log_price[item] - world.log_budget[u])
    return {
        "req": req,
        "item": item,
        "exposed": exposed,
        "z_click": cfg.click_affinity * world.affinity(1, u, item),
        "z_conv": cfg.conversion_affinity * world.affinity(2, u, item) - cfg.price_sensitivity * over_budget,
    }


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free logistic


def _bisect_intercept(z: np.ndarray, target: float, weight: np.ndarray | None = None) -> float:
    """b such that the (weighted) mean of sigmoid(b + z) equals target; monotone in b, so bisection."""
    w = np.ones_like(z) if weight is None else weight
    lo, hi = -30.0, 30.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if np.average(_sigmoid(mid + z), weights=w) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _calibrate(world: _World, cfg: SynthConfig) -> tuple[float, float]:
    rng = _rng(cfg.seed, 1)
    p_user = world.activity / world.activity.sum()
    sim = _simulate(world, cfg, rng.choice(cfg.n_users, cfg.calibration_requests, p=p_user), rng)
    ex = sim["exposed"]
    b_click = _bisect_intercept(sim["z_click"][ex], cfg.click_rate)
    # P(conversion | click) is the conversion probability averaged over rows weighted by P(click).
    b_conv = _bisect_intercept(sim["z_conv"][ex], cfg.conversion_rate, _sigmoid(b_click + sim["z_click"][ex]))
    return b_click, b_conv


TS_TYPE = pa.timestamp("us", tz="UTC")
EVENT_SCHEMA = pa.schema(
    [("request_id", pa.string()), ("user_id", pa.int64()), ("item_id", pa.int64()), ("ts", TS_TYPE)]
    + [(col, pa.bool_()) for _, col in OBJECTIVES]
)


def _write_day(world: _World, cfg: SynthConfig, d: int, b: tuple[float, float], day_dir: Path) -> dict:
    """Generate and write day d chunk by chunk. Returns counts and the written paths."""
    rng = _rng(cfg.seed, 2, d)
    n_req = cfg.requests_per_day
    users = rng.choice(cfg.n_users, n_req, p=world.activity / world.activity.sum())
    day_start = int(dt.datetime.fromisoformat(cfg.dates[d]).replace(tzinfo=dt.UTC).timestamp()) * 10**6
    ts = day_start + np.sort(rng.integers(0, DAY_US, n_req))
    stamp = cfg.dates[d].replace("-", "")
    out = {"rows": 0, "requests": n_req, "exposed": 0, "clicked": 0, "converted": 0, "paths": []}
    day_dir.mkdir(parents=True)
    for k, lo in enumerate(range(0, n_req, cfg.chunk_requests)):
        hi = min(lo + cfg.chunk_requests, n_req)
        crng = _rng(cfg.seed, 2, d, k)
        sim = _simulate(world, cfg, users[lo:hi], crng)
        n = len(sim["item"])
        clicked = sim["exposed"] & (crng.random(n) < _sigmoid(b[0] + sim["z_click"]))
        converted = clicked & (crng.random(n) < _sigmoid(b[1] + sim["z_conv"]))
        req_ids = pa.array([f"{stamp}-{j:07d}" for j in range(lo, hi)])
        rows = sim["req"]
        table = pa.Table.from_arrays(
            [
                req_ids.take(pa.array(rows)),
                world.user_ids[users[lo:hi][rows]],
                world.item_ids[sim["item"]],
                pa.array(ts[lo:hi][rows], TS_TYPE),
                sim["exposed"],
                clicked,
                converted,
            ],
            schema=EVENT_SCHEMA,
        )
        path = day_dir / f"part-{k:05d}.parquet"
        pq.write_table(table, path, row_group_size=1 << 20)
        out["paths"].append(path)
        out["rows"] += n
        out["exposed"] += int(sim["exposed"].sum())
        out["clicked"] += int(clicked.sum())
        out["converted"] += int(converted.sum())
    return out


def _dataset_yaml(cfg: SynthConfig, preset: str | None, overrides: dict) -> dict:
    extra = "".join(f" --{k.replace('_', '-')} {v}" for k, v in sorted(overrides.items()))
    return {
        "name": cfg.name,
        "provenance": f"csmf synth --preset {preset} --seed {cfg.seed}{extra}"
        if preset
        else f"csmf_core.synth.generate(config={dataclasses.asdict(cfg)})",
        "objectives": [{"name": n, "column": c} for n, c in OBJECTIVES],
        "features": FEATURES,
    }


def generate(
    out_dir: str | Path,
    preset: str | None = "small",
    seed: int = 0,
    *,
    overwrite: bool = False,
    config: SynthConfig | None = None,
    **overrides,
) -> SynthSummary:
    """Generate a canonical dataset (docs/architecture.md section 1) into ``out_dir``.

    ``preset`` picks the sizes (``tiny``, ``small``, ``large``), ``seed`` the world, and ``overrides``
    any ``SynthConfig`` field (``n_users``, ``n_items``, ``n_days``, ``requests_per_day``,
    ``n_candidates``, ``n_exposed``, ``start_date``, rates, ...). Alternatively pass a full ``config``
    (then preset, seed and overrides are ignored). Output: ``dataset.yaml``, ``users.parquet``,
    ``items.parquet``, ``events/dt=YYYY-MM-DD/part-NNNNN.parquet`` and ``_truth/world.npz``.
    A non-empty ``out_dir`` is refused unless ``overwrite=True``; the dataset is written to a temp dir
    beside it and renamed into place.
    """
    cfg = config if config is not None else SynthConfig.from_preset(preset or "small", seed, **overrides)
    out_dir = Path(out_dir)
    tmp = fresh_temp_dir(out_dir, overwrite, marker="dataset.yaml")
    try:
        world = _World(cfg)
        b = _calibrate(world, cfg)
        pq.write_table(world.users, tmp / "users.parquet")
        pq.write_table(world.items, tmp / "items.parquet")
        meta = _dataset_yaml(cfg, preset if config is None else None, overrides)
        (tmp / "dataset.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
        totals = {"rows": 0, "requests": 0, "exposed": 0, "clicked": 0, "converted": 0, "paths": []}
        for d, date in enumerate(cfg.dates):
            day = _write_day(world, cfg, d, b, tmp / "events" / f"dt={date}")
            for key in totals:
                totals[key] += day[key]
        (tmp / "_truth").mkdir()
        np.savez(
            tmp / "_truth" / "world.npz",
            user_factors=world.P,
            item_factors=world.Q,
            intercepts=np.array(b),
            config=np.array(json.dumps(dataclasses.asdict(cfg))),
            **{k: getattr(world, k) for k in TRUTH_FIELDS},
        )
        commit_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SynthSummary(
        out_dir=out_dir,
        config=cfg,
        dates=cfg.dates,
        n_rows=totals["rows"],
        n_requests=totals["requests"],
        counts={name: totals[col] for name, col in OBJECTIVES},
        intercepts={"click": b[0], "conversion": b[1]},
        event_paths=[out_dir / p.relative_to(tmp) for p in totals["paths"]],
        users_path=out_dir / "users.parquet",
        items_path=out_dir / "items.parquet",
        truth_path=out_dir / "_truth" / "world.npz",
    )
