"""REST request limits (flows/serve_limits.py): the JSON depth scanner, the settings, and mlflow's own
scoring app (mlflow.pyfunc.scoring_server.init, in process) with and without the guard.
tests/integration/test_rest_serving.py checks the same through a real `mlflow models serve`."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import mlflow
import pandas as pd
import pytest

from flows import serve_limits
from flows.registry import CSMFPyfunc, pyfunc_spec
from flows.serve_limits import Limits, json_depth

# starlette's TestClient still runs on httpx 0.28, with a deprecation warning
pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")


def _reference_depth(text: str) -> int:
    """Depth of a JSON document from its parsed value (iterative: deep documents too)."""
    stack, best = [(json.loads(text), 1)], 0
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            best = max(best, d)
            stack += [(x, d + 1) for x in (v.values() if isinstance(v, dict) else v)]
    return best


def _random_json(rng: random.Random, depth: int):
    strings = ["", "[", "]{", '"', "\\", '\\"[', "}}}", "a\\\\", "é[", "\\u005b"]
    if depth == 0 or rng.random() < 0.3:
        return rng.choice([1, -2.5, None, True, rng.choice(strings)])
    if rng.random() < 0.5:
        return [_random_json(rng, depth - 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(strings) + str(k): _random_json(rng, depth - 1) for k in range(rng.randint(0, 3))}


def test_json_depth_matches_the_parsed_document():
    rng = random.Random(0)
    docs = [
        json.dumps(_random_json(rng, rng.randint(0, 8)), ensure_ascii=rng.random() < 0.5) for _ in range(400)
    ]
    docs += ['"[[["', '["\\\\"]', '["\\"[", {"a": [[]]}]', '{"dataframe_records": [{"user_id": 1}]}']
    for doc in docs:
        want = _reference_depth(doc) if doc.lstrip()[:1] in "[{" else 0
        assert json_depth(doc.encode()) == want, doc
    deep = "[" * 5000 + "]" * 5000
    assert json_depth(deep.encode()) == 5000 and json_depth(b"") == 0


def test_limits_from_env():
    assert Limits.from_env({}) == Limits(10_000, 2 * 2**20, 32)
    got = Limits.from_env(
        {"CSMF_SERVE_MAX_USERS": "5", "CSMF_SERVE_MAX_BODY_BYTES": " 4096 ", "CSMF_SERVE_MAX_JSON_DEPTH": ""}
    )
    assert got == Limits(5, 4096, 32)
    for name, value in [
        ("CSMF_SERVE_MAX_USERS", "0"),
        ("CSMF_SERVE_MAX_USERS", "ten"),
        ("CSMF_SERVE_MAX_BODY_BYTES", "-1"),
        ("CSMF_SERVE_MAX_BODY_BYTES", "1.5e6"),
        ("CSMF_SERVE_MAX_JSON_DEPTH", "501"),
    ]:
        with pytest.raises(ValueError, match=f"{name}='{value}': expected a whole number >= 1"):
            Limits.from_env({name: value})


# ---- the pyfunc and mlflow's scoring app -----------------------------------------------------------------
@pytest.fixture(scope="module")
def pyfunc_model(tiny_world, tmp_path_factory):
    """The registered pyfunc saved and loaded by mlflow itself (a PyFuncModel, as the server has it)."""
    path = tmp_path_factory.mktemp("pyfunc") / "model"
    mlflow.pyfunc.save_model(str(path), **pyfunc_spec(tiny_world["bundle"]))  # from code, with signature
    return mlflow.pyfunc.load_model(str(path))


def _users(tiny_world, n: int) -> list[int]:
    import polars as pl

    return pl.read_parquet(tiny_world["ds"] / "users.parquet")["user_id"].head(n).to_list()


def test_pyfunc_refuses_more_users_than_the_limit(tiny_world, monkeypatch):
    monkeypatch.setenv("CSMF_SERVE_MAX_USERS", "3")
    model = CSMFPyfunc()
    model.load_context(SimpleNamespace(artifacts={"bundle": str(tiny_world["bundle"])}))
    users = _users(tiny_world, 4)
    assert len(model.predict(None, pd.DataFrame({"user_id": users[:3], "k": 2}))) == 3
    with pytest.raises(mlflow.exceptions.MlflowException) as exc:
        model.predict(None, pd.DataFrame({"user_id": users, "k": 2}))
    assert exc.value.error_code == "INVALID_PARAMETER_VALUE"
    assert "4 users in one request, more than CSMF_SERVE_MAX_USERS=3" in exc.value.message


@pytest.fixture
def client(pyfunc_model, monkeypatch):
    """A TestClient on mlflow's scoring app; Request.body is restored after the test."""
    from mlflow.pyfunc import scoring_server
    from starlette.requests import Request
    from starlette.testclient import TestClient

    monkeypatch.setattr(Request, "body", Request.body)  # undone at teardown, whatever the test installs
    return TestClient(scoring_server.init(pyfunc_model), raise_server_exceptions=False)


def _post(client, content: bytes | str, **headers):
    return client.post(
        "/invocations", content=content, headers={"Content-Type": "application/json", **headers}
    )


def test_scoring_app_without_the_guard_fails_deep_json_with_500(client):
    r = _post(client, '{"dataframe_records": ' + "[" * 5000 + "]" * 5000 + "}")
    assert r.status_code == 500  # mlflow's own behaviour: the reason for the guard


def test_scoring_app_with_the_guard(client, tiny_world):
    serve_limits.install_request_guard(Limits(max_users=10, max_body_bytes=16384, max_json_depth=8))
    users = _users(tiny_world, 2)
    ok = _post(client, json.dumps({"dataframe_records": [{"user_id": u, "k": 3} for u in users]}))
    assert ok.status_code == 200 and [p["user_id"] for p in ok.json()["predictions"]] == users

    deep = _post(client, '{"dataframe_records": ' + "[" * 5000 + "]" * 5000 + "}")
    assert deep.status_code == 400 and deep.json()["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "nested 5001 levels deep, more than CSMF_SERVE_MAX_JSON_DEPTH=8" in deep.json()["message"]

    big = json.dumps({"dataframe_records": [{"user_id": users[0], "k": 3}]}) + " " * 20000  # valid JSON
    r = _post(client, big)
    assert r.status_code == 413 and r.json()["error_code"] == "REQUEST_LIMIT_EXCEEDED"
    assert (
        f"Content-Length {len(big):,}" in r.json()["message"]
        and "CSMF_SERVE_MAX_BODY_BYTES=16,384" in r.json()["message"]
    )

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b" " * 2000

    r = client.post("/invocations", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "more than 16,384 bytes sent" in r.json()["message"]

    serve_limits.install_request_guard(Limits(max_users=10, max_body_bytes=10**6, max_json_depth=8))
    r = _post(client, big)  # installing again updates the limits
    assert r.status_code == 200 and r.json()["predictions"][0]["user_id"] == users[0]
    assert _post(client, ok.request.content).status_code == 200


def test_request_columns_of_every_mlflow_input_format():
    assert serve_limits.request_columns(
        {"dataframe_split": {"columns": ["user_id", "wieghts"], "data": []}}
    ) == {
        "user_id",
        "wieghts",
    }
    records = {"dataframe_records": [{"user_id": 1}, {"user_id": 2, "extra": 1}]}
    assert serve_limits.request_columns(records) == {"user_id", "extra"}
    assert serve_limits.request_columns({"inputs": {"user_id": [1], "mode": ["click"]}}) == {
        "user_id",
        "mode",
    }
    assert serve_limits.request_columns({"instances": [{"user_id": 1, "k": 2}]}) == {"user_id", "k"}
    assert serve_limits.request_columns([1, 2]) == set() == serve_limits.request_columns({"inputs": [1, 2]})


def test_scoring_app_refuses_unknown_columns_and_ranks_by_mode(client, tiny_world):
    """MLflow's schema enforcement dropped columns outside the signature: {"mode": "click"} and a
    misspelt "weight" both returned the default fused ranking with HTTP 200."""
    from csmf_core.serving import Recommender

    serve_limits.install_request_guard(Limits(max_users=10, max_body_bytes=10**6, max_json_depth=8))
    users = _users(tiny_world, 2)
    for body, unknown in (
        ({"dataframe_records": [{"user_id": users[0], "weight": "0,0,1"}]}, "['weight']"),
        ({"dataframe_split": {"columns": ["user_id", "extra"], "data": [[users[0], 1]]}}, "['extra']"),
    ):
        r = _post(client, json.dumps(body))
        assert r.status_code == 400 and f"unknown input column(s) {unknown}" in r.json()["message"]
    rec = Recommender.load(tiny_world["bundle"])
    rows = [
        {"user_id": users[0], "k": 4, "mode": "click"},
        {"user_id": users[1], "k": 4, "mode": 2},
        {"user_id": users[1], "k": 4},
    ]
    r = _post(client, json.dumps({"dataframe_records": rows}))
    assert r.status_code == 200, r.json()
    preds = r.json()["predictions"]
    assert preds[0]["item_ids"] == rec.recommend([users[0]], k=4, mode="click")[0]["items"]
    assert preds[1]["item_ids"] == rec.recommend([users[1]], k=4, mode=2)[0]["items"]
    assert preds[2]["item_ids"] == rec.recommend([users[1]], k=4)[0]["items"]  # fused, default weights
    for row, message in (
        ({"user_id": users[0], "mode": "click", "weights": "1,1,1"}, "a row ranks by one of them"),
        ({"user_id": users[0], "mode": "nope"}, "unknown stage 'nope'"),
        ({"user_id": users[0], "k": "3"}, "got the string '3'"),
    ):
        r = _post(client, json.dumps({"dataframe_records": [row]}))
        assert r.status_code == 400 and message in r.json()["message"], r.json()
