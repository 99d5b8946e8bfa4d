"""Sampled softmax and AML against hand-computed values and gradients."""

import math

import pytest
import torch

from csmf_core.losses import (
    FAST_UPSTREAM_MIN,
    _hit_pairs,
    _hit_pairs_sorted,
    _TorchOps,
    accidental_hits,
    aml_margins,
    sampled_softmax,
    upstream_scores,
)


def test_accidental_hits():
    items = torch.tensor([5, 7, 5, 9])
    hits = accidental_hits(items)
    assert hits.nonzero().tolist() == [[0, 2], [2, 0]]


def test_in_batch_softmax_removes_accidental_hits():
    s = torch.tensor([[2.0, 1.0, 3.0], [0.5, 1.0, -1.0], [0.0, 2.0, 1.5]])
    items = torch.tensor([10, 11, 10])  # rows 0 and 2 share the positive item
    got = sampled_softmax(s, items).loss
    # row 0: column 2 is the same item -> only column 1 is a negative
    l0 = -2.0 + math.log(math.exp(2.0) + math.exp(1.0))
    # row 1: both others are negatives
    l1 = -1.0 + math.log(math.exp(0.5) + math.exp(1.0) + math.exp(-1.0))
    # row 2: column 0 is the same item -> only column 1
    l2 = -1.5 + math.log(math.exp(1.5) + math.exp(2.0))
    assert float(got) == pytest.approx((l0 + l1 + l2) / 3, rel=1e-6)


def test_temperature_logq_and_extra_negatives():
    s = torch.tensor([[2.0, 1.0], [0.0, 1.0]])
    items = torch.tensor([1, 2])
    log_q = torch.tensor([math.log(0.5), math.log(0.25)])
    extra = torch.tensor([[1.0, 9.0], [0.5, 3.0]])
    extra_items = torch.tensor([[3, 0], [2, 4]])  # row 0: second is padding; row 1: first == positive
    got = sampled_softmax(s, items, temperature=2.0, log_q=log_q, extra_scores=extra, extra_items=extra_items)
    # logits = s/2 - log_q[col]; extras / 2, invalid removed
    a = [1.0 - math.log(0.5), 0.5 - math.log(0.25)]
    b = [0.0 - math.log(0.5), 0.5 - math.log(0.25)]
    l0 = -a[0] + math.log(math.exp(a[0]) + math.exp(a[1]) + math.exp(0.5))
    l1 = -b[1] + math.log(math.exp(b[1]) + math.exp(b[0]) + math.exp(1.5))
    assert float(got.loss) == pytest.approx((l0 + l1) / 2, rel=1e-6)
    assert got.n_neg == pytest.approx(2.0)


def test_aml_margins_both_branches():
    up_pos = torch.tensor([2.0])
    up_neg = torch.tensor([[1.0, 3.0]])
    m = aml_margins(up_pos, up_neg, sigma=0.1, eta=1.8)
    # agree: (2 - 1) + 0.1 = 1.1 ; disagree: 1.8 * (3 - 2) + 0.1 = 1.9
    assert m.tolist()[0] == pytest.approx([1.1, 1.9])


def test_aml_loss_value_and_gradient():
    # two rows; upstream agrees for row 0's negative, disagrees for row 1's
    s = torch.tensor([[2.0, 1.0], [0.5, 1.5]], requires_grad=True)
    up = torch.tensor([[1.0, 0.0], [0.4, 0.2]])  # row 0: up_i=1 >= up_j=0; row 1: up_i=0.2 < up_j=0.4
    sigma, eta = 0.2, 1.8
    m = aml_margins(up.diagonal(), up, sigma, eta)
    loss = sampled_softmax(s, torch.tensor([1, 2]), margins=m).loss
    loss.backward()
    m01 = (1.0 - 0.0) + sigma  # 1.2
    m10 = eta * (0.4 - 0.2) + sigma  # 0.56
    z0 = [2.0, 1.0 - m01]
    z1 = [1.5, 0.5 - m10]

    def lse(z):
        return math.log(sum(math.exp(v) for v in z))

    l0 = -z0[0] + lse(z0)
    l1 = -z1[0] + lse(z1)
    assert float(loss.detach()) == pytest.approx((l0 + l1) / 2, rel=1e-6)
    p0 = [math.exp(v - lse(z0)) for v in z0]
    p1 = [math.exp(v - lse(z1)) for v in z1]
    # d mean / d s_ii = (p_pos - 1)/B ; d / d s_ij = p_neg / B (margins are constants)
    expected = [[(p0[0] - 1) / 2, p0[1] / 2], [p1[1] / 2, (p1[0] - 1) / 2]]
    assert s.grad.tolist()[0] == pytest.approx(expected[0], rel=1e-5)
    assert s.grad.tolist()[1] == pytest.approx(expected[1], rel=1e-5)


def test_upstream_log_prob_and_last_logit():
    seg0 = torch.tensor([[0.5, -1.0]])
    seg1 = torch.tensor([[0.25, 2.0]])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    up1 = upstream_scores([seg0], 1, "log_prob")
    assert up1.tolist()[0] == pytest.approx([math.log(sig(0.5)), math.log(sig(-1.0))])
    up2 = upstream_scores([seg0, seg1], 2, "log_prob")
    # log(p_exposure * p_click) with s_0 = seg0 and s_1 = seg0 + seg1
    assert up2.tolist()[0] == pytest.approx(
        [math.log(sig(0.5) * sig(0.75)), math.log(sig(-1.0) * sig(1.0))], rel=1e-6
    )
    assert upstream_scores([seg0, seg1], 2, "last_logit").tolist()[0] == pytest.approx([0.75, 1.0])
    with pytest.raises(ValueError):
        upstream_scores([seg0], 0)


def _hit_pair_backends(items):
    """_hit_pairs as it runs on this tensor's device (NumPy on the CPU) and its torch form."""
    return [_hit_pairs(items), _hit_pairs_sorted(items, _TorchOps(items.device))]


def test_hit_pairs_by_hand():
    items = torch.tensor([5, 7, 5, 9, 5])
    for rows, cols, per_row in _hit_pair_backends(items):
        pairs = sorted(zip(rows.tolist(), cols.tolist()))
        assert pairs == [(0, 2), (0, 4), (2, 0), (2, 4), (4, 0), (4, 2)]
        assert per_row.tolist() == [2, 0, 2, 0, 2]
        assert rows.dtype == cols.dtype == per_row.dtype == torch.int64


def test_hit_pairs_of_int32_and_strided_items():
    g = torch.Generator().manual_seed(3)
    for items in (
        torch.randint(0, 40, (300,), generator=g).to(torch.int32),
        torch.randint(0, 40, (600,), generator=g)[::2],
    ):
        want = accidental_hits(items)
        for rows, cols, per_row in _hit_pair_backends(items):
            assert rows.dtype == cols.dtype == per_row.dtype == torch.int64
            got = torch.zeros(want.shape, dtype=torch.bool)
            got[rows, cols] = True
            assert torch.equal(got, want) and rows.numel() == int(want.sum())
            assert torch.equal(per_row, want.sum(dim=1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_hit_pairs_on_cuda_are_the_comparison_matrix():
    items = torch.randint(0, 300, (512,), generator=torch.Generator().manual_seed(1))
    want = accidental_hits(items)
    rows, cols, per_row = _hit_pairs(items.cuda())
    got = torch.zeros(want.shape, dtype=torch.bool)
    got[rows.cpu(), cols.cpu()] = True
    assert torch.equal(got, want) and rows.numel() == int(want.sum())
    assert torch.equal(per_row.cpu(), want.sum(dim=1))


@pytest.mark.parametrize("n,n_items", [(0, 1), (1, 1), (6, 1), (64, 5), (512, 300), (300, 10_000)])
def test_hit_pairs_are_the_comparison_matrix(n, n_items):
    """Every (row, column) pair holding the same item, once each, and the count per row: the (B, B)
    comparison `accidental_hits` makes, on batches from all-equal to all-distinct."""
    items = torch.randint(0, n_items, (n,), generator=torch.Generator().manual_seed(n + n_items))
    want = accidental_hits(items)
    for rows, cols, per_row in _hit_pair_backends(items):
        assert rows.numel() == int(want.sum())  # no pair twice
        got = torch.zeros(n, n, dtype=torch.bool)
        got[rows, cols] = True
        assert torch.equal(got, want)
        assert torch.equal(per_row, want.sum(dim=1))


def _log_sigmoid_sum(segs, stage):
    """sum_{r < stage} log sigmoid(s_r) in float64, s_r the running sums: the reference."""
    running, total = torch.zeros_like(segs[0], dtype=torch.float64), 0.0
    for r in range(stage):
        running = running + segs[r].double()
        total = total + torch.nn.functional.logsigmoid(running)
    return total


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_fast_upstream_is_the_log_sigmoid_sum_up_to_rounding(stage):
    """loss.fast_upstream: log of the product of sigmoids, within float32 rounding of the exact sum
    (scores up to about +-25: no product below FAST_UPSTREAM_MIN), and the segment matrices hold the
    running mode scores afterwards exactly as the exact form leaves them (aml_bias reads the last)."""
    g = torch.Generator().manual_seed(stage)
    segs = [torch.randn(96, 96, generator=g) * 4 for _ in range(3)]
    want = _log_sigmoid_sum(segs, stage)
    fast_in, exact_in = [s.clone() for s in segs], [s.clone() for s in segs]
    fast = upstream_scores(fast_in, stage, "log_prob", overwrite=True, fast=True)
    exact = upstream_scores(exact_in, stage, "log_prob", overwrite=True)
    assert float(torch.exp(want).min()) > FAST_UPSTREAM_MIN  # the fast path itself ran
    torch.testing.assert_close(fast.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(exact.double(), want, rtol=1e-6, atol=1e-6)
    assert not torch.equal(fast, exact)  # a different rounding, not the same computation
    for a, b in zip(fast_in, exact_in):
        assert torch.equal(a, b)
    # without overwrite the inputs are left alone
    kept = [s.clone() for s in segs]
    torch.testing.assert_close(upstream_scores(kept, stage, fast=True).double(), want, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(kept, segs))


def test_fast_upstream_entries_below_the_floor_get_the_log_sigmoid_sum():
    """An entry whose product of sigmoids is below FAST_UPSTREAM_MIN (a mode score of -80 here: its
    sigmoid 1.8e-35; the product would lose precision, then underflow) gets the sum of log-sigmoids;
    the other entries keep the fast form; a NaN score stays NaN; with and without overwrite alike."""
    g = torch.Generator().manual_seed(9)
    segs = [torch.randn(32, 32, generator=g) for _ in range(2)]
    segs[0][3, 5] = -80.0
    segs[1][7, 7] = float("nan")
    want = _log_sigmoid_sum(segs, 2)
    over_in = [s.clone() for s in segs]
    over = upstream_scores(over_in, 2, "log_prob", overwrite=True, fast=True)
    kept = upstream_scores([s.clone() for s in segs], 2, "log_prob", fast=True)
    assert torch.equal(over.nan_to_num(), kept.nan_to_num())
    assert float(over[3, 5]) == pytest.approx(float(want[3, 5]), rel=1e-6)  # about -160
    assert float(over[3, 5]) < -150
    assert torch.isnan(over[7, 7]) and int(torch.isnan(over).sum()) == 1
    fine = ~torch.isnan(want)
    torch.testing.assert_close(over.double()[fine], want[fine], rtol=1e-6, atol=1e-6)
    exact_in = [s.clone() for s in segs]
    upstream_scores(exact_in, 2, "log_prob", overwrite=True)
    assert all(torch.equal(x.nan_to_num(), y.nan_to_num()) for x, y in zip(over_in, exact_in))


def test_fast_upstream_only_where_it_applies():
    """Ignored for "last_logit" and for half-precision scores (2^-100 is 0 in float16: the exact form,
    bit for bit); empty matrices pass through; a bad definition is refused before any work."""
    g = torch.Generator().manual_seed(2)
    segs = [torch.randn(8, 8, generator=g) for _ in range(2)]
    for how in ("last_logit",):
        assert torch.equal(upstream_scores(segs, 2, how, fast=True), upstream_scores(segs, 2, how))
    half = [torch.tensor([[-20.0, -5.0]]).half()]
    assert torch.equal(upstream_scores(half, 1, fast=True), upstream_scores(half, 1))
    assert bool(torch.isfinite(upstream_scores(half, 1, fast=True)).all())
    assert upstream_scores([torch.zeros(4, 0), torch.zeros(4, 0)], 2, fast=True).shape == (4, 0)
    with pytest.raises(ValueError, match="unknown upstream"):
        upstream_scores(segs, 1, "logit", fast=True)


def _reference_loss(scores, items, temperature, log_q, up, sigma, eta):
    """The textbook path, written independently: boolean masks, -inf fills and torch.where."""
    logits = scores / temperature - log_q[None, :]
    pos = up.diagonal()[:, None]
    m = torch.where(pos >= up, pos - up + sigma, eta * (up - pos) + sigma)
    m = m.masked_fill(torch.eye(len(items), dtype=torch.bool), 0.0)
    logits = logits - m
    same = items[:, None] == items[None, :]
    same &= ~torch.eye(len(items), dtype=torch.bool)
    logits = logits.masked_fill(same, float("-inf"))
    return torch.nn.functional.cross_entropy(logits, torch.arange(len(items)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_bias_path_matches_the_textbook_one(dtype):
    # many duplicated positives (items drawn from 12 ids for 40 rows), log-Q, AML margins with
    # both branches, temperature: the loss and the gradient must match the -inf / where version
    g = torch.Generator().manual_seed(3)
    b = 40
    items = torch.randint(0, 12, (b,), generator=g)
    log_q = torch.randn(b, generator=g, dtype=dtype)
    up = torch.randn(b, b, generator=g, dtype=dtype)
    s1 = torch.randn(b, b, generator=g, dtype=dtype, requires_grad=True)
    s2 = s1.detach().clone().requires_grad_(True)
    m = aml_margins(up.diagonal(), up, 0.1, 1.8)
    got = sampled_softmax(s1, items, temperature=0.7, log_q=log_q, margins=m)
    ref = _reference_loss(s2, items, 0.7, log_q, up, 0.1, 1.8)
    got.loss.backward()
    ref.backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert float(got.loss.detach()) == pytest.approx(float(ref.detach()), rel=tol)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=tol, atol=tol)
    hits = accidental_hits(items)
    assert got.n_neg == pytest.approx(float((b - 1) - hits.sum(dim=1).double().mean()))
    assert bool(hits.any())  # the case under test really has accidental hits


@pytest.mark.parametrize("sigma", [0.0, 0.1])
def test_negated_margins_are_the_negation_bit_for_bit(sigma):
    # negate=True saves a pass over the (B, B) matrix; it must be exactly -margins (up to the sign of
    # an exact zero), and the loss and gradient through margin_bias exactly those through margins
    g = torch.Generator().manual_seed(5)
    b = 64
    up = torch.randn(b, b, generator=g)
    up[0, 1] = up[0, 0]  # d = 0 exactly
    m = aml_margins(up.diagonal(), up, sigma, 1.8)
    neg = aml_margins(up.diagonal(), up, sigma, 1.8, negate=True)
    assert torch.equal(neg, -m)
    # the textbook margins: d + sigma for d >= 0, eta * (-d) + sigma below (within rounding)
    d = up.diagonal()[:, None] - up
    torch.testing.assert_close(-neg, torch.where(d >= 0, d, -1.8 * d) + sigma, rtol=1e-6, atol=1e-6)
    items = torch.randint(0, 20, (b,), generator=g)
    log_q = torch.randn(b, generator=g)
    s1 = torch.randn(b, b, generator=g, requires_grad=True)
    s2 = s1.detach().clone().requires_grad_(True)
    a = sampled_softmax(s1, items, log_q=log_q, margins=m.clone())
    c = sampled_softmax(s2, items, log_q=log_q, margin_bias=neg)
    a.loss.backward()
    c.loss.backward()
    assert torch.equal(a.loss, c.loss)
    assert torch.equal(s1.grad, s2.grad)
    with pytest.raises(ValueError, match="not both"):
        sampled_softmax(s1, items, margins=m, margin_bias=-m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sigma", [0.0, 0.3])
@pytest.mark.parametrize("overwrite", [False, True])
def test_exact_branch_margins_are_the_formula_bit_for_bit(dtype, sigma, overwrite):
    # exact_branches: d + sigma for d >= 0, eta * (-d) + sigma below, each branch rounded once: equal to
    # the formula evaluated branch by branch with torch.where (an independent form), not just close
    g = torch.Generator().manual_seed(11)
    b, eta = 48, 1.8
    up = torch.randn(b, b, generator=g, dtype=dtype) * 3
    up[0, 1] = up[0, 0]  # d = 0 exactly
    d = up.diagonal()[:, None] - up
    want = torch.where(d >= 0, d, eta * (-d)) + sigma
    assert bool((d > 0).any()) and bool((d < 0).any())
    pos = up.diagonal().clone()
    got = aml_margins(
        pos, up.clone() if overwrite else up, sigma, eta, overwrite=overwrite, exact_branches=True
    )
    assert torch.equal(got, want)
    neg = aml_margins(pos, up.clone() if overwrite else up, sigma, eta, negate=True, overwrite=overwrite,
                      exact_branches=True)  # fmt: skip
    assert torch.equal(neg, -want)
    # the default (relu) form is the same function within rounding
    torch.testing.assert_close(aml_margins(pos, up, sigma, eta), want)
    with pytest.raises(ValueError, match="eta >= 0"):
        aml_margins(pos, up, sigma, -0.5, exact_branches=True)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("case", ["everything", "nothing_to_add", "hits_only"])
def test_scores_as_a_function_of_the_bias_give_the_same_loss(temperature, case):
    # sampled_softmax(scores=f) with f(bias, scale) = bias + scale * s (the split path's addmm_ into the
    # bias) against the same scores passed as a matrix: the same loss and gradient up to rounding
    g = torch.Generator().manual_seed(7)
    b, m = 32, 3
    if case == "hits_only":
        items = torch.randint(0, 6, (b,), generator=g)
    else:
        items = torch.randperm(100, generator=g)[:b] + 1  # distinct: no accidental hits
    s1 = torch.randn(b, b, generator=g, requires_grad=True)
    s2 = s1.detach().clone().requires_grad_(True)
    kw = {}
    if case == "everything":
        items[5] = items[9]  # one accidental hit pair
        up = torch.randn(b, b, generator=g)
        kw = dict(
            log_q=torch.randn(b, generator=g),
            extra_scores=torch.randn(b, m, generator=g),
            extra_items=torch.randint(0, 120, (b, m), generator=g),
            extra_margins=torch.rand(b, m, generator=g),
        )
        m1 = aml_margins(up.diagonal(), up, 0.1, 1.8, negate=True)
        m2 = m1.clone()
    seen = []

    def into(bias, scale):
        seen.append((None if bias is None else bias.clone(), scale))
        return s2 * scale if bias is None else bias.add(s2, alpha=scale)

    a = sampled_softmax(
        s1, items, temperature=temperature, margin_bias=m1 if case == "everything" else None, **kw
    )
    c = sampled_softmax(
        into, items, temperature=temperature, margin_bias=m2 if case == "everything" else None, **kw
    )
    assert seen[0][1] == pytest.approx(1.0 / temperature)
    assert (seen[0][0] is None) == (case == "nothing_to_add")
    a.loss.backward()
    c.loss.backward()
    torch.testing.assert_close(c.loss, a.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-5, atol=1e-8)
    assert c.n_neg == pytest.approx(a.n_neg)


def test_scores_function_form_gets_the_score_dtype():
    # float64 scores with a float32 log-Q (item_log_q's dtype): the bias handed to the function has the
    # scores' dtype, and the loss equals the matrix form's
    g = torch.Generator().manual_seed(2)
    b = 24
    items = torch.randperm(50, generator=g)[:b] + 1
    s1 = torch.randn(b, b, generator=g, dtype=torch.float64, requires_grad=True)
    s2 = s1.detach().clone().requires_grad_(True)
    lq = torch.randn(b, generator=g)  # float32
    a = sampled_softmax(s1, items, log_q=lq)
    c = sampled_softmax(
        lambda bias, scale: bias.addmm_(torch.eye(b, dtype=torch.float64), s2, alpha=scale),
        items,
        log_q=lq,
        score_dtype=torch.float64,
    )
    assert c.loss.dtype == torch.float64
    torch.testing.assert_close(c.loss, a.loss)
