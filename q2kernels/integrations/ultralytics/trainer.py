"""Q2DetectionTrainer: Ultralytics' DetectionTrainer training a Q2-prepared model.

Ultralytics keeps its data, loss, optimiser, EMA, checkpoints and validation; the trainer adds:
- get_model(): the DetectionModel built (and pretrained weights loaded) as usual, then prepare()d.
  A q2kernels checkpoint given as weights (resuming, or fine-tuning it further) is rebuilt from its
  `model.q2` record, not from the trainer's options, and loaded whole. Like Ultralytics' own
  distillation, a checkpoint does not carry its teacher: the record names the float weights file the
  teacher was built from (`model.q2["teacher"]`), and the teacher is rebuilt from it. A model trained
  from a YAML alone had a randomly initialised teacher that nothing can rebuild: Q-ADA is then off
  (with a warning).
- The optimiser: quantizer and fusion parameters (step sizes, offsets, thresholds, gate logits,
  LayerNorm affines) join the group without weight decay, as BatchNorm's do: they are scales and
  gates, not weights, and decay would pull each step size towards zero (every value clipped).
- Q-ADA: for each training epoch the model's criterion becomes the detection loss plus the Q-ADA
  term (reported as `qada_loss`), the frozen float teacher run on each batch. Its hooks live only
  while an epoch trains: Ultralytics deep-copies the model for its EMA and pickles that copy into
  every checkpoint, and a model carrying hooks (closures) cannot be pickled.
- The fusion nodes' start: with `fusion_init="identity"` (the default) a new run's GatedFusion nodes
  start as the Concats they replace (prepare.init_fusion_as_identity: LayerNorm's gamma and beta
  from the float model's statistics on `calibration_batches` training batches, before the first
  step), not as the unit-variance output of gamma = 1, beta = 0 that the float model's next layers
  never saw. "default" keeps gamma = 1, beta = 0.
- The LayerNorm-free epochs (Q2's deployment: docs/math.md §5): with `layernorm_free_epochs=N`, the
  last N epochs train without LayerNorm. At the start of the first of them every GatedFusion is
  calibrated on `calibration_batches` training batches (eval mode, no grad) and replaced, in the live
  model and in its EMA alike, by the FixedFusion that applies its gates and its frozen LayerNorm
  affine; training then goes on with the trainer's own data, loss, Q-ADA, EMA and learning-rate
  schedule. This is the Q2 recipe's post-removal fine-tuning, inside the run: the checkpoint is the
  model that converts to integers, and the best checkpoint is chosen among the LayerNorm-free epochs
  only (the best fitness restarts at the removal). A checkpoint whose LayerNorms are removed rebuilds
  its FixedFusion nodes when training continues from it.
  With `layernorm_blend_epochs=M` (M < N) the removal is gradual: the first M LayerNorm-free epochs
  replace each node by a BlendedFusion (deploy.fusion_blend) whose statistics move batch by batch
  from the per-pixel ones to the calibrated ones; at the end of them the node equals its fixed
  affine and becomes that FixedFusion, and the best fitness restarts there.
- The EMA's quantizers: the EMA is copied before the first batch initialises the quantizers, and
  ModelEMA averages floating-point state only, so the copy would average from the placeholder
  values, never learn that its quantizers were initialised (a bool buffer), and re-initialise them
  from the first validation batch. After the first training batch each uninitialised EMA quantizer
  takes the live one's state (the EMA starts from the initialised values).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from ultralytics.cfg import DEFAULT_CFG
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import LOGGER
from ultralytics.nn.tasks import load_checkpoint
from ultralytics.utils.torch_utils import unwrap_model

from ...deploy import calibrate_fusion, freeze_fusion
from ...deploy.fusion import FixedFusion
from ...deploy.fusion_blend import BlendedFusion
from ...deploy.fusion_fit import fitted_fusion
from ...nn import GatedFusion, QADALoss, Quantizer
from .model import Q2DetectionModel
from .prepare import init_fusion_as_identity, prepare, replace_module

DISTILL_KEY = "qada_loss"
FUSION_INITS = ("identity", "default")
LAYERNORM_REMOVALS = ("mean", "fit")


@dataclass(frozen=True)
class Q2Options:
    """prepare()'s arguments and the phases of the run.

    distill_weight: the Q-ADA weight (0 trains without distillation). The teacher is the float model
        the run starts from, so it must have trained weights (`YOLO("float.pt")`): a model built from
        a YAML is refused unless `random_teacher=True` says a random teacher is what is wanted.
    layernorm_free_epochs: the last that many epochs train with every fusion node's LayerNorm
        replaced by its calibrated affine (module docstring); 0 keeps the LayerNorm to the end.
    calibration_batches: training batches the LayerNorm statistics are averaged over.
    fusion_init: "identity" (the fusion nodes start as the float model's Concats) or "default"
        (gamma = 1, beta = 0); module docstring.
    layernorm_removal: the fixed affine that replaces each LayerNorm: "mean" (the Q2 paper's, from
        the mean per-pixel statistics: deploy.calibrate_fusion) or "fit" (per channel, the least-squares
        fit to the LayerNorm's output on the calibration batches: deploy.fusion_fit).
    layernorm_blend_epochs: the first that many LayerNorm-free epochs blend each node's per-pixel
        statistics into the calibrated ones (deploy.fusion_blend; "mean" removal only); must leave at
        least one epoch of the fixed affine after them.
    """
    recipe: str = "lsq"
    w_bits: int = 4
    a_bits: int = 4
    head_bits: int | None = None
    keep_float: tuple[str, ...] | None = None
    fusion: str | None = "balanced"
    distill_weight: float = 0.01
    random_teacher: bool = False
    layernorm_free_epochs: int = 0
    calibration_batches: int = 8
    fusion_init: str = "identity"
    layernorm_removal: str = "mean"
    layernorm_blend_epochs: int = 0

    def __post_init__(self):
        w = self.distill_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < float("inf"):
            raise ValueError(f"distill_weight: expected a finite number >= 0, got {w!r}")
        if not isinstance(self.random_teacher, bool):
            raise ValueError(f"random_teacher: expected True or False, got {self.random_teacher!r}")
        for name, lo in (("layernorm_free_epochs", 0), ("calibration_batches", 1), ("layernorm_blend_epochs", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}: expected an integer >= {lo}, got {v!r}")
        if self.layernorm_removal not in LAYERNORM_REMOVALS:
            raise ValueError(f"layernorm_removal: expected one of {LAYERNORM_REMOVALS}, got {self.layernorm_removal!r}")
        if self.fusion_init not in FUSION_INITS:
            raise ValueError(f"fusion_init: expected one of {FUSION_INITS}, got {self.fusion_init!r}")
        if self.layernorm_free_epochs and self.fusion is None:
            raise ValueError("layernorm_free_epochs: the model has no fusion node (fusion=None), so no LayerNorm "
                             "to remove")
        if self.layernorm_blend_epochs and self.layernorm_blend_epochs >= self.layernorm_free_epochs:
            raise ValueError(f"layernorm_blend_epochs: {self.layernorm_blend_epochs} must be less than "
                             f"layernorm_free_epochs ({self.layernorm_free_epochs}): the blend ends in the fixed "
                             "affine, which the last epochs train")
        if self.layernorm_blend_epochs and self.layernorm_removal != "mean":
            raise ValueError(f"layernorm_blend_epochs: the blend moves towards the calibrated mean statistics, "
                             f"so it needs layernorm_removal='mean', got {self.layernorm_removal!r}")

    def prepare_kwargs(self) -> dict:
        kw = asdict(self)
        for phase in ("random_teacher", "layernorm_free_epochs", "calibration_batches", "fusion_init",
                      "layernorm_removal", "layernorm_blend_epochs"):
            kw.pop(phase)
        weight = kw.pop("distill_weight")
        return {**kw, "distill": weight > 0}


class DistilledCriterion:
    """The model's detection criterion plus the Q-ADA term, computed after the teacher has seen the
    batch. The term enters as one more loss component, scaled by the batch size like the detection
    loss (whose components are per-image means times the batch size)."""

    def __init__(self, criterion, teacher: torch.nn.Module, distill: QADALoss):
        self.criterion, self.teacher, self.distill = criterion, teacher, distill

    def __call__(self, preds, batch):
        loss, items = self.criterion(preds, batch)
        with torch.no_grad():
            self.teacher(batch["img"])
        term = self.distill()
        total = torch.cat((loss.reshape(-1), (term * batch["img"].shape[0]).reshape(1).to(loss.dtype)))
        return total, {**items, DISTILL_KEY: term.detach()}

    def __getattr__(self, name):  # the rest of the criterion's interface (e.g. update())
        if name == "criterion":
            raise AttributeError(name)
        return getattr(self.criterion, name)


def _training_batches(trainer, count: int) -> list[dict]:
    """`count` preprocessed batches from the trainer's own training data pipeline."""
    out = []
    while len(out) < count:
        for batch in trainer.train_loader:
            out.append(trainer.preprocess_batch(batch))
            if len(out) == count:
                break
    return out


def _broadcast(*tensors) -> None:
    """Rank 0's values of `tensors` on every rank (nothing without torch.distributed)."""
    if _distributed():
        for t in tensors:
            dist.broadcast(t, src=0)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _is_q2(model) -> bool:
    return isinstance(model, Q2DetectionModel)


class Q2DetectionTrainer(DetectionTrainer):
    """DetectionTrainer for Q2 QAT (module docstring). `q2`: the Q2Options (default: the class's
    `options`, Q2Options() unless made by with_options)."""

    options = Q2Options()

    def __init__(self, cfg=DEFAULT_CFG, overrides=None, _callbacks=None, q2: Q2Options | None = None):
        if q2 is not None and not isinstance(q2, Q2Options):
            raise TypeError(f"q2: expected a Q2Options, got {type(q2).__name__}")
        self.q2 = q2 if q2 is not None else self.options
        self.teacher = None
        self._float_start = None  # the float model before prepare(), until the fusion nodes are initialised
        self._distilled = None    # (model, base criterion, QADALoss) while an epoch trains
        self._ema_synced = False  # the EMA's quantizers have taken the live ones' first-batch initialisation
        self._blend_at = (-1, 0)  # (epoch, batches trained in it) while the LayerNorm statistics blend
        super().__init__(cfg, overrides, _callbacks)
        if self.args.quantize == 8:
            raise ValueError("quantize: 8 (Ultralytics' ModelOpt INT8 QAT) would quantize the model a second "
                             "time; Q2DetectionTrainer quantizes it with q2kernels")
        if self.q2.layernorm_free_epochs > self.epochs:
            raise ValueError(f"layernorm_free_epochs: {self.q2.layernorm_free_epochs} is more than the run's "
                             f"{self.epochs} epochs")
        self.add_callback("on_train_start", Q2DetectionTrainer._init_fusion)
        self.add_callback("on_train_epoch_start", Q2DetectionTrainer._remove_layernorm)
        self.add_callback("on_train_epoch_start", Q2DetectionTrainer._freeze_blended)
        self.add_callback("on_train_batch_start", Q2DetectionTrainer._step_blend)
        self.add_callback("on_train_epoch_start", Q2DetectionTrainer._attach_distillation)
        self.add_callback("on_train_epoch_end", Q2DetectionTrainer._detach_distillation)
        self.add_callback("on_train_batch_end", Q2DetectionTrainer._sync_ema_quantizers)

    @classmethod
    def with_options(cls, **options) -> type:
        """The trainer class for YOLO.train(trainer=...) with these Q2Options, e.g.
        Q2DetectionTrainer.with_options(recipe="pact"). A subclass, not a partial: Ultralytics' DDP
        launcher rebuilds the trainer from its class in each worker, and the options go with it."""
        return type(cls.__name__, (cls,), {"options": Q2Options(**options), "__module__": cls.__module__})

    def get_model(self, cfg=None, weights=None, verbose=True):
        if _is_q2(weights):
            model = super().get_model(cfg, None, verbose)
            record = weights.q2
            prepare(model, record["recipe"], record["w_bits"], record["a_bits"], record["head_bits"],
                    record["keep_float"], record["fusion"], distill=False)
            for name, node in weights.named_modules():  # LayerNorms removed or blending: the same nodes
                if isinstance(node, (FixedFusion, BlendedFusion)):
                    replace_module(model, name, copy.deepcopy(node).float())
            model.load_state_dict(weights.float().state_dict())
            model.q2["teacher"] = record.get("teacher")
            if self.q2.distill_weight > 0 and model.q2["teacher"] is not None:
                self.teacher = self._float_model(cfg, model.q2["teacher"])
            return model
        if weights is None and self.q2.distill_weight > 0 and not self.q2.random_teacher:
            raise ValueError("distill_weight: Q-ADA distils from the float model the run starts from, and this "
                             "one has no trained weights (built from a YAML). Start from a float checkpoint "
                             "(YOLO('float.pt').train(...)), or pass distill_weight=0, or random_teacher=True "
                             "to distil from the random model on purpose")
        model = super().get_model(cfg, weights, verbose)
        init = self.q2.fusion is not None and self.q2.fusion_init == "identity"
        prepared = prepare(model, **{**self.q2.prepare_kwargs(), "distill": self.q2.distill_weight > 0 or init})
        self.teacher = prepared.teacher if self.q2.distill_weight > 0 else None
        self._float_start = prepared.teacher if init else None
        model.q2["teacher"] = self._weights_file() if weights is not None else None
        model.q2["fusion_init"] = "pending" if init else "default"
        return model

    def setup_model(self):
        ckpt = super().setup_model()
        model = self.model
        if self.teacher is None and _is_q2(model) and self.q2.distill_weight > 0 and model.q2.get("teacher"):
            # An Ultralytics DDP worker is handed the model the launching process's get_model prepared
            # (YOLO(...).train pickles it), so get_model never ran here: rebuild the teacher from the record.
            self.teacher = self._float_model(model.yaml, model.q2["teacher"])
        if self._float_start is None and _is_q2(model) and model.q2.get("fusion_init") == "pending":
            # The same hand-over: the float start the fusion nodes are initialised from (_init_fusion).
            if model.q2.get("teacher"):
                self._float_start = self.teacher or self._float_model(model.yaml, model.q2["teacher"])
            else:
                LOGGER.warning("Q2: the fusion nodes keep gamma = 1, beta = 0: this process has no float model "
                               "to initialise them from (a model built from a YAML, handed over by DDP)")
        if self.teacher is not None:
            # Each DDP worker built its teacher under its own seed (init_seeds(seed + 1 + RANK)): a random
            # teacher differs per rank, and DDP syncs only the student. Rank 0's for all.
            _broadcast(*self.teacher.state_dict().values())
        return ckpt

    def _weights_file(self) -> str | None:
        """The float weights file get_model's weights came from (setup_model loads `pretrained` when
        it is a path, else the model given as a .pt)."""
        for source in (self.args.pretrained, self.args.model):
            if isinstance(source, (str, Path)) and str(source).lower().endswith(".pt"):
                return str(source)
        return None

    def _float_model(self, cfg, weights_file: str) -> torch.nn.Module:
        """The teacher as it was at the start: the model built from cfg with the float weights loaded."""
        float_weights, _ = load_checkpoint(weights_file)
        return super().get_model(cfg, float_weights, verbose=False).eval().requires_grad_(False)

    def build_optimizer(self, model, *args, **kwargs):
        optimizer = super().build_optimizer(model, *args, **kwargs)
        exempt = {id(p) for m in unwrap_model(model).modules() if isinstance(m, (Quantizer, GatedFusion))
                  for p in m.parameters()}
        no_decay = next(g for g in optimizer.param_groups if g["weight_decay"] == 0 and not g.get("use_muon"))
        for group in optimizer.param_groups:
            if group["weight_decay"] != 0:
                moved = [p for p in group["params"] if id(p) in exempt]
                group["params"] = [p for p in group["params"] if id(p) not in exempt]
                no_decay["params"].extend(moved)
        return optimizer

    def label_loss_items(self, loss_items=None, prefix="train"):
        # Validation runs the EMA's plain detection criterion: it has no Q-ADA term to report.
        items = super().label_loss_items(loss_items, prefix)
        if prefix == "val":
            key = f"{prefix}/{DISTILL_KEY}"
            return [k for k in items if k != key] if loss_items is None else \
                {k: v for k, v in items.items() if k != key}
        return items

    def _init_fusion(self):
        """Before the first step of a new run: the fusion nodes start as the float model's Concats
        (Q2Options.fusion_init), in the live model and the EMA alike."""
        if self._float_start is None:
            return
        model = unwrap_model(self.model)
        batches = [b["img"] for b in _training_batches(self, self.q2.calibration_batches)]
        stats = init_fusion_as_identity(model, self._float_start.to(self.device), batches)
        for name in stats:  # each rank saw its own shard: rank 0's values for all (DDP syncs no later change)
            node = model.get_submodule(name)
            _broadcast(node.gamma.data, node.beta.data)
        if self.ema is not None:
            ema = self.ema.ema.state_dict()
            for name in stats:
                for p in ("gamma", "beta"):
                    ema[f"{name}.{p}"].copy_(model.get_submodule(name).get_parameter(p).detach())
        self._float_start = None
        model.q2["fusion_init"] = "identity"
        if self.ema is not None:
            self.ema.ema.q2["fusion_init"] = "identity"
        LOGGER.info("Q2: fusion nodes start as the float model's Concats: " + ", ".join(
            f"{n} gamma {s:.3g} beta {m:.3g}" for n, (m, s) in stats.items()))

    def _remove_layernorm(self):
        """At the first LayerNorm-free epoch: calibrate the live model's fusion nodes, then freeze them
        to their fixed affines (or start their blend) in the live model and the EMA (the same values in
        both)."""
        free = self.q2.layernorm_free_epochs
        model = unwrap_model(self.model)
        nodes = [n for n, m in model.named_modules() if isinstance(m, GatedFusion)]
        if not free or self.epoch < self.epochs - free or not nodes or model.q2.get("layernorm") == "blending":
            return
        batches = _training_batches(self, self.q2.calibration_batches)
        forward = lambda m, b: m(b["img"])  # noqa: E731
        # DDP: each rank calibrates on its own shard; rank 0's statistics (or fitted affines) go to all,
        # so that every rank trains, and rank 0 saves, the same fixed affine (DDP syncs no buffer).
        if self.q2.layernorm_removal == "fit":
            fixed = fitted_fusion(model, batches, forward=forward)
            for name, node in fixed.items():
                _broadcast(node.scale, node.shift)
                replace_module(model, name, node)
        else:
            calibrate_fusion(model, batches, forward=forward)
            for name in nodes:
                node = model.get_submodule(name)
                _broadcast(node.mubar, node.sigmabar)
                if self.q2.layernorm_blend_epochs:
                    replace_module(model, name, BlendedFusion(node))
            if not self.q2.layernorm_blend_epochs:
                freeze_fusion(model)
        self._mirror_in_ema(nodes, "blending" if self.q2.layernorm_blend_epochs else "removed")
        how = (f"blended into its calibrated affine over {self.q2.layernorm_blend_epochs} epoch(s), then removed"
               if self.q2.layernorm_blend_epochs else "removed")
        LOGGER.info(f"Q2: LayerNorm {how} at {len(nodes)} fusion nodes (calibrated on {len(batches)} batches); "
                    f"the last {self.epochs - self.epoch} epochs train without it")

    def _freeze_blended(self):
        """At the first epoch after the blend: each BlendedFusion (now its fixed affine) becomes that
        FixedFusion, in the live model and the EMA."""
        model = unwrap_model(self.model)
        nodes = [n for n, m in model.named_modules() if isinstance(m, BlendedFusion)]
        if not nodes or self.epoch < self.epochs - self.q2.layernorm_free_epochs + self.q2.layernorm_blend_epochs:
            return
        for name in nodes:
            replace_module(model, name, model.get_submodule(name).freeze())
        self._mirror_in_ema(nodes, "removed")

    def _mirror_in_ema(self, names, state: str):
        """The live model's nodes `names` copied into the EMA, and both records' LayerNorm state set.
        When the LayerNorm is gone for good the best fitness restarts: the best checkpoint is a
        LayerNorm-free one."""
        model = unwrap_model(self.model)
        if self.ema is not None:
            for name in names:
                replace_module(self.ema.ema, name, self._ema_twin(model.get_submodule(name), name))
            if hasattr(self.ema, "_pairs"):
                self.ema._pairs = None  # ModelEMA caches its (ema, model) tensor pairs: the nodes changed
            self.ema.ema.q2["layernorm"] = state  # the EMA's record is its own copy (checkpoints save it)
        model.q2["layernorm"] = state
        if state == "removed":
            self.best_fitness = None
            self.stopper.best_fitness, self.stopper.best_epoch = 0.0, self.epoch

    def _ema_twin(self, node, name: str):
        """The EMA's copy of the live model's new node `name`. A BlendedFusion wraps the EMA's own
        GatedFusion, given the live one's values: a copy of the live node would carry the hooks that
        observers (e.g. BranchGradients) put on it, and the EMA must stay picklable for checkpoints."""
        if not isinstance(node, BlendedFusion):
            return copy.deepcopy(node)
        twin = self.ema.ema.get_submodule(name)
        twin.load_state_dict(node.node.state_dict())
        return BlendedFusion(twin, blend=node.blend.item())

    def _step_blend(self):
        """Before each batch of the blend epochs: t = (batches trained in the blend + 1) / (all of them),
        so the last batch trains at t = 1 and a resumed run goes on from its epoch."""
        model = unwrap_model(self.model)
        nodes = [m for m in model.modules() if isinstance(m, BlendedFusion)]
        if not nodes:
            return
        if self.ema is not None:
            nodes += [m for m in self.ema.ema.modules() if isinstance(m, BlendedFusion)]
        epoch, batch = self._blend_at if self._blend_at[0] == self.epoch else (self.epoch, 0)
        per_epoch = len(self.train_loader)
        done = (epoch - (self.epochs - self.q2.layernorm_free_epochs)) * per_epoch + batch
        t = min(1.0, (done + 1) / (self.q2.layernorm_blend_epochs * per_epoch))
        for node in nodes:
            node.set_blend(t)
        self._blend_at = (epoch, batch + 1)

    def _attach_distillation(self):
        if self._distilled is not None or self.q2.distill_weight == 0:
            return
        if self.teacher is None:
            LOGGER.warning("Q2: training without Q-ADA: there is no float teacher (a q2kernels checkpoint of a "
                           "model trained from a YAML alone, whose random float start nothing can rebuild, or a "
                           "module prepared outside this trainer's get_model)")
            self.q2 = replace(self.q2, distill_weight=0.0)
            return
        model = unwrap_model(self.model)
        if getattr(model, "criterion", None) is None:
            model.criterion = model.init_criterion()
        self.teacher.to(self.device)
        distill = QADALoss(self.teacher, model, model.q2["points"], weight=self.q2.distill_weight)
        self._distilled = (model, model.criterion, distill)
        model.criterion = DistilledCriterion(model.criterion, self.teacher, distill)

    def _detach_distillation(self):
        if self._distilled is None:
            return
        model, criterion, distill = self._distilled
        distill.remove()
        model.criterion = criterion
        self._distilled = None

    def _sync_ema_quantizers(self):
        if self._ema_synced or self.ema is None:
            return
        ema = dict(self.ema.ema.named_modules())
        for name, q in unwrap_model(self.model).named_modules():
            if isinstance(q, Quantizer) and not bool(ema[name].initialized):  # once per run: syncs allowed
                ema[name].load_state_dict(q.state_dict())
        self._ema_synced = True
