"""What one flow run reads before any work: dataset, date window, digests, code version; safe names.

    window = plan_window("data/synth-small", None, cfg.data)
    window.eval_dates, window.train_dates, window.validate_dates

Date window (evaluation day D, default the last partition): evaluation = D .. D + eval_days - 1;
training = the `train_days` calendar days before D (0 = every partition before D). Every requested
date must have a partition; `data_contracts.validate_dataset` then checks them (plus every earlier
partition, which prep reads for behaviour history), including empty ones.

Dataset digest: sha256 over (relative path, size, bytes) of dataset.yaml, users/items.parquet and
the event files of the partitions the run reads, when those total at most `CONTENT_DIGEST_MAX_BYTES`;
above that (name, size, mtime_ns) only. The kind used is returned with the digest.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from csmf_core.config import CSMFConfig, DataConfig, fit_objectives
from csmf_core.fsutil import is_uri, local_dataset
from data_contracts import list_partitions, load_spec
from data_contracts.schema import NAME_PATTERN, NAME_RULE

CONTENT_DIGEST_MAX_BYTES = 512 * 2**20


def safe_name(name: str, what: str) -> str:
    """`name` if it can be one directory name (data_contracts NAME_PATTERN: no '..', no separator,
    not absolute), else ValueError naming `what` and the rule."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"{what} {name!r} cannot name a directory: it must be {NAME_RULE}")
    return name


def contained(base: str | os.PathLike, *parts: str | os.PathLike, what: str = "path") -> Path:
    """`base / parts...` if it stays inside `base` once both are resolved (symlinks, '..'), else
    ValueError: the guard wherever a path is joined from input (names, references, manifests)."""
    root = Path(base).resolve()
    path = root.joinpath(*parts).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"{what} {Path(*parts)} leads outside {root} (to {path}); refusing to use it")
    return path


def report_directory(
    name: str,
    explicit: str | os.PathLike | None,
    files: Sequence[str],
    kind: str,
    cwd: Path | None = None,
) -> Path:
    """Where a report goes: `explicit` (--report-dir), else `<cwd>/reports/<name>`, checked.

    `name` (a dataset's name, from its dataset.yaml, i.e. from the data) must be one directory name
    and the joined path must stay inside reports/ ("../../x", "/etc", "a/b" are refused). An explicit
    directory may be anywhere, but the report writes fixed file names into it, so it must be new,
    empty or hold an earlier report of this kind (one of `files`): a mistyped `--report-dir ..` or
    `--report-dir ~` is refused instead of filled."""
    if explicit:
        out = Path(explicit)
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"--report-dir {out} is a file; pass a directory for the report")
        if out.is_dir() and any(out.iterdir()) and not any((out / f).exists() for f in files):
            raise FileExistsError(
                f"--report-dir {out} ({out.resolve()}) is a non-empty directory without a {kind} "
                f"({', '.join(files)}); pass a new or empty directory, or one holding an earlier one"
            )
        return out
    safe_name(name, f"the dataset name {name!r} from dataset.yaml (used for reports/<name>/)")
    return contained((cwd or Path.cwd()) / "reports", name, what="report directory")


def dataset_location(data: str | os.PathLike, home: str | os.PathLike) -> Path:
    """The local directory a run reads `data` from: a path (resolved), a `file://` URI (its path), or
    another filesystem's URI (`s3://`, `gs://`, ...) mirrored under `<home>/staged/<hash of the URI>/`
    (csmf_core.fsutil.local_dataset: incremental, and no object key can write outside that directory)."""
    if is_uri(data):
        return local_dataset(str(data), stage_root=Path(home) / "staged").resolve()
    return Path(data).resolve()


@dataclass(frozen=True)
class Window:
    """The dates of one run. validate_dates: every partition prep reads (history) plus the requested ones.
    missing: calendar days between the first training day and `date` with no partition (a window of
    "every partition before it", or of the last partitions, steps over them)."""

    date: str
    train_dates: list[str]
    eval_dates: list[str]
    validate_dates: list[str]
    missing: list[str] = field(default_factory=list)

    def partitions_from(self, first: str) -> int:
        """The number of partitions dated `first` .. the day before `date` (YYYY-MM-DD; validate_dates
        holds every partition up to the last evaluation day, so no listing is read again)."""
        return sum(1 for d in self.validate_dates if first <= d < self.date)


def default_eval_day(dates: list[str], eval_days: int) -> str:
    """The evaluation day of a run given none (ISO dates in, ISO date out): the one whose evaluation
    window (it and the eval_days - 1 days after it) ends on the newest partition; the newest partition
    itself when that first day has no partition (plan_window then names the missing days)."""
    first = (dt.date.fromisoformat(dates[-1]) - dt.timedelta(days=eval_days - 1)).isoformat()
    return first if first in dates else dates[-1]


def plan_window(
    dataset_dir: str | os.PathLike, date: str | None, data: DataConfig, last_partitions: int | None = None
) -> Window:
    """Evaluation and training dates for evaluation day `date` (default: `default_eval_day`, the
    newest partition with one evaluation day).

    Training days: `data.train_days` calendar days before `date` (each must have its partition), or
    every partition before it (train_days 0), or, with `last_partitions`, the last that many partitions
    before it, however far back (an incremental run's days: a day missing from the data is stepped
    over, not fatal)."""
    root = Path(dataset_dir)
    partitions, _ = list_partitions(root)
    if not partitions:
        raise ValueError(
            f"{root}: no events/dt=YYYY-MM-DD partitions; point --data at a canonical dataset "
            "(docs/architecture.md section 1) or omit it to use generated data"
        )
    have = [p.date for p in partitions]
    try:
        day = dt.date.fromisoformat(date or default_eval_day([d.isoformat() for d in have], data.eval_days))
    except ValueError as exc:
        raise ValueError(f"date {date!r} is not YYYY-MM-DD") from exc
    eval_d = [day + dt.timedelta(days=k) for k in range(data.eval_days)]
    if last_partitions is not None:
        before = [d for d in have if d < day]
        if len(before) < last_partitions:
            raise ValueError(
                f"{root}: cannot train on the last {last_partitions} partitions before {day.isoformat()}: "
                f"there are {len(before)} ({', '.join(d.isoformat() for d in before) or 'none'})"
            )
        train_d = before[len(before) - last_partitions :]
    elif data.train_days > 0:
        train_d = [day - dt.timedelta(days=k) for k in range(data.train_days, 0, -1)]
    else:
        train_d = [d for d in have if d < day]
    missing = [d for d in train_d + eval_d if d not in have]
    if not train_d or missing:
        what = (
            f"missing partitions {[d.isoformat() for d in missing]}" if missing else "no partition before it"
        )
        raise ValueError(
            f"{root}: cannot evaluate on {day.isoformat()} (eval_days={data.eval_days}, "
            f"train_days={data.train_days}): {what}; available {have[0].isoformat()} .. {have[-1].isoformat()} "
            f"({len(have)} partitions). Pick another --date or export the missing days."
        )
    history = [d for d in have if d <= eval_d[-1]]
    iso = [d.isoformat() for d in sorted(set(history) | set(train_d) | set(eval_d))]
    present = set(have)
    gaps = [train_d[0] + dt.timedelta(days=k) for k in range((day - train_d[0]).days)]
    return Window(
        day.isoformat(),
        [d.isoformat() for d in train_d],
        [d.isoformat() for d in eval_d],
        iso,
        [d.isoformat() for d in gaps if d not in present],
    )


def dataset_files(dataset_dir: str | os.PathLike, dates: list[str]) -> list[Path]:
    """dataset.yaml, users/items.parquet and the event files of `dates`, in a stable order."""
    root = Path(dataset_dir)
    files = [root / f for f in ("dataset.yaml", "users.parquet", "items.parquet") if (root / f).is_file()]
    wanted = set(dates)
    partitions, _ = list_partitions(root)
    files += [f for p in partitions if p.date.isoformat() in wanted for f in p.files]
    return files


def dataset_digest(dataset_dir: str | os.PathLike, dates: list[str]) -> tuple[str, str]:
    """(16-hex digest, "content" | "stat") of the files a run reads (module docstring)."""
    root = Path(dataset_dir)
    files = dataset_files(root, dates)
    stats = [f.stat() for f in files]
    kind = "content" if sum(s.st_size for s in stats) <= CONTENT_DIGEST_MAX_BYTES else "stat"
    h = hashlib.sha256()
    for f, s in zip(files, stats):
        h.update(f"{f.relative_to(root).as_posix()}\0{s.st_size}\0".encode())
        if kind == "stat":
            h.update(str(s.st_mtime_ns).encode())
            continue
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16], kind


def code_version() -> str:
    """Package version plus the git commit when the source tree is a checkout ("0.1.0+g1a2b3c4d5e6f").

    Reads .git/HEAD and the ref files directly (no git process): cheap and safe inside tasks.
    $CSMF_CODE_VERSION, when set, wins: set it where the tree has no .git (a container image tag).
    """
    if os.environ.get("CSMF_CODE_VERSION"):
        return os.environ["CSMF_CODE_VERSION"]
    try:
        version = metadata.version("csmf")
    except metadata.PackageNotFoundError:
        version = "0+unknown"
    git = Path(__file__).resolve().parents[1] / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = head[5:]
            if (git / ref).is_file():
                head = (git / ref).read_text().strip()
            else:
                packed = (
                    (git / "packed-refs").read_text().splitlines() if (git / "packed-refs").is_file() else []
                )
                head = next((ln.split()[0] for ln in packed if ln.endswith(" " + ref)), "")
    except OSError:
        head = ""
    return f"{version}+g{head[:12]}" if len(head) >= 12 else version


def fit_to_dataset(cfg: CSMFConfig, dataset: str | os.PathLike, log: Callable[[str], None]) -> CSMFConfig:
    """`cfg` fitted to the dataset's objectives (csmf_core.config.fit_objectives: the paper's default
    fused weights become equal weights on a dataset with other than three objectives), the change
    logged. A dataset with no readable dataset.yaml is left to ingest, which names the problem."""
    try:
        objectives = load_spec(dataset).objective_names
    except (OSError, ValueError):
        return cfg
    cfg, why = fit_objectives(cfg, objectives)
    if why:
        log(why)
    return cfg
