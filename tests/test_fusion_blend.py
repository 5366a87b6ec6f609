"""deploy.fusion_blend: a fusion node whose LayerNorm statistics blend from per-pixel to calibrated,
against a float64 oracle of the formula written here; at t = 0 it is the node's LayerNorm, at t = 1
the FixedFusion that freeze_fusion makes. The trainer's schedule of it: tests/test_ultralytics_flow.py."""
import copy

import numpy as np
import pytest
import torch

from q2kernels.deploy import calibrate_fusion, freeze_fusion
from q2kernels.deploy.fusion_blend import BlendedFusion
from q2kernels.nn import GatedFusion


def _node(fuse, channels, mode="balanced"):
    torch.manual_seed(1)
    node = GatedFusion(channels, mode=mode, fuse=fuse)
    with torch.no_grad():
        node.theta.copy_(torch.tensor([0.4, -0.3]))
        node.gamma.uniform_(0.5, 2.0)
        node.beta.uniform_(-1, 1)
    calibrate_fusion(node, [_branches(channels, seed) for seed in (2, 3)], forward=lambda m, b: m(b))
    return node


def _branches(channels, seed, shape=(2, 4, 5)):
    g = torch.Generator().manual_seed(seed)
    B, H, W = shape
    # Branches on different scales and offsets, so per-pixel and average statistics really differ.
    return [torch.randn(B, c, H, W, generator=g) * (1 + 2 * k) + k for k, c in enumerate(channels)]


def _oracle(node, xs, t):
    """The module docstring's formula in float64 numpy."""
    theta = node.theta.detach().double().numpy()
    a = np.exp(theta - theta.max())
    a /= a.sum()
    parts = [a[k] * x.double().numpy() for k, x in enumerate(xs)]
    h = np.concatenate(parts, axis=1) if node.fuse == "concat" else sum(parts)
    mu = h.mean(axis=1, keepdims=True)
    sigma = np.sqrt(((h - mu) ** 2).mean(axis=1, keepdims=True) + node.eps)
    m = (1 - t) * mu + t * node.mubar.item()
    s = (1 - t) * sigma + t * node.sigmabar.item()
    gamma = node.gamma.detach().double().numpy().reshape(1, -1, 1, 1)
    beta = node.beta.detach().double().numpy().reshape(1, -1, 1, 1)
    return gamma * (h - m) / s + beta


CASES = [("concat", [5, 3]), ("concat", [1, 7]), ("sum", [4, 4])]


@pytest.mark.parametrize("fuse,channels", CASES)
@pytest.mark.parametrize("t", [0.0, 0.3, 0.75, 1.0])
def test_forward_is_the_blend_formula(fuse, channels, t):
    node = _node(fuse, channels)
    blended = BlendedFusion(node, blend=t)
    xs = _branches(channels, 7)
    np.testing.assert_allclose(blended(xs).detach().double().numpy(), _oracle(node, xs, t), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("fuse,channels", CASES)
def test_ends_are_the_layernorm_and_the_frozen_affine(fuse, channels):
    node = _node(fuse, channels).eval()
    xs = _branches(channels, 9)
    blended = BlendedFusion(copy.deepcopy(node))
    torch.testing.assert_close(blended(xs), node(xs), rtol=1e-5, atol=1e-5)
    blended.set_blend(1.0)
    frozen = freeze_fusion(torch.nn.Sequential(copy.deepcopy(node)))[0]
    torch.testing.assert_close(blended.freeze()(xs), frozen(xs), rtol=0, atol=0)
    torch.testing.assert_close(blended(xs), frozen(xs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [0.0, 0.5, 1.0])
def test_gradients_reach_branches_and_affine(t):
    node = _node("concat", [3, 2])
    blended = BlendedFusion(node, blend=t)
    xs = [x.requires_grad_() for x in _branches([3, 2], 11)]
    dy = torch.randn(2, 5, 4, 5, generator=torch.Generator().manual_seed(12))
    (blended(xs) * dy).sum().backward()
    # The same formula in float64 autograd, written out here.
    gates = torch.softmax(node.theta.detach().double(), 0)
    x64 = [x.detach().double().requires_grad_() for x in xs]
    gamma = node.gamma.detach().double().requires_grad_()
    beta = node.beta.detach().double().requires_grad_()
    h = torch.cat([gates[k] * x for k, x in enumerate(x64)], 1)
    mu = h.mean(1, keepdim=True)
    sigma = (((h - mu) ** 2).mean(1, keepdim=True) + node.eps).sqrt()
    m, s = (1 - t) * mu + t * node.mubar.double(), (1 - t) * sigma + t * node.sigmabar.double()
    y = gamma.reshape(1, -1, 1, 1) * (h - m) / s + beta.reshape(1, -1, 1, 1)
    (y * dy.double()).sum().backward()
    for got, want in [(xs[0].grad, x64[0].grad), (xs[1].grad, x64[1].grad), (node.gamma.grad, gamma.grad),
                      (node.beta.grad, beta.grad)]:
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    assert node.theta.grad is None  # the gates are fixed while the statistics blend


@pytest.mark.parametrize("t", [float("nan"), -0.1, 1.5, True, "0.5", float("inf")])
def test_blend_weight_outside_unit_interval_is_refused(t):
    blended = BlendedFusion(_node("concat", [2, 2]))
    with pytest.raises(ValueError, match="t: expected a number in"):
        blended.set_blend(t)
    with pytest.raises(ValueError, match="t: expected a number in"):
        BlendedFusion(_node("concat", [2, 2]), blend=t)


def test_uncalibrated_or_foreign_node_is_refused():
    with pytest.raises(ValueError, match="not calibrated"):
        BlendedFusion(GatedFusion([2, 3]))
    with pytest.raises(TypeError, match="node: expected a GatedFusion"):
        BlendedFusion(torch.nn.Identity())

