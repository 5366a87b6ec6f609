#!/usr/bin/env bash
# Install everything from scratch into a fresh virtual environment, show what q2kernels sees, then
# run exactly the README's test command.
set -euo pipefail

venv="$Q2K_CI_TMP/venv-main"
python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
# The CPU build of torch first: a plain `torch` requirement would pull the multi-GB CUDA build.
python -m pip install -q torch==2.13.0

# The ONNX tests run here: a missing onnxruntime fails the session (tests/conftest.py).
export Q2K_REQUIRE_ONNX=1
# The README's test command:
pip install -e ".[test,onnx]" && python -m pytest -q
