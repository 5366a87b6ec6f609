"""The third step of LayerNorm removal (docs/math.md §5): a short fine-tuning of the LN-free model.

Replacing each LayerNorm by its calibrated affine (`calibrate_fusion`, then `freeze_fusion`) costs a
little accuracy: the affine uses the mean and spread of the calibration set, not of each pixel. The
Q2 paper recovers it by fine-tuning the LN-free fake-quant model briefly on the task loss alone (no
distillation), with Adam at lr 2e-5. The affines stay fixed buffers (they are what the integer
epilogue applies), and every weight and quantizer parameter trains as in QAT, so the fine-tuned
model converts to integers exactly as before (`convert_to_int`).
"""
from __future__ import annotations

import torch
from torch import nn

from .._validate import check_number
from .fusion import freeze_fusion


def finetune_without_layernorm(model: nn.Module, batches, loss_fn, steps: int | None = None, lr: float = 2e-5,
                               forward=None) -> list[float]:
    """Freeze every calibrated GatedFusion of `model` to its fixed affine (`freeze_fusion`), then train
    the model with Adam(lr) on `loss_fn(model(inputs), targets)` for each (inputs, targets) of
    `batches`, at most `steps` of them (all when None). Returns the training losses; changes the model
    in place and leaves it in the train/eval mode it had.

    forward: how a batch is fed, `forward(model, batch) -> loss` instead of loss_fn (pass
    loss_fn=None then). Raises if a GatedFusion is not calibrated (run `calibrate_fusion` first).
    """
    if (loss_fn is None) == (forward is None):
        raise ValueError("loss_fn: give exactly one of loss_fn (outputs, targets) -> loss and "
                         "forward (model, batch) -> loss")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise ValueError(f"steps: expected a non-negative integer or None, got {steps!r}")
    lr = check_number(lr, "lr", 0.0, lo_allowed=False)
    freeze_fusion(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model: has no trainable parameter to fine-tune")
    opt = torch.optim.Adam(params, lr=lr)
    was_training = model.training
    model.train()
    losses = []
    try:
        for i, batch in enumerate(batches):
            if steps is not None and i >= steps:
                break
            if forward is not None:
                loss = forward(model, batch)
            else:
                inputs, targets = batch
                loss = loss_fn(model(inputs), targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
    finally:
        model.train(was_training)
    return torch.stack(losses).tolist() if losses else []  # one host sync, after the loop
