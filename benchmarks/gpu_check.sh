#!/usr/bin/env bash
# The GPU campaign in one call on the device machine (no network): install offline, run the CUDA
# tests, run every benchmark; results go to $OUT (or benchmarks/results when run by hand): doctor.txt,
# cuda_tests.txt and <gpu>-<commit>.{json,md,png}. Commit them unedited under benchmarks/results/,
# then `python benchmarks/run_all.py --summarize benchmarks/results/<gpu>-<commit>.json` updates the
# README's table, and benchmarks/NOTES.md gets each target's measured value.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
q2k doctor 2>&1 | tee "$out/doctor.txt"
python -m pytest -m cuda -q -rs 2>&1 | tee "$out/cuda_tests.txt"
tests_rc=${PIPESTATUS[0]}
python benchmarks/run_all.py --out "$out" 2>&1 | tail -5
bench_rc=${PIPESTATUS[0]}
echo "cuda tests rc=$tests_rc, benchmarks rc=$bench_rc"
exit $(( tests_rc || bench_rc ))
