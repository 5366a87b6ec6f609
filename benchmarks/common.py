"""Timing and reporting shared by every benchmark.

On a GPU: triton.testing.do_bench (median, L2 flushed between runs), peak memory from the CUDA
allocator, bandwidth as a fraction of the measured device copy bandwidth of the same GPU.
On a CPU (`--smoke`): tiny shapes, wall-clock medians, Triton kernels through the interpreter —
a check that the benchmark runs, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEVICE = "cuda" if HAS_CUDA else "cpu"


def parse_args(description: str, argv=None, sweep: bool = False) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="tiny shapes; the only mode without a GPU")
    p.add_argument("--out", type=Path, default=None,
                   help="directory for <gpu>-<commit>-<name>.json/.md (default: print only)")
    if sweep:
        p.add_argument("--sweep", action="store_true", help="also time the other block-size settings")
    args = p.parse_args(argv)
    if not HAS_CUDA:
        args.smoke = True
    return args


def bench_main(name: str, run, columns: list[str], doc: str, argv=None, sweep: bool = False) -> list[dict]:
    """The command line of one benchmark script: parse, run(smoke[, sweep]), report."""
    args = parse_args(doc.splitlines()[0], argv, sweep)
    rows = run(args.smoke, args.sweep) if sweep else run(args.smoke)
    report(name, rows, columns, args.out)
    return rows


def backend_impls(fn, smoke: bool) -> dict:
    """impl name -> fn run by q2kernels' fused kernels, the eager reference, and (not in a smoke
    run: compiling on a CPU takes minutes) torch.compile of the reference."""
    import q2kernels

    def under(backend):
        def run(*args):
            with q2kernels.use_backend(backend):
                return fn(*args)
        return run

    impls = {"q2kernels": under("triton"), "eager": under("reference")}
    if not smoke or SMOKE_COMPILE:
        impls["compile"] = Compiled(under("reference"))
    return impls


# Smoke runs leave the torch.compile baselines out (compiling on a CPU takes minutes); set (by
# tests/test_bench_compile_baseline.py, or Q2K_BENCH_COMPILE=1) to run them at smoke sizes too.
SMOKE_COMPILE = os.environ.get("Q2K_BENCH_COMPILE") == "1"


class CompileFellBack(RuntimeError):
    """A torch.compile baseline that ran uncompiled: it must not be timed as compiled."""


class Compiled:
    """torch.compile of fn for one benchmark case, verified to really run compiled code.

    Cases share code objects (the closures of backend_impls, one module's forward), and past the
    recompile limit (8 per code object) Dynamo silently runs the rest eager: a "speedup vs
    torch.compile" would then be one against eager. So every case compiles from a fresh Dynamo
    cache, hitting the limit anyway raises (FailOnRecompileLimitHit) instead of falling back, and
    check() reads Dynamo's counters: no graph compiled raises CompileFellBack; graph breaks (parts
    of fn left eager) are counted for the row."""

    def __init__(self, fn, backend: str = "inductor"):
        self.fn, self.backend, self._compiled = fn, backend, None
        # measure() times the backward alone by calling it again on one forward's graph
        # (retain_graph=True); AOTAutograd's donated buffers (the backward reusing saved activations'
        # memory) refuse that ("non-empty donated buffers ... retain_graph=False"). Without them the
        # graphs are still compiled by inductor; only that memory reuse is given up.
        import torch._functorch.config
        torch._functorch.config.donated_buffer = False

    def __call__(self, *args):
        if self._compiled is None:
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            torch._dynamo.config.fail_on_recompile_limit_hit = True
            self._compiled = torch.compile(self.fn, backend=self.backend)
        return self._compiled(*args)

    def check(self) -> dict:
        """{"graphs": graphs compiled, "graph_breaks": breaks} since this case's first call."""
        counters = torch._dynamo.utils.counters
        graphs = counters["stats"]["unique_graphs"]
        if self._compiled is None or graphs == 0:
            raise CompileFellBack(f"torch.compile compiled no graph for {getattr(self.fn, '__name__', self.fn)}: "
                                  "it ran eager")
        return {"graphs": graphs, "graph_breaks": sum(counters["graph_break"].values())}


def compile_fell_back(fn, run) -> dict | None:
    """None when fn is not a Compiled or run() (its warm-up) ran compiled code; else the row fields
    that report the fall-back (printed too) in place of a timing."""
    if not isinstance(fn, Compiled):
        run()
        return None
    try:
        run()
        fn.check()
    except (CompileFellBack, torch._dynamo.exc.FailOnRecompileLimitHit) as e:
        print(f"torch.compile fell back to eager, not timed: {e}", file=sys.stderr)
        return compile_failed(e)
    except Exception as e:  # noqa: BLE001  (a compile baseline that breaks is a row, never the run's end)
        print(f"torch.compile baseline failed, not timed: {type(e).__name__}: {e}", file=sys.stderr)
        return compile_failed(e)
    return None


def compile_failed(e: BaseException) -> dict:
    """The row fields of a torch.compile baseline that did not run compiled: never timed."""
    reason = " ".join(f"{type(e).__name__}: {e}".split())
    return {"compile_error": f"compile failed: {reason[:500]}"}


def time_ms(fn, reps: int = 100) -> float:
    """Median milliseconds of fn()."""
    if HAS_CUDA:
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=reps, return_mode="median")
    # A CPU run is a smoke check (the Triton kernels go through the interpreter): one warm-up and
    # one timed call show that the path runs, and keep CI fast.
    fn()
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def peak_mem_mb(fn) -> float | None:
    """Peak allocator memory above what was allocated before fn() ran, in MiB (GPU only)."""
    if not HAS_CUDA:
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while fn() runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


_COPY_GBS = None


def copy_bandwidth_gbs() -> float | None:
    """Device-to-device copy bandwidth (read + write bytes), measured once per process."""
    global _COPY_GBS
    if not HAS_CUDA:
        return None
    if _COPY_GBS is None:
        x = torch.empty(2**28, dtype=torch.uint8, device="cuda")
        y = torch.empty_like(x)
        ms = time_ms(lambda: y.copy_(x))
        _COPY_GBS = 2 * x.numel() / ms / 1e6
    return _COPY_GBS


# (k, n): measure only the cases whose labels hash to k modulo n (run_all.py --shard k/n), so that a
# benchmark too long for one device call is split over several; None: every case.
SHARD: tuple[int, int] | None = None


def in_shard(labels: dict) -> bool:
    """Whether this process measures the case with these labels. Every impl of a case (its labels less
    `impl`) falls in the same shard, so that speedups are computed within a shard."""
    if SHARD is None:
        return True
    case = json.dumps({k: v for k, v in sorted(labels.items()) if k != "impl"}, default=str)
    return zlib.crc32(case.encode()) % SHARD[1] == SHARD[0]


def measure(fn, inputs, grad, bytes_fwd: int, bytes_bwd: int, **labels) -> dict:
    """Forward, backward and forward+backward of out = fn(*inputs) w.r.t. the inputs that require
    grad; bytes_* are the minimum bytes each pass must move (the floor for GB/s)."""
    wants = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if not in_shard(labels):
        return dict(labels, other_shard=True, peak_mem_mb=None)

    def fwd():
        return fn(*inputs)

    def fwd_bwd():
        torch.autograd.grad(fn(*inputs), wants, grad)

    row = dict(labels)
    # The warm-up (the compile, for a torch.compile baseline) first: a baseline that fails there is a row.
    fell_back = compile_fell_back(fn, fwd_bwd)
    if fell_back is not None:
        print(f"measured: {json.dumps(dict(row, **fell_back))}", flush=True)
        return dict(row, **fell_back)
    out = None

    def bwd():
        torch.autograd.grad(out, wants, grad, retain_graph=True)

    try:
        out = fwd()
        if isinstance(fn, Compiled):
            row.update(fn.check())
        row["fwd_ms"] = time_ms(fwd)
        row["bwd_ms"] = time_ms(bwd)
        row["fwd_bwd_ms"] = time_ms(fwd_bwd)
        row["peak_mem_mb"] = peak_mem_mb(fwd_bwd)
        row["saved_mb"] = saved_bytes(fwd) / 2**20
    except Exception as e:  # noqa: BLE001
        if not isinstance(fn, Compiled):
            raise
        row = dict(labels, **compile_failed(e))
        print(f"torch.compile baseline failed, not timed: {row['compile_error']}", file=sys.stderr)
        print(f"measured: {json.dumps(row)}", flush=True)
        return row
    copy = copy_bandwidth_gbs()
    for p, nbytes in (("fwd", bytes_fwd), ("bwd", bytes_bwd), ("fwd_bwd", bytes_fwd + bytes_bwd)):
        gbs = nbytes / row[f"{p}_ms"] / 1e6
        row[f"{p}_gbs"] = gbs
        row[f"{p}_pct_copy"] = 100 * gbs / copy if copy else None
    # One line per measured case as it completes: a run cut short by its time limit keeps them in its log.
    print(f"measured: {json.dumps(row)}", flush=True)
    return row


def add_speedups(rows: list[dict], keys: tuple[str, ...], baseline_impl: str, impl: str = "q2kernels",
                 metric: str = "fwd_bwd_ms") -> None:
    """Give each `impl` row `speedup_vs_<baseline>` against the row with the same `keys`."""
    base = {tuple(r[k] for k in keys): r for r in rows if r["impl"] == baseline_impl}
    for r in rows:
        b = base.get(tuple(r[k] for k in keys))
        if r["impl"] == impl and b is not None and b.get(metric) is not None and r.get(metric) is not None:
            r[f"speedup_vs_{baseline_impl}"] = b[metric] / r[metric]


def device_name() -> str:
    return torch.cuda.get_device_name() if HAS_CUDA else f"cpu-{platform.machine()}"


def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                       text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict:
    import triton
    return {"device": device_name(), "commit": commit(), "torch": torch.__version__,
            "triton": triton.__version__, "python": sys.version.split()[0],
            "copy_gbs": copy_bandwidth_gbs()}


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def report_table(name: str, rows: list[dict], columns: list[str]) -> str:
    return f"## {name}\n\n{markdown_table(rows, columns)}\n"


def report(name: str, rows: list[dict], columns: list[str], out: Path | None) -> str:
    """Print the table; with `out`, also write <out>/<gpu>-<commit>-<name>.json and .md."""
    env = environment()
    table = report_table(name, rows, columns)
    print(table, flush=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        stem = f"{env['device'].replace(' ', '_')}-{env['commit']}-{name}"
        (out / f"{stem}.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
        (out / f"{stem}.md").write_text(f"# {name}\n\n{json.dumps(env)}\n\n{table}")
    return table
