"""Multi-process (DDP) training of one cascade step under torchrun: the worker and its launcher.

How to run (what the Prefect task does when `train.processes > 1`; docs/distributed.md for
several machines):

    torchrun --standalone --nproc-per-node 2 -m csmf_core.distributed \\
        --model-ready MR_DIR --checkpoint-in CKPT_IN --out OUT_DIR \\
        --config CONFIG.yaml --step '{"name": "finetune_click", "kind": "train", "stage": 1}'

Every rank loads the checkpoint and the feature tables, joins the process group (gloo on CPU, NCCL
on CUDA; `train.dist_backend`), and runs `csmf_core.cascade.run_step` on its shard of the train
rows (`csmf_core.train` broadcasts rank 0's parameters, all-reduces gradients before the stage's
mask, and keeps every rank's parameters bit-identical). At the end the ranks compare a digest of
their parameters (a mismatch fails the step), and rank 0 alone writes `OUT/checkpoint`,
`OUT/report.json` and prints progress lines; nothing else logs (MLflow is the caller's business:
`run_step_distributed` turns rank 0's lines into `on_step` calls). A diverged loss is written to
`OUT/error.json` and re-raised by the launcher as `TrainingDiverged`. Every rank's output is kept in
torchrun's log directory (`WORKDIR/logs-*/<run>/attempt_0/<rank>/`), and a failure quotes each rank's
stderr. A non-zero exit after rank 0 wrote the agreed result (a rank aborting in gloo's teardown, seen
once in CI) keeps the result and logs the exit (`step_completed`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from csmf_core.cascade import Step, StepReport, apply_threads, load_cascade_data, run_step
from csmf_core.checkpoint import load_checkpoint, save_checkpoint
from csmf_core.config import CSMFConfig, build_config
from csmf_core.masks import UnitOwners
from csmf_core.model import TwoTower
from csmf_core.optim import TrainingDiverged

LOSS_TAG = "csmf-loss"  # rank 0 prints "csmf-loss <step> <loss>" after every optimizer step


def resolve_backend(want: str, device: str) -> str:
    """'auto' -> NCCL for CUDA, gloo otherwise; NCCL without CUDA is refused with the fix."""
    if want == "auto":
        return "nccl" if device.startswith("cuda") else "gloo"
    if want == "nccl" and not device.startswith("cuda"):
        raise ValueError(
            "train.dist_backend=nccl needs CUDA (train.device cuda/auto on a GPU machine); use gloo"
        )
    return want


def params_digest(model: TwoTower) -> str:
    """sha256 of every parameter and buffer's bytes (identical across ranks, or the step fails)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _device(cfg: CSMFConfig, local_rank: int) -> str:
    want = cfg.train.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        return f"cuda:{local_rank}"
    return "cpu"


def worker(args: argparse.Namespace) -> int:
    """One rank (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)."""
    import torch.distributed as dist

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cfg = build_config(yaml.safe_load(Path(args.config).read_text()) or {})
    step = Step(**json.loads(args.step))
    device = _device(cfg, local_rank)
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
    apply_threads(cfg)
    backend = resolve_backend(cfg.train.dist_backend, device)
    dist.init_process_group(backend, rank=rank, world_size=world)
    out = Path(args.out)
    try:
        data = load_cascade_data(
            args.model_ready,
            loader=cfg.train.loader,
            shuffle_window=cfg.train.shuffle_window,
            rank=rank,
            world_size=world,
            item_stats_windows=cfg.data.item_stats,
        )
        data.tables = data.tables.to(device)
        model, owners, _ = load_checkpoint(args.checkpoint_in, device=device)

        def on_step(k: int, loss: float) -> None:
            if rank == 0:
                print(f"{LOSS_TAG} {k} {loss!r}", flush=True)

        try:
            owners, report = run_step(step, model, owners, data, cfg, on_step=on_step)
        except TrainingDiverged as e:  # every rank sees the same all-reduced loss
            if rank == 0:
                (out / "error.json").write_text(json.dumps({"type": "TrainingDiverged", "message": str(e)}))
            raise
        digests: list[str | None] = [None] * world
        dist.all_gather_object(digests, params_digest(model))
        if len(set(digests)) != 1:
            raise RuntimeError(f"{step.name}: parameters differ across ranks after training: {digests}")
        if rank == 0:
            save_checkpoint(out / "checkpoint", model, owners, meta={"step": step.name, "world_size": world})
            info = {
                "info": report.info,
                "losses": report.losses,
                "world_size": world,
                "backend": backend,
                "device": device,
                "params_digest": digests[0],
            }
            tmp = out / "report.json.tmp"
            tmp.write_text(json.dumps(info, default=str))
            tmp.replace(out / "report.json")  # the report exists only once the checkpoint is whole
            print(f"{step.name}: {world} processes ({backend}, {device}) done: {report.info}", flush=True)
        dist.barrier()  # no rank tears down while another still writes or talks
    finally:
        dist.destroy_process_group()
    return 0


def run_step_distributed(
    step: Step,
    model: TwoTower,
    owners: UnitOwners,
    model_ready: str | Path,
    cfg: CSMFConfig,
    workdir: str | Path,
    *,
    on_step: Callable[[int, float], None] | None = None,
    log: Callable[[str], None] = print,
    timeout_s: float | None = None,
) -> tuple[UnitOwners, StepReport]:
    """Run `step` with `cfg.train.processes` local processes under torchrun; update `model` in place.

    Same contract as `csmf_core.cascade.run_step`. Rank 0's progress lines go to `log`, its loss
    lines to `on_step(step, loss)`. The input checkpoint, config and outputs live in `workdir`.
    Raises TrainingDiverged when the loss diverged, RuntimeError with the output's tail otherwise.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt_in = save_checkpoint(workdir / "input", model, owners)
    out = Path(tempfile.mkdtemp(prefix="out-", dir=workdir))
    cfg_path = workdir / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False))
    logs = Path(tempfile.mkdtemp(prefix="logs-", dir=workdir))
    cmd = launch_command(step, model_ready, ckpt_in, out, cfg_path, logs, nproc=cfg.train.processes)
    env = launch_env(cfg, cfg.train.processes)
    tail: list[str] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip("\n")
        body = line.split("]:", 1)[1] if line.startswith("[") and "]:" in line[:16] else line
        if body.startswith(LOSS_TAG):
            _, k, v = body.split()
            if on_step is not None:
                on_step(int(k), float(v))
            continue
        tail = (tail + [line])[-60:]
        if line.strip():
            log(line)
    rc = proc.wait(timeout=timeout_s)
    if (out / "error.json").is_file():
        err = json.loads((out / "error.json").read_text())
        raise TrainingDiverged(err["message"])
    if not step_completed(rc, out, cfg.train.processes, logs, log):
        raise RuntimeError(
            f"{step.name}: torchrun with {cfg.train.processes} processes failed (exit {rc}); "
            "last output:\n" + "\n".join(tail) + _rank_log_tails(logs)
        )
    trained, new_owners, _ = load_checkpoint(out / "checkpoint", device=str(next(model.parameters()).device))
    model.load_state_dict(trained.state_dict(), strict=True)
    model.set_owners(trained.owners)
    rep = json.loads((out / "report.json").read_text())
    info = {**rep["info"], "world_size": rep["world_size"]}
    return new_owners, StepReport(step, info, rep["losses"])


def launch_command(
    step: Step,
    model_ready: str | Path,
    checkpoint_in: str | Path,
    out: str | Path,
    config: str | Path,
    logs: str | Path,
    *,
    nproc: int,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
    rdzv_id: str = "csmf",
) -> list[str]:
    """The torchrun command line of one node launcher running the worker (`python -m csmf_core.distributed`).

    One node (the Prefect task): `--standalone`. Several nodes (docs/distributed.md "Running across
    machines"): every node runs this with its `node_rank`, the same `rdzv_endpoint` (HOST:PORT of a
    c10d rendezvous every node can reach) and `rdzv_id`; global ranks, and so the shards of the train
    rows, are assigned by the rendezvous, and only global rank 0 writes `out`.
    """
    if nnodes == 1 and rdzv_endpoint is None:
        where = ["--standalone"]
    elif rdzv_endpoint is None:
        raise ValueError(f"{nnodes} nodes need a rendezvous endpoint (HOST:PORT)")
    else:
        where = [
            f"--nnodes={nnodes}", f"--node-rank={node_rank}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}",
        ]  # fmt: skip
    return [
        sys.executable, "-m", "torch.distributed.run", *where,
        "--nproc-per-node", str(nproc), "--local-ranks-filter", "0",
        "--log-dir", str(logs), "--tee", "3",  # every rank's output in a file, local rank 0's on the console
        "-m", "csmf_core.distributed",
        "--model-ready", str(model_ready), "--checkpoint-in", str(checkpoint_in), "--out", str(out),
        "--config", str(config),
        "--step", json.dumps({"name": step.name, "kind": step.kind, "stage": step.stage}),
    ]  # fmt: skip


def launch_env(cfg: CSMFConfig, local_processes: int) -> dict[str, str]:
    """The launcher's environment: this checkout on PYTHONPATH, threads split between local ranks."""
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # one process per core share: N ranks x the parent's thread count would oversubscribe the cores
    env["OMP_NUM_THREADS"] = str(cfg.train.threads or max(1, (os.cpu_count() or 1) // local_processes))
    return env


def step_completed(rc: int, out: Path, processes: int, logs: Path, log: Callable[[str], None]) -> bool:
    """Whether the step's result in `out` is whole and agreed on by every rank.

    `report.json` is written by rank 0 only after every rank's parameter digest matched and the
    checkpoint was saved, so with it present a non-zero exit can only come from the teardown after
    it (a gloo peer closing its sockets while the other rank destroys its process group can abort
    that rank): the result is kept and the exit logged with each rank's error output.
    """
    if not (out / "report.json").is_file():
        return False
    if rc != 0:
        log(
            f"torchrun exited {rc} after the step completed on all {processes} ranks (identical "
            "parameter digests, checkpoint written); keeping the result" + _rank_log_tails(logs)
        )
    return True


def _rank_log_tails(logs: Path, lines: int = 15) -> str:
    """The last `lines` lines of every rank's stderr log that has any, one block per rank."""
    blocks = []
    for f in sorted(logs.glob("**/stderr.log")):
        text = f.read_text(errors="replace").strip().splitlines()[-lines:]
        if text:
            blocks.append(f"\n--- {f.relative_to(logs)} ---\n" + "\n".join(text))
    return "".join(blocks)


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m csmf_core.distributed", description=__doc__.split("\n")[0])
    p.add_argument("--model-ready", required=True, help="model-ready dataset directory (shared storage)")
    p.add_argument("--checkpoint-in", required=True, help="checkpoint to start from")
    p.add_argument("--out", required=True, help="rank 0 writes checkpoint/ and report.json here")
    p.add_argument("--config", required=True, help="CSMF config YAML (the full config)")
    p.add_argument("--step", required=True, help='JSON: {"name": ..., "kind": "train"|"recover", "stage": t}')
    args = p.parse_args(argv)
    return worker(args)


if __name__ == "__main__":
    sys.exit(main())
