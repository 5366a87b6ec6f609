#!/usr/bin/env bash
# The GPU campaign on the device machine (no network), in budget-sized calls:
#
#   bash benchmarks/gpu_check.sh next --budget 540   # every call: the pending stages that fit 540 s
#   bash benchmarks/gpu_check.sh 1 2                 # or stages by number or name (all: every stage)
#
# `next` reads the committed results (benchmarks/results/*/campaign.json) and runs, in priority order,
# the stages not passed there that fit the budget, each costed at its recorded time (else its estimate,
# benchmarks/NOTES.md "GPU campaign stages"). benchmarks/campaign.py says what each stage runs.
# A call writes four files, and nothing else, into $OUT/<device>-<commit>/ (else benchmarks/results/):
# campaign.json (env with the device's name, every stage's status and seconds, every row), campaign.log,
# tables.md and extra.tar.gz. Copy that folder, unedited, to benchmarks/results/ and commit it: the
# next `next` call goes on from there. `python benchmarks/run_all.py --summarize
# benchmarks/results/<device>-<commit>/campaign.json` updates the README's table.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/campaign.py "$@"
