"""Deployment of gated fusion nodes (docs/math.md §5, "LayerNorm removal").

1. `calibrate_fusion(model, batches)` runs the model over calibration batches and records, at every
   GatedFusion, mubar = mean(mu) and sigmabar = mean(sqrt(var + eps)) over all pixels seen (a
   forward hook on each node, removed afterwards).
2. The LayerNorm then becomes the fixed per-channel affine y_c = A_c*h_c + B_c with
   A_c = a_k(c)*gamma_c/sigmabar and B_c = beta_c - gamma_c*mubar/sigmabar (`layernorm_affine`).
   `freeze_fusion(model)` replaces every GatedFusion by that fixed op (a FixedFusion).
3. `remove_layernorm(model)` goes further and folds A and B into the conv(s) that consume the node's
   output, leaving a plain concat: W'[o, c] = W[o, c]*A_c, b'_o = b_o + sum_{c, taps} W[o, c, taps]*B_c.
   That is exact only when no tap of the conv reads zero padding: with zero padding the original
   pads the affine's output with 0 while the fold would pad its input with 0 (an error B_c at the
   border). So a conv with zero padding (any k > 1 conv with padding > 0) is refused, by name, and
   that node stays a FixedFusion. Non-zero padding modes (reflect, replicate, circular) commute with
   a per-channel affine and fold exactly. A QConv2d that quantizes its input or weights is refused
   too: the fold would change what its quantizers see.

Which conv consumes a node is declared, never guessed:
- structurally, with q2kernels.nn.FusionConv(GatedFusion(...), conv);
- or by name, `remove_layernorm(model, feeds={"model.12": ["model.13.cv1"]})`: the node's module
  name -> every module that takes its output as input. For an ultralytics model, the Concat at layer
  i feeds layer i+1: a C2f / C3k2 reads it through `cv1` only, a YOLOv5 C3 through both `cv1` and
  `cv2` (list both: a consumer left out would silently get the un-normalised input). A named
  consumer may be an nn.Conv2d or a block whose `.conv` is applied to the input first (ultralytics
  Conv: conv -> bn -> act).
For "sum" fusion the gates stay in the (fixed) weighted sum and A_c = gamma_c/sigmabar.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .. import reference as ref
from ..nn.fusion import FusionConv, GatedFusion
from .fixed_fusion import FixedFusion

# Attributes an ultralytics layer list routes by (`f`: inputs, `i`: index); a replacement keeps them.
_ROUTING_ATTRS = ("f", "i")


def _fusion_nodes(model: nn.Module) -> list[tuple[str, GatedFusion]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, GatedFusion)]


def run_with_hooks(model: nn.Module, batches, forward, handles) -> None:
    """Feed `batches` to `model` in eval mode without grad, as `forward(model, batch)` (None: `model(batch)`),
    then remove the hook `handles` the caller registered to observe it and restore the model's mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch) if forward is None else forward(model, batch)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


def calibrate_fusion(model: nn.Module, batches, forward=None) -> dict[str, tuple[float, float]]:
    """Run `model` (eval mode, no grad) over `batches` and store mubar, sigmabar in every GatedFusion.

    forward: how a batch is fed, `forward(model, batch)`; default `model(batch)`. Returns
    {node name: (mubar, sigmabar)}. Raises, naming the node, if a GatedFusion saw no pixel.
    """
    nodes = _fusion_nodes(model)
    if not nodes:
        raise ValueError("model: contains no GatedFusion to calibrate")
    sums = {name: _StatSums(m.theta.device) for name, m in nodes}
    run_with_hooks(model, batches, forward,
                   [m.register_forward_hook(sums[name].hook, with_kwargs=True) for name, m in nodes])
    missing = [name for name, acc in sums.items() if acc.pixels.item() == 0]
    if missing:
        raise ValueError(f"batches: the GatedFusion node(s) {missing} saw no pixel during calibration")
    with torch.no_grad():
        for name, m in nodes:
            acc = sums[name]
            m.mubar.copy_(acc.mu / acc.pixels)
            m.sigmabar.copy_(acc.sigma / acc.pixels)
    return {n: (m.mubar.item(), m.sigmabar.item()) for n, m in nodes}


class _StatSums:
    """float64 sums of the per-pixel mu and sqrt(var + eps) a GatedFusion saw, and the pixel count;
    `hook` is its forward hook."""

    def __init__(self, device):
        self.mu = torch.zeros((), device=device, dtype=torch.float64)
        self.sigma = torch.zeros_like(self.mu)
        self.pixels = torch.zeros_like(self.mu)

    def hook(self, node: GatedFusion, args, kwargs, output):
        xs = args[0] if args else kwargs["xs"]
        mu, sigma = ref.fusion_stats(list(xs), node.theta, fuse=node.fuse, eps=node.eps)
        self.mu += mu.double().sum()
        self.sigma += sigma.double().sum()
        self.pixels += mu.numel()


def _calibrated(node: GatedFusion) -> bool:
    return not (torch.isnan(node.mubar).item() or torch.isnan(node.sigmabar).item())


def _check_calibrated(name: str, node: GatedFusion):
    if not _calibrated(node):
        raise ValueError(f"model: the GatedFusion {name!r} is not calibrated "
                         "(run q2kernels.deploy.calibrate_fusion first)")


def layernorm_affine(node: GatedFusion):
    """(gates or None, A, B) of a calibrated node, in float64 (module docstring). For concat the
    gates are inside A and None is returned; for sum they are returned for the weighted sum."""
    _check_calibrated("node", node)
    # The gates exactly as training computed them: softmax in fp32.
    a = torch.softmax(node.theta.detach().float(), dim=0).double()
    C = node.out_channels
    dev = node.theta.device
    gamma = node.gamma.detach().double() if node.gamma is not None else torch.ones(C, dtype=torch.float64, device=dev)
    beta = node.beta.detach().double() if node.beta is not None else torch.zeros(C, dtype=torch.float64, device=dev)
    mubar, sigmabar = node.mubar.double(), node.sigmabar.double()
    inv = gamma / sigmabar
    B = beta - gamma * mubar / sigmabar
    if node.fuse == "concat":
        per_channel = torch.repeat_interleave(a, torch.tensor(node.channels, device=dev))
        return None, per_channel * inv, B
    return a, inv, B


def _fixed(node: GatedFusion, affine: bool) -> FixedFusion:
    gates, A, B = layernorm_affine(node)
    dtype = node.theta.dtype

    def cast(t):
        return None if t is None else t.to(dtype)

    return FixedFusion(node.channels, node.fuse, cast(gates), cast(A) if affine else None,
                       cast(B) if affine else None)


def _replace(model: nn.Module, name: str, new: nn.Module):
    if not name:
        raise ValueError("model: is itself a GatedFusion; wrap it in a module to deploy it")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = parent.get_submodule(child)
    for attr in _ROUTING_ATTRS:
        if attr in vars(old):
            setattr(new, attr, vars(old)[attr])
    setattr(parent, child, new)


def freeze_fusion(model: nn.Module) -> nn.Module:
    """Replace every (calibrated) GatedFusion by the FixedFusion that applies its gates and frozen
    LayerNorm affine. Returns the model (changed in place)."""
    for name, node in _fusion_nodes(model):
        _check_calibrated(name, node)
    return freeze_calibrated(model)


def freeze_calibrated(model: nn.Module) -> nn.Module:
    """freeze_fusion for the calibrated nodes only: an uncalibrated GatedFusion keeps its LayerNorm,
    as convert_to_int keeps it. Returns the model (changed in place)."""
    for name, node in _fusion_nodes(model):
        if _calibrated(node):
            _replace(model, name, _fixed(node, affine=True))
    return model


def _as_conv(module: nn.Module):
    if isinstance(module, nn.Conv2d):
        return module
    conv = getattr(module, "conv", None)
    return conv if isinstance(conv, nn.Conv2d) else None


def _zero_padding(conv: nn.Conv2d) -> list[int]:
    """The zero-padding amounts per side of conv (0s when its padding_mode is not 'zeros')."""
    if conv.padding_mode != "zeros":
        return [0]
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return [0]
        return [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation)]
    return list(conv.padding)


def _refusal(conv_name: str, module: nn.Module, channels: int):
    """Why folding into this consumer would not be exact, or None."""
    conv = _as_conv(module)
    if conv is None:
        return f"{conv_name!r} is a {type(module).__name__}, not an nn.Conv2d nor a block with a .conv"
    if conv.in_channels != channels:
        return f"{conv_name!r} takes {conv.in_channels} input channels, the node gives {channels}"
    if getattr(conv, "act_quantizer", None) is not None or getattr(conv, "weight_quantizer", None) is not None:
        return (f"{conv_name!r} quantizes its input or weights: the fold would change what its "
                "quantizers see (fold before adding them)")
    if any(p > 0 for p in _zero_padding(conv)):
        kh, kw = conv.kernel_size
        return (f"{conv_name!r} is a {kh}x{kw} conv with zero padding {conv.padding}: at the border "
                "the fold would pad the un-normalised input with 0 where the model pads the "
                "normalised one, so it is exact only in the interior")
    return None


def _consumers(model: nn.Module, feeds) -> dict[str, list[tuple[str, nn.Module]]]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, FusionConv) and isinstance(m.fusion, GatedFusion):
            prefix = f"{name}." if name else ""
            out[f"{prefix}fusion"] = [(f"{prefix}conv", m.conv)]
    nodes = dict(_fusion_nodes(model))
    for fname, cnames in (feeds or {}).items():
        if fname not in nodes:
            raise ValueError(f"feeds: {fname!r} is not a GatedFusion of the model")
        if fname in out:
            raise ValueError(f"feeds: {fname!r} is already paired with its conv by a FusionConv")
        cnames = [cnames] if isinstance(cnames, str) else list(cnames)
        if not cnames:
            raise ValueError(f"feeds: {fname!r} lists no consumer")
        resolved = []
        for c in cnames:
            try:
                resolved.append((c, model.get_submodule(c)))
            except AttributeError:
                raise ValueError(f"feeds: the model has no module named {c!r} (consumer of {fname!r})") from None
        out[fname] = resolved
    return out


def _fold_into_conv(conv: nn.Conv2d, A: torch.Tensor, B: torch.Tensor):
    """conv(A*h + B) == conv'(h) for an unpadded conv: scale its input channels by A and move the
    offset B, summed over each filter's taps, into the bias. Computed in float64."""
    W = conv.weight.detach().double()
    O, Cg = W.shape[0], W.shape[1]
    G = conv.groups

    def per_filter(v):  # (C,) -> (O, Cg): the input channels each output channel's filter reads
        return v.reshape(G, 1, Cg).expand(G, O // G, Cg).reshape(O, Cg)

    bias = torch.zeros(O, dtype=torch.float64, device=W.device) if conv.bias is None else conv.bias.detach().double()
    bias = bias + (W.sum(dim=(2, 3)) * per_filter(B)).sum(dim=1)
    with torch.no_grad():
        conv.weight.copy_(W * per_filter(A)[:, :, None, None])
        if conv.bias is None:
            conv.bias = nn.Parameter(bias.to(conv.weight.dtype))
        else:
            conv.bias.copy_(bias)


def remove_layernorm(model: nn.Module, feeds=None, strict: bool = False) -> dict[str, str]:
    """Remove every (calibrated) GatedFusion's LayerNorm: fold its fixed affine and gates into the
    conv(s) consuming its output where that is exact, else leave a FixedFusion (the fixed affine op)
    and warn, naming the node and the conv. strict=True raises instead, before changing anything.

    feeds: {node name: consumer name or list of names} for nodes not inside a FusionConv (module
    docstring). Returns {node name: what was done}. Changes the model in place.
    """
    consumers = _consumers(model, feeds)
    plans = []
    for name, node in _fusion_nodes(model):
        _check_calibrated(name, node)
        convs = consumers.get(name, [])
        reasons = [r for r in (_refusal(c, m, node.out_channels) for c, m in convs) if r is not None]
        if not convs:
            reasons = ["no consumer conv is declared (FusionConv or feeds)"]
        if reasons:
            msg = (f"remove_layernorm: not folding the LayerNorm of {name!r}: " + "; ".join(reasons)
                   + f". {name!r} is left as a fixed per-channel affine (FixedFusion).")
            if strict:
                raise ValueError(msg)
            plans.append((name, node, None, msg))
        else:
            plans.append((name, node, [_as_conv(m) for _, m in convs], [c for c, _ in convs]))
    report = {}
    for name, node, convs, info in plans:
        if convs is None:
            warnings.warn(info, stacklevel=2)
            _replace(model, name, _fixed(node, affine=True))
            report[name] = info
            continue
        _, A, B = layernorm_affine(node)
        for conv in convs:
            _fold_into_conv(conv, A, B)
        _replace(model, name, _fixed(node, affine=False))
        report[name] = f"folded into {', '.join(repr(c) for c in info)}"
    return report
