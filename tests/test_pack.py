"""Packed 4-bit format (csrc/format.h) and the float quantize-and-pack op of q2kernels._C."""
import pytest
import torch

from q2kernels.ops import int_conv as ic

RANGES = {(4, True): (-8, 7), (4, False): (0, 15), (3, True): (-4, 3), (3, False): (0, 7), (2, True): (-2, 1)}


def _nibbles(packed):
    """(N, H, W, B) bytes -> (N, H, W, 2B) nibbles, even channel from the low nibble."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


@pytest.mark.parametrize("bits,signed", list(RANGES))
def test_every_code_round_trips(bits, signed):
    lo, hi = RANGES[(bits, signed)]
    values = torch.arange(lo, hi + 1)
    # Every value at every channel parity, 33 channels (ragged: one full 32-channel chunk + 1).
    codes = values[(torch.arange(2 * 3 * 5 * 33) % values.numel())].reshape(2, 33, 3, 5)
    packed = ic.pack(codes, bits, signed)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, 5, 32) and packed.is_contiguous()
    out = ic.unpack(packed, 33, signed)
    assert out.dtype == torch.int8 and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out.long(), codes)


def test_layout_low_nibble_even_channel_and_zero_padding():
    codes = torch.tensor([1, 2, 3, -1, -8, 7, 5]).reshape(1, 7, 1, 1)
    packed = ic.pack(codes, 4, True)
    assert packed.shape == (1, 1, 1, 16)
    row = packed.reshape(-1).tolist()
    assert row[:4] == [0x21, 0xF3, 0x78, 0x05]
    assert row[4:] == [0] * 12


@pytest.mark.parametrize("c", [1, 2, 31, 32, 33, 64, 65])
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int32, torch.int64])
def test_channel_counts_and_dtypes(c, dtype):
    signed = dtype != torch.uint8
    lo, hi = RANGES[(4, signed)]
    codes = torch.randint(lo, hi + 1, (3, c, 2, 3)).to(dtype)
    packed = ic.pack(codes, 4, signed)
    assert packed.shape == (3, 2, 3, ic.packed_bytes(c))
    assert ic.packed_bytes(c) * 2 % ic.CHANNEL_ALIGN == 0 and ic.packed_bytes(c) * 2 >= c
    nib = _nibbles(packed)
    assert torch.equal(nib[..., c:], torch.zeros_like(nib[..., c:]))
    assert torch.equal(ic.unpack(packed, c, signed).long(), codes.long())


def test_strided_input_and_weight_layout():
    codes = torch.randint(-8, 8, (5, 40, 3, 3))
    # A weight (C_out, C_in, KH, KW) packs to (C_out, KH, KW, bytes) along C_in, whatever its strides.
    for view in (codes, codes.contiguous(memory_format=torch.channels_last),
                 codes.transpose(2, 3).contiguous().transpose(2, 3), torch.randint(-8, 8, (5, 80, 3, 3))[:, ::2]):
        packed = ic.pack(view, 4, True)
        assert packed.shape == (5, 3, 3, 32)
        assert torch.equal(ic.unpack(packed, 40, True).long(), view.long())


def test_empty():
    assert ic.pack(torch.zeros(0, 5, 2, 2, dtype=torch.int8), 4, True).shape == (0, 2, 2, 16)
    assert ic.unpack(torch.zeros(0, 2, 2, 16, dtype=torch.uint8), 5, True).shape == (0, 5, 2, 2)


def test_pack_errors():
    with pytest.raises(ValueError, match=r"codes: value 8 is outside the 4-bit signed range \[-8, 7\]"):
        ic.pack(torch.tensor([0, 8]).reshape(1, 2, 1, 1), 4, True)
    with pytest.raises(ValueError, match=r"codes: value -1 is outside the 3-bit unsigned range \[0, 7\]"):
        ic.pack(torch.tensor([-1]).reshape(1, 1, 1, 1), 3, False)
    with pytest.raises(ValueError, match="3-bit signed"):
        ic.pack(torch.tensor([4]).reshape(1, 1, 1, 1), 3, True)
    with pytest.raises(TypeError, match="codes: expected an integer tensor"):
        ic.pack(torch.zeros(1, 1, 1, 1), 4, True)
    with pytest.raises(ValueError, match="codes: expected a 4-d"):
        ic.pack(torch.zeros(2, 3, dtype=torch.int8), 4, True)
    with pytest.raises(ValueError, match="bits: expected 2, 3 or 4"):
        ic.pack(torch.zeros(1, 1, 1, 1, dtype=torch.int8), 5, True)


def test_unpack_errors():
    packed = ic.pack(torch.zeros(1, 40, 2, 2, dtype=torch.int8), 4, True)
    with pytest.raises(ValueError, match="channels: 70 channels pack into 48 bytes per pixel, but packed holds 32"):
        ic.unpack(packed, 70, True)
    with pytest.raises(TypeError, match="packed: expected a packed uint8 tensor"):
        ic.unpack(packed.to(torch.int8), 40, True)
    with pytest.raises(ValueError, match="packed: expected a contiguous 4-d"):
        ic.unpack(packed.permute(0, 2, 1, 3), 40, True)


# The float quantizers, written as the reference (q2kernels/reference/fake_quant.py) computes the level.
def _lsq_codes(x, s, beta, qn, qp):
    inv_s = 1.0 / s.clamp_min(1e-8)
    return torch.round(((x.float() - beta) * inv_s).clamp(qn, qp))


def _pact_codes(x, alpha, n):
    return torch.round(torch.minimum(x.float().clamp_min(0.0), alpha) * (torch.tensor(float(n)) / alpha))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_quantize_pack_lsq_matches_reference_levels(dtype, layout):
    c = 37
    s = torch.rand(c) * 0.2 + 0.05
    beta = torch.randn(c) * 0.3
    x = torch.randn(2, c, 5, 6) * 1.5
    # Ties at .5 after the reference's own multiply by 1/s, and values far outside the range.
    x[0, :, 0, 0] = (torch.arange(c) % 16 - 7.5) * s + beta
    x[1, :, 1, 1] = 1e4
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.cat([x, x], dim=3)[..., ::2]
    inv_s = (1.0 / s.clamp_min(1e-8))
    for qn, qp, signed in ((-8, 7, True), (0, 15, False), (-4, 3, True)):
        packed = ic.quantize_pack(x, torch.stack([inv_s, beta]), qn, qp)
        ref = _lsq_codes(x, s.view(1, -1, 1, 1), beta.view(1, -1, 1, 1), qn, qp)
        assert torch.equal(ic.unpack(packed, c, signed).float(), ref)


def test_quantize_pack_pact_and_thresholds():
    x = torch.randn(2, 33, 4, 4) * 2
    alpha = torch.tensor(2.5)
    n = 15
    inv = torch.tensor(float(n)) / alpha
    qparams = torch.stack([inv.expand(33), torch.zeros(33)])
    packed = ic.quantize_pack(x, qparams, 0, n)
    assert torch.equal(ic.unpack(packed, 33, False).float(), _pact_codes(x, alpha, n))
    # Threshold counting (N2UQ): strict >, u = (x - q_off)*q_mul; a value exactly on a threshold
    # stays below it.
    thr = torch.sort(torch.randn(7)).values
    x[0, 0, 0, :4] = thr[:4] / 1.25
    q_mul = torch.full((33,), 1.25)
    packed = ic.quantize_pack(x, torch.stack([q_mul, torch.zeros(33)]), 0, 7, thresholds=thr)
    u = x * 1.25
    ref = (u.unsqueeze(-1) > thr).sum(-1)
    assert torch.equal(ic.unpack(packed, 33, False).long(), ref)


def test_quantize_pack_nan_and_out_offset():
    x = torch.randn(1, 6, 3, 3)
    x[0, 2, 1, 1] = float("nan")
    qparams = torch.stack([torch.full((6,), 4.0), torch.zeros(6)])
    out = torch.full((1, 3, 3, 16), 0x99, dtype=torch.uint8)
    ic.quantize_pack(x, qparams, -8, 7, out=out, c_offset=10)
    codes = ic.unpack(out, 32, True).long()
    assert codes[0, 2 + 10, 1, 1] == -8  # NaN -> qn
    # Channels outside [10, 16) untouched (0x99 -> codes -7).
    assert (codes[:, :10] == -7).all() and (codes[:, 16:] == -7).all()
    x[0, 2, 1, 1] = -100.0
    assert torch.equal(codes[:, 10:16].float(), _lsq_codes(x, torch.tensor(0.25), 0.0, -8, 7))


def test_quantize_pack_errors():
    x = torch.randn(1, 4, 2, 2)
    qp = torch.stack([torch.ones(4), torch.zeros(4)])
    with pytest.raises(TypeError, match="x: expected a float32, float16 or bfloat16"):
        ic.quantize_pack(x.double(), qp, 0, 15)
    with pytest.raises(ValueError, match=r"qparams: expected a contiguous \(2, C=4\)"):
        ic.quantize_pack(x, qp[:, :3], 0, 15)
    with pytest.raises(ValueError, match="does not fit a 4-bit code"):
        ic.quantize_pack(x, qp, -8, 8)
    with pytest.raises(ValueError, match="thresholds: expected a contiguous 1-d tensor of qp - qn = 15"):
        ic.quantize_pack(x, qp, 0, 15, thresholds=torch.zeros(7))
    with pytest.raises(ValueError, match="c_offset: packed outputs start at an even channel"):
        ic.quantize_pack(x, qp, 0, 15, out=torch.zeros(1, 2, 2, 16, dtype=torch.uint8), c_offset=3)
    with pytest.raises(ValueError, match=r"out: channels \[30, 34\) do not fit its 32 packed channels"):
        ic.quantize_pack(x, qp, 0, 15, out=torch.zeros(1, 2, 2, 16, dtype=torch.uint8), c_offset=30)


def test_opcheck_pack_ops():
    codes = torch.randint(-8, 8, (2, 5, 3, 3), dtype=torch.int8)
    torch.library.opcheck(torch.ops.q2kernels_int.pack.default, (codes, 4, True))
    torch.library.opcheck(torch.ops.q2kernels_int.unpack.default, (ic.pack(codes, 4, True), 5, True))
    x = torch.randn(2, 5, 3, 3)
    qparams = torch.stack([torch.full((5,), 3.0), torch.zeros(5)])
    torch.library.opcheck(torch.ops.q2kernels_int.quantize_pack.default, (x, qparams, None, -8, 7))
    torch.library.opcheck(torch.ops.q2kernels_int.quantize_pack_out.default,
                          (x, qparams, None, -8, 7, 2, torch.zeros(2, 3, 3, 16, dtype=torch.uint8)))
