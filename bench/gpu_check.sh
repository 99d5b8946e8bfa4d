#!/usr/bin/env bash
# GPU check (#18 item 5): the cascade, the training step and the serving path on CUDA against the CPU.
#
# How to run (from anywhere; it works in the repository root):
#     bench/gpu_check.sh                      # KuaiRand at ../shared/data/kuairand if present, else `small`
#     bench/gpu_check.sh --kuairand PATH      # any option of bench/gpu_check.py is passed on
#     bench/gpu_check.sh --quick              # tiny sizes: seconds, figures meaningless
#
# 1. nvidia-smi: is there a GPU? Without one it says so and runs the CPU path only, exit 0.
# 2. Environment: a virtual environment .venv-gpu (python3.11; $CSMF_GPU_VENV, $PY) with torch==2.13.0
#    from PyPI, whose Linux x86_64 wheel is the CUDA build, then `pip install -e ".[dev]"` (the pinned
#    stack). $TORCH_INDEX_URL installs torch from another index (e.g. a CUDA-version-specific one).
#    Without a GPU the project's CPU .venv is used when it exists (no GBs of CUDA packages for nothing).
#    $CSMF_GPU_CHECK_PYTHON=/path/to/python skips all of this and uses that interpreter as it is; it must
#    import numpy, polars, pyarrow, faiss and yaml (exit 2 naming those it cannot: a machine's own CUDA
#    Python usually lacks polars and faiss-cpu; with no network, unpack their wheels onto PYTHONPATH).
# 3. bench/gpu_check.py: the cascade on CUDA and on the CPU (same seed, plus CPU seeds for the noise):
#    training samples/s per device and their ratio, peak GPU memory, forward parity, whether
#    Recall/nDCG@50 per objective (own and fused) match the CPU run within noise, serving latency with
#    the user tower on each device. Exit 1 when the metrics do not match.
# 4. With a GPU: the gpu-marked tests (tests/unit/test_device.py; tests/integration/test_cuda_flow.py, two
#    daily runs and serving on CUDA, skipped when Prefect / MLflow are missing) and
#    bench/bench_train_step.py on CUDA.
# Figures are appended to bench/results/*.jsonl ($CSMF_BENCH_RESULTS), as every benchmark's.
# Exit status: the first failure among the steps, 0 when all ran and the metrics matched.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

quick=()
for arg in "$@"; do
    if [[ $arg == --quick ]]; then quick=(--quick); fi
done

has_gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    has_gpu=1
    echo "== nvidia-smi"
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv
else
    echo "NO GPU: nvidia-smi is missing or lists no GPU. Running the CPU path only: no CUDA figure."
fi

if [[ -n ${CSMF_GPU_CHECK_PYTHON:-} ]]; then
    pybin=$CSMF_GPU_CHECK_PYTHON
    echo "== using $pybin as it is (CSMF_GPU_CHECK_PYTHON): nothing installed"
elif [[ $has_gpu == 0 && -x .venv/bin/python ]]; then
    pybin=.venv/bin/python
    echo "== no GPU: using the project's .venv (nothing installed)"
else
    venv=${CSMF_GPU_VENV:-.venv-gpu}
    if [[ ! -x $venv/bin/python ]]; then
        echo "== creating $venv with ${PY:-python3.11}"
        "${PY:-python3.11}" -m venv "$venv" || { echo "cannot create $venv: is ${PY:-python3.11} installed? (PY=...)"; exit 2; }
    fi
    pybin=$venv/bin/python
    index=()
    if [[ -n ${TORCH_INDEX_URL:-} ]]; then index=(--index-url "$TORCH_INDEX_URL"); fi
    echo "== installing torch==2.13.0 ${index[*]} (the CUDA build: several GB the first time), then the project"
    "$pybin" -m pip install --quiet --upgrade pip &&
        "$pybin" -m pip install --quiet "${index[@]}" "torch==2.13.0" &&
        "$pybin" -m pip install --quiet -e ".[dev]" || { echo "installation into $venv failed"; exit 2; }
fi

"$pybin" - <<'EOF' || exit 2
import torch
cuda = torch.cuda.is_available()
print(f"torch {torch.__version__}, built for CUDA {torch.version.cuda}, cuda available: {cuda}")
if cuda:
    print(f"device 0: {torch.cuda.get_device_name(0)}")
EOF
# the rest of the pinned stack the check imports: a machine's own CUDA Python (CSMF_GPU_CHECK_PYTHON)
# often lacks polars and faiss-cpu; say which and how, instead of a traceback halfway through
missing=$("$pybin" -c '
import importlib
missing = []
for name in ("numpy", "polars", "pyarrow", "faiss", "yaml"):
    try:
        importlib.import_module(name)
    except ImportError:  # absent, or present but broken (a wheel built for another numpy, say)
        missing.append(name)
print(" ".join(missing))')
if [[ -n $missing ]]; then
    echo "$pybin cannot import: $missing (the pinned stack: pyproject.toml). Install them into it"
    echo "(pip install -e \".[dev]\" installs all), or, on a machine with no network, unpack their wheels"
    echo "(pip download --only-binary=:all: --python-version X.Y ... elsewhere) into a folder on PYTHONPATH."
    exit 2
fi
if [[ $has_gpu == 1 ]] && ! "$pybin" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "A GPU is present but this torch cannot use it (a CPU build, or a driver older than its CUDA runtime):"
    echo "install the CUDA build, e.g. TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 $0, or fix the driver."
    exit 2
fi

status=0
echo
echo "######## bench/gpu_check.py $*"
"$pybin" bench/gpu_check.py "$@" || status=$?

if [[ $has_gpu == 1 ]]; then
    echo
    echo "######## gpu-marked tests (tests/unit/test_device.py, tests/integration/test_cuda_flow.py)"
    "$pybin" -m pytest -q -p no:cacheprovider -m gpu tests/unit/test_device.py tests/integration/test_cuda_flow.py ||
        { [[ $status == 0 ]] && status=3; }
    echo
    echo "######## bench/bench_train_step.py --device cuda ${quick[*]}"
    "$pybin" bench/bench_train_step.py --device cuda "${quick[@]}" || { [[ $status == 0 ]] && status=4; }
fi
echo
if [[ $has_gpu == 0 ]]; then
    echo "NO GPU: only the CPU path ran (exit $status). Run this script on a CUDA machine for the CUDA figures."
fi
exit "$status"
