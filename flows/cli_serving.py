"""`csmf embed`, `csmf recommend`, `csmf evaluate`: the serving side of the CLI (see flows.cli).

How to run:

    csmf recommend --user-id 40 --k 10                          # the champion (models:/csmf@champion)
    csmf recommend --user-id 40 --weights 1,3,0.5 --model models:/csmf@champion
    csmf embed --side user --mode click --out users.parquet     # mode-1 user vectors
    csmf embed --side user --weights 1,1.8,1.2 --out q.parquet  # fused query vectors
    csmf embed --side item --out items.parquet --model path/to/bundle
    csmf evaluate --model models:/csmf/3 --data data/synth-small --date 2026-01-08

--model REF: a serving-bundle directory (has bundle.json; needs no MLflow), `models:/csmf@alias`,
`models:/csmf/N`, an MLflow run id, `latest` (the newest version, whatever the gate decided), or
nothing for the champion, `models:/csmf@champion` (flows.registry.resolve_model). Every command
prints the model it used first ("Model: csmf version 3 (models:/csmf@champion; ...)").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import uuid
from pathlib import Path

from flows.console import Progress, check_output_file, iso_date, parse_weights, partition_dates, text_table
from flows.env import existing_home, setup_home
from flows.inputs import dataset_location


def parse_user_id(text: str) -> int:
    """argparse type of --user-id: a decimal integer inside int64, exactly (never through float)."""
    from csmf_core.ids import check_id

    digits = text.strip()
    if not re.fullmatch(r"[+-]?[0-9]+", digits):
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer user id (decimal digits, e.g. 42)")
    try:
        return check_id(int(digits), "user id")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def open_recommender(ref: str | None, home: str | None):
    """Recommender of a bundle directory or of a registered model (module docstring); prints which
    model it is ("Model: csmf version 3 (models:/csmf@champion; aliases champion; gate: promoted)")."""
    from csmf_core.serving import Recommender

    if ref is not None and Path(ref).is_dir():
        if not (Path(ref) / "bundle.json").is_file():
            raise FileNotFoundError(
                f"{ref} is a directory but not a csmf serving bundle (no bundle.json); pass a bundle "
                "directory, models:/csmf@<alias>, models:/csmf/<version> or an MLflow run id"
            )
        print(f"Model: bundle directory {Path(ref).resolve()} (not from the registry)")
        return Recommender.load(ref)
    root = existing_home(home)  # before mlflow is imported: the registry lives in the home's tracking store
    hit = cached_resolution(root, ref)
    if hit is not None:  # the store has not changed since this reference was resolved: no mlflow import
        print(f"Model: {hit['describe']}")
        return Recommender.load(hit["bundle"])
    from flows.registry import DEFAULT_REF, resolve_model

    before = _store_stamp()
    with Progress(f"resolving model {ref or DEFAULT_REF + ' (the champion)'}"):
        model = resolve_model(ref)
    print(f"Model: {model.describe()}")
    if before is not None and before == _store_stamp():  # nothing changed while it was resolved
        _remember(root, ref, {"stamp": before, "bundle": str(model.bundle), "describe": model.describe()})
    return Recommender.load(model.bundle)


# ---- resolution cache: `csmf recommend` without importing mlflow when the registry has not changed ----
_RESOLVED = "resolved.json"  # <home>/cache/models/resolved.json: {reference: {stamp, bundle, describe}}


def _store_stamp() -> list | None:
    """(size, mtime) of the SQLite tracking store and its journal files, or None for another store.

    Every registry change (a new version, an alias moved by the gate) writes the database, so an equal
    stamp means the champion, the versions and their tags are what they were."""
    from flows.env import sqlite_path, tracking_uri

    db = sqlite_path(tracking_uri())
    if db is None or not db.is_file():
        return None
    stamp = []
    for p in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-journal")):
        try:
            st = p.stat()
            stamp.append([p.name, st.st_size, st.st_mtime_ns])
        except FileNotFoundError:
            stamp.append([p.name, None, None])
    return stamp


def cached_resolution(root: Path, ref: str | None) -> dict | None:
    """The cached resolution of `ref` (None = the champion) when the tracking store is unchanged since
    it was made and its bundle is still in the model cache; else None (resolve through MLflow)."""
    stamp = _store_stamp()
    if stamp is None:
        return None
    try:
        entry = json.loads((root / "cache" / "models" / _RESOLVED).read_text()).get(ref or "")
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("stamp") != stamp:
        return None
    bundle = Path(entry.get("bundle", ""))
    if not (bundle / "bundle.json").is_file():
        return None
    from csmf_core.fsutil import whole_by_manifest

    cache = (root / "cache" / "models").resolve()
    entry_dir = next((p for p in bundle.resolve().parents if p.parent.parent == cache), None)
    if entry_dir is not None and not whole_by_manifest(entry_dir):  # a damaged download: through MLflow
        return None
    return entry


def _remember(root: Path, ref: str | None, entry: dict) -> None:
    path = root / "cache" / "models" / _RESOLVED
    try:
        known = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        known = {}
    known[ref or ""] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, path)
    except OSError:  # a read-only home still serves, just without the shortcut
        pass


def _write_vectors(path: Path, id_name: str, ids, vectors, meta: dict) -> None:
    """ids (N,) int64 + vectors (N, D) float32 -> parquet with `vector` fixed_size_list<float32>[D]."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    vecs = np.ascontiguousarray(vectors, dtype=np.float32)
    col = pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel(), pa.float32()), vecs.shape[1])
    table = pa.table({id_name: pa.array(ids, pa.int64()), "vector": col})
    table = table.replace_schema_metadata({"csmf": json.dumps(meta)})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)  # readers never see half a file
    finally:
        tmp.unlink(missing_ok=True)


def cmd_embed(args: argparse.Namespace) -> int:
    if args.side == "item" and args.weights is not None:
        raise ValueError("--weights applies to --side user only: item vectors do not depend on the weights")
    if args.mode is not None and args.weights is not None:
        raise ValueError("pass either --mode (one stage's vectors) or --weights (fused queries), not both")
    out_path = check_output_file(args.out, "--out")  # not a directory, its folder made and writable
    if out_path.suffix.lower() != ".parquet":
        raise ValueError(
            f"--out {args.out}: the vectors are written as Parquet; give a name ending in .parquet"
        )
    rec = open_recommender(args.model, args.home)
    mode = rec.stage_index(args.mode) if args.mode is not None else rec.n_stages - 1
    meta = {
        "side": args.side,
        "objectives": rec.objectives,
        "dim": rec.dim,
        "bundle": str(rec.bundle_dir),
        "output_owners": rec.output_owners.tolist(),
    }
    if args.side == "item":
        # Mode t scores use the same item vectors (only the user side is masked), so one export serves all.
        ids, vecs = rec.item_vectors()
        meta |= {"mode": "full (item vectors are the same for every mode)"}
    else:
        ids = rec.user_vocab
        with Progress(f"computing {len(ids):,} user vectors"):
            if args.weights is not None:
                vecs, _ = rec.user_vectors(ids, weights=args.weights)
                meta |= {"weights": list(args.weights)}
            else:
                vecs, _ = rec.user_vectors(ids, mode=mode)
                meta |= {"mode": rec.objectives[mode]}
    _write_vectors(Path(args.out), f"{args.side}_id", ids, vecs, meta)
    if args.side == "item":
        what = "full-mode item vectors, the same for every mode"
    elif args.weights is not None:
        what = f"fused query vectors, weights {list(args.weights)}"
    else:
        what = f"mode {meta['mode']}"
    print(f"Wrote {len(ids):,} {args.side} vectors (D={rec.dim}, {what}) to {args.out}")
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    rec = open_recommender(args.model, args.home)
    out = rec.recommend(args.user_id, k=args.k, weights=args.weights, mode=args.mode)
    if args.mode is not None:
        how = f"mode {rec.objectives[rec.stage_index(args.mode)]}"
    else:
        w = args.weights if args.weights is not None else rec.default_weights.tolist()
        how = "fused, weights " + ",".join(f"{x:g}" for x in w) + " (" + ", ".join(rec.objectives) + ")"
    for r in out:
        state = "cold start: unknown user id, generic vector" if r["cold_start"] else "known user"
        print(f"\nuser {r['user_id']}  ({state}; {how})")
        rows = [[n + 1, item, score] for n, (item, score) in enumerate(zip(r["items"], r["scores"]))]
        headers = ["rank", "item_id", "score"]
        if args.features:  # the items' own features, decoded from the bundle, after the score
            features = rec.item_features(r["items"])
            headers += list(features)
            for n, row in enumerate(rows):
                row += [_feature_cell(v[n]) for v in features.values()]
        print(text_table(headers, rows))
    return 0


def _feature_cell(value) -> str:
    """A feature value for the table: numbers to 4 significant digits, missing as '-'."""
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from csmf_core.config import load_config
    from csmf_core.evaluate import gaps_table
    from csmf_core.prep import prepare
    from csmf_core.serving import metrics_table
    from data_contracts import validate_dataset

    bundle_dir = args.model is not None and Path(args.model).is_dir()  # needs no registry
    home = setup_home(args.home) if bundle_dir else existing_home(args.home)
    data = dataset_location(args.data, home)  # a path or a URI
    dates = partition_dates(data)
    date = args.date or dates[-1]
    if date not in dates:
        raise ValueError(f"{data} has no partition dt={date}; available {dates[0]} .. {dates[-1]}")
    train = [d for d in dates if d < date]
    if not train:
        raise ValueError(f"{data}: no partition before {date} (the training window of the evaluation)")
    rec = open_recommender(args.model, args.home)
    ks = tuple(args.k) if args.k else load_config(rec.bundle_dir / "config.yaml").eval.ks
    with Progress(f"validating {data} up to {date}"):
        validate_dataset(data, dates=train + [date]).raise_if_errors()
    from data_contracts import load_spec

    names = [o.name for o in load_spec(data).objectives]
    if names != list(rec.objectives):  # said of the dataset given, before a temporary preparation of it
        raise ValueError(
            f"{data}/dataset.yaml has objectives {names}, the model {rec.bundle_dir} {list(rec.objectives)}: "
            "evaluate a model on data with its objectives"
        )
    meta = json.loads((rec.bundle_dir / "features" / "meta.json").read_text())
    for line in evaluation_notes(rec, meta, data, date):
        print(f"csmf evaluate: {line}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="csmf-eval-") as tmp:
        with Progress(f"preparing {data} for evaluation on {date}"):
            prepare(
                data,
                Path(tmp) / "mr",
                train_dates=train,
                eval_dates=date,
                seq_len=int(meta["seq_len"]),
                n_req_neg=int(meta["n_req_neg"]),
            )
        with Progress("evaluating"):
            k = load_config(rec.bundle_dir / "config.yaml").eval.primary_k
            k = k if k in ks else max(ks)  # --k given without the model's primary K: the gaps at the largest
            rows, gaps = rec.evaluate_with_gaps(Path(tmp) / "mr", ks=ks, gaps_k=k)
    print(
        f"\nModel {rec.bundle_dir} on {data}, evaluation day {date} (fused weights "
        f"{[round(float(w), 6) for w in rec.default_weights]}):\n"
    )
    print(metrics_table(rows))
    print(f"\nModel minus popularity at K={k}, paired 95% bootstrap interval over the evaluation users:\n")
    if max(ks) > len(rec.item_vocab):
        print(
            f"(K={max(ks)} is more than the {len(rec.item_vocab):,} items the model can recommend: each "
            "ranking at it holds every one of them)\n"
        )
    print(gaps_table(gaps))
    return 0


def evaluation_notes(rec, meta: dict, data: Path, date: str) -> list[str]:
    """What makes an evaluation's figures mean less than they seem, one line each: the evaluation day
    inside the model's training window (not out of sample), another dataset than the model's, and
    evaluation users or items the model has never seen (all of them: every score is popularity's or
    a cold start's)."""
    import numpy as np

    from data_contracts import partition_files, read_name, scan_partition
    from flows.incremental import lineage_end

    notes = []
    trained = sorted(meta.get("train_dates") or [])
    through = lineage_end(getattr(rec, "info", None) or {}) or (trained[-1] if trained else None)
    if through and date <= through:
        seen = f"{trained[0]} .. {through}" if trained else f"days up to {through}"
        notes.append(
            f"the model trained on {seen}"
            + (" (with the model it continued)" if trained and through > trained[-1] else "")
            + f"; {date} is inside that window, so these figures are not out of sample (evaluate on a later day for that)"
        )
    own, this = (meta.get("dataset") or {}).get("name"), read_name(data)
    if own and this and own != this:
        notes.append(f"the model was trained on dataset {own!r}, this is {this!r}")
    events = scan_partition(partition_files(data)[date]).select("user_id", "item_id").collect()
    for side, vocab in (("user", rec.user_vocab), ("item", rec.item_vocab)):
        ids = events.get_column(f"{side}_id").unique().to_numpy()
        known = int(np.isin(ids, vocab).sum())
        if known < len(ids):
            share = f"{known:,} of {len(ids):,} {side}s of {date} are known to the model"
            notes.append(
                f"WARNING: none of the {len(ids):,} {side}s of {date} is known to the model: is this the "
                "data it was trained on?"
                if known == 0
                else f"{share} (the others are cold starts)"
                if side == "user"
                else f"{share} (the others cannot be recommended)"
            )
    return notes


def add_commands(sub, parents: list[argparse.ArgumentParser]) -> None:
    """Register embed, recommend and evaluate on the `csmf` subparsers."""
    model_help = (
        "bundle directory, models:/csmf@ALIAS, models:/csmf/N, an MLflow run id or latest "
        "(default: models:/csmf@champion, the version the gate promoted)"
    )
    e = sub.add_parser(
        "embed",
        parents=parents,
        help="export user or item vectors to parquet",
        description="Export ids + vectors (fixed_size_list<float32>[D]). How to run: "
        "csmf embed --side user --mode click --out users.parquet",
    )
    e.add_argument("--side", required=True, choices=["user", "item"])
    e.add_argument(
        "--mode",
        metavar="STAGE",
        help="stage name or index (default: the last = full model); item vectors are the same for every mode",
    )
    e.add_argument(
        "--weights", type=parse_weights, metavar="K0,K1,...", help="user side: fused query vectors"
    )
    e.add_argument("--model", metavar="REF", help=model_help)
    e.add_argument("--out", required=True, help="output .parquet file (replaced if present)")
    e.set_defaults(func=cmd_embed)

    r = sub.add_parser(
        "recommend",
        parents=parents,
        help="top-K items for a user",
        description="How to run: csmf recommend --user-id 40 [--k 50] [--weights 1,1.8,1.2]",
    )
    r.add_argument(
        "--user-id",
        required=True,
        type=parse_user_id,
        action="append",
        help="original user id, an integer in int64's range (repeatable)",
    )
    r.add_argument("--k", type=int, default=50, help="items per user, 1..10000 (default 50)")
    r.add_argument(
        "--weights",
        type=parse_weights,
        metavar="K0,K1,...",
        help="objective weights (default: the model's fused weights)",
    )
    r.add_argument("--mode", metavar="STAGE", help="rank by one stage's own score instead of the fused one")
    r.add_argument(
        "--features",
        action="store_true",
        help="show each item's features (category, brand, price, ...) next to its id",
    )
    r.add_argument("--model", metavar="REF", help=model_help)
    r.set_defaults(func=cmd_recommend)

    v = sub.add_parser(
        "evaluate",
        parents=parents,
        help="evaluate a model on a canonical dataset",
        description="Prepare DIR for evaluation on --date (training window = the partitions "
        "before it) and print Recall/nDCG. How to run: csmf evaluate --model REF --data DIR",
    )
    v.add_argument("--model", metavar="REF", help=model_help)
    v.add_argument("--data", required=True, help="canonical dataset directory")
    v.add_argument("--date", type=iso_date, help="evaluation day YYYY-MM-DD (default: the last partition)")
    v.add_argument("--k", type=int, nargs="+", help="cut-offs (default: the model config's eval.ks)")
    v.set_defaults(func=cmd_evaluate)
