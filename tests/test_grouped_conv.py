"""The grouped / depthwise integer conv (q2kernels.ops.grouped_conv, csrc/grouped_conv.h) on the CPU,
and its CUDA kernel (csrc/cuda/grouped_conv_kernel.cuh) run by the CPU emulator of tests/cuda_emu.

Oracles: a grouped conv is `groups` independent dense convs, so every group's output must equal,
bit for bit, the dense integer conv (ops.int_conv.conv2d, tested against float64 in test_int_conv)
of that group's input channels, weights, epilogue rows and tap sums; and the raw integer sums must
equal the float64 grouped convolution of the codes. Also: the packed max-pool at SPPF's real sizes.
"""
import pytest
import torch
import torch.nn.functional as F

from q2kernels.deploy.int_modules import packed_maxpool2d
from q2kernels.ops import grouped_conv as gc
from q2kernels.ops import int_conv as ic

# cin, cout, groups, kernel, stride, padding, dilation
GEOMS = [
    (64, 64, 64, (3, 3), 1, 1, 1),   # depthwise, YOLO11 Detect cv3 / C2PSA pe
    (33, 33, 33, (3, 3), 2, 1, 1),   # depthwise, odd channel count, stride 2
    (48, 24, 6, (3, 3), 2, 1, 1),    # grouped, 8 -> 4 channels per group
    (36, 72, 3, (5, 3), (2, 1), (2, 1), (2, 1)),  # 12 -> 24, wider than one packed chunk
    (8, 8, 4, (1, 1), 1, 0, 1),
]
# w_mul, w_add, signed weight codes, signed activations, zero point (tap sums), act, next quantizer
RECIPES = {
    "lsq": (1, 0, True, True, False, "identity", "round"),
    "lsq_plus": (1, 0, True, False, True, "silu", "round"),
    "dorefa": (2, -15, False, False, False, "relu", "round"),
    "n2uq": (2, -15, False, False, False, "silu", "thresholds"),
    "odd_zero_point": (2, -7, False, True, True, "silu", "round"),
}


def _case(geom, recipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    cin, cout, groups, k, stride, padding, dilation = geom
    w_mul, w_add, w_signed, x_signed, zero_point, act, nxt = RECIPES[recipe]
    lo, hi = (-8, 8) if x_signed else (0, 16)
    q = torch.randint(lo, hi, (2, cin, 9, 11), generator=g)
    wlo, whi = (-8, 8) if w_signed else (0, 16)
    kw = torch.randint(wlo, whi, (cout, cin // groups, *k), generator=g)
    levels = w_mul * kw + w_add
    scale = 0.5 / (levels.abs().sum(dim=(1, 2, 3)).double() * 8)
    ep = ic.epilogue_params(cout, alpha=scale, gamma=scale * 0.3 if zero_point else 0.0,
                            bias=torch.randn(cout, generator=g, dtype=torch.float64) * 0.2,
                            aff_mul=1.0 + 0.1 * torch.rand(cout, generator=g, dtype=torch.float64),
                            aff_add=0.05, q_mul=6.0, q_off=-0.1)
    thr = torch.linspace(-1.0, 2.0, 15).float() if nxt == "thresholds" else None
    return dict(q=q, k=kw, groups=groups, x=ic.pack(q, 4, x_signed), weight=ic.pack(kw, 4, w_signed), epilogue=ep,
                tap_sums=ic.weight_tap_sums(kw) if zero_point else None, thresholds=thr, in_channels=cin,
                x_signed=x_signed, w_signed=w_signed, w_mul=w_mul, w_add=w_add, act=act, stride=stride,
                padding=padding, dilation=dilation, levels=levels)


def _grouped(c, **kw):
    return gc.conv2d_grouped(c["x"], c["weight"], c["epilogue"], c["in_channels"], c["groups"], x_signed=c["x_signed"],
                             w_signed=c["w_signed"], w_mul=c["w_mul"], w_add=c["w_add"], tap_sums=c["tap_sums"],
                             stride=c["stride"], padding=c["padding"], dilation=c["dilation"], act=c["act"],
                             thresholds=c["thresholds"], **kw)


def _emulated(c, **kw):
    """_grouped through the CUDA kernel's source on the CPU emulator (its ops have the same schemas)."""
    from test_int_conv_cuda import _emulator

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ic, "_ops", _emulator())
        return _grouped(c, **kw)


def _dense_per_group(c, out_dtype):
    """Each group through the dense integer conv: its channels' codes, weights, epilogue, tap sums."""
    cin, cout, groups = c["in_channels"], c["k"].shape[0], c["groups"]
    cig, cog = cin // groups, cout // groups
    outs = []
    for gi in range(groups):
        o = slice(gi * cog, (gi + 1) * cog)
        kg = c["k"][o]
        outs.append(ic.conv2d(ic.pack(c["q"][:, gi * cig:(gi + 1) * cig], 4, c["x_signed"]),
                              ic.pack(kg, 4, c["w_signed"]), c["epilogue"][:, o].contiguous(), cig,
                              x_signed=c["x_signed"], w_signed=c["w_signed"], w_mul=c["w_mul"], w_add=c["w_add"],
                              tap_sums=None if c["tap_sums"] is None else ic.weight_tap_sums(kg), stride=c["stride"],
                              padding=c["padding"], dilation=c["dilation"], act=c["act"], thresholds=c["thresholds"],
                              out_dtype=out_dtype))
    if out_dtype == torch.uint8:
        outs = [ic.unpack(o, cog, False) for o in outs]
    return torch.cat(outs, 1)


@pytest.mark.parametrize("geom", GEOMS, ids=lambda g: f"{g[0]}-{g[1]}-g{g[2]}")
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_grouped_equals_dense_per_group(geom, recipe):
    c = _case(geom, recipe)
    cout = c["k"].shape[0]
    codes = _grouped(c)
    assert codes.dtype == torch.uint8 and codes.shape[-1] == ic.packed_bytes(cout)
    assert torch.equal(ic.unpack(codes, cout, False), _dense_per_group(c, torch.uint8))
    floats = _grouped(c, out_dtype=torch.float32)
    assert floats.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(floats, _dense_per_group(c, torch.float32))


@pytest.mark.parametrize("geom", GEOMS, ids=lambda g: f"{g[0]}-{g[1]}-g{g[2]}")
def test_integer_sums_equal_float64_grouped_conv(geom):
    c = _case(geom, "odd_zero_point")
    cout = c["k"].shape[0]
    c.update(epilogue=ic.epilogue_params(cout, 1.0), tap_sums=None, act="identity")
    got = _grouped(c, out_dtype=torch.float32)
    want = F.conv2d(c["q"].double(), c["levels"].double(), stride=c["stride"], padding=c["padding"],
                    dilation=c["dilation"], groups=c["groups"])
    assert torch.equal(got.double(), want)


def test_shared_output_offsets_and_odd_tail():
    c = _case(GEOMS[1], "lsq")  # 33 output channels: the last byte's high nibble belongs to the next writer
    cout = 33
    out = torch.full((2, 5, 6, ic.packed_bytes(80)), 0xAB, dtype=torch.uint8)
    _grouped(c, out=out, c_offset=10)
    alone = ic.unpack(_grouped(c), cout, False)
    everything = ic.unpack(out, 80, False)
    assert torch.equal(everything[:, 10:43], alone)
    assert bool((everything[:, :10] == torch.tensor([0xB, 0xA]).repeat(5).view(1, 10, 1, 1)).all())
    assert bool((everything[:, 43] == 0xA).all())  # the high nibble of the odd last channel's byte is kept
    f = torch.zeros(2, 40, 5, 6).contiguous(memory_format=torch.channels_last)
    _grouped(c, out=f, c_offset=3, out_dtype=torch.float32)
    assert torch.equal(f[:, 3:36], _grouped(c, out_dtype=torch.float32)) and not f[:, :3].any()


def test_bad_arguments():
    c = _case(GEOMS[2], "lsq")
    with pytest.raises(ValueError, match="in_channels: expected a positive multiple of groups=5"):
        gc.conv2d_grouped(c["x"], c["weight"], c["epilogue"], 48, 5, x_signed=True, w_signed=True)
    with pytest.raises(ValueError, match="weight: holds 16 bytes per tap but in_channels/groups=48 packs into 32"):
        gc.conv2d_grouped(c["x"], c["weight"], c["epilogue"], 48, 1, x_signed=True, w_signed=True)
    with pytest.raises(ValueError, match="x: holds 32 bytes per pixel but in_channels=30"):
        gc.conv2d_grouped(c["x"], c["weight"], c["epilogue"], 30, 6, x_signed=True, w_signed=True)
    with pytest.raises(ValueError, match="groups: expected >= 1"):
        gc.conv2d_grouped(c["x"], c["weight"], c["epilogue"], 48, 0, x_signed=True, w_signed=True)
    with pytest.raises(ValueError, match="epilogue: expected a contiguous"):
        gc.conv2d_grouped(c["x"], c["weight"], c["epilogue"][:, :5].contiguous(), 48, 6, x_signed=True,
                          w_signed=True)
    with pytest.raises(TypeError, match="out_dtype: the grouped conv writes"):
        gc.conv2d_grouped(c["x"], c["weight"], c["epilogue"], 48, 6, x_signed=True, w_signed=True,
                          out_dtype=torch.float16)
    with pytest.raises(ValueError, match="x: the padded input"):
        gc.conv2d_grouped(c["x"][:, :1, :1].contiguous(), c["weight"], c["epilogue"], 48, 6, x_signed=True,
                          w_signed=True)
    with pytest.raises(TypeError, match="x: expected a packed uint8"):
        gc.conv2d_grouped(c["x"].float(), c["weight"], c["epilogue"], 48, 6, x_signed=True, w_signed=True)


def test_opcheck():
    c = _case(GEOMS[0], "n2uq")
    args = (c["x"], c["weight"], c["epilogue"], c["tap_sums"], c["thresholds"], 64, 64, False, False, 2, -15,
            [1, 1], [1, 1], [1, 1], ic.ACTIVATIONS["silu"], 0, 15)
    torch.library.opcheck(torch.ops.q2kernels_int.conv2d_grouped, (*args, torch.uint8))
    torch.library.opcheck(torch.ops.q2kernels_int.conv2d_grouped, (*args, torch.float32))


def _maxpool_oracle(codes, k, s, p):
    """Max over each window by unfold, with -inf padding: shares nothing with F.max_pool2d."""
    n, ch, h, w = codes.shape
    padded = F.pad(codes.double(), (p, p, p, p), value=float("-inf"))
    win = padded.unfold(2, k, s).unfold(3, k, s)
    return win.amax(dim=(-1, -2))


@pytest.mark.parametrize("shape", [(1, 256, 20, 20), (2, 512, 20, 20), (1, 128, 40, 40), (1, 64, 160, 160)])
@pytest.mark.parametrize("signed", [False, True])
def test_packed_maxpool_at_real_sizes(shape, signed):
    g = torch.Generator().manual_seed(shape[1])
    codes = torch.randint(-8 if signed else 0, 8 if signed else 16, shape, generator=g)
    pooled = packed_maxpool2d(ic.pack(codes, 4, signed), shape[1], signed, 5, 1, 2, 1, False)
    assert torch.equal(ic.unpack(pooled, shape[1], signed).double(), _maxpool_oracle(codes, 5, 1, 2))


# The emulator's geometries: GEOMS and two more depthwise layers wider than 32 channels (a packed row of
# several 16-byte chunks; 48 and 20 channel pairs per pixel, so a 256-thread CTA ends mid-pixel).
EMU_GEOMS = GEOMS + [(96, 96, 96, (3, 3), 2, 1, 1), (40, 40, 40, (5, 5), 1, 2, 1)]


@pytest.mark.parametrize("geom", EMU_GEOMS, ids=lambda g: f"{g[0]}-{g[1]}-g{g[2]}")
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_cuda_emulator_equals_dense_per_group(geom, recipe):
    """The CUDA kernel and its grid, emulated: packed codes, floats, and packed codes written at a channel
    offset into a shared buffer (the neighbours' nibbles, an odd count's last high nibble included, kept)."""
    c = _case(geom, recipe)
    cout = c["k"].shape[0]
    codes = _dense_per_group(c, torch.uint8)
    assert torch.equal(ic.unpack(_emulated(c), cout, False), codes)
    assert torch.equal(_emulated(c, out_dtype=torch.float32), _dense_per_group(c, torch.float32))
    n, _, ho, wo = codes.shape
    offset, width = 6, ic.padded_channels(6 + cout + 1)
    out = torch.full((n, ho, wo, width // 2), 0x5C, dtype=torch.uint8)
    want = ic.unpack(out, width, False)
    want[:, offset:offset + cout] = codes
    _emulated(c, out=out, c_offset=offset)
    assert torch.equal(out, ic.pack(want, 4, False))


@pytest.mark.parametrize("geom", EMU_GEOMS, ids=lambda g: f"{g[0]}-{g[1]}-g{g[2]}")
def test_cuda_emulator_integer_sums_equal_float64_grouped_conv(geom):
    c = _case(geom, "odd_zero_point")
    c.update(epilogue=ic.epilogue_params(c["k"].shape[0], 1.0), tap_sums=None, act="identity")
    want = F.conv2d(c["q"].double(), c["levels"].double(), stride=c["stride"], padding=c["padding"],
                    dilation=c["dilation"], groups=c["groups"])
    assert torch.equal(_emulated(c, out_dtype=torch.float32).double(), want)


@pytest.mark.cuda
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_cuda_equals_cpu(recipe):
    for geom in GEOMS:
        c = _case(geom, recipe)
        gpu = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in c.items()}
        for dtype in (torch.uint8, torch.float32):
            assert torch.equal(_grouped(gpu, out_dtype=dtype).cpu(), _grouped(c, out_dtype=dtype))
        out = torch.full((2, 5, 6, ic.packed_bytes(200)), 0x5C, dtype=torch.uint8)
        if c["k"].shape[0] <= 190 and _grouped(c).shape[1:3] == (5, 6):
            want = _grouped(c, out=out.clone(), c_offset=8)
            assert torch.equal(_grouped(gpu, out=out.cuda(), c_offset=8).cpu(), want)
