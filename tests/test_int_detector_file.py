"""An integer detector as a file a user ships: save_int_model with a DetectHead, load_detector, predict.

Without Ultralytics: a small two-level detector is converted and saved with its head record; the file
loads and predicts in a fresh process that imports neither Ultralytics nor q2kernels.nn; hostile head
records are refused naming the field; the decode, the NMS and the letterbox are checked against
numbers worked out by hand. With Ultralytics (skipped where it is not installed): for YOLO11n built
from its YAML, the decode equals Detect._inference, the NMS equals Ultralytics' non_max_suppression,
and predict on a non-square image file equals Ultralytics' letterbox + decode + NMS + scale_boxes.
"""
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from q2kernels.deploy import DetectHead, convert_to_int, load_int_model, save_int_model
from q2kernels.deploy.detect_decode import decode
from q2kernels.deploy.detector import load_detector
from q2kernels.deploy.letterbox import letterbox, read_image
from q2kernels.deploy.nms import nms
from q2kernels.deploy.serialize import RECORD_KEYS
from q2kernels.integrations import ultralytics_offline
from q2kernels.nn import quantize_model
from deployable import settle
from refusals import expect_load_refused

ultralytics_offline()  # before Ultralytics is imported (by the fixtures below, where it is installed)

ROOT = Path(__file__).resolve().parent.parent
HEAD = DetectHead(nc=3, reg_max=4, strides=(4, 8), names=("cat", "dog", "bird"), imgsz=(32, 32))


class _TinyDetector(nn.Module):
    """Raw Detect-style maps at strides 4 and 8: 4*reg_max box bins, then nc class logits."""

    def __init__(self, channels):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.SiLU())
        self.stem, self.p4, self.p8 = block(3, 8), block(8, 16), block(16, 16)
        self.head4, self.head8 = nn.Conv2d(16, channels, 1), nn.Conv2d(16, channels, 1)

    def forward(self, x):
        p4 = self.p4(self.stem(x))
        return [self.head4(p4), self.head8(self.p8(p4))]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = quantize_model(_TinyDetector(HEAD.channels), "lsq", w_bits=4, a_bits=4)
    g = torch.Generator().manual_seed(0)
    settle(model, lambda: torch.rand(2, 3, *HEAD.imgsz, generator=g))
    x = torch.rand(2, 3, *HEAD.imgsz, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every conv converts: the file holds no fake-quant module
        int_model = convert_to_int(model, x)
    path = tmp_path_factory.mktemp("tiny") / "tiny.q2k"
    save_int_model(int_model, path, detect_head=HEAD)
    return SimpleNamespace(path=path, int_model=int_model, x=x)


# The file.
def test_the_head_round_trips_with_the_model(tiny, tmp_path):
    loaded = load_int_model(tiny.path)
    assert loaded.detect_head == HEAD
    for a, b in zip(loaded(tiny.x), tiny.int_model(tiny.x)):
        assert torch.equal(a, b)
    save_int_model(loaded, tmp_path / "again.q2k")  # a loaded model keeps its head
    assert load_int_model(tmp_path / "again.q2k").detect_head == HEAD


def test_a_file_without_a_head_is_written_and_read_as_before(tiny, tmp_path):
    path = tmp_path / "plain.q2k"
    save_int_model(tiny.int_model, path)
    assert set(torch.load(path, weights_only=True)) == set(RECORD_KEYS)
    loaded = load_int_model(path)
    assert loaded.detect_head is None
    for a, b in zip(loaded(tiny.x), tiny.int_model(tiny.x)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="without a detect_head record"):
        load_detector(path)
    with pytest.raises(TypeError, match="detect_head: expected a DetectHead or None, got dict"):
        save_int_model(tiny.int_model, path, detect_head=HEAD.record())


def _hostile_heads():
    def edit(**fields):
        return lambda r: r.update(fields)

    def drop(key):
        return lambda r: r.pop(key)

    return [
        (edit(nc="3"), "detect_head nc: expected an int, got str"),
        (edit(nc=True), "detect_head nc: expected an int, got bool"),
        (edit(nc=torch.tensor(3)), "detect_head nc: expected an int, got Tensor"),
        (edit(nc=0), "detect_head nc: expected 1 to 65536, got 0"),
        (edit(nc=-3), "detect_head nc: expected 1 to 65536, got -3"),
        (edit(nc=2**40), "detect_head nc: expected 1 to 65536, got 1099511627776"),
        (edit(reg_max=0), "detect_head reg_max: expected 1 to 256, got 0"),
        (edit(reg_max=2**31), "detect_head reg_max: expected 1 to 256, got 2147483648"),
        (edit(reg_max=4.0), "detect_head reg_max: expected an int, got float"),
        (edit(strides=[]), "detect_head strides: expected 1 to 16 entries, got 0"),
        (edit(strides=[4, 0]), "detect_head strides[1]: expected 1 to 4096, got 0"),
        (edit(strides=[4, -8]), "detect_head strides[1]: expected 1 to 4096, got -8"),
        (edit(strides=[4, 2**20]), "detect_head strides[1]: expected 1 to 4096, got 1048576"),
        (edit(strides=[4.0, 8.0]), "detect_head strides[0]: expected an int, got float"),
        (edit(strides="48"), "detect_head strides: expected a list, got str"),
        (edit(strides=[4] * 17), "detect_head strides: expected 1 to 16 entries, got 17"),
        (edit(names=["cat", "dog"]), "detect_head names: expected one name per class (nc=3), got 2"),
        (edit(names=["cat", "dog", 3]), "detect_head names[2]: expected a str, got int"),
        (edit(names=["cat", "dog", "x" * 1000]), "detect_head names[2]: longer than 256 characters"),
        (edit(names={"0": "cat"}), "detect_head names: expected a list, got dict"),
        (edit(imgsz=[32]), "detect_head imgsz: expected 2 to 2 entries, got 1"),
        (edit(imgsz=[36, 32]), "detect_head imgsz[0]: 36 is not a multiple of the largest stride 8"),
        (edit(imgsz=[32, 2**20]), "detect_head imgsz[1]: expected 1 to 8192, got 1048576"),
        (edit(imgsz=[32, 0]), "detect_head imgsz[1]: expected 1 to 8192, got 0"),
        (edit(end2end=True), "detect_head end2end: a one-to-one (end-to-end, NMS-free) head"),
        (edit(end2end="no"), "detect_head end2end: expected a bool, got str"),
        (drop("reg_max"), "detect_head: expected the keys"),
        (edit(decode="os.system"), "detect_head: expected the keys"),
    ]


@pytest.mark.parametrize("edit,fragment", _hostile_heads())
def test_hostile_head_records_are_refused_by_field(tiny, tmp_path, edit, fragment):
    rec = torch.load(tiny.path, weights_only=True)
    edit(rec["detect_head"])
    torch.save(rec, tmp_path / "bad.q2k")
    expect_load_refused(tmp_path / "bad.q2k", fragment)


def test_a_head_that_is_not_a_record_is_refused(tiny, tmp_path):
    rec = torch.load(tiny.path, weights_only=True)
    rec["detect_head"] = ["nc", 3]
    torch.save(rec, tmp_path / "bad.q2k")
    expect_load_refused(tmp_path / "bad.q2k", "detect_head: expected a dict, got list")


def test_a_head_built_in_code_is_checked_the_same_way():
    with pytest.raises(ValueError, match=r"detect_head names: expected one name per class \(nc=2\), got 1"):
        DetectHead(nc=2, reg_max=16, strides=(8,), names=("a",), imgsz=(64, 64))
    with pytest.raises(TypeError, match="detect_head reg_max: expected an int, got NoneType"):
        DetectHead(nc=1, reg_max=None, strides=(8,), names=("a",), imgsz=(64, 64))


def test_a_head_that_disagrees_with_the_model_fails_naming_it(tiny, tmp_path):
    two = DetectHead(nc=2, reg_max=4, strides=(4, 8), names=("cat", "dog"), imgsz=(32, 32))
    save_int_model(tiny.int_model, tmp_path / "two.q2k", detect_head=two)
    detector = load_detector(tmp_path / "two.q2k")  # the file is valid; its maps have 19 channels, not 18
    with pytest.raises(ValueError, match=r"maps\[0\]: expected a float \(N, 18, H, W\) map"):
        detector.predict(np.zeros((8, 8, 3), np.uint8))


# The standalone loader, in a process of its own.
STANDALONE = """
import json, sys
from q2kernels.deploy.detector import load_detector
found = load_detector(sys.argv[1]).predict(sys.argv[2], conf=0.0, max_det=20)[0]
found.save(sys.argv[3])
training = sorted(m for m in sys.modules if m.split(".")[0] in ("ultralytics", "torchvision", "triton")
                  or m == "q2kernels.nn" or m.startswith(("q2kernels.nn.", "q2kernels.functional")))
print(json.dumps({"training": training, "boxes": found.boxes.tolist(), "labels": found.labels}))
"""


def test_the_file_predicts_without_ultralytics_or_training_code(tiny, tmp_path):
    image = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 90, 3), dtype=np.uint8)).save(image)
    drawn = tmp_path / "wide_boxes.jpg"
    r = subprocess.run([sys.executable, "-c", STANDALONE, str(tiny.path), str(image), str(drawn)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["training"] == []
    boxes = torch.tensor(out["boxes"])
    assert boxes.shape == (20, 4)  # conf 0: every cell is a candidate; max_det keeps 20
    assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= 90).all()
    assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= 40).all()
    assert set(out["labels"]) <= set(HEAD.names)
    with Image.open(drawn) as picture:
        assert picture.size == (90, 40)
    in_process = load_detector(tiny.path).predict(str(image), conf=0.0, max_det=20)[0]
    torch.testing.assert_close(in_process.boxes, boxes)


# The decode, the NMS and the letterbox, against numbers worked out by hand.
def test_decode_of_known_maps():
    head = DetectHead(nc=2, reg_max=4, strides=(4, 8), names=("a", "b"), imgsz=(8, 8))
    level4, level8 = torch.zeros(1, 18, 2, 2), torch.zeros(1, 18, 1, 1)
    for side, distance in enumerate((1, 2, 3, 0)):  # left, top, right, bottom of cell (x=0, y=1)
        level4[0, 4 * side + distance, 1, 0] = 60.0  # a softmax that is one-hot to fp32 precision
    level4[0, 16:, 1, 0] = torch.tensor([2.0, -1.0])
    boxes, scores = decode([level4, level8], head)
    # All-zero bins have the expectation (0 + 1 + 2 + 3) / 4 = 1.5 on every side; anchors are cell
    # centres, level by level and row-major: (0.5, 0.5), (1.5, 0.5), (0.5, 1.5), (1.5, 1.5) times 4,
    # then (0.5, 0.5) times 8.
    expected = torch.tensor([[[-4.0, -4, 8, 8], [0, -4, 12, 8], [(0.5 - 1) * 4, (1.5 - 2) * 4, (0.5 + 3) * 4, 1.5 * 4],
                              [0, 0, 12, 12], [-8, -8, 16, 16]]])
    torch.testing.assert_close(boxes, expected, rtol=0, atol=1e-5)
    sigmoid = [1 / (1 + math.exp(-z)) for z in (2.0, -1.0)]
    torch.testing.assert_close(scores, torch.tensor([[[0.5, 0.5], [0.5, 0.5], sigmoid, [0.5, 0.5], [0.5, 0.5]]]))

    direct = DetectHead(nc=1, reg_max=1, strides=(2,), names=("x",), imgsz=(2, 2))  # no DFL: the distances
    boxes, _ = decode([torch.tensor([0.5, 1.0, 1.5, 2.0, 0.0]).reshape(1, 5, 1, 1)], direct)
    torch.testing.assert_close(boxes, torch.tensor([[[0.0, -1.0, 4.0, 5.0]]]))

    with pytest.raises(ValueError, match="maps: expected 2 maps, one per stride of the detect_head, got 1 maps"):
        decode([level4], head)
    with pytest.raises(ValueError, match=r"maps\[1\]: expected a float \(N, 18, H, W\) map"):
        decode([level4, level8[:, :17]], head)


def _scored(*rows):
    """(box, class-0 score, class-1 score) rows -> boxes (1, A, 4), scores (1, A, 2)."""
    return (torch.tensor([[r[0] for r in rows]], dtype=torch.float32),
            torch.tensor([[r[1:] for r in rows]], dtype=torch.float32))


def test_nms_on_known_boxes():
    boxes, scores = _scored(((0, 0, 10, 10), 0.9, 0.1),
                            ((1, 1, 11, 11), 0.8, 0.1),    # IoU 81/119 = 0.68 with the first, same class
                            ((1, 1, 11, 11), 0.1, 0.85),   # the same box in the other class
                            ((20, 20, 30, 30), 0.25, 0.0),  # not above conf 0.25
                            ((50, 50, 60, 60), 0.0, 0.3))

    def kept(**kw):
        (b, s, c), = nms(boxes, scores, conf=0.25, **kw)
        return [(tuple(x), round(y, 4), z) for x, y, z in zip(b.tolist(), s.tolist(), c.tolist())]

    first, second = ((0, 0, 10, 10), 0.9, 0), ((1, 1, 11, 11), 0.8, 0)
    other, far = ((1, 1, 11, 11), 0.85, 1), ((50, 50, 60, 60), 0.3, 1)
    assert kept(iou=0.5) == [first, other, far]
    assert kept(iou=0.7) == [first, other, second, far]
    assert kept(iou=0.7, max_det=2) == [first, other]

    ties, tie_scores = _scored(((0, 0, 1, 1), 0.5, 0.0), ((5, 5, 6, 6), 0.5, 0.0), ((9, 9, 10, 10), 0.5, 0.0))
    (b, _, _), = nms(ties, tie_scores, conf=0.25)
    assert b[:, 0].tolist() == [0, 5, 9]  # equal scores keep their anchor order

    (b, s, c), = nms(boxes, scores, conf=0.95)
    assert b.shape == (0, 4) and s.shape == (0,) and c.shape == (0,) and c.dtype == torch.int64
    for kw, name in ((dict(conf=1.5), "conf"), (dict(iou=-0.1), "iou"), (dict(max_det=0), "max_det"),
                     (dict(conf=True), "conf")):
        with pytest.raises(ValueError, match=f"^{name}: expected"):
            nms(boxes, scores, **kw)


def test_letterbox_and_boxes_back_to_the_image():
    image = torch.full((50, 100, 3), 200, dtype=torch.uint8)  # h 50, w 100 into 32 x 32: scale 0.32
    boxed, where = letterbox(image, (32, 32))
    assert (where.resized, where.top, where.left) == ((16, 32), 8, 0)
    assert (boxed[:, :8] == 114).all() and (boxed[:, 8:24] == 200).all() and (boxed[:, 24:] == 114).all()
    in_input = torch.tensor([[0.0, 8, 32, 24], [8, 12, 16, 20], [-5, 0, 40, 30]])
    torch.testing.assert_close(where.to_image(in_input),
                               torch.tensor([[0.0, 0, 100, 50], [25, 12.5, 50, 37.5], [0, 0, 100, 50]]))

    boxed, where = letterbox(torch.zeros(33, 100, 3, dtype=torch.uint8), (32, 32))  # 11 rows, 21 to pad
    assert (where.resized, where.top) == ((11, 32), 10)
    assert (boxed[:, :10] == 114).all() and (boxed[:, 10:21] == 0).all() and (boxed[:, 21:] == 114).all()


def test_images_are_read_as_rgb(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "p.png")
    for source in (tmp_path / "p.png", str(tmp_path / "p.png"), Image.fromarray(pixels), pixels,
                   torch.from_numpy(pixels)):
        assert torch.equal(read_image(source), torch.from_numpy(pixels))
    for bad in (pixels.astype(np.float32), pixels[..., 0], "no image", torch.zeros(0, 4, 3, dtype=torch.uint8)):
        with pytest.raises((ValueError, FileNotFoundError)):
            read_image(bad)
    with pytest.raises(ValueError, match=r"image: expected .* got torch.float32 \(6, 9, 3\)"):
        read_image(torch.from_numpy(pixels).float())


# Against Ultralytics, on YOLO11n built from its YAML (no download).
IMGSZ = 64


@pytest.fixture(scope="module")
def yolo():
    pytest.importorskip("ultralytics", reason="ultralytics is not installed (the optional [ultralytics] extra)")
    from ultralytics.nn.tasks import DetectionModel

    from q2kernels.integrations.ultralytics import IntDetector
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = quantize_model(DetectionModel("yolo11n.yaml", verbose=False).eval(), "lsq", w_bits=4, a_bits=4)
    g = torch.Generator().manual_seed(0)
    settle(model, lambda: torch.rand(2, 3, IMGSZ, IMGSZ, generator=g))  # live layers, like a trained model's
    x = torch.rand(2, 3, IMGSZ, IMGSZ, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        int_model = convert_to_int(model, x)
    detector = IntDetector(int_model, model)
    return SimpleNamespace(model=model, int_model=int_model, detector=detector, head=detector.detect_head(IMGSZ),
                           x=x)


def test_the_head_is_read_from_detect(yolo):
    names = yolo.model.names
    assert yolo.head == DetectHead(nc=80, reg_max=16, strides=(8, 16, 32), names=tuple(names[i] for i in range(80)),
                                   imgsz=(IMGSZ, IMGSZ))


def test_decode_equals_ultralytics_detect(yolo):
    from ultralytics.utils.ops import xywh2xyxy
    with torch.no_grad():
        expected = yolo.detector(yolo.x)  # Detect._inference: (N, 4 + nc, anchors), xywh boxes
        boxes, scores = decode(yolo.int_model(yolo.x), yolo.head)
    torch.testing.assert_close(boxes, xywh2xyxy(expected[:, :4].transpose(1, 2)), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(scores, expected[:, 4:].transpose(1, 2), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("iou", [0.7, 0.3])
def test_nms_equals_ultralytics(yolo, iou):
    from ultralytics.utils.nms import non_max_suppression
    with torch.no_grad():
        predictions = yolo.detector(yolo.x)
        boxes, scores = decode(yolo.int_model(yolo.x), yolo.head)
    best = scores.amax(-1)
    conf = float(best.median())  # about half of the cells are candidates
    expected = non_max_suppression(predictions, conf, iou, max_det=300)
    for (b, s, c), e, candidates in zip(nms(boxes, scores, conf=conf, iou=iou), expected, (best > conf).sum(1)):
        assert 0 < len(s) < candidates  # detections, and some suppressed
        torch.testing.assert_close(b, e[:, :4], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(s, e[:, 4])
        assert torch.equal(c, e[:, 5].long())


def test_letterbox_matches_ultralytics():
    pytest.importorskip("ultralytics", reason="ultralytics is not installed (the optional [ultralytics] extra)")
    from ultralytics.data.augment import LetterBox
    rng = np.random.default_rng(2)
    for shape in ((45, 100, 3), (20, 30, 3), (64, 64, 3), (100, 7, 3)):  # down, up, as is, thin
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        expected = torch.from_numpy(LetterBox((IMGSZ, IMGSZ), auto=False)(image=image.copy()))
        got, _ = letterbox(torch.from_numpy(image), (IMGSZ, IMGSZ))
        # OpenCV interpolates uint8 in fixed point: a pixel may differ from the fp32 bilinear by 1 (a
        # misplaced row or column would put random pixels against the padding's 114).
        assert (got.permute(1, 2, 0).int() - expected.int()).abs().max() <= 1, shape


def test_saved_file_predicts_in_image_pixels_as_ultralytics_does(yolo, tmp_path):
    from ultralytics.data.augment import LetterBox
    from ultralytics.utils.nms import non_max_suppression
    from ultralytics.utils.ops import scale_boxes
    path = tmp_path / "yolo11n_w4a4.q2k"
    yolo.detector.save(path, imgsz=IMGSZ)
    loaded = load_int_model(path)
    assert loaded.detect_head == yolo.head
    for a, b in zip(loaded(yolo.x), yolo.int_model(yolo.x)):
        assert torch.equal(a, b)

    # A wide image (128 x 64) of 8-pixel blocks, which the letterbox halves into 64 x 32 with 16 rows of
    # padding above and below: every resized pixel is a block's colour, so OpenCV's resize and the
    # loader's agree exactly and both pipelines see the same input.
    blocks = np.random.default_rng(3).integers(0, 256, (8, 16, 3), dtype=np.uint8)
    image = blocks.repeat(8, 0).repeat(8, 1)
    Image.fromarray(image).save(tmp_path / "wide.png")
    bgr = LetterBox((IMGSZ, IMGSZ), auto=False)(image=image[..., ::-1].copy())  # Ultralytics' predictor reads BGR
    x = torch.from_numpy(bgr[..., ::-1].copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        predictions = yolo.detector(x)
    conf = float(predictions[:, 4:].amax(1).median())
    expected = non_max_suppression(predictions, conf, 0.7, max_det=300)[0]
    expected[:, :4] = scale_boxes((IMGSZ, IMGSZ), expected[:, :4], image.shape[:2])

    found = load_detector(path).predict(tmp_path / "wide.png", conf=conf)[0]
    assert len(found) > 0
    torch.testing.assert_close(found.boxes, expected[:, :4], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(found.scores, expected[:, 4])
    assert torch.equal(found.classes, expected[:, 5].long())
    assert found.labels == [yolo.model.names[int(c)] for c in expected[:, 5]]
    found.save(tmp_path / "wide_boxes.jpg")
    with Image.open(tmp_path / "wide_boxes.jpg") as drawn:
        assert drawn.size == (128, 64)


def test_heads_without_a_file_decode_are_refused_by_name(yolo):
    from ultralytics.nn.tasks import DetectionModel, SegmentationModel

    from q2kernels.integrations.ultralytics import IntDetector
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        end2end = DetectionModel("yolo26n.yaml", verbose=False)
        segment = SegmentationModel("yolo11n-seg.yaml", verbose=False)
    assert IntDetector(yolo.int_model, end2end).detect_head(IMGSZ).reg_max == 1  # its one-to-many head decodes
    end2end.end2end = True  # its one-to-one head selected, as for Ultralytics' NMS-free prediction
    with pytest.raises(ValueError, match="model: its Detect is end2end"):
        IntDetector(yolo.int_model, end2end).detect_head(IMGSZ)
    with pytest.raises(ValueError, match="model: its head is Segment"):
        IntDetector(yolo.int_model, segment).detect_head(IMGSZ)
    with pytest.raises(ValueError, match="detect_head imgsz.0.: 100 is not a multiple of the largest stride 32"):
        yolo.detector.detect_head(100)
