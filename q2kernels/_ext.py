"""Builds and loads the C++/CUDA extension `q2kernels._C` (the integer ops, csrc/).

The extension is compiled with ninja on first use (the first integer op, or `q2k build` ahead of
time) by torch.utils.cpp_extension.load and cached in its build directory (TORCH_EXTENSIONS_DIR,
default ~/.cache/torch_extensions/<python>_<accelerator>/): later processes reuse the library as long
as the sources and flags are unchanged. Importing q2kernels compiles nothing. Nothing is ever
downloaded. The sources ship inside the package (q2kernels/_csrc in a wheel or sdist install, copied
there from the checkout's csrc/ by setup.py), so every kind of install builds the same way.
The CUDA sources (csrc/cuda/*.cu) are compiled where torch sees a GPU and a CUDA toolkit
(cuda_home()), or wherever Q2K_BUILD_CUDA=1 forces them (CI builds and registers the CUDA kernels on a
machine without a GPU); otherwise the library holds the CPU kernels alone.
A plain ops library built ahead for this torch (`q2k build --prebuilt DIR`, then Q2K_PREBUILT=DIR, or
the checkout's prebuilt/) is loaded instead of a build where its stamp fits this process (the end of
this file): a GPU machine then spends no time compiling.

Builds and loads run under q2kernels' build lock (build_lock), which records its owner, so that a
build killed mid-way (a killed job, a crash) never makes later processes wait on it in silence.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils import cpp_extension


def _find_csrc() -> Path:
    """The C++/CUDA sources: inside the installed package, else in the source checkout (editable)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_csrc", here.parent / "csrc"):
        if (candidate / "ops.cpp").is_file():
            return candidate
    return here / "_csrc"


CSRC = _find_csrc()

# -ffp-contract=off: the epilogue's floats must be bit-identical to the CUDA kernels' (csrc/epilogue.h),
# so the compiler may not fuse a multiply and an add into an fma where the source does not say so.
# -fopenmp: at::parallel_for is header code that runs in parallel only when compiled with OpenMP,
# which is the backend of Linux builds of torch (elsewhere it calls into torch's own thread pool).
_OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") else []
_CFLAGS = ["-O3", "-ffp-contract=off", *_OPENMP]
_LDFLAGS = _OPENMP

# Q2K_SANITIZE=1 builds the CPU ops with AddressSanitizer and UBSan instead, under their own name (and
# so their own build directory); UBSan aborts at the first report. A Python host needs the ASan
# runtime preloaded: .ci/steps/sanitize.sh says how.
_SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]

# The CUDA kernels (csrc/cuda/) are built as real machine code for each GPU generation they support,
# the driver picking by compute capability: the int4 MMA must never come from PTX JIT (on sm_90 and
# later it would silently become the compiler's emulation). compute_90 PTX rides along for GPUs newer
# than sm_90, which run the int8-MMA path. --fmad=false: no contraction outside the epilogue's
# explicit __f*_rn operations (tests/test_cuda_compile.py builds with these same flags). --threads:
# the four targets of a .cu file compile in parallel.
#
# Which architectures, and the MMA path each runs, is ONE table: kGpuArchs in csrc/cuda/archs.h. The
# dispatcher (register_cuda.cpp) and the kernel's compile-time guard (int_conv_kernel.cuh) include it;
# the build reads it here (GPU_ARCHS, parsed from the header's text: the sources ship with the package,
# so a wheel reads the same file); tests/test_cuda_compile.py takes its archs and expected MMA from
# GPU_ARCHS, and tests/test_gpu_archs.py fails when any of them disagrees. The header is the source
# rather than Python passing -D flags, because three compilers with their own flags (nvcc, the host
# compiler for register_cuda.cpp, the CPU emulator of tests/cuda_emu) must all see the table, and a
# translation unit built without the flags would silently fall back to a default; the flags stay as
# they were. The parser is strict: a row it does not understand is an error, never skipped.
GPU_ARCHS_HEADER = "cuda/archs.h"  # under CSRC
MMA_PATHS = {"kS4": "s4", "kS8": "s8"}  # params.h MmaPath -> the names of Q2K_INT_MMA


@dataclass(frozen=True)
class GpuArch:
    """A row of csrc/cuda/archs.h's kGpuArchs: sm_<arch> and the MMA path the dispatcher runs there
    ("s4": the native int4 MMA, "s8": the int8 MMA on unpacked nibbles). nvcc gets machine code for
    every row, and the newest row's PTX too (cuda_flags)."""
    arch: str      # "86"
    mma_path: str  # "s4" or "s8"


def _strip_comments(text: str) -> str:
    return re.sub(r"//[^\n]*", "", re.sub(r"/\*.*?\*/", "", text, flags=re.S))


def parse_gpu_archs(text: str) -> tuple[GpuArch, ...]:
    """The rows of kGpuArchs in archs.h's text, oldest first. ValueError for a table that is missing,
    given twice, empty, out of order, or holding a line that is not a row `{NN, MmaPath::kS4|kS8},`."""
    code = _strip_comments(text)
    tables = re.findall(r"\bGpuArch\s+kGpuArchs\s*\[\s*\]\s*=\s*\{(.*?)\}\s*;", code, flags=re.S)
    if len(tables) != 1:
        raise ValueError(f"archs.h: expected one `GpuArch kGpuArchs[] = {{...}};` table, found {len(tables)}")
    rows = []
    for line in tables[0].splitlines():
        if not line.strip():
            continue
        m = re.fullmatch(r"\s*\{\s*(\d+)\s*,\s*MmaPath::(\w+)\s*\}\s*,?\s*", line)
        if m is None or m[2] not in MMA_PATHS:
            raise ValueError(f"archs.h: kGpuArchs: not a row {{NN, MmaPath::kS4|kS8}}, one per line: {line.strip()!r}")
        rows.append(GpuArch(m[1], MMA_PATHS[m[2]]))
    numbers = [int(r.arch) for r in rows]
    if not rows or numbers != sorted(set(numbers)):
        raise ValueError(f"archs.h: kGpuArchs must list each arch once, oldest first; got {numbers}")
    return tuple(rows)


def read_gpu_archs(csrc: Path = CSRC) -> tuple[GpuArch, ...]:
    """parse_gpu_archs of csrc/cuda/archs.h."""
    header = csrc / GPU_ARCHS_HEADER
    if not header.is_file():
        raise RuntimeError(f"q2kernels._C: {header} is missing: this installation of q2kernels is incomplete "
                           "(reinstall it; a wheel carries the sources in q2kernels/_csrc)")
    return parse_gpu_archs(header.read_text())


def gpu_arch_of(capability: int, archs: tuple[GpuArch, ...] | None = None) -> GpuArch | None:
    """The row whose code runs on a GPU of compute capability major*10 + minor (87), as archs.h's
    gpu_arch_of chooses it: the newest row at or below it; None below the oldest (no kernel runs)."""
    rows = [a for a in (GPU_ARCHS if archs is None else archs) if int(a.arch) <= capability]
    return rows[-1] if rows else None


GPU_ARCHS = read_gpu_archs()
CUDA_ARCHS = tuple(a.arch for a in GPU_ARCHS)


def cuda_flags(archs) -> list[str]:
    """nvcc's flags: machine code for each arch ("90"), the last one's PTX riding along."""
    *machine_only, last = archs
    return ["-O3", "-std=c++17", "--fmad=false", "--threads=4", "-DQ2K_WITH_CUDA"] + [
        f"-gencode=arch=compute_{a},code=sm_{a}" for a in machine_only
    ] + [f"-gencode=arch=compute_{last},code=[sm_{last},compute_{last}]"]


CUDA_FLAGS = cuda_flags(CUDA_ARCHS)


def _is_toolkit(home: Path) -> bool:
    return (home / "bin" / "nvcc").is_file() and (home / "include" / "cuda_runtime.h").is_file()


def _toolkit_of_nvcc(nvcc: Path) -> Path | None:
    """The toolkit an nvcc on PATH belongs to: its real file's bin/.. where that is a toolkit, else the
    toolkit of the absolute .../bin/nvcc path a wrapper script runs (/usr/local/bin/nvcc here is
    `exec /usr/local/cuda-13.0/bin/nvcc "$@"`, for which torch's guess, dirname(dirname(nvcc)), gives
    /usr/local, which has no cuda_runtime.h). The script is read, never run."""
    real = nvcc.resolve()
    if _is_toolkit(real.parent.parent):
        return real.parent.parent
    with open(real, "rb") as f:
        head = f.read(4096)
    if not head.startswith(b"#!"):
        return None
    for target in re.findall(rb"(/[^\s'\";|&]*/bin/nvcc)(?![\w.-])", head):
        home = Path(os.fsdecode(target)).resolve().parent.parent
        if _is_toolkit(home):
            return home
    return None


def cuda_home() -> str | None:
    """The CUDA toolkit to build with: $CUDA_HOME (or $CUDA_PATH) as given; else the toolkit the nvcc on
    PATH really is (through symlinks and wrapper scripts); else /usr/local/cuda; None when none is found."""
    given = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if given:
        return given
    nvcc = shutil.which("nvcc")
    home = _toolkit_of_nvcc(Path(nvcc)) if nvcc else None
    if home is None and _is_toolkit(Path("/usr/local/cuda")):
        home = Path("/usr/local/cuda")
    return str(home) if home is not None else None


def cuda_enabled() -> bool:
    """Whether the build includes the CUDA kernels. Q2K_BUILD_CUDA=1 forces them, without a GPU (then a
    CUDA build of torch and a toolkit are required), Q2K_BUILD_CUDA=0 leaves them out; unset, they are
    built where a GPU is visible and a toolkit is found."""
    force = os.environ.get("Q2K_BUILD_CUDA", "")
    if force not in ("", "0", "1"):
        raise ValueError(f"Q2K_BUILD_CUDA: expected 0 or 1 (or unset), got {force!r}")
    if force == "0":
        return False
    if force == "1":
        if torch.version.cuda is None:
            raise RuntimeError(f"Q2K_BUILD_CUDA=1: torch {torch.__version__} is built without CUDA, so it cannot "
                               "load CUDA kernels; install a CUDA build of torch")
        if cuda_home() is None:
            raise RuntimeError("Q2K_BUILD_CUDA=1: no CUDA toolkit found (set CUDA_HOME, put nvcc on PATH, or "
                               "install one at /usr/local/cuda)")
        return True
    return torch.cuda.is_available() and torch.version.cuda is not None and cuda_home() is not None


# The CPU fast path's ops (csrc/fast_conv_cpu.cpp: fp32 unpacking and the epilogue on oneDNN's sums):
# a GPU computes the whole conv in one kernel, so they have no CUDA kernel by design.
CPU_ONLY_OPS = frozenset({"unpack_float", "conv2d_epilogue", "conv2d_epilogue_out"})


def registered_kernels() -> dict[str, set[str]]:
    """Every op of torch.ops.q2kernels_int -> the dispatch keys (of CPU, CUDA, Meta) with a kernel for it,
    read from torch's dispatcher: needs no GPU, only the loaded library."""
    ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("q2kernels_int::"))
    return {op: {key for key in ("CPU", "CUDA", "Meta") if torch._C._dispatch_has_kernel_for_dispatch_key(op, key)}
            for op in ops}


def sources(with_cuda: bool) -> list[str]:
    cpp = sorted(CSRC.glob("*.cpp"))
    if not cpp:
        raise RuntimeError(f"q2kernels._C: no C++ sources in {CSRC}: this installation of q2kernels is "
                           "incomplete (reinstall it; a wheel carries them in q2kernels/_csrc)")
    cu = sorted((CSRC / "cuda").glob("*.cu")) + sorted((CSRC / "cuda").glob("*.cpp")) if with_cuda else []
    return [str(p) for p in cpp + cu]


def torch_build_tag() -> str:
    """The build folder of this torch version, e.g. torch-2.14.1_cu130."""
    return "torch-" + re.sub(r"[^0-9A-Za-z.]+", "_", torch.__version__)


@functools.lru_cache(maxsize=None)
def load():
    """The extension module (compiled on the first call in a process, from the cache afterwards).
    Loading it registers the ops torch.ops.q2kernels_int.*; the module holds the format constants.
    Callers use q2kernels.ops.int_conv.load(), which also registers the ops' fake implementations.
    A prebuilt ops library whose stamp fits this process (prebuilt_library) is loaded instead of a build."""
    sanitize = os.environ.get("Q2K_SANITIZE") == "1"
    prebuilt = None if sanitize else prebuilt_library()
    if prebuilt is not None:
        return prebuilt
    with_cuda = cuda_enabled() and not sanitize
    flags = _CFLAGS + (["-DQ2K_WITH_CUDA"] if with_cuda else []) + (_SANITIZE if sanitize else [])
    if with_cuda:
        # torch's builder reads its module-level CUDA_HOME (its own guess, made at import) for nvcc and
        # the CUDA include/library paths.
        cpp_extension.CUDA_HOME = cuda_home()
    name = ("q2kernels_C_cuda" if with_cuda else "q2kernels_C") + ("_sanitize" if sanitize else "")
    # Under torch's own choice of directory (TORCH_EXTENSIONS_DIR or its per-user cache), one folder
    # per torch version: torch's is per Python and CUDA version only (py311_cu130), so environments
    # with different torches would share it, and one would load the library another built against a
    # different ABI (an undefined symbol at load, or worse).
    build_dir = Path(cpp_extension._get_build_directory(name, verbose=False)) / torch_build_tag()
    build_dir.mkdir(exist_ok=True)
    with build_lock(build_dir):
        return cpp_extension.load(
            name=name,
            sources=sources(with_cuda),
            extra_cflags=flags,
            extra_cuda_cflags=CUDA_FLAGS,
            extra_ldflags=_LDFLAGS + (_SANITIZE if sanitize else []),
            extra_include_paths=[str(CSRC)],
            build_directory=str(build_dir),
            with_cuda=with_cuda,
            verbose=False,
        )


# The build lock. torch's cpp_extension (up to 2.13) guards a build with an empty file, <build dir>/lock,
# created with O_EXCL and removed in a `finally`: a process killed during the build (SIGKILL, a killed
# job, a crash) leaves it, and every later load waits for it to vanish, forever and printing nothing.
# Later torch (2.14) holds an OS advisory lock on that file instead (filelock), which the kernel
# releases when its holder dies: the file stays after every build and its presence means nothing, so
# it is looked at only where torch's builder uses the file's presence (torch_lock_is_presence).
# q2kernels takes its own lock around the whole build-or-load, a file that records its owner (pid,
# host, the process's start time against pid reuse). A waiter says within seconds which file it
# waits on and who holds it; an owner that no longer runs on this host has its lock and torch's
# removed, and the waiter goes on. Only such a takeover removes torch's lock: a q2kernels process
# builds only while it holds its own lock, so that owner's death is what left torch's lock behind.
BUILD_LOCK = "q2kernels.lock"
TORCH_LOCK = "lock"
# A lock that records no owner (torch's lock left by a build outside q2kernels or before this lock
# existed, or an unreadable record) cannot be checked: it is waited on up to this age, longer than
# any build takes, then reported as an error that says which file to delete.
UNOWNED_LOCK_LIMIT_S = 900.0
# How long a wait goes on before it is reported: a load from the cache holds the lock for a moment,
# and concurrent processes (DDP ranks) should not each print a message for that.
REPORT_AFTER_S = 2.0
_POLL_S = 0.2
# pid_max is at most 2^22 on Linux; a record outside [1, 2^31) is not a process (os.kill(0, ...)
# would signal the whole process group).
_MAX_PID = 2**31
_MAX_RECORD = 4096


@dataclass(frozen=True)
class LockOwner:
    """The process holding a build lock; start: its start time in clock ticks since boot
    (/proc/<pid>/stat; None where there is no /proc), which tells a reused pid from the owner."""
    pid: int
    host: str
    start: int | None
    since: float  # time.time() when it took the lock

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, for {time.time() - self.since:.0f} s"


def _proc_state(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in ticks) of a process from /proc/<pid>/stat; None without /proc or
    when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ", comm may hold spaces
    return fields[0], int(fields[19])


def this_process() -> LockOwner:
    state = _proc_state(os.getpid())
    return LockOwner(os.getpid(), socket.gethostname(), state[1] if state else None, time.time())


def is_running(owner: LockOwner) -> bool:
    """Whether the owner, a process of this host, still runs: its pid exists, is not a zombie and
    (where /proc tells) started when the owner did. Outside POSIX nothing can be checked (os.kill
    would terminate the process there), so every owner counts as running."""
    if os.name != "posix":
        return True
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process
    state = _proc_state(owner.pid)
    if state is None:
        return True
    return state[0] != "Z" and (owner.start is None or state[1] == owner.start)


def _encode(owner: LockOwner) -> str:
    return json.dumps({"pid": owner.pid, "host": owner.host, "start": owner.start, "since": owner.since})


def _decode(text: str) -> LockOwner | None:
    """The owner a lock file records; None for an empty, partial or foreign record."""
    try:
        r = json.loads(text)
        owner = LockOwner(r["pid"], r["host"], r["start"], float(r["since"]))
    except (ValueError, TypeError, KeyError, RecursionError):
        return None
    valid = (type(owner.pid) is int and 1 <= owner.pid < _MAX_PID and isinstance(owner.host, str)
             and (owner.start is None or type(owner.start) is int))
    return owner if valid else None


def _read_lock(lock: Path) -> str:
    """A lock file's text, at most _MAX_RECORD characters (a record is far shorter)."""
    with open(lock, encoding="utf-8", errors="replace") as f:
        return f.read(_MAX_RECORD)


def _try_create(lock: Path, text: str) -> bool:
    """Creates the lock file holding text, unless it exists."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return True


def _remove_if_unchanged(lock: Path, text: str) -> bool:
    """Removes the lock file if it still holds text. It is renamed aside first, atomically, and put
    back when it turns out to hold another record (another process took the lock meanwhile), so two
    waiters that both found the same stale lock cannot remove each other's new one."""
    aside = lock.with_name(f"{lock.name}.{os.getpid()}.{threading.get_ident()}.aside")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return False
    try:
        if _read_lock(aside) == text:
            return True
        with contextlib.suppress(FileExistsError):
            os.link(aside, lock)
        return False
    finally:
        aside.unlink(missing_ok=True)


def _unowned_age(lock: Path, limit_s: float) -> float:
    """The age of a lock that records no owner; an error naming it once it is older than limit_s."""
    age = time.time() - lock.stat().st_mtime
    if age > limit_s:
        raise RuntimeError(
            f"q2kernels._C: the build lock {lock} records no owner and has been held for {age:.0f} s, longer "
            f"than a build takes ({limit_s:.0f} s): an interrupted build left it. If no build of q2kernels._C "
            f"is running, delete {lock} and rerun.")
    return age


def _waiting_message(lock: Path, owner: LockOwner | None, age: float, limit_s: float) -> str:
    if owner is not None:
        return (f"q2kernels._C: waiting for the build lock {lock}, held by {owner.describe()}. If that "
                f"process is not building q2kernels._C, delete {lock}.")
    return (f"q2kernels._C: waiting for the build lock {lock}, which records no owner (taken {age:.0f} s ago). "
            f"If no build of q2kernels._C is running, delete {lock}; after {limit_s:.0f} s this stops with an error.")


def _report_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _Waiter:
    """Reports a wait once it has lasted report_after_s, then sleeps between polls."""

    def __init__(self, report: Callable[[str], None], poll_s: float, report_after_s: float):
        self.report, self.poll_s, self.report_after_s = report, poll_s, report_after_s
        self.started, self.reported = time.monotonic(), False

    def wait(self, message: Callable[[], str]) -> None:
        if not self.reported and time.monotonic() - self.started >= self.report_after_s:
            self.report(message())
            self.reported = True
        time.sleep(self.poll_s)


def _acquire(build_dir: Path, me: str, waiter: _Waiter, limit_s: float) -> None:
    """Takes q2kernels' lock of build_dir (record `me`), taking over one whose owner is gone."""
    lock = build_dir / BUILD_LOCK
    host = socket.gethostname()
    while not _try_create(lock, me):
        try:
            text = _read_lock(lock)
            owner = _decode(text)
            age = 0.0 if owner is not None else _unowned_age(lock, limit_s)
        except FileNotFoundError:
            continue  # released meanwhile
        if owner is not None and owner.host == host and not is_running(owner):
            if _remove_if_unchanged(lock, text):
                if torch_lock_is_presence():
                    (build_dir / TORCH_LOCK).unlink(missing_ok=True)
                waiter.report(f"q2kernels._C: removed the build lock {lock} (and torch's {build_dir / TORCH_LOCK}) "
                              f"of pid {owner.pid} on {host}, which no longer runs (an interrupted build)")
            continue
        waiter.wait(lambda: _waiting_message(lock, owner, age, limit_s))


def torch_lock_is_presence() -> bool:
    """Whether torch's builder locks by the lock file's presence (FileBaton, torch <= 2.13), not by an
    OS lock on it (FileLock, torch 2.14), which needs no care from q2kernels."""
    return hasattr(cpp_extension, "FileBaton") and not hasattr(cpp_extension, "FileLock")


def _wait_for_torch_lock(build_dir: Path, waiter: _Waiter, limit_s: float) -> None:
    """Waits, bounded, for a torch build lock that no q2kernels process owns (we hold ours)."""
    if not torch_lock_is_presence():
        return
    lock = build_dir / TORCH_LOCK
    while True:
        try:
            age = _unowned_age(lock, limit_s)
        except FileNotFoundError:
            return
        waiter.wait(lambda: _waiting_message(lock, None, age, limit_s))


@contextlib.contextmanager
def build_lock(build_dir: Path, report: Callable[[str], None] = _report_stderr, poll_s: float = _POLL_S,
               report_after_s: float = REPORT_AFTER_S, unowned_limit_s: float = UNOWNED_LOCK_LIMIT_S) -> Iterator[None]:
    """Holds q2kernels' build lock of build_dir (its file records this process) for the body; report
    gets what a wait is on (after report_after_s) and any takeover of a dead owner's lock."""
    build_dir.mkdir(parents=True, exist_ok=True)
    me = _encode(this_process())
    waiter = _Waiter(report, poll_s, report_after_s)
    _acquire(build_dir, me, waiter, unowned_limit_s)
    try:
        _wait_for_torch_lock(build_dir, waiter, unowned_limit_s)
        yield
    finally:
        _remove_if_unchanged(build_dir / BUILD_LOCK, me)


# The prebuilt ops library. A GPU machine's time is too dear to compile on: `q2k build --prebuilt DIR`
# builds the ops ahead, on any machine with the same torch build (and, for the CUDA kernels, a
# toolkit), as a plain ops library: csrc/ops.cpp's TORCH_LIBRARY without its Python module
# (Q2K_OPS_LIBRARY). It needs no Python C-API symbol, so torch.ops.load_library loads it under any
# Python version of that torch build (the device runs 3.12, the machine that builds it 3.11). Its stamp
# records what it was built for and from; load() uses it only where that fits this process.
PREBUILT_ENV = "Q2K_PREBUILT"
PREBUILT_DIR = Path(__file__).resolve().parent.parent / "prebuilt"  # in a checkout; .gitignore'd
PREBUILT_LIB = "q2kernels_ops.so"
PREBUILT_STAMP = "q2kernels_ops.json"
# Machine code for sm_90 alone (the H100/H200 device machines) halves the library (2.0 MiB; 4.2 with
# sm_80/86/89) and its CUDA compile; a device call carries at most 64 MiB. TORCH_CUDA_ARCH_LIST overrides.
PREBUILT_ARCHS = "9.0"
_SOURCE_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")
_STAMP_KEYS = ("torch", "cuda", "archs", "csrc_sha256", "flags", "ops")
# torch's builder links libtorch_python into every extension; --as-needed drops it (the ops library
# uses none of it), leaving only torch's C++ libraries as dependencies.
_AS_NEEDED = ["-Wl,--as-needed"] if sys.platform.startswith("linux") else []


@dataclass(frozen=True)
class OpsLibrary:
    """A loaded prebuilt ops library: what callers read of the extension module, from its C symbols."""
    path: str
    CHANNEL_ALIGN: int
    FORMAT_VERSION: int
    EPILOGUE_ROWS: int
    WITH_CUDA: bool

    @property
    def __file__(self) -> str:
        return self.path


def csrc_hash() -> str:
    """sha256 over every source file under CSRC, its path and its bytes."""
    h = hashlib.sha256()
    for path in sorted(p for p in CSRC.rglob("*") if p.suffix in _SOURCE_SUFFIXES and p.is_file()):
        h.update(path.relative_to(CSRC).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _nvcc_arch(arch: str) -> str:
    """TORCH_CUDA_ARCH_LIST's form of an arch ("9.0") -> nvcc's ("90")."""
    m = re.fullmatch(r"(\d+)\.(\d)", arch)
    if m is None:
        raise ValueError(f"TORCH_CUDA_ARCH_LIST: expected versions such as 9.0 (no +PTX, no names), got {arch!r}")
    return m[1] + m[2]


def _sm(archs: list[str]) -> str:
    return ", ".join(f"sm_{_nvcc_arch(a)}" for a in archs)


def _prebuilt_flags(archs: list[str]) -> dict:
    """The flags of an ops library with machine code for archs ("9.0"; none: the CPU kernels alone)."""
    return {"cflags": _CFLAGS + ["-DQ2K_OPS_LIBRARY"] + (["-DQ2K_WITH_CUDA"] if archs else []),
            "cuda_cflags": cuda_flags([_nvcc_arch(a) for a in archs]) if archs else [],
            "ldflags": _AS_NEEDED + _LDFLAGS}


def _version(argv: list[str], marker: str = "") -> str:
    """The first line of a compiler's --version output that holds marker."""
    out = subprocess.run([*argv, "--version"], capture_output=True, text=True, check=True).stdout
    return next(line for line in out.splitlines() if marker in line and line.strip())


def python_symbols(library: Path) -> list[str]:
    """The Python C-API symbols (Py*, _Py*) a library needs from its process (nm -D --undefined-only)."""
    out = subprocess.run(["nm", "-D", "--undefined-only", str(library)], capture_output=True, text=True,
                         check=True).stdout
    return [name for name in (line.split()[-1] for line in out.splitlines() if line.strip())
            if re.match(r"_?Py", name)]


def build_prebuilt(out_dir: Path) -> dict:
    """Builds the ops library for this torch (with CUDA kernels for TORCH_CUDA_ARCH_LIST, default
    PREBUILT_ARCHS, where cuda_enabled()) into out_dir/PREBUILT_LIB, its stamp beside it; returns the stamp."""
    archs = re.split(r"[;\s]+", (os.environ.get("TORCH_CUDA_ARCH_LIST") or PREBUILT_ARCHS).strip()) \
        if cuda_enabled() else []
    flags = _prebuilt_flags(archs)
    compilers = {"cxx": _version([cpp_extension.get_cxx_compiler()])}
    if archs:
        cpp_extension.CUDA_HOME = cuda_home()
        compilers["nvcc"] = _version([str(Path(cuda_home()) / "bin" / "nvcc")], marker="release")
    name = "q2kernels_ops_cuda" if archs else "q2kernels_ops"
    build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    started = time.monotonic()
    with build_lock(build_dir):
        # Copies: torch's builder appends its own flags to the lists it is given, and the stamp keeps ours.
        cpp_extension.load(name=name, sources=sources(bool(archs)), extra_cflags=list(flags["cflags"]),
                           extra_cuda_cflags=list(flags["cuda_cflags"]), extra_ldflags=list(flags["ldflags"]),
                           extra_include_paths=[str(CSRC)], build_directory=str(build_dir),
                           with_cuda=bool(archs), is_python_module=False, verbose=False)
    library = build_dir / f"{name}.so"
    needed = python_symbols(library)
    if needed:
        raise RuntimeError(f"q2kernels: the ops library {library} needs Python symbols ({', '.join(needed[:5])}), "
                           "so it would load under one Python version only")
    stamp = {"torch": torch.__version__, "cuda": torch.version.cuda, "archs": archs, "csrc_sha256": csrc_hash(),
             "flags": flags, "compilers": compilers,
             # What the library registered when it was built and loaded here: load() checks it again.
             "ops": {op: sorted(keys) for op, keys in registered_kernels().items()},
             "build_s": round(time.monotonic() - started, 1), "size_bytes": library.stat().st_size}
    out_dir.mkdir(parents=True, exist_ok=True)
    _replace(out_dir / PREBUILT_LIB, library.read_bytes())
    _replace(out_dir / PREBUILT_STAMP, json.dumps(stamp, indent=1).encode())
    return stamp


def _replace(path: Path, data: bytes) -> None:
    """Writes path whole or not at all: a reader never sees half a library or stamp."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _read_stamp(folder: Path) -> dict:
    stamp = json.loads((folder / PREBUILT_STAMP).read_text())
    missing = [k for k in _STAMP_KEYS if not isinstance(stamp, dict) or k not in stamp]
    if missing or not isinstance(stamp["archs"], list) or not isinstance(stamp["ops"], dict):
        raise ValueError(f"not a stamp of `q2k build --prebuilt` (missing or malformed: {missing or 'archs, ops'})")
    _sm(stamp["archs"])  # a ValueError for an arch that is no "9.0"
    return stamp


def _cuda_mismatch(archs: list[str]) -> str | None:
    """Why a library with machine code for archs (none: CPU alone) does not fit here, or None."""
    if not archs:
        return "it holds no CUDA kernels, and a build here would" if cuda_enabled() else None
    if os.environ.get("Q2K_BUILD_CUDA") == "0":
        return "it holds CUDA kernels, and Q2K_BUILD_CUDA=0 leaves them out"
    if torch.cuda.is_available():
        gpu = "%d.%d" % torch.cuda.get_device_capability()
        if gpu not in archs:
            return f"it holds machine code for {_sm(archs)} only, this GPU is {_sm([gpu])}"
    return None


def _stamp_mismatch(stamp: dict) -> str | None:
    """Why a library with this stamp does not fit this process, or None."""
    if stamp["torch"] != torch.__version__:
        return f"it is for torch {stamp['torch']}, this is torch {torch.__version__}"
    if stamp["cuda"] != torch.version.cuda:
        return f"it is for CUDA {stamp['cuda']}, this torch has CUDA {torch.version.cuda}"
    here = csrc_hash()
    if stamp["csrc_sha256"] != here:
        return f"it was built from other sources (csrc sha256 {str(stamp['csrc_sha256'])[:12]}, here {here[:12]})"
    if stamp["flags"] != _prebuilt_flags(stamp["archs"]):
        return "it was built with other flags than q2kernels/_ext.py's"
    return _cuda_mismatch(stamp["archs"])


def _opened(folder: Path, stamp: dict) -> OpsLibrary:
    """The library torch.ops.load_library has just loaded, checked against its stamp. It cannot be
    unloaded, so a library that registers other kernels than it did when built is an error, not a build."""
    library = folder / PREBUILT_LIB
    registered = {op: sorted(keys) for op, keys in registered_kernels().items()}
    if registered != stamp["ops"]:
        raise RuntimeError(f"q2kernels._C: the prebuilt library {library} registers {registered}, its stamp says "
                           f"{stamp['ops']}: delete {folder} and rerun (a build is then used)")
    handle = ctypes.CDLL(str(library))  # the one torch.ops.load_library opened

    def constant(symbol: str) -> int:
        return ctypes.c_int64.in_dll(handle, symbol).value

    return OpsLibrary(str(library), constant("q2k_channel_align"), constant("q2k_format_version"),
                      constant("q2k_epilogue_rows"), bool(constant("q2k_with_cuda")))


def prebuilt_library() -> OpsLibrary | None:
    """The prebuilt ops library of $Q2K_PREBUILT (else PREBUILT_DIR), loaded, where its stamp fits this
    process (torch, its CUDA, the csrc sources, the flags, the GPU's arch); else None. One line on stderr
    says that it was loaded, or why not (nothing where there is none and none was asked for)."""
    folder = Path(os.environ.get(PREBUILT_ENV) or PREBUILT_DIR).absolute()  # the process may change its cwd
    if not (folder / PREBUILT_STAMP).is_file():
        if os.environ.get(PREBUILT_ENV):
            _report_stderr(f"q2kernels._C: {PREBUILT_ENV}={folder} holds no {PREBUILT_STAMP}; building instead")
        return None
    try:
        stamp = _read_stamp(folder)
    except (OSError, ValueError) as e:
        reason = f"its stamp is unreadable ({type(e).__name__}: {e})"
    else:
        reason = _stamp_mismatch(stamp)
    if reason is None:
        try:
            torch.ops.load_library(str(folder / PREBUILT_LIB))
        except Exception as e:  # noqa: BLE001  (whatever stops it loading, a build replaces it)
            reason = f"it does not load ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]})"
    if reason is not None:
        _report_stderr(f"q2kernels._C: not using the prebuilt library in {folder}: {reason}; building instead")
        return None
    lib = _opened(folder, stamp)
    cuda = f"CUDA kernels for {_sm(stamp['archs'])}" if stamp["archs"] else "no CUDA kernels"
    _report_stderr(f"q2kernels._C: loaded the prebuilt library {lib.path} (torch {stamp['torch']}, {cuda}); no build")
    return lib
