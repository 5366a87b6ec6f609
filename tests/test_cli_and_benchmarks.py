"""The README's first command (`q2k demo --smoke`), `q2k doctor`, and every benchmark's CPU smoke
mode: each must run to the end and report what it promises."""
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _q2k(*args):
    return subprocess.run([sys.executable, "-m", "q2kernels.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def test_doctor_reports_versions_and_backends():
    r = _q2k("doctor")
    assert r.returncode == 0, r.stderr
    assert "torch" in r.stdout and "triton" in r.stdout and "GPU:" in r.stdout
    assert "CPU tensors -> reference" in r.stdout and "fake_quant" in r.stdout


def test_demo_smoke_runs_and_fused_agrees_with_reference():
    r = _q2k("demo", "--smoke")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "fused kernels and reference agree" in r.stdout
    for recipe in ("lsq", "lsq_plus", "pact"):
        assert f"\n{recipe} " in r.stdout


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "benchmarks").glob("bench_*.py")))
def test_benchmark_smoke(name, tmp_path):
    bench = importlib.import_module(f"benchmarks.{name}")
    rows = bench.main(["--smoke", "--out", str(tmp_path)])
    assert rows and all(r["fwd_ms"] > 0 for r in rows if "fwd_ms" in r)
    assert list(tmp_path.glob("*.json")) and list(tmp_path.glob("*.md"))
