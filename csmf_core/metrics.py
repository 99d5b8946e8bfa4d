"""Offline retrieval metrics: exact top-K over the whole catalog, Recall@K, nDCG@K, baselines.

Definitions (docs/architecture.md section 4):

* Recall@K = |top-K ∩ relevant| / |relevant|, averaged over users with >= 1 relevant item. A user
  with more relevant items than K cannot reach 1.0; that is the definition, not a bug.
* nDCG@K = DCG@K / IDCG@K with binary gains, DCG = sum_{r=1..K} rel_r / log2(r + 1), and IDCG the
  DCG of min(|relevant|, K) relevant items at the top.
* Candidates: every item index >= 1 (row 0 is the padding/unknown item); nothing else excluded.

Users with no relevant item are skipped and not counted. Item indices are model-ready indices
(rows of items.parquet), not raw item ids. Pure torch/numpy: no prefect or mlflow here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

# Score-matrix chunks are capped at this many elements (float32: 256 MiB) whatever `chunk` says,
# so a large catalog does not turn a 4096-user chunk into several GiB.
_MAX_CHUNK_ELEMENTS = 1 << 26


def _sorted_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (R, k) of the k best columns per row, ties broken by lower column index.

    torch.topk picks among tied values arbitrarily, so rows whose k-th value is tied with
    values outside the top-k are recomputed exactly (only those rows: ties are rare except
    for degenerate vectors such as an all-zero cold-start user).
    """
    # One extra column tells whether the k-th value is tied with a value outside the top-k.
    extra = int(k < scores.shape[1])
    vals, idx = torch.topk(scores, k + extra, dim=1, largest=True, sorted=True)
    tied = torch.nonzero(vals[:, k] == vals[:, k - 1]).flatten() if extra else vals.new_empty(0).long()
    idx = idx[:, :k].contiguous()
    if tied.numel() > 0:
        # In tied rows the items strictly above the k-th value (the first n_gt of the topk) are
        # right whatever the tie order; the remaining k - n_gt slots take the lowest-index items
        # equal to it, found with a topk over -column_index (no full sort, no cumsum).
        t = vals[tied, k - 1 : k]
        n_gt = (vals[tied, :k] > t).sum(dim=1, keepdim=True)
        neg_col = -torch.arange(scores.shape[1], dtype=torch.int32, device=scores.device)
        key = torch.where(scores[tied] == t, neg_col, torch.iinfo(torch.int32).min)
        lowest = torch.topk(key, k, dim=1).indices  # ascending column index among the ties
        col = torch.arange(k, device=scores.device).unsqueeze(0)
        from_ties = torch.gather(lowest, 1, (col - n_gt).clamp(min=0))
        idx[tied] = torch.where(col >= n_gt, from_ties, idx[tied])
    # Order inside the top-k: score descending, then index ascending (stable sort on sorted idx).
    idx, _ = torch.sort(idx, dim=1)
    vals = torch.gather(scores, 1, idx)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    return torch.gather(idx, 1, order)


@torch.no_grad()
def topk_items(
    user_vecs: torch.Tensor,
    item_vecs: torch.Tensor,
    k: int,
    *,
    exclude_first: bool = True,
    chunk: int = 4096,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """Exact top-K item indices by inner product over the whole catalog.

    user_vecs: (U, D); item_vecs: (N, D) with row 0 the padding/unknown item. Returns int64
    (U, K') with K' = min(k, N - 1) when exclude_first (item 0 is never returned: its score is
    -inf) else min(k, N). Rows are sorted by score descending; ties are broken by lower item
    index first, deterministically. Users are processed in chunks of at most `chunk` rows (and at
    most 2**26 score elements) so memory stays bounded.

    rows: the user rows that need a ranking (e.g. the users with a positive of the objective the
    ranking is scored on, `Relevant.rows_with_positives`); every other row of the result is -1,
    which `recall_ndcg` counts as a miss, and users without a positive are not counted anyway. The
    rows asked for are ranked exactly as without `rows`: the users are scored in chunks of at
    least `MIN_SUBSET_ROWS` rows (padded with other rows when fewer are asked for), because BLAS
    computes a matrix product of only a few rows by another kernel, whose sums can differ in the
    last bit (measured with torch's CPU sgemm: rows of products with 1-7 rows differ from the same
    rows of a 4096-row product; with 16 rows or more they are bit-identical). That holds while a
    chunk can hold 16 rows (catalogs of up to ~4M items under the 2**26-element cap) and was
    measured on the CPU only (on CUDA, cuBLAS may pick its kernel by the number of rows too).
    """
    if rows is not None:
        return _topk_rows(user_vecs, item_vecs, k, exclude_first, chunk, np.asarray(rows))
    if k <= 0:
        raise ValueError(f"k must be >= 1, got {k}")
    user_vecs = torch.as_tensor(user_vecs)
    item_vecs = torch.as_tensor(item_vecs)
    if user_vecs.ndim != 2 or item_vecs.ndim != 2:
        raise ValueError(
            f"user_vecs and item_vecs must be 2-D, got shapes {tuple(user_vecs.shape)} "
            f"and {tuple(item_vecs.shape)}"
        )
    if user_vecs.shape[1] != item_vecs.shape[1]:
        raise ValueError(
            f"dimension mismatch: users have D={user_vecs.shape[1]}, items D={item_vecs.shape[1]}"
        )
    # A NaN score would silently scramble the ranking (topk treats NaN as the largest value).
    for name, t in (("user_vecs", user_vecs), ("item_vecs", item_vecs)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN/inf values")
    n_items = item_vecs.shape[0]
    n_cand = n_items - 1 if exclude_first else n_items
    if n_cand < 1:
        raise ValueError(f"no candidate items: catalog has {n_items} rows (exclude_first={exclude_first})")
    kk = min(k, n_cand)
    item_vecs = item_vecs.float()
    n_users = user_vecs.shape[0]
    per = max(1, min(chunk, _MAX_CHUNK_ELEMENTS // n_items))
    # Balanced chunks (sizes differ by at most one row): a short last chunk would go through BLAS's
    # few-row kernel, whose sums can differ in the last bit from the same rows of a longer product.
    n_chunks = -(-n_users // per)
    bounds = [n_users * c // n_chunks for c in range(n_chunks + 1)] if n_chunks else [0]
    out = np.empty((n_users, kk), dtype=np.int64)
    items_t = item_vecs.T.contiguous()
    # One reused score buffer: a fresh (rows, N) allocation per chunk costs more than the matmul.
    longest = -(-n_users // n_chunks) if n_chunks else 0
    buf = torch.empty((longest, n_items), dtype=torch.float32, device=item_vecs.device)
    for start, end in zip(bounds[:-1], bounds[1:]):
        u = user_vecs[start:end].to(item_vecs.device, torch.float32)
        scores = torch.mm(u, items_t, out=buf[: u.shape[0]])
        if exclude_first:
            scores[:, 0] = -math.inf
        out[start : start + u.shape[0]] = _sorted_topk(scores, kk).cpu().numpy()
    return out


MIN_SUBSET_ROWS = 64  # see topk_items(rows=)


class TopKCache:
    """Top-k rankings of one set of users, kept by key (`evaluate.Ranked`, the comparison protocol's
    `ResultRanked`). A ranking computed at k serves every k' <= k (prefix). A ranking of only some
    rows (`rows=`, see `topk_items`) is kept apart from the full one and serves the same rows only;
    a full ranking serves any request."""

    def __init__(self):
        self._full: dict[tuple, tuple[int, np.ndarray]] = {}
        self._part: dict[tuple, tuple[int, np.ndarray, np.ndarray]] = {}

    def get(self, key: tuple, k: int, vectors, rows: np.ndarray | None = None) -> np.ndarray:
        """(U, k) ranking under `key`; vectors() -> (user vectors, item vectors), called only on a miss."""
        if key in self._full and self._full[key][0] >= k:
            return self._full[key][1][:, :k]
        if rows is None:
            u, v = vectors()
            self._full[key] = (k, topk_items(u, v, k))
            return self._full[key][1]
        rows = np.array(rows, np.int64)  # a copy: the caller's array may change after this call
        hit = self._part.get(key)
        if hit is None or hit[0] < k or not np.array_equal(hit[1], rows):
            u, v = vectors()
            hit = self._part[key] = (k, rows, topk_items(u, v, k, rows=rows))
        return hit[2][:, :k]


def _topk_rows(
    user_vecs: torch.Tensor,
    item_vecs: torch.Tensor,
    k: int,
    exclude_first: bool,
    chunk: int,
    rows: np.ndarray,
) -> np.ndarray:
    """topk_items(..., rows=rows): only `rows` ranked (with padding rows up to MIN_SUBSET_ROWS), -1 elsewhere."""
    user_vecs = torch.as_tensor(user_vecs)
    n_users = user_vecs.shape[0]
    if rows.size and not np.issubdtype(rows.dtype, np.integer):  # (a boolean mask is not an integer)
        raise ValueError(f"rows must be row indices (integers), got dtype {rows.dtype}")
    if rows.size and (rows.min() < 0 or rows.max() >= n_users):
        raise ValueError(f"rows must index the {n_users} users, got values in [{rows.min()}, {rows.max()}]")
    if user_vecs.ndim == 2 and not bool(torch.isfinite(user_vecs).all()):  # every user, as without rows
        raise ValueError("user_vecs contains NaN/inf values")
    asked, want = padded_rows(rows, n_users)
    top = topk_items(user_vecs[torch.as_tensor(want)], item_vecs, k, exclude_first=exclude_first, chunk=chunk)
    return spread_rows(top, asked, want, n_users)


def padded_rows(rows: np.ndarray, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """(asked, want): the distinct rows asked for, sorted, and the rows to compute: `asked` padded with
    the first rows not asked for up to MIN_SUBSET_ROWS (all rows when there are fewer), sorted. A
    matrix product over the `want` rows gives the asked rows bit for bit as a product over every row
    (topk_items' docstring: BLAS switches kernels for a few rows only). `spread_rows` puts the result
    back in place."""
    asked = np.unique(np.asarray(rows)).astype(np.int64)
    want = asked
    if want.size < min(MIN_SUBSET_ROWS, n_users):  # pad with the first rows not asked for
        others = np.setdiff1d(np.arange(min(n_users, 2 * MIN_SUBSET_ROWS), dtype=np.int64), want)
        want = np.union1d(want, others[: min(MIN_SUBSET_ROWS, n_users) - want.size])
    return asked, want


def spread_rows(top: np.ndarray, asked: np.ndarray, want: np.ndarray, n_users: int) -> np.ndarray:
    """(n_users, K) rankings from `top`, the rankings of the `want` rows (`padded_rows`): the asked rows
    in place, -1 in every other row (a miss for `recall_ndcg`, as `topk_items(rows=)` gives)."""
    out = np.full((n_users, top.shape[1]), -1, dtype=np.int64)
    out[asked] = top[np.searchsorted(want, asked)]
    return out


_ITEM_BITS = 32  # a (user row, item) pair is one int64 key: row << 32 | item


@dataclass(frozen=True, eq=False)
class Relevant:
    """Relevant items of U users, prepared once for any number of rankings (`recall_ndcg` accepts
    it where it accepts the sequence; a scorer of many rankings of the same users, such as the
    fused-weight grid, prepares it once: `Relevant.of(pos)` or `EvalRows.relevant(t)`).

    keys: sorted distinct (user row << 32 | item) of every relevant pair; n_rel: (U,) distinct
    relevant items per user. Item indices must lie in [0, 2**32)."""

    keys: np.ndarray
    n_rel: np.ndarray

    def __len__(self) -> int:
        return int(self.n_rel.size)

    def rows_with_positives(self) -> np.ndarray:
        """(R,) int64 user rows with >= 1 relevant item: the only rows `recall_ndcg` counts."""
        return np.flatnonzero(self.n_rel > 0)

    @classmethod
    def of(cls, relevant: Sequence[np.ndarray] | Relevant) -> Relevant:
        if isinstance(relevant, Relevant):
            return relevant
        n_users = len(relevant)
        arrays = [
            r
            if isinstance(r, np.ndarray) and r.ndim == 1 and r.dtype == np.int64
            else np.asarray(r, np.int64).ravel()
            for r in relevant
        ]
        lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=n_users)
        items = np.concatenate(arrays) if n_users else np.empty(0, np.int64)
        if items.size and items.min() < 0:
            raise ValueError(f"relevant item indices must be >= 0, found {int(items.min())}")
        if items.size and items.max() >= 1 << _ITEM_BITS:
            raise ValueError(f"relevant item indices must be < 2**{_ITEM_BITS}, found {int(items.max())}")
        users = np.repeat(np.arange(n_users, dtype=np.int64), lengths)
        keys = np.unique((users << _ITEM_BITS) | items)  # also removes duplicates
        return cls(keys, np.bincount(keys >> _ITEM_BITS, minlength=n_users).astype(np.int64))

    def hits(self, topk: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """(R, K) bool: topk[rows[j], r] is relevant to user rows[j] and its first occurrence in that
        row (rows: user rows to score, default all)."""
        rows = np.arange(len(self), dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
        topk = topk[rows]
        valid = (topk >= 0) & (topk < 1 << _ITEM_BITS)  # ANN padding (-1) never hits
        keys = (rows[:, None] << _ITEM_BITS) | np.where(valid, topk, 0)
        if self.keys.size == 0:
            return np.zeros(topk.shape, dtype=bool)
        at = np.minimum(np.searchsorted(self.keys, keys), self.keys.size - 1)
        hit = valid & (self.keys[at] == keys)
        # A repeated item in one ranking must not count twice: among the hits (a repeat of a hit is
        # a hit, a repeat of a miss a miss), keep first occurrences only.
        flat = np.flatnonzero(hit)
        _, first = np.unique(keys.ravel()[flat], return_index=True)
        if first.size < flat.size:
            hit.ravel()[np.setdiff1d(flat, flat[first], assume_unique=True)] = False
        return hit


def recall_ndcg(
    topk: np.ndarray, relevant: Sequence[np.ndarray] | Relevant, ks: Sequence[int], *, per_user: bool = False
) -> dict[int, dict]:
    """Recall@k and nDCG@k for each k in ks, averaged over users with >= 1 relevant item.

    topk: (U, K) ranked item indices, best first; negative entries (ANN padding -1) never hit,
    and a repeated item in a row counts only at its first position. relevant: U arrays of
    relevant item indices (duplicates are removed), or the same `Relevant.of(...)`, prepared once.
    If k > K the ranking is shorter than k: the missing positions are misses, while IDCG still uses
    min(|relevant|, k).
    Returns {k: {"recall": float, "ndcg": float, "users": n}} with n the number of users counted
    (0 users -> recall and ndcg are NaN). per_user=True adds "recall_per_user" and "ndcg_per_user":
    (n,) arrays over the counted users in row order (for paired comparisons, `paired_bootstrap`).
    """
    topk = np.asarray(topk)
    if topk.ndim != 2:
        raise ValueError(f"topk must be 2-D (U, K), got shape {topk.shape}")
    n_users, width = topk.shape
    if len(relevant) != n_users:
        raise ValueError(f"relevant has {len(relevant)} entries but topk has {n_users} rows")
    if any(int(k) <= 0 for k in ks):
        raise ValueError(f"every k must be >= 1, got {list(ks)}")
    rel = Relevant.of(relevant)
    users = np.flatnonzero(rel.n_rel > 0)
    n_eval = int(users.size)
    hit, n_rel = rel.hits(topk.astype(np.int64, copy=False), users).astype(np.float64), rel.n_rel[users]
    results: dict[int, dict[str, float]] = {}
    for k in ks:
        k = int(k)
        kw = min(k, width)
        disc = 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))  # rank r -> 1/log2(r+1)
        ideal = np.cumsum(disc)  # ideal[m-1] = IDCG with m relevant items at the top
        if n_eval == 0:
            results[k] = {"recall": float("nan"), "ndcg": float("nan"), "users": 0}
            if per_user:
                results[k] |= {"recall_per_user": np.zeros(0), "ndcg_per_user": np.zeros(0)}
            continue
        hk = hit[:, :kw]
        recall = hk.sum(axis=1) / n_rel
        ndcg = (hk @ disc[:kw]) / ideal[np.minimum(n_rel, k) - 1]
        results[k] = {"recall": float(recall.mean()), "ndcg": float(ndcg.mean()), "users": n_eval}
        if per_user:
            results[k] |= {"recall_per_user": recall, "ndcg_per_user": ndcg}
    return results


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> dict[str, float]:
    """Mean of a - b over paired per-user values and its percentile bootstrap interval.

    a, b: (n,) the same users' metric under two rankings (recall_ndcg(..., per_user=True)).
    Users are resampled with replacement n_boot times (seeded). Returns {"diff", "lo", "hi", "n"}.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"paired values must be two (n,) arrays of the same users, got {a.shape} and {b.shape}"
        )
    if a.size == 0:
        return {"diff": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    d = a - b
    rng = np.random.default_rng(seed)
    boots = np.empty(n_boot)
    step = max(1, 2_000_000 // d.size)  # resamples per chunk: bounded memory for many users
    for s in range(0, n_boot, step):
        m = min(step, n_boot - s)
        boots[s : s + m] = d[rng.integers(0, d.size, size=(m, d.size))].mean(axis=1)
    tail = (1 - level) / 2
    return {
        "diff": float(d.mean()),
        "lo": float(np.quantile(boots, tail)),
        "hi": float(np.quantile(boots, 1 - tail)),
        "n": int(d.size),
    }


def popularity_topk(counts: np.ndarray, n_users: int, k: int) -> np.ndarray:
    """Most-popular baseline: the same ranking for every user, (n_users, min(k, N - 1)) int64.

    counts: (N,) positives per item index. Items by count descending, ties by index ascending;
    index 0 (padding) is excluded.
    """
    counts = np.asarray(counts).ravel()
    if counts.size < 2:
        raise ValueError(f"counts must cover item 0 plus >= 1 item, got {counts.size} entries")
    if k <= 0:
        raise ValueError(f"k must be >= 1, got {k}")
    idx = np.arange(1, counts.size, dtype=np.int64)
    order = idx[np.lexsort((idx, -counts[1:].astype(np.float64)))][: min(k, idx.size)]
    return np.tile(order, (n_users, 1))


def random_topk(n_items: int, n_users: int, k: int, seed: int) -> np.ndarray:
    """Random baseline: (n_users, min(k, n_items - 1)) int64 distinct item indices in [1, n_items).

    Each row is a uniformly random ordered sample without replacement; deterministic given seed.
    """
    n_cand = n_items - 1
    if n_cand < 1 or k <= 0:
        raise ValueError(f"need n_items >= 2 and k >= 1, got n_items={n_items}, k={k}")
    kk = min(k, n_cand)
    rng = np.random.default_rng(seed)
    if kk * 4 > n_cand:
        # Dense case: rank random keys; chunked so (rows, n_cand) stays small.
        out = np.empty((n_users, kk), dtype=np.int64)
        rows = max(1, _MAX_CHUNK_ELEMENTS // 8 // n_cand)
        for s in range(0, n_users, rows):
            keys = rng.random((min(rows, n_users - s), n_cand))
            out[s : s + keys.shape[0]] = np.argsort(keys, axis=1)[:, :kk] + 1
        return out
    # Sparse case (k << N): draw iid and redraw the rows that contain a duplicate. Conditioning
    # on "no duplicate" keeps the sample uniform; with kk <= N/4 few rows need a redraw.
    out = rng.integers(1, n_items, size=(n_users, kk), dtype=np.int64)
    bad = np.arange(n_users)
    while bad.size:
        s = np.sort(out[bad], axis=1)
        bad = bad[(s[:, 1:] == s[:, :-1]).any(axis=1)]
        out[bad] = rng.integers(1, n_items, size=(bad.size, kk), dtype=np.int64)
    return out


def evaluate_objective(
    user_vecs: torch.Tensor,
    item_vecs: torch.Tensor,
    relevant: Sequence[np.ndarray],
    ks: Sequence[int],
    *,
    exclude_first: bool = True,
    chunk: int = 4096,
) -> dict[int, dict[str, float]]:
    """Exact top-max(ks) retrieval over the whole catalog, then recall_ndcg (same return value)."""
    topk = topk_items(user_vecs, item_vecs, max(ks), exclude_first=exclude_first, chunk=chunk)
    return recall_ndcg(topk, relevant, ks)


def md_cell(value: object) -> str:
    """One markdown table cell: `|` escaped (`\\|`) and line breaks made spaces, so text such as
    "max |fused - sum k_t s_t|" stays in its cell instead of splitting the row."""
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def format_metrics_table(rows: list[dict], *, digits: int = 4) -> str:
    """Markdown table of dict rows; columns in order of first appearance, floats to `digits`."""
    cols: list[str] = []
    for row in rows:
        cols.extend(c for c in row if c not in cols)

    def cell(v: object) -> str:
        if isinstance(v, float | np.floating):
            return f"{float(v):.{digits}f}"
        return "" if v is None else md_cell(v)

    lines = ["| " + " | ".join(md_cell(c) for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
