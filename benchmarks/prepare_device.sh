#!/usr/bin/env bash
# Step 0 of a drawn device (benchmarks/NOTES.md, "The plan for a drawn device"), on the CPU machine, so
# that no device time goes to compiling. In a venv of the device image's versions (Python 3.12, torch
# 2.11.0+cu130, Triton 3.6.0; made when missing, ~3 min), it builds what a device call carries:
#   OUT/q2kernels_ops.so, .json      the extension for sm_90 as a plain ops library (q2k build --prebuilt)
#   OUT/triton-cache.tar.gz, .json   Triton's kernel cache for sm_90 (benchmarks/triton_cache.py build)
# and checks that OUT and the working tree fit what one call carries.
#
#   bash benchmarks/prepare_device.sh [--venv DIR] [--out DIR] [--cache-dir DIR]
#
# --venv: default ~/.cache/q2kernels/venv-device-py312. --out: default prebuilt (what gpu_check.sh
# loads; the call then carries ["prebuilt"]). --cache-dir: where the Triton cache is built and, on the
# device, unpacked; default /tmp/q2k-triton-cache, which is cleared first; any other must be empty.
set -euo pipefail
cd "$(dirname "$0")/.."

default_cache_dir=/tmp/q2k-triton-cache
venv="$HOME/.cache/q2kernels/venv-device-py312" out=prebuilt cache_dir=$default_cache_dir
while [ $# -gt 0 ]; do
    case $1 in
        --venv | --out | --cache-dir)
            [ $# -ge 2 ] || { echo "prepare_device: $1 needs a value" >&2; exit 2; }
            case $1 in --venv) venv=$2 ;; --out) out=$2 ;; --cache-dir) cache_dir=$2 ;; esac
            shift 2 ;;
        *) echo "prepare_device: unknown argument $1 (expected --venv, --out or --cache-dir)" >&2; exit 2 ;;
    esac
done

if [ ! -x "$venv/bin/python" ]; then
    # This machine's default Python is 3.11; pyenv has 3.12. Triton's cache key hashes libtriton.so,
    # which is built per Python: the cache is only of use built with the device's.
    py312=""
    for candidate in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
        if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
            py312=$candidate
            break
        fi
    done
    if [ -z "$py312" ]; then
        echo "prepare_device: no Python 3.12 here (the device image's Python); install it, e.g. pyenv install 3.12" >&2
        exit 1
    fi
    mkdir -p "$(dirname "$venv")"
    "$py312" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q torch==2.11.0 triton==3.6.0 "numpy>=2.4" ninja pybind11 pytest
"$venv/bin/python" - <<'PY'
import sys

import numpy
import torch
import triton

print(f"device image versions: Python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {triton.__version__}, numpy {numpy.__version__}")
assert sys.version_info[:2] == (3, 12), "the device runs Python 3.12"
assert torch.__version__.startswith("2.11.0") and torch.version.cuda and triton.__version__ == "3.6.0"
PY

export PYTHONPATH="$PWD"
Q2K_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 "$venv/bin/python" -m q2kernels.cli build --prebuilt "$out"
if [ "$cache_dir" = "$default_cache_dir" ]; then
    rm -rf "$default_cache_dir"
fi
"$venv/bin/python" benchmarks/triton_cache.py build --out "$out" --cache-dir "$cache_dir"

# One call carries the working tree and the named folders, 64 MiB in all.
tree_bytes=$(git ls-files -z | xargs -0 cat | wc -c)
out_bytes=$(du -sb "$out" | cut -f1)
total=$((tree_bytes + out_bytes))
echo "a device call carries ~$((total / 1048576)) MiB: the tree $((tree_bytes / 1048576)) MiB + $out $((out_bytes / 1048576)) MiB (limit 64 MiB)"
if [ "$total" -gt $((60 * 1048576)) ]; then
    echo "prepare_device: over 60 MiB: too close to the 64 MiB a call carries" >&2
    exit 1
fi
