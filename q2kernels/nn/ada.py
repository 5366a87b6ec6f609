"""QADALoss: Q-ADA feature distillation (docs/math.md §6) between named modules of a teacher and a student.

Forward hooks record, at every distillation point, the teacher module's output (detached: teacher
features never keep a graph) and the student module's output S. When S is handed as is to an
activation quantizer of the student (a q2kernels.nn quantizer whose `step_size()` is not None, e.g.
the input quantizer of the next QConv2d), that quantizer's output becomes Sq and its step Delta, so
the distortion term needs no wiring. With distortion="own" (the default) the teacher's side gets its own
term from Tq, that same quantizer applied to the teacher feature under no_grad when the loss is
computed: Tq is a temporary of the loss (the op keeps it for its backward, like T and S, and nothing
else holds it). With distortion="shared" the student's term is added to both sides. A feature that
reaches a quantizer only through other ops (an activation, a concat) has no Sq: no distortion term
is used for it. Where S feeds several quantizers, the first to run with a step supplies Sq and Delta.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from .. import functional as qF
from .. import reference as ref
from .._validate import check_choice, check_number
from .quantizers import Quantizer

DISTORTIONS = ("own", "shared")


class _Point:
    """What the hooks recorded for one distillation point during the current step."""

    def __init__(self, teacher_name: str, student_name: str):
        self.teacher_name, self.student_name = teacher_name, student_name
        self.clear()

    def clear(self):
        self.teacher = self.student = self.sq = self.delta = self.quantizer = None

    def where(self) -> str:
        if self.teacher_name == self.student_name:
            return f"point {self.teacher_name!r}"
        return f"point (teacher {self.teacher_name!r}, student {self.student_name!r})"


def _check_recorded(p: _Point) -> None:
    """Both features recorded, tensors, of one shape: the loss compares them pixel by pixel."""
    for which, feat, name in (("teacher", p.teacher, p.teacher_name), ("student", p.student, p.student_name)):
        if feat is None:
            raise RuntimeError(f"QADALoss: no {which} output recorded at {name!r}; run the teacher "
                               "and the student forward before calling the loss")
        if not isinstance(feat, torch.Tensor):
            raise TypeError(f"QADALoss: the {which} module {name!r} returned {type(feat).__name__}, "
                            "expected a (B, C, H, W) tensor")
    if p.teacher.shape != p.student.shape:
        raise ValueError(f"QADALoss at {p.where()}: the teacher output has shape {tuple(p.teacher.shape)} and the "
                         f"student output {tuple(p.student.shape)}; Q-ADA compares features of one shape "
                         "(the same batch through both models)")


def _parse_points(points):
    if isinstance(points, str) or not points:
        raise ValueError(f"points: expected a non-empty list of module names or (teacher, student) "
                         f"name pairs, got {points!r}")
    parsed = []
    for p in points:
        if isinstance(p, str):
            parsed.append((p, p))
        elif isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(n, str) for n in p):
            parsed.append((p[0], p[1]))
        else:
            raise ValueError(f"points: expected a module name or a (teacher, student) name pair, got {p!r}")
    return parsed


def _submodule(model: nn.Module, name: str, which: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"points: the {which} has no module named {name!r}") from None


def _remove_hooks(handles):
    for h in handles:
        h.remove()
    handles.clear()


class QADALoss(nn.Module):
    """Weighted sum over distillation points of the Q-ADA loss between teacher and student features.

        qada = QADALoss(teacher, student, points=["neck.p3", "neck.p4", "neck.p5"], weight=0.01)
        with torch.no_grad():
            teacher(images)
        out = student(images)
        loss = task_loss(out) + qada()

    points: module names present in both models, or (teacher_name, student_name) pairs.
    form ("q2": the Q2 paper's saliency, the default | "simam": GABFusion's), divergence ("js" | "kl"),
    gamma, lam, kappa and reduction ("mean" | "sum" over each feature's rows) are those of
    q2kernels.functional.q_ada_loss. distortion: "own" (each side's term from its own quantized
    feature, as Q2 defines it) | "shared" (the student's term on both sides). form="simam",
    distortion="shared" is this loss's original behaviour; with gamma = 0 it is GABFusion's ADA.
    Calling the module consumes the features recorded since the last call. `remove()` (or leaving a `with` block, or
    the module being garbage collected) removes every hook it registered.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, points, weight: float = 0.01,
                 divergence: str = "js", gamma: float = 1.0, lam: float = ref.ada.LAMBDA,
                 reduction: str = "mean", form: str = "q2", distortion: str = "own",
                 kappa: float = ref.ada.KAPPA):
        super().__init__()
        check_choice(form, "form", ref.ada.FORMS)
        check_choice(distortion, "distortion", DISTORTIONS)
        check_choice(divergence, "divergence", ref.ada.DIVERGENCES)
        check_choice(reduction, "reduction", ref.ada.REDUCTIONS)
        self.weight = check_number(weight, "weight", 0.0, lo_allowed=True)
        self.gamma = check_number(gamma, "gamma", 0.0, lo_allowed=True)
        self.lam = check_number(lam, "lam", 0.0, lo_allowed=False)
        self.kappa = check_number(kappa, "kappa", 0.0, lo_allowed=False)
        self.divergence, self.reduction = divergence, reduction
        self.form, self.distortion = form, distortion
        # Plain attributes, not submodules: the models' parameters and state stay out of this loss.
        self._points = [_Point(t, s) for t, s in _parse_points(points)]
        self._handles = []
        modules = [(_submodule(teacher, p.teacher_name, "teacher"), _submodule(student, p.student_name, "student"))
                   for p in self._points]
        for p, (t_mod, s_mod) in zip(self._points, modules):
            self._handles.append(t_mod.register_forward_hook(_teacher_hook(p)))
            self._handles.append(s_mod.register_forward_hook(_student_hook(p)))
        if self.gamma != 0.0:
            for m in student.modules():
                if isinstance(m, Quantizer):  # the hook asks its step_size() (the quantizer protocol)
                    self._handles.append(m.register_forward_hook(_quantizer_hook(self._points)))
        # The hooks reference the points, never this module, so it can be collected; then its hooks go.
        self._finalizer = weakref.finalize(self, _remove_hooks, self._handles)

    @property
    def points(self) -> list[tuple[str, str]]:
        return [(p.teacher_name, p.student_name) for p in self._points]

    def forward(self) -> torch.Tensor:
        total = None
        for p in self._points:
            _check_recorded(p)
            try:
                loss = qF.q_ada_loss(p.teacher, p.student, p.sq, p.delta, Tq=self._teacher_quantized(p),
                                     form=self.form, lam=self.lam, kappa=self.kappa, gamma=self.gamma,
                                     divergence=self.divergence, reduction=self.reduction)
            except (TypeError, ValueError) as e:
                # The functional names its argument (T, S, ...); the user also needs the point.
                raise type(e)(f"QADALoss at {p.where()}: {e}") from e
            total = loss if total is None else total + loss
            p.clear()
        return total * self.weight

    def _teacher_quantized(self, p: _Point):
        """Tq: the quantizer that supplied Sq, applied to the teacher feature (distortion="own")."""
        if self.distortion == "shared" or p.quantizer is None:
            return None
        with torch.no_grad():
            return p.quantizer.quantize(p.teacher)

    def remove(self) -> None:
        """Remove every hook this loss registered and drop the recorded features."""
        self._finalizer()
        for p in self._points:
            p.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    def extra_repr(self) -> str:
        return (f"points={self.points}, weight={self.weight}, form={self.form!r}, distortion={self.distortion!r}, "
                f"divergence={self.divergence!r}, gamma={self.gamma}, lam={self.lam}, kappa={self.kappa}, "
                f"reduction={self.reduction!r}")


def _teacher_hook(point):
    def hook(module, inputs, output):
        point.teacher = output.detach() if isinstance(output, torch.Tensor) else output
    return hook


def _student_hook(point):
    def hook(module, inputs, output):
        point.student = output
        point.sq = point.delta = point.quantizer = None
    return hook


def _quantizer_hook(points):
    def hook(module, inputs, output):
        for p in points:
            if p.sq is None and p.student is not None and inputs and inputs[0] is p.student:
                delta = module.step_size()
                if delta is None:  # a kind without a step: another quantizer of S may supply Sq
                    continue
                p.sq = output.detach()
                p.delta = delta.detach()
                p.quantizer = module
    return hook
