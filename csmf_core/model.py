"""Two-tower retrieval model whose every unit has an owner stage.

Units are embedding columns, hidden units and output dimensions. A unit's incoming weights
and bias belong to the unit's owner; an edge a -> b exists only if owner(a) <= owner(b).
`forward(..., mode=t)` uses only parameter entries owned by stages <= t, so a unit owned by
stage s computes bit-identical values in every mode >= s, and the mode-t score is

    s_t(u, i) = sum over output dims d with owner(d) <= t of e_u[d] * v_i[d].

That identity is what makes single-vector fusion exact (csmf-method.md sections 3 and 5).
No normalisation mixes units (no LayerNorm / BatchNorm / L2 over the vector).

Ownership itself lives in `csmf_core.masks` as data; the model only applies it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from csmf_core.config import ModelConfig

NO_EDGE = 255  # owner of a removed edge (from a later-stage unit into an earlier-stage one)


def edge_owners(in_owners: torch.Tensor, out_owners: torch.Tensor) -> torch.Tensor:
    """(out, in) owner of every edge of a linear layer from its units' owners (unit-level ownership):
    the owner of the unit it feeds where the input's owner is lower or equal, NO_EDGE elsewhere."""
    return torch.where(
        in_owners[None, :] <= out_owners[:, None], out_owners[:, None].expand(-1, in_owners.numel()), NO_EDGE
    )


def _frozen_block(
    lin: nn.Linear, f_out: torch.Tensor, f_in: torch.Tensor, edge: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's frozen units' weights from frozen inputs (mode-masked by `edge`) and their biases,
    as `TwoTower.train_subnet` caches them and checks them at its end (new tensors)."""
    return lin.weight[f_out][:, f_in] * edge, lin.bias[f_out]


@dataclass
class LayerPlan:
    """One linear layer of a tower as stage t trains it (`TwoTower.train_subnet`): its frozen units
    F (owner < t), its trained units T (owner == t); units of later stages are zero in mode t and
    left out. The layer's input holds the previous layer's F units then its T units (layer 0: the
    input columns so ordered)."""

    f_out: torch.Tensor  # (nF,) indices of the frozen units
    t_out: torch.Tensor  # (nT,) indices of the trained units
    w_ff: torch.Tensor  # (nF, nF_in) the frozen units' weights from frozen inputs, mode-masked (constant)
    b_f: torch.Tensor  # (nF,) their biases (constant)
    flat_f: torch.Tensor  # (nT * nF_in,) flat indices of the trained units' weights from frozen inputs
    flat_t: torch.Tensor  # (nT * nT_in,) and from trained inputs
    f_in: torch.Tensor  # (nF_in,) the frozen inputs' indices, and the edge mask of w_ff (for the exit check)
    edge: torch.Tensor


@dataclass
class TowerPlan:
    f_in: torch.Tensor  # layer 0's frozen input columns
    t_in: torch.Tensor  # layer 0's trained input columns
    layers: list[LayerPlan]
    dim: int  # output dims


@dataclass(frozen=True)
class TowerSpec:
    """What one tower reads.

    cat: (feature name, cardinality) per categorical column, cardinality counting code 0.
    n_num: number of numeric columns.
    hist: names of behaviour sequences (user side; item indices, 0 = padding).
    n_items: vocabulary of the behaviour-sequence embeddings (items incl. row 0).
    id_feature: the categorical column that is the entity id (gets `id_emb_dim` columns).
    """

    cat: tuple[tuple[str, int], ...]
    n_num: int = 0
    hist: tuple[str, ...] = ()
    n_items: int = 0
    id_feature: str | None = None


@dataclass
class TowerInputs:
    """Batch inputs of one tower: cat (B, n_cat) int64, num (B, n_num) float32, hists [(B, L) int64]."""

    cat: torch.Tensor
    num: torch.Tensor
    hists: list[torch.Tensor] = field(default_factory=list)

    def to(self, device: torch.device | str) -> TowerInputs:
        return TowerInputs(self.cat.to(device), self.num.to(device), [h.to(device) for h in self.hists])


@dataclass(frozen=True)
class UnitGroup:
    """A set of units sharing one owner vector.

    name: group name, e.g. "user.layers.1" or "output".
    size: number of units.
    params: names of the parameters whose entries the units own (emb weight, or weight + bias).
    inputs: for a linear group, the groups feeding it, in concatenation order; the tower's
        numeric columns appear as ("num:<tower>", n) and are always owned by stage 0.
    kind: "emb" or "linear".
    """

    name: str
    size: int
    params: tuple[str, ...]
    inputs: tuple[str, ...] = ()
    kind: str = "linear"


def _init_linear(weight: torch.Tensor, bias: torch.Tensor, gen: torch.Generator) -> None:
    # nn.Linear's default ranges (uniform +-1/sqrt(fan_in)), drawn from an explicit generator so
    # that a model is reproducible from its config alone.
    bound = 1.0 / math.sqrt(weight.shape[1])
    with torch.no_grad():
        weight.uniform_(-bound, bound, generator=gen)
        bias.uniform_(-bound, bound, generator=gen)


def pooled_sum(
    seq: torch.Tensor, weight: torch.Tensor, sparse: bool, compact: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, d) sums of the rows of `weight` a (B, L) id sequence names, padding (id 0) left out, and
    (B,) the number of non-padding ids of each row.

    `embedding_bag(..., padding_idx=0)` takes a generic kernel on the CPU build pinned here that
    costs 2.0-2.6 ms for 512 x 20 ids of a 1,000,000-row table against 0.1-0.4 ms for the same sums
    without `padding_idx` (bench/bench_embeddings.py; its random access grows with the table). So
    the padding entries are dropped from the id list and each row becomes a bag of its own length:
    the same sums in the same order, bit for bit, and the same sparse gradient. Only a dense
    gradient would come out in another summation order (last bits differ), so a lookup that
    trains a table with a dense gradient (`train.embedding_optimizer: dense`, auto on small tables) keeps
    the padding_idx kernel; evaluation, serving and the row-wise optimisers take the fast one.

    `compact` (default: on the CPU only) chooses the dropping. On CUDA, `seq[keep]` is a boolean
    index whose size the host must read (a device-to-host synchronisation per sequence and pass),
    while the padding_idx kernel there is asynchronous: on CUDA every lookup takes it (evaluation,
    serving and the row-wise optimisers' sparse gradients; a dense-gradient lookup took it already)."""
    keep = seq > 0
    n = keep.sum(dim=1)
    if compact is None:
        compact = seq.device.type == "cpu"
    if not compact or (torch.is_grad_enabled() and weight.requires_grad and not sparse):
        return F.embedding_bag(seq, weight, mode="sum", padding_idx=0, sparse=sparse), n
    return F.embedding_bag(seq[keep], weight, torch.cumsum(n, 0) - n, mode="sum", sparse=sparse), n


def embed_inputs(
    x: TowerInputs,
    spec: TowerSpec,
    emb: nn.ModuleDict,
    hist: nn.ModuleDict,
    masks: dict[str, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """The input half of a tower: categorical embeddings, mean-pooled behaviour sequences and the
    numeric columns, concatenated -> (B, in_dim). `emb` / `hist`: a tower's embedding tables;
    `masks` as in `Tower.forward` (keys "emb.<name>.weight", "hist.<name>.weight"; None = no mask).
    Comparison methods that put their own networks on the features call it with no masks."""
    parts = []
    masks = masks or {}
    for k, (name, e) in enumerate(emb.items()):
        v = e(x.cat[:, k])
        m = masks.get(f"emb.{name}.weight")
        if m is not None:
            v = v * m
        parts.append(v)
    for k, (name, e) in enumerate(hist.items()):
        seq = x.hists[k]
        # mean over non-padding entries (id 0 is padding)
        pooled, n = pooled_sum(seq, e.weight, e.sparse)
        v = pooled / n.clamp_min(1).unsqueeze(1).to(pooled.dtype)
        m = masks.get(f"hist.{name}.weight")
        if m is not None:
            v = v * m
        parts.append(v)
    if spec.n_num:
        parts.append(x.num)
    return torch.cat(parts, dim=1)


def module_key(name: str) -> str:
    """A feature or objective name as a torch module key. torch refuses "." in one, and dotted
    column names are common after flattening nested data ("cat.level1"), so "." is written ":" (which
    MLflow metric names, built from parameter names, accept); every other name is its own key (the
    parameter names of existing checkpoints are unchanged)."""
    return name.replace(".", ":")


def _keyed(names: list[str], what: str) -> list[str]:
    keys = [module_key(n) for n in names]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{what} {names} give the same module name twice once '.' is written ':'")
    return keys


class Tower(nn.Module):
    """Embeddings (+ mean-pooled sequences) + numeric columns -> MLP -> (B, dim).

    Row 0 of the id feature's table (the unknown id: no training row has it) starts at zero, so an id
    coded 0 (unknown to the model, or an item without a training exposure: csmf_core/prep.py) is
    scored by its other features alone; the other rows start at N(0, 0.1)."""

    def __init__(self, spec: TowerSpec, cfg: ModelConfig, gen: torch.Generator):
        super().__init__()
        self.spec = spec
        self.emb = nn.ModuleDict()
        for (name, card), key in zip(spec.cat, _keyed([c for c, _ in spec.cat], "categorical features")):
            d = cfg.id_emb_dim if name == spec.id_feature else cfg.emb_dim
            e = nn.Embedding(int(card), d)
            with torch.no_grad():
                e.weight.normal_(0.0, 0.1, generator=gen)
                if name == spec.id_feature:
                    e.weight[0].zero_()
            self.emb[key] = e
        self.hist = nn.ModuleDict()
        for key in _keyed(list(spec.hist), "behaviour sequences"):
            e = nn.Embedding(int(spec.n_items), cfg.hist_emb_dim, padding_idx=0)
            with torch.no_grad():
                e.weight.normal_(0.0, 0.1, generator=gen)
                e.weight[0].zero_()
            self.hist[key] = e
        in_dim = sum(e.embedding_dim for e in self.emb.values())
        in_dim += sum(e.embedding_dim for e in self.hist.values()) + spec.n_num
        widths = [in_dim, *cfg.hidden, cfg.dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        for lin in self.layers:
            _init_linear(lin.weight, lin.bias, gen)

    def forward(self, x: TowerInputs, masks: dict[str, torch.Tensor | None] | None) -> torch.Tensor:
        """(B, ...) inputs -> (B, dim). `masks`: this tower's float 0/1 masks keyed by local param
        name; a None entry means every entry is used (multiplying by ones is skipped, same values)."""
        masks = masks or {}
        h = embed_inputs(x, self.spec, self.emb, self.hist, masks)
        last = len(self.layers) - 1
        for k, lin in enumerate(self.layers):
            w, b = lin.weight, lin.bias
            mw, mb = masks.get(f"layers.{k}.weight"), masks.get(f"layers.{k}.bias")
            h = F.linear(h, w if mw is None else w * mw, b if mb is None else b * mb)
            if k < last:
                h = F.relu(h)
        return h

    def forward_subnet(self, x: TowerInputs, plan: TowerPlan) -> torch.Tensor:
        """`forward` in mode t while stage t trains (`TwoTower.train_subnet`): the same vectors up to
        float rounding, with autograd through the stage's own units only. A unit of an earlier stage
        reads units of earlier stages only (edges run from lower to higher owners), all frozen while t
        trains: the frozen units are computed without autograd from their cached weights, and the
        backward's matmuls cover the trained units' rows (nT of each layer's units) instead of every
        unit. Later stages' units are zero in mode t and are not computed."""
        h0 = embed_inputs(x, self.spec, self.emb, self.hist)  # columns of later stages are not read
        with torch.no_grad():
            hf = h0.index_select(1, plan.f_in)
        ht = h0.index_select(1, plan.t_in)
        last = len(self.layers) - 1
        for k, (lin, lp) in enumerate(zip(self.layers, plan.layers)):
            with torch.no_grad():
                yf = torch.addmm(lp.b_f, hf, lp.w_ff.T)
            n_t, w = lp.t_out.numel(), lin.weight.view(-1)
            w_tf = w.index_select(0, lp.flat_f).view(n_t, hf.shape[1])
            w_tt = w.index_select(0, lp.flat_t).view(n_t, ht.shape[1])
            # the trained units read frozen inputs (a constant: their backward is the weights' only)
            # and trained ones; two addmms, no concatenation
            yt = torch.addmm(torch.addmm(lin.bias.index_select(0, lp.t_out), hf, w_tf.T), ht, w_tt.T)
            if k < last:
                yf, yt = yf.relu_(), F.relu(yt)
            hf, ht = yf, yt
        out = yt.new_zeros(yt.shape[0], plan.dim)
        out[:, plan.layers[-1].f_out] = yf
        return out.index_copy(1, plan.layers[-1].t_out, yt)

    def unit_groups(self, prefix: str) -> list[UnitGroup]:
        groups = []
        first_inputs = []
        for name, e in self.emb.items():
            g = f"{prefix}.emb.{name}"
            groups.append(UnitGroup(g, e.embedding_dim, (f"{g}.weight",), kind="emb"))
            first_inputs.append(g)
        for name, e in self.hist.items():
            g = f"{prefix}.hist.{name}"
            groups.append(UnitGroup(g, e.embedding_dim, (f"{g}.weight",), kind="emb"))
            first_inputs.append(g)
        if self.spec.n_num:
            first_inputs.append(f"num:{prefix}:{self.spec.n_num}")
        prev: tuple[str, ...] = tuple(first_inputs)
        for k, lin in enumerate(self.layers):
            g = f"{prefix}.layers.{k}"
            groups.append(UnitGroup(g, lin.out_features, (f"{g}.weight", f"{g}.bias"), prev))
            prev = (g,)
        return groups


class TwoTower(nn.Module):
    """User and item towers with inner-product score and per-unit stage ownership.

    `set_owners(owners)` installs the per-parameter owner tensors (see `csmf_core.masks`);
    until then every entry is used (a plain two-tower model, useful as a reference).
    """

    def __init__(self, user_spec: TowerSpec, item_spec: TowerSpec, cfg: ModelConfig, n_stages: int):
        super().__init__()
        if n_stages < 2:
            raise ValueError(f"CSMF needs at least 2 cascaded objectives, got n_stages={n_stages}")
        gen = torch.Generator().manual_seed(cfg.init_seed)
        self.cfg = cfg
        self.n_stages = n_stages
        self.user = Tower(user_spec, cfg, gen)
        self.item = Tower(item_spec, cfg, gen)
        self._owners: dict[str, torch.Tensor] | None = None
        self._mode_masks: dict[int, dict[str, dict[str, torch.Tensor | None]]] = {}
        self._unmasked: tuple[int, dict[str, dict[str, torch.Tensor | None]]] | None = None
        self._subnet: tuple[int, dict[str, TowerPlan]] | None = None

    # -- ownership -------------------------------------------------------------------------
    def unit_groups(self) -> list[UnitGroup]:
        """Every unit group; the two output layers are one tied group "output" (same owners)."""
        groups = self.user.unit_groups("user") + self.item.unit_groups("item")
        out_u, out_i = f"user.layers.{len(self.user.layers) - 1}", f"item.layers.{len(self.item.layers) - 1}"
        return [g for g in groups if g.name not in (out_u, out_i)] + [
            UnitGroup("output", self.cfg.dim, (), kind="output")
        ]

    def output_layers(self) -> tuple[str, str]:
        return f"user.layers.{len(self.user.layers) - 1}", f"item.layers.{len(self.item.layers) - 1}"

    def set_owners(self, owners: dict[str, torch.Tensor] | None) -> None:
        """Install per-parameter owner tensors (uint8; 255 = no edge). Clears cached mode masks."""
        if owners is not None:
            params = dict(self.named_parameters())
            for name in owners:
                if name not in params:
                    raise KeyError(f"owner tensor for unknown parameter {name!r}")
            missing = sorted(set(params) - set(owners))
            if missing:
                raise KeyError(f"no owner tensor for parameter(s) {missing}: every parameter needs one")
        self._owners = owners
        self._mode_masks.clear()
        self._unmasked = None
        self._subnet = None

    @property
    def owners(self) -> dict[str, torch.Tensor] | None:
        return self._owners

    def _apply(self, fn, recurse=True):
        """`.to()`, `.cuda()`, `.cpu()`, `.float()`... go through here: the cached mode masks were made
        on the old device and in the old dtype, so they are dropped and remade on first use (a model
        trained on the CPU, then moved to a GPU, failed at its first masked forward before)."""
        out = super()._apply(fn, recurse)
        self._mode_masks.clear()
        self._unmasked = None
        self._subnet = None  # its cached weights and indices too (a move inside train_subnet)
        return out

    def _masks_for(self, mode: int) -> dict[str, dict[str, torch.Tensor | None]] | None:
        """Per tower, the float 0/1 mask of the entries mode `mode` uses (None: all of them)."""
        if self._owners is None:
            return None
        if self._unmasked is not None and self._unmasked[0] == mode:
            return self._unmasked[1]
        if mode not in self._mode_masks:
            dev = next(self.parameters()).device
            split: dict[str, dict[str, torch.Tensor | None]] = {"user": {}, "item": {}}
            for name, o in self._owners.items():
                tower, local = name.split(".", 1)
                used = o.long() <= mode  # where the owners are: the all() check reads no device memory
                split[tower][local] = None if bool(used.all()) else used.to(device=dev, dtype=torch.float32)
            self._mode_masks[mode] = split
        return self._mode_masks[mode]

    @contextmanager
    def zero_held_unmasked(self, mode: int) -> Iterator[list[str]]:
        """Within: forward passes in `mode` do not multiply a weight by its mode mask when every entry
        the mask removes is a removed edge (NO_EDGE) whose value is exactly zero, checked here once.
        W * mask and W are then the same values, and so are the outputs and the input gradients; the
        weight's own gradient differs only on those entries, which the caller must keep out of every
        update inside the block (a stage's gradient masks do: they hold owner == stage, never NO_EDGE,
        so the entries stay exactly zero: csmf_core.train.train_stage). A mask that removes entries
        owned by a later stage (accuracy recovery, evaluation of earlier modes) is kept.
        Yields the names of the parameters left unmasked. Saves one multiply per weight in the
        forward and one in the backward of every step (bench/bench_train_step.py)."""
        base = self._masks_for(self._check_mode(mode))
        if base is None:
            yield []
            return
        params = dict(self.named_parameters())
        split: dict[str, dict[str, torch.Tensor | None]] = {t: dict(m) for t, m in base.items()}
        skipped = []
        with torch.no_grad():
            for tower, masks in split.items():
                for local, m in masks.items():
                    name = f"{tower}.{local}"
                    if m is None or self._owners[name].dim() != 2:
                        continue
                    owner = self._owners[name].to(m.device)
                    removed = owner > mode
                    if bool((owner[removed] == NO_EDGE).all()) and not bool(params[name][removed].any()):
                        masks[local] = None
                        skipped.append(name)
        previous, self._unmasked = self._unmasked, (int(mode), split)
        try:
            yield skipped
        finally:
            self._unmasked = previous

    @contextmanager
    def train_subnet(self, stage: int) -> Iterator[None]:
        """Within: forward passes in mode `stage` with autograd on and the model in training mode go
        through `Tower.forward_subnet`: the units of earlier stages without autograd, from weights
        cached here once (frozen while `stage` trains: its gradient masks keep them out of every
        update, csmf_core.train.train_stage), the stage's own units with it, later stages' units left
        out. The same loss and the same gradient on every entry the stage trains, up to float
        rounding; the backward costs the stage's share of the units (`train.split_scores`)."""
        stage = self._check_mode(stage)
        if self._owners is None:
            raise RuntimeError("train_subnet needs owner tensors (model.set_owners)")
        plans = {name: self._tower_plan(name, stage) for name in ("user", "item")}
        previous, self._subnet = self._subnet, (stage, plans)
        try:
            yield
        except BaseException:
            self._subnet = previous
            raise
        dropped = self._subnet is None or self._subnet[1] is not plans  # new owners, or a move
        self._subnet = previous
        if not dropped:
            self._check_plans_current(stage, plans)

    def _check_plans_current(self, stage: int, plans: dict[str, TowerPlan]) -> None:
        """The cached frozen weights still equal the model's: a write to frozen units inside the block
        (a load_state_dict, a copy_) would have trained against a stale copy."""
        with torch.no_grad():
            for name, plan in plans.items():
                for k, (lin, lp) in enumerate(zip(getattr(self, name).layers, plan.layers)):
                    w, b = _frozen_block(lin, lp.f_out, lp.f_in, lp.edge)
                    if not (torch.equal(w, lp.w_ff) and torch.equal(b, lp.b_f)):
                        raise RuntimeError(
                            f"train_subnet({stage}): the weights of frozen units of {name}.layers.{k} "
                            "changed inside the block, whose steps used the copy cached at its start"
                        )

    def subnet_cost(self, stage: int) -> float:
        """Multiply-adds per row of the towers' linear layers when stage `stage` trains under
        `train_subnet`, as a share of the masked forward and backward (3 x every weight): the frozen
        units' forward from frozen inputs, the trained units' forward from every active input, their
        weights' gradients, and the input gradient among trained units only. 1.0 without owners."""
        if self._owners is None:
            return 1.0
        sub = full = 0
        for name in ("user", "item"):
            tower: Tower = getattr(self, name)
            n_f, n_t = tower.layers[0].in_features, 0  # layer 0's inputs: counted as frozen (cheap side)
            for k, lin in enumerate(tower.layers):
                o = self._owners[f"{name}.layers.{k}.bias"].long()
                f, t = int((o < stage).sum()), int((o == stage).sum())
                sub += n_f * f + 2 * (n_f + n_t) * t + n_t * t
                full += 3 * lin.in_features * lin.out_features
                n_f, n_t = f, t
        return sub / max(full, 1)

    def _tower_plan(self, name: str, stage: int) -> TowerPlan:
        tower: Tower = getattr(self, name)
        own = self._owners
        dev = next(self.parameters()).device
        cols = [own[f"{name}.emb.{k}.weight"].flatten() for k in tower.emb]
        cols += [own[f"{name}.hist.{k}.weight"].flatten() for k in tower.hist]
        cols.append(torch.zeros(tower.spec.n_num, dtype=torch.uint8))  # numeric columns: stage 0's
        in_own = torch.cat([c.to("cpu", torch.long) for c in cols])
        f_in, t_in = torch.nonzero(in_own < stage).flatten(), torch.nonzero(in_own == stage).flatten()
        plan = TowerPlan(f_in.to(dev), t_in.to(dev), [], tower.layers[-1].out_features)
        for k, lin in enumerate(tower.layers):
            out_own = own[f"{name}.layers.{k}.bias"].to("cpu", torch.long)
            f_out, t_out = torch.nonzero(out_own < stage).flatten(), torch.nonzero(out_own == stage).flatten()
            w_own = own[f"{name}.layers.{k}.weight"].to("cpu", torch.long)
            # the sub-network reading needs unit-level ownership (csmf_core.masks.param_owners): an edge
            # belongs to the unit it feeds, and runs only from lower or equal owners
            unit_level = edge_owners(in_own, out_own)
            if not torch.equal(w_own, unit_level):
                raise ValueError(
                    f"train_subnet: {name}.layers.{k}.weight has owners that are not its units' "
                    f"({int((w_own != unit_level).sum())} entries differ): the sub-network needs unit-level ownership"
                )
            flat_f = (t_out[:, None] * lin.in_features + f_in[None, :]).flatten()
            flat_t = (t_out[:, None] * lin.in_features + t_in[None, :]).flatten()
            f_out_d, f_in_d = f_out.to(dev), f_in.to(dev)
            edge = (w_own[f_out][:, f_in] != NO_EDGE).to(dev, lin.weight.dtype)
            with torch.no_grad():
                w_ff, b_f = _frozen_block(lin, f_out_d, f_in_d, edge)
            plan.layers.append(
                LayerPlan(f_out_d, t_out.to(dev), w_ff, b_f, flat_f.to(dev), flat_t.to(dev), f_in_d, edge)
            )
            f_in, t_in, in_own = f_out, t_out, out_own
        return plan

    def _tower_forward(self, name: str, x: TowerInputs, mode: int | None) -> torch.Tensor:
        mode = self._check_mode(mode)
        tower: Tower = getattr(self, name)
        if self._subnet is not None and self._subnet[0] == mode and self.training and torch.is_grad_enabled():
            return tower.forward_subnet(x, self._subnet[1][name])
        m = self._masks_for(mode)
        return tower(x, None if m is None else m[name])

    def _check_mode(self, mode: int | None) -> int:
        mode = self.n_stages - 1 if mode is None else int(mode)
        if not 0 <= mode < self.n_stages:
            raise ValueError(f"mode must be in [0, {self.n_stages - 1}], got {mode}")
        return mode

    def embedding_tables(self) -> dict[str, nn.Embedding]:
        """Every embedding table by its weight's parameter name ("user.emb.uid.weight", ...)."""
        out = {}
        for tower_name, tower in (("user", self.user), ("item", self.item)):
            for kind in ("emb", "hist"):
                for name, e in getattr(tower, kind).items():
                    out[f"{tower_name}.{kind}.{name}.weight"] = e
        return out

    def sparse_embeddings(self, on: bool) -> None:
        """Lookups give sparse row gradients (on) or dense full-table ones (off, the default).
        Values are the same either way; only the gradient's layout changes (csmf_core/rowwise.py)."""
        for e in self.embedding_tables().values():
            e.sparse = bool(on)

    # -- forward ---------------------------------------------------------------------------
    def user_vectors(self, x: TowerInputs, mode: int | None = None) -> torch.Tensor:
        """(B, dim) user vectors in `mode` (default: full mode)."""
        return self._tower_forward("user", x, mode)

    def item_vectors(self, x: TowerInputs, mode: int | None = None) -> torch.Tensor:
        """(B, dim) item vectors in `mode` (default: full mode, the vectors that are indexed)."""
        return self._tower_forward("item", x, mode)

    def score(self, u: TowerInputs, i: TowerInputs, mode: int | None = None) -> torch.Tensor:
        """(B,) scores of paired rows in `mode`."""
        return (self.user_vectors(u, mode) * self.item_vectors(i, mode)).sum(dim=1)
