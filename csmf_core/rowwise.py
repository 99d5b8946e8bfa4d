"""Row-wise optimisers for embedding tables: only the rows a batch touches are read and updated.

An embedding table built with `sparse=True` (`csmf_core.model.TwoTower.sparse_embeddings`) gets a
sparse COO gradient holding the rows its batch looked up. `RowOptimiser.step` coalesces it into
(rows, values) - unique row ids (n,) and their summed gradients (n, d) - multiplies the values by the
stage's column mask (the columns it owns; frozen columns get an exactly zero gradient) and updates
those rows only, so a step costs O(rows touched x d) whatever the table's length.

Two rules (`train.embedding_optimizer`):

* `lazy_adam`: Adam's moments and update on the touched rows only (TensorFlow's LazyAdam, torch's
  SparseAdam): m_r = b1 m_r + (1 - b1) g_r, v_r = b2 v_r + (1 - b2) g_r^2,
  p_r -= lr / (1 - b1^t) * m_r / (sqrt(v_r) / sqrt(1 - b2^t) + eps), t = the optimiser's step count.
  Rows not touched keep their moments (no decay between their visits). When every row is touched
  every step it is dense Adam. State: two float32 tables of the parameter's shape.
* `rowwise_adagrad`: one accumulator per row (TorchRec / FBGEMM's exact row-wise Adagrad):
  G_r += mean over the trained columns of g_r^2, p_r -= lr * g_r / (sqrt(G_r) + eps). State: one
  float32 per row (1/d of lazy Adam's / 2).

Frozen columns: their gradient is exactly 0, so lazy Adam's moments stay exactly 0 and the update is
lr * 0 / (0 + eps) = 0; row-wise Adagrad's update is lr * 0 / (...) = 0; p + (-0.0) == p bit for bit.
Decoupled weight decay is applied to the touched rows' trained columns only (lazy decay).
Rows are written back with index_copy_ (rows are unique after coalescing: deterministic).

Large tables (>= HUGE_PAGE_MIN_BYTES) and their state sit on transparent huge pages where the kernel
offers them (`huge_pages`): a step's rows are scattered over the whole table, so with 4 KiB pages
nearly every row read or written is a TLB miss too. Measured on the 2-core VM, 1,000,000 x 32 table,
a step's 10,240 behaviour-sequence lookups (~10,190 rows), interleaved, thread CPU time: the lookup
(embedding_bag) 0.67-0.76x and the lazy-Adam row update 0.67-0.82x the time on 4 KiB pages. Values
are unaffected.
"""

from __future__ import annotations

import ctypes
import math
import sys
from collections.abc import Sequence

import torch

KINDS = ("lazy_adam", "rowwise_adagrad")
BETAS = (0.9, 0.999)  # the dense path's Adam betas (csmf_core.optim.adam)
ADAM_EPS = 1e-8
ADAGRAD_EPS = 1e-8
HUGE_PAGE_MIN_BYTES = 32 * 2**20  # smaller tables stay in the caches anyway
_HUGE = 2 * 2**20
_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25  # Linux; MADV_COLLAPSE since 6.1
_libc: ctypes.CDLL | None | bool = None  # None: not looked up yet; False: unavailable


def _madvise() -> ctypes.CDLL | None:
    """libc's madvise where transparent huge pages can be asked for (Linux, THP not 'never'), else None."""
    global _libc
    if _libc is None:
        _libc = False
        try:
            with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
                usable = sys.platform.startswith("linux") and "[never]" not in f.read()
            if usable:
                lib = ctypes.CDLL(None, use_errno=True)
                lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                lib.madvise.restype = ctypes.c_int
                _libc = lib
        except (OSError, AttributeError):
            pass
    return _libc or None


def huge_pages(t: torch.Tensor, collapse: bool = False) -> bool:
    """Ask the kernel to back `t`'s memory (the whole 2 MiB pages inside it) with transparent huge
    pages: memory first touched after this call gets them; `collapse` also moves memory already
    touched onto them now (MADV_COLLAPSE: a one-off copy, 3-5 s per GiB on the 2-core VM; a no-op
    for memory already on huge pages). Only for contiguous CPU tensors of >= HUGE_PAGE_MIN_BYTES;
    anywhere it is not offered (another OS, THP off, an older kernel) it does nothing. Never changes
    a value. Returns whether the kernel accepted the advice."""
    n = t.numel() * t.element_size()
    if t.device.type != "cpu" or not t.is_contiguous() or n < HUGE_PAGE_MIN_BYTES:
        return False
    lib = _madvise()
    if lib is None:
        return False
    start = (t.data_ptr() + _HUGE - 1) // _HUGE * _HUGE
    end = (t.data_ptr() + n) // _HUGE * _HUGE
    if end <= start:
        return False
    ok = lib.madvise(start, end - start, _MADV_HUGEPAGE) == 0
    if ok and collapse:
        lib.madvise(start, end - start, _MADV_COLLAPSE)  # best effort (EINVAL before Linux 6.1)
    return ok


def _zeros(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """Zeros of `shape` on huge pages where `huge_pages` applies (advised before the first touch)."""
    t = torch.empty(tuple(shape), dtype=like.dtype, device=like.device)
    huge_pages(t)
    return t.zero_()


def row_grad(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows (n,) int64 unique and sorted, values (n, d)) of `p`'s sparse gradient (lookups summed)."""
    g = p.grad
    if g is None:
        return torch.empty(0, dtype=torch.long, device=p.device), p.new_empty((0, *p.shape[1:]))
    if not g.is_sparse:
        raise TypeError(
            "a row-wise optimised table got a dense gradient: build its lookups with sparse=True "
            "(TwoTower.sparse_embeddings(True)) or set train.embedding_optimizer=dense"
        )
    g = g.coalesce()
    return g.indices()[0], g.values()


class RowOptimiser:
    """`kind` over 2-d tables `params` (each with an optional column mask broadcastable to a row).

    step(grads): grads[k] = (rows, values) of table k, values already masked and clipped; updates the
    rows in place. lr: learning rate; weight_decay, decoupled_first: decay of the touched rows' trained
    entries, before the update (AdamW's order, `masks` None in `Optimiser`) or after it (masked runs).
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor | None],
        lr: float,
        kind: str,
        *,
        weight_decay: float = 0.0,
        decay_first: bool = False,
    ):
        if kind not in KINDS:
            raise ValueError(f"row-wise optimiser must be one of {KINDS}, got {kind!r}")
        self.params, self.masks = list(params), list(masks)
        self.lr, self.kind, self.wd, self.decay_first = lr, kind, weight_decay, decay_first
        self.t = 0
        self.state: list[dict[str, torch.Tensor]] = [{} for _ in self.params]
        for p in self.params:
            huge_pages(p.data, collapse=True)

    def _state(self, k: int) -> dict[str, torch.Tensor]:
        st, p = self.state[k], self.params[k]
        if not st:  # allocated at the first step, like torch's optimisers
            if self.kind == "lazy_adam":
                st["exp_avg"] = _zeros(p.shape, p)
                st["exp_avg_sq"] = _zeros(p.shape, p)
            else:
                st["sum"] = _zeros(p.shape[:1], p)
        return st

    def state_bytes(self) -> list[int]:
        """Bytes of optimiser state held per table (0 before the first step)."""
        return [sum(t.numel() * t.element_size() for t in st.values()) for st in self.state]

    @torch.no_grad()
    def step(self, grads: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.t += 1
        for k, (rows, g) in enumerate(grads):
            if rows.numel() == 0:
                continue
            p, m, st = self.params[k], self.masks[k], self._state(k)
            if self.wd > 0 and self.decay_first:
                self._decay(p, rows, m)
            if self.kind == "lazy_adam":
                b1, b2 = BETAS
                m1 = st["exp_avg"].index_select(0, rows).mul_(b1).add_(g, alpha=1 - b1)
                m2 = st["exp_avg_sq"].index_select(0, rows).mul_(b2).addcmul_(g, g, value=1 - b2)
                st["exp_avg"].index_copy_(0, rows, m1)
                st["exp_avg_sq"].index_copy_(0, rows, m2)
                bc1, bc2 = 1 - b1**self.t, 1 - b2**self.t
                denom = (m2.sqrt() / math.sqrt(bc2)).add_(ADAM_EPS)
                upd = m1.div_(denom).mul_(-self.lr / bc1)
            else:
                cols = g.shape[1] if m is None else max(int(torch.count_nonzero(m)), 1)
                acc = st["sum"].index_select(0, rows).add_(g.pow(2).sum(dim=1) / cols)
                st["sum"].index_copy_(0, rows, acc)
                upd = g / (acc.sqrt().add_(ADAGRAD_EPS)).unsqueeze(1) * (-self.lr)
            _add_rows(p, rows, upd)
            if self.wd > 0 and not self.decay_first:
                self._decay(p, rows, m)

    def _decay(self, p: torch.Tensor, rows: torch.Tensor, m: torch.Tensor | None) -> None:
        r = p.index_select(0, rows)
        p.index_copy_(0, rows, r - (r if m is None else r * m) * (self.lr * self.wd))


def _add_rows(p: torch.Tensor, rows: torch.Tensor, upd: torch.Tensor) -> None:
    """p[rows] += upd for unique `rows`. Not index_add_: under deterministic kernels (train.deterministic)
    torch's CPU index_add_ goes through a scatter_add_ whose cost grew with the table (measured 12 ms
    for 510 rows of a 200,000-row table); a gather, an add and index_copy_ touch only the rows."""
    p.index_copy_(0, rows, p.index_select(0, rows).add_(upd))
