"""Q2 quantization-aware training of Ultralytics YOLO detectors (`pip install q2kernels[ultralytics]`).

    from ultralytics import YOLO
    from q2kernels.integrations.ultralytics import Q2DetectionTrainer, load_q2_checkpoint, to_int, validate

    yolo = YOLO("float.pt")                       # a trained float checkpoint: also the Q-ADA teacher
    yolo.train(data="data.yaml", epochs=6, trainer=Q2DetectionTrainer.with_options(
        recipe="lsq", w_bits=4, a_bits=4, layernorm_free_epochs=2))
    model = load_q2_checkpoint(yolo.trainer.best)  # LayerNorm-free, fine-tuned
    int_model, check = to_int(model, images)       # convert_to_int + verify_int_model
    validate(int_model, "data.yaml", imgsz=640); int_model.save("model.q2k", imgsz=640)

`prepare(model)` does the model surgery on a DetectionModel (or a YOLO object): Q2 quantization
with detector defaults, GatedFusion at every neck Concat, and the float teacher and the points at
which Q-ADA distils. `Q2DetectionTrainer` runs it inside Ultralytics' own trainer (data, loss,
optimiser, EMA, checkpoints, validation), adds the Q-ADA term to the detection loss and, with
`layernorm_free_epochs`, calibrates and removes the LayerNorms for the last epochs. `IntDetector`
(what to_int returns) is the integer model as Ultralytics' validator and predictor take a model;
its `save` writes the file q2kernels.deploy.load_detector predicts with on its own.
"""
try:
    import ultralytics  # noqa: F401
except ImportError as e:
    raise ImportError("q2kernels.integrations.ultralytics needs Ultralytics: pip install q2kernels[ultralytics]") from e

from .data import write_synthetic_dataset
from .deploy import load_q2_checkpoint, predict, to_int, validate
from .diagnostics import BranchGradients
from .int_detector import IntDetector
from .model import Q2DetectionModel
from .prepare import Prepared, prediction_convs, prepare
from .trainer import Q2DetectionTrainer, Q2Options

__all__ = ["BranchGradients", "IntDetector", "Prepared", "Q2DetectionModel", "Q2DetectionTrainer", "Q2Options",
           "load_q2_checkpoint", "predict", "prediction_convs", "prepare", "to_int", "validate", "write_synthetic_dataset"]
