#!/usr/bin/env bash
# The integer ops (csrc/) built with AddressSanitizer + UBSan (Q2K_SANITIZE=1, q2kernels/_ext.py: its own
# extension name and build directory), running the integer-op tests and the hostile-input corpus
# (tests/hostile_corpus/int_ops/, through tests/test_hostile_conv_geometry.py: every conv geometry of
# the corpus and its property seeds, padding beyond the kernel's reach included).
# The step fails on any sanitizer report: ASan and UBSan (-fno-sanitize-recover) abort the process at
# the first one, and the output (pytest -s, so that a report is not lost in pytest's capture when the
# process dies) must hold none.
#
# Python is not built with ASan, so its runtime is preloaded (it must come first in the process),
# with libstdc++, which Python does not link: ASan resolves its __cxa_throw interceptor at start-up, and
# the first C++ exception (every argument error) aborts the process if libstdc++ came later.
# detect_leaks=0: CPython and torch keep interned objects, arenas and op registries alive until exit
# by design, so LeakSanitizer would report them on every run; use-after-free, out-of-bounds access
# and undefined behaviour are all still reported. The CUDA glue tests (cuda_glue) run the emulator,
# which tests/test_int_conv_cuda.py builds without sanitizers, so they are left to the plain run; so
# are the deterministic float ops' torch.compile and opcheck tests (Inductor's own compiled code, not ours).
set -euo pipefail
cd "$(dirname "$0")/../.."
# In the main step's environment (torch 2.13, CPU) when run by .ci/run.
if [ -n "${Q2K_CI_TMP:-}" ]; then
  # shellcheck disable=SC1091
  . "$Q2K_CI_TMP/venv-main/bin/activate"
fi

export Q2K_SANITIZE=1
export TORCH_EXTENSIONS_DIR="${Q2K_CI_TMP:-${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}}/sanitize"
log="$(mktemp)"
preload="$(${CXX:-c++} -print-file-name=libasan.so) $(${CXX:-c++} -print-file-name=libstdc++.so)"
start=$(date +%s)

sanitized() {
  LD_PRELOAD="$preload" ASAN_OPTIONS="detect_leaks=0:abort_on_error=1" \
    UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1" "$@" 2>&1 | tee -a "$log"
}

status=0
# The build (its compiler runs with the runtime preloaded too: harmless), then the tests.
sanitized python -c "import q2kernels.ops.int_conv as ic; ic.load()" || status=$?
echo "sanitize: build or load took $(( $(date +%s) - start )) s"
[ "$status" = 0 ] && { sanitized python -m pytest -q -s -p no:cacheprovider tests/test_pack.py tests/test_int_conv.py tests/test_grouped_conv.py \
  tests/test_hostile_int_ops.py tests/test_hostile_conv_geometry.py tests/test_int_conv_fast_cpu.py tests/test_det_float.py \
  -k "not cuda_glue and not (test_det_float and (torch_compile or opcheck))" || status=$?; }

reports=$(grep -cE "runtime error:|ERROR: AddressSanitizer|AddressSanitizer: CHECK failed" "$log" || true)
echo "sanitize: $reports sanitizer report(s), took $(( $(date +%s) - start )) s"
[ "$reports" = 0 ] || status=1
exit "$status"
