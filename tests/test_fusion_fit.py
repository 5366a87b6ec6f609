"""deploy.fusion_fit: the least-squares fixed affine that replaces a LayerNorm, against a numpy fit of
the same data; it is never further from the LayerNorm than the mean-statistics affine."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from q2kernels.deploy import calibrate_fusion, freeze_fusion
from q2kernels.deploy.fixed_fusion import FixedFusion
from q2kernels.deploy.fusion_fit import fitted_fusion
from q2kernels.nn import GatedFusion


class _Net(nn.Module):
    def __init__(self, fuse, channels):
        super().__init__()
        self.a = nn.Conv2d(3, channels[0], 3, padding=1)
        self.b = nn.Conv2d(3, channels[1], 1)
        self.fuse = GatedFusion(channels, mode="learned", fuse=fuse)

    def forward(self, x):
        return self.fuse([torch.relu(self.a(x)), self.b(x) * 3 + 1])


def _net(fuse, channels=(5, 7)):
    torch.manual_seed(0)
    net = _Net(fuse, list(channels) if fuse == "concat" else [channels[0]] * 2).eval()
    with torch.no_grad():
        net.fuse.theta.copy_(torch.tensor([0.3, -0.4]))
        net.fuse.gamma.uniform_(0.5, 2.0)
        net.fuse.beta.uniform_(-1, 1)
    return net


def _captured(net, batches):
    """(h, y) as numpy float64 (pixels, channels): h the node's pre-affine input computed here from the
    branches (concat, or the softmax-gated sum), y its LayerNorm output."""
    hs, ys = [], []

    def hook(module, args, out):
        xs = [x.double().numpy() for x in args[0]]
        if module.fuse == "concat":
            h = np.concatenate(xs, axis=1)
        else:
            t = module.theta.detach().double().numpy()
            a = np.exp(t) / np.exp(t).sum()
            h = sum(a[k] * x for k, x in enumerate(xs))
        hs.append(h.transpose(0, 2, 3, 1).reshape(-1, h.shape[1]))
        ys.append(out.detach().double().numpy().transpose(0, 2, 3, 1).reshape(-1, out.shape[1]))

    handle = net.fuse.register_forward_hook(hook)
    with torch.no_grad():
        for x in batches:
            net(x)
    handle.remove()
    return np.concatenate(hs), np.concatenate(ys)


@pytest.mark.parametrize("fuse", ["concat", "sum"])
def test_fit_is_the_least_squares_affine(fuse):
    net = _net(fuse)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(2, 3, 6, 5, generator=g) for _ in range(3)]
    fixed = fitted_fusion(net, batches)
    assert list(fixed) == ["fuse"] and isinstance(fixed["fuse"], FixedFusion)
    h, y = _captured(net, batches)
    for c in range(h.shape[1]):
        slope, intercept = np.polyfit(h[:, c], y[:, c], 1)
        np.testing.assert_allclose(fixed["fuse"].scale[c].item(), slope, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(fixed["fuse"].shift[c].item(), intercept, rtol=1e-5, atol=1e-5)

    # On the data it was fitted to, it is at least as close to the LayerNorm as the paper's affine.
    calibrated = copy.deepcopy(net)
    calibrate_fusion(calibrated, batches)
    mean_affine = freeze_fusion(calibrated)
    fitted = copy.deepcopy(net)
    fitted.fuse = fixed["fuse"]
    with torch.no_grad():
        errors = [sum(float(((m(x) - net(x)) ** 2).sum()) for x in batches) for m in (fitted, mean_affine)]
    assert errors[0] <= errors[1] * (1 + 1e-6), errors


def test_constant_channel_and_refusals():
    net = _net("concat")
    with torch.no_grad():
        net.b.weight.zero_()  # branch b constant (its bias, times 3, plus 1): its channels have no variance
    batches = [torch.randn(1, 3, 4, 4)]
    fixed = fitted_fusion(net, batches)["fuse"]
    _, y = _captured(net, batches)
    assert torch.equal(fixed.scale[5:], torch.zeros(7))
    np.testing.assert_allclose(fixed.shift[5:].numpy(), y[:, 5:].mean(axis=0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no GatedFusion"):
        fitted_fusion(nn.Conv2d(3, 3, 1), batches)
    with pytest.raises(ValueError, match="'fuse' saw no pixel"):
        fitted_fusion(net, [])
    assert not net.fuse._forward_hooks and not net.training  # hooks gone, mode kept
