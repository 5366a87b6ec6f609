"""python/ddp_train.py when training diverges: the run fails and says which tensors are non-finite,
instead of reporting NaN tensors (equal bit for bit on both ranks) as differing across ranks."""
import shutil
import subprocess
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "python"


def test_ddp_example_names_non_finite_tensors_when_training_diverges():
    torchrun = shutil.which("torchrun") or pytest.fail("torchrun is not on PATH")
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "ddp_train.py", "--smoke", "--lr", "1e30"],
                       capture_output=True, text=True, timeout=600, cwd=EXAMPLES)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    assert "training diverged, non-finite values in" in out, out[-3000:]
    assert "differ across ranks" not in out, out[-3000:]
    line = next(l for l in out.splitlines() if "bitwise equal across ranks" in l)
    n, total = line.split(";")[-1].split()[0].split("/")
    assert n == total, line  # NaN is compared bit for bit: identical NaNs are equal
