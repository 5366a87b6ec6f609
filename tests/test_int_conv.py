"""The CPU integer conv of q2kernels._C against the fake-quant float conv computed in float64.

The oracle (fake_quant_conv64) is the real-number meaning of a fake-quant conv: xhat = s_a*q + beta_a,
zero padded (xhat, not q, is padded with 0), what = s_w*(w_mul*k + w_add), F.conv2d in float64, then
activation, per-channel affine and the next quantizer in float64. The integer op must give
- int32 accumulators identical to the float64 conv of the codes,
- float outputs within the fp32 rounding of its epilogue,
- codes identical wherever the float64 value is not within that rounding of a decision boundary
  (and with dyadic parameters, where the fp32 epilogue is exact, identical everywhere),
- codes identical, everywhere, to its own float output quantised with the same fp32 operations.
"""
import pytest
import torch
import torch.nn.functional as F

from q2kernels.ops import int_conv as ic

# name: (KH, KW), stride, padding, dilation, C_in
GEOMS = {
    "1x1": ((1, 1), 1, 0, 1, 37),
    "3x3s1p1": ((3, 3), 1, 1, 1, 37),
    "3x3s2p1": ((3, 3), 2, 1, 1, 37),
    "3x3s1p0": ((3, 3), 1, 0, 1, 40),
    "3x3s2p0": ((3, 3), 2, 0, 1, 32),
    "6x6s2p2": ((6, 6), 2, 2, 1, 3),  # the YOLOv5 stem shape
    "5x3d2": ((5, 3), (2, 1), (3, 1), (2, 1), 65),
}


def _levels(bits, signed):
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


# name: weight bits and kind ("lsq": signed codes; "odd": w_int = 2k - (2^b - 1)), activation
# signedness and whether it has an LSQ+ offset, the activation between conv and next quantizer,
# and the next quantizer ("round" or "thresholds").
RECIPES = {
    "lsq_w4a4": dict(bits=4, w="lsq", a_signed=False, beta=False, act="relu", nxt="round"),
    "lsq_w4a4_signed_act": dict(bits=4, w="lsq", a_signed=True, beta=False, act="identity", nxt="round"),
    "lsq_plus_w4a4": dict(bits=4, w="lsq", a_signed=False, beta=True, act="silu", nxt="round"),
    "pact_dorefa_w4a4": dict(bits=4, w="odd", a_signed=False, beta=False, act="relu", nxt="round"),
    "n2uq_w4a4": dict(bits=4, w="odd", a_signed=False, beta=False, act="silu", nxt="thresholds"),
    "lsq_w3a3": dict(bits=3, w="lsq", a_signed=False, beta=False, act="silu", nxt="round"),
    "n2uq_w3a3": dict(bits=3, w="odd", a_signed=False, beta=False, act="identity", nxt="thresholds"),
    "lsq_plus_odd_signed": dict(bits=4, w="odd", a_signed=True, beta=True, act="silu", nxt="round"),
}

CASES = sorted({(g, r) for g in ("3x3s1p1", "6x6s2p2") for r in RECIPES}
               | {(g, r) for g in GEOMS for r in ("lsq_plus_odd_signed", "lsq_w4a4", "n2uq_w4a4")})


class Case:
    """Random codes and parameters of one quantized conv and its next quantizer, the op's
    arguments for them, and the float64 oracle."""

    def __init__(self, geom, recipe, n=2, h=9, w=11, cout=7, dyadic=False, seed=0, act=None):
        g = torch.Generator().manual_seed(seed)
        (kh, kw), stride, padding, dilation, cin = GEOMS[geom]
        r = RECIPES[recipe]
        bits = r["bits"]
        self.bits, self.cin, self.cout, self.act, self.nxt = bits, cin, cout, act or r["act"], r["nxt"]
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.x_signed = r["a_signed"]
        lo, hi = _levels(bits, self.x_signed)
        self.q = torch.randint(lo, hi + 1, (n, cin, h, w), generator=g)
        if r["w"] == "lsq":
            self.w_signed, self.w_mul, self.w_add = True, 1, 0
        else:
            self.w_signed, self.w_mul, self.w_add = False, 2, -(2**bits - 1)
        wlo, whi = _levels(bits, self.w_signed)
        self.k = torch.randint(wlo, whi + 1, (cout, cin, kh, kw), generator=g)

        def rnd(*shape, lo=0.0, hi=1.0):
            return lo + (hi - lo) * torch.rand(shape, generator=g)

        def dy(t, frac_bits):  # round to a few binary digits: exact in fp32 products and sums
            return torch.round(t * 2**frac_bits) / 2**frac_bits

        # Scales of the fake-quant model (fp32 parameters).
        self.s_a = torch.tensor(0.125) if dyadic else rnd(lo=0.05, hi=0.3).reshape(())
        self.beta_a = (dy(rnd(lo=-1.0, hi=0.0), 3) if dyadic else rnd(lo=-1.0, hi=0.0)).reshape(()) if r["beta"] \
            else torch.tensor(0.0)
        self.sw = 2.0 ** -torch.randint(4, 8, (cout,), generator=g).float() if dyadic else rnd(cout, lo=0.01, hi=0.06)
        self.bias = dy(rnd(cout, lo=-0.5, hi=0.5), 5) if dyadic else rnd(cout, lo=-0.5, hi=0.5)
        self.aff_mul = dy(rnd(cout, lo=0.5, hi=2.0), 2) if dyadic else rnd(cout, lo=0.5, hi=2.0)
        self.aff_add = dy(rnd(cout, lo=-0.3, hi=0.3), 4) if dyadic else rnd(cout, lo=-0.3, hi=0.3)
        self.xp = ic.pack(self.q, 4, self.x_signed)
        self.wp = ic.pack(self.k, 4, self.w_signed)
        self.tap_sums = ic.weight_tap_sums(self.k) if r["beta"] else None
        # The next quantizer, spread over the range of z so that every level occurs: LSQ(+)/PACT
        # rounding with q_mul = 1/s in fp32 (on a signed grid after signed inputs), or N2UQ thresholds.
        self.qn, self.qp = _levels(bits, self.x_signed and self.nxt == "round")
        self.q_mul, self.q_off, self.thresholds = torch.ones(cout), torch.zeros(cout), None
        z = self.oracle()[1]
        lo, hi = torch.quantile(z.flatten(), torch.tensor([0.02, 0.98], dtype=torch.float64)).float()
        if self.nxt == "round":
            s_next = (hi - lo) / (self.qp - self.qn)
            if dyadic:
                s_next, lo = 2.0 ** torch.round(torch.log2(s_next)), dy(lo, 3)
            self.q_mul = (1.0 / s_next).expand(cout).contiguous()
            self.q_off = (lo - self.qn * s_next).expand(cout).contiguous()
        else:
            q_mul = rnd(lo=0.8, hi=1.2)
            self.q_mul = (dy(q_mul, 3) if dyadic else q_mul).expand(cout).contiguous()
            steps = rnd(2**bits - 1, lo=0.5, hi=1.5)
            self.thresholds = (lo + (hi - lo) * steps.cumsum(0) / steps.sum()) * self.q_mul[0]

    @property
    def epilogue(self):
        s_a64, sw64 = self.s_a.double(), self.sw.double()
        return ic.epilogue_params(self.cout, alpha=sw64 * s_a64, gamma=sw64 * self.beta_a.double(), bias=self.bias,
                                  aff_mul=self.aff_mul, aff_add=self.aff_add, q_mul=self.q_mul, q_off=self.q_off)

    def run(self, out_dtype=torch.uint8, **kw):
        return ic.conv2d(self.xp, self.wp, self.epilogue, self.cin, x_signed=self.x_signed, w_signed=self.w_signed,
                         w_mul=self.w_mul, w_add=self.w_add, tap_sums=self.tap_sums, stride=self.stride,
                         padding=self.padding, dilation=self.dilation, act=self.act, qn=self.qn, qp=self.qp,
                         thresholds=self.thresholds, out_dtype=out_dtype, **kw)

    def geometry(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation)

    def oracle(self):
        """float64: (pre-activation y, z, v = the next quantizer's input, codes, magnitude bound)."""
        what = self.sw.double().view(-1, 1, 1, 1) * (self.w_mul * self.k.double() + self.w_add)
        xhat = self.s_a.double() * self.q.double() + self.beta_a.double()
        y = F.conv2d(xhat, what, self.bias.double(), **self.geometry())
        mag = F.conv2d(xhat.abs() + self.beta_a.double().abs(), what.abs(), self.bias.double().abs(), **self.geometry())
        a = {"identity": y, "relu": y.clamp_min(0.0), "silu": y * torch.sigmoid(y)}[self.act]
        z = self.aff_mul.double().view(1, -1, 1, 1) * a + self.aff_add.double().view(1, -1, 1, 1)
        v = (z - self.q_off.double().view(1, -1, 1, 1)) * self.q_mul.double().view(1, -1, 1, 1)
        if self.thresholds is None:
            codes = torch.round(v.clamp(self.qn, self.qp))
        else:
            codes = self.qn + (v.unsqueeze(-1) > self.thresholds.double()).sum(-1).double()
        return y, z, v, codes, mag

    def tolerance(self, y, z, v, mag):
        """Bounds on |z_int - z64| and |v_int - v64| from the fp32 epilogue (a few ulp per operation,
        with a margin): the rounding of alpha and gamma, the fmas, SiLU, the affine and the quantizer."""
        tz = self.aff_mul.double().view(1, -1, 1, 1) * 5e-7 * (mag + y.abs()) + 3e-7 * z.abs()
        tv = self.q_mul.double().view(1, -1, 1, 1) * (tz + 3e-7 * self.q_off.double().abs().view(1, -1, 1, 1)) \
            + 3e-7 * v.abs()
        return tz, tv + 1e-12

    def boundary_distance(self, v):
        if self.thresholds is None:
            inside = (v > self.qn - 0.5) & (v < self.qp + 0.5)
            d = (v - torch.floor(v) - 0.5).abs()
            return torch.where(inside, d, torch.full_like(v, float("inf")))
        return (v.unsqueeze(-1) - self.thresholds.double()).abs().amin(-1)


def _own_codes(case, z32):
    """The codes of the op's own float output, quantised with the same fp32 operations."""
    v = (z32 - case.q_off.view(1, -1, 1, 1)) * case.q_mul.view(1, -1, 1, 1)
    if case.thresholds is None:
        return torch.round(torch.where(v > case.qn, v, torch.tensor(float(case.qn))).clamp_max(case.qp))
    return (case.qn + (v.unsqueeze(-1) > case.thresholds).sum(-1)).float()


@pytest.mark.parametrize("geom,recipe", CASES)
def test_conv_matches_float64_fake_quant(geom, recipe):
    case = Case(geom, recipe)
    # 1. int32 accumulators: exactly the float64 conv of the codes (code 0 outside the image).
    acc = ic.conv2d_acc(case.xp, case.wp, case.cin, case.x_signed, case.w_signed, **case.geometry())
    ref_acc = F.conv2d(case.q.double(), case.k.double(), **case.geometry())
    assert acc.dtype == torch.int32 and acc.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(acc.double(), ref_acc)

    y, z, v, codes64, mag = case.oracle()
    tz, tv = case.tolerance(y, z, v, mag)
    # 2. Float output: within the fp32 epilogue's rounding of the float64 conv (this is where a
    #    zero-point correction missing at a border would show: it is >> the tolerance).
    z32 = case.run(torch.float32)
    assert z32.shape == z.shape and z32.is_contiguous(memory_format=torch.channels_last)
    err = (z32.double() - z).abs()
    assert bool((err <= tz).all()), f"max err/tol {(err / tz).max():.3g}"
    # 3. Codes: those of the op's own fp32 float output, everywhere.
    codes = ic.unpack(case.run(torch.uint8), case.cout, signed=case.qn < 0).double()
    assert torch.equal(codes, _own_codes(case, z32).double())
    # 4. Codes: the float64 oracle's, except where the oracle's value lies within the fp32 rounding
    #    of a decision boundary (there: at most one level apart); such elements must be rare.
    near = case.boundary_distance(v) <= tv
    assert torch.equal(codes[~near], codes64[~near])
    assert bool(((codes - codes64).abs() <= 1).all())
    assert int(near.sum()) <= max(2, near.numel() // 200), f"{int(near.sum())} of {near.numel()} near a boundary"


@pytest.mark.parametrize("geom,recipe", [("3x3s1p1", "lsq_plus_w4a4"), ("6x6s2p2", "lsq_plus_odd_signed"),
                                         ("5x3d2", "pact_dorefa_w4a4"), ("3x3s2p1", "lsq_w4a4_signed_act"),
                                         ("1x1", "n2uq_w3a3")])
def test_conv_exact_with_dyadic_parameters(geom, recipe):
    """Powers of two and short binary fractions make every fp32 operation of the epilogue exact,
    so the codes and floats must equal the float64 oracle everywhere (ties at .5 included)."""
    case = Case(geom, recipe, dyadic=True, seed=1, act="relu" if RECIPES[recipe]["act"] == "silu" else None)
    y, z, v, codes64, _ = case.oracle()
    assert torch.equal(case.run(torch.float32).double(), z)
    codes = ic.unpack(case.run(torch.uint8), case.cout, signed=case.qn < 0).double()
    assert torch.equal(codes, codes64)
    if case.thresholds is None:
        assert bool(((v - torch.floor(v)) == 0.5).any()), "the dyadic case should contain rounding ties"


def test_epilogue_silu_accuracy():
    """The epilogue's SiLU (its own exp, identical on CPU and CUDA) within a few ulp of float64 SiLU
    of the same fp32 pre-activation, from -95 to 95 (the exp overflow and underflow ends included)."""
    cout = 512
    q = torch.arange(16).reshape(1, 1, 1, 16)
    alpha = torch.full((cout,), 0.37)
    bias = torch.linspace(-95.0, 95.0, cout)
    ep = ic.epilogue_params(cout, alpha=alpha, bias=bias)
    w = ic.pack(torch.ones(cout, 1, 1, 1, dtype=torch.int8), 4, True)
    out = ic.conv2d(ic.pack(q, 4, False), w, ep, 1, x_signed=False, w_signed=True, act="silu", out_dtype=torch.float32)
    pre = (alpha.double().view(1, -1, 1, 1) * q.double() + bias.double().view(1, -1, 1, 1)).float().double()
    ref = pre * torch.sigmoid(pre)
    err = (out.double() - ref).abs()
    assert bool((err <= 4 * 2.0**-24 * ref.abs() + 1e-30).all()), f"max rel err {(err / ref.abs()).max():.3g}"


def test_zero_point_border_correction_is_needed():
    """The naive LSQ+ fold — beta_a times the whole kernel's weight sum added to the bias, as if
    q_a were padded with 0 — agrees with the oracle in the interior and fails its tolerance at the
    borders: the oracle test above does check the valid-tap correction."""
    case = Case("3x3s1p1", "lsq_plus_w4a4", act="identity")
    y, z, v, _, mag = case.oracle()
    tz, _ = case.tolerance(y, z, v, mag)
    full = case.k.double().sum(dim=(1, 2, 3))
    case.bias = (case.bias.double() + case.sw.double() * case.beta_a.double() * full).float()
    case.tap_sums = None
    bad = (case.run(torch.float32).double() - z).abs() > tz
    assert not bad[:, :, 1:-1, 1:-1].any()
    assert bad[:, :, 0, :].float().mean() > 0.9 and bad[:, :, :, -1].float().mean() > 0.9


def test_float16_output_and_shared_output_offsets():
    a = Case("3x3s1p1", "lsq_w4a4", cout=6, seed=2)
    b = Case("3x3s1p1", "n2uq_w4a4", cout=5, seed=3)
    half = a.run(torch.float16)
    assert half.dtype == torch.float16 and torch.equal(half, a.run(torch.float32).half())
    # Concat of two integer outputs: two writes at channel offsets 0 and 6 of one packed tensor.
    shared = torch.zeros(2, 9, 11, ic.packed_bytes(11), dtype=torch.uint8)
    a.run(out=shared, c_offset=0)
    b.run(out=shared, c_offset=6)
    both = ic.unpack(shared, 11, signed=False)
    assert torch.equal(both[:, :6], ic.unpack(a.run(), 6, signed=False))
    assert torch.equal(both[:, 6:], ic.unpack(b.run(), 5, signed=False))
    assert not (shared[..., 6:] != 0).any()  # padding channels stay zero codes
    # The odd tail (channel 10) keeps the other nibble of its byte; written in the other order too.
    shared2 = torch.zeros_like(shared)
    b.run(out=shared2, c_offset=6)
    a.run(out=shared2, c_offset=0)
    assert torch.equal(shared2, shared)
    # Float outputs at an offset of a channels_last float tensor.
    f = torch.full((2, 13, 9, 11), 7.0).contiguous(memory_format=torch.channels_last)
    b.run(out=f, c_offset=7)
    assert torch.equal(f[:, 7:12], b.run(torch.float32)) and (f[:, :7] == 7).all() and (f[:, 12:] == 7).all()


def test_bad_input():
    c = Case("3x3s1p1", "lsq_w4a4")
    kw = dict(x_signed=False, w_signed=True, padding=1)
    ep = c.epilogue
    with pytest.raises(TypeError, match="x: expected a packed uint8 tensor"):
        ic.conv2d(c.xp.to(torch.int8), c.wp, ep, 37, **kw)
    with pytest.raises(ValueError, match="x: expected a contiguous packed tensor"):
        ic.conv2d(c.xp.transpose(1, 2), c.wp, ep, 37, **kw)
    with pytest.raises(ValueError, match="x: expected a 4-d packed tensor"):
        ic.conv2d(c.xp[0], c.wp, ep, 37, **kw)
    with pytest.raises(TypeError, match="weight: expected a packed uint8 tensor"):
        ic.conv2d(c.xp, c.k, ep, 37, **kw)
    with pytest.raises(ValueError, match="x: holds 32 bytes per pixel but in_channels=70 packs into 48"):
        ic.conv2d(c.xp, c.wp, ep, 70, **kw)
    other = ic.pack(torch.zeros(7, 70, 3, 3, dtype=torch.int8), 4, True)
    with pytest.raises(ValueError, match="weight: holds 48 bytes per tap but in_channels=37 packs into 32"):
        ic.conv2d(c.xp, other, ep, 37, **kw)
    with pytest.raises(ValueError, match=r"epilogue: expected a contiguous \(7, C_out=7\)"):
        ic.conv2d(c.xp, c.wp, ep[:, :5], 37, **kw)
    with pytest.raises(TypeError, match="epilogue: expected float32"):
        ic.conv2d(c.xp, c.wp, ep.double(), 37, **kw)
    with pytest.raises(ValueError, match=r"tap_sums: expected a contiguous \(C_out, KH\+1, KW\+1\)"):
        ic.conv2d(c.xp, c.wp, ep, 37, tap_sums=torch.zeros(7, 3, 3, dtype=torch.int32), **kw)
    with pytest.raises(ValueError, match="thresholds: expected a contiguous 1-d tensor of qp - qn = 15"):
        ic.conv2d(c.xp, c.wp, ep, 37, thresholds=torch.zeros(3), **kw)
    with pytest.raises(ValueError, match="does not fit a 4-bit code"):
        ic.conv2d(c.xp, c.wp, ep, 37, qn=0, qp=16, **kw)
    with pytest.raises(ValueError, match="act: expected one of"):
        ic.conv2d(c.xp, c.wp, ep, 37, act="gelu", **kw)
    with pytest.raises(ValueError, match="stride: expected values >= 1"):
        ic.conv2d(c.xp, c.wp, ep, 37, x_signed=False, w_signed=True, stride=0)
    with pytest.raises(ValueError, match="is smaller than the dilated kernel"):
        ic.conv2d(c.xp, c.wp, ep, 37, x_signed=False, w_signed=True, dilation=6)
    with pytest.raises(TypeError, match="out_dtype: expected torch.uint8"):
        ic.conv2d(c.xp, c.wp, ep, 37, out_dtype=torch.int32, **kw)
    with pytest.raises(ValueError, match="c_offset: packed outputs start at an even channel"):
        ic.conv2d(c.xp, c.wp, ep, 37, out=torch.zeros(2, 9, 11, 16, dtype=torch.uint8), c_offset=1, **kw)
    with pytest.raises(ValueError, match=r"out: expected \(N, H_out, W_out\) = \(2, 9, 11\)"):
        ic.conv2d(c.xp, c.wp, ep, 37, out=torch.zeros(2, 5, 6, 16, dtype=torch.uint8), **kw)
    with pytest.raises(ValueError, match="out: expected a channels_last contiguous float tensor"):
        ic.conv2d(c.xp, c.wp, ep, 37, out=torch.zeros(2, 7, 9, 11), **kw)


def test_opcheck_and_compile():
    c = Case("3x3s2p1", "lsq_plus_w4a4")
    geo = ([2, 2], [1, 1], [1, 1])
    args = (c.xp, c.wp, c.epilogue, c.tap_sums, None, c.cin, False, True, 1, 0, *geo, 2, 0, 15)
    torch.library.opcheck(torch.ops.q2kernels_int.conv2d.default, (*args, torch.uint8))
    torch.library.opcheck(torch.ops.q2kernels_int.conv2d.default, (*args, torch.float32))
    torch.library.opcheck(torch.ops.q2kernels_int.conv2d_out.default,
                          (*args, 2, torch.zeros(2, 5, 6, 16, dtype=torch.uint8)))
    torch.library.opcheck(torch.ops.q2kernels_int.conv2d_acc.default, (c.xp, c.wp, c.cin, False, True, *geo))

    def two_layers(x, w1, ep1, w2, ep2):
        h = ic.conv2d(x, w1, ep1, 37, x_signed=False, w_signed=True, padding=1, act="relu")
        return ic.conv2d(h, w2, ep2, 7, x_signed=False, w_signed=True, out_dtype=torch.float32)

    def concat(x, w1, ep1):  # two writes into one packed output (the mutating op, functionalised)
        buf = torch.zeros(2, 9, 11, 16, dtype=torch.uint8)
        ic.conv2d(x, w1, ep1, 37, x_signed=False, w_signed=True, padding=1, out=buf, c_offset=0)
        return ic.conv2d(x, w1, ep1, 37, x_signed=False, w_signed=True, padding=1, out=buf, c_offset=8)

    w2 = ic.pack(torch.randint(-8, 8, (3, 7, 1, 1)), 4, True)
    ep2 = ic.epilogue_params(3, alpha=0.01)
    inputs = (c.xp, c.wp, c.epilogue, w2, ep2)
    compiled = torch.compile(two_layers, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(*inputs), two_layers(*inputs))
    c = Case("3x3s1p1", "lsq_w4a4")
    assert torch.equal(torch.compile(concat, backend="aot_eager", fullgraph=True)(c.xp, c.wp, c.epilogue),
                       concat(c.xp, c.wp, c.epilogue))
