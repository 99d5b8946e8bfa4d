"""Original user and item ids: int64 end to end, never through a float.

The canonical dataset's ids are int64 (docs/architecture.md section 1) and hashed ids fill the whole
range, so every value from -2**63 to 2**63 - 1 must survive prep, the bundle, the index, the registry
pyfunc, the CLI and REST bit for bit. A float64 holds every integer only up to 2**53: above that a
conversion silently turns an id into a neighbour (a real user becomes a cold start, the index serves
item ids that do not exist). The usual ways in are an integer column with a null (pyarrow's and
polars' `to_numpy`, pandas), a JSON or pandas column that mixes ints with a float, numpy's
`np.asarray([2**63, -1])` (float64) and `float(v)`.

`check_id` (one value) and `as_id_array` (many) are the single gate every outside id passes: they
return exact int64 values or raise ValueError saying what is wrong and how to send the id instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
FLOAT_EXACT_MAX = 2**53  # every integer of magnitude <= 2**53 has an exact float64


def check_id(value: Any, what: str = "user_id", *, allow_float: bool = True) -> int:
    """One id -> an exact Python int in int64's range, or ValueError naming the problem.

    Accepts Python and numpy integers. Floats (JSON numbers, a pandas column that became float64)
    only when `allow_float`, integral and of magnitude <= 2**53, the range where a float still names
    one integer; larger floats may already be a different id, so they are refused. Never accepts
    bools, strings (also "42": ids are integers on every interface), None or NaN.
    """
    if isinstance(value, bool | np.bool_):
        raise ValueError(f"{what} {value!r} is not an integer id (a boolean)")
    if isinstance(value, int | np.integer):
        n = int(value)
    elif isinstance(value, float | np.floating):
        f = float(value)
        if not allow_float or not math.isfinite(f) or not f.is_integer():
            raise ValueError(f"{what} {value!r} is not an integer id")
        if abs(f) > FLOAT_EXACT_MAX:
            raise ValueError(
                f"{what} {value!r} is not an integer id it can trust: a float beyond 2**53, where floats "
                "cannot hold every integer (it may already be another id). Send ids as JSON integers and "
                "do not mix them with nulls or floats in one column (pandas then makes the column float)"
            )
        n = int(f)
    elif isinstance(value, str | bytes):
        raise ValueError(
            f"{what} {value!r} is not an integer id (a string: send ids as numbers, in JSON without quotes)"
        )
    else:
        raise ValueError(f"{what} {value!r} is not an integer id (got {type(value).__name__})")
    if not INT64_MIN <= n <= INT64_MAX:
        raise ValueError(f"{what} {n} is outside the int64 range of ids [-2**63, 2**63 - 1]")
    return n


def as_id_array(values: Any, what: str = "user_ids") -> np.ndarray:
    """A scalar id or a 1-D sequence / array of ids -> (n,) int64, exact, or ValueError.

    Integer numpy arrays convert directly (uint64 values above 2**63 - 1 are refused); float, bool
    and string arrays are refused (the ids may already have lost precision); Python sequences and
    object arrays are checked one value at a time with `check_id(allow_float=False)`, because
    `np.asarray` would turn [2**63, -1] into float64 and [2**63] into uint64.
    """
    if isinstance(values, str | bytes):
        raise ValueError(f"{what} must be integer ids, got the string {values!r}")
    if not isinstance(values, list | tuple | np.ndarray) and hasattr(values, "__array__"):
        values = np.asarray(values)  # a pandas Series or torch tensor keeps its integer dtype
    if isinstance(values, np.ndarray):
        a = values.reshape(1) if values.ndim == 0 else values
        if a.ndim != 1:
            raise ValueError(f"{what} must be a 1-D sequence of integer ids, got an array of shape {a.shape}")
        if a.dtype.kind == "i":
            return a.astype(np.int64, copy=False)
        if a.dtype.kind == "u":
            if a.size and int(a.max()) > INT64_MAX:
                raise ValueError(
                    f"{what}: {int(a.max())} is outside the int64 range of ids [-2**63, 2**63 - 1]"
                )
            return a.astype(np.int64)
        if a.dtype.kind != "O":
            raise ValueError(
                f"{what} must be integer ids, got a {a.dtype} array (floats cannot hold every int64 id; "
                "keep ids as int64 from end to end)"
            )
        values = a.tolist()
    elif isinstance(values, int | float | np.number | bool | np.bool_):
        values = [values]
    elif not isinstance(values, Iterable):
        raise ValueError(f"{what} must be a sequence of integer ids, got {type(values).__name__}")
    items = list(values)
    out = np.empty(len(items), np.int64)
    for k, v in enumerate(items):
        out[k] = check_id(v, what.removesuffix("s"), allow_float=False)
    return out
