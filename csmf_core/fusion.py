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
    return tail[..., output_owners.long()]


def fuse_queries(user_full: torch.Tensor, output_owners: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Fused query vectors. user_full: (Q, D) full-mode user vectors; weights (N,) or (Q, N)."""
    scale = segment_scale(output_owners, weights).to(user_full.device, user_full.dtype)
    return user_full * scale


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
