#!/usr/bin/env bash
# The wheel carries the C++/CUDA sources: build a wheel from this checkout, install it into a fresh
# directory, and run the integer-op tests against the installed package from outside the checkout,
# with an empty extension cache, so q2kernels._C is built from the sources inside the wheel.
# Runs in the main step's environment (torch 2.13, CPU).
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
# shellcheck disable=SC1091
. "$Q2K_CI_TMP/venv-main/bin/activate"
work="$Q2K_CI_TMP/wheel"
mkdir -p "$work"

python -m pip wheel -q --no-deps --no-build-isolation -w "$work/dist" "$repo"
python -m pip install -q --no-deps --target "$work/site" "$work/dist"/q2kernels-*.whl
python - "$work"/dist/q2kernels-*.whl <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ["q2kernels/_csrc/ops.cpp", "q2kernels/_csrc/format.h", "q2kernels/_csrc/cuda/int_conv.cu"]
missing = [n for n in need if n not in names]
assert not missing, f"the wheel lacks the C++/CUDA sources {missing}"
print(f"wheel: {len(names)} files, C++/CUDA sources included")
PY

cd "$work"
export PYTHONPATH="$work/site" TORCH_EXTENSIONS_DIR="$work/ext"
python - <<'PY'
import os, q2kernels, q2kernels.deploy, q2kernels.ops.int_conv  # noqa: E401
site = os.environ["PYTHONPATH"]
assert q2kernels.__file__.startswith(site), f"imported {q2kernels.__file__}, not the wheel in {site}"
ext = os.environ["TORCH_EXTENSIONS_DIR"]
assert not os.path.exists(ext) or not os.listdir(ext), f"importing q2kernels built something in {ext}"
print(f"wheel: q2kernels from {q2kernels.__file__}; import built nothing")
PY
python -m pytest -q -p no:cacheprovider "$repo/tests/test_pack.py" "$repo/tests/test_int_conv.py"
