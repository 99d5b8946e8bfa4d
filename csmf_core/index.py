"""FAISS item index for serving: inner-product search over item vectors, with an item-id map.

`ItemIndex` wraps one FAISS index ("flat" exact, "hnsw" or "ivf" approximate, all inner product)
and a numpy id map (position -> item id) kept next to it instead of faiss.IndexIDMap, so that
save/load is three plain files. FAISS pads results with label -1 when an approximate index finds
fewer than k items; `search` reports those slots as id -1 / score -inf and never maps -1 through
the id map (numpy would silently return the last item). Item ids are any int64 (-1 included: the
valid slots of a row are its first `counts[q]`, never "id != -1"); ids.npy is int64, never float.

On-disk layout (`save`/`load`):  DIR/index.faiss, DIR/ids.npy, DIR/index.json.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from csmf_core.ids import as_id_array

KINDS = ("flat", "hnsw", "ivf")
_FILES = ("index.faiss", "ids.npy", "index.json")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SearchResult:
    """Top-k per query. ids (Q, k') int64 and scores (Q, k') float32, best first, k' = min(k, ntotal);
    the first counts[q] slots of row q are valid, the rest are id -1 / score -inf."""

    ids: np.ndarray
    scores: np.ndarray
    counts: np.ndarray

    def id_lists(self) -> list[np.ndarray]:
        """Per-query arrays of the valid ids only."""
        return [row[:c] for row, c in zip(self.ids, self.counts.tolist())]


def _as_matrix(x: Any, name: str) -> np.ndarray:
    """2-D float32 C-contiguous copy/view of x, with every value finite."""
    try:
        a = np.asarray(x)
    except Exception as e:  # e.g. a torch tensor that requires grad
        raise ValueError(f"{name} could not be converted to a numpy array: {e}") from e
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows, D), got shape {a.shape}")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"{name} must be numeric, got dtype {a.dtype}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    bad = ~np.isfinite(a).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(
            f"{name} has {rows.size} of {a.shape[0]} rows with NaN/inf values (first at row {rows[0]}); "
            "fix or drop them before indexing/searching"
        )
    return a


def _default_nlist(n: int) -> int:
    return int(min(max(1, round(4 * math.sqrt(n))), n))


class ItemIndex:
    """Inner-product index over item vectors. Build with `ItemIndex.build`, reopen with `load`."""

    def __init__(self, index: faiss.Index, ids: np.ndarray, kind: str, params: dict[str, Any]):
        # Use build()/load(); the constructor trusts its arguments.
        self.index = index
        self.ids = ids
        self.kind = kind
        self.params = params

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        item_ids: np.ndarray,
        vectors: np.ndarray,
        kind: str = "flat",
        *,
        hnsw_m: int = 32,
        ef_search: int = 64,
        ef_construction: int = 80,
        ivf_nlist: int | None = None,
        nprobe: int = 16,
        threads: int | None = None,
    ) -> ItemIndex:
        """Index vectors (N, D) under item_ids (N,) int64 (unique).

        kind: "flat" (IndexFlatIP, exact), "hnsw" (IndexHNSWFlat, inner product) or "ivf"
        (IndexIVFFlat, inner product, trained on `vectors`; nlist defaults to round(4 sqrt N)
        clipped to [1, N]). threads sets FAISS's OpenMP thread count, which is process-global.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown index kind {kind!r}; expected one of {KINDS}")
        vecs = _as_matrix(vectors, "vectors")
        ids = np.asarray(item_ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"item_ids must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
        ids = as_id_array(ids, "item_ids").copy()  # uint64 above 2**63 - 1 is refused, never wrapped
        n, d = vecs.shape
        if ids.shape[0] != n:
            raise ValueError(f"item_ids has {ids.shape[0]} rows but vectors has {n} rows")
        if n == 0 or d == 0:
            raise ValueError(f"cannot build an index from {n} vectors of dimension {d}")
        uniq, cnt = np.unique(ids, return_counts=True)
        if uniq.size != n:
            dup = uniq[cnt > 1]
            raise ValueError(
                f"item_ids must be unique: {dup.size} ids repeat among {n} rows (e.g. {dup[:5].tolist()})"
            )
        for name, v in (("hnsw_m", hnsw_m), ("ef_search", ef_search), ("ef_construction", ef_construction)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if threads is not None:
            faiss.omp_set_num_threads(int(threads))

        params: dict[str, Any] = {}
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = int(ef_construction)
            params = {
                "hnsw_m": int(hnsw_m),
                "ef_construction": int(ef_construction),
                "ef_search": int(ef_search),
            }
        else:
            nlist = _default_nlist(n) if ivf_nlist is None else int(ivf_nlist)
            if not 1 <= nlist <= n:
                raise ValueError(
                    f"ivf_nlist must be in [1, N={n}] (k-means needs a point per list), got {nlist}"
                )
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(vecs)
            params = {"ivf_nlist": nlist, "nprobe": int(nprobe)}
        index.add(vecs)
        out = cls(index, ids, kind, params)
        out._apply_search_params()
        return out

    def set_search_params(self, *, ef_search: int | None = None, nprobe: int | None = None) -> None:
        """Change the recall/speed knob at query time (hnsw: ef_search; ivf: nprobe)."""
        if ef_search is not None:
            if self.kind != "hnsw" or ef_search < 1:
                raise ValueError(f"ef_search applies to hnsw indexes and must be >= 1 (kind={self.kind})")
            self.params["ef_search"] = int(ef_search)
        if nprobe is not None:
            if self.kind != "ivf" or nprobe < 1:
                raise ValueError(f"nprobe applies to ivf indexes and must be >= 1 (kind={self.kind})")
            self.params["nprobe"] = int(nprobe)
        self._apply_search_params()

    def _apply_search_params(self) -> None:
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = self.params["ef_search"]
        elif self.kind == "ivf":
            self.index.nprobe = min(self.params["nprobe"], self.params["ivf_nlist"])

    # ---- properties ---------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def nbytes_vectors(self) -> int:
        """Raw float32 vector storage, N * D * 4 bytes (excludes graph/list overhead)."""
        return self.ntotal * self.dim * 4

    # ---- search -------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        """Top-k items by inner product for queries (Q, D); see SearchResult for the -1 padding."""
        if not isinstance(k, int | np.integer) or k <= 0:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        q = _as_matrix(queries, "queries")
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have D={q.shape[1]} but the index has D={self.dim}")
        kk = min(int(k), self.ntotal)
        scores, pos = self.index.search(q, kk)
        valid = pos >= 0
        if not valid.all():
            # Move valid slots to the front (FAISS already does; cheap insurance), keeping rank order.
            order = np.argsort(~valid, axis=1, kind="stable")
            pos = np.take_along_axis(pos, order, axis=1)
            scores = np.take_along_axis(scores, order, axis=1)
            valid = pos >= 0
        ids = np.where(valid, self.ids[np.where(valid, pos, 0)], -1).astype(np.int64, copy=False)
        scores = np.where(valid, scores, -np.inf).astype(np.float32, copy=False)
        return SearchResult(ids=ids, scores=scores, counts=valid.sum(axis=1).astype(np.int64))

    def search_ids_lists(self, queries: np.ndarray, k: int) -> list[np.ndarray]:
        """Per-query arrays of valid item ids (length <= k), best first."""
        return self.search(queries, k).id_lists()

    # ---- persistence --------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write index.faiss, ids.npy and index.json into `directory`, replacing it if present.

        Files are written into a temp dir next to `directory` and renamed into place, so readers
        never see a partially written index (when replacing, the old dir is moved aside first).
        """
        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            faiss.write_index(self.index, str(tmp / "index.faiss"))
            np.save(tmp / "ids.npy", self.ids, allow_pickle=False)
            meta = {
                "format_version": FORMAT_VERSION,
                "kind": self.kind,
                "metric": "inner_product",
                "params": self.params,
                "dim": self.dim,
                "ntotal": self.ntotal,
                "faiss_version": faiss.__version__,
            }
            (tmp / "index.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            old = None
            if target.exists():
                old = target.parent / f".{target.name}.old-{os.getpid()}-{tmp.name[-8:]}"
                target.rename(old)
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return target

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ItemIndex:
        """Read an index written by `save`, checking that the three files agree."""
        src = Path(directory)
        if not src.is_dir():
            raise FileNotFoundError(f"index directory {src} does not exist")
        missing = [f for f in _FILES if not (src / f).is_file()]
        if missing:
            raise FileNotFoundError(f"index directory {src} is missing {missing}")
        meta = json.loads((src / "index.json").read_text())
        kind = meta.get("kind")
        if kind not in KINDS:
            raise ValueError(f"{src}/index.json: unknown kind {kind!r}")
        ids = np.load(src / "ids.npy", allow_pickle=False)
        if ids.ndim != 1 or ids.dtype != np.int64:
            raise ValueError(f"{src}/ids.npy must be 1-D int64, got shape {ids.shape} dtype {ids.dtype}")
        index = faiss.read_index(str(src / "index.faiss"))
        if index.d != meta.get("dim"):
            raise ValueError(f"{src}: index.faiss has D={index.d} but index.json says dim={meta.get('dim')}")
        if not index.ntotal == meta.get("ntotal") == ids.shape[0]:
            raise ValueError(
                f"{src}: row counts disagree: index.faiss ntotal={index.ntotal}, "
                f"index.json ntotal={meta.get('ntotal')}, ids.npy has {ids.shape[0]} ids"
            )
        out = cls(index, ids, kind, dict(meta.get("params", {})))
        out._apply_search_params()
        return out


def size_bytes_on_disk(directory: str | os.PathLike) -> int:
    """Total size in bytes of the files of a saved index (or any directory tree)."""
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())
