"""The `csmf` CLI through `flows.cli.main([...])`: data commands, serving commands on a bundle
directory (no MLflow), `run` with a stand-in flow, and the home/environment set-up."""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from csmf_core.config import ConfigError, build_config
from csmf_core.serving import Recommender, metrics_table
from flows import cli
from flows.env import HomeNotWritable, check_writable, setup_home
from flows.lock import RunLocked

ENV = (
    "CSMF_HOME",
    "CSMF_OWNER",  # set by `csmf run` (flows.doctor.claim)
    "MLFLOW_TRACKING_URI",
    "PREFECT_HOME",
    "PREFECT_SERVER_ANALYTICS_ENABLED",
    "PREFECT_API_URL",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
    "DO_NOT_TRACK",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR",
    "MLFLOW_DISABLE_TELEMETRY",
)


@pytest.fixture
def clean_env(monkeypatch):
    """None of the home variables set; the originals come back after the test."""
    for k in ENV:
        monkeypatch.setenv(k, "placeholder")  # records the original value for undo
        monkeypatch.delenv(k)


def test_synth_then_validate(tmp_path, capsys):
    out = tmp_path / "ds"
    assert cli.main(["synth", "--out", str(out), "--preset", "tiny", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert "2026-01-01 .. 2026-01-06" in text and "conversion" in text and "csmf validate" in text
    assert cli.main(["validate", str(out)]) == 0
    assert "OK, 0 errors" in capsys.readouterr().out
    assert cli.main(["synth", "--out", str(out), "--preset", "tiny"]) == 2  # exists: refused, no traceback
    assert "overwrite" in capsys.readouterr().err


def test_validate_broken_dataset_exits_1(tiny_world, tmp_path, capsys):
    ds = tmp_path / "broken"
    shutil.copytree(tiny_world["ds"], ds, ignore=shutil.ignore_patterns("_truth"))
    part = sorted((ds / "events").glob("dt=*/*.parquet"))[0]
    ev = pl.read_parquet(part)
    first_unclicked = ev.with_row_index().filter(~pl.col("clicked"))["index"][0]
    ev = ev.with_columns(
        converted=pl.when(pl.int_range(pl.len()) == first_unclicked).then(True).otherwise("converted")
    )
    ev.write_parquet(part)
    assert cli.main(["validate", str(ds)]) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "cascade" in captured.out and "fix the errors" in captured.err


def test_errors_are_one_paragraph_and_exit_2(tmp_path, capsys):
    assert cli.main(["import", "kuairand", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "\ncsmf import: error:" in err and "--debug" in err and "Traceback" not in err
    with pytest.raises(FileNotFoundError):
        cli.main(["--debug", "import", "kuairand", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])


def test_embed_and_recommend_on_a_bundle_directory(tiny_world, tmp_path, capsys):
    bundle = str(tiny_world["bundle"])
    rec = Recommender.load(bundle)
    users = rec.user_vocab

    out = tmp_path / "u.parquet"
    assert cli.main(["embed", "--side", "user", "--mode", "click", "--model", bundle, "--out", str(out)]) == 0
    t = pq.read_table(out)
    assert str(t.schema.field("vector").type) == "fixed_size_list<element: float>[16]"
    np.testing.assert_array_equal(t["user_id"].to_numpy(), users)
    got = np.stack(t["vector"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(got, rec.user_vectors(users, mode=1)[0], rtol=1e-6, atol=1e-6)

    assert (
        cli.main(["embed", "--side", "user", "--weights", "1,2,3", "--model", bundle, "--out", str(out)]) == 0
    )
    got = np.stack(pq.read_table(out)["vector"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(got, rec.user_vectors(users, weights=(1, 2, 3))[0], rtol=1e-6, atol=1e-6)

    assert cli.main(["embed", "--side", "item", "--mode", "0", "--model", bundle, "--out", str(out)]) == 0
    t = pq.read_table(out)
    ids, vecs = rec.item_vectors()
    np.testing.assert_array_equal(t["item_id"].to_numpy(), ids)
    np.testing.assert_allclose(
        np.stack(t["vector"].to_numpy(zero_copy_only=False)), vecs, rtol=1e-6, atol=1e-6
    )
    assert (
        cli.main(["embed", "--side", "item", "--weights", "1,1,1", "--model", bundle, "--out", str(out)]) == 2
    )
    capsys.readouterr()
    # x.csv was written as Parquet, a directory failed with a raw "Is a directory" on its last step
    for bad, reason in ((tmp_path / "u.csv", "give a name ending in .parquet"), (tmp_path, "is a directory")):
        assert cli.main(["embed", "--side", "item", "--model", bundle, "--out", str(bad)]) == 2
        assert reason in capsys.readouterr().err
    assert not (tmp_path / "u.csv").exists()

    uid = int(users[3])
    assert (
        cli.main(["recommend", "--user-id", str(uid), "--user-id", "-7", "--k", "5", "--model", bundle]) == 0
    )
    text = capsys.readouterr().out
    want = rec.recommend([uid], k=5)[0]["items"]
    lines = [ln.split() for ln in text.splitlines() if ln.strip() and ln.split()[0].isdigit()]
    assert [int(ln[1]) for ln in lines[:5]] == want and len(lines) == 10
    assert "known user" in text and "cold start" in text and "weights 1,1.8,1.2" in text
    assert cli.main(["recommend", "--user-id", str(uid), "--k", "0", "--model", bundle]) == 2
    assert "k must be an integer from 1 to 10000" in capsys.readouterr().err
    assert cli.main(["recommend", "--user-id", str(uid), "--weights", "1,2", "--model", bundle]) == 2
    assert "one weight per objective (exposure, click, conversion)" in capsys.readouterr().err


def test_recommend_shows_item_features_next_to_ids(tiny_world, capsys):
    """`--features`: each recommended item's features, decoded from the bundle, equal to the dataset's
    own items.parquet (read here with polars)."""
    bundle = str(tiny_world["bundle"])
    rec = Recommender.load(bundle)
    uid = int(rec.user_vocab[2])
    assert cli.main(["recommend", "--user-id", str(uid), "--k", "5", "--features", "--model", bundle]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(ln.split() for ln in lines if ln.startswith("rank"))
    items = pl.read_parquet(tiny_world["ds"] / "items.parquet")
    feature_cols = [c for c in items.columns if c != "item_id"]
    assert header[:3] == ["rank", "item_id", "score"] and sorted(header[3:]) == sorted(feature_cols)
    rows = [ln.split() for ln in lines if ln.strip() and ln.split()[0].isdigit()]
    assert [int(r[1]) for r in rows] == rec.recommend([uid], k=5)[0]["items"]
    by_id = {row["item_id"]: row for row in items.iter_rows(named=True)}
    for r in rows:
        truth = by_id[int(r[1])]
        for col, cell in zip(header[3:], r[3:]):
            want = truth[col]
            if isinstance(want, float):
                assert float(cell) == pytest.approx(want, rel=1e-3, abs=1e-6), (col, cell, want)
            else:
                assert cell == str(want), (col, cell, want)


def test_evaluate_command(tiny_world, capsys):
    args = [
        "evaluate",
        "--model",
        str(tiny_world["bundle"]),
        "--data",
        str(tiny_world["ds"]),
        "--k",
        "10",
        "50",
    ]
    assert cli.main(args) == 0
    want = metrics_table(Recommender.load(tiny_world["bundle"]).evaluate(tiny_world["mr"], ks=(10, 50)))
    out = capsys.readouterr().out
    assert want in out  # same windows as the model-ready data of the fixture
    assert "Model minus popularity" in out and "| click | fused | recall@50 |" in out


def test_evaluate_on_data_with_other_objectives_names_the_data(tiny_world, tmp_path, capsys):
    """The refusal named the temporary model-ready copy (/tmp/csmf-eval-.../mr), not the data given."""
    import shutil

    import yaml

    other = shutil.copytree(tiny_world["ds"], tmp_path / "two")
    spec = yaml.safe_load((other / "dataset.yaml").read_text())
    spec["objectives"] = spec["objectives"][:2]
    (other / "dataset.yaml").write_text(yaml.safe_dump(spec))
    assert cli.main(["evaluate", "--model", str(tiny_world["bundle"]), "--data", str(other)]) == 2
    err = capsys.readouterr().err
    assert (
        f"{other}/dataset.yaml has objectives ['exposure', 'click'], the model" in err
        and "csmf-eval" not in err
    )


def _fake_pipeline(monkeypatch, calls: list):
    def csmf_daily(**kwargs):
        calls.append({"kwargs": kwargs, "env": {k: os.environ.get(k) for k in ENV}})
        return {
            "mlflow_run_id": "0123abcd" * 4,
            "tracking_uri": os.environ["MLFLOW_TRACKING_URI"],
            "experiment": "csmf",
            "model_version": "7",
            "bundle_dir": "/somewhere/bundle",
            "metrics_table": "| objective | recall@50 |\n|---|---|\n| click | 0.5 |",
            "metrics": [
                {"objective": "click", "scorer": sc, "k": k, "recall": r, "ndcg": n, "users": 9}
                for sc, k, r, n in [
                    ("click", 50, 0.5, 0.25),
                    ("click", 10, 0.2, 0.1),
                    ("popularity", 50, 0.125, 0.0625),
                ]
            ],
        }

    monkeypatch.setitem(sys.modules, "flows.pipeline", types.SimpleNamespace(csmf_daily=csmf_daily))
    _no_temporary_api(monkeypatch, calls)


def _no_temporary_api(monkeypatch, calls: list) -> None:
    """`csmf run` launches Prefect's temporary API early (flows/local_api.py): a stand-in here that
    records its launch and its wait in `calls` (and the MLflow stores opened meanwhile), so that the
    stand-in flows start no server."""

    class Api:
        def wait(self):
            calls.append("api waited")
            return self

        @contextlib.contextmanager
        def use(self):  # the flow runs inside: its clients talk to this server
            calls.append("api used")
            yield
            calls.append("api released")

    def start():
        if os.environ.get("PREFECT_API_URL"):
            return None
        calls.append("api launched")
        return Api()

    monkeypatch.setattr("flows.local_api.start_temporary_api", start)
    monkeypatch.setattr(cli, "_open_tracking_store", lambda: calls.append("stores opened"))


def test_run_launches_the_temporary_api_early_and_waits_before_the_flow(
    tiny_world, tmp_path, monkeypatch, capsys, clean_env
):
    """No Prefect server configured: the temporary API is launched before the run's own checks and
    imports and waited for just before the flow; a bad config still fails with exit 2 (the server is
    stopped at exit); with PREFECT_API_URL nothing is launched."""
    calls: list = []
    _fake_pipeline(monkeypatch, calls)
    args = ["run", "--data", str(tiny_world["ds"]), "--home", str(tmp_path / "h")]
    assert cli.main(args) == 0
    # the MLflow stores are opened while the server starts, before the wait; the flow runs in use()
    assert calls[:4] == ["api launched", "stores opened", "api waited", "api used"]
    assert isinstance(calls[4], dict) and calls[5:] == ["api released"]
    calls.clear()
    assert cli.main([*args, "--set", "train.lr=-1"]) == 2
    assert calls == ["api launched"]  # launched, never waited for: the flow was not reached
    calls.clear()
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert cli.main(args) == 0
    # nothing launched or waited for; the stores are still opened before the flow (its first work)
    assert calls[0] == "stores opened" and len(calls) == 2 and isinstance(calls[1], dict)


def test_run_passes_from_model(tiny_world, tmp_path, monkeypatch, capsys, clean_env):
    calls: list = []
    _fake_pipeline(monkeypatch, calls)
    args = [
        "run",
        "--data",
        str(tiny_world["ds"]),
        "--home",
        str(tmp_path / "home"),
        "--from-model",
        "models:/csmf/3",
    ]
    assert cli.main(args) == 0
    (call,) = [c for c in calls if isinstance(c, dict)]
    assert call["kwargs"]["from_model"] == "models:/csmf/3"


def test_run_calls_the_flow_with_the_home_set_up(tiny_world, tmp_path, monkeypatch, capsys, clean_env):
    calls: list = []
    _fake_pipeline(monkeypatch, calls)
    home = tmp_path / "home"
    args = ["run", "--data", str(tiny_world["ds"]), "--home", str(home), "--set", "train.epochs=1"]
    assert cli.main(args) == 0
    (call,) = [c for c in calls if isinstance(c, dict)]
    assert call["kwargs"] == {
        "date": tiny_world["dates"][-1],
        "data": str(tiny_world["ds"].resolve()),
        "config": None,
        "overrides": ["train.epochs=1"],
        "home": str(home.resolve()),
        "tuned": "auto",
        "from_model": None,
    }
    assert call["env"]["MLFLOW_TRACKING_URI"] == f"sqlite:///{home.resolve()}/mlflow.db"
    assert call["env"]["PREFECT_HOME"] == str(home.resolve() / "prefect")
    assert (
        call["env"]["PREFECT_API_URL"] is None and call["env"]["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    )
    out = capsys.readouterr().out
    assert "0123abcd" * 4 in out and "csmf ui" in out and "version 7" in out
    # the compact table: K=50 only (primary_k), own mode and popularity, "recall / ndcg"
    assert "Recall@50 / nDCG@50" in out and "0.2000" not in out
    (line,) = [x for x in out.splitlines() if x.startswith("click ")]
    assert line.split() == ["click", "9", "0.5000", "/", "0.2500", "0.1250", "/", "0.0625"]

    assert cli.main([*args, "--set", "train.lr=-1"]) == 2  # config checked before the flow starts
    assert "train.lr must be > 0" in capsys.readouterr().err
    assert len([c for c in calls if isinstance(c, dict)]) == 1
    assert cli.main(["run", "--data", str(tmp_path / "none"), "--home", str(home)]) == 2
    assert "csmf synth --out" in capsys.readouterr().err


def test_run_honours_prefect_api_url_and_finds_the_make_serve_stack(
    tiny_world, tmp_path, monkeypatch, capsys, clean_env
):
    """PREFECT_API_URL is kept as exported; unset, a healthy `make serve` stack of the same home (its
    state.json, a live server process, /api/health answering) is used, so the run shows in that UI;
    otherwise Prefect's temporary server, and the command says which."""
    import http.server
    import json
    import threading

    import psutil

    calls: list = []
    _fake_pipeline(monkeypatch, calls)
    home = tmp_path / "home"
    args = ["run", "--data", str(tiny_world["ds"]), "--home", str(home)]

    flow_calls = lambda: [c for c in calls if isinstance(c, dict)]  # noqa: E731
    assert cli.main(args) == 0  # nothing running, nothing exported
    assert flow_calls()[-1]["env"]["PREFECT_API_URL"] is None
    assert "temporary local server" in capsys.readouterr().out

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/api/health" else 404)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    api = f"http://127.0.0.1:{server.server_address[1]}/api"
    try:
        (home / "serve").mkdir(parents=True)
        me = {"pid": os.getpid(), "create_time": psutil.Process().create_time()}
        (home / "serve" / "state.json").write_text(json.dumps({"api_url": api, "processes": {"server": me}}))
        assert cli.main(args) == 0
        assert calls[-1]["env"]["PREFECT_API_URL"] == api
        assert f"Prefect API {api} (the `make serve` stack of this home)" in capsys.readouterr().out

        monkeypatch.setenv("PREFECT_API_URL", "http://prefect.example:4200/api")
        assert cli.main(args) == 0
        assert calls[-1]["env"]["PREFECT_API_URL"] == "http://prefect.example:4200/api"
        assert "(from PREFECT_API_URL)" in capsys.readouterr().out
    finally:
        server.shutdown()
    monkeypatch.delenv("PREFECT_API_URL")
    assert cli.main(args) == 0  # the stack's server is gone: back to the temporary server
    assert flow_calls()[-1]["env"]["PREFECT_API_URL"] is None
    assert "temporary local server" in capsys.readouterr().out


def test_run_without_data_generates_it_once(tiny_world, tmp_path, monkeypatch, capsys, clean_env):
    calls: list = []
    _fake_pipeline(monkeypatch, calls)
    made = []

    def fake_generate(out, preset, seed, overwrite=False):
        made.append((preset, seed))
        shutil.copytree(tiny_world["ds"], out)

    monkeypatch.setattr("csmf_core.synth.generate", fake_generate)
    monkeypatch.setenv("CSMF_HOME", str(tmp_path / "h"))
    for _ in range(2):
        assert cli.main(["run"]) == 0
    assert made == [("small", 0)]
    data = tmp_path / "h" / "data" / "synth-small"
    assert [c["kwargs"]["data"] for c in calls if isinstance(c, dict)] == [str(data.resolve())] * 2
    assert "Using the generated dataset" in capsys.readouterr().out


def test_setup_home_keeps_variables_already_set(tmp_path, monkeypatch, clean_env):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "true")
    home = setup_home(tmp_path / "h")
    assert home == (tmp_path / "h").resolve() and home.is_dir()
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://tracking:5000"
    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "true"
    assert os.environ["PREFECT_HOME"] == str(home / "prefect") and Path(os.environ["PREFECT_HOME"]).is_dir()
    assert os.environ["CSMF_HOME"] == str(home) and "PREFECT_API_URL" not in os.environ
    assert os.environ["DO_NOT_TRACK"] == "1"  # no Prefect client telemetry, no first-run notice
    # MLflow reads DO_NOT_TRACK only as "true" (and under pytest never sends): its own switch, read
    # the way MLflow reads it
    from mlflow.environment_variables import MLFLOW_DISABLE_TELEMETRY

    assert MLFLOW_DISABLE_TELEMETRY.get() is True
    assert (
        os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "120"
    )  # Prefect's 20 s is too short
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "p"))
    monkeypatch.setenv("CSMF_HOME", str(tmp_path / "env-home"))
    assert setup_home(None) == (tmp_path / "env-home").resolve()
    assert os.environ["PREFECT_HOME"] == str(tmp_path / "p")


def test_no_artifact_progress_bar_after_setup_home(tmp_path, monkeypatch, clean_env, capsys):
    """`make run` printed MLflow's "Downloading artifacts: ...| 13/13" tqdm bar in the register task
    (log_model reloads the model to check the input example); setup_home turns the bar off, where the
    user has not chosen otherwise."""
    from mlflow.utils.file_utils import ArtifactProgressBar

    def drawn() -> str:
        with ArtifactProgressBar.files(desc="Downloading artifacts", total=13) as bar:
            for _ in range(13):
                bar.update()
        return capsys.readouterr().err

    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true")
    assert "Downloading artifacts" in drawn()  # the control: MLflow draws it by default
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    setup_home(tmp_path / "h")
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"
    assert drawn() == ""
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true")  # a user's own choice wins
    setup_home(tmp_path / "h")
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "true"


def test_no_prefect_telemetry_notice_in_a_terminal(tmp_path, clean_env):
    """`import prefect` on a terminal with a fresh PREFECT_HOME prints Prefect's first-run telemetry
    notice unless DO_NOT_TRACK is set; setup_home sets it (where unset), so `csmf run` shows none.
    Both runs happen under a pseudo-terminal, the first without setup_home, as the control."""
    import pty

    def run(code: str, home: Path) -> str:
        main, child = pty.openpty()
        env = {k: v for k, v in os.environ.items() if k not in ENV and k != "CI"}
        env |= {"PREFECT_HOME": str(home / "prefect"), "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        proc = subprocess.run(
            [sys.executable, "-c", code], stdin=child, stdout=child, stderr=child, env=env, timeout=120
        )
        os.close(child)
        out = b""
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        os.close(main)
        assert proc.returncode == 0, out.decode(errors="replace")
        return out.decode(errors="replace")

    notice = "anonymous usage data"
    assert notice in run("import prefect", tmp_path / "bare")  # the control: the notice exists
    quiet = run(
        f"from flows.env import setup_home; import os; os.environ.pop('PREFECT_HOME'); "
        f"setup_home({str(tmp_path / 'h')!r}); import prefect; print('imported')",
        tmp_path / "h2",
    )
    assert "imported" in quiet and notice not in quiet


def test_ui_runs_mlflow_on_the_home_store(tmp_path, monkeypatch, capsys, clean_env):
    seen, stopped = [], []

    def popen(cmd, **kwargs):
        seen.append(cmd)
        assert kwargs == {"start_new_session": True}  # its own group: stopped as a whole (flows.lock)
        return types.SimpleNamespace(pid=424242, wait=lambda: 0)

    monkeypatch.setattr(cli.subprocess, "Popen", popen)
    monkeypatch.setattr("flows.lock.stop_process_group", lambda pid, timeout: stopped.append(pid))
    # mlflow ui serves until stopped: exiting by itself (status 0 or not) is a failure
    assert cli.main(["ui", "--home", str(tmp_path), "--port", "5099"]) == 1
    assert stopped == [424242]  # even when mlflow exits by itself: its workers go with it
    uri = f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert seen == [
        [
            sys.executable,
            "-m",
            "mlflow",
            "ui",
            "--backend-store-uri",
            uri,
            "--host",
            "127.0.0.1",
            "--port",
            "5099",
        ]
    ]
    out = capsys.readouterr()
    assert "http://127.0.0.1:5099" in out.out and "stopped by itself (exit status 0)" in out.err


def test_ui_refuses_a_busy_or_impossible_port_before_starting(tmp_path, monkeypatch, capsys, clean_env):
    """mlflow ui logged 'Address already in use' and exited 0 (csmf ui then said 0); port 99999 was a
    uvicorn traceback with status 0."""
    import socket

    monkeypatch.setattr(cli.subprocess, "Popen", lambda *a, **k: pytest.fail("mlflow ui must not start"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.main(["ui", "--home", str(tmp_path / "h"), "--port", str(port)]) == 2
        assert f"--port {port}: 127.0.0.1:{port} is in use" in capsys.readouterr().err
    for bad in ("99999", "0", "http"):
        with pytest.raises(SystemExit) as exit_:
            cli.main(["ui", "--port", bad])
        assert exit_.value.code == 2 and "--port" in capsys.readouterr().err
    assert not (tmp_path / "h").exists()


def _failing_pipeline(monkeypatch, exc: BaseException):
    def csmf_daily(**kwargs):
        raise exc

    monkeypatch.setitem(sys.modules, "flows.pipeline", types.SimpleNamespace(csmf_daily=csmf_daily))
    _no_temporary_api(monkeypatch, [])


def _diverged() -> BaseException:
    from csmf_core.optim import TrainingDiverged

    return TrainingDiverged("pretrain_exposure (train): loss nan at epoch 1, step 3. Lower train.lr")


@pytest.mark.parametrize(
    "make, text",
    [
        (lambda: RunLocked("another csmf-daily run for 2026-01-06 is training (pid 7)"), "is training"),
        (_diverged, "Lower train.lr"),
        (lambda: OSError(errno.ENOSPC, "No space left on device", "/h/runs/x"), "free space or fix"),
        (lambda: NotADirectoryError(errno.ENOTDIR, "Not a directory", "/h/mlartifacts/1"), "Not a directory"),
    ],
    ids=["RunLocked", "TrainingDiverged", "disk-full", "unwritable-artifacts"],
)
def test_a_failed_run_is_one_message_and_exit_2(
    make, text, tiny_world, tmp_path, monkeypatch, capsys, clean_env
):
    """What the flow raises reaches the console as one `csmf run: error:` paragraph, exit 2; --debug
    keeps the traceback (the exception propagates)."""
    _failing_pipeline(monkeypatch, make())
    args = ["run", "--data", str(tiny_world["ds"]), "--home", str(tmp_path / "h")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("csmf run: error:") == 1 and text in err and "Traceback" not in err
    assert "--debug" in err
    with pytest.raises(type(make())):
        cli.main(["--debug", *args])


def test_quiet_run_tracebacks_keeps_the_message_drops_the_traceback():
    """Prefect's console handler formats flow/task run records without exc_info while a run is
    quiet; other loggers keep their tracebacks; the original formatter comes back afterwards."""
    import logging

    from prefect.logging.formatters import PrefectFormatter
    from prefect.logging.handlers import PrefectConsoleHandler

    console = PrefectConsoleHandler(stream=io.StringIO())  # as prefect's logging.yml sets up the root's
    before = PrefectFormatter(format="%(levelname)s | %(name)s - %(message)s")
    console.setFormatter(before)
    logging.getLogger().addHandler(console)

    def record(name: str) -> logging.LogRecord:
        try:
            raise ValueError("the step's own error")
        except ValueError:
            return logging.getLogger(name).makeRecord(
                name, logging.ERROR, __file__, 1, "Task run failed with exception: %r", (1,), sys.exc_info()
            )

    with cli.quiet_run_tracebacks():
        quiet = console.format(record("prefect.task_runs"))
        other = console.format(record("prefect.server"))
    assert "Task run failed with exception: 1" in quiet and "Traceback" not in quiet
    assert "Traceback" in other and "the step's own error" in other
    assert console.formatter is before
    assert "Traceback" in console.format(record("prefect.flow_runs"))
    logging.getLogger().removeHandler(console)


def test_import_and_synth_name_the_overwrite_flag(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    (out / "dataset.yaml").write_text("name: old\n")
    assert cli.main(["import", "kuairand", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "add --overwrite" in err and "overwrite=True" not in err
    assert cli.main(["synth", "--out", str(out), "--preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "add --overwrite" in err and "overwrite=True" not in err
    assert (out / "dataset.yaml").read_text() == "name: old\n"  # nothing replaced


@pytest.mark.parametrize("command", ["synth", "import"])
def test_overwrite_never_deletes_what_is_not_an_earlier_output(tmp_path, monkeypatch, capsys, command):
    """--overwrite replaced whatever --out named: a folder of the user's files, a plain file, '.'."""
    folder, plain, src = tmp_path / "work", tmp_path / "file.txt", tmp_path / "src"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("important")
    plain.write_text("important")
    src.mkdir()
    (tmp_path / "elsewhere" / "here").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "elsewhere" / "here")  # ".." contains the current directory
    args = ["synth", "--preset", "tiny"] if command == "synth" else ["import", "kuairand", str(src)]
    for out, reason in (
        (folder, "holds no dataset.yaml"),
        (plain, "is a file"),
        (folder, "holds no"),
        (Path(".."), "current directory"),
    ):
        assert cli.main([*args, "--out", str(out), "--overwrite"]) == 2
        assert reason in capsys.readouterr().err
    # without --overwrite too: the reason, not "add --overwrite" (which would not help)
    assert cli.main([*args, "--out", str(folder)]) == 2
    assert "holds no dataset.yaml" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "sub"]
    assert (folder / "notes.txt").read_text() == plain.read_text() == "important"
    # an earlier output (it holds dataset.yaml) is replaced
    if command == "synth":
        ds = tmp_path / "ds"
        assert cli.main(["synth", "--out", str(ds), "--preset", "tiny"]) == 0
        (ds / "stale.txt").write_text("x")
        assert cli.main(["synth", "--out", str(ds), "--preset", "tiny", "--overwrite"]) == 0
        assert not (ds / "stale.txt").exists() and (ds / "dataset.yaml").is_file()


def test_unwritable_prefect_home_is_refused_before_prefect_starts(tmp_path, monkeypatch, capsys, clean_env):
    """Works as root too: a PREFECT_HOME below a regular file cannot be written by anyone."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    home = tmp_path / "h"
    setup_home(home)
    check_writable(home)  # a fresh home is fine
    monkeypatch.setenv("PREFECT_HOME", str(blocker / "prefect"))
    with pytest.raises(HomeNotWritable, match="is not writable"):
        check_writable(home)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")  # a Prefect server: not needed
    check_writable(home)
    monkeypatch.delenv("PREFECT_API_URL")
    assert cli.main(["run", "--home", str(home), "--data", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "is not writable" in err and "--home" in err and "Traceback" not in err


def _read_only(home: Path) -> list[str]:
    """A command prefix under which `home` is read-only: chmod for a normal user; for root (whom
    permission bits do not stop) a private mount namespace with a read-only bind mount of `home`."""
    if os.geteuid() != 0:
        for p in [home, *home.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)
        return []
    if shutil.which("unshare") is None:
        pytest.skip("running as root without unshare(1): no way to make a directory read-only for root")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"running as root and unshare -m is not permitted here: {probe.stderr.decode()[:200]}")
    script = f'mount --bind "{home}" "{home}" && mount -o remount,bind,ro "{home}" && exec "$@"'
    return ["unshare", "-m", "sh", "-c", script, "sh"]


def test_read_only_home_with_state_fails_at_once(tiny_world, tmp_path):
    """A read-only home that already holds state used to loop ~2 minutes in Prefect's server restarts
    (thousands of log lines); now: one message, exit 2, in seconds."""
    home = tmp_path / "home"
    for d in ("prefect", "runs", "locks"):
        (home / d).mkdir(parents=True)
    (home / "mlflow.db").write_bytes(b"")
    (home / "prefect" / "prefect.db").write_bytes(b"")
    prefix = _read_only(home)
    env = {k: v for k, v in os.environ.items() if k not in ENV}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2]) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-c", "import sys; from flows.cli import main; sys.exit(main())"]
    t0 = time.perf_counter()
    try:
        res = subprocess.run(
            [*prefix, *cmd, "run", "--home", str(home), "--data", str(tiny_world["ds"])],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
    finally:
        if os.geteuid() != 0:
            for p in [home, *home.rglob("*")]:
                p.chmod(p.stat().st_mode | 0o200)
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert "csmf run: error: the csmf home" in res.stderr and "is not writable" in res.stderr, out
    assert "Traceback" not in out and len(out.splitlines()) <= 3, out
    assert time.perf_counter() - t0 < 60


def test_json_out_is_checked_before_any_work(tmp_path, capsys, clean_env):
    """--json-out was written after the flow: a run that trained and registered a model then failed
    on a missing folder or a directory path. Now checked first: nothing starts, the home is untouched."""
    home, folder = tmp_path / "home", tmp_path / "results"
    folder.mkdir()
    for out, reason in (
        (folder, "is a directory"),
        (tmp_path / "file" / "r.json", "cannot create its folder"),
    ):
        (tmp_path / "file").write_text("")  # a plain file where the folder should be
        assert cli.main(["run", "--home", str(home), "--json-out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"--json-out {out}" in err and reason in err
        assert not home.exists()
    # a missing folder is created (as embed --out does), still before any work
    assert cli.check_output_file(str(tmp_path / "new" / "deep" / "r.json"), "--json-out") is not None
    assert (tmp_path / "new" / "deep").is_dir()


def test_cuda_without_a_device_and_no_methods_are_refused_before_prefect(
    tmp_path, monkeypatch, capsys, clean_env
):
    """train.device=cuda on a CPU-only torch was an AssertionError inside a task; --methods "" ran
    zero methods and failed with 'every run failed: []'."""
    import torch

    from flows.runs import device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="train.device=cuda but torch sees no CUDA device"):
        device(build_config({}, ["train.device=cuda"]))
    assert device(build_config({}, ["train.device=auto"])) == "cpu"
    for methods in ("", ",", " , "):
        assert (
            cli.main(
                ["compare", "--home", str(tmp_path / "h"), "--data", str(tmp_path), "--methods", methods]
            )
            == 2
        )
        assert "no method named" in capsys.readouterr().err


def test_validate_reads_a_uri_and_names_a_file_given_for_the_directory(tmp_path, capsys):
    """`csmf validate file:///...` collapsed '//' (an argparse Path) and reported a missing directory."""
    from csmf_core import synth

    data = tmp_path / "d"
    synth.generate(data, "tiny", n_days=2)
    assert cli.main(["validate", data.as_uri()]) == 0
    assert f"dataset {data}: OK" in capsys.readouterr().out
    assert cli.main(["validate", str(data / "dataset.yaml")]) == 1
    assert (
        f"is a file, not a dataset directory (rule: missing_path); fix: give the folder that holds it: {data}"
        in (capsys.readouterr().out)
    )


def test_hints_carry_home_only_where_later_commands_would_not_find_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "_SHELL_HOME", None)
    assert cli.home_flag(tmp_path / ".csmf") == ""  # ./.csmf: found without --home
    assert cli.home_flag(tmp_path / "h") == f" --home {tmp_path / 'h'}"
    monkeypatch.setattr(cli, "_SHELL_HOME", str(tmp_path / "h"))  # the shell's $CSMF_HOME finds it
    assert cli.home_flag(tmp_path / "h") == "" and cli.home_flag(tmp_path / ".csmf") != ""
    text = cli.summarize_run({"mlflow_run_id": "r", "tracking_uri": "sqlite:///x"}, 50, tmp_path / "other")
    assert (
        f"csmf ui --home {tmp_path / 'other'}" in text
        and f"csmf recommend --home {tmp_path / 'other'}" in text
    )


def test_evaluation_notes_say_when_figures_are_not_what_they_seem(tmp_path):
    """csmf evaluate scored a KuaiRand model on synth data (every figure 0, no word why) and a model on
    its own training days (in-sample figures) without a note."""
    import numpy as np
    import polars as pl

    from csmf_core import synth
    from flows.cli_serving import evaluation_notes

    data = tmp_path / "d"
    synth.generate(data, "tiny", n_days=3)
    day = sorted(p.name[3:] for p in (data / "events").iterdir())[-1]
    events = pl.read_parquet(data / "events" / f"dt={day}")
    users, items = np.unique(events["user_id"].to_numpy()), np.unique(events["item_id"].to_numpy())
    rec = types.SimpleNamespace(user_vocab=users[: len(users) // 2], item_vocab=items)
    meta = {"train_dates": ["2026-01-01", day], "dataset": {"name": "synth-tiny"}}
    notes = evaluation_notes(rec, meta, data, day)
    assert notes == [
        f"the model trained on 2026-01-01 .. {day}; {day} is inside that window, so these figures are not "
        "out of sample (evaluate on a later day for that)",
        f"{len(users) // 2:,} of {len(users):,} users of {day} are known to the model (the others are cold starts)",
    ]
    # a model continued from one trained on later data has seen what that one saw (bundle lineage)
    rec = types.SimpleNamespace(user_vocab=users, item_vocab=items, info={"extra": {"trained_through": day}})
    assert evaluation_notes(
        rec, {"train_dates": ["2026-01-01"], "dataset": {"name": "synth-tiny"}}, data, day
    ) == [
        f"the model trained on 2026-01-01 .. {day} (with the model it continued); {day} is inside that window, "
        "so these figures are not out of sample (evaluate on a later day for that)"
    ]
    rec = types.SimpleNamespace(user_vocab=users, item_vocab=np.array([-1, -2]))
    meta = {"train_dates": ["2026-01-01"], "dataset": {"name": "kuairand-pure-slice"}}
    assert evaluation_notes(rec, meta, data, day) == [
        "the model was trained on dataset 'kuairand-pure-slice', this is 'synth-tiny'",
        f"WARNING: none of the {len(items):,} items of {day} is known to the model: is this the data it was "
        "trained on?",
    ]


def test_default_date_fits_the_evaluation_window():
    """--set data.eval_days=3 without --date always failed: the default date was the newest partition."""
    dates = ["2026-01-01", "2026-01-02", "2026-01-03", "2026-01-04"]
    from flows.inputs import default_eval_day

    assert default_eval_day(dates, 1) == "2026-01-04"
    assert default_eval_day(dates, 3) == "2026-01-02"
    assert default_eval_day(["2026-01-01", "2026-01-04"], 2) == "2026-01-04"  # 01-03 has no partition


def test_read_only_commands_refuse_a_home_that_does_not_exist(tmp_path, capsys, clean_env, monkeypatch):
    """A mistyped --home made a new empty home (mlflow.db, prefect/) and answered from its empty
    registry ("no champion yet"), leaving the directory behind."""
    typo = tmp_path / "hmoe"
    for args in (
        ["recommend", "--user-id", "1"],
        ["ui", "--port", "5098"],
        ["evaluate", "--data", str(tmp_path)],
        ["doctor"],
    ):
        assert cli.main([*args, "--home", str(typo)]) == 2
        assert f"no csmf home at {typo}" in capsys.readouterr().err
    assert not typo.exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'server.db'}")  # registry elsewhere
    from flows.env import existing_home

    assert existing_home(typo) == typo.resolve() and typo.is_dir()


def test_date_arguments_are_checked_and_written_as_yyyy_mm_dd():
    from flows.console import iso_date

    assert iso_date("2026-01-05") == iso_date("20260105") == "2026-01-05"
    for bad in ("2026/01/05", "2026-02-30", "tomorrow"):
        with pytest.raises(argparse.ArgumentTypeError, match="is not YYYY-MM-DD"):
            iso_date(bad)


def test_daily_run_name_names_the_day_the_run_evaluates(tmp_path, monkeypatch):
    """A deployment run without a date was named after the newest partition even with
    data.eval_days > 1, where the run evaluates from an earlier day (default_eval_day)."""
    import flows.pipeline as pipeline

    data = tmp_path / "data"
    for day in ("2026-01-01", "2026-01-02", "2026-01-03", "2026-01-04"):
        (data / "events" / f"dt={day}").mkdir(parents=True)
        (data / "events" / f"dt={day}" / "part-0.parquet").write_bytes(b"")
    conf = tmp_path / "two.yaml"
    conf.write_text("data:\n  eval_days: 2\n")

    def name(**params):
        params = {"data": str(data), "home": str(tmp_path / "home"), "tuned": "none", **params}
        monkeypatch.setattr(pipeline, "flow_run", types.SimpleNamespace(parameters=params))
        return pipeline.daily_run_name()

    assert name() == "csmf-daily-2026-01-04"
    assert name(overrides=["data.eval_days=3"]) == "csmf-daily-2026-01-02"
    assert name(config=str(conf)) == "csmf-daily-2026-01-03"
    assert name(date="2026-01-02", overrides=["data.eval_days=3"]) == "csmf-daily-2026-01-02"
    assert name(overrides=["data.eval_days=oops"]) == "csmf-daily-latest"  # the flow names the error


def test_the_run_summary_says_when_no_model_is_champion(tmp_path):
    """A first model the gate did not promote was summarised as `champion kept (champion: vNone)`, and
    the hint `csmf recommend --user-id <id>` then failed (no champion to serve)."""
    from flows.reporting import gate_verdict, run_summary

    base = {"mlflow_run_id": "r", "tracking_uri": "sqlite:///x", "model_version": "1"}
    none = {"promoted": False, "champion_version": None, "reason": "the evaluation data cannot measure it"}
    text = cli.summarize_run({**base, "gate": none}, 50, tmp_path / ".csmf")
    assert "Gate:              not promoted (no champion yet): the evaluation data" in text
    assert "csmf recommend --home" in text and "--model models:/csmf/1 --user-id <id>" in text
    assert "vNone" not in run_summary({**base, "gate": none}, 50, "2026-01-06")
    kept = {"promoted": False, "champion_version": "3"}
    assert gate_verdict(kept) == "champion kept (champion: v3)"
    assert gate_verdict({"promoted": True, "champion_version": "4"}) == "promoted to champion (champion: v4)"
    text = cli.summarize_run({**base, "gate": kept}, 50, tmp_path / ".csmf")
    assert "--model" not in text  # the champion serves


def test_a_broken_pipe_is_quiet_only_when_stdout_is_the_pipe(monkeypatch):
    """`csmf recommend ... | head` ended with a disk-full hint; it now exits 141 quietly, but only when
    stdout is the pipe whose reader has gone: a BrokenPipeError of anything else stays an error."""
    r, w = os.pipe()
    out = os.fdopen(w, "w")
    monkeypatch.setattr(sys, "stdout", out)
    assert not cli._stdout_closed()  # the reader is there
    os.close(r)
    assert cli._stdout_closed()
    monkeypatch.setattr(sys, "stdout", sys.__stdout__)
    parser = cli.build_parser()

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")  # e.g. a socket's, with stdout fine

    args = parser.parse_args(["doctor"])
    monkeypatch.setattr(args, "func", broken)
    monkeypatch.setattr(parser, "parse_args", lambda argv=None: args)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.setattr(cli, "_stdout_closed", lambda: False)
    with pytest.raises(BrokenPipeError):
        cli.main(["doctor"])
    out.close()
