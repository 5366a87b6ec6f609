"""The CUDA build of q2kernels._C, checked without a GPU: which toolkit it compiles with, and that a forced
CUDA build (Q2K_BUILD_CUDA=1) loads in a fresh process with a CPU and a CUDA kernel for every op.

Registration needs no GPU, but it needs a CUDA build of torch: under the CPU torch of the main job the
build test skips, and the GPU-image job of .ci/run (torch 2.11.0+cu130) runs it with
Q2K_REQUIRE_CUDA_BUILD=1, which turns that skip into a failure.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from q2kernels import _ext

REPO = Path(__file__).resolve().parent.parent


def _toolkit(root: Path) -> Path:
    """A directory that looks like a CUDA toolkit: bin/nvcc and include/cuda_runtime.h."""
    _executable(root / "bin" / "nvcc", "")
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("")
    return root


def _executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def no_cuda_env(monkeypatch):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    return monkeypatch


def test_cuda_home_follows_a_wrapper_script_to_its_toolkit(tmp_path, no_cuda_env):
    # torch guesses dirname(dirname(which nvcc)) = tmp_path/wrap, which has no cuda_runtime.h.
    home = _toolkit(tmp_path / "cuda-13.0")
    _executable(tmp_path / "wrap" / "bin" / "nvcc", f'#!/bin/sh\nexec {home}/bin/nvcc "$@"\n')
    no_cuda_env.setenv("PATH", str(tmp_path / "wrap" / "bin"))
    assert _ext.cuda_home() == str(home)


def test_cuda_home_follows_a_symlink_to_its_toolkit(tmp_path, no_cuda_env):
    home = _toolkit(tmp_path / "cuda-12.8")
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "nvcc").symlink_to(home / "bin" / "nvcc")
    no_cuda_env.setenv("PATH", str(tmp_path / "links"))
    assert _ext.cuda_home() == str(home)


def test_cuda_home_environment_wins(tmp_path, no_cuda_env):
    no_cuda_env.setenv("CUDA_HOME", str(tmp_path / "chosen"))
    no_cuda_env.setenv("PATH", str(tmp_path))
    assert _ext.cuda_home() == str(tmp_path / "chosen")


def test_cuda_home_ignores_a_wrapper_that_names_no_toolkit(tmp_path, no_cuda_env):
    _executable(tmp_path / "bin" / "nvcc", '#!/bin/sh\nexec /nonexistent/bin/nvcc "$@"\n')
    no_cuda_env.setenv("PATH", str(tmp_path / "bin"))
    expected = "/usr/local/cuda" if Path("/usr/local/cuda/include/cuda_runtime.h").is_file() else None
    assert _ext.cuda_home() == expected


def test_build_cuda_flag_is_checked(monkeypatch):
    monkeypatch.setenv("Q2K_BUILD_CUDA", "yes")
    with pytest.raises(ValueError, match="Q2K_BUILD_CUDA"):
        _ext.cuda_enabled()
    monkeypatch.setenv("Q2K_BUILD_CUDA", "0")
    assert _ext.cuda_enabled() is False


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU build of torch")
def test_forced_cuda_build_needs_a_cuda_torch(monkeypatch):
    monkeypatch.setenv("Q2K_BUILD_CUDA", "1")
    with pytest.raises(RuntimeError, match="Q2K_BUILD_CUDA=1: torch .* without CUDA"):
        _ext.cuda_enabled()


# Every op of q2kernels._C (csrc/ops.cpp, csrc/grouped_conv_cpu.cpp), written out, and the CPU fast path's
# (csrc/fast_conv_cpu.cpp), which have no CUDA kernel by design.
GPU_OPS = {"pack", "unpack", "quantize_pack", "quantize_pack_out", "conv2d_acc", "conv2d", "conv2d_out",
           "conv2d_grouped", "conv2d_grouped_out", "det_conv2d", "det_matmul", "det_softmax", "det_silu"}
CPU_ONLY_OPS = {"unpack_float", "conv2d_epilogue", "conv2d_epilogue_out"}
OPS = GPU_OPS | CPU_ONLY_OPS


def test_the_cpu_only_ops_are_the_ones_the_loader_knows():
    assert CPU_ONLY_OPS == _ext.CPU_ONLY_OPS

_REGISTRATIONS = "import json; from q2kernels import _ext; _ext.load(); " \
                 "print(json.dumps({op: sorted(keys) for op, keys in _ext.registered_kernels().items()}))"


def test_forced_cuda_build_loads_with_every_kernel_registered():
    if torch.version.cuda is None or _ext.cuda_home() is None:
        missing = "a CUDA build of torch" if torch.version.cuda is None else "a CUDA toolkit"
        if os.environ.get("Q2K_REQUIRE_CUDA_BUILD") == "1":
            pytest.fail(f"Q2K_REQUIRE_CUDA_BUILD=1 but this environment lacks {missing}")
        pytest.skip(f"needs {missing} (the GPU-image job of .ci/run runs it)")
    env = dict(os.environ, Q2K_BUILD_CUDA="1", PYTHONPATH=str(REPO))
    # The build loads the library it built, and registering a kernel whose C++ signature differs from
    # another device's kernel of the same op aborts the process right there (SIGABRT, rc -6).
    build = subprocess.run([sys.executable, "-c", "from q2kernels import _ext; _ext.load()"], env=env,
                           capture_output=True, text=True, timeout=3000)
    assert build.returncode == 0, f"building and loading the CUDA build failed (rc {build.returncode}):\n" \
                                  f"{build.stderr[-6000:]}"
    # A fresh process loads the cached library, as every later process does, and reads the dispatcher.
    load = subprocess.run([sys.executable, "-c", _REGISTRATIONS], env=env, capture_output=True, text=True,
                          timeout=600)
    assert load.returncode == 0, f"loading the CUDA build failed (rc {load.returncode}):\n{load.stderr[-6000:]}"
    registered = json.loads(load.stdout.strip().splitlines()[-1])
    assert {op.split("::")[1] for op in registered} == OPS
    expected = {op: {"CPU"} if op.split("::")[1] in CPU_ONLY_OPS else {"CPU", "CUDA"} for op in registered}
    missing = {op: sorted(expected[op] - set(keys)) for op, keys in registered.items() if expected[op] - set(keys)}
    assert not missing, f"kernels not registered: {missing}"
    # q2k doctor says the same.
    doctor = subprocess.run([sys.executable, "-m", "q2kernels.cli", "doctor"], env=env, capture_output=True,
                            text=True, timeout=600)
    assert doctor.returncode == 0, doctor.stderr[-3000:]
    assert f"CUDA_HOME: {_ext.cuda_home()}" in doctor.stdout
    assert "with the CUDA kernels" in doctor.stdout
    assert f"CPU kernels of the {len(OPS)} q2kernels_int ops: all registered" in doctor.stdout
    assert f"CUDA kernels of the {len(GPU_OPS)} q2kernels_int ops: all registered" in doctor.stdout


def test_doctor_reports_cuda_home_and_registered_kernels():
    env = dict(os.environ, Q2K_BUILD_CUDA="0", PYTHONPATH=str(REPO))
    doctor = subprocess.run([sys.executable, "-m", "q2kernels.cli", "doctor"], env=env, capture_output=True,
                            text=True, timeout=900)
    assert doctor.returncode == 0, doctor.stderr[-3000:]
    assert f"CUDA_HOME: {_ext.cuda_home() or 'none found'}" in doctor.stdout
    assert "builds and loads (without the CUDA kernels)" in doctor.stdout
    assert f"CPU kernels of the {len(OPS)} q2kernels_int ops: all registered" in doctor.stdout
    assert f"CUDA kernels of the {len(GPU_OPS)} q2kernels_int ops: missing for conv2d, conv2d_acc" in doctor.stdout
