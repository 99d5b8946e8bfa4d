"""fusion.fuse_queries_np (serving hot path) against hand values and the torch version."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from csmf_core.fusion import fuse_queries, fuse_queries_np


def test_hand_values():
    owners = np.array([0, 0, 1, 2])
    u = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
    # weights k = (1, 2, 3): dims owned by 0 scale by 1+2+3 = 6, by 1 -> 5, by 2 -> 3
    got = fuse_queries_np(u, owners, np.array([1.0, 2.0, 3.0]))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, [[6.0, 12.0, 15.0, 12.0]])


def test_per_request_weights_match_torch():
    rng = np.random.default_rng(0)
    owners = rng.integers(0, 3, 64)
    u = rng.standard_normal((5, 64)).astype(np.float32)
    w = rng.uniform(0, 2, (5, 3)).astype(np.float32)
    want = fuse_queries(torch.from_numpy(u), torch.from_numpy(owners), torch.from_numpy(w)).numpy()
    np.testing.assert_allclose(fuse_queries_np(u, owners, w), want, rtol=1e-6)
    # and per row by hand: scale[d] = sum_{t >= owner[d]} w[t]
    hand = u * np.array([[w[q, o:].sum() for o in owners] for q in range(5)])
    np.testing.assert_allclose(fuse_queries_np(u, owners, w), hand, rtol=1e-6)


@pytest.mark.parametrize("weights", [[1.0, 1.0], [[1.0, 1.0]], [[1.0, 1.0], [2.0, 0.5]]])
def test_too_few_weights(weights):
    """One request's weights (N,) or (1, N) and a batch's (Q, N) take different paths; both refuse."""
    with pytest.raises(ValueError, match="2 weights for a model with output owners up to stage 2"):
        fuse_queries_np(np.ones((2, 3), np.float32), np.array([0, 2, 1]), np.array(weights))


def test_odd_owners_and_weight_shapes_fail_as_before():
    """An owner below -N is numpy's IndexError on both paths (not "too few weights"); 3-d weights take
    the batch path, which refuses too few weights the same way."""
    u = np.ones((2, 3), np.float32)
    for w in ([1.0, 1.0], [[1.0, 1.0], [2.0, 0.5]]):
        with pytest.raises(IndexError):
            fuse_queries_np(u, np.array([0, -3, 1]), np.array(w))
    with pytest.raises(ValueError, match="2 weights"):
        fuse_queries_np(u, np.array([0, 2, 1]), np.ones((1, 2, 2)))


def test_one_request_keeps_the_batch_shape():
    """(1, N) weights with a single (D,) vector give (1, D), as the (Q, N) path's broadcasting does."""
    u = np.array([1.0, 2.0, 4.0], np.float32)
    got = fuse_queries_np(u, np.array([0, 1, 1]), np.array([[1.0, 0.5]]))
    np.testing.assert_array_equal(got, np.array([[1.5, 1.0, 2.0]], np.float32))
    assert fuse_queries_np(u, np.array([0, 1, 1]), np.array([1.0, 0.5])).shape == (3,)


def test_bit_identical_to_torch_for_random_weights():
    """Serving (numpy) and offline evaluation (torch) must build the same fused queries, to the bit:
    with the suffix sums accumulated in float32, ~40% of random weight vectors differed in the last bit."""
    rng = np.random.default_rng(1)
    for trial in range(400):
        n = int(rng.integers(2, 6))
        owners = np.sort(rng.integers(0, n, 64))
        u = (rng.standard_normal((4, 64)) * 10.0 ** rng.integers(-3, 4)).astype(np.float32)
        shape = [(4, n), (n,), (1, n)][trial % 3]  # (n,) and (1, n): the one-request path
        w = (rng.uniform(0, 1, shape) * 10.0 ** rng.integers(-4, 4, shape)).astype(np.float32)
        want = fuse_queries(torch.from_numpy(u), torch.from_numpy(owners), torch.from_numpy(w)).numpy()
        np.testing.assert_array_equal(fuse_queries_np(u, owners, w), want)
        assert fuse_queries_np(u, owners, w).shape == (4, 64)


def test_one_request_suffix_sums_by_hand():
    """The one-vector path (Python float sums) on values where float32 accumulation would round:
    1 + 2^-24 is not a float32, so the suffix sum must be formed in float64 and rounded once."""
    owners = np.array([0, 1, 2])
    u = np.ones((1, 3), np.float32)
    w = np.array([2.0**-24, 2.0**-24, 1.0], np.float32)
    want = np.array([[np.float32(1.0 + 2.0**-23), np.float32(1.0 + 2.0**-24), 1.0]], np.float32)
    for weights in (w, w[None, :]):
        np.testing.assert_array_equal(fuse_queries_np(u, owners, weights), want)
    assert fuse_queries_np(u, owners, w[None, :]).shape == (1, 3)


def test_recommender_fuses_as_offline_evaluation(tiny_world):
    """Recommender.user_vectors (numpy fusion, the benchmarked path) == evaluate's torch fusion of the
    same full-mode user vectors, to the bit, for the default and random weights."""
    from csmf_core.serving import Recommender

    rec = Recommender.load(tiny_world["bundle"])
    ids = rec.user_vocab[:7]
    full, _ = rec.user_vectors(ids)
    rng = np.random.default_rng(2)
    for w in [rec.default_weights, *rng.uniform(0.05, 3.0, (20, rec.n_stages)).astype(np.float32)]:
        q, _ = rec.user_vectors(ids, weights=w.tolist())
        want = fuse_queries(torch.from_numpy(full), torch.from_numpy(rec.output_owners), torch.from_numpy(w))
        np.testing.assert_array_equal(q, want.numpy())
