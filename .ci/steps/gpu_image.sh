#!/usr/bin/env bash
# The versions of the GPU machine's image (torch 2.11.0+cu130, Triton 3.6.0, numpy 2.4), in a venv of
# their own, without a GPU:
# - the CUDA extension built with Q2K_BUILD_CUDA=1 by this machine's nvcc (sm_80/86/89/90 machine code)
#   loads in a fresh process with a CPU and a CUDA kernel for every op (Q2K_REQUIRE_CUDA_BUILD=1 makes
#   a missing CUDA torch or toolkit a failure, not a skip);
# - the Triton-facing tests under the interpreter, the sm_90 compile + spill check and the carried
#   Triton cache (built, unpacked and hit), with Triton 3.6.
# The torch wheel (~530 MB, plus the CUDA runtime wheels) comes from pip's cache after the first run.
set -euo pipefail

venv="$Q2K_CI_TMP/venv-gpu-image"
python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.11.0 triton==3.6.0 "numpy>=2.4" ninja pybind11 pytest

export PYTHONPATH="$PWD" TORCH_EXTENSIONS_DIR="$Q2K_CI_TMP/ext-gpu-image" Q2K_REQUIRE_CUDA_BUILD=1
python - <<'PY'
import numpy, torch, triton
print(f"gpu image: torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, numpy {numpy.__version__}")
assert torch.__version__.startswith("2.11.0") and torch.version.cuda and triton.__version__ == "3.6.0"
PY
python -m pytest -q -p no:cacheprovider \
    tests/test_cuda_build.py tests/test_interpreter_compat.py tests/test_reference_compile.py tests/test_triton_compile.py tests/test_triton_cache.py \
    tests/test_fake_quant.py tests/test_dorefa.py tests/test_n2uq.py tests/test_ada.py tests/test_fusion.py
