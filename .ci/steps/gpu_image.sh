#!/usr/bin/env bash
# The versions of the GPU machine's image (Python 3.12, torch 2.11.0+cu130, Triton 3.6.0, numpy 2.4), in
# a venv of their own (benchmarks/prepare_device.sh), without a GPU:
# - what a device call carries, built as before one: the ops library for sm_90 and the Triton cache;
# - the CUDA extension built with Q2K_BUILD_CUDA=1 by this machine's nvcc (sm_80/86/89/90 machine code)
#   loads in a fresh process with a CPU and a CUDA kernel for every op (Q2K_REQUIRE_CUDA_BUILD=1 makes
#   a missing CUDA torch or toolkit a failure, not a skip);
# - the Triton-facing tests under the interpreter, the sm_90 compile + spill check and the carried
#   Triton cache (built, unpacked and hit), with Triton 3.6.
# The torch wheel (~530 MB, plus the CUDA runtime wheels) comes from pip's cache after the first run.
set -euo pipefail

# The venv, the prebuilt ops library for sm_90 and the carried Triton cache, made exactly as before a
# device call (benchmarks/NOTES.md, step 0), into this run's scratch space: the tests below then
# run in that venv, and the spill check reads its cubins from that cache.
venv="$Q2K_CI_TMP/venv-gpu-image"
TORCH_EXTENSIONS_DIR="$Q2K_CI_TMP/ext-prebuilt" bash benchmarks/prepare_device.sh --venv "$venv" \
    --out "$Q2K_CI_TMP/prebuilt" --cache-dir "$Q2K_CI_TMP/triton-cache"
# shellcheck disable=SC1091
. "$venv/bin/activate"

export PYTHONPATH="$PWD" TORCH_EXTENSIONS_DIR="$Q2K_CI_TMP/ext-gpu-image" Q2K_REQUIRE_CUDA_BUILD=1
export TRITON_CACHE_DIR="$Q2K_CI_TMP/triton-cache"
python -m pytest -q -p no:cacheprovider \
    tests/test_cuda_build.py tests/test_interpreter_compat.py tests/test_reference_compile.py tests/test_triton_compile.py tests/test_triton_cache.py \
    tests/test_fake_quant.py tests/test_dorefa.py tests/test_n2uq.py tests/test_ada.py tests/test_fusion.py
