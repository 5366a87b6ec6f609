"""Every Triton kernel, as the ops, the GPU tests and the benchmarks launch it, compiled for Hopper
(sm_90) with the ptxas of the triton wheel and checked for register spills — no GPU needed
(tests/triton_spills.py: launches recorded and keyed as Triton keys them, each specialisation
compiled, spills read from the stack frame). The interpreter runs kernels as Python, so what only the
GPU compiler rejects (a global that is not a constexpr, a type that changes across a loop, a pointer
of the wrong type) and spills would otherwise first show on a GPU machine.

The same check by hand, for one workload or all:  python tests/triton_spills.py [ops cuda_tests benchmarks]
"""
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
KERNELS = ("_fake_quant_fwd_kernel", "_fake_quant_bwd_kernel", "_absmax_kernel", "_dorefa_fwd_kernel",
           "_dorefa_bwd_partials_kernel", "_dorefa_bwd_kernel", "_ltq_tables_kernel", "_ltq_fwd_kernel",
           "_ltq_bwd_kernel", "_ltq_bwd_finish_kernel", "_n2uq_weight_fwd_kernel", "_n2uq_weight_bwd_kernel",
           "_q_ada_fwd_kernel", "_q_ada_bwd_kernel", "_gated_fusion_fwd_kernel", "_gated_fusion_bwd_kernel")


def _spill_check(*workloads, timeout=3000):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(HERE.parent)
    return subprocess.run([sys.executable, str(HERE / "triton_spills.py"), *workloads], capture_output=True,
                          text=True, env=env, timeout=timeout)


def test_every_specialisation_compiles_for_sm90_without_unlisted_spills():
    r = _spill_check("ops", "cuda_tests", "benchmarks")
    print(r.stdout)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-4000:]
    lines = r.stdout.splitlines()
    compiled = {line.split()[0] for line in lines if not line.startswith("#")}
    assert compiled == set(KERNELS), f"launched: {sorted(compiled)}"
    for workload in ("ops", "cuda_tests", "benchmarks"):
        assert any(line.startswith(f"# workload {workload}: ") for line in lines)
    # Every line carries the resource usage the verdict was read from.
    assert all("REG:" in line and "STACK:" in line for line in lines if not line.startswith("#"))


_PLANT = '''
import torch
import triton
import triton.language as tl


@triton.jit
def _planted_spill_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    # A row of BLOCK values stays live across its own sum: BLOCK / 32 registers per thread of one warp.
    offs = tl.arange(0, BLOCK)
    v = tl.load(x_ptr + offs)
    tl.store(y_ptr + offs, v - tl.sum(v, axis=0) / BLOCK)


def drive():
    for block in (1024, 16384):  # 32 registers of row per thread: fits; 512: cannot
        x = torch.empty(block)
        _planted_spill_kernel[(1,)](x, torch.empty_like(x), BLOCK=block, num_warps=1)
'''


def test_planted_spill_fails_the_check(tmp_path):
    plant = tmp_path / "plant.py"
    plant.write_text(_PLANT)
    r = _spill_check(f"{plant}:drive", timeout=900)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("_planted_spill_kernel")]
    assert len(lines) == 2, r.stdout
    fits = next(line for line in lines if "BLOCK=1024" in line)
    spills = next(line for line in lines if "BLOCK=16384" in line)
    assert " ok " in fits and "STACK:0 " in fits
    assert " SPILLS " in spills and "STACK:0 " not in spills
    assert f"# spill: {spills}" in r.stdout
