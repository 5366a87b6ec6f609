"""Deploy a QAT model as an integer W4A4 (or W3A3) model: calibrate the fusion nodes, convert,
save, load, and check the integer model against the fake-quant model it came from (verify_int_model).

    python python/deploy_int_model.py [--smoke] [--recipe lsq|lsq_plus|pact|n2uq] [--bits 4] [--out model.q2k]

The integer model moves 4-bit codes between layers; the LayerNorm and gates of the fusion node
are folded into the producers' epilogues, the BatchNorms into the convs' scales.
"""
import argparse
import copy
import tempfile
from pathlib import Path

import torch

from q2kernels.data import make_shapes
from q2kernels.deploy import (calibrate_fusion, convert_to_int, freeze_fusion, load_int_model, save_int_model,
                              verify_int_model)
from q2kernels.nn import GatedFusion, quantize_model

from qat_custom_model import TwoBranchNet, train


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--recipe", default="lsq")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--out", type=Path, default=None, help="where to save the integer model")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    data = make_shapes(128 if args.smoke else 512, 32, seed=0)

    model = quantize_model(TwoBranchNet(GatedFusion([32, 32], mode="balanced")), args.recipe, args.bits, args.bits)
    train(model, data, 20 if args.smoke else 200, 2e-3)
    model.eval()
    calibrate_fusion(model, [data[0][i:i + 32] for i in range(0, 128, 32)])

    int_model = convert_to_int(model, data[0][:1])
    print("converted:", {k: v for k, v in int_model.report.items()} if int_model.report else "every layer")
    out = args.out or Path(tempfile.mkdtemp()) / "model.q2k"
    save_int_model(int_model, out)
    loaded = load_int_model(out)
    print(f"saved and reloaded {out} ({out.stat().st_size / 1024:.1f} KiB)")

    x = make_shapes(16, 32, seed=1)[0]
    fake_quant = freeze_fusion(copy.deepcopy(model))   # LayerNorm -> its calibrated affine, as converted
    with torch.no_grad():
        reference = fake_quant(x)
        y_int, y_loaded = int_model(x), loaded(x)
    rel = ((y_int - reference).abs().max() / reference.abs().max()).item()
    print(f"integer vs fake-quant: max relative difference {rel:.2e}; "
          f"argmax agreement {(y_int.argmax(1) == reference.argmax(1)).float().mean().item():.4f}")
    assert torch.equal(y_int, y_loaded), "a reloaded model must compute the same bits"
    # The fake-quant model sums in fp32 in another order than the exact int32 accumulator, so a code
    # can flip where a value lies within fp32 rounding of a decision boundary: the check that holds on
    # any model is that the integer model equals the reference mode bit for bit and that every code
    # differing from the fake-quant model's is such a flip.
    check = verify_int_model(fake_quant, int_model, x)
    print(f"integer == reference mode at every layer: {check.exact}; codes differing from the fake-quant "
          f"model: {check.differing_fraction:.2e}, all within fp32 rounding of a boundary: {check.ok}")
    assert check.ok, "\n".join(check.failures())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
