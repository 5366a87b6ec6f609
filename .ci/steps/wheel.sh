#!/usr/bin/env bash
# The wheel carries the C++/CUDA sources: build a wheel from this checkout, install it into a fresh
# directory, and run the integer-op tests against the installed package from outside the checkout,
# with an empty extension cache, so q2kernels._C is built from the sources inside the wheel.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

python -m pip wheel -q --no-deps --no-build-isolation -w "$work/dist" "$repo"
python -m pip install -q --no-deps --target "$work/site" "$work/dist"/q2kernels-*.whl
unzip -l "$work/dist"/q2kernels-*.whl | grep -q "q2kernels/_csrc/ops.cpp" \
  || { echo "wheel: q2kernels/_csrc/ops.cpp missing from the wheel" >&2; exit 1; }

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
