"""Where a canonical dataset is read from: a local path or a URI (issue #19).

A dataset location is a local path or a URI that `pyarrow.fs.FileSystem.from_uri` understands
(file://, s3://, gs://, hdfs://; S3 options in the query: `s3://b/ds?endpoint_override=h:9000&scheme=http`).
file:// is read in place. Another filesystem is mirrored, file by file, into `<stage root>/<hash>/`
(by default `$CSMF_HOME/staged`, else `./.csmf/staged`; the flows pass `<home>/staged`): readers then
read local files. The mirror is incremental (size + mtime per file), removes files gone from the
source, copies only the canonical layout (dataset.yaml, users/items.parquet, events/...), and only
ever writes inside its directory: the directory name is a hash of the URI, an object key with an
empty, `.` or `..` part is refused naming the key, and a target that resolves outside (a planted
symlink) is refused. Messages never show a URI's query or user info (where S3 keys can be passed).

Here, not in csmf_core, because the contract checks (validate) read datasets by URI too and
data_contracts imports nothing of the core; csmf_core.fsutil re-exports these names.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import urllib.parse
import uuid
from pathlib import Path, PurePosixPath

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
STAGE_MANIFEST = ".csmf-staged.json"
STAGED_TOP = ("dataset.yaml", "users.parquet", "items.parquet")  # plus everything under events/


def check_replaceable(out_dir: Path, marker: str | None) -> None:
    """Refuse to replace `out_dir` (an output directory a writer was told to overwrite) unless it is
    absent, an empty directory, or a directory holding `marker` (the file the writer itself writes,
    e.g. dataset.yaml): overwriting never deletes a folder of other files, a plain file, or the
    current directory or one of its parents. `marker` None: any directory is replaceable."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} is a file, not an output directory; choose another path")
    here, target = Path.cwd().resolve(), out_dir.resolve()
    if here == target or target in here.parents:
        raise FileExistsError(f"{out_dir} is the current directory or contains it; choose another path")
    if marker is not None and any(out_dir.iterdir()) and not (out_dir / marker).is_file():
        raise FileExistsError(
            f"{out_dir} is not empty and holds no {marker}: it is not an earlier output of this command, "
            "so it is not replaced even with overwrite; choose another path or empty it yourself"
        )


def is_uri(location: object) -> bool:
    """Whether `location` is a URI (`scheme://...`) rather than a local path."""
    return isinstance(location, str) and bool(_URI.match(location))


def redact(uri: str) -> str:
    """`uri` without its query and user info (S3 keys can be passed there): for messages and tags."""
    if not is_uri(uri):
        return uri  # a path stays as it is
    parts = urllib.parse.urlsplit(uri)
    netloc = (parts.hostname or "") if (parts.username or parts.password) else parts.netloc
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def filesystem(uri: str):
    """(pyarrow FileSystem, path inside it) for `uri`; ValueError naming the URI when it cannot be opened."""
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError, TypeError) as exc:  # pyarrow.ArrowInvalid is a ValueError
        raise ValueError(f"dataset URI {redact(uri)}: cannot open its filesystem: {exc}") from exc


def default_stage_root() -> Path:
    return Path(os.environ.get("CSMF_HOME") or ".csmf") / "staged"


def reject_uri(location: object, what: str) -> None:
    """Outputs are local paths: a URI given as `what` is refused (it would become a relative path)."""
    if is_uri(location):
        raise ValueError(
            f"{what} {redact(str(location))} is a URI; outputs are written to local paths only "
            "(datasets are read by URI, see README 'Running at scale')"
        )


def local_dataset(location: str | os.PathLike, stage_root: str | os.PathLike | None = None) -> Path:
    """The local directory to read the dataset at `location` from (module comment above).

    A path is returned as it is; `file://` gives its local path; any other filesystem is mirrored
    into `stage_root` (default `default_stage_root()`) first.
    """
    if not is_uri(location):
        return Path(location)
    import pyarrow.fs as pafs

    fs, path = filesystem(str(location))
    if isinstance(fs, pafs.LocalFileSystem):
        return Path(path)
    root = Path(stage_root) if stage_root is not None else default_stage_root()
    return stage_dataset(fs, path, str(location), root)


def _staged_rel(base: str, file_path: str, uri: str) -> str | None:
    """The dataset-relative path of `file_path` (under `base`) to mirror, None to skip it, or ValueError."""
    rel = file_path[len(base) :].lstrip("/") if file_path.startswith(base) else None
    if rel is None:
        raise ValueError(f"dataset URI {redact(uri)}: listed {file_path!r}, which is not under {base!r}")
    parts = PurePosixPath(rel).parts
    if not parts or any(p in ("..", ".", "") for p in rel.split("/")) or PurePosixPath(rel).is_absolute():
        raise ValueError(
            f"dataset URI {redact(uri)}: object {rel!r} has an empty, '.' or '..' path part; "
            "refusing to mirror it (it could be written outside the staging directory)"
        )
    if rel in STAGED_TOP or (parts[0] == "events" and len(parts) > 1):
        return rel
    return None  # not part of the canonical layout: never read, not copied


def stage_dataset(fs, base: str, uri: str, stage_root: str | os.PathLike) -> Path:
    """Mirror the canonical dataset at `base` on `fs` into `<stage_root>/<sha256(uri)[:16]>/`."""
    import fcntl

    import pyarrow.fs as pafs

    base = base.rstrip("/")
    dest = Path(stage_root) / hashlib.sha256(uri.encode()).hexdigest()[:16]
    dest.mkdir(parents=True, exist_ok=True)
    top = fs.get_file_info(base)
    if top.type != pafs.FileType.Directory:
        raise ValueError(f"dataset URI {redact(uri)}: {base!r} is not a directory on {fs.type_name}")
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    wanted: dict[str, tuple[int, int | None]] = {}
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = _staged_rel(base, info.path, uri)
        if rel is not None:
            wanted[rel] = (info.size, info.mtime_ns)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs staging the same URI take turns
        manifest_path = dest / STAGE_MANIFEST
        try:
            have = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        except ValueError:
            have = {}
        resolved = dest.resolve()
        for rel, (size, mtime) in sorted(wanted.items()):
            target = (dest / rel).resolve()
            if not target.is_relative_to(resolved):  # a symlink planted in the staging dir
                raise ValueError(f"dataset URI {redact(uri)}: {rel!r} leads outside {resolved}; refusing")
            if have.get(rel) == [size, mtime] and target.is_file() and target.stat().st_size == size:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                with fs.open_input_stream(f"{base}/{rel}") as src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 22)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
            have[rel] = [size, mtime]
        for rel in sorted(set(have) - set(wanted)):  # gone from the source: gone from the mirror
            (dest / rel).unlink(missing_ok=True)
            have.pop(rel)
        for d in sorted((p for p in dest.rglob("*") if p.is_dir()), reverse=True):
            if not any(d.iterdir()):
                d.rmdir()
        manifest_path.write_text(json.dumps(have, indent=0, sort_keys=True))
    return dest
