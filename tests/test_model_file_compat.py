"""Model files written by an earlier q2kernels load and compute the same bits with this one.

tests/fixtures/ holds integer models saved by save_int_model with the code of commit 095bf3e (before
issue 20 moved quantizer special cases into the quantizer protocol), with their input and the exact
outputs of the integer model then: its float outputs and the int8 codes each IntConv2d received
(tests/fixtures/make_model_files.py says how they were made, and what each model covers: LSQ, LSQ+
with its tap sums, PACT/DoReFa, N2UQ's thresholds, grouped and depthwise convs, a concat, folded
GatedFusion nodes, and QConv2d layers kept in float with their quantizers stored by kind). Every
output must be equal bit for bit (floats compared as their int32 bit patterns: -0.0 is not 0.0), on
the CPU fast path and on the int32 kernels, and again after the file is saved with this code.
"""
import importlib.util
from pathlib import Path

import pytest
import torch

from q2kernels.deploy import load_int_model, save_int_model
from q2kernels.ops import int_conv as ic

FIXTURES = Path(__file__).resolve().parent / "fixtures"
NAMES = ("yolo_lsq_plus", "yolo_pact", "yolo_n2uq", "mixed_lsq")


def _generator():
    """tests/fixtures/make_model_files.py, whose `run` records what the fixtures hold."""
    spec = importlib.util.spec_from_file_location("make_model_files", FIXTURES / "make_model_files.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _generator()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _assert_identical(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape, \
        f"{what}: {got.dtype} {tuple(got.shape)}, the old file gave {expected.dtype} {tuple(expected.shape)}"
    diff = (_bits(got) != _bits(expected)).sum().item()
    assert diff == 0, f"{what}: {diff} of {expected.numel()} elements differ from the old code's"


def _check(model, io, name):
    out, codes = GEN.run(model, io["x"])
    assert sorted(codes) == sorted(io["codes"]), f"{name}: the integer convs differ"
    for source, expected in io["codes"].items():
        _assert_identical(codes[source], expected, f"{name}: the codes into {source!r}")
    assert len(out) == len(io["outputs"])
    for i, (got, expected) in enumerate(zip(out, io["outputs"])):
        _assert_identical(got, expected, f"{name}: output {i}")


def _io(name):
    return torch.load(FIXTURES / f"{name}.io.pt", weights_only=True)


def test_the_fixtures_are_small():
    files = sorted(FIXTURES.glob("*.pt"))
    assert len(files) == 2 * len(NAMES)
    assert all(f.stat().st_size < 200_000 for f in files) and sum(f.stat().st_size for f in files) < 1_000_000


@pytest.mark.parametrize("fast", [True, False], ids=["fast_cpu", "int32_kernels"])
@pytest.mark.parametrize("name", NAMES)
def test_an_old_model_file_runs_bit_identically(name, fast):
    model = load_int_model(FIXTURES / f"{name}.pt")
    with ic.use_fast_cpu(fast):
        _check(model, _io(name), name)


@pytest.mark.parametrize("name", NAMES)
def test_an_old_model_file_saved_again_runs_bit_identically(name, tmp_path):
    path = tmp_path / f"{name}.pt"
    save_int_model(load_int_model(FIXTURES / f"{name}.pt"), path)
    _check(load_int_model(path), _io(name), name)
