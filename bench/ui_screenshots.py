"""Browser check of the MLflow UI: screenshots of a finished `csmf run` in headless Chromium.

How to run:  .venv/bin/python bench/ui_screenshots.py [--home .csmf] [--out docs/screenshots]

Needs a csmf home with a finished daily run and a registered model (`make run` makes one) and
Chromium from the distribution (Debian: `apt-get install chromium`; or set $CHROMIUM to a
Chrome/Chromium binary). Without Chromium it prints why and exits 0, so it can sit in any check
list; without a finished run it exits 1 with what to run first.

What it does: finds, through the MLflow client, the model version the `champion` alias points at
(else the newest version) and the daily parent run that registered it (the version's
csmf.parent_run_id tag); starts `mlflow ui` on 127.0.0.1 on a free port against the home's
store; opens three pages in headless Chromium (the UI is a JavaScript single-page app, so
`--virtual-time-budget` lets its requests finish before the screenshot) and writes:

    parent_run.png       the parent run's overview page (tags, parameters, metrics, lineage)
    cascade_figure.png   the parent run's figures/cascade.png shown in the artifacts view
    model_version.png    the registry's model version page (description = model card, schema)

and stops the UI (its whole process group) however the script ends.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python bench/ui_screenshots.py`
    sys.path.insert(0, str(REPO))

from flows.env import free_port  # noqa: E402  (imports nothing heavy)
from flows.names import DAILY_EXPERIMENT, RUN_TAG  # noqa: E402  (imports nothing)

# Binary names of Chromium on Debian/Ubuntu and of Google Chrome, in the order they are tried.
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
MODEL = "csmf"
CASCADE_FIGURE = "figures/cascade.png"
WINDOW = (1600, 1000)
BUDGET_MS = 15000  # virtual time for the single-page app to fetch and draw before the screenshot
# MLflow 3.17's UI opens in its GenAI view (runs listed as "Evaluation runs") unless told otherwise;
# its workflow switch is this query parameter ("Model training" in the side bar).
TRAINING_VIEW = "?workflowType=machine_learning"
MIN_PNG_BYTES = 20_000  # a blank or "loading" page of this size compresses far below this


@dataclass(frozen=True)
class Targets:
    """What the screenshots show: a registered model version and the parent run that made it."""

    experiment_id: str
    run_id: str
    model: str
    version: str


def find_chromium(env: dict | None = None, which=shutil.which) -> str | None:
    """$CHROMIUM when set (it must exist), else the first of CHROMIUM_NAMES on the PATH, else None."""
    env = os.environ if env is None else env
    if env.get("CHROMIUM"):
        return which(env["CHROMIUM"])
    for name in CHROMIUM_NAMES:
        if path := which(name):
            return path
    return None


def skip_message(env: dict | None = None) -> str:
    """The line printed when no browser is found (the script then exits 0)."""
    env = os.environ if env is None else env
    where = (
        f"$CHROMIUM={env['CHROMIUM']} is not an executable"
        if env.get("CHROMIUM")
        else (f"none of {', '.join(CHROMIUM_NAMES)} is on the PATH")
    )
    return (
        f"ui_screenshots: skipped: no headless Chromium ({where}). Install it with "
        "`apt-get install chromium` (Debian) or set CHROMIUM=/path/to/chrome, then run this again."
    )


def ui_urls(base: str, t: Targets) -> dict[str, str]:
    """The UI page of each screenshot, by file stem (MLflow 3 routes, after the `#`)."""
    base = base.rstrip("/")
    run = f"{base}/#/experiments/{t.experiment_id}/runs/{t.run_id}"
    return {
        "parent_run": f"{run}{TRAINING_VIEW}",
        "cascade_figure": f"{run}/artifacts/{CASCADE_FIGURE}{TRAINING_VIEW}",
        "model_version": f"{base}/#/models/{quote(t.model, safe='')}/versions/{t.version}{TRAINING_VIEW}",
    }


def chromium_command(chromium: str, url: str, png: Path, profile: Path) -> list[str]:
    """One headless screenshot. --no-sandbox: Chromium refuses to start as root without it (a
    container); the throwaway profile keeps the user's own browser profile out of it."""
    return [
        chromium,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        "--disable-extensions",
        f"--user-data-dir={profile}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        f"--virtual-time-budget={BUDGET_MS}",
        f"--screenshot={png}",
        url,
    ]


def find_targets(tracking_uri: str, model: str = MODEL) -> Targets:
    """The champion version of `model` (else its newest) and its parent run, from the store."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    versions = client.search_model_versions(f"name='{model}'")
    if not versions:
        raise SystemExit(
            f"ui_screenshots: no registered model '{model}' in {tracking_uri}: run `make run` "
            "(or `csmf run`) with this home first"
        )
    try:
        mv = client.get_model_version_by_alias(model, "champion")
    except Exception:  # no champion alias (every version rejected): show the newest
        mv = max(versions, key=lambda v: int(v.version))
    run_id = mv.tags.get(RUN_TAG)
    if not run_id:
        raise SystemExit(
            f"ui_screenshots: {model} version {mv.version} has no {RUN_TAG} tag: it was not registered "
            "by the daily flow"
        )
    run = client.get_run(run_id)
    if CASCADE_FIGURE not in {f.path for f in client.list_artifacts(run_id, "figures")}:
        raise SystemExit(f"ui_screenshots: the parent run {run_id} has no {CASCADE_FIGURE} artifact")
    return Targets(run.info.experiment_id, run_id, model, str(mv.version))


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    """Until GET <base>/health answers 200; fails at once if the UI process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"ui_screenshots: mlflow ui exited with code {proc.returncode} before serving")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise SystemExit(f"ui_screenshots: mlflow ui did not answer on {base}/health within {timeout:.0f} s")


def shoot(chromium: str, url: str, png: Path, profile: Path, timeout: float = 180.0) -> int:
    """Screenshot `url` into `png`; returns its size in bytes (fails on no file or a blank page)."""
    png.unlink(missing_ok=True)
    done = subprocess.run(
        chromium_command(chromium, url, png, profile), capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0 or not png.exists():
        raise SystemExit(
            f"ui_screenshots: chromium failed on {url} (exit {done.returncode}): {done.stderr.strip()[-800:]}"
        )
    size = png.stat().st_size
    if size < MIN_PNG_BYTES:
        raise SystemExit(f"ui_screenshots: {png} is {size} bytes: the page looks blank ({url})")
    return size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--home", default=os.environ.get("CSMF_HOME") or ".csmf", help="csmf home (default .csmf)")
    p.add_argument("--out", default=str(REPO / "docs" / "screenshots"), help="where the PNGs go")
    p.add_argument("--model", default=MODEL, help="registered model name (default csmf)")
    args = p.parse_args(argv)

    chromium = find_chromium()
    if chromium is None:
        print(skip_message(), flush=True)
        return 0
    home = Path(args.home).expanduser().resolve()
    db = home / "mlflow.db"
    if not db.exists():
        print(f"ui_screenshots: no MLflow store at {db}: run `make run` (or csmf run --home {home}) first")
        return 1
    uri = f"sqlite:///{db}"
    targets = find_targets(uri, args.model)
    print(
        f"ui_screenshots: {targets.model} v{targets.version}, parent run {targets.run_id} "
        f"(experiment {DAILY_EXPERIMENT} id {targets.experiment_id}); browser {chromium}",
        flush=True,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from flows.lock import stop_process_group

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1"]
    cmd += ["--port", str(port)]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(base, proc)
        with tempfile.TemporaryDirectory(prefix="csmf-chromium-") as profile:
            for stem, url in ui_urls(base, targets).items():
                png = out / f"{stem}.png"
                size = shoot(chromium, url, png, Path(profile))
                print(f"ui_screenshots: {png} ({size / 1024:.0f} KB) <- {url}", flush=True)
    finally:
        stop_process_group(proc.pid, timeout=10)
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
