"""Row-wise embedding updates (csmf_core.rowwise through csmf_core.optim.Optimiser): against plain
per-row references written here, torch's dense Adam when every row is touched, frozen columns and
untouched rows bit-identical, clipping as torch's, state bytes per table."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from csmf_core.config import build_config
from csmf_core.masks import expand_to_param
from csmf_core.optim import Optimiser, TrainLog

V, D = 12, 4


def _batches(n: int = 8, seed: int = 0) -> list[torch.Tensor]:
    """Lookups touching a few rows each (duplicates included), never rows 10 and 11."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 10, (6,), generator=g) for _ in range(n)]


def _loss(weight: torch.Tensor, ids: torch.Tensor, sparse: bool, k: int) -> torch.Tensor:
    target = torch.linspace(-1, 1, D) * (k + 1)
    v = F.embedding(ids, weight, sparse=sparse)
    return ((v - target) ** 2 * torch.arange(1, D + 1)).sum()


def _dense_grad(weight: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    w = weight.detach().clone().requires_grad_(True)
    _loss(w, ids, False, k).backward()
    return w.grad


def _run(
    kind: str, mask: torch.Tensor | None, overrides: list[str] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = build_config({}, [f"train.embedding_optimizer={kind}", "train.lr=0.05", *overrides])
    start = torch.randn(V, D, generator=torch.Generator().manual_seed(3))
    p = torch.nn.Parameter(start.clone())
    opt = Optimiser(
        [p],
        0.05,
        cfg,
        TrainLog("toy", 6, 1),
        masks=None if mask is None else [mask],
        row_wise=[True],
        names=["t"],
    )
    for k, ids in enumerate(_batches()):
        opt.step(_loss(p, ids, True, k), 6)
    return start, p.detach()


def _ref_lazy_adam(start, mask, lr=0.05, wd=0.0, masked=True):
    """Lazy Adam, one row and one entry at a time."""
    p = start.clone().tolist()
    m = [[0.0] * D for _ in range(V)]
    v = [[0.0] * D for _ in range(V)]
    for t, ids in enumerate(_batches(), start=1):
        g = _dense_grad(torch.tensor(p), ids, t - 1)
        for r in sorted(set(ids.tolist())):
            for c in range(D):
                gc = float(g[r, c]) * (1.0 if mask is None else float(mask[c]))
                if not masked and wd > 0:  # AdamW: decay first
                    p[r][c] -= lr * wd * p[r][c]
                m[r][c] = 0.9 * m[r][c] + 0.1 * gc
                v[r][c] = 0.999 * v[r][c] + 0.001 * gc * gc
                mh, vh = m[r][c] / (1 - 0.9**t), v[r][c] / (1 - 0.999**t)
                p[r][c] -= lr * mh / (math.sqrt(vh) + 1e-8)
                if masked and wd > 0:
                    p[r][c] -= lr * wd * p[r][c] * (1.0 if mask is None else float(mask[c]))
    return torch.tensor(p)


def _ref_rowwise_adagrad(start, mask, lr=0.05):
    p = start.clone().tolist()
    acc = [0.0] * V
    cols = D if mask is None else int(mask.sum())
    for k, ids in enumerate(_batches()):
        g = _dense_grad(torch.tensor(p), ids, k)
        for r in sorted(set(ids.tolist())):
            gr = [float(g[r, c]) * (1.0 if mask is None else float(mask[c])) for c in range(D)]
            acc[r] += sum(x * x for x in gr) / cols
            for c in range(D):
                p[r][c] -= lr * gr[c] / (math.sqrt(acc[r]) + 1e-8)
    return torch.tensor(p)


@pytest.mark.parametrize("kind", ["lazy_adam", "rowwise_adagrad"])
@pytest.mark.parametrize("masked", [False, True])
def test_row_update_matches_plain_reference(kind, masked):
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0]) if masked else None
    start, got = _run(kind, mask)
    ref = (_ref_lazy_adam if kind == "lazy_adam" else _ref_rowwise_adagrad)(start, mask)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[10:], start[10:])  # rows never looked up: bit-identical
    if masked:
        assert torch.equal(got[:, 1], start[:, 1])  # frozen column: bit-identical
    assert not torch.equal(got[:10], start[:10])


@pytest.mark.parametrize("masked", [False, True])
def test_lazy_adam_decay_matches_reference(masked):
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0]) if masked else None
    start, got = _run("lazy_adam", mask, ["train.weight_decay=0.3"])
    torch.testing.assert_close(got, _ref_lazy_adam(start, mask, wd=0.3, masked=masked), rtol=1e-5, atol=1e-6)
    assert torch.equal(got[10:], start[10:])
    if masked:
        assert torch.equal(got[:, 2], start[:, 2])


def test_lazy_adam_is_dense_adam_when_every_row_is_touched():
    cfg = build_config({}, ["train.embedding_optimizer=lazy_adam"])
    start = torch.randn(V, D, generator=torch.Generator().manual_seed(5))
    p, q = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    opt = Optimiser([p], 0.01, cfg, TrainLog("toy", V, 1), masks=[None], row_wise=[True])
    ref = torch.optim.Adam([q], lr=0.01)
    every = torch.arange(V)
    for k in range(10):
        opt.step(_loss(p, every, True, k), V)
        ref.zero_grad()
        _loss(q, every, False, k).backward()
        ref.step()
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


def test_clipping_uses_the_norm_of_dense_and_row_gradients_together():
    """A row-wise table and a dense parameter clipped together, as torch clips the dense equivalent."""
    cfg = build_config({}, ["train.embedding_optimizer=rowwise_adagrad", "train.grad_clip=0.1"])
    w = torch.nn.Parameter(torch.randn(V, D, generator=torch.Generator().manual_seed(1)))
    b = torch.nn.Parameter(torch.ones(D))
    ids = torch.tensor([1, 1, 4, 7])
    opt = Optimiser([w, b], 0.01, cfg, TrainLog("toy", 4, 1), masks=None, row_wise=[True, False])
    seen = {}
    real_step = opt.rows.step
    opt.rows.step = lambda grads: (
        seen.update(rows=grads[0][0].clone(), vals=grads[0][1].clone()),
        real_step(grads),
    )

    def loss(wt, sparse):
        return ((F.embedding(ids, wt, sparse=sparse) + b) ** 2).sum() * 3

    wd, bd = w.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    ((F.embedding(ids, wd) + bd) ** 2).sum().mul(3).backward()
    torch.nn.utils.clip_grad_norm_([wd, bd], 0.1)
    opt.step(loss(w, True), 4)
    assert seen["rows"].tolist() == [1, 4, 7]
    torch.testing.assert_close(seen["vals"], wd.grad[[1, 4, 7]])


def test_state_bytes_per_table():
    cfg = build_config({}, ["train.embedding_optimizer=rowwise_adagrad"])
    a = torch.nn.Parameter(torch.zeros(100, D))
    b = torch.nn.Parameter(torch.zeros(50, D))
    log = TrainLog("toy", 2, 1)
    opt = Optimiser([a, b], 0.01, cfg, log, row_wise=[True, False], names=["a", "b"], embedding=[True, True])
    ids = torch.tensor([0, 3])
    opt.step((F.embedding(ids, a, sparse=True).sum() + F.embedding(ids, b).sum()) ** 2, 2)
    assert log.state_bytes == {"a": 100 * 4, "b": 2 * 50 * D * 4}  # one float per row; Adam: m and v
    assert log.summary()["opt_state_mib/a"] == round(400 / 2**20, 3)


def test_config_refuses_sparse_with_processes():
    with pytest.raises(ValueError, match="train.embedding_optimizer=lazy_adam .* single-process"):
        build_config({}, ["train.processes=2", "train.embedding_optimizer=lazy_adam"])
    assert build_config({}, ["train.processes=2", "train.embedding_optimizer=dense"]).train.processes == 2
    with pytest.raises(ValueError, match="train.embedding_optimizer: 'sgd' is not one of"):
        build_config({}, ["train.embedding_optimizer=sgd"])


@pytest.mark.parametrize("kind", ["lazy_adam", "rowwise_adagrad"])
def test_csmf_stage_updates_only_touched_rows_of_owned_columns(trained_random, kind):
    """A conversion stage through train_stage with a row-wise rule: entries of earlier stages and rows no
    batch looked up stay bit-identical; the stage's own columns of looked-up rows move; the model's
    lookups give dense gradients again afterwards."""
    import copy

    from csmf_core.train import train_stage

    data, stage = trained_random["data"], 2
    model = copy.deepcopy(trained_random["model"])
    cfg = build_config({"model": {"dim": 16, "hidden": [32, 16]}}, [f"train.embedding_optimizer={kind}"])
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    rows = data.rows.for_stage(stage).select(torch.arange(40))  # 40 rows: some users never looked up
    out = trained_random["owners"].output_owners()
    log = train_stage(model, data.tables, rows, stage, cfg, output_owners=out)
    after = dict(model.named_parameters())
    owners = model.owners
    seen_users = torch.unique(data.tables.users_cat[rows.u, 0])
    uid = "user.emb." + model.user.spec.cat[0][0] + ".weight"
    assert model.user.spec.cat[0][0] == model.user.spec.id_feature
    for name, p in after.items():
        frozen = expand_to_param(owners[name] != stage, p)
        assert torch.equal(p.detach()[frozen], before[name][frozen]), f"{name}: frozen entries moved"
    untouched = torch.ones(after[uid].shape[0], dtype=torch.bool)
    untouched[seen_users] = False
    assert int(untouched.sum()) > 5 and torch.equal(after[uid].detach()[untouched], before[uid][untouched])
    own = owners[uid] == stage
    assert not torch.equal(after[uid].detach()[seen_users][:, own], before[uid][seen_users][:, own])
    assert not any(e.sparse for e in model.embedding_tables().values())
    assert log.state_bytes[uid] > 0


@pytest.mark.parametrize("n_rows", [7, 1000])
def test_row_grad_sums_repeated_lookups(n_rows):
    """row_grad of a behaviour-sequence lookup (embedding_bag, padding 0): one entry per distinct row,
    sorted, holding the sum of its lookups' gradients (a plain per-lookup sum here)."""
    from csmf_core.rowwise import row_grad

    g = torch.Generator().manual_seed(n_rows)
    w = torch.nn.Parameter(torch.randn(n_rows, D, generator=g))
    seq = torch.randint(0, n_rows, (64, 20), generator=g)  # many repeats (7 rows), few (1000)
    weights = torch.randn(64, D, generator=g)
    F.embedding_bag(seq, w, mode="sum", padding_idx=0, sparse=True).mul(weights).sum().backward()
    rows, vals = row_grad(w)
    sums: dict[int, list[float]] = {}
    for b, bag in enumerate(seq.tolist()):
        for i in bag:
            if i != 0:
                sums[i] = [a + float(x) for a, x in zip(sums.get(i, [0.0] * D), weights[b])]
    assert rows.tolist() == sorted(sums)
    torch.testing.assert_close(vals, torch.tensor([sums[r] for r in sorted(sums)]), rtol=1e-5, atol=1e-5)


def test_huge_pages_never_change_values_and_skip_small_or_unsupported(monkeypatch):
    from csmf_core import rowwise

    big = torch.randn(3 * 2**20)  # 12 MiB: whole 2 MiB pages inside
    before = big.clone()
    monkeypatch.setattr(rowwise, "HUGE_PAGE_MIN_BYTES", 2**20)
    rowwise.huge_pages(big, collapse=True)  # True where the kernel offers THP; a no-op elsewhere
    assert torch.equal(big, before)
    assert not rowwise.huge_pages(torch.randn(1000))  # below HUGE_PAGE_MIN_BYTES
    assert not rowwise.huge_pages(big[::2])  # not contiguous
    assert torch.equal(rowwise._zeros((2**19, 4), big), torch.zeros(2**19, 4))
    monkeypatch.setattr(rowwise, "_libc", False)  # no madvise here: silently nothing
    assert not rowwise.huge_pages(big)
    assert torch.equal(rowwise._zeros((2**19, 4), big), torch.zeros(2**19, 4))


def test_lazy_adam_on_huge_page_tables_matches_torch_sparse_adam(monkeypatch):
    """A table and state large enough for huge pages (threshold lowered): the same rows as torch's
    SparseAdam (lazy Adam; eps placed differently, hence the tolerance), other rows bit-identical."""
    from csmf_core import rowwise

    monkeypatch.setattr(rowwise, "HUGE_PAGE_MIN_BYTES", 2**20)
    n = 2**19  # 8 MiB of float32 at 4 columns
    cfg = build_config({}, ["train.embedding_optimizer=lazy_adam", "train.max_loss=1e30"])
    start = torch.randn(n, D, generator=torch.Generator().manual_seed(7))
    p, q = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    opt = Optimiser([p], 0.01, cfg, TrainLog("toy", 6, 1), masks=[None], row_wise=[True])
    ref = torch.optim.SparseAdam([q], lr=0.01)
    g = torch.Generator().manual_seed(8)
    touched = set()
    for k in range(6):
        ids = torch.randint(0, n, (300,), generator=g)
        ids[:50] = ids[50:100]  # repeated lookups
        touched.update(ids.tolist())
        opt.step(_loss(p, ids, True, k), 300)
        ref.zero_grad()
        _loss(q, ids, True, k).backward()
        ref.step()
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    other = torch.ones(n, dtype=torch.bool)
    other[list(touched)] = False
    assert torch.equal(p.detach()[other], start[other])


def test_auto_rule_by_table_size():
    """`train.embedding_optimizer: auto`: dense up to AUTO_SPARSE_MIN_ENTRIES table entries, lazy_adam
    above, dense with several processes; explicit rules pass through whatever the size."""
    from csmf_core.optim import AUTO_SPARSE_MIN_ENTRIES, embedding_rule

    assert build_config({}, []).train.embedding_optimizer == "auto"
    assert build_config({}, ["train.processes=2"]).train.processes == 2  # auto is allowed with DDP
    n = AUTO_SPARSE_MIN_ENTRIES
    assert embedding_rule("auto", n)[0] == "dense"
    assert embedding_rule("auto", n + 1)[0] == "lazy_adam"
    assert embedding_rule("auto", 10 * n, processes=2)[0] == "dense"
    assert embedding_rule("auto", 10 * n)[1].startswith("train.embedding_optimizer=auto -> lazy_adam")
    for rule in ("dense", "lazy_adam", "rowwise_adagrad"):
        assert embedding_rule(rule, 10 * n)[0] == rule and embedding_rule(rule, 1)[0] == rule
    # KuaiRand's tables (27,285 users, 7,583 items; id and two history tables of 32 columns, plus small
    # feature tables) and the generated worlds' are far below it: their runs keep dense Adam
    assert (27_285 + 3 * 7_583) * 32 < n


@pytest.mark.parametrize("threshold_above", [True, False])
def test_auto_trains_exactly_as_the_rule_it_resolves_to(trained_random, monkeypatch, threshold_above):
    """A conversion stage with `auto` is bit for bit the stage trained with the rule the table size
    selects (the threshold moved around this model's table size), and its log says which."""
    import copy

    from csmf_core import optim
    from csmf_core.train import train_stage

    data, stage = trained_random["data"], 2
    entries = sum(e.weight.numel() for e in trained_random["model"].embedding_tables().values())
    monkeypatch.setattr(optim, "AUTO_SPARSE_MIN_ENTRIES", entries - 1 if threshold_above else entries)
    want = "lazy_adam" if threshold_above else "dense"
    rows = data.rows.for_stage(stage).select(torch.arange(64))
    out = trained_random["owners"].output_owners()
    params = {}
    for kind in ("auto", want):
        model = copy.deepcopy(trained_random["model"])
        cfg = build_config({"model": {"dim": 16, "hidden": [32, 16]}}, [f"train.embedding_optimizer={kind}"])
        log = train_stage(model, data.tables, rows, stage, cfg, output_owners=out)
        assert log.embedding_rule == want
        assert log.summary()["sparse_embeddings"] == float(want != "dense")
        params[kind] = {k: v.detach().clone() for k, v in model.named_parameters()}
    for k, v in params[want].items():
        assert torch.equal(params["auto"][k], v), k
