"""Stage-result cache: a re-run of a date resumes after the last stage that completed.

    cache = StageCache.for_run(home, data_digest, training_digest(cfg), code_version(), window)
    hit = cache.lookup("pretrain_exposure", 1)       # None, or the entry of a completed stage
    path = cache.restore(hit, workdir / "pretrain_exposure" / "checkpoint")
    cache.record("pretrain_exposure", 1, checkpoint_dir, metrics={...}, source_run=parent_run_id)

A stage's output depends only on the data the run reads (dataset digest over the window's files),
the configuration that shapes training (every section but `gate` and `retention`), the code
version and the window itself, plus the position in the plan. The cache key is the sha256 of those;
an entry `<home>/cache/stages/<key>.json` is written only after the stage completed, and names the
output directory of the run that produced it (inside that run's work dir). A crashed run thus
leaves entries for every stage it finished; the next run for the same date and inputs copies
those outputs (hard links where the file system allows) into its own work dir and starts at the
first stage without an entry. An entry whose directory was deleted (retention) is ignored.

The code version is the package version plus the git commit (flows.inputs.code_version):
uncommitted edits do not change it; delete `<home>/cache/stages` after editing stage code by hand.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from csmf_core.config import CSMFConfig

NOT_TRAINING = (
    "gate",
    "retention",
    "ingest",
)  # config sections that never change a stage's output (ingest: how prep runs, not what it writes)
COMPLETE_MARKERS = {"checkpoint": "checkpoint.json", "model_ready": "meta.json"}


def training_digest(cfg: CSMFConfig) -> str:
    """12-hex digest of the configuration sections that shape training and evaluation."""
    d = {k: v for k, v in cfg.to_dict().items() if k not in NOT_TRAINING}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()[:12]


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@dataclass(frozen=True)
class StageCache:
    root: Path  # <home>/cache/stages
    base: str  # digest of (data, config, code, window)
    inputs: dict[str, Any]

    @classmethod
    def for_run(cls, home: Path, data_digest: str, config_digest: str, code: str, window: Any) -> StageCache:
        inputs = {
            "data_digest": data_digest,
            "config_digest": config_digest,
            "code_version": code,
            "date": window.date,
            "train_dates": list(window.train_dates),
            "eval_dates": list(window.eval_dates),
        }
        base = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
        return cls(Path(home) / "cache" / "stages", base, inputs)

    def key(self, stage: str, index: int) -> str:
        return hashlib.sha256(f"{self.base}\0{index}\0{stage}".encode()).hexdigest()[:24]

    def _entry_path(self, stage: str, index: int) -> Path:
        return self.root / f"{self.key(stage, index)}.json"

    def lookup(self, stage: str, index: int) -> dict[str, Any] | None:
        """The entry of a completed stage whose outputs still exist, else None."""
        path = self._entry_path(stage, index)
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        for name, out in entry.get("outputs", {}).items():
            marker = COMPLETE_MARKERS.get(name)
            if not Path(out).is_dir() or (marker and not (Path(out) / marker).is_file()):
                return None
        return entry

    def record(
        self,
        stage: str,
        index: int,
        outputs: dict[str, Path],
        *,
        metrics: dict[str, float] | None = None,
        source_run: str = "",
        extra: dict[str, Any] | None = None,
    ) -> Path:
        """Write the entry (atomically) after the stage completed. outputs: name -> directory."""
        self.root.mkdir(parents=True, exist_ok=True)
        entry = {
            "stage": stage,
            "index": index,
            "outputs": {k: str(Path(v).resolve()) for k, v in outputs.items()},
            "metrics": metrics or {},
            "source_run": source_run,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "inputs": self.inputs,
            **(extra or {}),
        }
        path = self._entry_path(stage, index)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entry, indent=1, default=str))
        os.replace(tmp, path)
        return path

    @staticmethod
    def restore(src: str | Path, dest: Path) -> Path:
        """Copy a cached output directory to `dest` (hard links when possible); returns dest."""
        src = Path(src)
        if src.resolve() == Path(dest).resolve():
            return Path(dest)  # a Prefect retry of the same flow run: already in place
        if Path(dest).exists():
            shutil.rmtree(dest)
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dest, copy_function=_link_or_copy)
        return Path(dest)
