"""Hostile and careless arguments of the integer ops (q2kernels._C), on the CPU kernels and on the
CUDA ops' host glue (csrc/cuda/int_ops.cpp, run by the CPU emulator of tests/test_int_conv_cuda.py).

Every case expects either the reference's answer (a float64 conv of the integer codes, written
here) or a clear error naming the argument: never a crash, an out-of-bounds access, an int32
overflow or a silent wrong shape. The sanitizer step (.ci/steps/sanitize.sh) runs this file under
AddressSanitizer and UBSan, which turns any memory error or undefined behaviour left into a failure.
"""
import pytest
import torch
import torch.nn.functional as F

from q2kernels.deploy import accumulator
from q2kernels.ops import int_conv as ic

CPU = torch.ops.q2kernels_int
BIG = 2**63 - 1
INT32_MAX = 2**31 - 1


class Runner:
    """Calls an op by name on the CPU kernels, or on the CUDA ops' glue (cuda=True) through the
    emulator, whose index arithmetic also bounds stride, padding and dilation by 65536."""

    def __init__(self, cuda):
        self.cuda = cuda
        if cuda:
            from test_int_conv_cuda import S4, Emu, _emulator

            self.emu, self.emu_ops = Emu(S4), _emulator()

    def __call__(self, op, *args):
        if not self.cuda:
            return getattr(CPU, op)(*args)
        # The emulator's grouped ops keep q2kernels_int's schemas (no MMA path, no copy timing).
        return getattr(self.emu_ops, op)(*args) if op.startswith("conv2d_grouped") else self.emu(op, *args)

    def valid(self, op, *args):
        """The result of a call whose geometry is valid but beyond the CUDA kernels' 65536 (None there)."""
        if self.cuda:
            _expect(ValueError, "stride, padding, dilation: the CUDA kernels support values up to 65536", self, op,
                    *args)
            return None
        return self(op, *args)


@pytest.fixture(params=["cpu", "cuda_glue"])
def run(request):
    return Runner(request.param == "cuda_glue")


class Conv:
    """A small conv: unsigned activation codes, signed weight codes, identity epilogue (alpha 1),
    so that the float output is fp32(I) exactly; `args` in the order of the op schema."""

    def __init__(self, n=1, cin=8, h=5, w=4, cout=6, k=(1, 1), stride=1, padding=0, dilation=1, w_mul=1, w_add=0,
                 seed=0):
        g = torch.Generator().manual_seed(seed)
        self.q = torch.randint(0, 16, (n, cin, h, w), generator=g)
        self.k = torch.randint(-8, 8, (cout, cin, *k), generator=g)
        self.x, self.wp = ic.pack(self.q, 4, False), ic.pack(self.k, 4, True)
        self.ep = ic.epilogue_params(cout, 1.0)
        self.cin, self.cout, self.w_mul, self.w_add = cin, cout, w_mul, w_add
        self.geo = [[v, v] if isinstance(v, int) else list(v) for v in (stride, padding, dilation)]

    def args(self, **kw):
        a = dict(x=self.x, weight=self.wp, epilogue=self.ep, tap_sums=None, thresholds=None, in_channels=self.cin,
                 x_signed=False, w_signed=True, w_mul=self.w_mul, w_add=self.w_add, stride=self.geo[0],
                 padding=self.geo[1], dilation=self.geo[2], act=0, qn=0, qp=15)
        a.update(kw)
        return list(a.values())

    def reference(self, stride=None, padding=None, dilation=None):
        """I = sum over taps of (w_mul*k + w_add)*q, zero padded, in float64 (exact), as float32."""
        levels = (self.w_mul * self.k + self.w_add).double()
        i = F.conv2d(self.q.double(), levels, stride=stride or self.geo[0], padding=padding or self.geo[1],
                     dilation=dilation or self.geo[2])
        return i.float()


def _expect(exc, pattern, f, *args):
    with pytest.raises(exc, match=pattern):
        f(*args)


# ---------------------------------------------------------------- output offsets

@pytest.mark.parametrize("c_offset", [2**63 - 2, 2**63 - 1, 2**62, 34, -2])
def test_conv_packed_out_offset_far_outside(run, c_offset):
    c = Conv()
    out = torch.zeros(1, 5, 4, 16, dtype=torch.uint8)
    _expect(ValueError, "c_offset: ", run, "conv2d_out", *c.args(), c_offset, out)
    assert (out == 0).all()


@pytest.mark.parametrize("c_offset", [2**63 - 3, 2**63 - 1, 2**62 + 1, 13, -1])
def test_conv_float_out_offset_far_outside(run, c_offset):
    c = Conv()
    out = torch.full((1, 12, 5, 4), 7.0).contiguous(memory_format=torch.channels_last)
    _expect(ValueError, "c_offset: ", run, "conv2d_out", *c.args(), c_offset, out)
    assert (out == 7).all()


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_conv_out_offset_at_the_limit(run, dtype):
    """Channels [c_offset, c_offset + C_out) in a C_total = 32 output: the last offset that fits
    writes exactly there and nowhere else; one channel (packed: one byte) further is refused."""
    c = Conv()
    total = 32
    last = total - c.cout
    if dtype == torch.uint8:
        out = torch.full((1, 5, 4, total // 2), 0x99, dtype=torch.uint8)
        run("conv2d_out", *c.args(), last, out)
        got = ic.unpack(out, total, True)
        want = ic.unpack(run("conv2d", *c.args(), torch.uint8), c.cout, True)
        assert torch.equal(got[:, last:], want) and (got[:, :last] == -7).all()
        bad = [last + 2, total, total + 2]
    else:
        out = torch.full((1, total, 5, 4), 7.0).contiguous(memory_format=torch.channels_last)
        run("conv2d_out", *c.args(), last, out)
        assert torch.equal(out[:, last:], c.reference()) and (out[:, :last] == 7).all()
        bad = [last + 1, total, total + 1]
    before = out.clone()
    for off in bad:
        _expect(ValueError, "out: channels|c_offset: ", run, "conv2d_out", *c.args(), off, out)
    assert torch.equal(out, before)


@pytest.mark.parametrize("c_offset", [2**63 - 2, 2**62, 32, -2])
def test_quantize_pack_out_offset_outside(run, c_offset):
    x = torch.randn(1, 8, 3, 3)
    qparams = torch.stack([torch.full((8,), 4.0), torch.zeros(8)])
    out = torch.zeros(1, 3, 3, 16, dtype=torch.uint8)
    _expect(ValueError, "c_offset: |out: channels", run, "quantize_pack_out", x, qparams, None, 0, 15, c_offset, out)
    assert (out == 0).all()


def test_quantize_pack_out_offset_at_the_limit(run):
    x = torch.randn(1, 8, 3, 3)
    qparams = torch.stack([torch.full((8,), 4.0), torch.zeros(8)])
    out = torch.zeros(1, 3, 3, 16, dtype=torch.uint8)
    run("quantize_pack_out", x, qparams, None, 0, 15, 24, out)
    want = torch.clamp(torch.round(x * 4.0), 0, 15).to(torch.int8)
    assert torch.equal(ic.unpack(out, 32, False)[:, 24:], want)
    _expect(ValueError, r"out: channels \[26, 34\)", run, "quantize_pack_out", x, qparams, None, 0, 15, 26, out)


def test_python_ints_beyond_int64_are_named():
    c = Conv()
    kw = dict(x_signed=False, w_signed=True)
    with pytest.raises(ValueError, match="c_offset: 18446744073709551616 does not fit int64"):
        ic.conv2d(c.x, c.wp, c.ep, c.cin, out=torch.zeros(1, 5, 4, 16, dtype=torch.uint8), c_offset=2**64, **kw)
    with pytest.raises(ValueError, match="stride: .* does not fit int64"):
        ic.conv2d(c.x, c.wp, c.ep, c.cin, stride=2**70, **kw)
    with pytest.raises(ValueError, match="w_mul: .* does not fit int64"):
        ic.conv2d(c.x, c.wp, c.ep, c.cin, w_mul=-2**63 - 1, **kw)
    with pytest.raises(ValueError, match="in_channels: .* does not fit int64"):
        ic.conv2d_acc(c.x, c.wp, 2**64, False, True)
    with pytest.raises(TypeError, match="padding: expected an int, got 1.5"):
        ic.conv2d(c.x, c.wp, c.ep, c.cin, padding=(1, 1.5), **kw)
    with pytest.raises(TypeError, match="dilation: expected an int, got True"):
        ic.conv2d(c.x, c.wp, c.ep, c.cin, dilation=(True, 1), **kw)
    with pytest.raises(ValueError, match="channels: .* does not fit int64"):
        ic.unpack(c.x, 2**64)
    with pytest.raises(ValueError, match="qp: .* does not fit int64"):
        ic.quantize_pack(torch.zeros(1, 2, 1, 1), torch.zeros(2, 2), 0, 2**64)


# ---------------------------------------------------------------- out sharing memory with an input
# The kernels read their inputs while they write out (the CUDA conv reads x tile by tile, every
# epilogue reads its rows per element): an out that overlaps any input gave wrong codes, silently.
# Each input of each op that takes an `out`, overlapped at its first or its last bytes, or aliased
# whole, must be refused naming it, before anything is written.

def _carve(arena, offset, like):
    """A contiguous tensor over arena's bytes from offset on, holding a copy of like (same shape,
    dtype and memory format), so that it shares arena's memory."""
    channels_last = like.dim() == 4 and like.dtype != torch.uint8
    shape = (like.shape[0], *like.shape[2:], like.shape[1]) if channels_last else like.shape
    t = arena[offset:offset + like.numel() * like.element_size()].view(like.dtype).view(shape)
    t = t.permute(0, 3, 1, 2) if channels_last else t
    return t.copy_(like)


def _conv_operands(op):
    """The tensors of a 1x1 conv2d_out / conv2d_grouped_out (depthwise) call with 8 channels: a packed
    out then has x's shape. Thresholds given, so that the op reads every kind of input."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (1, 8, 5, 4), generator=g)
    k = torch.randint(-8, 8, (8, 8 if op == "conv2d_out" else 1, 1, 1), generator=g)
    return dict(x=ic.pack(q, 4, False), weight=ic.pack(k, 4, True), epilogue=ic.epilogue_params(8, 0.1, gamma=0.2),
                tap_sums=ic.weight_tap_sums(k), thresholds=torch.linspace(-20, 20, 15))


def _conv_out(dtype):
    if dtype == torch.uint8:
        return torch.zeros(1, 5, 4, 16, dtype=torch.uint8)
    return torch.zeros(1, 8, 5, 4).contiguous(memory_format=torch.channels_last)


def _conv_out_call(run, op, t, out):
    groups = [8] if op == "conv2d_grouped_out" else []
    return run(op, t["x"], t["weight"], t["epilogue"], t["tap_sums"], t["thresholds"], 8, *groups, False, True, 1, 0,
               [1, 1], [0, 0], [1, 1], 0, 0, 15, 0, out)


def _overlapping(arena, name, t, out_like, where):
    """Places input `name` at byte 1024 of arena, and an out that overlaps its first 16 bytes (head)
    or its last 16 (tail)."""
    t[name] = _carve(arena, 1024, t[name])
    size = out_like.numel() * out_like.element_size()
    start = 1024 - size + 16 if where == "head" else 1024 + t[name].numel() * t[name].element_size() - 16
    return _carve(arena, start, out_like)


@pytest.mark.parametrize("where", ["head", "tail"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("name", ["x", "weight", "epilogue", "tap_sums", "thresholds"])
@pytest.mark.parametrize("op", ["conv2d_out", "conv2d_grouped_out"])
def test_conv_out_overlapping_an_input_is_refused(run, op, name, dtype, where):
    t = _conv_operands(op)
    arena = torch.zeros(8192, dtype=torch.uint8)
    out = _overlapping(arena, name, t, _conv_out(dtype), where)
    before = arena.clone()
    _expect(ValueError, f"out: shares memory with {name}, which the op reads", _conv_out_call, run, op, t, out)
    assert torch.equal(arena, before)


@pytest.mark.parametrize("alias", ["itself", "view", "reshaped_view", "as_strided"])
@pytest.mark.parametrize("op", ["conv2d_out", "conv2d_grouped_out"])
def test_conv_out_aliasing_x_is_refused(run, op, alias):
    """The case of the report: conv2d_grouped(..., out=x) wrote wrong codes with no error."""
    t = _conv_operands(op)
    x = t["x"]
    out = {"itself": x, "view": x[:], "reshaped_view": x.view(-1).view(x.shape),
           "as_strided": x.as_strided(x.shape, x.stride())}[alias]
    before = x.clone()
    _expect(ValueError, "out: shares memory with x", _conv_out_call, run, op, t, out)
    assert torch.equal(x, before)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("op", ["conv2d_out", "conv2d_grouped_out"])
def test_conv_out_beside_its_inputs_in_one_buffer_is_accepted(run, op, dtype):
    """Sharing a storage is not overlapping: inputs and out carved from one buffer, side by side,
    give exactly what a separate out gets."""
    t = _conv_operands(op)
    expected = _conv_out(dtype)
    _conv_out_call(run, op, t, expected)
    arena = torch.zeros(8192, dtype=torch.uint8)
    offset = 0
    for name in t:
        t[name] = _carve(arena, offset, t[name])
        offset += -(-t[name].numel() * t[name].element_size() // 64) * 64
    out = _carve(arena, offset, _conv_out(dtype))
    _conv_out_call(run, op, t, out)
    assert torch.equal(out, expected)


def test_python_wrappers_refuse_out_aliasing_x():
    from q2kernels.ops.grouped_conv import conv2d_grouped

    for op, f in (("conv2d_out", ic.conv2d), ("conv2d_grouped_out", lambda *a, **kw: conv2d_grouped(*a[:4], 8, **kw))):
        t = _conv_operands(op)
        with pytest.raises(ValueError, match="out: shares memory with x"):
            f(t["x"], t["weight"], t["epilogue"], 8, x_signed=False, w_signed=True, tap_sums=t["tap_sums"], out=t["x"])


def _quantize_operands():
    return dict(x=torch.randn(1, 8, 3, 3), qparams=torch.stack([torch.full((8,), 4.0), torch.zeros(8)]),
                thresholds=torch.linspace(-20, 20, 15))


@pytest.mark.parametrize("where", ["head", "tail"])
@pytest.mark.parametrize("name", ["x", "qparams", "thresholds"])
def test_quantize_pack_out_overlapping_an_input_is_refused(run, name, where):
    t = _quantize_operands()
    arena = torch.zeros(8192, dtype=torch.uint8)
    out = _overlapping(arena, name, t, torch.zeros(1, 3, 3, 16, dtype=torch.uint8), where)
    before = arena.clone()
    _expect(ValueError, f"out: shares memory with {name}", run, "quantize_pack_out", t["x"], t["qparams"],
            t["thresholds"], 0, 15, 0, out)
    assert torch.equal(arena, before)


def test_quantize_pack_out_over_a_strided_view_of_x_is_refused(run):
    """x need not be contiguous for quantize_pack: its elements reach beyond numel*itemsize bytes from
    its start, and an out over its last channels' rows (bytes 400..544 of its 560) is caught."""
    arena = torch.zeros(8192, dtype=torch.uint8)
    base = _carve(arena, 1024, torch.randn(1, 8, 6, 3))
    x = base[:, :, ::2]  # every other row: 288 bytes of elements spread over 560
    out = arena[1024 + 400:1024 + 400 + 144].view(1, 3, 3, 16)
    _expect(ValueError, "out: shares memory with x", run, "quantize_pack_out", x, _quantize_operands()["qparams"],
            None, 0, 15, 0, out)


# ---------------------------------------------------------------- geometry

def test_huge_dilation_of_a_one_tap_kernel_reads_nothing_outside(run):
    """A 1x1 kernel ignores its dilation; with padding 5 the border outputs see only padding."""
    c = Conv(padding=5)
    _expect(ValueError, "dilation: expected values <= 2147483647", run, "conv2d", *c.args(dilation=[BIG, BIG]),
            torch.float32)
    got = run.valid("conv2d", *c.args(dilation=[INT32_MAX, INT32_MAX]), torch.float32)
    assert run.cuda or torch.equal(got, c.reference(dilation=1))


@pytest.mark.parametrize("name, geo", [
    ("dilation", ([1, 1], [0, 0], [2**62 + 1, 1])),
    ("dilation", ([1, 1], [0, 0], [2, 2**31])),
    ("padding", ([1, 1], [2**62 + 1, 0], [1, 1])),
    ("padding", ([1, 1], [0, 2**31], [1, 1])),
    ("stride", ([2**31, 1], [0, 0], [1, 1])),
    ("stride", ([BIG, BIG], [0, 0], [1, 1])),
    ("stride", ([0, 1], [0, 0], [1, 1])),
    ("stride", ([1, -1], [0, 0], [1, 1])),
    ("padding", ([1, 1], [-1, 0], [1, 1])),
    ("dilation", ([1, 1], [0, 0], [1, 0])),
    ("dilation", ([1, 1], [0, 0], [-BIG - 1, 1])),
])
def test_geometry_out_of_range_is_named(run, name, geo):
    c = Conv(k=(3, 3))
    stride, padding, dilation = geo
    _expect(ValueError, f"{name}: expected values", run, "conv2d",
            *c.args(stride=stride, padding=padding, dilation=dilation), torch.float32)
    _expect(ValueError, f"{name}: expected values", run, "conv2d_acc", c.x, c.wp, c.cin, False, True, *geo)


def test_largest_dilation_that_fits_gives_the_right_shape(run):
    """dilation 2^31 - 1 on a 3-tap axis spans 2^32 - 1 pixels: with that much padding the output
    has the shape of the reference formula (a few outputs), not a wrapped-around one."""
    c = Conv(k=(3, 1), h=3, w=2)
    pad = INT32_MAX
    got = run.valid("conv2d_acc", c.x, c.wp, c.cin, False, True, [1, 1], [pad, 0], [INT32_MAX, 1])
    if run.cuda:
        return
    assert got.shape == (1, c.cout, 3 + 2 * pad - 2 * INT32_MAX, 2)
    # Output row r sees input rows r - pad + {0, 1, 2}*(2^31 - 1): only the middle tap lands inside.
    want = F.conv2d(c.q.double(), c.k[:, :, 1:2].double())
    assert torch.equal(got.double(), want)


def test_padding_too_small_for_the_dilated_kernel(run):
    c = Conv(k=(3, 3))
    _expect(ValueError, "is smaller than the dilated kernel", run, "conv2d_acc", c.x, c.wp, c.cin, False, True,
            [1, 1], [0, 0], [3, 1])


def test_output_element_count_overflowing_int64_is_refused(run):
    c = Conv(h=1, w=1, cout=8)
    pad = 2**31 - 1
    _expect(ValueError, "x: the output .* has more than 2\\^63 elements", run, "conv2d",
            *c.args(padding=[pad, pad]), torch.float32)


def test_huge_stride_gives_one_output(run):
    c = Conv(k=(3, 3), padding=1)
    got = run.valid("conv2d", *c.args(stride=[INT32_MAX, INT32_MAX]), torch.float32)
    assert run.cuda or torch.equal(got, c.reference()[:, :, :1, :1])


def test_empty_batch_and_empty_image(run):
    c = Conv(n=0, k=(3, 3), padding=1)
    got = run("conv2d", *c.args(), torch.float32)
    assert got.shape == (0, c.cout, 5, 4)
    # A 0x0 image with padding 1 and a 1x1 kernel: 2x2 outputs that see padding only (I = 0).
    c = Conv(h=0, w=0, padding=1)
    ep = ic.epilogue_params(c.cout, 1.0, bias=torch.arange(c.cout, dtype=torch.float32))
    got = run("conv2d", *c.args(epilogue=ep), torch.float32)
    assert torch.equal(got, torch.arange(c.cout, dtype=torch.float32).view(1, -1, 1, 1).expand(1, -1, 2, 2))


# ---------------------------------------------------------------- channel counts

@pytest.mark.parametrize("in_channels", [0, -1, -BIG - 1, 2**31, BIG, 40])
def test_in_channels_out_of_range_or_mismatched(run, in_channels):
    c = Conv()
    _expect(ValueError, "in_channels: expected a channel count|x: holds 16 bytes per pixel but in_channels=40",
            run, "conv2d_acc", c.x, c.wp, in_channels, False, True, *c.geo)


@pytest.mark.parametrize("channels", [BIG, 2**62, 2**31, 0, -5])
def test_unpack_channel_count_out_of_range(run, channels):
    packed = torch.zeros(2, 3, 3, 16, dtype=torch.uint8)
    _expect(ValueError, f"channels: expected a channel count in \\[1, 2147483647\\], got {channels}", run,
            "unpack", packed, channels, True)


def test_unpack_channel_mismatch_message(run):
    packed = torch.zeros(2, 3, 3, 16, dtype=torch.uint8)
    _expect(ValueError, "channels: 33 channels pack into 32 bytes per pixel, but packed holds 16", run, "unpack",
            packed, 33, True)


def test_pack_channel_count_of_an_empty_tensor(run):
    codes = torch.empty(0, 2**62, 1, 1, dtype=torch.int8)
    _expect(ValueError, "codes: C: expected a channel count", run, "pack", codes, 4, True)
    assert run("pack", torch.empty(0, 40, 2, 3, dtype=torch.int8), 4, True).shape == (0, 2, 3, 32)


def test_quantize_pack_channel_count_of_an_empty_tensor(run):
    x = torch.empty(0, 2**62, 1, 1)
    _expect(ValueError, "x: C: expected a channel count", run, "quantize_pack", x, torch.zeros(2, 1).expand(2, 2**61),
            None, 0, 15)
    assert run("quantize_pack", torch.empty(1, 0, 2, 2), torch.zeros(2, 0), None, 0, 15).shape == (1, 2, 2, 0)


# ---------------------------------------------------------------- w_mul, w_add and the int32 accumulator

@pytest.mark.parametrize("name, w_mul, w_add", [
    ("w_mul", 2**32, 0), ("w_mul", 2**31, 0), ("w_mul", -2**31 - 1, 0), ("w_mul", 0, 0), ("w_mul", BIG, 0),
    ("w_add", 1, 2**31), ("w_add", 1, -2**31 - 1), ("w_add", 1, 2**32),
])
def test_w_mul_w_add_outside_int32(run, name, w_mul, w_add):
    c = Conv()
    _expect(ValueError, f"{name}: expected", run, "conv2d", *c.args(w_mul=w_mul, w_add=w_add), torch.float32)


def _largest_w_mul(taps, cin, w_signed, x_signed, w_add=0):
    """The largest w_mul whose accumulator bound L*(w_mul*max|k| + |w_add|)*max|q| fits int32,
    computed here from the formula written out (8 for signed codes, 15 for unsigned)."""
    max_k, max_q = (8 if w_signed else 15), (8 if x_signed else 15)
    return (INT32_MAX // (taps * cin * max_q) - abs(w_add)) // max_k


@pytest.mark.parametrize("w_add", [0, -1000])
def test_w_mul_at_the_accumulator_limit_is_exact_and_one_more_is_refused(run, w_add):
    """Worst-case codes (k = -8, q = 15 everywhere): at the largest w_mul the bound admits, the
    output is the exact I; w_mul + 1 (and 2^30) is refused naming w_mul, w_add."""
    c = Conv(cin=17, h=2, w=2, cout=2, k=(1, 1), w_add=w_add)
    c.q.fill_(15)
    c.k.fill_(-8)
    c.x, c.wp = ic.pack(c.q, 4, False), ic.pack(c.k, 4, True)
    c.w_mul = _largest_w_mul(1, 17, True, False, w_add)
    assert c.w_mul > 2**20
    i = 17 * 15 * (c.w_mul * -8 + w_add)  # the exact accumulator, in Python integers
    assert -2**31 <= i and abs(i) > 2**30
    got = run("conv2d", *c.args(), torch.float32)
    assert torch.equal(got, torch.full_like(got, float(i)))
    assert torch.equal(got, c.reference())
    for w_mul in (c.w_mul + 1, 2**30):
        _expect(ValueError, "w_mul, w_add: the int32 accumulator can reach", run, "conv2d",
                *c.args(w_mul=w_mul), torch.float32)


def test_accumulator_bound_of_conv2d_acc(run):
    """conv2d_acc (w_mul 1, w_add 0): L*8*15 <= 2^31 - 1 for signed weights and unsigned codes."""
    limit = INT32_MAX // (8 * 15)
    for cin, ok in ((limit, True), (limit + 1, False)):
        x = torch.zeros(1, 1, 1, ic.packed_bytes(cin), dtype=torch.uint8)
        w = torch.zeros(1, 1, 1, ic.packed_bytes(cin), dtype=torch.uint8)
        if ok and not run.cuda:  # (the emulator would take minutes over 2^24 codes)
            assert torch.equal(run("conv2d_acc", x, w, cin, False, True, [1, 1], [0, 0], [1, 1]),
                               torch.zeros(1, 1, 1, 1, dtype=torch.int32))
        elif not ok:
            _expect(ValueError, "w_mul, w_add: the int32 accumulator", run, "conv2d_acc", x, w, cin, False, True,
                    [1, 1], [0, 0], [1, 1])


def test_python_bound_matches_the_ops_at_the_limit():
    """accumulator.py (the converter's proof) and csrc/checks.cpp agree on every side of the limit."""
    for w_signed in (False, True):
        for x_signed in (False, True):
            for w_add in (0, -15, 7):
                w_mul = _largest_w_mul(9, 3, w_signed, x_signed, w_add)
                c = Conv(cin=3, k=(3, 3), padding=1)
                for m, ok in ((w_mul, True), (w_mul + 1, False), (-w_mul, True), (-w_mul - 1, False)):
                    reason = accumulator.overflow_reason((3, 3), 3, w_signed, x_signed, m, w_add)
                    assert (reason is None) == ok, (w_signed, x_signed, w_add, m)
                    args = c.args(w_mul=m, w_add=w_add, w_signed=w_signed, x_signed=x_signed)
                    if ok:
                        CPU.conv2d(*args, torch.float32)
                    else:
                        _expect(ValueError, "w_mul, w_add", CPU.conv2d, *args, torch.float32)


def test_accumulator_bound_literal_values():
    # YOLOv5s' largest 3x3 conv, DoReFa weights (w_mul 2, w_add -15, codes 0..15), PACT activations.
    assert accumulator.accumulator_bound(9, 512, 2, -15, 15, 15) == 9 * 512 * 45 * 15 == 3_110_400
    assert accumulator.accumulator_bound(1, 1, 1, 0, 8, 15) == 120
    assert accumulator.accumulator_bound(4, 2, -3, 0, 8, 0) == 4 * 2 * 24  # J alone: no factor 0
    assert accumulator.overflow_reason((3, 3), 353_495, False, False, 2, -15) is None
    why = accumulator.overflow_reason((3, 3), 353_496, False, False, 2, -15)
    assert "3*3*353496*(2*15 + 15)*15 = 2147488200 > 2^31 - 1" in why


def test_hostile_tap_sums_wrap_instead_of_undefined_behaviour(run):
    """tap_sums must be weight_tap_sums(k); extreme values make J wrap modulo 2^32 (defined), which
    the UBSan step checks; the result is J of the wrapped integers."""
    c = Conv(cin=2, h=1, w=1, cout=1)
    ts = torch.tensor([[[INT32_MAX, -2**31], [-2**31, INT32_MAX]]], dtype=torch.int32)
    ep = ic.epilogue_params(1, 0.0, gamma=1.0)
    got = run("conv2d", *c.args(epilogue=ep, tap_sums=ts, w_mul=3, w_add=5), torch.float32)
    ksum = (INT32_MAX - (-2**31) - (-2**31) + INT32_MAX) % 2**32
    j = (3 * ksum + 5 * 2) % 2**32
    j = j - 2**32 if j >= 2**31 else j
    assert torch.equal(got, torch.full_like(got, float(j)))


# ---------------------------------------------------------------- dtypes, layouts, devices

def test_mismatched_dtypes_and_layouts_are_named(run):
    c = Conv(k=(3, 3), padding=1)
    cases = [
        (TypeError, "x: expected a packed uint8", dict(x=c.x.to(torch.int8))),
        (ValueError, "x: expected a contiguous packed", dict(x=c.x.transpose(1, 2))),
        (ValueError, "weight: expected a contiguous packed", dict(weight=c.wp.permute(0, 2, 1, 3))),
        (ValueError, "weight: expected a 4-d", dict(weight=c.wp[0])),
        (ValueError, "weight: expected a non-empty", dict(weight=c.wp[:0])),
        (TypeError, "epilogue: expected float32", dict(epilogue=c.ep.double())),
        (ValueError, "epilogue: expected a contiguous", dict(epilogue=torch.zeros(7, 2 * c.cout)[:, ::2])),
        (TypeError, "tap_sums: expected int32", dict(tap_sums=torch.zeros(c.cout, 4, 4, dtype=torch.int64))),
        (ValueError, "tap_sums: expected a contiguous", dict(tap_sums=torch.zeros(c.cout, 4, 3, dtype=torch.int32))),
        (ValueError, "act: expected", dict(act=3)),
        (ValueError, "act: expected", dict(act=-1)),
    ]
    for exc, pattern, kw in cases:
        _expect(exc, pattern, run, "conv2d", *c.args(**kw), torch.float32)
    _expect(TypeError, "thresholds: expected float32", run, "conv2d",
            *c.args(thresholds=torch.zeros(15, dtype=torch.float64)), torch.uint8)
    _expect(ValueError, "qn, qp: ", run, "conv2d", *c.args(qn=BIG, qp=-BIG - 1), torch.uint8)
    _expect(ValueError, "qn, qp: ", run, "conv2d", *c.args(qn=-BIG - 1, qp=BIG), torch.uint8)
    _expect(TypeError, "out_dtype: expected", run, "conv2d", *c.args(), torch.int64)
    out = torch.zeros(1, c.cout, 5, 4)
    _expect(ValueError, "out: expected a channels_last", run, "conv2d_out", *c.args(), 0, out)
    _expect(TypeError, "out: expected uint8", run, "conv2d_out", *c.args(), 0, out.double())


@pytest.mark.parametrize("where", ["weight", "epilogue", "tap_sums", "thresholds", "out"])
def test_meta_tensor_mixed_with_cpu_is_a_device_error(where):
    c = Conv(k=(3, 3), padding=1)
    t = dict(weight=c.wp, epilogue=c.ep, tap_sums=ic.weight_tap_sums(c.k),
             thresholds=torch.arange(15, dtype=torch.float32), out=torch.zeros(1, 5, 4, 16, dtype=torch.uint8))
    t[where] = t[where].to("meta")
    args = c.args(**{k: v for k, v in t.items() if k != "out"})
    with pytest.raises(ValueError, match=f"{where}: is on meta but x is on cpu"):
        CPU.conv2d_out(*args, 0, t["out"])
    if where != "out":
        with pytest.raises(ValueError, match=f"{where}: is on meta but x is on cpu"):
            CPU.conv2d(*args, torch.uint8)
        assert (t["out"] == 0).all()


def test_meta_x_with_cpu_weight_and_all_meta():
    c = Conv(k=(3, 3), padding=1)
    with pytest.raises(ValueError, match="weight: is on cpu but x is on meta"):
        CPU.conv2d(*c.args(x=c.x.to("meta")), torch.uint8)
    meta = c.args(x=c.x.to("meta"), weight=c.wp.to("meta"), epilogue=c.ep.to("meta"))
    assert CPU.conv2d(*meta, torch.uint8).shape == CPU.conv2d(*c.args(), torch.uint8).shape
    with pytest.raises(ValueError, match="dilation: expected values in"):
        CPU.conv2d(*c.args(x=c.x.to("meta"), weight=c.wp.to("meta"), epilogue=c.ep.to("meta"), dilation=[BIG, 1]),
                   torch.uint8)
    x = torch.randn(1, 4, 2, 2)
    qparams = torch.zeros(2, 4, device="meta")
    with pytest.raises(ValueError, match="qparams: is on meta but x is on cpu"):
        CPU.quantize_pack(x, qparams, None, 0, 15)
    out = torch.zeros(1, 2, 2, 16, dtype=torch.uint8, device="meta")
    with pytest.raises(ValueError, match="out: is on meta but x is on cpu"):
        CPU.quantize_pack_out(x, torch.zeros(2, 4), None, 0, 15, 0, out)


# ---------------------------------------------------------------- the converter's proof

def _dorefa_pact_conv(cin):
    """One 7x7 conv, DoReFa weights (codes 0..15, w_mul 2, w_add -15) on PACT codes (0..15): its
    bound is 49*cin*(2*15 + 15)*15, which reaches 2^31 - 1 between cin = 64927 and 64928 (7x7, not
    3x3: an integer layer holds at most 2^16 channels, int_modules.MAX_CHANNELS)."""
    from q2kernels.nn import DoReFaWeightQuantizer, PACTQuantizer, QConv2d

    torch.manual_seed(0)
    conv = QConv2d(cin, 1, 7, padding=3, bias=False, weight_quantizer=DoReFaWeightQuantizer(4),
                   act_quantizer=PACTQuantizer(4, alpha_init=1.0))
    return torch.nn.Sequential(conv).eval(), torch.rand(1, cin, 1, 1)


def test_converter_refuses_a_layer_whose_accumulator_can_overflow():
    from q2kernels.deploy import convert_to_int

    model, x = _dorefa_pact_conv(64_928)
    with pytest.warns(UserWarning, match="layer '0' is kept in float: its int32 accumulator is not proven"):
        report = convert_to_int(model, x).report
    assert "7*7*64928*(2*15 + 15)*15 = 2147493600 > 2^31 - 1" in report["0"]
    with pytest.raises(ValueError, match="layer '0' kept in float: its int32 accumulator is not proven"):
        convert_to_int(model, x, strict=True)


def test_converter_accepts_the_largest_layer_the_bound_admits():
    from q2kernels.deploy import convert_to_int

    model, x = _dorefa_pact_conv(64_927)
    int_model = convert_to_int(model, x, strict=True)
    assert int_model.report["0"].startswith("integer conv")
    with torch.no_grad():
        got, want = int_model(x), model(x)
    # The integer sum is exact; the float conv sums 64927 fp32 products (rounding ~1e-5 relative).
    assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-3, atol=1e-3)
