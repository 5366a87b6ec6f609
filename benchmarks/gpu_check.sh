#!/usr/bin/env bash
# The GPU campaign on the device machine (no network), one budget-sized stage at a time:
#
#   bash benchmarks/gpu_check.sh 1          # first on any drawn device: install, build, doctor, CUDA tests
#   bash benchmarks/gpu_check.sh 2 3        # then as many stages as the budget allows (see NOTES.md)
#   bash benchmarks/gpu_check.sh all        # or everything, stage after stage
#
# benchmarks/campaign.py says what each stage runs; every stage has its own time limit (5 min) and
# writes to $OUT (else benchmarks/results) as it goes: stages/<n>-<name>.log, stages/status.jsonl,
# rows.jsonl and the per-benchmark and whole-run <gpu>-<commit>-*.{json,md}. A stage that passed there
# is skipped next time. Commit what it wrote, unedited, under benchmarks/results/; then
# `python benchmarks/run_all.py --summarize benchmarks/results/<gpu>-<commit>.json` updates the README's
# table, and benchmarks/NOTES.md gets each stage's measured time next to its estimate.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/campaign.py "$@"
