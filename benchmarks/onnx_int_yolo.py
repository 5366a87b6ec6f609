"""The integer ONNX export on a trained detector (CPU): does onnxruntime reproduce the q2kernels integer
model bit for bit on real images, and how long does each take?

For a model file written with a detect head (the Ultralytics demo writes them: q2k demo --ultralytics,
int_models/*.q2k), exports it with deploy.export_onnx at the file's imgsz, runs every image of a folder
through both, letterboxed as load_detector does, and reports per model, over the images:
- integer_codes_bit_identical: every integer layer's codes equal, with the float layers' outputs that
  feed integer layers given to onnxruntime from q2kernels (the exactness the export promises);
- maps_bit_identical, detections_*: end to end, where the float layers (the stem conv, attention,
  the prediction convs) run in onnxruntime's own float kernels: the raw maps, the decoded detections
  after NMS (bit-identical; else the same count and classes, and the largest box corner difference);
- each runtime's time per image at the given thread count.
With --deterministic-float the model's float layers are first made deterministic
(deploy.deterministic_float): onnxruntime then computes them as q2kernels does, and the maps and
detections are expected bit-identical on every image.

    python benchmarks/onnx_int_yolo.py --models DIR/int_models/*.q2k --images DIR/dataset/images/val \
        [--deterministic-float]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from q2kernels.deploy import deterministic_float, export_onnx, load_int_model
from q2kernels.deploy.detect_decode import decode
from q2kernels.deploy.letterbox import letterbox, read_image
from q2kernels.deploy.nms import nms
from q2kernels.deploy.onnx_export import node_values, onnx_session, quantized_float_nodes
from q2kernels.ops import int_conv as ic


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def _codes_equal(report, values: dict, theirs: list, image: int) -> bool:
    """Every integer layer's codes of one image: onnxruntime's (the codes outputs) against q2kernels'."""
    for (node, offset, channels), got in zip(report.codes_nodes, theirs):
        packed = values[node][image:image + 1]
        ours = ic.unpack(packed, packed.shape[-1] * 2, True)[:, offset:offset + channels]
        got = torch.from_numpy(got[image:image + 1])
        if not torch.equal(ours if (got < 0).any() else ours % 16, got):
            return False
    return True


def _detections(ours, theirs, head) -> tuple[bool, bool, float]:
    """Per image: (bit-identical, the same boxes by count and class, the largest box corner difference in px)."""
    (b1, s1, c1), (b2, s2, c2) = ours, theirs
    if _bits_equal(b1, b2) and _bits_equal(s1, s2) and torch.equal(c1, c2):
        return True, True, 0.0
    same = b1.shape == b2.shape and torch.equal(c1, c2)
    return False, same, float((b1 - b2).abs().max()) if same and len(b1) else float("nan")


def measure(model_path: Path, images: list[Path], batch: int, threads: int, deterministic: bool) -> dict:
    model = load_int_model(model_path).eval()
    if deterministic:
        model = deterministic_float(model)
    head = model.detect_head
    x = torch.stack([letterbox(read_image(p), head.imgsz)[0] for p in images]).float() / 255
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        report = export_onnx(model, x[:1], Path(tmp) / "model.onnx", check=False)
        export_s = time.perf_counter() - t
        # The same graph with every integer layer's codes as outputs and the float layers' outputs that
        # feed integer layers given as inputs: whether the integer layers alone are exact on real images.
        forced = tuple(quantized_float_nodes(model))
        checked = export_onnx(model, x[:1], Path(tmp) / "codes.onnx", check=False, codes_outputs=True, forced=forced)
        session, codes_session = onnx_session(report.path, threads), onnx_session(checked.path, threads)
        maps_equal = codes_equal = 0
        detections = []
        ours_s = theirs_s = 0.0
        for i in range(0, len(x), batch):
            xb = x[i:i + batch]
            t = time.perf_counter()
            with torch.no_grad():
                ours = model(xb)
            ours_s += time.perf_counter() - t
            t = time.perf_counter()
            theirs = [torch.from_numpy(o) for o in session.run(None, {session.get_inputs()[0].name: xb.numpy()})]
            theirs_s += time.perf_counter() - t
            maps_equal += sum(all(_bits_equal(a[j], b[j]) for a, b in zip(ours, theirs)) for j in range(len(xb)))
            detections += [_detections(o, t_, head) for o, t_ in zip(nms(*decode(ours, head)), nms(*decode(theirs, head)))]
            values = node_values(model, xb)
            names = [n.name for n in codes_session.get_inputs()]
            feed = {names[0]: xb.numpy(), **{n: values[f].float().numpy() for n, f in zip(names[1:], checked.forced_inputs)}}
            codes = codes_session.run(None, feed)[len(ours):]
            codes_equal += sum(_codes_equal(checked, values, codes, j) for j in range(len(xb)))
    n = len(x)
    corners = [d for _, same, d in detections if same and d == d]
    return {"model": model_path.name, "deterministic_float": deterministic, "imgsz": list(head.imgsz), "images": n, "integer_layers": report.integer_layers,
            "float_layers": len(report.float_layers), "integer_codes_bit_identical": f"{codes_equal}/{n}",
            "maps_bit_identical": f"{maps_equal}/{n}",
            "detections_bit_identical": f"{sum(d[0] for d in detections)}/{n}",
            "detections_same_count_and_classes": f"{sum(d[1] for d in detections)}/{n}",
            "largest_box_difference_px": round(max(corners), 4) if corners else 0.0,
            "export_s": round(export_s, 1), "q2kernels_ms_per_image": round(1000 * ours_s / n, 1),
            "onnxruntime_ms_per_image": round(1000 * theirs_s / n, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, nargs="+", required=True, help="integer model files with a detect head")
    ap.add_argument("--images", type=Path, required=True, help="a folder of images (png/jpg)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    ap.add_argument("--limit", type=int, default=0, help="at most this many images (0: all)")
    ap.add_argument("--deterministic-float", action="store_true",
                    help="first replace the float layers by deterministic ones (deploy.deterministic_float)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    images = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    images = images[:args.limit] if args.limit else images
    if not images:
        ap.error(f"--images: no png/jpg images in {args.images}")
    for path in args.models:
        print(json.dumps(measure(path, images, args.batch, args.threads, args.deterministic_float)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
