"""Reference network definitions used by the demo, the examples and the end-to-end benchmark."""
from .yolo import C3, SPPF, ConvBNAct, YOLOv5

__all__ = ["C3", "SPPF", "ConvBNAct", "YOLOv5"]
