"""The C allocator's thresholds for training: keep freed (B, B) buffers in the heap for the next step.

A training step allocates and frees a few dozen float32 (B, B) matrices (scores, biases, AML
margins, softmax and their gradients: 1 MiB each at B = 512). glibc's malloc serves blocks above
its mmap threshold (128 KiB at start, raised only when such a block is freed) with a fresh mmap, and
gives memory above its trim threshold at the top of the heap back to the kernel on free; either way
the next step's buffer is new pages, and every 4 KiB page costs a page fault and a zeroing on first
touch. Measured on the 2-core development VM (bench/bench_train_step.py setting, click stage, one
epoch of 16,384 rows): 26,000-42,000 minor page faults per epoch and 0.36-0.39 s, against 2-170 faults
and 0.29 s with the thresholds below; every (B, B) element-wise op ran at 0.5-1.3 ms instead of
20-60 us. The arithmetic is untouched, so results are bit-identical.

`tune_allocator()` sets M_MMAP_THRESHOLD to 32 MiB (glibc's largest accepted value on 64-bit;
larger blocks, such as big embedding tables, still get their own mapping) and M_TRIM_THRESHOLD to
256 MiB. The cost: up to 256 MiB of freed heap stays with the process instead of going back to the
kernel. It is done once per process, only with glibc, and not at all when the user set glibc's
own variables (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, which then rule) or CSMF_MALLOC_TUNING=0.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 256 * 1024 * 1024
_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_USER_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")

_state: dict[str, object] | None = None


def tune_allocator() -> dict[str, object]:
    """Set glibc's mmap and trim thresholds once per process (see the module docstring).

    Returns what was done: {"applied": bool, "reason": str, ...thresholds when applied}.
    """
    global _state
    if _state is not None:
        return _state
    _state = _apply()
    return _state


def _apply() -> dict[str, object]:
    if os.environ.get("CSMF_MALLOC_TUNING", "1").strip().lower() in ("0", "false", "no", "off"):
        return {"applied": False, "reason": "CSMF_MALLOC_TUNING=0"}
    user = [v for v in _USER_VARS if v in os.environ]
    if user:
        return {"applied": False, "reason": f"glibc variables set by the user: {', '.join(user)}"}
    if not sys.platform.startswith("linux"):
        return {"applied": False, "reason": f"not glibc ({sys.platform})"}
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018  (musl and others have no such symbol)
    except (OSError, AttributeError):
        return {"applied": False, "reason": "no glibc mallopt"}
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        return {"applied": False, "reason": "mallopt refused the thresholds"}
    return {"applied": True, "reason": "", "mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD}
