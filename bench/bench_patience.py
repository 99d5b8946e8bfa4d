"""What early stopping would change in the selection pass (issue 18 item 2), read off whole curves.

The selection pass (`csmf compare`'s protocol; the daily run's epoch selection is the same for CSMF)
trains every part to its epoch cap and keeps its best validation epoch. Early stopping with patience
P would stop a part after P considered epochs in a row without a strictly better score and keep the
best epoch seen so far. An epoch's score depends only on the epochs before it, so the epoch each P
would keep is read off the recorded curve exactly, without training again. Printed per P: how many
parts (of all methods and seeds) would keep another epoch than now, and the share of the selection
pass's training epochs it would save. A P that keeps every part's epoch trains a bit-identical model
(the refit reads only the kept epochs), so its only effect would be time; one that does not changes
what is trained (the issue's rule: off unless validation shows no loss).

    python bench/bench_patience.py [--data DIR --date D] [--set key=value ...] [--seeds 3]
        [--methods csmf,moppr] [--patience 1,2,3,4,5]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import benchlib  # noqa: E402


def kept_with_patience(epochs: list[int], scores: list[float], patience: int) -> tuple[int | None, int]:
    """(epoch kept, last epoch trained) when training stops after `patience` considered epochs in a row
    without a strictly better score (0 = never). NaN scores never improve; ties keep the earlier epoch,
    as the selection pass does."""
    best, kept, since, last = float("-inf"), None, 0, epochs[-1] if epochs else 0
    for e, s in zip(epochs, scores):
        if s == s and s > best:
            best, kept, since = s, e, 0
        else:
            since += 1
        if patience and since >= patience:
            last = e
            break
    return kept, last


def curves(data: Path, date: str | None, overrides: list[str], seeds: int, methods: list[str]) -> list[dict]:
    """The selection pass of each method and seed on `data`: one row per part (method, seed, part, cap,
    chosen, epochs, scores), printed as it goes."""
    from csmf_core.baselines.protocol import load_protocol_data, selection_score
    from csmf_core.config import load_config

    cfg = load_config(None, [*overrides, "train.patience=0"])  # whole curves: every part to its cap
    threads = benchlib.set_threads(cfg.train.threads or None)
    mr, window = benchlib.prepare_window("patience", data, date, cfg)
    data_val, _ = load_protocol_data(mr, cfg)
    print(f"== patience: {data.name}, evaluation from {window.eval_dates[0]}, {threads} threads")
    rows = []
    for method in methods:
        for seed in range(seeds):
            t0 = time.perf_counter()
            score, info = selection_score(method, data_val, cfg, seed)
            for part, p in info["parts"].items():
                rows.append({"method": method, "seed": seed, "part": part, "cap": p["cap"],
                             "chosen": p["chosen"], "epochs": p["epochs"], "scores": p["scores"]})  # fmt: skip
            kept = ", ".join(f"{p}={v['chosen']}/{v['cap']}" for p, v in info["parts"].items())
            print(
                f"{method} seed {seed}: validation score {score:.4f}, {time.perf_counter() - t0:.1f} s, kept {kept}"
            )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    benchlib.add_protocol_args(ap, "tiny world, few epochs, one seed (smoke test)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--methods", default="csmf,moppr")
    ap.add_argument("--patience", default="1,2,3,4,5")
    ap.add_argument("--json-out", type=Path, help="also write every curve here")
    a = ap.parse_args(argv)
    overrides, seeds, data = list(a.overrides), a.seeds, a.data
    if a.quick:
        overrides = [
            "train.epochs=[2,3,4]",
            "model.dim=16",
            "model.hidden=[32]",
            "data.seq_len=5",
            *overrides,
        ]
        seeds = 1
    data = benchlib.protocol_dataset(data, a.quick)
    rows = curves(data, a.date, overrides, seeds, a.methods.split(","))
    rec = benchlib.Recorder("patience", {"dataset": Path(data).name, "overrides": overrides, "seeds": seeds},
                            write=not a.no_write)  # fmt: skip
    total = sum(r["cap"] for r in rows)
    for patience in [int(x) for x in a.patience.split(",")]:
        changed, trained = [], 0
        for r in rows:
            kept, last = kept_with_patience(r["epochs"], r["scores"], patience)
            trained += last
            if kept != r["chosen"]:
                changed.append(f"{r['method']}/{r['seed']}/{r['part']}: {r['chosen']} -> {kept}")
        rec.add(f"patience {patience}: parts keeping another epoch (of {len(rows)})", len(changed), "parts",
                changed=changed)  # fmt: skip
        rec.add(f"patience {patience}: selection epochs saved", 1 - trained / max(total, 1), "share")
        print(f"patience {patience}: " + ("; ".join(changed) if changed else "every part keeps its epoch"))
    rec.flush()
    if a.json_out:
        a.json_out.write_text(json.dumps(rows, indent=1))
    return rec.records


if __name__ == "__main__":
    main()
