"""Single-vector fusion of per-stage scores (csmf-method.md section 5, paper Eq. 8).

With unit-level ownership the full-mode vectors split into per-stage segments by the owner of
each output dimension, and the mode-t score is s_t = sum_{d: owner(d) <= t} e[d] v[d]. Hence

    sum_t k_t s_t = sum_d e[d] v[d] * (sum_{t >= owner(d)} k_t),

so scaling each user dimension by the sum of the weights of the stages at or after its owner
gives one query vector whose inner product with the unchanged item vector is the fused score.
The fused score is a weighted sum of per-stage logits (equivalently a weighted geometric mean
of the stages' softmax probabilities), not a weighted sum of probabilities.
"""

from __future__ import annotations

import numpy as np
import torch


def segment_scale(output_owners: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-dimension query scale.

    output_owners: (D,) owner stage of each output dimension.
    weights: (N,) or (Q, N) objective weights <k_0..k_{N-1}>.
    returns: (D,) or (Q, D) with scale[d] = sum_{t >= owner[d]} k_t.
    """
    w = torch.as_tensor(weights, dtype=torch.float32)
    n = w.shape[-1]
    if output_owners.numel() and int(output_owners.max()) >= n:
        raise ValueError(f"{n} weights for a model with output owners up to stage {int(output_owners.max())}")
    # suffix sums: tail[t] = k_t + ... + k_{N-1}
    tail = torch.flip(torch.cumsum(torch.flip(w, dims=[-1]), dim=-1), dims=[-1])
    # index_select, not tail[..., idx]: advanced indexing along the last dim of a (Q, N) tensor
    # took ~3 ms at Q=1024 on CPU (bench/bench_serving.py), index_select ~0.1 ms; same values.
    return tail.index_select(-1, output_owners.long().to(tail.device))


def fuse_queries(user_full: torch.Tensor, output_owners: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Fused query vectors. user_full: (Q, D) full-mode user vectors; weights (N,) or (Q, N)."""
    scale = segment_scale(output_owners, weights).to(user_full.device, user_full.dtype)
    return user_full * scale


def fuse_queries_np(user_full: np.ndarray, output_owners: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """`fuse_queries` in numpy, the serving hot path (`Recommender.user_vectors`, timed by
    bench/bench_serving.py): (Q, D) float32 vectors, (D,) owners, (N,) or (Q, N) weights -> (Q, D)
    float32, bit-identical to `fuse_queries` (the suffix sums accumulate in float64, as torch's CPU
    cumsum does for float32; accumulated in float32 they differed in the last bit for ~40% of random
    weight vectors), so serving and offline evaluation (`evaluate.Ranked.fused`) rank alike.

    Why a numpy twin: at batch 1 the torch version costs ~12-30 us of op dispatch (measured 17.9 us
    vs 5.6 us in `Recommender.user_vectors` on 2 cores: 8% of the call), and alternating torch's and
    FAISS's OpenMP pools between queries added ~70 us more per HNSW query on 2 cores; this path never
    wakes torch's pool. One weight vector's suffix sums are added in Python floats (8.2 -> 5.5 us a
    batch-1 call on the 2-core Intel Xeon VM, 2026-12-06).
    """
    w = np.asarray(weights, dtype=np.float32)
    owners = np.asarray(output_owners, dtype=np.int64)
    n = w.shape[-1]
    if w.ndim == 1 or (w.ndim == 2 and w.shape[0] == 1):
        # one weight vector (a request): its suffix sums as Python floats, the same sequential float64
        # additions as the cumsum below (bit for bit), ~1 us instead of ~3.4 of numpy calls; gathered by
        # 1-d fancy indexing, whose IndexError is the owners check (~0.2 us against ~1.7 for
        # owners.max() and np.take on 2 cores)
        acc, sums = 0.0, []
        for x in reversed(w.reshape(-1).tolist()):
            acc += x
            sums.append(acc)
        try:
            scale = np.array(sums[::-1], dtype=np.float32)[owners]
        except IndexError:
            if int(owners.max()) >= n:
                raise _too_few_weights(n, owners) from None
            raise  # an owner below -n: np.take's error, as on the batch path
        if w.ndim == 2:
            scale = scale[None, :]
    else:
        if owners.size and int(owners.max()) >= n:
            raise _too_few_weights(n, owners)
        tail = np.cumsum(w[..., ::-1], axis=-1, dtype=np.float64)[..., ::-1].astype(np.float32)
        scale = np.take(tail, owners, axis=-1)
    return (np.asarray(user_full, dtype=np.float32) * scale).astype(np.float32, copy=False)


def _too_few_weights(n: int, owners: np.ndarray) -> ValueError:
    return ValueError(f"{n} weights for a model with output owners up to stage {int(owners.max())}")


def mode_queries(user_full: torch.Tensor, output_owners: torch.Tensor, mode: int) -> torch.Tensor:
    """Query vectors of one stage's score: the dimensions owned by stages <= mode, others zero."""
    keep = (output_owners.long() <= mode).to(user_full.device, user_full.dtype)
    return user_full * keep


def validate_weights(weights, n_stages: int) -> torch.Tensor:
    """Check a weight vector given at query time: N finite, non-negative values, not all zero."""
    w = torch.as_tensor(weights, dtype=torch.float32).flatten()
    if w.numel() != n_stages:
        raise ValueError(f"expected {n_stages} objective weights, got {w.numel()}")
    if not torch.isfinite(w).all() or (w < 0).any() or float(w.sum()) == 0.0:
        raise ValueError(f"objective weights must be finite, >= 0 and not all zero, got {w.tolist()}")
    return w
