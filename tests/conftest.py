"""Test harness. Without a GPU every Triton kernel runs under the Triton interpreter: the variable
must be set before triton is first imported, which is why it is set here, at collection."""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import q2kernels  # noqa: E402  (after TRITON_INTERPRET)

DEVICE = "cuda" if HAS_CUDA else "cpu"

# CI's lanes install the [onnx] extra: there the ONNX tests must run, and a missing onnxruntime
# fails the whole session here instead of skipping them (Q2K_REQUIRE_ONNX=1, .ci/steps/main.sh).
if os.environ.get("Q2K_REQUIRE_ONNX") == "1":
    import onnx  # noqa: E402, F401
    import onnxruntime  # noqa: E402, F401


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        # The marker, not item.keywords: those also hold the names of the parent directories, so a
        # checkout in a directory named cuda would skip every test.
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _fresh_seed_and_backend():
    """Every test starts from the automatic backend; seeds vary per test but are reproducible."""
    torch.manual_seed(0)
    with q2kernels.use_backend("auto"):
        yield


@pytest.fixture
def triton_backend():
    with q2kernels.use_backend("triton"):
        yield
