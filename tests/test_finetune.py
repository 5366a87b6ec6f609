"""LayerNorm removal's fine-tuning step (docs/math.md §5): finetune_without_layernorm freezes the
calibrated LayerNorms to their fixed affines, trains the rest with Adam on the task loss, and leaves
a model that converts to integers exactly (the teacher-forced float64 oracle of test_convert)."""
import copy
import warnings

import pytest
import torch

from q2kernels.deploy import (FixedFusion, convert_to_int, finetune_without_layernorm, freeze_fusion,
                              layernorm_affine)
from q2kernels.models import YOLOv5
from q2kernels.nn import GatedFusion, quantize_model

from test_convert import IMAGE, _check_against_oracle, tiny_yolo


_TRAINED = {}


def trained(recipe, mode):
    """A copy of test_convert's tiny trained and calibrated YOLO (built once per configuration)."""
    if (recipe, mode) not in _TRAINED:
        _TRAINED[recipe, mode] = tiny_yolo(recipe, 4, "relu" if recipe == "pact" else "silu", mode)
    return copy.deepcopy(_TRAINED[recipe, mode])


def task_loss(outputs, target):
    return sum((o - target).square().mean() for o in outputs)


def data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 3, IMAGE, IMAGE, generator=g), 0.5) for _ in range(n)]


def fusion_affines(model):
    return {n: layernorm_affine(m)[1:] for n, m in model.named_modules() if isinstance(m, GatedFusion)}


@pytest.mark.parametrize("recipe,mode", [("lsq", "balanced"), ("pact", "learned")])
def test_finetuned_model_converts_exactly(recipe, mode):
    model = trained(recipe, mode)
    affines = fusion_affines(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = finetune_without_layernorm(model, data(3), task_loss, lr=1e-3)
    assert len(losses) == 3 and not model.training  # tiny_yolo leaves it in eval mode
    # The LayerNorms are gone, each replaced by its calibrated affine, which training left alone.
    assert not any(isinstance(m, GatedFusion) for m in model.modules())
    fixed = {n: m for n, m in model.named_modules() if isinstance(m, FixedFusion)}
    assert sorted(fixed) == sorted(affines)
    for n, (A, B) in affines.items():
        assert torch.equal(fixed[n].scale, A.float()) and torch.equal(fixed[n].shift, B.float())
    # The weights and quantizer parameters trained (those a gradient reaches: in this tiny model
    # the clipped activations of a few layers pass none).
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) >= 0.8 * len(before)
    assert any(n.endswith("conv.weight") for n in changed) and any("act_quantizer." in n for n in changed)
    x = torch.randn(2, 3, IMAGE, IMAGE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        int_model = convert_to_int(model, x)
    _check_against_oracle(model, int_model, x, integer_layers=58)


def test_finetuning_is_adam_on_the_task_loss():
    """The same steps written out: freeze, then torch.optim.Adam(lr) on loss_fn(model(x), y)."""
    model = trained("lsq", "balanced")
    want = freeze_fusion(copy.deepcopy(model)).train()
    opt = torch.optim.Adam(want.parameters(), lr=2e-5)
    want_losses = []
    for x, y in data(2, seed=1):
        loss = task_loss(want(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        want_losses.append(loss.item())
    losses = finetune_without_layernorm(model, data(5, seed=1), task_loss, steps=2)
    assert losses == want_losses
    for (n, p), q in zip(model.named_parameters(), want.parameters()):
        assert torch.equal(p, q), n


def test_finetuning_lowers_the_task_loss():
    model = trained("lsq", "balanced")
    batch = data(1, seed=2)
    losses = finetune_without_layernorm(model, batch * 5, task_loss, lr=1e-3)
    assert losses[-1] < 0.9 * losses[0]


def test_forward_callable_and_bad_arguments():
    model = trained("pact", "learned")
    seen = []

    def forward(m, batch):
        seen.append(batch)
        return task_loss(m(batch[0]), batch[1])

    assert len(finetune_without_layernorm(model, data(2), None, forward=forward)) == 2 and len(seen) == 2
    for kw, match in ((dict(loss_fn=None), "loss_fn"), (dict(forward=forward), "loss_fn"),
                      (dict(steps=-1), "steps"), (dict(steps=True), "steps"), (dict(lr=0.0), "lr"),
                      (dict(lr=float("nan")), "lr")):
        args = dict(loss_fn=task_loss)
        args.update(kw)
        with pytest.raises(ValueError, match=match):
            finetune_without_layernorm(model, data(1), **args)
    uncalibrated = quantize_model(YOLOv5(width=0.125, depth=0.33, outputs=18, fusion=GatedFusion), "lsq", 4, 4)
    with pytest.raises(ValueError, match="not calibrated"):
        finetune_without_layernorm(uncalibrated, data(1), task_loss)
