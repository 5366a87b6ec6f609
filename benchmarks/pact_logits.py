"""Why PACT QAT's validation class loss blows up (docs/math.md §7, "PACT's eval-mode blow-up"), measured.

    python benchmarks/pact_logits.py [--imgsz 64] [--train 8] [--epochs 2] [--nbs 64]
                                     [--recipes pact,pact-norescale,lsq,lsq_plus] [--out DIR]

Trains YOLO11n from its YAML (random init) for a few epochs in Q2DetectionTrainer (W4A4, fusion=None,
no distillation) on write_synthetic_dataset's images, once per recipe, then inspects the model
validation ran (the EMA, in eval mode) on the validation images:

- val_cls_loss: the validation class loss of each epoch (results.csv);
- bn_gain: for every conv a BatchNorm follows, std(conv output) / sqrt(running_var + eps), the factor by
  which eval mode's BatchNorm scales that conv's output relative to training mode's (1 = the running
  statistics describe the outputs); the geometric mean over all of them and the value at the head's
  last cv3 block (the input of the float cls conv);
- codes: the fraction of all quantized layers' input codes at the top level (saturated) and at the
  code of an input 0 (a layer whose codes are all that carries no information);
- logits: mean and max of the class logits, against the cls bias prior log(5/nc/(640/stride)^2);
- alpha: PACT's clip values after the first batch and at the end (the largest ratio);
- grad: median |d alpha| / alpha (PACT) or |d s| / s (LSQ) over the activation quantizers, one batch;
- flip: every input code of one mid-network quantized conv (model.16's first) moved by one level at
  0.1% of its elements, as a rounding flip would, and the largest change this makes in the decoded
  class scores and box coordinates (pixels) of the eval-mode model.

"pact-norescale" is PACT with prepare()'s BatchNorm rescaling switched off (prepare.py,
rescale_batchnorm_statistics): the behaviour before the fix. Takes ~20 s per recipe on one CPU core
at the defaults. Prints one line of JSON per recipe.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import tempfile
from pathlib import Path

from q2kernels.integrations import ultralytics_offline

ultralytics_offline()

import torch  # noqa: E402
from torch import nn  # noqa: E402
from ultralytics.utils.torch_utils import unwrap_model  # noqa: E402

from q2kernels.integrations.ultralytics import Q2DetectionTrainer, Q2Options, write_synthetic_dataset  # noqa: E402
from q2kernels.nn import LSQQuantizer, PACTQuantizer, QConv2d  # noqa: E402

prepare_module = importlib.import_module("q2kernels.integrations.ultralytics.prepare")
FLIP_LAYER = "model.16"  # a C3k2 of the neck (YOLO11n), halfway between the backbone and the head


def _act_quantizers(model):
    return {n: m.act_quantizer for n, m in model.named_modules()
            if isinstance(m, QConv2d) and m.act_quantizer is not None}


def _step(q):
    return q.step_size().detach().reshape(())


def _codes(q, x):
    """Input codes of an activation quantizer (PACT or LSQ/LSQ+), as the forward rounds them."""
    form = q.int_activation()
    v = (x.float() - form.q_off) * form.q_mul
    return torch.round(v.clamp(form.qn, form.qp)), form


def _eval_stats(model, images, recipe):
    model.eval()
    seen, gains = {}, []
    hooks = []

    def record_codes(name, q):
        def hook(module, args):
            c, form = _codes(q, args[0])
            zero, _ = _codes(q, torch.zeros(()))  # the code of an input 0 (LSQ+: not code 0)
            seen[name] = (float((c == form.qp).float().mean()), float((c == zero).float().mean()), c.numel())
        return hook

    def record_bn(name):
        def hook(module, args, out):
            y = args[0].detach().double()
            std = y.transpose(0, 1).flatten(1).std(dim=1)
            gains.append((name, (std / (module.running_var.double() + module.eps).sqrt()).mean().item()))
        return hook

    for name, m in model.named_modules():
        if isinstance(m, QConv2d) and m.act_quantizer is not None:
            hooks.append(m.register_forward_pre_hook(record_codes(name, m.act_quantizer)))
        if isinstance(m, nn.BatchNorm2d):
            hooks.append(m.register_forward_hook(record_bn(name)))
    with torch.no_grad():
        y = model(images)[0]
    for h in hooks:
        h.remove()
    head = model.model[-1]
    nc = head.nc
    logits = torch.logit(y[:, 4:].double().clamp(1e-12, 1 - 1e-12))
    total = sum(c for _, _, c in seen.values())
    head_gain = [g for n, g in gains if n.startswith(f"model.{len(model.model) - 1}.cv3.0.1.1")]
    return {
        "bn_gain_geomean": math.exp(sum(math.log(max(g, 1e-30)) for _, g in gains) / len(gains)),
        "bn_gain_head_cv3.0.1.1": head_gain[0] if head_gain else None,
        "codes_saturated": sum(s * c for s, _, c in seen.values()) / total,
        "codes_zero": sum(z * c for _, z, c in seen.values()) / total,
        "cls_logit_mean": logits.mean().item(), "cls_logit_max": logits.max().item(),
        "cls_bias_prior": [round(math.log(5 / nc / (640 / float(s)) ** 2), 3) for s in head.stride],
    }, y


def _flip_sensitivity(model, images, y0):
    """One level moved at 0.1% of FLIP_LAYER's first quantized conv's input codes (down, or up at 0)."""
    name, conv = next((n, m) for n, m in model.named_modules()
                      if n.startswith(FLIP_LAYER + ".") and isinstance(m, QConv2d) and m.act_quantizer is not None)
    q = conv.act_quantizer
    gen = torch.Generator().manual_seed(0)

    def perturb(module, args, out):
        c, form = _codes(q, args[0])
        pick = torch.rand(out.shape, generator=gen) < 1e-3
        move = torch.where(c > form.qn, -1.0, 1.0) * pick
        return out + move * form.step

    h = q.register_forward_hook(perturb)
    with torch.no_grad():
        y1 = model(images)[0]
    h.remove()
    return {"flip_layer": name, "flip_max_dscore": (y1[:, 4:] - y0[:, 4:]).abs().max().item(),
            "flip_max_dbox_px": (y1[:, :4] - y0[:, :4]).abs().max().item()}


def _grad_ratio(model, batch):
    model.train()
    for p in model.parameters():
        p.grad = None
    loss, _ = model.loss(batch)
    loss.sum().backward()
    ratios = []
    for q in _act_quantizers(model).values():
        p = q.alpha if isinstance(q, PACTQuantizer) else q.s if isinstance(q, LSQQuantizer) else None
        if p is not None and p.grad is not None:
            ratios.append((p.grad.abs() / p.detach().abs()).max().item())
    ratios.sort()
    return {"grad_param_ratio_median": ratios[len(ratios) // 2] if ratios else None}


def run(recipe: str, data: Path, args, out: Path) -> dict:
    rescale = not recipe.endswith("-norescale")
    name = recipe.removesuffix("-norescale")
    real = prepare_module.rescale_batchnorm_statistics
    if not rescale:
        prepare_module.rescale_batchnorm_statistics = lambda model, names: {}
    alphas = {}
    try:
        overrides = dict(model="yolo11n.yaml", data=str(data), epochs=args.epochs, imgsz=args.imgsz, batch=4,
                         workers=0, device="cpu", amp=False, plots=False, project=str(out), name=recipe,
                         exist_ok=True, seed=0, nbs=args.nbs, verbose=False)
        trainer = Q2DetectionTrainer(overrides=overrides, q2=Q2Options(recipe=name, fusion=None, distill_weight=0.0))

        def first_alpha(tr):
            if not alphas:
                alphas.update({n: q.alpha.item() for n, q in _act_quantizers(unwrap_model(tr.model)).items()
                               if isinstance(q, PACTQuantizer)})
        trainer.add_callback("on_train_batch_end", first_alpha)
        trainer.train()
    finally:
        prepare_module.rescale_batchnorm_statistics = real
    with open(trainer.save_dir / "results.csv") as f:
        val_cls = [float(r["val/cls_loss"]) for r in csv.DictReader(f, skipinitialspace=True)]
    batch = trainer.preprocess_batch(next(iter(trainer.test_loader)))
    ema = trainer.ema.ema.float()
    stats, y0 = _eval_stats(ema, batch["img"], name)
    result = {"recipe": recipe, "val_cls_loss": val_cls, **stats, **_flip_sensitivity(ema, batch["img"], y0)}
    live = unwrap_model(trainer.model).float()
    end = {n: q.alpha.item() for n, q in _act_quantizers(live).items() if isinstance(q, PACTQuantizer)}
    if alphas:
        result["alpha_first_batch_max"] = max(alphas.values())
        result["alpha_end_max"] = max(end.values())
        result["alpha_end_over_first_max"] = max(end[n] / alphas[n] for n in end)
    result.update(_grad_ratio(live, batch))
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--imgsz", type=int, default=64)
    parser.add_argument("--train", type=int, default=8, help="training images (validation: a quarter, >= 2)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--nbs", type=int, default=64, help="Ultralytics' nominal batch size (64: accumulate 16)")
    parser.add_argument("--recipes", default="pact,pact-norescale,lsq,lsq_plus")
    parser.add_argument("--out", default=None, help="where the dataset and runs go (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        data = write_synthetic_dataset(out / "data", train=args.train, val=max(2, args.train // 4), imgsz=args.imgsz)
        for recipe in args.recipes.split(","):
            print(json.dumps(run(recipe, data, args, out / "runs")), flush=True)


if __name__ == "__main__":
    main()
