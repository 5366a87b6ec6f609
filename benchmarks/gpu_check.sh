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
#
# The extension comes prebuilt: `q2k build --prebuilt prebuilt` on the CPU machine, in a venv with the
# device's torch (benchmarks/NOTES.md, "The plan for a drawn device"), and the device call carries the
# folder (run's carry: ["prebuilt"]). Every process that needs q2kernels._C then loads it instead of
# compiling, and says in the log, in one line, that it loaded it or why it built instead (a missing
# folder too: Q2K_PREBUILT is set). The same folder carries Triton's kernel cache, compiled here for
# sm_90 with the device's Python and Triton (`python benchmarks/triton_cache.py build`): the log says
# whether it fits the device, and every stage's record counts the Triton kernels it still compiled.
set -euo pipefail
cd "$(dirname "$0")/.."
export Q2K_PREBUILT="${Q2K_PREBUILT:-$PWD/prebuilt}"
exec python benchmarks/campaign.py "$@"
