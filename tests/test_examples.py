"""Every example program runs its --smoke mode to the end (each asserts its own results)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "python"


def _run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=EXAMPLES)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


@pytest.mark.parametrize("recipe", ["lsq", "n2uq"])
def test_qat_custom_model(recipe):
    out = _run([sys.executable, "qat_custom_model.py", "--smoke", "--recipe", recipe])
    assert "Q-GBFusion + Q-ADA" in out and "gates" in out


@pytest.mark.parametrize("recipe,bits", [("lsq_plus", 4), ("pact", 3)])
def test_deploy_int_model(recipe, bits, tmp_path):
    out = _run([sys.executable, "deploy_int_model.py", "--smoke", "--recipe", recipe, "--bits", str(bits),
                "--out", str(tmp_path / "m.q2k")])
    assert "argmax agreement" in out and (tmp_path / "m.q2k").exists()


def test_ddp_two_ranks_end_bitwise_equal():
    torchrun = shutil.which("torchrun") or pytest.fail("torchrun is not on PATH")
    out = _run([torchrun, "--standalone", "--nproc_per_node", "2", "ddp_train.py", "--smoke"])
    line = next(l for l in out.splitlines() if "bitwise equal across ranks" in l)
    n, total = line.split(";")[-1].split()[0].split("/")
    assert n == total
