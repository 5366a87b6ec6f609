"""Quantized models as deployment sees them, for the conversion tests: quantizers initialised,
BatchNorm statistics estimated on data, activation ranges from data."""
import torch
from torch import nn

from q2kernels.nn import LSQPlusQuantizer, LSQQuantizer, PACTQuantizer, QConv2d


def spread_activation_quantizers(model, x):
    """Set each activation quantizer's range to its input's (1%..99%) on x, so that the codes use most
    levels (the first-batch inits leave a tiny random network's activations on 2 to 4 levels)."""
    ranges = {}

    def record(q, args):
        ranges[q] = torch.quantile(args[0].flatten()[:2**20].float(), torch.tensor([0.01, 0.99]))

    hooks = [m.act_quantizer.register_forward_pre_hook(record)
             for m in model.modules() if isinstance(m, QConv2d) and m.act_quantizer is not None]
    with torch.no_grad():
        model(x)
        for h in hooks:
            h.remove()
        for q, (lo, hi) in ranges.items():
            hi = hi.clamp_min(lo + 1e-2)
            if isinstance(q, LSQPlusQuantizer):
                q.s.fill_((hi - lo) / (2**q.bits - 1))
                q.beta.fill_(lo)
            elif isinstance(q, LSQQuantizer):
                q.s.fill_(torch.maximum(hi, -lo) / (2 ** (q.bits - 1) - 1))
            elif isinstance(q, PACTQuantizer):
                q.alpha.fill_(hi.clamp_min(1e-2))
            else:
                q.alpha1.fill_(2.0 / hi.clamp_min(1e-2))


def reestimate_batchnorm(model, x):
    """Every BatchNorm's running statistics: those of x alone (one train-mode forward, no gradient);
    the model is left in eval mode."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()


def settle(model, batch):
    """Initialise the quantizers and re-estimate BatchNorm on batch-normalised activations (random init
    leaves the statistics meaningless), spread the activation ranges over data, then re-estimate
    BatchNorm under those ranges. batch() draws an input."""
    reestimate_batchnorm(model, batch())
    spread_activation_quantizers(model, batch())
    reestimate_batchnorm(model, batch())
    return model


def qat_steps(model, loss, steps, lr):
    """`steps` Adam steps on every parameter (weights, BatchNorm, quantizer parameters) against loss(model),
    in train mode with BatchNorm's settled statistics frozen; the losses, and the model is left in eval
    mode. Adam moves each parameter that has a gradient by about lr per step whatever the gradient's
    scale, so a few steps move step sizes and thresholds off the values settle() gave them, as training
    does. Frozen BatchNorm, because the tests' images are tiny: at 32 px a detector's stride-32 maps
    are 1x1, a training-mode BatchNorm there normalises over the batch's 2 values, and its backward
    multiplies the gradient by up to 1/sqrt(eps) (YOLO11s PACT W3A3: 3.6e36 by model.8, inf after)."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    losses = []
    for _ in range(steps):
        value = loss(model)
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(float(value.detach()))
    model.eval()
    return losses
