"""Does Q2 pay off on a YOLO detector deployed as an integer model? Offline, on a generated task.

The steps (q2kernels/integrations/ultralytics/demo.py, also `q2k demo --ultralytics`): a float
YOLO11n trained once on a generated shapes task (reused by a re-run with the same --out); per
quantizer recipe four QAT runs from it of equal length (plain, Q-ADA only, gated fusion only, Q2),
the fusion runs' last epochs without LayerNorm; each run's checkpoint converted to an integer model,
verified and validated with Ultralytics' validator; the table (results.json, results.md), the
gradient-balance diagnostic (diagnostics.png) and a prediction drawn by the integer model.

    python ultralytics_qat.py --smoke                       # about a minute on a CPU
    python ultralytics_qat.py                               # the full demo (benchmarks/NOTES.md: its time)
    python ultralytics_qat.py --recipes lsq pact --bits 3
"""
import argparse

from q2kernels.integrations import ultralytics_offline

ultralytics_offline()  # before Ultralytics is imported: it reads these settings then
from q2kernels.integrations.ultralytics import demo  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", choices=["lsq", "lsq_plus", "pact", "n2uq"], default=None,
                    help="quantizer recipes, one table each (default lsq)")
    ap.add_argument("--variants", nargs="+", choices=list(demo.VARIANTS), default=None,
                    help="which runs per recipe (default all; q2_layernorm keeps the LayerNorm to the end: the "
                         "reference its removal is measured against)")
    ap.add_argument("--bits", type=int, default=None, help="weight and activation bits (default 4)")
    ap.add_argument("--out", default="q2k_yolo_out", help="folder for the dataset, the float model, the runs and "
                                                        "the results (a re-run reuses its float model)")
    ap.add_argument("--smoke", action="store_true", help="tiny run: 64 px, 8 images, 1 float + 2 QAT epochs")
    args = ap.parse_args()
    overrides = {k: tuple(v) if isinstance(v, list) else v
                 for k, v in dict(recipes=args.recipes, variants=args.variants, bits=args.bits).items() if v is not None}
    demo.run(out=args.out, smoke=args.smoke, **overrides)


if __name__ == "__main__":
    main()
