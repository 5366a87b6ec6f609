"""The CPU fast path of the integer conv (q2kernels.ops.int_conv.conv2d_fast_cpu, csrc/fast_conv_cpu.cpp),
which IntConv2d takes on CPU tensors where its layer's bound proves the float32 sums exact.

Oracles, bit for bit (packed codes and float heads alike): the int32 path of the same module
(ops.int_conv.use_fast_cpu(False): csrc/int_conv_cpu.cpp, csrc/grouped_conv.h) and the reference mode
(deploy.reference_mode: float64 sums, the epilogue emulated in PyTorch). On every layer shape of YOLOv5s
and YOLO11s (benchmarks/data, spatial size shrunk), for every quantizer layout (signed / unsigned codes,
the odd levels of N2UQ and DoReFa, zero points), 3 and 4 bits, random codes and the extremes, and on
both sides of the bound (docs/integer-format.md, "The CPU fast path"), where each test asserts which
path ran. Also: that oneDNN runs its direct algorithm (never Winograd), the ops' checks and fakes, and
(the last section) the vectorised epilogue against the int32 path on adversarial epilogue values.
"""
import copy
import json
from pathlib import Path

import pytest
import torch

from q2kernels.deploy import reference_mode
from q2kernels.deploy.int_modules import HEAD_CODES, HEAD_FLOAT, IntConv2d
from q2kernels.ops import int_conv as ic

DATA = Path(__file__).resolve().parent.parent / "benchmarks" / "data"

# w_mul, w_add (of b-bit odd levels), signed weight codes, signed activations, zero point, act, thresholds
RECIPES = {
    "lsq": (1, 0, True, False, False, "silu", False),
    "lsq_signed_x": (1, 0, True, True, False, "identity", False),
    "lsq_plus": (1, 0, True, True, True, "silu", False),
    "dorefa": (2, None, False, False, False, "relu", False),
    "n2uq": (2, None, False, False, False, "silu", True),
    "odd_zero_point": (2, None, False, True, True, "silu", False),
}


def _code_range(signed: bool, bits: int) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def _module(cin, cout, k, stride=1, padding=0, dilation=1, groups=1, recipe="lsq", bits=4, seed=0,
            fill=None, alpha=None):
    """(IntConv2d with a codes head and a float head, its random b-bit weight codes). fill: every weight
    code that value (the extremes); alpha: the float head's scale (1.0 shows I itself)."""
    g = torch.Generator().manual_seed(seed)
    w_mul, w_add, w_signed, x_signed, zero_point, act, use_thr = RECIPES[recipe]
    w_add = -(2**bits - 1) if w_add is None else w_add
    lo, hi = _code_range(w_signed, bits)
    kh, kw = (k, k) if isinstance(k, int) else k
    codes = (torch.full((cout, cin // groups, kh, kw), fill) if fill is not None
             else torch.randint(lo, hi + 1, (cout, cin // groups, kh, kw), generator=g))
    levels = (w_mul * codes + w_add).double()
    # Scales that spread the output codes over their range: pre-activations of a few units.
    scale = 2.0 / (levels.abs().sum(dim=(1, 2, 3)) * (4 if x_signed else 7) / (cin // groups) ** 0.5 + 1)
    aq_lo, aq_hi = _code_range(x_signed, bits)
    ep_codes = ic.epilogue_params(cout, alpha=scale, gamma=scale * 0.3 if zero_point else 0.0,
                                  bias=torch.randn(cout, generator=g, dtype=torch.float64) * 0.5,
                                  aff_mul=1.0 + 0.1 * torch.rand(cout, generator=g, dtype=torch.float64),
                                  aff_add=0.05, q_mul=(aq_hi - aq_lo) / 4.0, q_off=-0.1)
    ep_float = ic.epilogue_params(cout, alpha=scale if alpha is None else alpha,
                                  gamma=scale * 0.3 if zero_point else 0.0, bias=0.25)
    nthr = aq_hi - aq_lo if use_thr else 0
    thresholds = torch.zeros(2, 15)
    thresholds[0, :nthr] = torch.linspace(-1.0, 3.0, max(nthr, 1))[:nthr]
    heads = [{"kind": HEAD_CODES, "qn": aq_lo, "qp": aq_hi, "nthr": nthr, "signed": x_signed},
             {"kind": HEAD_FLOAT, "qn": 0, "qp": 15, "nthr": 0, "signed": False}]
    m = IntConv2d(cin, cout, (kh, kw), _pair(stride), _pair(padding), _pair(dilation), x_signed, w_signed, w_mul,
                  w_add, act, heads, ic.pack(codes, 4, w_signed), torch.stack([ep_codes, ep_float]), thresholds,
                  tap_sums=ic.weight_tap_sums(codes) if zero_point else None, groups=groups)
    return m, codes


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _input(m, n, h, w, bits, seed=1, fill=None):
    lo, hi = _code_range(m.x_signed, bits)
    g = torch.Generator().manual_seed(seed)
    q = torch.full((n, m.in_channels, h, w), fill) if fill is not None else \
        torch.randint(lo, hi + 1, (n, m.in_channels, h, w), generator=g)
    return ic.pack(q, 4, m.x_signed)


class _Spy:
    """Counts the calls of conv2d_fast_cpu (IntConv2d looks it up on the module at each call)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = ic.conv2d_fast_cpu

        def spy(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(ic, "conv2d_fast_cpu", spy)


def _check_all_paths(m, x, spy, expect_fast):
    """Every head of m on x by the module (whichever path it takes), by the int32 kernels and by the
    reference mode: equal bit for bit; and whether the fast path ran is as expected."""
    for head in range(len(m.heads)):
        before = spy.calls
        got = m(x, head)
        assert (spy.calls > before) == expect_fast, f"fast path ran: {spy.calls > before}, expected {expect_fast}"
        with ic.use_fast_cpu(False):
            old = m(x, head)
        assert spy.calls == before + expect_fast
        ref = reference_mode._reference_conv(m, x, head)
        assert got.dtype == old.dtype == ref.dtype and got.shape == old.shape == ref.shape
        if got.dtype == torch.uint8:
            assert torch.equal(got, old), f"head {head}: codes differ from the int32 path"
            assert torch.equal(got, ref), f"head {head}: codes differ from the reference mode"
        else:
            assert torch.equal(got.view(torch.int32), old.view(torch.int32)), f"head {head}: floats differ (int32)"
            assert torch.equal(got.contiguous().view(torch.int32), ref.contiguous().view(torch.int32)), \
                f"head {head}: floats differ from the reference mode"
            assert got.stride() == old.stride()


def _shapes(model):
    convs = json.loads((DATA / f"{model}_convs_640.json").read_text())["convs"]
    seen = {}
    for c in convs:
        key = (c["cin"], c["cout"], c["k"], c["stride"], c["pad"], c["groups"])
        seen.setdefault(key, c["name"])
    return [pytest.param(*key, id=f"{model}-{name}") for key, name in seen.items()]


LAYERS = _shapes("yolov5s") + _shapes("yolo11s")


@pytest.mark.parametrize("cin,cout,k,stride,pad,groups", LAYERS)
def test_yolo_layer_shapes(cin, cout, k, stride, pad, groups, monkeypatch):
    """Every distinct conv of YOLOv5s and YOLO11s at a shrunk spatial size (odd, so that strided convs
    have a partial last window and borders on every side), through a recipe and bit width chosen from
    the shape, so that each kind of layer meets several quantizer layouts."""
    spy = _Spy(monkeypatch)
    names = sorted(RECIPES)
    seed = cin * 7 + cout * 3 + k * 5 + stride + groups
    recipe, bits = names[seed % len(names)], 4 if seed % 3 else 3
    m, _ = _module(cin, cout, k, stride, pad, 1, groups, recipe, bits, seed=seed)
    assert m.fast_cpu  # every YOLO layer is within the bound, by a factor of hundreds
    _check_all_paths(m, _input(m, 2, 9, 7, bits, seed=seed + 1), spy, expect_fast=True)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("extreme", ["max", "min", "random"])
@pytest.mark.parametrize("geom", [
    (64, 48, 3, 1, 1, 1, 1),           # cin, cout, k, stride, padding, dilation, groups
    (33, 17, 3, 2, 1, 1, 1),           # odd channel counts, stride 2
    (40, 40, 3, 1, 2, 2, 40),          # depthwise, dilated
    (48, 24, (5, 3), (2, 1), (2, 3), (1, 2), 6),  # grouped, rectangular, padding wider than reach
    (16, 8, 1, 1, 0, 1, 1),
])
def test_extremes(recipe, bits, extreme, geom, monkeypatch):
    """All codes at the largest magnitude of their range (the bound's worst case), at the other end,
    and random ones, in every quantizer layout."""
    spy = _Spy(monkeypatch)
    cin, cout, k, stride, pad, dil, groups = geom
    w_mul, w_add, w_signed, x_signed, *_ = RECIPES[recipe]
    wlo, whi = _code_range(w_signed, bits)
    xlo, xhi = _code_range(x_signed, bits)
    pick = {"max": (wlo if w_signed else whi, xlo if x_signed else xhi), "min": (whi if w_signed else wlo, xhi),
            "random": (None, None)}[extreme]
    m, _ = _module(cin, cout, k, stride, pad, dil, groups, recipe, bits, seed=3, fill=pick[0])
    _check_all_paths(m, _input(m, 2, 8, 11, bits, fill=pick[1]), spy, expect_fast=True)


# The bound's edge: fp32_bound = K*(|w_mul|*max|k| + |w_add|)*max|q| against 2^24, with the container
# magnitudes (8 signed, 15 unsigned). (recipe, kernel, cin, bound) just at or below 2^24, then just above.
EDGE = [
    ("lsq_signed_x", (4, 4), 16384, 64 * 262144),       # = 2^24 exactly: still exact, fast
    ("lsq_signed_x", (1, 5), 52429, 64 * 262145),       # 2^24 + 64
    ("dorefa", (3, 5), 1657, 675 * 24855),              # 16777125: 15*(2*15 + 15) per term
    ("dorefa", (2, 4), 3107, 675 * 24856),              # 16777800
    ("lsq", (2, 5), 13981, 120 * 139810),               # 16777200: signed weights, unsigned activations
    ("lsq", (1, 7), 19973, 120 * 139811),               # 16777320
]


@pytest.mark.parametrize("recipe,kernel,cin,bound", EDGE, ids=[f"{r}-{c}" for r, _, c, _ in EDGE])
@pytest.mark.parametrize("extreme", ["max", "random"])
def test_bound_edge(recipe, kernel, cin, bound, extreme, monkeypatch):
    """Just below (or at) the bound the fast path runs and is exact even when every product takes its
    largest magnitude; just above it the int32 path runs (asserted), and is exact."""
    w_mul, w_add, w_signed, x_signed, *_ = RECIPES[recipe]
    w_add = -15 if w_add is None else w_add
    assert ic.fp32_bound(kernel, cin, x_signed, w_signed, w_mul, w_add) == bound
    fast = bound <= 2**24
    spy = _Spy(monkeypatch)
    wfill, xfill = ((-8 if w_signed else 15), (-8 if x_signed else 15)) if extreme == "max" else (None, None)
    m, _ = _module(cin, 2, kernel, recipe=recipe, seed=5, fill=wfill, alpha=1.0)
    assert m.fast_cpu == fast
    x = _input(m, 1, kernel[0] + 1, kernel[1] + 1, 4, fill=xfill)
    _check_all_paths(m, x, spy, expect_fast=fast)
    if extreme == "max" and recipe == "lsq_signed_x":
        # The float head shows I itself (alpha 1, identity, bias 0.25, which rounds away at 2^24): every
        # output is a full window of products (-8)*(-8), I = the bound, the largest sum the bound allows.
        z = m(x, 1)
        assert torch.all(z == float(bound)), z.flatten()[:4]


def test_fast_path_refuses_a_conv_beyond_the_bound():
    """conv2d_fast_cpu itself refuses a conv the bound does not cover, rather than return a sum that
    float32 may have rounded: past 2^24 it can (2^24 + 49, an odd sum of products 64 and 49, is not a
    float32), so the dispatch must not send such a layer there."""
    assert float(torch.tensor(2**24 + 49, dtype=torch.float32)) != 2**24 + 49
    levels = torch.ones(2, 19973, 1, 7).contiguous(memory_format=torch.channels_last)
    x = ic.pack(torch.zeros(1, 19973, 1, 7, dtype=torch.int64), 4, False)
    with pytest.raises(ValueError, match="not proven exact"):
        ic.conv2d_fast_cpu(x, levels, ic.epilogue_params(2, 1.0), 19973, x_signed=False, w_signed=True)


def test_onednn_runs_direct_convolution(capfd):
    """The fast path's conv is oneDNN's direct algorithm: its verbose log names the algorithm of every
    convolution it runs (alg:convolution_direct); Winograd would be alg:convolution_winograd."""
    m, _ = _module(32, 32, 3, 1, 1, recipe="lsq")
    x = _input(m, 1, 16, 16, 4)
    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
        m(x, 0)
    log = capfd.readouterr().out
    convs = [line for line in log.splitlines() if "convolution" in line and "exec" in line]
    assert convs, log[-2000:]
    assert all("alg:convolution_direct" in line for line in convs), convs
    assert not any("wino" in line for line in convs), convs


def test_weight_levels_follow_the_weight(monkeypatch):
    """The cached float levels are rebuilt when the packed weight changes (in place or replaced)."""
    spy = _Spy(monkeypatch)
    m, codes = _module(16, 8, 3, 1, 1, recipe="lsq")
    x = _input(m, 1, 6, 6, 4)
    m(x, 0)
    m.weight.copy_(ic.pack(-codes.clamp(-7, 7), 4, True))
    _check_all_paths(m, x, spy, expect_fast=True)
    m.weight = ic.pack(codes.flip(0), 4, True)
    _check_all_paths(m, x, spy, expect_fast=True)


def test_shared_output_offsets(monkeypatch):
    """Heads writing into a shared packed tensor at channel offsets (a concat), an odd writer first: the
    fast path leaves the other writer's nibbles as the int32 path does."""
    spy = _Spy(monkeypatch)
    m, _ = _module(24, 7, 3, 1, 1, recipe="lsq_plus")
    x = _input(m, 2, 5, 6, 4)
    outs = []
    for fast in (True, False):
        with ic.use_fast_cpu(fast):
            out = torch.full((2, 5, 6, ic.packed_bytes(32)), 0xA5, dtype=torch.uint8)
            m(x, 0, out=out, c_offset=8)
            f = torch.full((2, 20, 5, 6), -1.0).contiguous(memory_format=torch.channels_last)
            m(x, 1, out=f, c_offset=5)
            outs.append((out, f))
    assert spy.calls == 2
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1].view(torch.int32), outs[1][1].view(torch.int32))


def test_meta_and_disabled_paths_use_the_int32_ops(monkeypatch):
    spy = _Spy(monkeypatch)
    m, _ = _module(16, 8, 3, 1, 1, recipe="lsq")
    x = _input(m, 1, 6, 6, 4)
    copy.deepcopy(m).to("meta")(x.to("meta"), 0)
    with ic.use_fast_cpu(False):
        m(x, 0)
    assert spy.calls == 0
    m(x, 0)
    assert spy.calls == 1


@pytest.mark.parametrize("channels", [1, 7, 8, 9, 37, 64])  # 8 at a time (AVX2) and the rest pair by pair
def test_unpack_float_values(channels):
    for signed in (True, False):
        lo, hi = _code_range(signed, 4)
        q = torch.randint(lo, hi + 1, (2, channels, 3, 5))
        for w_mul, w_add in ((1, 0), (2, -15), (-3, 7)):
            got = ic.unpack_float(ic.pack(q, 4, signed), channels, signed, w_mul, w_add)
            assert got.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(got, (w_mul * q + w_add).float())


def test_op_checks():
    m, codes = _module(16, 8, 3, 1, 1, recipe="lsq_plus")
    x = _input(m, 1, 6, 6, 4)
    with pytest.raises(ValueError, match="w_mul, w_add"):
        ic.unpack_float(x, 16, True, 40, 0)
    sums = torch.zeros(1, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    args = dict(in_size=[6, 6], kernel_size=[3, 3], in_channels=16, x_signed=True, w_signed=True, w_mul=1, w_add=0,
                stride=[1, 1], padding=[1, 1], dilation=[1, 1], act=0, qn=-8, qp=7)
    ep = m.epilogues[0]
    ops = torch.ops.q2kernels_int
    ops.conv2d_epilogue(sums, ep, m.tap_sums, None, *args.values(), torch.uint8)
    with pytest.raises(ValueError, match="H_out, W_out"):
        ops.conv2d_epilogue(sums, ep, m.tap_sums, None, *{**args, "in_size": [7, 6]}.values(), torch.uint8)
    with pytest.raises(ValueError, match="channels_last"):
        ops.conv2d_epilogue(sums.contiguous(), ep, m.tap_sums, None, *args.values(), torch.uint8)
    with pytest.raises(ValueError, match="tap_sums"):
        ops.conv2d_epilogue(sums, ep, m.tap_sums[:, :3], None, *args.values(), torch.uint8)
    with pytest.raises(ValueError, match="epilogue"):
        ops.conv2d_epilogue(sums, ep[:, :4], None, None, *args.values(), torch.uint8)
    with pytest.raises(ValueError, match="sums"):  # out is the sums it reads
        ops.conv2d_epilogue_out(sums, ep, None, None, *args.values(), 0, sums)


def test_opcheck():
    m, _ = _module(16, 8, 3, 1, 1, recipe="lsq_plus")
    x = _input(m, 1, 6, 6, 4)
    ic.load()
    ops = torch.ops.q2kernels_int
    torch.library.opcheck(ops.unpack_float.default, (x, 16, True, 1, 0))
    sums = ic.unpack_float(x, 16, True)[:, :8].contiguous(memory_format=torch.channels_last)
    args = (sums, m.epilogues[0], m.tap_sums, None, [6, 6], [3, 3], 16, True, True, 1, 0, [1, 1], [1, 1], [1, 1], 2,
            -8, 7)
    torch.library.opcheck(ops.conv2d_epilogue.default, (*args, torch.uint8))
    torch.library.opcheck(ops.conv2d_epilogue.default, (*args, torch.float32))
    out = torch.zeros(1, 6, 6, 16, dtype=torch.uint8)
    torch.library.opcheck(ops.conv2d_epilogue_out.default, (*args, 0, out))


# ---------------------------------------------------------------------------------------------------
# The epilogue on adversarial values. Where the CPU has AVX2 and FMA, conv2d_epilogue runs 8 output
# channels at a time (csrc/epilogue_simd.h), with the same IEEE operations as epilogue.h's scalar code;
# these tests hold it to the int32 path (ops.int_conv.conv2d, with the fast path off) bit for bit where
# that is easiest to get wrong: SiLU's exp at its cut-offs (x < -87 -> 0, x > 88.72 -> inf, and k = 128,
# where 2^k is no float), round-half-even ties and the clamp bounds, threshold counts, non-finite
# epilogue rows, J at borders, and channel counts that leave a ragged last group of lanes.

INF, NAN = float("inf"), float("nan")
# Channel counts: a ragged last group of 1, 3, 7 lanes, one lane past a group, 4 groups and a lane.
RAGGED = [1, 3, 7, 9, 33]
OUT_KINDS = {"codes": torch.uint8, "fp32": torch.float32, "fp16": torch.float16}


def _bits(t):
    """Codes as they are; floats as their bit patterns (so that NaNs and signed zeros compare)."""
    if t.dtype == torch.uint8:
        return t
    return t.contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def _fast_and_int32(x, codes, ep, cin, *, x_signed, w_signed=True, w_mul=1, w_add=0, out=None, **kw):
    """The conv by the fast path (oneDNN sums, conv2d_epilogue) and by the int32 path (ops.int_conv.conv2d
    with the fast path off), each into its own copy of `out` where given."""
    weight = ic.pack(codes, 4, w_signed)
    levels = ic.unpack_float(weight, cin, w_signed, w_mul, w_add)
    args = dict(x_signed=x_signed, w_signed=w_signed, w_mul=w_mul, w_add=w_add, **kw)
    fast = ic.conv2d_fast_cpu(x, levels, ep, cin, out=None if out is None else out.clone(), **args)
    with ic.use_fast_cpu(False):
        slow = ic.conv2d(x, weight, ep, cin, out=None if out is None else out.clone(), **args)
    return fast, slow


def _assert_bit_identical(fast, slow):
    assert fast.dtype == slow.dtype and fast.shape == slow.shape and fast.stride() == slow.stride()
    same = _bits(fast) == _bits(slow)
    assert bool(same.all()), f"{int((~same).sum())} of {same.numel()} outputs differ, first at " \
                             f"{tuple(int(i) for i in (~same).nonzero()[0])}"


def _sweep_conv(cout, batch=2):
    """A 1x1 conv whose sum is I = q0 - 8*q1 over signed codes q0, q1: the 16x16 map holds every pair,
    so each output channel sees every integer I in [-64, 71] (the second image in another order)."""
    q = torch.stack(torch.meshgrid(torch.arange(-8, 8), torch.arange(-8, 8), indexing="ij"))  # (2, 16, 16)
    q = torch.stack([q, q.flip(1).transpose(1, 2)][:batch])
    codes = torch.tensor([1, -8]).reshape(1, 2, 1, 1).expand(cout, 2, 1, 1).contiguous()
    return ic.pack(q, 4, True), codes


def _per_channel(cout, values):
    """values[c % len(values)] for each channel c."""
    return torch.tensor([values[c % len(values)] for c in range(cout)], dtype=torch.float64)


# SiLU's arguments y = alpha*I + bias, centred per channel on the edges of exp_det(x), x = -y: y = 87
# (x < -87 gives 0), y = -88.72 (x > 88.72 gives inf), y = -88.5 (k = 128: the two-step scaling),
# y = -88.376 and 86.99 (k changes between 127 and 128, -125 and -126), y = -17 (1 + e^x starts to round
# to e^x), and -87, 88.72, 0, 30 as ordinary arguments; alpha = 2^-17 steps through every float around
# the larger centres (their ulp), the coarser steps through their neighbourhood.
SILU_CENTRES = [87.0, -88.72, -88.5, -88.376, 86.99, -17.0, -87.0, 88.72, 0.0, 30.0]
SILU_STEPS = [2.0**-17, 2.0**-12, 2.0**-6]


@pytest.mark.parametrize("cout", RAGGED)
@pytest.mark.parametrize("out", sorted(OUT_KINDS))
def test_epilogue_silu_edges(cout, out):
    x, codes = _sweep_conv(cout)
    combos = [(a, b) for b in SILU_CENTRES for a in SILU_STEPS]
    start = {1: 0, 3: 3, 7: 9, 9: 16, 33: 0}[cout]  # the small counts see different centres
    alpha = _per_channel(cout, [a for a, _ in combos[start:] + combos[:start]])
    bias = _per_channel(cout, [b for _, b in combos[start:] + combos[:start]])
    ep = ic.epilogue_params(cout, alpha=alpha, bias=bias, aff_mul=_per_channel(cout, [1.0, -0.75, 3.0]),
                            aff_add=_per_channel(cout, [0.0, 0.5, 0.5]), q_mul=0.25, q_off=-1.0)
    fast, slow = _fast_and_int32(x, codes, ep, 2, x_signed=True, act="silu", qn=-8, qp=7,
                                 out_dtype=OUT_KINDS[out])
    _assert_bit_identical(fast, slow)
    if out == "fp32" and cout == 33:  # channel 3 (y ~ -88.72, z = y/(1 + e^-y)): both sides of exp's inf
        z = fast[:, 3]
        assert bool((z == 0).any()) and bool(((z < 0) & (z > -1e-30)).any())


def test_epilogue_silu_random_arguments():
    """SiLU over ~300k random pre-activations in about [-100, 100] (every k exp_det can take), float head,
    255 channels (a ragged last group of 7)."""
    g = torch.Generator().manual_seed(11)
    cout, cin = 255, 16
    codes = torch.randint(-8, 8, (cout, cin, 1, 1), generator=g)
    x = ic.pack(torch.randint(0, 16, (2, cin, 24, 24), generator=g), 4, False)
    ep = ic.epilogue_params(cout, alpha=torch.rand(cout, generator=g, dtype=torch.float64) * 0.2 + 1e-3,
                            bias=(torch.rand(cout, generator=g, dtype=torch.float64) - 0.5) * 160,
                            aff_mul=torch.randn(cout, generator=g, dtype=torch.float64),
                            aff_add=torch.randn(cout, generator=g, dtype=torch.float64))
    fast, slow = _fast_and_int32(x, codes, ep, cin, x_signed=False, act="silu", out_dtype=torch.float32)
    _assert_bit_identical(fast, slow)


# (q_mul, q_off) for z = I/2 (alpha 0.5, identity): each puts (z - q_off)*q_mul exactly on .5 ties for
# some I (for (2, 0.25), I - 0.5, on one for every I), and I's range runs past both clamp bounds.
TIE_QUANT = [(1.0, 0.0), (2.0, 0.25), (1.0, -0.5), (0.5, 0.0), (1.0, 3.0), (-1.0, 0.0), (4.0, 0.0)]


@pytest.mark.parametrize("cout", RAGGED)
@pytest.mark.parametrize("signed_out", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("act", ["identity", "relu"])
def test_epilogue_rounding_ties_and_clamps(cout, signed_out, act):
    x, codes = _sweep_conv(cout)
    qn, qp = (-8, 7) if signed_out else (0, 15)
    ep = ic.epilogue_params(cout, alpha=0.5, q_mul=_per_channel(cout, [m for m, _ in TIE_QUANT]),
                            q_off=_per_channel(cout, [o for _, o in TIE_QUANT]))
    fast, slow = _fast_and_int32(x, codes, ep, 2, x_signed=True, act=act, qn=qn, qp=qp)
    _assert_bit_identical(fast, slow)
    if act == "identity":  # both clamp bounds were reached
        levels = ic.unpack(fast, cout, signed_out)
        assert int(levels.min()) == qn and int(levels.max()) == qp


# N2UQ heads: thresholds that z = I/2 meets exactly (strictly above counts), unsorted ones, and NaN and
# infinite thresholds (which u > t never / always / never passes).
THRESHOLDS = {
    "halves": lambda n: [(i - n // 2) / 2.0 for i in range(n)],
    "unsorted": lambda n: [float((7 * i) % n - n // 2) for i in range(n)],
    "non_finite": lambda n: [NAN, -INF, INF] + [float(i) for i in range(n - 3)],
}


@pytest.mark.parametrize("cout", RAGGED)
@pytest.mark.parametrize("thresholds", sorted(THRESHOLDS))
@pytest.mark.parametrize("qn,qp", [(0, 15), (-8, 7), (0, 3)])
def test_epilogue_thresholds(cout, thresholds, qn, qp):
    x, codes = _sweep_conv(cout)
    thr = torch.tensor(THRESHOLDS[thresholds](qp - qn), dtype=torch.float32)
    ep = ic.epilogue_params(cout, alpha=0.5, q_mul=_per_channel(cout, [1.0, 2.0, 0.5, -1.0, NAN]),
                            q_off=_per_channel(cout, [0.0, 0.25, -3.0]))
    fast, slow = _fast_and_int32(x, codes, ep, 2, x_signed=True, act="identity", qn=qn, qp=qp, thresholds=thr)
    _assert_bit_identical(fast, slow)


# One non-finite (or extreme) epilogue entry per channel, the others finite, so that no operation meets
# two NaNs: which NaN comes out of an fma of two is the instruction form's choice, which the compiler
# makes for either path; every other NaN is determined (a NaN operand is passed on, an invalid operation
# gives the default NaN), and the tests compare those bits too. Codes are indifferent (NaN -> qn).
SPECIALS = [(ic.ALPHA, NAN), (ic.ALPHA, INF), (ic.ALPHA, -INF), (ic.ALPHA, 3e38), (ic.ALPHA, 1e-45),
            (ic.GAMMA, NAN), (ic.GAMMA, INF), (ic.GAMMA, -INF), (ic.BIAS, NAN), (ic.BIAS, INF), (ic.BIAS, -INF),
            (ic.BIAS, -0.0), (ic.AFF_MUL, NAN), (ic.AFF_MUL, INF), (ic.AFF_MUL, 0.0), (ic.AFF_MUL, -0.0),
            (ic.AFF_ADD, NAN), (ic.AFF_ADD, -INF), (ic.Q_MUL, NAN), (ic.Q_MUL, INF), (ic.Q_MUL, 0.0),
            (ic.Q_MUL, -INF), (ic.Q_OFF, NAN), (ic.Q_OFF, INF), (ic.Q_OFF, -INF)]
# (kernel, stride, padding, dilation, map): a 1x1 conv; 3x3 with borders; one 3x3 output of a 1x1 map
# (every tap but the centre outside); and padding wider than the dilated kernel reaches (empty windows).
GEOMETRIES = {
    "1x1": (1, 1, 0, 1, (6, 5)),
    "3x3_pad1": (3, 1, 1, 1, (5, 4)),
    "3x3_on_1x1_map": (3, 1, 1, 1, (1, 1)),
    "3x3_stride2_pad4_dil2": (3, 2, 4, 2, (5, 3)),
}


@pytest.mark.parametrize("cout", [33, 9, 7])
@pytest.mark.parametrize("act", ["identity", "relu", "silu"])
@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
@pytest.mark.parametrize("zero_point", [True, False], ids=["tap_sums", "no_tap_sums"])
def test_epilogue_non_finite_rows(cout, act, geometry, zero_point):
    k, stride, padding, dilation, (h, w) = GEOMETRIES[geometry]
    g = torch.Generator().manual_seed(cout + k)
    cin = 12
    codes = torch.randint(-8, 8, (cout, cin, k, k), generator=g)
    x = ic.pack(torch.randint(-8, 8, (2, cin, h, w), generator=g), 4, True)
    ep = ic.epilogue_params(cout, alpha=0.01 + 0.02 * torch.rand(cout, generator=g, dtype=torch.float64),
                            gamma=0.3 if zero_point else 0.0, bias=torch.randn(cout, generator=g, dtype=torch.float64),
                            aff_mul=1.5, aff_add=-0.25, q_mul=3.0, q_off=0.1)
    shift = {33: 0, 9: 9, 7: 18}[cout]
    for c in range(cout):
        row, value = SPECIALS[(c + shift) % len(SPECIALS)]
        ep[row, c] = value
    for out_dtype in (torch.uint8, torch.float32, torch.float16):
        fast, slow = _fast_and_int32(x, codes, ep, cin, x_signed=True, tap_sums=ic.weight_tap_sums(codes) if
                                     zero_point else None, stride=stride, padding=padding, dilation=dilation,
                                     act=act, qn=-8, qp=7, out_dtype=out_dtype)
        _assert_bit_identical(fast, slow)
        if out_dtype == torch.float32 and cout == 33:
            assert bool(fast.isnan().any()) and bool(fast.isinf().any())


@pytest.mark.parametrize("cout", RAGGED)
@pytest.mark.parametrize("out", sorted(OUT_KINDS))
def test_epilogue_ragged_channels_at_an_offset(cout, out):
    """Into a wider shared output at a channel offset: the ragged last group writes its channels only
    (the neighbours keep their sentinel), border pixels with tap sums, batch 3."""
    g = torch.Generator().manual_seed(cout)
    cin = 5
    codes = torch.randint(-8, 8, (cout, cin, 3, 3), generator=g)
    x = ic.pack(torch.randint(-8, 8, (3, cin, 4, 5), generator=g), 4, True)
    ep = ic.epilogue_params(cout, alpha=0.05, gamma=-0.2, bias=torch.randn(cout, generator=g, dtype=torch.float64),
                            q_mul=2.0)
    if out == "codes":
        sentinel = torch.full((3, 4, 5, ic.packed_bytes(cout + 40)), 0xA5, dtype=torch.uint8)
    else:
        sentinel = torch.full((3, cout + 40, 4, 5), -3.0, dtype=OUT_KINDS[out]).contiguous(
            memory_format=torch.channels_last)
    fast, slow = _fast_and_int32(x, codes, ep, cin, x_signed=True, tap_sums=ic.weight_tap_sums(codes), padding=1,
                                 act="silu", qn=-8, qp=7, out=sentinel, c_offset=10)
    _assert_bit_identical(fast, slow)


def test_epilogue_sum_conversion():
    """conv2d_epilogue reads each sum as the int32 path's I: truncated toward zero, saturated at the int32
    range, NaN as 0 (sums that no exact conv gives, but the op accepts any float32). An identity epilogue
    writes float(I) itself; other epilogues give on those sums what they give on the converted ones."""
    cout = 11
    values = torch.tensor([NAN, INF, -INF, 3e9, -3e9, 2.0**31, -(2.0**31), 2.0**31 - 128, 0.75, -0.75, -2.5,
                           16777216.0, -0.0, 1e-30, 123456.7, -98765.4])
    sums = values.repeat(cout * 3)[: 2 * cout * 4 * 3].reshape(2, 4, 3, cout).permute(0, 3, 1, 2)
    assert sums.is_contiguous(memory_format=torch.channels_last)
    as_int = torch.where(sums.isnan(), 0.0, sums.double().clamp(-(2.0**31), 2.0**31 - 1)).to(torch.int64)
    converted = as_int.float().contiguous(memory_format=torch.channels_last)  # -0.0, -0.75: the integer 0
    ic.load()
    ops = torch.ops.q2kernels_int

    def epilogue(s, ep, act, out_dtype):
        return ops.conv2d_epilogue(s, ep, None, None, [4, 3], [1, 1], 4, True, True, 1, 0, [1, 1], [0, 0], [1, 1],
                                   act, -8, 7, out_dtype)

    identity = ic.epilogue_params(cout, alpha=1.0)
    _assert_bit_identical(epilogue(sums, identity, 0, torch.float32), converted)
    ep = ic.epilogue_params(cout, alpha=_per_channel(cout, [1.0, 2.0**-20, -3.0]), aff_mul=0.5)
    for out_dtype in (torch.float32, torch.uint8):
        _assert_bit_identical(epilogue(sums, ep, 2, out_dtype), epilogue(converted, ep, 2, out_dtype))
