"""Directory outputs that appear whole or not at all (generated datasets, model-ready data), and
dataset locations given as URIs (`local_dataset`)."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from data_contracts.location import (  # noqa: F401  (re-exported: datasets by URI)
    check_replaceable,
    default_stage_root,
    filesystem,
    is_uri,
    local_dataset,
    redact,
    reject_uri,
    stage_dataset,
)


def fresh_temp_dir(
    out_dir: Path, overwrite: bool, check_only: bool = False, marker: str | None = None
) -> Path:
    """Refuse a non-empty out_dir unless overwrite; return a fresh temp dir beside it.

    check_only: only the refusal (fail before heavy work), returns out_dir and creates nothing.
    marker: the file this writer puts in out_dir (dataset.yaml, meta.json): with overwrite, a non-empty
    out_dir without it, a plain file, or the current directory are refused (`check_replaceable`).
    """
    check_replaceable(out_dir, marker)  # first: overwrite could not replace it either
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True)")
    if check_only:
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def commit_dir(tmp: Path, out_dir: Path) -> None:
    """Move tmp into out_dir; an old out_dir is renamed away first so a reader never sees half a dataset."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


FILES_MANIFEST = ".csmf-files.json"  # a directory's files and their sizes, written last (`write_manifest`)


def write_manifest(directory: Path) -> None:
    """Record every file under `directory` and its size (e.g. a downloaded model, before it is renamed
    into the cache): `whole_by_manifest` then tells a deleted or truncated file."""
    files = {
        str(f.relative_to(directory)): f.stat().st_size
        for f in directory.rglob("*")
        if f.is_file() and f.relative_to(directory) != Path(FILES_MANIFEST)
    }
    (directory / FILES_MANIFEST).write_text(json.dumps(files, sort_keys=True))


def whole_by_manifest(directory: Path) -> bool:
    """Whether `directory` still holds every file of its manifest at its recorded size (False without
    a manifest)."""
    try:
        files = json.loads((directory / FILES_MANIFEST).read_text())
        return all((directory / rel).stat().st_size == size for rel, size in files.items())
    except (OSError, ValueError, AttributeError):
        return False
