"""The prebuilt ops library (`q2k build --prebuilt DIR`; q2kernels/_ext.py prebuilt_library), built here
for this torch with the CPU kernels alone: it needs no Python symbol (so any Python of this torch build
loads it), a fresh process loads it instead of building and its integer ops give what the built
extension gives; a stamp that does not fit, or a library that does not load, falls back to the build
(stubbed here) with the reason in one line."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from q2kernels import _ext

REPO = Path(__file__).resolve().parent.parent
# The ops every build registers (csrc/ops.cpp, csrc/grouped_conv_cpu.cpp); work in progress may add more.
OPS = {"pack", "unpack", "quantize_pack", "quantize_pack_out", "conv2d_acc", "conv2d", "conv2d_out", "conv2d_grouped",
       "conv2d_grouped_out"}
# What a device call carries at most (the working tree and the carried folder together).
CARRY_LIMIT = 64 * 2**20

# Runs the integer ops on fixed inputs, in a fresh process, through whichever library load() chose.
_RUN_OPS = """
import sys, torch
from q2kernels.ops import grouped_conv as gc, int_conv as ic
lib = ic.load()
g = torch.Generator().manual_seed(0)
x, w = torch.randint(0, 16, (2, 40, 9, 7), generator=g), torch.randint(-8, 8, (24, 40, 3, 3), generator=g)
xp, wp = ic.pack(x, 4, False), ic.pack(w, 4, True)
wd = ic.pack(torch.randint(-8, 8, (40, 1, 3, 3), generator=g), 4, True)
ep = ic.epilogue_params(24, alpha=torch.rand(24, generator=g), bias=torch.randn(24, generator=g), q_mul=0.5)
qparams = torch.stack([torch.full((40,), 3.0), torch.zeros(40)])
out = {"unpack": ic.unpack(xp, 40, False), "acc": ic.conv2d_acc(xp, wp, 40, False, True, padding=1),
       "conv": ic.conv2d(xp, wp, ep, 40, x_signed=False, w_signed=True, padding=1, act="relu"),
       "depthwise": gc.conv2d_grouped(xp, wd, ic.epilogue_params(40, alpha=0.25), 40, 40, x_signed=False,
                                      w_signed=True, padding=1),
       "quantize_pack": ic.quantize_pack(torch.randn(2, 40, 9, 7, generator=g), qparams, 0, 15),
       "reference_acc": torch.nn.functional.conv2d(x.double(), w.double(), padding=1)}
torch.save(out, sys.argv[1])
print("loaded:", type(lib).__name__, lib.__file__, lib.CHANNEL_ALIGN, lib.FORMAT_VERSION, lib.EPILOGUE_ROWS,
      lib.WITH_CUDA)
"""


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), Q2K_BUILD_CUDA="0", **extra)
    env.pop("Q2K_SANITIZE", None)
    return env


@pytest.fixture(scope="module")
def prebuilt(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("prebuilt")
    r = subprocess.run([sys.executable, "-m", "q2kernels.cli", "build", "--prebuilt", str(folder)], env=_env(),
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "no Python symbols" in r.stdout
    return folder


def test_prebuilt_library_needs_no_python_and_is_stamped(prebuilt):
    lib = prebuilt / _ext.PREBUILT_LIB
    undefined = subprocess.run(["nm", "-D", "--undefined-only", str(lib)], capture_output=True, text=True,
                               check=True).stdout.split()
    assert undefined and not [s for s in undefined if s.startswith(("Py", "_Py"))]
    needed = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
    assert "libtorch_cpu.so" in needed and "libtorch_python.so" not in needed and "libpython" not in needed
    stamp = json.loads((prebuilt / _ext.PREBUILT_STAMP).read_text())
    assert (stamp["torch"], stamp["cuda"], stamp["archs"]) == (torch.__version__, torch.version.cuda, [])
    assert stamp["csrc_sha256"] == _ext.csrc_hash() and stamp["compilers"]["cxx"]
    assert OPS <= {op.split("::")[1] for op in stamp["ops"]}
    assert all("CPU" in keys for keys in stamp["ops"].values())
    assert lib.stat().st_size == stamp["size_bytes"] < CARRY_LIMIT


def _run_ops(tmp_path, name, prebuilt_dir) -> tuple[dict, subprocess.CompletedProcess]:
    out = tmp_path / f"{name}.pt"
    r = subprocess.run([sys.executable, "-c", _RUN_OPS, str(out)], env=_env(Q2K_PREBUILT=str(prebuilt_dir)),
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return torch.load(out), r


def test_a_fresh_process_loads_it_and_its_ops_equal_the_built_extension(prebuilt, tmp_path):
    loaded, r = _run_ops(tmp_path, "prebuilt", prebuilt)
    assert f"loaded the prebuilt library {prebuilt / _ext.PREBUILT_LIB}" in r.stderr and "no build" in r.stderr
    assert f"loaded: OpsLibrary {prebuilt / _ext.PREBUILT_LIB} 32 1 7 False" in r.stdout
    empty = tmp_path / "none"
    built, r = _run_ops(tmp_path, "built", empty)
    assert f"Q2K_PREBUILT={empty} holds no {_ext.PREBUILT_STAMP}; building instead" in r.stderr
    assert "loaded: module " in r.stdout
    assert torch.equal(loaded["acc"].double(), loaded["reference_acc"])
    assert loaded.keys() == built.keys()
    for name in loaded:
        assert torch.equal(loaded[name], built[name]), name


def _edit_stamp(folder: Path, **fields) -> None:
    path = folder / _ext.PREBUILT_STAMP
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **fields)))


@pytest.mark.parametrize("spoil, reason", [
    (lambda f: _edit_stamp(f, torch="2.0.0"), f"it is for torch 2.0.0, this is torch {torch.__version__}"),
    (lambda f: _edit_stamp(f, csrc_sha256="0" * 64),
     "it was built from other sources (csrc sha256 000000000000, here "),
    (lambda f: (f / _ext.PREBUILT_LIB).write_bytes(b"\x7fELF, but not a library"), "it does not load (OSError: "),
    (lambda f: (f / _ext.PREBUILT_STAMP).write_text("{"), "its stamp is unreadable (JSONDecodeError: "),
], ids=["torch_version", "csrc_hash", "corrupt_library", "corrupt_stamp"])
def test_a_prebuilt_library_that_does_not_fit_falls_back_to_the_build(prebuilt, tmp_path, monkeypatch, capsys, spoil,
                                                                      reason):
    folder = tmp_path / "prebuilt"
    shutil.copytree(prebuilt, folder)
    spoil(folder)
    monkeypatch.setenv("Q2K_PREBUILT", str(folder))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setenv("Q2K_BUILD_CUDA", "0")
    monkeypatch.delenv("Q2K_SANITIZE", raising=False)
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: "built")
    assert _ext.load.__wrapped__() == "built"
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"q2kernels._C: not using the prebuilt library in {folder}: {reason}"), line
    assert line.endswith("; building instead")
