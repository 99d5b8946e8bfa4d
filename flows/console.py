"""Console helpers of the `csmf` commands: progress lines, plain tables, argument parsing.

    with Progress("importing KuaiRand"):      # a spinner on a terminal, start/end lines otherwise
        ...
    print(text_table(["objective", "positives"], rows))
    parser.add_argument("--weights", type=parse_weights)
    dates = partition_dates(Path("data/synth-small"))

Shared by flows/cli.py (data and pipeline commands) and flows/cli_serving.py (serving commands), so
neither imports the other's helpers: cli.py registers cli_serving's commands, nothing imports back.
Imports nothing heavy (the CLI stays fast to start).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path


class Progress:
    """`with Progress("generating data"):` a spinner on a terminal's stderr, start/end lines otherwise."""

    FRAMES = "|/-\\"

    def __init__(self, what: str, stream=None):
        self.what, self.stream = what, stream or sys.stderr
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _spin(self) -> None:
        k = 0
        while not self._stop.wait(0.2):
            k += 1
            elapsed = time.perf_counter() - self.t0
            self.stream.write(f"\r{self.FRAMES[k % 4]} {self.what} ({elapsed:.0f}s)")
            self.stream.flush()

    def __enter__(self) -> Progress:
        self.t0 = time.perf_counter()
        if getattr(self.stream, "isatty", lambda: False)():
            self._thread = threading.Thread(target=self._spin, daemon=True)
            self._thread.start()
        else:
            print(f"{self.what} ...", file=self.stream, flush=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        status = "done" if exc_type is None else "failed"
        print(
            f"\r{self.what}: {status} in {time.perf_counter() - self.t0:.1f}s", file=self.stream, flush=True
        )


def text_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Plain aligned table (numbers right-aligned)."""
    cells = [[str(h) for h in headers]] + [
        [f"{v:.4f}" if isinstance(v, float) else str(v) for v in r] for r in rows
    ]
    widths = [max(len(r[c]) for r in cells) for c in range(len(headers))]
    numeric = [all(isinstance(r[c], int | float) for r in rows) for c in range(len(headers))]
    fmt = lambda r: "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(r, widths, numeric))  # noqa: E731
    return "\n".join([fmt(cells[0]), "  ".join("-" * w for w in widths), *map(fmt, cells[1:])])


def parse_weights(text: str) -> tuple[float, ...]:
    """argparse type: "1,1.8,1.2" -> (1.0, 1.8, 1.2)."""
    try:
        values = tuple(float(x) for x in text.replace("[", "").replace("]", "").split(",") if x.strip())
    except ValueError:
        values = ()
    if not values:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected comma-separated numbers, one per objective, e.g. 1,1.8,1.2"
        )
    return values


def port_number(text: str) -> int:
    """argparse type: a TCP port, 1 .. 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1 .. 65535, got {port}")
    return port


def iso_date(text: str) -> str:
    """argparse type: a day, as YYYY-MM-DD (Python also reads 20260105 as a date: written back in the
    form partition names, run names and locks use)."""
    import datetime as dt

    try:
        return dt.date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not YYYY-MM-DD") from None


def check_output_file(path: str | None, flag: str) -> Path | None:
    """An output file named on the command line, checked before any work (a run that trained and
    registered a model must not fail on its last line): not a directory, its folder created and
    writable."""
    if not path:
        return None
    out = Path(path)
    if out.is_dir():
        raise IsADirectoryError(
            f"{flag} {path} is a directory; give a file path such as {out / 'result.json'}"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"{flag} {path}: cannot create its folder ({exc.strerror or exc})") from None
    if not os.access(out.parent, os.W_OK):
        raise PermissionError(f"{flag} {path}: its folder {out.parent} is not writable")
    return out


def partition_dates(dataset_dir: Path) -> list[str]:
    """Sorted dates of the event partitions of a canonical dataset (ValueError when there are none)."""
    from data_contracts import list_partitions

    if not dataset_dir.is_dir():
        raise FileNotFoundError(
            f"dataset directory {dataset_dir} does not exist; create one with `csmf synth --out {dataset_dir}` "
            "or `csmf import kuairand SRC --out DIR`"
        )
    partitions, _ = list_partitions(dataset_dir)
    if not partitions:
        raise ValueError(f"{dataset_dir}: no events/dt=YYYY-MM-DD partitions; is this a canonical dataset?")
    return [p.date.isoformat() for p in partitions]
