"""CPP and fixed-ratio pruning against values worked out by hand."""

import pytest
import torch

from csmf_core.config import ModelConfig
from csmf_core.cpp import cpp_count, prune_stage, select_pruned
from csmf_core.masks import NO_EDGE, UnitOwners, param_owners
from csmf_core.model import TowerSpec, TwoTower


def test_cpp_running_sum_boundary():
    # sorted info [1, 2, 3, 4]; running sums [1, 3, 6, 10]; total 10.
    info = torch.tensor([4.0, 1.0, 3.0, 2.0])
    # tau = 0.3 -> threshold 3.0: sums 1 and 3 are <= 3.0 (the boundary counts) -> 2 pruned
    assert cpp_count(info, 0.3) == 2
    # tau = 0.29 -> threshold 2.9: only the first running sum (1) -> 1 pruned
    assert cpp_count(info, 0.29) == 1
    # tau = 0.6 -> threshold 6.0: 1, 3, 6 -> 3 pruned
    assert cpp_count(info, 0.6) == 3
    idx = select_pruned(info, rule="cpp", tau=0.3, ratio=0.5, min_keep=1, min_free=1)
    # lowest information first: unit 1 (info 1) then unit 3 (info 2)
    assert idx.tolist() == [1, 3]


def test_cpp_is_share_of_mass_not_of_units():
    # one dominant unit: [10, 1, 1, 1, 1]; running sums of sorted [1,1,1,1,10] = [1,2,3,4,14]
    # tau 0.25 -> threshold 3.5: 3 units pruned although they are 60% of the units
    assert cpp_count(torch.tensor([10.0, 1, 1, 1, 1]), 0.25) == 3
    # uniform [1]*4: sums [1,2,3,4], tau 0.5 -> threshold 2 -> 2 pruned
    assert cpp_count(torch.ones(4), 0.5) == 2


def test_ties_are_broken_by_unit_index():
    idx = select_pruned(
        torch.tensor([2.0, 2.0, 2.0, 2.0]), rule="cpp", tau=0.5, ratio=0.5, min_keep=1, min_free=1
    )
    assert idx.tolist() == [0, 1]


def test_clamps_keep_and_free_at_least_one():
    # sums [1,2,3] on [1,1,1]; tau .99 -> threshold 2.97 -> 2 pruned; min_keep=2 -> only 1
    assert select_pruned(torch.ones(3), rule="cpp", tau=0.99, ratio=0.5, min_keep=2, min_free=1).numel() == 1
    # tau tiny -> 0 pruned -> raised to min_free=1 (the unit with least information)
    idx = select_pruned(
        torch.tensor([5.0, 0.5, 3.0]), rule="cpp", tau=0.01, ratio=0.5, min_keep=1, min_free=1
    )
    assert idx.tolist() == [1]
    # a single unit: keep it, free nothing
    assert select_pruned(torch.ones(1), rule="cpp", tau=0.9, ratio=0.5, min_keep=1, min_free=1).numel() == 0


def test_fixed_ratio_rule():
    info = torch.tensor([6.0, 1.0, 5.0, 2.0, 4.0, 3.0])
    # ratio 0.5 of 6 units -> 3 lowest: units 1 (1.0), 3 (2.0), 5 (3.0)
    assert select_pruned(info, rule="fixed", tau=0.75, ratio=0.5, min_keep=1, min_free=1).tolist() == [
        1,
        3,
        5,
    ]
    # ratio 0.34 -> round(2.04) = 2
    assert select_pruned(info, rule="fixed", tau=0.75, ratio=0.34, min_keep=1, min_free=1).tolist() == [1, 3]
    with pytest.raises(ValueError, match="unknown pruning rule"):
        select_pruned(info, rule="magnitude", tau=0.75, ratio=0.5, min_keep=1, min_free=1)


def _tiny_model():
    us = TowerSpec(cat=(("uid", 3),), n_num=0, id_feature="uid")
    its = TowerSpec(cat=(("iid", 3),), n_num=0, id_feature="iid")
    m = TwoTower(us, its, ModelConfig(dim=2, hidden=(4,), emb_dim=2, id_emb_dim=2), n_stages=2)
    own = UnitOwners.initial(m, ("exposure", "click"))
    m.set_owners(param_owners(m, own))
    return m, own


def test_prune_stage_on_a_hand_made_layer():
    m, own = _tiny_model()
    # user hidden layer 0: 4 units reading 2 embedding columns. Row sums of |w|: [0.2, 4, 0.6, 3]
    # sorted [0.2, 0.6, 3, 4] -> running [0.2, 0.8, 3.8, 7.8]; tau 0.5 -> threshold 3.9 -> 3 pruned:
    # units 0, 2 and 3 go to stage 1, unit 1 stays.
    with torch.no_grad():
        m.user.layers[0].weight.copy_(torch.tensor([[0.1, -0.1], [2.0, -2.0], [0.3, 0.3], [-1.5, 1.5]]))
        w_out_before = m.user.layers[1].weight.clone()
    new, stats = prune_stage(m, own, 0, rule="cpp", tau=0.5, min_keep=1, min_free=1, min_free_output=1)
    assert new.units["user.layers.0"].tolist() == [1, 0, 1, 1]
    assert own.units["user.layers.0"].tolist() == [0, 0, 0, 0]  # input not modified
    st = {s.group: s for s in stats}["user.layers.0"]
    assert (st.units_before, st.units_kept, st.units_freed) == (4, 1, 3)
    assert st.mass_total == pytest.approx(7.8)
    assert st.mass_share_pruned == pytest.approx(3.8 / 7.8)
    owners = param_owners(m, new)
    out_units = new.units["output"].tolist()
    w_own = owners["user.layers.1.weight"]
    for o in range(2):
        for i in range(4):
            inp = new.units["user.layers.0"][i]
            expected = out_units[o] if inp <= out_units[o] else NO_EDGE
            assert int(w_own[o, i]) == expected
            if expected == NO_EDGE:
                # edges from freed units into kept units are removed and held at zero
                assert float(m.user.layers[1].weight.detach()[o, i]) == 0.0
            else:
                assert float(m.user.layers[1].weight.detach()[o, i]) == float(w_out_before[o, i])
    # freed units' incoming weights and bias now belong to stage 1
    assert owners["user.layers.0.weight"][0].tolist() == [1, 1]
    assert owners["user.layers.0.bias"].tolist() == [1, 0, 1, 1]


def test_cannot_prune_the_last_stage():
    m, own = _tiny_model()
    with pytest.raises(ValueError, match="last stage"):
        prune_stage(m, own, 1)


def test_freed_init_zero_and_random():
    m, own = _tiny_model()
    new, _ = prune_stage(m, own, 0, tau=0.5, freed_init="zero")
    freed = (new.units["user.layers.0"] == 1).nonzero().flatten()
    assert torch.all(m.user.layers[0].weight[freed] == 0)
    m2, own2 = _tiny_model()
    before = m2.user.layers[0].weight.detach().clone()
    new2, _ = prune_stage(m2, own2, 0, tau=0.5, freed_init="random", seed=3)
    freed2 = (new2.units["user.layers.0"] == 1).nonzero().flatten()
    kept2 = (new2.units["user.layers.0"] == 0).nonzero().flatten()
    assert not torch.equal(m2.user.layers[0].weight[freed2], before[freed2])
    # kept units keep their surviving incoming edges; edges from freed inputs are now zero
    alive = param_owners(m2, new2)["user.layers.0.weight"][kept2] != NO_EDGE
    assert torch.equal(m2.user.layers[0].weight[kept2][alive], before[kept2][alive])
    assert torch.all(m2.user.layers[0].weight[kept2][~alive] == 0)
