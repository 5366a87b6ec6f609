"""DetectHead: what a YOLO detection head's decode needs, as plain data an integer model file carries.

convert_to_int of a detector ends at the head's raw per-level maps (deploy.trace.raw_maps), each
(N, 4*reg_max + nc, H_i, W_i): the box sides' distance bins, then the class logits. Turning them into
boxes (deploy.detect_decode) needs only the numbers held here: nc, reg_max, the stride of each level,
the class names, and the input size (imgsz) the model was made for. With them a saved file predicts on
its own (deploy.detector), without the training framework's model object.

A record read from a file is hostile input: DetectHead.from_record checks every field's type and range
and raises TypeError / ValueError naming the field. Only one-to-many heads (YOLOv8/YOLO11 Detect:
sigmoid scores, then NMS) are described; a one-to-one (end2end, NMS-free) head is refused by name.
"""
from __future__ import annotations

from dataclasses import dataclass

RECORD_KEYS = ("nc", "reg_max", "strides", "names", "imgsz", "end2end")
# Bounds far above any real detector (COCO: 80 classes, LVIS: 1203; Ultralytics: reg_max 16, strides
# 8..64), so that a file cannot make the decode allocate without limit.
MAX_CLASSES = 65536
MAX_REG_MAX = 256
MAX_LEVELS = 16
MAX_STRIDE = 4096
MAX_IMGSZ = 8192  # a 3-channel fp32 input of 8192^2 is 768 MiB; 16384^2 would be 3 GiB
MAX_NAME_CHARS = 256


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _int(field: str, v, lo: int, hi: int) -> int:
    if type(v) is not int:  # bool is an int subclass; a flag is no count
        raise TypeError(f"detect_head {field}: expected an int, got {type(v).__name__} {_short(v)}")
    if not lo <= v <= hi:
        raise ValueError(f"detect_head {field}: expected {lo} to {hi}, got {v}")
    return v


def _sequence(field: str, v, n_min: int, n_max: int) -> tuple:
    if not isinstance(v, (list, tuple)):
        raise TypeError(f"detect_head {field}: expected a list, got {type(v).__name__} {_short(v)}")
    if not n_min <= len(v) <= n_max:
        raise ValueError(f"detect_head {field}: expected {n_min} to {n_max} entries, got {len(v)}")
    return tuple(v)


@dataclass(frozen=True)
class DetectHead:
    """The decode of a one-to-many YOLO Detect head (module docstring). strides: one positive int per
    output map, in the model's output order; names: one per class; imgsz: (height, width) of the
    letterboxed input, each a multiple of the largest stride."""
    nc: int
    reg_max: int
    strides: tuple[int, ...]
    names: tuple[str, ...]
    imgsz: tuple[int, int]

    def __post_init__(self):
        _int("nc", self.nc, 1, MAX_CLASSES)
        _int("reg_max", self.reg_max, 1, MAX_REG_MAX)
        strides = _sequence("strides", self.strides, 1, MAX_LEVELS)
        for i, s in enumerate(strides):
            _int(f"strides[{i}]", s, 1, MAX_STRIDE)
        names = _sequence("names", self.names, 0, MAX_CLASSES)
        if len(names) != self.nc:
            raise ValueError(f"detect_head names: expected one name per class (nc={self.nc}), got {len(names)}")
        for i, name in enumerate(names):
            if not isinstance(name, str):
                raise TypeError(f"detect_head names[{i}]: expected a str, got {type(name).__name__} {_short(name)}")
            if len(name) > MAX_NAME_CHARS:
                raise ValueError(f"detect_head names[{i}]: longer than {MAX_NAME_CHARS} characters")
        imgsz = _sequence("imgsz", self.imgsz, 2, 2)
        for i, side in enumerate(imgsz):
            _int(f"imgsz[{i}]", side, 1, MAX_IMGSZ)
            # Every level's map must tile the input: a neck's upsample-and-concat needs whole cells.
            if side % max(strides):
                raise ValueError(f"detect_head imgsz[{i}]: {side} is not a multiple of the largest stride "
                                 f"{max(strides)}")
        object.__setattr__(self, "strides", strides)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "imgsz", imgsz)

    @property
    def channels(self) -> int:
        """Channels of each raw map: 4 sides' distance bins, then the class logits."""
        return 4 * self.reg_max + self.nc

    def record(self) -> dict:
        """The head as plain data (what a model file holds)."""
        return {"nc": self.nc, "reg_max": self.reg_max, "strides": list(self.strides), "names": list(self.names),
                "imgsz": list(self.imgsz), "end2end": False}

    @classmethod
    def from_record(cls, rec) -> DetectHead:
        """A head from a record read from a file, every field checked (module docstring)."""
        if not isinstance(rec, dict):
            raise TypeError(f"detect_head: expected a dict, got {type(rec).__name__} {_short(rec)}")
        if set(rec) != set(RECORD_KEYS):
            raise ValueError(f"detect_head: expected the keys {sorted(RECORD_KEYS)}, got {sorted(map(str, rec))}")
        if type(rec["end2end"]) is not bool:
            raise TypeError(f"detect_head end2end: expected a bool, got {type(rec['end2end']).__name__}")
        if rec["end2end"]:
            raise ValueError("detect_head end2end: a one-to-one (end-to-end, NMS-free) head; this version of "
                             "q2kernels decodes one-to-many heads only")
        return cls(**{k: rec[k] for k in RECORD_KEYS if k != "end2end"})
