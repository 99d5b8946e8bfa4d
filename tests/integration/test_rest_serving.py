"""`mlflow models serve -m models:/csmf@champion --env-manager local` on loopback, for real.

A tiny model is trained in-process (synth tiny with its ids mapped onto random 62-bit values and
int64's extremes (tests/conftest.py::widen_ids) -> prep -> cascade -> bundle), registered in a
temporary SQLite store and promoted to champion; the scoring server runs as a subprocess on a free
127.0.0.1 port with small request limits (flows/serve_limits.py). Valid requests must equal the
Recommender and `csmf recommend`, ids exactly; invalid ones must get HTTP 400 (413 for a body over
the limit) with a message naming the problem, and the server must keep answering afterwards.

    .venv/bin/pytest -m integration tests/integration/test_rest_serving.py
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import pytest

from csmf_core import synth
from csmf_core.serving import write_bundle
from flows.cli import main as csmf
from flows.env import free_port
from flows.registry import REGISTERED_MODEL, champion, load_recommender, log_and_register, promote

pytestmark = pytest.mark.integration
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_USERS, MAX_BODY_BYTES = 50, 16_384  # the server's CSMF_SERVE_MAX_USERS / CSMF_SERVE_MAX_BODY_BYTES


def post(url: str, payload: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, json.dumps(payload).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def served(tmp_path_factory, wide_ids, tiny_trainer):
    root = tmp_path_factory.mktemp("rest")
    home = root / "home"
    uri = f"sqlite:///{home / 'mlflow.db'}"
    home.mkdir()
    s = synth.generate(root / "small", "tiny", seed=0)
    wide_ids(root / "small", root / "ds")
    cfg, _, model, owners = tiny_trainer(root / "ds", root, s.dates)
    bundle = write_bundle(
        root / "bundle",
        checkpoint_dir=root / "ckpt",
        model_ready_dir=root / "mr",
        dataset_dir=root / "ds",
        config=cfg,
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("CSMF_HOME", str(home))
        mlflow.set_tracking_uri(uri)
        client = mlflow.MlflowClient(uri)
        exp = client.create_experiment("csmf", artifact_location=str(home / "mlartifacts"))
        run = client.create_run(exp)
        version = log_and_register(run.info.run_id, bundle)
        assert champion(client) is None  # registering alone never promotes
        promote(version.version, client)
        port = free_port()
        log = (root / "serve.log").open("w")
        server = subprocess.Popen(
            [
                sys.executable, "-m", "mlflow", "models", "serve",
                "-m", f"models:/{REGISTERED_MODEL}@champion",
                "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            # mlflow execs `uvicorn` by name: the venv's bin must be on PATH (as when it is activated)
            env={
                **os.environ,
                "MLFLOW_TRACKING_URI": uri,
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                "CSMF_SERVE_MAX_USERS": str(MAX_USERS),
                "CSMF_SERVE_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
            },
            start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 300  # imports mlflow, torch and faiss: slow when loaded
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"scoring server did not come up:\n{(root / 'serve.log').read_text()[-3000:]}"
                    )
                time.sleep(0.5)
            users = pl.read_parquet(root / "ds" / "users.parquet")["user_id"].head(3).to_list()
            yield {
                "port": port,
                "url": f"http://127.0.0.1:{port}/invocations",
                "home": home,
                "users": users,
                "server": server,
            }
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=10)
            log.close()
            mlflow.set_tracking_uri(None)


def _cli_recommend(
    capsys, user: int, k: int, weights: str | None, home: Path
) -> tuple[list[int], list[float]]:
    args = [
        "recommend",
        "--user-id",
        str(user),
        "--k",
        str(k),
        "--model",
        "models:/csmf@champion",
        "--home",
        str(home),
    ]
    capsys.readouterr()
    assert csmf([*args, *(["--weights", weights] if weights else [])]) == 0
    rows = [ln.split() for ln in capsys.readouterr().out.splitlines()]
    rows = [r for r in rows if len(r) == 3 and r[0].isdigit()]
    return [int(r[1]) for r in rows], [float(r[2]) for r in rows]


def test_valid_requests_match_the_recommender_and_the_cli(served, capsys):
    users = served["users"]
    unknown = -12345
    records = [
        {"user_id": users[0], "k": 5, "weights": None},
        {"user_id": users[1], "k": 7, "weights": "1,3,0.5"},
        {"user_id": unknown, "k": 4, "weights": None},
        {"user_id": INT64_MAX, "k": 3, "weights": None},  # known users (widen_ids), exact ids
        {"user_id": INT64_MIN, "k": 3, "weights": "1,3,0.5"},
        {"user_id": INT64_MAX - 1, "k": 2, "weights": None},  # the same float64 as INT64_MAX: unknown
    ]
    status, body = post(served["url"], {"dataframe_records": records})
    assert status == 200, body
    preds = body["predictions"]
    assert [p["user_id"] for p in preds] == [r["user_id"] for r in records]
    assert [len(p["item_ids"]) for p in preds] == [5, 7, 4, 3, 3, 2]
    assert [p["cold_start"] for p in preds] == [False, False, True, False, False, True]
    rec = load_recommender("models:/csmf@champion", home=served["home"])
    for p, r in zip(preds, records):
        w = None if r["weights"] is None else [float(x) for x in r["weights"].split(",")]
        want = rec.recommend([r["user_id"]], k=r["k"], weights=w)[0]
        assert p["item_ids"] == want["items"]
        np.testing.assert_allclose(p["scores"], want["scores"], rtol=1e-6)
        items, scores = _cli_recommend(capsys, r["user_id"], r["k"], r["weights"], served["home"])
        assert items == p["item_ids"]
        np.testing.assert_allclose(scores, p["scores"], atol=1e-4)  # the CLI prints 4 decimals


@pytest.mark.parametrize(
    "record, message",
    [
        ({"user_id": 1, "k": 0}, "k must be an integer from 1 to"),
        ({"user_id": 1, "k": 2.5}, "k must be an integer from 1 to"),
        ({"user_id": 1, "k": 10**9}, "k must be an integer from 1 to"),
        ({"user_id": 1, "weights": "1,2"}, "expected 3 objective weights, got 2"),
        ({"user_id": 1, "weights": "1,-2,1"}, "must be finite, >= 0"),
        ({"user_id": 1, "weights": "a,b,c"}, "expected comma-separated numbers"),
        ({"user_id": "alice"}, "user_id 'alice' is not an integer id"),
        ({"k": 3}, "input needs a user_id column"),
        ({"item": 3}, "unknown input column(s) ['item']"),  # MLflow would drop it in silence
        ({"user_id": 1, "weight": "0,0,1"}, "unknown input column(s) ['weight']"),
        ({"user_id": 1, "mode": "click", "weights": "1,1,1"}, "a row ranks by one of them"),
    ],
)
def test_invalid_requests_get_400_with_a_message(served, record, message):
    status, body = post(served["url"], {"dataframe_records": [record]})
    assert status == 400, body
    assert body.get("error_code") == "INVALID_PARAMETER_VALUE" and message in body["message"], body
    assert served["server"].poll() is None  # never a crash
    ok, _ = post(served["url"], {"dataframe_records": [{"user_id": served["users"][0], "k": 2}]})
    assert ok == 200


# ---- ids across int64 and request limits (issue 13 items 3 and 9) -----------------------------------------
@pytest.mark.parametrize(
    "records, message",
    [
        ([{"user_id": 2**63}], "user_id 9223372036854775808 is outside the int64 range"),
        ([{"user_id": -(2**63) - 1}], "user_id -9223372036854775809 is outside the int64 range"),
        ([{"user_id": 1.5}], "user_id 1.5 is not an integer id"),
        ([{"user_id": "42"}], "user_id '42' is not an integer id (a string"),
        ([{"user_id": True}], "user_id True is not an integer id"),
        ([{"user_id": None}], "user_id is missing"),
        # one float makes pandas turn the column into float64, where 2**62 + 1 is already 2**62
        ([{"user_id": 2**62 + 1}, {"user_id": 3.0}], "a float beyond 2**53"),
    ],
)
def test_ids_outside_int64_or_through_float_get_400(served, records, message):
    status, body = post(served["url"], {"dataframe_records": records})
    assert status == 400, body
    assert body.get("error_code") == "INVALID_PARAMETER_VALUE" and message in body["message"], body
    assert served["server"].poll() is None


def test_split_format_keeps_wide_ids(served):
    ids = [INT64_MIN, INT64_MAX, 2**53 + 1]
    status, body = post(
        served["url"], {"dataframe_split": {"columns": ["user_id"], "data": [[u] for u in ids]}}
    )
    assert status == 200, body
    assert [p["user_id"] for p in body["predictions"]] == ids
    assert [p["cold_start"] for p in body["predictions"]] == [False, False, False]


def test_more_users_than_the_limit_get_400(served):
    users = served["users"]
    records = [{"user_id": users[n % len(users)], "k": 1} for n in range(MAX_USERS)]
    status, body = post(served["url"], {"dataframe_records": records})
    assert status == 200 and len(body["predictions"]) == MAX_USERS
    status, body = post(served["url"], {"dataframe_records": records + records[:1]})
    assert status == 400, body
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert (
        f"{MAX_USERS + 1} users in one request, more than CSMF_SERVE_MAX_USERS={MAX_USERS}" in body["message"]
    )


def test_deeply_nested_json_gets_400(served):
    body = b'{"dataframe_records": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert len(body) < MAX_BODY_BYTES  # refused for its depth, not its size
    status, reply = _raw(served["port"], body)
    assert status == 400, reply
    assert "nested 5001 levels deep, more than CSMF_SERVE_MAX_JSON_DEPTH=32" in reply["message"]
    ok, _ = post(served["url"], {"dataframe_records": [{"user_id": served["users"][0], "k": 2}]})
    assert ok == 200


def _raw(port: int, body: bytes, headers: dict | None = None, send: bytes | None = None) -> tuple[int, dict]:
    """POST /invocations over a plain socket: `headers` as given (Content-Length of `body` unless set),
    then `send` (default `body`); returns (status, JSON reply)."""
    head = {"Host": "127.0.0.1", "Content-Type": "application/json", "Connection": "close"}
    head |= headers if headers is not None else {"Content-Length": str(len(body))}
    lines = "".join(f"{k}: {v}\r\n" for k, v in head.items())
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"POST /invocations HTTP/1.1\r\n{lines}\r\n".encode() + (body if send is None else send))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head_text, _, payload = data.partition(b"\r\n\r\n")
    status = int(head_text.split()[1])
    if b"chunked" in head_text.lower():  # de-chunk a chunked reply
        out, rest = b"", payload
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2 :]
        payload = out
    return status, json.loads(payload or b"{}")


def test_bodies_over_the_limit_get_413_before_they_are_read(served):
    valid = json.dumps({"dataframe_records": [{"user_id": served["users"][0], "k": 2}]}).encode()
    status, reply = _raw(served["port"], valid)
    assert status == 200, reply
    padded = valid + b" " * MAX_BODY_BYTES  # valid JSON, one byte too many... and more
    status, reply = _raw(served["port"], padded)
    assert status == 413 and reply["error_code"] == "REQUEST_LIMIT_EXCEEDED", reply
    assert f"CSMF_SERVE_MAX_BODY_BYTES={MAX_BODY_BYTES:,}" in reply["message"]
    # 1 GB announced, 100 bytes sent: answered at once (the server never waits for the rest)
    t0 = time.monotonic()
    status, reply = _raw(served["port"], b"", {"Content-Length": str(10**9)}, send=b" " * 100)
    assert status == 413 and f"Content-Length {10**9:,}" in reply["message"], reply
    assert time.monotonic() - t0 < 20
    # chunked, no Content-Length: refused once the bytes received pass the limit
    chunk = b" " * (MAX_BODY_BYTES + 100)
    status, reply = _raw(
        served["port"],
        b"",
        {"Transfer-Encoding": "chunked"},
        send=f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n",
    )
    assert status == 413 and f"more than {MAX_BODY_BYTES:,} bytes sent" in reply["message"], reply
    assert served["server"].poll() is None
    ok, _ = post(served["url"], {"dataframe_records": [{"user_id": served["users"][0], "k": 2}]})
    assert ok == 200
