"""The integer ONNX export on a trained detector (CPU): does onnxruntime reproduce the q2kernels integer
model bit for bit on real images, and how long does each take?

For a model file written with a detect head (the Ultralytics demo writes them: q2k demo --ultralytics,
int_models/*.q2k), exports it with deploy.export_onnx at the file's imgsz, runs every image of a folder
through both, letterboxed as load_detector does, and reports per model: the raw maps bitwise equal (all
images), the decoded detections (boxes, scores, classes after NMS) equal, and each runtime's time per
image at the given thread count.

    python benchmarks/onnx_int_yolo.py --models DIR/int_models/*.q2k --images DIR/dataset/images/val
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from q2kernels.deploy import export_onnx, load_int_model
from q2kernels.deploy.detect_decode import decode
from q2kernels.deploy.letterbox import letterbox, read_image
from q2kernels.deploy.nms import nms
from q2kernels.deploy.onnx_export import onnx_session


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def measure(model_path: Path, images: list[Path], batch: int, threads: int) -> dict:
    model = load_int_model(model_path).eval()
    head = model.detect_head
    x = torch.stack([letterbox(read_image(p), head.imgsz)[0] for p in images]).float() / 255
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        t = time.perf_counter()
        report = export_onnx(model, x[:1], onnx_path, check=False)
        export_s = time.perf_counter() - t
        session = onnx_session(onnx_path, threads)
        maps_equal = detections_equal = 0
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
            same = [all(_bits_equal(a[j], b[j]) for a, b in zip(ours, theirs)) for j in range(len(xb))]
            maps_equal += sum(same)
            for (b1, s1, c1), (b2, s2, c2) in zip(nms(*decode(ours, head)), nms(*decode(theirs, head))):
                detections_equal += int(_bits_equal(b1, b2) and _bits_equal(s1, s2) and torch.equal(c1, c2))
    n = len(x)
    return {"model": model_path.name, "imgsz": head.imgsz, "images": n, "integer_layers": report.integer_layers,
            "float_layers": len(report.float_layers), "maps_bit_identical": f"{maps_equal}/{n}",
            "detections_identical": f"{detections_equal}/{n}", "export_s": round(export_s, 1),
            "q2kernels_ms_per_image": round(1000 * ours_s / n, 1), "onnxruntime_ms_per_image": round(1000 * theirs_s / n, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, nargs="+", required=True, help="integer model files with a detect head")
    ap.add_argument("--images", type=Path, required=True, help="a folder of images (png/jpg)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    ap.add_argument("--limit", type=int, default=0, help="at most this many images (0: all)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    images = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    images = images[:args.limit] if args.limit else images
    if not images:
        ap.error(f"--images: no png/jpg images in {args.images}")
    for path in args.models:
        print(json.dumps(measure(path, images, args.batch, args.threads)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
