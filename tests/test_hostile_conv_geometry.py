"""The integer convs' valid-tap ranges under every conv geometry: padding wider than the kernel
reaches, dilation and stride past the image, 1x1 maps, grouped and depthwise convs.

An output whose every tap falls in the padding has an empty valid-tap range; csrc/epilogue.h
(valid_taps) once clamped only its upper end, so such an output read tap_sums past its end (ASan:
heap-buffer-overflow; a SIGSEGV at large padding), and the CUDA epilogue's byte-packed tap rectangle
overflowed at padding >= 256. Reachable by a plain convert: an LSQ+ 1x1 QConv2d with padding 3.

Every geometry of the corpus (tests/hostile_corpus/int_ops/conv_geometry.json) and of its property
seeds runs through the dense and the grouped op, on the CPU kernels and on the CUDA kernels' source
through the emulator of tests/test_int_conv_cuda.py (cuda_glue), against an independent float64
oracle of both integer sums the epilogue takes: I (the conv of the codes) and J (the weight levels
over the valid taps, the LSQ+ zero point's border term). The sanitizer step
(.ci/steps/sanitize.sh) runs this file under ASan and UBSan. The convert test checks the integer
model of such layers against the reference mode, code for code.
"""
import json
import random
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from q2kernels.deploy import convert_to_int, reference_forward
from q2kernels.deploy.reference_mode import integer_codes
from q2kernels.nn import LSQPlusQuantizer, LSQQuantizer, QConv2d
from q2kernels.ops import int_conv as ic

from deployable import settle

CORPUS = json.loads((Path(__file__).parent / "hostile_corpus" / "int_ops" / "conv_geometry.json").read_text())

# Activation and weight codes and the weight's integer level w_mul*k + w_add: LSQ+ (unsigned
# activations, signed weights) and the odd levels of N2UQ/DoReFa (unsigned weights, 2k - 15) on
# signed activations, so that w_add != 0 brings Sq in.
RECIPES = {
    "lsq_plus": dict(x_signed=False, w_signed=True, w_mul=1, w_add=0),
    "odd_levels": dict(x_signed=True, w_signed=False, w_mul=2, w_add=-15),
}


def _random_case(seed):
    """A geometry drawn from seed: small images (1x1 included), kernels up to 4x4, dilation and
    stride up to 3, padding from the least that is valid to 4 past the dilated kernel's extent."""
    rnd = random.Random(seed)
    groups = rnd.choice([1, 1, 2, 3])
    case = dict(name=f"seed{seed}", groups=groups, cin=groups * rnd.randint(1, 3), cout=groups * rnd.randint(1, 3),
                h=rnd.randint(1, 6), w=rnd.randint(1, 6), k=[rnd.randint(1, 4), rnd.randint(1, 4)],
                stride=[rnd.randint(1, 3), rnd.randint(1, 3)], dilation=[rnd.randint(1, 3), rnd.randint(1, 3)])
    extents = [d * (k - 1) for d, k in zip(case["dilation"], case["k"])]
    least = [max(0, (e - size) // 2 + 1) for e, size in zip(extents, (case["h"], case["w"]))]
    case["padding"] = [rnd.randint(lo, e + 4) for lo, e in zip(least, extents)]
    return case


CASES = CORPUS["cases"] + [_random_case(s) for s in CORPUS["property_seeds"]]


class Problem:
    """Codes of one case and recipe, packed for the ops, and the float64 oracle of I and J."""

    def __init__(self, case, recipe, seed=0):
        g = torch.Generator().manual_seed(seed)
        r = RECIPES[recipe]
        self.case, self.recipe = case, r
        lo, hi = (-8, 8) if r["x_signed"] else (0, 16)
        self.q = torch.randint(lo, hi, (2, case["cin"], case["h"], case["w"]), generator=g)
        lo, hi = (-8, 8) if r["w_signed"] else (0, 16)
        self.k = torch.randint(lo, hi, (case["cout"], case["cin"] // case["groups"], *case["k"]), generator=g)
        self.x, self.wp = ic.pack(self.q, 4, r["x_signed"]), ic.pack(self.k, 4, r["w_signed"])
        self.tap_sums = ic.weight_tap_sums(self.k)

    def oracle(self):
        """(I, J) in float64: the conv of the codes with the weight levels, and of an all-ones image
        (zero padded: 1 exactly on the valid taps) with them."""
        levels = (self.recipe["w_mul"] * self.k + self.recipe["w_add"]).double()
        conv = dict(stride=self.case["stride"], padding=self.case["padding"], dilation=self.case["dilation"],
                    groups=self.case["groups"])
        return F.conv2d(self.q.double(), levels, **conv), F.conv2d(torch.ones_like(self.q.double()), levels, **conv)

    def args(self, epilogue):
        """Positional arguments of conv2d_grouped (schema order) for a float32 output."""
        c, r = self.case, self.recipe
        return [self.x, self.wp, epilogue, self.tap_sums, None, c["cin"], c["groups"], r["x_signed"], r["w_signed"],
                r["w_mul"], r["w_add"], c["stride"], c["padding"], c["dilation"], 0, 0, 15, torch.float32]


def _dense_args(grouped_args):
    """conv2d's arguments from conv2d_grouped's (the same, without groups)."""
    return grouped_args[:6] + grouped_args[7:]


class Runner:
    """The CPU kernels, or the CUDA kernels' source and glue on the emulator (cuda_glue)."""

    def __init__(self, cuda):
        from test_hostile_int_ops import Runner as OpRunner

        self.call = OpRunner(cuda)

    def sums(self, problem, op):
        """(I, J) as the op computes them: its float output with alpha = 1, gamma = 0 (then I) and with
        alpha = 0, gamma = 1 (then J), each exact in fp32 at these sizes."""
        results = []
        for alpha, gamma in ((1.0, 0.0), (0.0, 1.0)):
            args = problem.args(ic.epilogue_params(problem.case["cout"], alpha, gamma=gamma))
            results.append(self.call(op, *(args if op == "conv2d_grouped" else _dense_args(args))))
        return results


@pytest.fixture(params=["cpu", "cuda_glue"], scope="module")
def runner(request):
    return Runner(request.param == "cuda_glue")


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_integer_sums_match_the_float64_oracle(runner, case, recipe):
    problem = Problem(case, recipe)
    expected = problem.oracle()
    ops = ["conv2d_grouped"] + (["conv2d"] if case["groups"] == 1 else [])
    for op in ops:
        for got, want, what in zip(runner.sums(problem, op), expected, ("I", "J")):
            assert got.shape == want.shape, f"{op}: {what} of shape {tuple(got.shape)}, expected {tuple(want.shape)}"
            bad = got.double() != want
            assert not bool(bad.any()), f"{op}: {what} differs at {int(bad.sum())} of {bad.numel()} outputs"


def test_the_corpus_reaches_past_the_kernel():
    """The corpus and the property seeds hold what the fix is about: outputs whose every tap is
    padding, padding past a byte, dilation > 1, stride > 1, 1x1 maps, grouped convs."""
    def all_padding_outputs(c):
        return any(o * s - p + d * (k - 1) < 0 or o * s - p >= size
                   for size, k, s, p, d in zip((c["h"], c["w"]), c["k"], c["stride"], c["padding"], c["dilation"])
                   for o in range((size + 2 * p - d * (k - 1) - 1) // s + 1))
    assert sum(all_padding_outputs(c) for c in CASES) >= 20
    assert any(max(c["padding"]) >= 256 for c in CASES)
    assert any(max(c["dilation"]) > 1 for c in CASES) and any(max(c["stride"]) > 1 for c in CASES)
    assert any(c["h"] == c["w"] == 1 for c in CASES) and any(c["groups"] > 1 for c in CASES)


class PaddedConvs(nn.Module):
    """The convert path of issue 23: an LSQ+ 1x1 QConv2d with padding 3, then a dilated depthwise
    QConv2d and a strided 1x1 one, each padded beyond its kernel's reach, then a float head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = QConv2d(8, 8, 1, padding=3, weight_quantizer=_weights(8), act_quantizer=LSQPlusQuantizer(4))
        self.a_act = nn.SiLU()
        self.b = QConv2d(8, 8, 3, padding=5, dilation=2, groups=8, weight_quantizer=_weights(8),
                         act_quantizer=LSQPlusQuantizer(4))
        self.b_act = nn.ReLU()
        self.c = QConv2d(8, 4, 1, stride=2, padding=4, weight_quantizer=_weights(4),
                         act_quantizer=LSQPlusQuantizer(4))
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.c(self.b_act(self.b(self.a_act(self.a(self.stem(x)))))))


def _weights(channels):
    return LSQQuantizer(4, "signed", axis=0, channels=channels)


def test_convert_of_convs_padded_beyond_their_kernels_matches_the_reference_mode():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = settle(PaddedConvs(), lambda: torch.randn(2, 3, 6, 6, generator=g))
    x = torch.randn(2, 3, 6, 6, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        int_model = convert_to_int(model, x)
    assert all(int_model.report[name].startswith("integer conv") for name in "abc"), int_model.report
    out, codes = integer_codes(int_model, x)
    ref_out, ref_codes = reference_forward(int_model, x)
    assert codes.keys() == ref_codes.keys() == {"a", "b", "c"}
    for name in codes:
        assert torch.equal(codes[name], ref_codes[name]), f"layer {name}: codes differ from the reference mode"
    assert torch.equal(out, ref_out)
    # Not vacuous: the layers see varied codes, and a's 3-pixel border (all taps padding) is there.
    assert all(len(c.unique()) > 2 for c in codes.values())
    with torch.no_grad():
        float_out = model(x)
    assert codes["b"].shape[-2:] == (12, 12) and out.shape == float_out.shape == (2, 2, 13, 13)
