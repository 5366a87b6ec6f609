"""Q2 quantization-aware training of Ultralytics YOLO detectors (`pip install q2kernels[ultralytics]`).

    from q2kernels.integrations.ultralytics import Q2DetectionTrainer
    from ultralytics import YOLO

    yolo = YOLO("yolo11s.yaml")
    yolo.train(data="data.yaml", trainer=Q2DetectionTrainer.with_options(recipe="lsq", w_bits=4, a_bits=4))

`prepare(model)` does the model surgery on a DetectionModel (or a YOLO object): Q2 quantization
with detector defaults, GatedFusion at every neck Concat, and the float teacher and the points at
which Q-ADA distils. `Q2DetectionTrainer` runs it inside Ultralytics' own trainer (data, loss,
optimiser, EMA, checkpoints, validation) and adds the Q-ADA term to the detection loss.
`IntDetector(convert_to_int(model, images), model)` is the integer model as Ultralytics' validator
takes a model (its mAP measured like the float one's).
"""
try:
    import ultralytics  # noqa: F401
except ImportError as e:
    raise ImportError("q2kernels.integrations.ultralytics needs Ultralytics: pip install q2kernels[ultralytics]") from e

from .data import write_synthetic_dataset
from .int_detector import IntDetector
from .model import Q2DetectionModel
from .prepare import Prepared, prediction_convs, prepare
from .trainer import Q2DetectionTrainer, Q2Options

__all__ = ["IntDetector", "Prepared", "Q2DetectionModel", "Q2DetectionTrainer", "Q2Options", "prediction_convs", "prepare",
           "write_synthetic_dataset"]
