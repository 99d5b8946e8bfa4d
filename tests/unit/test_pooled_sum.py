"""The behaviour-sequence sums (`model.pooled_sum`) against embedding_bag's padding_idx kernel and a
per-row loop: padding dropped from the id list instead of skipped by padding_idx must give the same
sums and the same sparse gradient, bit for bit, and a whole cascade with a row-wise optimiser must
train the same parameters."""

import pytest
import torch
import torch.nn.functional as F

from csmf_core import model as model_mod
from csmf_core.cascade import load_cascade_data, run_cascade
from csmf_core.config import build_config
from csmf_core.model import pooled_sum


def _padding_idx(seq, weight, sparse):
    """The previous implementation: embedding_bag with padding_idx=0."""
    return F.embedding_bag(seq, weight, mode="sum", padding_idx=0, sparse=sparse), (seq > 0).sum(dim=1)


def _seqs(n_rows: int, b: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, n_rows, (b, length), generator=g)
    seq[torch.rand(b, length, generator=g) < 0.3] = 0  # padding inside rows
    seq[0] = 0  # a row of padding only
    seq[1, :3] = 7  # a repeated id
    return seq


@pytest.mark.parametrize("n_rows,b,length", [(50, 64, 20), (5000, 512, 20), (300, 5, 3)])
def test_sums_and_sparse_gradient_are_those_of_padding_idx(n_rows, b, length):
    seq = _seqs(n_rows, b, length, seed=n_rows)
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(n_rows, 8, generator=g)
    gy = torch.randn(b, 8, generator=g)
    with torch.no_grad():  # evaluation / serving: the fast kernel
        got, n = pooled_sum(seq, w0, sparse=False)
    ref, n_ref = _padding_idx(seq, w0, False)
    assert torch.equal(got, ref) and torch.equal(n, n_ref)
    # a per-row loop, independently (sums in id order, float64 for the reference)
    loop = torch.stack([w0.double()[[i for i in row.tolist() if i > 0]].sum(0) for row in seq])
    torch.testing.assert_close(got.double(), loop, rtol=1e-6, atol=1e-6)
    assert torch.equal(got[0], torch.zeros(8))  # padding only -> 0
    grads = []
    for f in (pooled_sum, _padding_idx):
        w = w0.clone().requires_grad_(True)
        (f(seq, w, True)[0] * gy).sum().backward()  # sparse gradient: the row-wise optimisers
        assert w.grad.is_sparse
        grads.append(w.grad.coalesce())
    assert torch.equal(grads[0].indices(), grads[1].indices())
    assert torch.equal(grads[0].values(), grads[1].values())
    assert 0 not in grads[0].indices()  # padding gets no gradient


def test_a_dense_gradient_keeps_the_padding_idx_kernel():
    # a dense gradient in the fast kernel's summation order would differ in the last bits
    seq = _seqs(5000, 512, 20, seed=3)
    w0 = torch.randn(5000, 8)
    gy = torch.randn(512, 8)
    grads = []
    for f in (pooled_sum, _padding_idx):
        w = w0.clone().requires_grad_(True)
        (f(seq, w, False)[0] * gy).sum().backward()
        grads.append(w.grad)
    assert torch.equal(grads[0], grads[1])


@pytest.fixture(scope="module")
def tiny(tiny_world):
    return load_cascade_data(tiny_world["mr"])  # a copy of the session's tiny world data of its own


@pytest.mark.parametrize("kind", ["rowwise_adagrad", "lazy_adam"])
def test_a_cascade_with_row_wise_updates_trains_the_same_parameters(tiny, kind, monkeypatch):
    cfg = build_config({}, ["train.epochs=[1,1,2]", "recover.epochs=1", f"train.embedding_optimizer={kind}"])
    new, _, _ = run_cascade(tiny, cfg)
    calls = []

    def previous(seq, weight, sparse):
        calls.append(sparse)
        return _padding_idx(seq, weight, sparse)

    monkeypatch.setattr(model_mod, "pooled_sum", previous)
    old, _, _ = run_cascade(tiny, cfg)
    assert True in calls  # the row-wise stages' sparse lookups went through the previous kernel
    a, b = new.state_dict(), old.state_dict()
    assert "user.hist.click.weight" in a
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_off_the_cpu_the_padding_idx_kernel_is_taken():
    """On an accelerator `seq[keep]` (a boolean index) makes the host wait for the device several times
    a step; there the padding_idx kernel is taken. torch's meta device stands in for it: its boolean
    index cannot be sized (raises), so only the padding_idx path runs there."""
    seq = _seqs(50, 64, 20, seed=5)
    w = torch.randn(50, 8)
    with torch.no_grad():
        got, n = pooled_sum(seq.to("meta"), w.to("meta"), sparse=True)
        assert got.shape == (64, 8) and n.shape == (64,)
        with pytest.raises(NotImplementedError):
            pooled_sum(seq.to("meta"), w.to("meta"), sparse=True, compact=True)
        # and the padding_idx path gives the compact path's sums (here on the CPU, both asked for)
        torch.testing.assert_close(
            pooled_sum(seq, w, sparse=False, compact=False)[0], pooled_sum(seq, w, sparse=False)[0]
        )
