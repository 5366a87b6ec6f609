"""Is an integer model (convert_to_int) exactly its fake-quant model? A check users run on their model.

Why the question needs care. The integer model computes every conv as an exact int32 sum of codes
and then one fp32 epilogue (docs/math.md §7). The fake-quant model computes the same conv in fp32 on
dequantised values: another summation order, and grid values that are themselves rounded. Where a
value lies within that rounding of a quantizer's decision boundary, the two models pick neighbouring
codes (a rounding flip), and the next layers see different inputs. verify proves, code by code, that
every difference is such a flip, or names the layer where one is not.

`verify_int_model(model, int_model, *inputs)` compares, per integer layer (named by its QConv2d), the
codes the integer model feeds it with:
- the reference mode (deploy.reference_mode): must be identical, as must the outputs;
- the fake-quant model run teacher-forced (deploy.teacher_forcing: every integer layer of it gets the
  integer model's input codes, so each layer is compared on identical inputs): for each code that
  differs, its distance d to the quantizer's decision boundary (code units, from a float64
  evaluation of the same teacher-forced model) and the bound b on how far the fp32 arithmetic of
  either model can move that value (deploy.error_bounds; docs/math.md §7, "What verify certifies").
  Within its bound a difference is a rounding flip; beyond it the layer is named with both numbers.
It also reports the outputs' largest difference from the fake-quant model's and the layers whose
codes are almost all the code of 0: a check on a layer that carries no information proves nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from . import trace
from .error_bounds import ErrorBounds, gamma
from .int_model import IntModel
from .reference_mode import integer_codes, reference_forward
from .teacher_forcing import forced, traced

DEAD = 0.99  # dead_layers' default: the fraction of codes at the code of 0 from which a layer counts as dead


@dataclass
class LayerCheck:
    """One integer layer's input codes (QConv2d `name`), against the reference and the fake-quant model.
    Distances and bounds are in code units; the largest ones are over the differing codes."""
    name: str
    codes: int
    reference_mismatches: int  # must be 0
    differing: int  # codes that differ from the teacher-forced fake-quant model's
    max_distance: float = 0.0  # the largest distance d of a differing code from its decision boundary
    max_bound: float = 0.0  # the largest bound b of a differing code
    max_ratio: float = 0.0  # the largest d/b (inf where b is 0 or infinite: no bound)
    beyond_bound: int = 0  # differing codes that are not rounding flips
    worst: tuple[float, float] = (0.0, 0.0)  # (d, b) of the differing code with the largest d/b
    unbounded: str = ""  # why some of its bounds are infinite (an op with no error rule), or ""
    zero_fraction: float = 0.0  # the fraction of its codes equal to the code of an input 0

    @property
    def fraction(self) -> float:
        return self.differing / max(self.codes, 1)


@dataclass
class Verification:
    layers: dict[str, LayerCheck] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # integer layers the fake-quant model has no QConv2d for
    outputs_equal: bool = True  # the integer model's outputs are the reference mode's, bit for bit
    output_difference: float = 0.0  # max |integer - fake-quant| over the float outputs (not teacher-forced)

    @property
    def exact(self) -> bool:
        """The integer model's codes (at every layer) and outputs are the reference mode's, bit for bit."""
        return self.outputs_equal and all(c.reference_mismatches == 0 for c in self.layers.values())

    @property
    def ok(self) -> bool:
        """exact, and every code that differs from the fake-quant model's is a rounding flip."""
        return self.exact and not self.missing and all(c.beyond_bound == 0 for c in self.layers.values())

    @property
    def differing_fraction(self) -> float:
        total = sum(c.codes for c in self.layers.values())
        return sum(c.differing for c in self.layers.values()) / max(total, 1)

    def dead_layers(self, threshold: float = DEAD) -> list[str]:
        """Layers whose input codes are the code of 0 in at least `threshold` of the places."""
        return [n for n, c in self.layers.items() if c.zero_fraction >= threshold]

    def failures(self) -> list[str]:
        out = [f"{n}: {c.reference_mismatches} codes differ from the reference mode"
               for n, c in self.layers.items() if c.reference_mismatches]
        out += [] if self.outputs_equal else ["outputs: differ from the reference mode's"]
        for n, c in self.layers.items():
            if not c.beyond_bound:
                continue
            d, b = c.worst
            if math.isinf(b):
                out.append(f"{n}: {c.beyond_bound} codes differ from the fake-quant model's, at up to "
                           f"{c.max_distance:.3g} code units from the decision boundary, and have no rounding "
                           f"bound: the way to it passes {c.unbounded or 'an op with no error rule'}")
            else:
                out.append(f"{n}: {c.beyond_bound} codes differ from the fake-quant model's beyond rounding: at "
                           f"{d:.3g} code units from the decision boundary, where fp32 rounding moves it by at "
                           f"most {b:.3g}")
        out += [f"{n}: no QConv2d of that name in the fake-quant model" for n in self.missing]
        return out

    def summary(self) -> str:
        lines = [f"{'layer':40s} {'codes':>9s} {'ref.diff':>8s} {'fq.diff':>8s} {'fraction':>9s} {'max dist':>9s} "
                 f"{'max bound':>9s} {'max d/b':>9s} {'zeros':>6s}"]
        for n, c in self.layers.items():
            lines.append(f"{n:40s} {c.codes:9d} {c.reference_mismatches:8d} {c.differing:8d} {c.fraction:9.2e} "
                         f"{c.max_distance:9.2e} {c.max_bound:9.2e} {c.max_ratio:9.2e} {c.zero_fraction:6.1%}")
        dead = self.dead_layers()
        lines.append(f"exact: {self.exact}; codes differing from the fake-quant model: {self.differing_fraction:.3e}; "
                     f"all rounding flips (within their bounds): {self.ok}")
        lines.append(f"outputs: max |integer - fake-quant| = {self.output_difference:.3e}; dead layers "
                     f"(>= {DEAD:.0%} codes of 0): {', '.join(dead) if dead else 'none'}")
        return "\n".join(lines)


def _same(a, b) -> bool:
    """Outputs (tensors, possibly nested in tuples/lists) equal bit for bit, as float32."""
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a.float(), b.float())
    return a == b


def _difference(a, b) -> float:
    """max |a - b| over float outputs (nested in tuples/lists); inf where their structures differ."""
    if isinstance(a, (tuple, list)):
        if not isinstance(b, (tuple, list)) or len(a) != len(b):
            return math.inf
        return max((_difference(x, y) for x, y in zip(a, b)), default=0.0)
    if isinstance(a, torch.Tensor) and a.is_floating_point():
        if not isinstance(b, torch.Tensor) or a.shape != b.shape:
            return math.inf
        return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    return 0.0


def _bounds(gm, codes, inputs):
    """{layer: (float64 input of its quantizer, its bound, why unbounded)} from ErrorBounds."""
    forced64, _ = forced(gm, codes, torch.float64)
    seen = {}
    with torch.no_grad():
        ErrorBounds(forced64, lambda name, x, e, why: seen.__setitem__(name, (x, e, why))).run(
            *(x.double() if x.is_floating_point() else x for x in inputs))
    return seen


def _flips(form, x, e, got, fq):
    """(d, b, certified) of the codes that differ (got != fq): a differing code is a rounding flip when
    it is no further from fq's than the number of decision boundaries within its bound."""
    differ = got != fq
    e = torch.nan_to_num(torch.as_tensor(e, dtype=torch.float64).expand_as(x), nan=math.inf)
    reach = e + gamma(2) * (x.abs() + e + abs(form.q_off))  # + the quantizer's own (x - q_off)*q_mul
    _, distance, unit = form.decision(x)
    within = form.boundaries_within(x, reach)
    certified = ((got - fq).abs() <= within) & torch.isfinite(reach)  # no bound certifies nothing
    return distance[differ], (reach / unit)[differ], certified[differ]


def _layer(name, q, got, want, fq, bound) -> LayerCheck:
    form = q.int_activation()
    mismatches = int((got != want).sum()) if want is not None else got.numel()
    zero = form.codes(torch.zeros((), dtype=torch.float32, device=got.device))
    check = LayerCheck(name, got.numel(), mismatches, int((got != fq).sum()),
                       zero_fraction=float((got == zero).double().mean()) if got.numel() else 0.0)
    if bound is None or not check.differing:
        return check
    x, e, why = bound
    d, b, certified = _flips(form, x, e, got, fq)
    ratio = torch.where(torch.isfinite(b), torch.nan_to_num(d / b, nan=0.0, posinf=math.inf), math.inf)
    worst = int(ratio.argmax())
    check.max_distance, check.max_bound, check.max_ratio = float(d.max()), float(b.max()), float(ratio.max())
    check.worst = (float(d[worst]), float(b[worst]))
    check.beyond_bound = int((~certified).sum())
    check.unbounded = why or ""
    return check


def _check_arguments(model, int_model, inputs) -> None:
    if isinstance(model, IntModel):
        raise TypeError("model: expected the fake-quant (QAT) model, got an integer model; the call is "
                        "verify_int_model(model, int_model, *inputs)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected the fake-quant (QAT) nn.Module, got {type(model).__name__}")
    if not isinstance(int_model, IntModel):
        inner = " (pass its .int_model)" if isinstance(getattr(int_model, "int_model", None), IntModel) else ""
        raise TypeError(f"int_model: expected an IntModel (from convert_to_int or load_int_model), got "
                        f"{type(int_model).__name__}{inner}")
    if not inputs:
        raise ValueError("inputs: expected the input tensor(s) to verify on, got none")
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"inputs[{i}]: expected a torch.Tensor, got {type(x).__name__}")


def verify_int_model(model: nn.Module, int_model: nn.Module, *inputs) -> Verification:
    """Compare `int_model` (convert_to_int(model, ...), or that model saved and read back by
    load_int_model) with the reference mode and with the QAT `model` on `inputs` (module docstring).
    The models are not changed."""
    _check_arguments(model, int_model, inputs)
    gm = traced(trace.traceable(model))
    out, got = integer_codes(int_model, *inputs)
    ref_out, want = reference_forward(int_model, *inputs)
    forced32, wrapped = forced(gm, got, torch.float32)
    with torch.no_grad():
        fq_out = gm(*inputs)
        forced32(*inputs)
    fq = {name: f.seen for name, f in wrapped.items()}
    # The float64 evaluation with its bounds only certifies differing codes: none, nothing to run.
    differ = any(bool((got[name] != codes).any()) for name, codes in fq.items())
    bounds = _bounds(gm, got, inputs) if differ else {}
    result = Verification(outputs_equal=_same(out, ref_out), output_difference=_difference(out, fq_out))
    for name, codes in got.items():
        if name not in fq:
            result.missing.append(name)
            continue
        result.layers[name] = _layer(name, wrapped[name].q, codes, want.get(name), fq[name], bounds.get(name))
    return result
