"""Installing and importing q2kernels: importing compiles nothing (the first integer op does), and the
C++/CUDA sources are found wherever the package is installed (.ci/steps/wheel.sh runs the integer
tests from an installed wheel)."""
import os
import subprocess
import sys
from pathlib import Path

from q2kernels import _ext


def test_import_builds_nothing(tmp_path):
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    code = ("import q2kernels, q2kernels.functional, q2kernels.nn, q2kernels.deploy, q2kernels.ops.int_conv; "
            "import q2kernels.ops.int_conv as ic; assert ic.load.cache_info().currsize == 0")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=600)
    built = list((tmp_path / "ext").rglob("*")) if (tmp_path / "ext").exists() else []
    assert built == [], f"importing q2kernels wrote {built[:5]}"


def test_sources_found_and_complete():
    names = {p.name for p in _ext.CSRC.rglob("*") if p.is_file()}
    assert {"ops.cpp", "format.h", "epilogue.h", "int_conv_cpu.cpp"} <= names
    assert any(Path(s).suffix == ".cu" for s in _ext.sources(with_cuda=True))
