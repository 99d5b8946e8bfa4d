"""Masks and checkpoints as data: round trips and validation on load."""

import json

import pytest
import torch

from csmf_core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from csmf_core.config import ModelConfig
from csmf_core.masks import MaskError, UnitOwners, load_masks, param_owners, save_masks
from csmf_core.model import TowerSpec, TwoTower


def test_mask_roundtrip_and_sidecar(trained_random, tmp_path):
    model, owners = trained_random["model"], trained_random["owners"]
    save_masks(tmp_path / "m", model, owners)
    meta = json.loads((tmp_path / "m" / "masks.json").read_text())
    assert meta["stages"] == ["exposure", "click", "conversion"]
    assert meta["granularity"] == "unit"
    back = load_masks(tmp_path / "m", model)
    for k in owners.units:
        assert torch.equal(back.units[k], owners.units[k])
    stored = torch.load(tmp_path / "m" / "masks.pt", weights_only=True)
    assert set(stored) == {n for n, _ in model.named_parameters()}
    assert all(v.dtype == torch.uint8 for v in stored.values())


def test_mask_validation_errors(trained_random, tmp_path):
    model, owners = trained_random["model"], trained_random["owners"]
    save_masks(tmp_path / "m", model, owners)
    meta = json.loads((tmp_path / "m" / "masks.json").read_text())
    meta["stages"] = ["a", "b"]
    (tmp_path / "m" / "masks.json").write_text(json.dumps(meta))
    with pytest.raises(MaskError, match="2 stages, the model has 3"):
        load_masks(tmp_path / "m", model)
    save_masks(tmp_path / "m", model, owners)
    meta = json.loads((tmp_path / "m" / "masks.json").read_text())
    meta["units"]["output"] = meta["units"]["output"][:-1]
    (tmp_path / "m" / "masks.json").write_text(json.dumps(meta))
    with pytest.raises(MaskError, match="unit group output has"):
        load_masks(tmp_path / "m", model)
    save_masks(tmp_path / "m", model, owners)
    stored = torch.load(tmp_path / "m" / "masks.pt", weights_only=True)
    stored["user.layers.0.bias"][0] = (stored["user.layers.0.bias"][0] + 1) % 3
    torch.save(stored, tmp_path / "m" / "masks.pt")
    with pytest.raises(MaskError, match="disagrees with the unit owners"):
        load_masks(tmp_path / "m", model)
    with pytest.raises(MaskError, match="missing masks.pt"):
        load_masks(tmp_path / "nowhere", model)


def test_checkpoint_roundtrip_is_exact(trained_random, tmp_path):
    model, owners = trained_random["model"], trained_random["owners"]
    save_checkpoint(tmp_path / "ck", model, owners, {"step": "finetune_conversion"})
    m2, o2, meta = load_checkpoint(tmp_path / "ck")
    assert meta == {"step": "finetune_conversion"}
    probe_u, probe_i = trained_random["probe"]
    with torch.no_grad():
        for t in range(3):
            a = model.user_vectors(probe_u, t) @ model.item_vectors(probe_i, t).T
            b = m2.user_vectors(probe_u, t) @ m2.item_vectors(probe_i, t).T
            assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match="missing model.pt"):
        load_checkpoint(tmp_path)


def test_a_damaged_checkpoint_is_a_checkpoint_error_naming_the_file(trained_random, tmp_path):
    """A truncated model.pt raised torch's RuntimeError, which the gate did not catch: a traceback
    instead of "champion kept (cannot be loaded)"; an unreadable checkpoint.json a bare JSON error."""
    save_checkpoint(tmp_path / "ck", trained_random["model"], trained_random["owners"], {})
    weights = tmp_path / "ck" / "model.pt"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(
        CheckpointError, match=r"ck/model.pt: cannot be read, the file is damaged or truncated"
    ):
        load_checkpoint(tmp_path / "ck")
    weights.write_bytes(b"")
    with pytest.raises(CheckpointError, match="model.pt: cannot be read"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "checkpoint.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="checkpoint.json: cannot be read"):
        load_checkpoint(tmp_path / "ck")


def test_n_stages_is_a_setting():
    us = TowerSpec(cat=(("uid", 5),), id_feature="uid")
    its = TowerSpec(cat=(("iid", 5),), id_feature="iid")
    for n in (2, 4):
        m = TwoTower(us, its, ModelConfig(dim=8, hidden=(8,)), n)
        own = UnitOwners.initial(m, tuple(f"o{k}" for k in range(n)))
        m.set_owners(param_owners(m, own))
        x = m.user_vectors(
            m.user.spec
            and __import__("csmf_core.model").model.TowerInputs(torch.tensor([[1]]), torch.zeros(1, 0)),
            n - 1,
        )
        assert x.shape == (1, 8)
    with pytest.raises(ValueError, match="at least 2"):
        TwoTower(us, its, ModelConfig(dim=8, hidden=(8,)), 1)


def test_a_dotted_feature_name_trains_and_round_trips(tmp_path):
    """torch refuses "." in a module name, so a categorical column "cat.level1" (common after flattening
    nested data) crashed every run at build_model. Its table is keyed "c_cat:level1" (MLflow metric
    names, built from parameter names, accept ":"); two names that would meet are refused."""
    from csmf_core.model import TowerInputs

    us = TowerSpec(cat=(("c_uid", 5),), id_feature="c_uid")
    its = TowerSpec(cat=(("c_iid", 5), ("c_cat.level1", 3)), id_feature="c_iid")
    m = TwoTower(us, its, ModelConfig(dim=8, hidden=(8,)), 2)
    assert "item.emb.c_cat:level1.weight" in dict(m.named_parameters())
    own = UnitOwners.initial(m, ("a", "b"))
    m.set_owners(param_owners(m, own))
    x = TowerInputs(torch.tensor([[1, 2], [3, 0]]), torch.zeros(2, 0))
    before = m.item_vectors(x, 1)
    save_checkpoint(tmp_path / "ck", m, own)
    back, _, _ = load_checkpoint(tmp_path / "ck")
    assert torch.equal(back.item_vectors(x, 1), before)
    clash = TowerSpec(cat=(("c_iid", 5), ("c_a.b", 3), ("c_a:b", 3)), id_feature="c_iid")
    with pytest.raises(ValueError, match="same module name twice"):
        TwoTower(us, clash, ModelConfig(dim=8, hidden=(8,)), 2)
