"""Benchmark 1 (training step): a CSMF stage against the same architecture with no masks and plain softmax.

How to run:  .venv/bin/python bench/bench_train_step.py [--rows 16384] [--rounds 15] [--profile] [--quick]
             [--device cpu|cuda]

CSMF arm: `csmf_core.train.train_stage` itself, one epoch of a late stage (click = 1, conversion = 2)
after real CPP pruning of the earlier stages, so the gradient masks, per-mode weight masks, log-Q and
AML margins (upstream segment scores) all run. Reference arm: the same `TwoTower` with no owner tensors
(no masks), Adam over every parameter, the same batches and item-tower de-duplication, and a plain
in-batch softmax (cross-entropy on u @ v.T). Both arms train on the same in-memory rows of the generated
`small` world (every row relabelled as a positive of the stage, so the stage sees `--rows` rows).
Arms alternate; the figure is the median of per-round ratios (15 rounds of ~0.35 s: single rounds on the
2-core VM range from 0.65 to 1.08, and medians of 5 from 0.72 to 0.91). Target (issue 18): samples/s ratio >= 0.85.
Two more CSMF arms, each a ratio against the CSMF arm: `train.deterministic=false` and
`train.split_scores=false` (the in-batch score matmul differentiated over every output dim, as before
2026-12-04).

FLOP/s: FLOPs per sample counted by torch.utils.flop_counter over a few steps of each arm (matmuls,
the work that scales), times the measured samples/s, as a share of the machine's matmul rate
(1024 x 1024 float32, measured in the same process).

`--device cuda` runs both arms (model, feature tables, batches) and the matmul rate on the GPU, with
torch.cuda.synchronize() after every timed call (bench/gpu_check.sh runs it so).
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

try:
    from bench import benchlib
except ImportError:  # run as `python bench/bench_train_step.py`
    import benchlib  # type: ignore[no-redef]

from csmf_core.allocator import tune_allocator
from csmf_core.cascade import load_cascade_data
from csmf_core.config import CSMFConfig, build_config
from csmf_core.losses import item_log_q
from csmf_core.model import TwoTower
from csmf_core.optim import adam
from csmf_core.rows import FeatureTables, TrainRows
from csmf_core.train import train_stage

ROUNDS = 15  # interleaved rounds: single ~0.35-s rounds on the 2-core VM spread 0.65-1.08 (docstring)


def stage_rows(rows: TrainRows, stage: int, n: int) -> TrainRows:
    """The first n rows, every one a positive of `stage` (throughput does not depend on the labels)."""
    sub = rows.select(torch.arange(min(n, len(rows))))
    return dataclasses.replace(sub, level=torch.full_like(sub.level, stage))


def reference_epoch(model: TwoTower, opt, tables: FeatureTables, rows: TrainRows, bs: int, seed: int) -> int:
    """One epoch of the plain two-tower step; returns the number of steps."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(rows), generator=gen)
    steps = 0
    dev = next(model.parameters()).device  # batches go where the model is, as train_stage's do
    model.train()
    for start in range(0, len(rows) - 1, bs):
        b = rows.select(perm[start : start + bs])
        uvec = model.user_vectors(tables.user_inputs(b.u.to(dev), [h.to(dev) for h in b.hists]))
        uniq, inv = torch.unique(b.i.to(dev), return_inverse=True)
        ivec = model.item_vectors(tables.item_inputs(uniq))[inv]
        scores = uvec @ ivec.T
        loss = F.cross_entropy(scores, torch.arange(len(b.u), device=scores.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
    return steps


def count_flops(fn) -> float:
    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def setup(cfg: CSMFConfig, data_overrides: dict, device: str = "cpu"):
    """Generated data, a CSMF model pruned through stage 1, and an unmasked copy of the architecture,
    all on `device` (pruned on the CPU, then moved)."""
    ds, dates, _ = benchlib.synth_dataset(data_overrides.pop("name"), **data_overrides)
    mr, _ = benchlib.model_ready(ds, dates, ds.name)
    data = load_cascade_data(mr)
    model, owners = benchlib.pruned_model(data, cfg)  # late stages train under the cascade's owners
    ref = TwoTower(data.user_spec, data.item_spec, cfg.model, len(data.objectives))
    data.tables = data.tables.to(device)
    return data, model.to(device), owners, ref.to(device)


def finetune_model(data, cfg: CSMFConfig, device: str = "cpu"):
    """The model as stage 1's fine-tuning trains it: only stage 0 pruned (stage 1 owns every freed
    unit; after the second pruning, the owners `setup` gives, are those of stage 1's recovery)."""
    model, owners = benchlib.pruned_model(data, cfg, prunings=1)
    return model.to(device), owners


def run(
    rows: int = 16384,
    rounds: int = ROUNDS,
    stages: tuple[int, ...] = (1, 2),
    profile: bool = False,
    write: bool = True,
    threads: int | None = None,
    data: dict | None = None,
    device: str = "cpu",
) -> list[dict]:
    n_threads = benchlib.set_threads(threads)
    tune_allocator()  # as every training loop does (csmf_core.optim.run_epochs): both arms run under it
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    cfg = build_config(None, ["train.epochs=[1,1,1]"])  # train.deterministic: the default, on
    cfg_nondet = build_config(None, ["train.epochs=[1,1,1]", "train.deterministic=false"])
    cfg_unsplit = build_config(None, ["train.epochs=[1,1,1]", "train.split_scores=false"])
    bs = cfg.train.batch_size
    rec = benchlib.Recorder(
        "train_step", {"batch_size": bs, "rows": rows, "threads": n_threads, "device": device}, write=write
    )
    data_kw = dict(data or {"name": "small"})
    cd, model, owners, ref = setup(cfg, data_kw, device)
    opt = adam(ref.parameters(), cfg.train.lr)  # the optimizer train_stage uses (fused when available)
    peak = benchlib.matmul_gflops(device=device)
    out = owners.output_owners()  # fixed once stage 1 is pruned
    rec.add("matmul rate (1024x1024 float32)", peak, "GFLOP/s")
    arms_at = [(stage, model, out, "") for stage in stages]
    if 1 in stages:  # stage 1 as its fine-tuning trains it (the `stages` arm: as its recovery does)
        ft_model, ft_owners = finetune_model(cd, cfg, device)
        arms_at.insert(stages.index(1) + 1, (1, ft_model, ft_owners.output_owners(), " fine-tuning"))
    for stage, arm_model, arm_out, what in arms_at:
        data = stage_rows(cd.rows, stage, rows)
        log_q = item_log_q(torch.as_tensor(cd.counts[stage]))

        def csmf(d=data, s=stage, lq=log_q, mo=arm_model, oo=arm_out):
            train_stage(mo, cd.tables, d, s, cfg, log_q=lq, output_owners=oo)
            sync()

        def csmf_nondet(d=data, s=stage, lq=log_q, mo=arm_model, oo=arm_out):
            train_stage(mo, cd.tables, d, s, cfg_nondet, log_q=lq, output_owners=oo)
            sync()

        def csmf_unsplit(d=data, s=stage, lq=log_q, mo=arm_model, oo=arm_out):
            train_stage(mo, cd.tables, d, s, cfg_unsplit, log_q=lq, output_owners=oo)
            sync()

        def plain(d=data):
            reference_epoch(ref, opt, cd.tables, d, bs, seed=0)
            sync()

        csmf(), csmf_nondet(), csmf_unsplit(), plain()  # warm-up (allocator, mask caches)
        arms = {"csmf": csmf, "csmf_nondet": csmf_nondet, "csmf_unsplit": csmf_unsplit, "plain": plain}
        t = benchlib.interleaved(arms, rounds)
        sps = {a: len(data) / benchlib.median(t[a]) for a in t}
        name = cd.objectives[stage]
        p = {
            "stage": stage,
            "stage_name": name,
            "rounds": rounds,
            "owners": what.strip() or "after every pruning",
        }
        rec.add(
            f"samples/s ratio csmf/plain, stage {stage}{what} ({name})",
            benchlib.paired_ratio(t["plain"], t["csmf"]),
            "x",
            ">= 0.85",
            **p,
        )
        rec.add(
            f"samples/s ratio deterministic/non-deterministic kernels (train.deterministic), stage {stage}{what}",
            benchlib.paired_ratio(t["csmf_nondet"], t["csmf"]),
            "x",
            **p,
        )
        rec.add(
            f"samples/s ratio split/one-matmul scores (train.split_scores), stage {stage}{what}",
            benchlib.paired_ratio(t["csmf_unsplit"], t["csmf"]),
            "x",
            **p,
        )
        few = stage_rows(cd.rows, stage, 4 * bs)
        fl = {
            "csmf": count_flops(lambda f=few: csmf(d=f)),
            "plain": count_flops(lambda f=few: reference_epoch(ref, opt, cd.tables, f, bs, seed=0)),
        }  # fmt: skip
        for arm in ("csmf", "plain"):
            rec.add(f"{arm} samples/s, stage {stage}{what}", sps[arm], "samples/s", **p)
            gflops = fl[arm] / len(few) * sps[arm] / 1e9
            rec.add(f"{arm} achieved GFLOP/s, stage {stage}{what}", gflops, "GFLOP/s", **p)
            rec.add(f"{arm} share of matmul rate, stage {stage}{what}", gflops / peak, "", **p)
        if profile:
            print_profile(csmf, f"csmf stage {stage}{what}")
            print_profile(lambda d=data: reference_epoch(ref, opt, cd.tables, d, bs, seed=0), "plain")
    return rec.flush()


def print_profile(fn, title: str, rows: int = 15) -> None:
    """torch.profiler table of one call, top ops by self CPU time; with CUDA present its kernels are
    recorded too (the table gains the device-time columns), so an op's host time can be told apart
    from the device work it waits for (the first H200 profile had CPU activity only)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        fn()
    print(f"== profile: {title}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=16384, help="rows per epoch (per round and arm)")
    p.add_argument("--rounds", type=int, default=ROUNDS)
    p.add_argument("--profile", action="store_true", help="print torch.profiler tables of both arms")
    p.add_argument("--quick", action="store_true", help="tiny world, few rows (smoke test)")
    p.add_argument("--no-write", action="store_true", help="do not append to bench/results/")
    p.add_argument("--device", default="cpu", help="cpu or cuda (both arms and the matmul rate)")
    a = p.parse_args(argv)
    if a.quick:
        tiny = {"name": "tiny", "n_users": 300, "n_items": 200, "n_days": 6, "requests_per_day": 340}
        return run(
            rows=1024,
            rounds=2,
            stages=(2,),
            profile=a.profile,
            write=not a.no_write,
            data=tiny,
            device=a.device,
        )
    return run(rows=a.rows, rounds=a.rounds, profile=a.profile, write=not a.no_write, device=a.device)


if __name__ == "__main__":
    main()
