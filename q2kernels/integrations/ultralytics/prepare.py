"""prepare(): an Ultralytics DetectionModel made ready for Q2 QAT, in place.

1. Quantization (q2kernels.nn.quantize_model's recipes) with detector defaults: the stem conv
   (model.0), the DFL conv (a fixed, untrained projection) and Detect's prediction convs stay in
   float; `head_bits` quantizes the prediction convs at that many bits instead. A prediction conv
   feeds no BatchNorm, so a weight quantizer without a scale of its own (DoReFa: codes in [-1, 1],
   its scale meant to be absorbed by the BatchNorm that follows) would shrink its outputs to ~1/|w|
   of the float model's (YOLO11s PACT: first cls loss 1932 instead of ~6). Every quantized conv
   without a following BatchNorm therefore gets a per-channel LSQ weight quantizer when the recipe's
   weight quantizer is scale-free (its `scale_free`, the quantizer protocol); its step is the
   learned per-channel scale. Where a BatchNorm does follow a scale-free weight quantizer, its
   running statistics are rescaled by the conv's weight gain (rescale_batchnorm_statistics):
   training-mode BatchNorm cancels the dropped scale, eval mode (validation, the EMA, conversion)
   divides by the running statistics and would scale each such conv's output by its gain g (~3-50)
   until momentum replaced them (YOLO11n PACT W4A4, 2 epochs at 64 px: validation cls loss 158.9
   instead of LSQ's 0.34; docs/math.md §7).
2. GatedFusion at every neck Concat ("balanced": Q-GBFusion, the default; "learned": GABFusion),
   keeping Ultralytics' routing attributes (`f`, `i`, `type`) so the layer loop runs unchanged.
   The branch channel counts and the convs that read each node's output (its LayerNorm-removal
   consumers, for q2kernels.deploy.remove_layernorm's `feeds`) are observed, not guessed: one
   forward of the float model at a small input records the Concat inputs and every leaf module
   handed the Concat's output tensor itself.
3. Q-ADA distillation points: the neck outputs that feed Detect (`Detect.f`), with a frozen copy of
   the float model (taken before any change) as the teacher.

The choices travel with the model as `model.q2` (a plain dict, pickled with Ultralytics'
checkpoints), so a checkpoint can be rebuilt and its fusion nodes deployed without the recipe.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from ultralytics.nn.modules import Concat, Detect
from ultralytics.nn.tasks import DetectionModel

from ..._validate import check_bits
from ...deploy.fusion import run_with_hooks
from ...nn import GatedFusion, QADALoss, QConv2d, quantize_model
from ...nn.fusion import MODES as FUSION_MODES
from ...nn.quantize_model import RECIPES
from ...nn.quantizers import LSQQuantizer, Quantizer
from .model import Q2DetectionModel

# Attributes Ultralytics' layer loop and its summaries read from every layer of model.model.
_ROUTING_ATTRS = ("f", "i", "type")


def _scale_free(weight_quantizer) -> bool:
    """Whether a weight quantizer's codes carry no scale of their own, left to a following BatchNorm
    (the quantizer protocol's `scale_free`, e.g. DoReFa's); False for none (a float conv)."""
    return isinstance(weight_quantizer, Quantizer) and weight_quantizer.scale_free


@dataclass
class Prepared:
    """What prepare() did. `model` is the prepared DetectionModel (a Q2DetectionModel now)."""
    model: DetectionModel
    teacher: DetectionModel | None  # frozen float copy taken before any change; None without distillation
    points: list[str]               # module names whose outputs Q-ADA distils (the neck outputs feeding Detect)
    feeds: dict[str, list[str]]     # GatedFusion name -> modules reading its output (remove_layernorm's feeds)
    float_layers: list[str]         # convs left in float
    quantized: dict[str, tuple[int, int]] = field(default_factory=dict)  # conv name -> (weight, input) bits

    def distillation(self, weight: float = 0.01, **kwargs) -> QADALoss:
        """QADALoss(teacher, model, points): run the teacher on each batch, then add `loss()` to the
        task loss. Its hooks make the model unpicklable until `.remove()`: create it after any
        deepcopy that gets pickled (the Ultralytics EMA), as Q2DetectionTrainer does."""
        if self.teacher is None:
            raise ValueError("distillation: prepare() was called with distill=False, there is no teacher")
        return QADALoss(self.teacher, self.model, self.points, weight=weight, **kwargs)


def _detection_model(model) -> DetectionModel:
    inner = getattr(model, "model", None) if not isinstance(model, DetectionModel) else model
    if not isinstance(inner, DetectionModel):
        raise TypeError(f"model: expected an Ultralytics DetectionModel or a YOLO object holding one, "
                        f"got {type(model).__name__}")
    return inner


def _detect(model: DetectionModel) -> Detect:
    head = model.model[-1]
    if not isinstance(head, Detect):
        raise TypeError(f"model: its last layer is a {type(head).__name__}, expected an Ultralytics Detect head")
    return head


def _bn_follows(parent: nn.Module, child_name: str) -> bool:
    """An Ultralytics conv block (Conv, DWConv, ...) applies .conv then .bn."""
    return child_name == "conv" and isinstance(getattr(parent, "bn", None), nn.BatchNorm2d)


def _convs(model: nn.Module) -> dict[str, tuple[nn.Conv2d, bool]]:
    """Every plain nn.Conv2d by name, with whether a BatchNorm follows it."""
    out = {}
    for pname, parent in model.named_modules():
        for cname, child in parent.named_children():
            if type(child) is nn.Conv2d:
                out[f"{pname}.{cname}" if pname else cname] = (child, _bn_follows(parent, cname))
    return out


def prediction_convs(model) -> list[str]:
    """Names of Detect's prediction convs: its convs outside a conv+BatchNorm block, less DFL's."""
    model = _detection_model(model)
    i = len(model.model) - 1
    head = f"model.{i}."
    dfl = getattr(_detect(model), "dfl", None)
    dfl_convs = {id(m) for m in dfl.modules()} if isinstance(dfl, nn.Module) else set()
    return [n for n, (conv, bn) in _convs(model).items()
            if n.startswith(head) and not bn and id(conv) not in dfl_convs]


def _default_float_layers(model: DetectionModel) -> list[str]:
    """The stem conv and DFL's conv."""
    names = list(_convs(model))
    stem = [n for n in names if n.startswith("model.0.")][:1]
    dfl = [n for n in names if n.startswith(f"model.{len(model.model) - 1}.dfl.")]
    return stem + dfl


def _probe(model: DetectionModel):
    """One eval forward at 2x the largest stride: each Concat's input channel counts, and the leaf
    modules handed each Concat's output (the LayerNorm-removal consumers)."""
    concats = {f"model.{i}": m for i, m in enumerate(model.model) if type(m) is Concat}
    channels, outputs, consumers = {}, {}, {n: [] for n in concats}
    handles = []

    def record_concat(name):
        def hook(module, inputs, output):
            channels[name] = [int(t.shape[1]) for t in inputs[0]]
            outputs[name] = output
        return hook

    def record_consumer(name):
        def hook(module, inputs):
            flat = [t for a in inputs for t in (a if isinstance(a, (list, tuple)) else (a,))]
            for node, out in outputs.items():
                if any(t is out for t in flat):
                    consumers[node].append(name)
        return hook

    for name, m in concats.items():
        handles.append(m.register_forward_hook(record_concat(name)))
    for name, m in model.named_modules():
        if not list(m.children()):
            handles.append(m.register_forward_pre_hook(record_consumer(name)))
    p = next(model.parameters())
    size = 2 * int(max(model.stride.tolist()))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, _in_channels(model), size, size, device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return concats, channels, consumers


def _in_channels(model: DetectionModel) -> int:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    for attr in _ROUTING_ATTRS:
        if hasattr(old, attr):
            setattr(new, attr, getattr(old, attr))
    if hasattr(old, "np"):
        new.np = sum(p.numel() for p in new.parameters())
    setattr(parent, child, new)


def _fuse_concats(model, concats, channels, mode) -> list[str]:
    for name, m in concats.items():
        if m.d != 1:
            raise ValueError(f"model: {name} concatenates along dim {m.d}; GatedFusion fuses channels (dim 1)")
        if not 2 <= len(channels[name]) <= 4:
            raise ValueError(f"model: {name} concatenates {len(channels[name])} branches; GatedFusion takes 2 to 4")
    p = next(model.parameters())
    for name in concats:
        replace_module(model, name, GatedFusion(channels[name], mode=mode, device=p.device))
    return list(concats)


def _unnormalized_qconv(conv: nn.Conv2d, recipe: str, w_bits: int, a_bits: int) -> QConv2d:
    """The recipe's QConv2d for a conv no BatchNorm follows: a scale-free weight quantizer is
    replaced by a per-channel LSQ one (module docstring)."""
    r = RECIPES[recipe]
    weight = r.weight(conv, w_bits)
    if _scale_free(weight):
        weight = LSQQuantizer(w_bits, "signed", axis=0, channels=conv.out_channels)
    return QConv2d.from_float(conv, weight=weight, act=r.act(conv, a_bits))


def rescale_batchnorm_statistics(model: nn.Module, names) -> dict[str, torch.Tensor]:
    """For each QConv2d in `names` whose weight quantizer is scale-free (`scale_free`; DoReFa: codes
    in [-1, 1]) and that a BatchNorm follows: the BatchNorm's running statistics multiplied by the
    conv's weight gain, per output channel g = <w_q, w> / <w, w> (the least-squares factor in
    w_q ~ g*w), so that running_mean *= g and running_var *= g^2 describe the quantized conv's
    outputs as they described the float conv's (docs/math.md §7, "PACT's eval-mode blow-up").

    Training-mode BatchNorm normalises with the batch's statistics and never sees the scale the
    weight quantizer dropped (max|tanh w| of the tensor: DoReFa's outputs are ~1/max|w| times the
    float weights, ~sqrt(fan_in) at a random init); eval mode (validation, the EMA, conversion)
    divides by the running statistics, which would describe outputs that much smaller until
    momentum (0.03 in Ultralytics) has replaced them, ~150 batches later. Returns {name: g}; channels
    whose g is not positive and finite (an all-zero weight) keep their statistics."""
    gains = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        conv, bn = getattr(parent, child), getattr(parent, "bn", None)
        quantizer = getattr(conv, "weight_quantizer", None)
        if not (_scale_free(quantizer) and _bn_follows(parent, child)
                and bn.running_mean is not None and bn.running_var is not None):
            continue
        with torch.no_grad():
            w = conv.weight.detach()
            wq = quantizer.quantize(w).double().flatten(1)
            w = w.double().flatten(1)
            g = (wq * w).sum(1) / (w * w).sum(1)
            g = torch.where(torch.isfinite(g) & (g > 0), g, torch.ones_like(g))
            bn.running_mean.copy_((bn.running_mean.double() * g).to(bn.running_mean.dtype))
            bn.running_var.copy_((bn.running_var.double() * g * g).to(bn.running_var.dtype))
        gains[name] = g.float()
    return gains


def prepare(model, recipe: str = "lsq", w_bits: int = 4, a_bits: int = 4, head_bits: int | None = None,
            keep_float=None, fusion: str | None = "balanced", distill: bool = True) -> Prepared:
    """Prepare an Ultralytics DetectionModel (or a YOLO object's) for Q2 QAT, in place (module docstring).

    recipe, w_bits, a_bits: as quantize_model. head_bits: None keeps Detect's prediction convs in
    float, 2..8 quantizes them (weights and inputs) at that many bits. keep_float: conv names kept in
    float (default: the stem conv and DFL's conv). fusion: "balanced", "learned" or None (keep the
    Concats). distill: keep a frozen float copy as the Q-ADA teacher.
    """
    model = _detection_model(model)
    head = _detect(model)
    if any(isinstance(m, (QConv2d, GatedFusion)) for m in model.modules()):
        raise ValueError("model: is already prepared (it holds q2kernels modules)")
    if recipe not in RECIPES:
        raise ValueError(f"recipe: expected one of {sorted(RECIPES)}, got {recipe!r}")
    if fusion is not None and fusion not in FUSION_MODES:
        raise ValueError(f"fusion: expected one of {FUSION_MODES} or None, got {fusion!r}")
    check_bits(w_bits, "w_bits")
    check_bits(a_bits, "a_bits")
    if head_bits is not None:
        check_bits(head_bits, "head_bits")
    if isinstance(keep_float, str):
        raise ValueError(f"keep_float: expected a list of conv names, got the string {keep_float!r}")
    convs = _convs(model)
    predictions = prediction_convs(model)
    keep = _default_float_layers(model) if keep_float is None else list(keep_float)
    unknown = [n for n in keep if n not in convs]
    if unknown:
        raise ValueError(f"keep_float: {unknown} are not nn.Conv2d layers of the model")
    if head_bits is not None and set(keep) & set(predictions):
        raise ValueError(f"keep_float: names prediction convs {sorted(set(keep) & set(predictions))} "
                         f"while head_bits={head_bits} quantizes them")
    if head_bits is None:
        keep = keep + [n for n in predictions if n not in keep]

    teacher = copy.deepcopy(model).eval().requires_grad_(False) if distill else None
    concats, channels, consumers = _probe(model)
    nodes = _fuse_concats(model, concats, channels, fusion) if fusion is not None else []

    # quantize_model for the convs a BatchNorm follows; the others (Detect's prediction convs, at
    # head_bits) one by one, with a per-channel weight scale where the recipe's weights have none.
    bits = {n: ((head_bits, head_bits) if n in predictions else (w_bits, a_bits)) for n in convs if n not in keep}
    custom = [n for n in bits if n in predictions or not convs[n][1]]
    quantize_model(model, recipe, w_bits, a_bits, skip=keep + custom, keep_first_last=False)
    for name in custom:
        replace_module(model, name, _unnormalized_qconv(convs[name][0], recipe, *bits[name]))
    rescale_batchnorm_statistics(model, [n for n in bits if n not in custom])

    model.__class__ = Q2DetectionModel
    feeds = {n: consumers[n] for n in nodes}
    points = [f"model.{j}" for j in (head.f if isinstance(head.f, list) else [head.f])]
    model.q2 = {"recipe": recipe, "w_bits": w_bits, "a_bits": a_bits, "head_bits": head_bits,
                "keep_float": keep, "fusion": fusion, "feeds": feeds, "points": points}
    return Prepared(model, teacher, points, feeds, keep, bits)


def init_fusion_as_identity(model: nn.Module, reference: nn.Module, batches) -> dict[str, tuple[float, float]]:
    """Start every GatedFusion of a prepared `model` as (nearly) the Concat it replaced, so that QAT
    from a trained float model starts from that model's function: LayerNorm's gamma and beta become
    the mean per-pixel spread sigmabar and mean mubar of the Concat's output in the float `reference`
    (the model before prepare), over `batches` of images. Then LN(h)*gamma + beta = (x - mu)/sigma *
    sigmabar + mubar equals the concat x wherever a pixel's statistics are the average ones (LN is
    invariant to the equal gates' scale), instead of the unit-variance output of gamma = 1, beta = 0
    that the float model's next layers never saw. It also makes the LayerNorm's later removal (its
    calibrated affine: docs/math.md §5) close to the identity. Returns {node: (mubar, sigmabar)}."""
    layers = {f"model.{i}": m for i, m in enumerate(reference.model)}
    nodes = {n: m for n, m in model.named_modules() if isinstance(m, GatedFusion)}
    device = next(reference.parameters()).device
    sums = {n: torch.zeros(3, dtype=torch.float64, device=device) for n in nodes}  # sum mu, sum sigma, pixels

    def record(name, eps):
        def hook(module, args):
            h = torch.cat(list(args[0]), dim=1).double()
            sigma = torch.sqrt(h.var(dim=1, unbiased=False) + eps)
            sums[name] += torch.stack([h.mean(dim=1).sum(), sigma.sum(), sigma.new_tensor(sigma.numel())])
        return hook

    missing = [n for n in nodes if n not in layers]
    if missing:
        raise ValueError(f"reference: has no layer {missing} (expected the float model prepare() started from)")
    run_with_hooks(reference, batches, None,
                   [layers[n].register_forward_pre_hook(record(n, node.eps)) for n, node in nodes.items()])
    stats = {}
    for name, node in nodes.items():
        mu_sum, sigma_sum, pixels = sums[name].tolist()  # one host read per node, after the batches
        if pixels == 0:
            raise ValueError(f"batches: the fusion node {name!r} saw no pixel")
        stats[name] = (mu_sum / pixels, sigma_sum / pixels)
        with torch.no_grad():
            node.gamma.fill_(stats[name][1])
            node.beta.fill_(stats[name][0])
    return stats

