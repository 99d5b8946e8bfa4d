"""Request limits of the REST server (`mlflow models serve` on the registered pyfunc).

What mlflow 3.17's scoring server (mlflow/pyfunc/scoring_server) offers: uvicorn runs
`scoring_server.app:app`, a FastAPI app whose /invocations handler reads the whole body
(`await request.body()`), parses it in a worker thread (json.loads, then pandas) and calls the model.
Its one setting is MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT (default 60 s): past it the client gets a
504, but the work goes on in its thread. It has no limit on the body size, the rows of a request or
the JSON nesting (a 5,000-deep body makes json.loads raise RecursionError: HTTP 500), and no way to
add middleware. Uvicorn reads `UVICORN_*` variables (`UVICORN_LIMIT_CONCURRENCY=N`: HTTP 503 above N
open connections) but has no body limit either.

So the pyfunc enforces these, read from the server's environment when the model loads:

| variable | default | what happens above it |
|---|---|---|
| `CSMF_SERVE_MAX_USERS` | 10000 | HTTP 400 INVALID_PARAMETER_VALUE: rows (users) of one request, checked by `CSMFPyfunc.predict` before any work (also for `mlflow.pyfunc.load_model(...).predict`) |
| `CSMF_SERVE_MAX_BODY_BYTES` | 2 MiB | HTTP 413 REQUEST_LIMIT_EXCEEDED, before the body is read: a larger Content-Length is refused at once, a chunked body as soon as it passes the limit |
| `CSMF_SERVE_MAX_JSON_DEPTH` | 32 (at most 500) | HTTP 400 INVALID_PARAMETER_VALUE for a JSON body nested deeper (a valid request is 4-5 deep), before json.loads |

The last two work by replacing `starlette.requests.Request.body`, the call through which mlflow's
handler reads the body, in the scoring server process only (`install_request_guard`, called from
`CSMFPyfunc.load_context` when it runs inside `mlflow.pyfunc.scoring_server.app`); the check raises
an MlflowException, which the handler's own wrapper turns into the JSON error response. Not covered:
request headers (uvicorn caps their size: `--h11-max-incomplete-event-size`), slow clients holding
connections open (uvicorn's `--timeout-keep-alive`, a proxy), the number of concurrent requests
(`UVICORN_LIMIT_CONCURRENCY`) and the time of an accepted request (bounded by the user and body
limits; MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT only answers early). A reverse proxy in front
(`client_max_body_size`) is still the place for limits per client.

This module never imports prefect; starlette is imported only when the guard is installed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from contextlib import aclosing
from dataclasses import dataclass

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import REQUEST_LIMIT_EXCEEDED

# the pyfunc's input columns (flows/registry.py: signature and predict); MLflow's schema enforcement
# drops any other column before the model sees it, so a misspelt "weight" would rank with the default
# weights in silence: the guard refuses such a request instead (`request_columns`)
INPUT_COLUMNS = ("user_id", "k", "weights", "mode")
ENV_MAX_USERS = "CSMF_SERVE_MAX_USERS"
ENV_MAX_BODY_BYTES = "CSMF_SERVE_MAX_BODY_BYTES"
ENV_MAX_JSON_DEPTH = "CSMF_SERVE_MAX_JSON_DEPTH"
DEFAULT_MAX_USERS = 10_000
DEFAULT_MAX_BODY_BYTES = 2 * 2**20
DEFAULT_MAX_JSON_DEPTH = 32
# json.loads recurses once per level and Python stops at ~1000 frames (RecursionError = HTTP 500):
# a limit well below that keeps every accepted body parseable.
MAX_JSON_DEPTH_CEILING = 500
_SERVER_APP = "mlflow.pyfunc.scoring_server.app"
_SERVER_MODEL_PATH = "__pyfunc_model_path__"  # mlflow.pyfunc.scoring_server._SERVER_MODEL_PATH


@dataclass(frozen=True)
class Limits:
    max_users: int = DEFAULT_MAX_USERS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_json_depth: int = DEFAULT_MAX_JSON_DEPTH

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Limits:
        """The limits set in the environment (module docstring), defaults for unset or empty ones."""
        env = os.environ if environ is None else environ

        def read(name: str, default: int, top: int | None = None) -> int:
            text = (env.get(name) or "").strip()
            if not text:
                return default
            try:
                value = int(text)
            except ValueError:
                value = 0
            if value < 1 or (top is not None and value > top):
                upper = f" and at most {top}" if top is not None else ""
                raise ValueError(
                    f"{name}={text!r}: expected a whole number >= 1{upper} (default {default}); "
                    "fix or unset the variable in the server's environment"
                )
            return value

        return cls(
            max_users=read(ENV_MAX_USERS, DEFAULT_MAX_USERS),
            max_body_bytes=read(ENV_MAX_BODY_BYTES, DEFAULT_MAX_BODY_BYTES),
            max_json_depth=read(ENV_MAX_JSON_DEPTH, DEFAULT_MAX_JSON_DEPTH, MAX_JSON_DEPTH_CEILING),
        )


def json_depth(body: bytes) -> int:
    """Deepest nesting of [ and { in a JSON text (0 for a bare scalar), brackets inside strings ignored.

    Vectorised, without parsing: a quote opens or closes a string unless an odd run of backslashes
    precedes it. Exact for valid JSON; for invalid text it is just a count, json.loads reports the error.
    """
    a = np.frombuffer(body, np.uint8)
    if a.size == 0:
        return 0
    quote = a == ord('"')
    backslash = a == ord("\\")
    pos = np.int32 if a.size < 2**31 else np.int64  # positions and running counts
    if backslash.any():
        idx = np.arange(a.size, dtype=pos)
        last_plain = np.maximum.accumulate(np.where(backslash, -1, idx))  # last non-backslash <= i
        run_before = np.zeros(a.size, pos)  # backslashes right before position i
        run_before[1:] = idx[:-1] - last_plain[:-1]
        quote &= run_before % 2 == 0
    outside = (np.cumsum(quote, dtype=pos) & 1) == 0
    step = ((a == ord("[")) | (a == ord("{"))).astype(np.int8) - ((a == ord("]")) | (a == ord("}")))
    step[~outside] = 0
    return max(0, int(np.cumsum(step, dtype=pos).max()))


def request_columns(payload: object) -> set[str]:
    """The column names of a parsed /invocations JSON body in any of MLflow's input formats
    (dataframe_split's columns, dataframe_records' keys, inputs / instances as a mapping of columns or
    a list of records); empty when the body has another shape (MLflow then answers it itself)."""
    if not isinstance(payload, dict):
        return set()
    cols: set[str] = set()
    split = payload.get("dataframe_split")
    if isinstance(split, dict) and isinstance(split.get("columns"), list):
        cols |= {str(c) for c in split["columns"]}
    for key in ("dataframe_records", "inputs", "instances"):
        value = payload.get(key)
        if isinstance(value, dict):
            cols |= {str(c) for c in value}
        elif isinstance(value, list):
            cols |= {str(c) for row in value if isinstance(row, dict) for c in row}
    return cols


def check_columns(body: bytes) -> None:
    """MlflowException (HTTP 400) naming the columns of a JSON request that the model does not read."""
    import json

    try:
        payload = json.loads(body)
    except ValueError:
        return  # not JSON: MLflow's own message
    unknown = sorted(request_columns(payload) - set(INPUT_COLUMNS))
    if unknown:
        raise MlflowException.invalid_parameter_value(
            f"csmf: unknown input column(s) {unknown}; the model reads {list(INPUT_COLUMNS)} (user_id "
            "required; k, weights or mode optional): a misspelt column would otherwise be dropped"
        )


def in_scoring_server() -> bool:
    """True inside the worker process of `mlflow models serve` while it loads the model."""
    return _SERVER_APP in sys.modules and bool(os.environ.get(_SERVER_MODEL_PATH))


def install_request_guard(limits: Limits) -> None:
    """Refuse oversized or too deeply nested request bodies in this (scoring server) process.

    Replaces `starlette.requests.Request.body` (module docstring); calling it again only updates the
    limits. Raises MlflowException, which mlflow's /invocations handler answers as JSON.
    """
    from starlette.requests import Request

    original = getattr(Request.body, "_csmf_original", Request.body)

    async def body(self: Request) -> bytes:
        if hasattr(self, "_body"):
            return self._body
        limits: Limits = body._csmf_limits
        declared = self.headers.get("content-length", "").strip()
        if declared.isascii() and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise _too_large(f"Content-Length {int(declared):,}", limits)
        chunks, total = [], 0
        async with aclosing(self.stream()) as stream:
            async for chunk in stream:
                total += len(chunk)
                if total > limits.max_body_bytes:
                    raise _too_large(f"more than {limits.max_body_bytes:,} bytes sent", limits)
                chunks.append(chunk)
        self._body = b"".join(chunks)
        content_type = self.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "application/json":
            depth, top = json_depth(self._body), limits.max_json_depth
            if depth > top:
                raise MlflowException.invalid_parameter_value(
                    f"csmf: the JSON body is nested {depth} levels deep, more than {ENV_MAX_JSON_DEPTH}="
                    f'{top}; a request is {{"dataframe_records": [{{"user_id": 42, "k": 10}}, ...]}} '
                    "(4-5 levels)"
                )
            check_columns(self._body)
        return self._body

    body._csmf_original = original
    body._csmf_limits = limits
    Request.body = body


class PayloadTooLarge(MlflowException):
    """A request body over CSMF_SERVE_MAX_BODY_BYTES: HTTP 413 (no mlflow error code maps to it)."""

    def get_http_status_code(self) -> int:
        return 413


def _too_large(what: str, limits: Limits) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"csmf: request body too large ({what}); the limit is {ENV_MAX_BODY_BYTES}="
        f"{limits.max_body_bytes:,} bytes. Send at most {limits.max_users:,} users per request "
        f"({ENV_MAX_USERS}) and split larger batches",
        error_code=REQUEST_LIMIT_EXCEEDED,
    )
