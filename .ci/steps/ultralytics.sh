#!/usr/bin/env bash
# CI step: the Ultralytics integration (tests/test_ultralytics*.py, python/ultralytics_qat.py --smoke)
# in an environment of its own. Ultralytics needs torchvision, and no torchvision imports beside the
# CPU torch 2.13.0 wheel of the main environment; torch 2.14.1 with torchvision 0.29.1 (the CUDA
# build, which runs on the CPU) does. In the main environment the same test files skip.
set -euo pipefail
cd "$(dirname "$0")/../.."

venv="${Q2K_CI_TMP:-$(mktemp -d)}/venv-ultralytics"
python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
start=$(date +%s)
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.14.1 torchvision==0.29.1
python -m pip install -q -e ".[ultralytics,test,onnx]"
installed=$(date +%s)
echo "ultralytics env installed in $(( installed - start )) s"

python -c "import torchvision, ultralytics; print(f'ultralytics {ultralytics.__version__}, torchvision {torchvision.__version__}')"
export TORCH_EXTENSIONS_DIR="${Q2K_CI_TMP:-$(mktemp -d)}/ext-ultralytics" Q2K_REQUIRE_ONNX=1
python -m pytest -q -p no:cacheprovider tests/test_ultralytics.py tests/test_ultralytics_int.py \
    tests/test_ultralytics_flow.py tests/test_ultralytics_export.py tests/test_ultralytics_ddp.py \
    tests/test_int_detector_file.py tests/test_ultralytics_trained_exactness.py tests/test_pact_head.py \
    tests/test_hostile_api.py tests/test_hostile_build.py tests/test_ultralytics_onnx.py
echo "ultralytics tests took $(( $(date +%s) - installed )) s"
