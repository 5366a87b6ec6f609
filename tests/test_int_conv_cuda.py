"""The CUDA integer ops (csrc/cuda/) against the CPU integer ops (csrc/, the oracle): bit for bit.

Accumulators, packed output codes, float32/float16 outputs and writes at a channel offset must be
identical to the CPU path's, for both MMA paths (int4 MMA; int8 MMA on unpacked nibbles); so must
quantize-and-pack, pack and unpack, and every integer module of a converted YOLOv5.

Two runners execute the same cases:
- the CPU emulator (tests/cuda_emu/): the kernels' own source and the real torch glue
  (csrc/cuda/int_ops.cpp) compiled for the CPU against a lane-level emulation of mma/ldmatrix/
  cp.async/shuffles/barriers, run in CI without a GPU; cp.async copies land lazily (at wait_group)
  or eagerly (at issue), so a missing wait or barrier shows as wrong data;
- a GPU (tests marked cuda): the real kernels through torch.ops.q2kernels_int.* on CUDA tensors,
  Q2K_INT_MMA choosing the path (on sm_90: the int8 path, and the int4 path the compiler emulates).
"""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from benchmarks import shapes
from q2kernels import _ext
from q2kernels.ops import int_conv as ic

CPU = torch.ops.q2kernels_int
EMU_DIR = Path(__file__).resolve().parent / "cuda_emu"
CSRC = _ext.CSRC
S4, S8 = 0, 1  # MMA paths of the emulator ops (csrc/cuda/params.h MmaPath)


@functools.lru_cache(maxsize=None)
def _emulator():
    """Builds (once, cached on disk by torch) and loads the emulated ops torch.ops.q2k_cuda_emu.*."""
    cpp_extension.load(
        name="q2k_cuda_emu",
        sources=[str(EMU_DIR / "emu_ops.cpp"), str(CSRC / "cuda" / "int_ops.cpp"), str(CSRC / "checks.cpp"),
                 str(CSRC / "grouped_conv_ops.cpp")],
        extra_cflags=["-O2", "-ffp-contract=off", "-DQ2K_CUDA_EMULATION"],
        extra_include_paths=[str(CSRC), str(CSRC / "cuda"), str(EMU_DIR)],
        is_python_module=False,
    )
    return torch.ops.q2k_cuda_emu


class Emu:
    """Runs an op of q2kernels_int on the emulator (CPU tensors in and out)."""

    def __init__(self, path, lazy=True):
        self.path, self.lazy = path, lazy

    def __call__(self, op, *args):
        f = getattr(_emulator(), op)
        return f(self.path, self.lazy, *args) if op.startswith("conv") else f(self.lazy, *args)


def _to_cuda(t):
    """A CUDA copy with the same strides (so layouts and non-contiguous views are kept)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda").copy_(t)


class Gpu:
    """Runs an op of q2kernels_int on the GPU with the MMA path `path` (CPU tensors in and out)."""

    def __init__(self, path, monkeypatch):
        monkeypatch.setenv("Q2K_INT_MMA", path)

    def __call__(self, op, *args):
        dev = [_to_cuda(a) if isinstance(a, torch.Tensor) else a for a in args]
        res = getattr(CPU, op)(*dev)
        if op.endswith("_out"):
            args[-1].copy_(dev[-1])
            return None
        return res.cpu()


def _gpu_mma_path() -> str | None:
    """The MMA path the dispatcher runs on this GPU unless Q2K_INT_MMA forces one: the row of
    csrc/cuda/archs.h for its compute capability (q2kernels._ext.gpu_arch_of; None below the oldest
    row). Where it is s8 both paths are built (the int4 one emulated); elsewhere only s4."""
    major, minor = torch.cuda.get_device_capability()
    row = _ext.gpu_arch_of(10 * major + minor)
    return row.mma_path if row else None


# The arch that Q2K_INT_MMA=s8's error names: the oldest row that runs the int8 path (archs.h oldest_arch_of).
_S8_OLDEST_ARCH = next(a.arch for a in _ext.GPU_ARCHS if a.mma_path == "s8")


def _gpu_paths():
    if not torch.cuda.is_available():
        return ["auto"]
    return ["s8", "s4"] if _gpu_mma_path() == "s8" else ["s4"]


def _bits(t):
    """The raw bytes of t in memory order (floats compared bit for bit: -0.0, NaN payloads)."""
    perm = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    return t.permute(*perm).contiguous().reshape(-1).view(torch.uint8)


def assert_identical(got, ref):
    assert got.dtype == ref.dtype and got.shape == ref.shape and got.stride() == ref.stride(), (
        f"{got.dtype} {tuple(got.shape)} {got.stride()} vs {ref.dtype} {tuple(ref.shape)} {ref.stride()}")
    diff = _bits(got) != _bits(ref)
    assert not bool(diff.any()), f"{int(diff.sum())} of {diff.numel()} bytes differ"


# x_signed, weights ("lsq": signed codes k; "odd": w_int = 2k - (2^b - 1), k unsigned), an LSQ+
# activation offset (gamma, tap sums), the activation, the next quantizer, the bit width.
RECIPES = {
    "lsq_relu": dict(x_signed=False, odd=False, beta=False, act="relu", nxt="round", bits=4),
    "lsq_plus_silu": dict(x_signed=False, odd=False, beta=True, act="silu", nxt="round", bits=4),
    "signed_identity": dict(x_signed=True, odd=False, beta=False, act="identity", nxt="round", bits=4),
    "n2uq_silu": dict(x_signed=False, odd=True, beta=False, act="silu", nxt="thresholds", bits=4),
    "odd_signed_plus": dict(x_signed=True, odd=True, beta=True, act="silu", nxt="round", bits=4),
    "lsq_w3a3": dict(x_signed=False, odd=False, beta=True, act="silu", nxt="round", bits=3),
}

# Shapes covering the kernel's cases: the 1x1 GEMM specialisation and the general path, C_in not a
# multiple of 32 or 64 (3, 37, 40, 65), 1 and 3 chunks per pixel, an odd number of K chunks (9),
# C_out filling 1, 2 or 4 warps with tails (40, 130, 255), odd H/W, stride 2, dilation, the 6x6
# stem, batch 1, and M spanning several 128-row tiles.
GEOMS = {
    "1x1_gemm": dict(n=2, cin=37, h=9, w=11, cout=40, k=(1, 1), stride=1, pad=0, dil=1),
    "1x1_s2": dict(n=1, cin=64, h=9, w=7, cout=255, k=(1, 1), stride=2, pad=0, dil=1),
    "3x3s1": dict(n=2, cin=96, h=7, w=9, cout=130, k=(3, 3), stride=1, pad=1, dil=1),
    "3x3s2": dict(n=1, cin=32, h=13, w=11, cout=64, k=(3, 3), stride=2, pad=1, dil=1),
    "3x3p0": dict(n=1, cin=40, h=8, w=8, cout=32, k=(3, 3), stride=1, pad=0, dil=1),
    "stem6x6s2": dict(n=1, cin=3, h=20, w=18, cout=32, k=(6, 6), stride=2, pad=2, dil=1),
    "5x3dil": dict(n=1, cin=65, h=11, w=9, cout=48, k=(5, 3), stride=(2, 1), pad=(3, 1), dil=(2, 1)),
}


def _pair(v):
    return [v, v] if isinstance(v, int) else list(v)


class Problem:
    """Random codes and epilogue of one integer conv; `args` are the ops' arguments up to qp."""

    def __init__(self, n, cin, h, w, cout, k, stride, pad, dil, recipe="lsq_plus_silu", seed=0):
        g = torch.Generator().manual_seed(seed)
        r = RECIPES[recipe]
        kh, kw = k
        half = 2 ** (r["bits"] - 1)
        self.x_signed = r["x_signed"]
        xlo, xhi = (-half, half - 1) if self.x_signed else (0, 2 * half - 1)
        self.q = torch.randint(xlo, xhi + 1, (n, cin, h, w), generator=g)
        if r["odd"]:
            self.k = torch.randint(0, 2 * half, (cout, cin, kh, kw), generator=g)
            w_signed, w_mul, w_add = False, 2, -(2 * half - 1)
        else:
            self.k = torch.randint(-half, half, (cout, cin, kh, kw), generator=g)
            w_signed, w_mul, w_add = True, 1, 0
        self.w_signed = w_signed
        self.cin, self.cout, self.geometry = cin, cout, [_pair(stride), _pair(pad), _pair(dil)]
        self.x = ic.pack(self.q, r["bits"], self.x_signed)
        self.weight = ic.pack(self.k, r["bits"], w_signed)

        def rnd(*shape, lo=0.0, hi=1.0):
            return lo + (hi - lo) * torch.rand(shape, generator=g)

        s_a, s_w = rnd(lo=0.05, hi=0.3), rnd(cout, lo=0.01, hi=0.06) / (2 * half - 1 if r["odd"] else 1)
        beta = rnd(lo=-1.0, hi=0.0) if r["beta"] else torch.tensor(0.0)
        ep = ic.epilogue_params(cout, alpha=s_w.double() * s_a.double(), gamma=s_w.double() * beta.double(),
                                bias=rnd(cout, lo=-0.5, hi=0.5), aff_mul=rnd(cout, lo=0.5, hi=2.0),
                                aff_add=rnd(cout, lo=-0.3, hi=0.3))
        tap_sums = ic.weight_tap_sums(self.k) if r["beta"] or r["odd"] else None
        self.act = ic.ACTIVATIONS[r["act"]]
        head = [self.x, self.weight, ep, tap_sums, None, cin, self.x_signed, w_signed, w_mul, w_add, *self.geometry]
        # The next quantizer, spread over the values the epilogue produces, so that every level occurs.
        z = CPU.conv2d(*head, self.act, 0, 15, torch.float32)
        quantiles = torch.tensor([0.02, 0.98], dtype=torch.float64)
        lo, hi = torch.quantile(z.flatten().double(), quantiles).float() if z.numel() else (-1.0, 1.0)
        self.qn, self.qp = (-half, half - 1) if self.x_signed and r["nxt"] == "round" else (0, 2 * half - 1)
        thresholds = None
        if r["nxt"] == "round":
            s_next = (hi - lo) / (self.qp - self.qn)
            ep[ic.Q_MUL] = 1.0 / s_next
            ep[ic.Q_OFF] = lo - self.qn * s_next
        else:
            steps = rnd(self.qp - self.qn, lo=0.5, hi=1.5)
            thresholds = (lo + (hi - lo) * steps.cumsum(0) / steps.sum()).contiguous()
        head[2], head[4] = ep, thresholds
        self.args = tuple(head) + (self.act, self.qn, self.qp)

    def out_hw(self):
        (sh, sw), (ph, pw), (dh, dw) = self.geometry
        _, h, w, _ = self.x.shape
        _, kh, kw, _ = self.weight.shape
        return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1

    def acc_args(self):
        return (self.x, self.weight, self.cin, self.x_signed, self.w_signed, *self.geometry)


def _signed_variants(geom, seed):
    """One problem per (x_signed, w_signed) combination of codes."""
    recipes = {(False, True): "lsq_relu", (True, True): "signed_identity", (False, False): "n2uq_silu",
               (True, False): "odd_signed_plus"}
    return [Problem(**GEOMS[geom], recipe=r, seed=seed) for r in recipes.values()]


def check_accumulators(run, geom, seed=0):
    for p in _signed_variants(geom, seed):
        assert_identical(run("conv2d_acc", *p.acc_args()), CPU.conv2d_acc(*p.acc_args()))


def check_epilogue(run, geom, recipe, seed=0):
    p = Problem(**GEOMS[geom], recipe=recipe, seed=seed)
    refs = {dt: CPU.conv2d(*p.args, dt) for dt in (torch.uint8, torch.float32, torch.float16)}
    codes = ic.unpack(refs[torch.uint8], p.cout, p.qn < 0)
    assert int(codes.unique().numel()) >= (p.qp - p.qn + 1) // 2, "the problem exercises few output levels"
    for out_dtype, ref in refs.items():
        assert_identical(run("conv2d", *p.args, out_dtype), ref)


def check_offsets(run, seed=0):
    """conv2d_out into a larger output at channel offsets: only its channels change, bit for bit
    as on the CPU, including the shared byte of an odd channel count and unaligned offsets."""
    g = torch.Generator().manual_seed(seed)
    p = Problem(n=2, cin=37, h=9, w=7, cout=37, k=(3, 3), stride=1, pad=1, dil=1, recipe="lsq_plus_silu", seed=seed)
    ho, wo = p.out_hw()
    total = 37 + 70
    for c_offset in (0, 2, 8, 64):
        buf = torch.randint(0, 256, (2, ho, wo, ic.packed_bytes(total)), generator=g, dtype=torch.uint8)
        ref, got = buf.clone(), buf.clone()
        CPU.conv2d_out(*p.args, c_offset, ref)
        run("conv2d_out", *p.args, c_offset, got)
        assert_identical(got, ref)
    for dtype, c_offset in ((torch.float32, 3), (torch.float32, 4), (torch.float16, 5), (torch.float16, 64)):
        buf = torch.randn(2, total, ho, wo, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
        ref, got = buf.clone(), buf.clone()
        CPU.conv2d_out(*p.args, c_offset, ref)
        run("conv2d_out", *p.args, c_offset, got)
        assert_identical(got, ref)


def _layer_problem(c, batch, scale, seed):
    k, s, pad = c["k"], c["stride"], c["pad"]
    h, w = max(c["h_in"] // scale, k), max(c["w_in"] // scale, k)
    return Problem(n=batch, cin=c["cin"], h=h, w=w, cout=c["cout"], k=(k, k), stride=s, pad=pad, dil=1,
                   recipe="lsq_plus_silu", seed=seed)


def check_layer(run, c, batch, scale, seed=0):
    p = _layer_problem(c, batch, scale, seed)
    assert_identical(run("conv2d_acc", *p.acc_args()), CPU.conv2d_acc(*p.acc_args()))
    assert_identical(run("conv2d", *p.args, torch.uint8), CPU.conv2d(*p.args, torch.uint8))


def _quantize_input(dtype, layout, thresholds, seed, c=37):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, c, 9, 11, generator=g) * 3
    # Exact ties at .5 of the step (q_mul is a power of two) and the clamp boundaries.
    x[:, :, 0] = (torch.randint(-20, 20, (2, c, 11), generator=g) + 0.5) * 0.25
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = x.repeat(1, 1, 1, 2)[..., ::2]
    qparams = torch.stack([torch.full((c,), 4.0), torch.randn(c, generator=g) * 0.1]).contiguous()
    thr = torch.sort(torch.randn(15, generator=g) * 4)[0].contiguous() if thresholds else None
    return x, qparams, thr


def check_quantize_pack(run, dtype, layout, thresholds, seed=0):
    x, qparams, thr = _quantize_input(dtype, layout, thresholds, seed)
    qn, qp = (0, 15) if thresholds else (-8, 7)
    assert_identical(run("quantize_pack", x, qparams, thr, qn, qp), CPU.quantize_pack(x, qparams, thr, qn, qp))
    g = torch.Generator().manual_seed(seed + 1)
    for c_offset in (0, 6):
        buf = torch.randint(0, 256, (2, 9, 11, ic.packed_bytes(37 + 40)), generator=g, dtype=torch.uint8)
        ref, got = buf.clone(), buf.clone()
        CPU.quantize_pack_out(x, qparams, thr, qn, qp, c_offset, ref)
        run("quantize_pack_out", x, qparams, thr, qn, qp, c_offset, got)
        assert_identical(got, ref)


def check_pack_unpack(run, dtype, layout, bits, signed, seed=0):
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    codes = torch.randint(lo, hi + 1, (2, 37, 5, 7), generator=g).to(dtype)
    if layout == "channels_last":
        codes = codes.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        codes = codes.repeat(1, 1, 2, 1)[:, :, ::2]
    packed = CPU.pack(codes, bits, signed)
    assert_identical(run("pack", codes, bits, signed), packed)
    for channels in (37, 64):
        src = packed if channels == 37 else torch.randint(0, 256, (2, 5, 7, 32), generator=g, dtype=torch.uint8)
        assert_identical(run("unpack", src, channels, signed), CPU.unpack(src, channels, signed))


PACK_CASES = [(torch.int8, "nchw", 4, True), (torch.uint8, "channels_last", 4, False),
              (torch.int16, "strided", 3, True), (torch.int32, "channels_last", 3, False),
              (torch.int64, "nchw", 2, True)]
EPILOGUE_CASES = [(geom, recipe) for i, geom in enumerate(GEOMS) for recipe in
                  (list(RECIPES)[i % len(RECIPES)], list(RECIPES)[(i + 3) % len(RECIPES)])]
YOLO_UNIQUE = list({(c["cin"], c["cout"], c["k"], c["stride"], c["pad"], c["h_in"]): c
                    for c in shapes.conv_layers("yolov5s")}.values())


# ---------------------------------------------------------------- CPU emulator (runs in CI)

@pytest.mark.parametrize("path", [S4, S8])
@pytest.mark.parametrize("geom", GEOMS)
def test_emu_accumulators(geom, path):
    check_accumulators(Emu(path), geom)


@pytest.mark.parametrize("path", [S4, S8])
@pytest.mark.parametrize("geom,recipe", EPILOGUE_CASES)
def test_emu_epilogue(geom, recipe, path):
    check_epilogue(Emu(path), geom, recipe)


@pytest.mark.parametrize("path,geom", [(S4, "3x3s1"), (S8, "3x3s2"), (S4, "1x1_gemm"), (S8, "stem6x6s2")])
def test_emu_eager_copies(path, geom):
    """cp.async landing at issue instead of at wait_group: a stage overwritten too early shows."""
    check_accumulators(Emu(path, lazy=False), geom, seed=1)
    check_epilogue(Emu(path, lazy=False), geom, "lsq_plus_silu", seed=1)


@pytest.mark.parametrize("path", [S4, S8])
def test_emu_channel_offsets(path):
    check_offsets(Emu(path))


@pytest.mark.parametrize("i,c", list(enumerate(YOLO_UNIQUE)), ids=[c["name"] for c in YOLO_UNIQUE])
def test_emu_yolov5s_layer_shapes(i, c):
    """Each distinct YOLOv5s conv shape (channels, kernel, stride) at 1/32 of the resolution."""
    check_layer(Emu(i % 2), c, batch=1, scale=32, seed=i)


@pytest.mark.parametrize("dtype,layout,thresholds", [
    (torch.float32, "nchw", False), (torch.float16, "channels_last", False), (torch.bfloat16, "nchw", True),
    (torch.float32, "strided", True), (torch.float32, "channels_last", True)])
def test_emu_quantize_pack(dtype, layout, thresholds):
    check_quantize_pack(Emu(S4), dtype, layout, thresholds)


@pytest.mark.parametrize("dtype,layout,bits,signed", PACK_CASES)
def test_emu_pack_unpack(dtype, layout, bits, signed):
    check_pack_unpack(Emu(S4), dtype, layout, bits, signed)


class _RoutedOps:
    """Stands in for torch.ops.q2kernels_int in q2kernels.ops.int_conv: every op through `run`."""

    def __init__(self, run):
        self.run = run

    def __getattr__(self, op):
        return lambda *args: self.run(op, *args)


@pytest.mark.parametrize("recipe,bits,act,path", [("lsq_plus", 4, "silu", S4), ("n2uq", 3, "relu", S8)])
def test_emu_converted_yolo(recipe, bits, act, path, monkeypatch):
    """The converted tiny YOLOv5 of tests/test_convert.py with every integer op (IntConv2d heads at
    channel offsets, QuantizePack, the packed max pooling's unpack/pack) on the emulator: its
    outputs equal the CPU run's bit for bit (the float stem and head are the same CPU ops). The CPU
    fast path is off: its ops are the CPU's own, and the emulator stands in for the CUDA ones."""
    from q2kernels.deploy import convert_to_int
    from test_convert import tiny_yolo

    model = tiny_yolo(recipe, bits, act)
    x = torch.randn(2, 3, 32, 32)
    int_model = convert_to_int(model, x)
    ref = int_model(x)
    monkeypatch.setattr(ic, "_ops", _RoutedOps(Emu(path)))
    with ic.use_fast_cpu(False):
        got = int_model(x)
    for g, want in zip(got, ref):
        assert_identical(g, want)


def test_emu_empty_batch():
    p = Problem(**dict(GEOMS["3x3s1"], n=0))
    assert_identical(Emu(S4)("conv2d", *p.args, torch.uint8), CPU.conv2d(*p.args, torch.uint8))
    assert_identical(Emu(S8)("conv2d_acc", *p.acc_args()), CPU.conv2d_acc(*p.acc_args()))


def test_emu_errors():
    p = Problem(**GEOMS["3x3s2"])
    # The checks are the CPU ops' own: the same error for the same bad argument.
    bad = list(p.args)
    bad[5] = p.cin + 40  # in_channels that do not match the packed bytes
    with pytest.raises(ValueError) as cpu_err:
        CPU.conv2d(*bad, torch.uint8)
    with pytest.raises(ValueError) as emu_err:
        Emu(S4)("conv2d", *bad, torch.uint8)
    assert str(emu_err.value).split("\n")[0] == str(cpu_err.value).split("\n")[0]
    # cp.async reads 16-byte chunks: a packed view at an unaligned offset is refused, by name.
    flat = torch.zeros(p.x.numel() + 1, dtype=torch.uint8)
    x_off = flat[1:].view(p.x.shape).copy_(p.x)
    with pytest.raises(ValueError, match="x: .*16-byte aligned"):
        Emu(S4)("conv2d_acc", x_off, *p.acc_args()[1:])


# ---------------------------------------------------------------- GPU (tests marked cuda)

@pytest.fixture(params=_gpu_paths())
def gpu(request, monkeypatch):
    return Gpu(request.param, monkeypatch)


@pytest.mark.cuda
@pytest.mark.parametrize("geom", GEOMS)
def test_cuda_accumulators(gpu, geom):
    check_accumulators(gpu, geom)


@pytest.mark.cuda
@pytest.mark.parametrize("geom,recipe", EPILOGUE_CASES)
def test_cuda_epilogue(gpu, geom, recipe):
    check_epilogue(gpu, geom, recipe)


@pytest.mark.cuda
def test_cuda_channel_offsets(gpu):
    check_offsets(gpu)


@pytest.mark.cuda
@pytest.mark.parametrize("c", shapes.conv_layers("yolov5s"), ids=[c["name"] for c in shapes.conv_layers("yolov5s")])
def test_cuda_yolov5s_layers(gpu, c):
    """Every YOLOv5s conv layer at 1/4 of the resolution (160x160 stem input), batch 2."""
    check_layer(gpu, c, batch=2, scale=4)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,layout,thresholds", [
    (torch.float32, "nchw", False), (torch.float16, "channels_last", False), (torch.bfloat16, "nchw", True),
    (torch.float32, "strided", True), (torch.float32, "channels_last", True)])
def test_cuda_quantize_pack(dtype, layout, thresholds, monkeypatch):
    check_quantize_pack(Gpu("auto", monkeypatch), dtype, layout, thresholds)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,layout,bits,signed", PACK_CASES)
def test_cuda_pack_unpack(dtype, layout, bits, signed, monkeypatch):
    check_pack_unpack(Gpu("auto", monkeypatch), dtype, layout, bits, signed)


@pytest.mark.cuda
@pytest.mark.parametrize("recipe,bits,act", [("lsq_plus", 4, "silu"), ("n2uq", 3, "relu"), ("pact", 4, "silu")])
def test_cuda_converted_yolo(gpu, recipe, bits, act, monkeypatch):
    """The converted tiny YOLOv5 of tests/test_convert.py on the GPU: every integer module (IntConv2d
    heads writing at channel offsets, QuantizePack) given the CPU run's inputs gives the CPU run's
    outputs bit for bit; the whole model runs on CUDA tensors (the float stem and head differ from
    the CPU's float convs, so only the integer modules are compared exactly)."""
    import copy

    from q2kernels.deploy import IntConv2d, QuantizePack, convert_to_int
    from test_convert import tiny_yolo

    model = tiny_yolo(recipe, bits, act)
    x = torch.randn(2, 3, 32, 32)
    int_model = convert_to_int(model, x)
    calls = []

    def pre(module, args, kwargs):
        calls.append([module, _clone(args), _clone(kwargs), None])

    def post(module, args, kwargs, out):
        calls[-1][3] = out.clone()

    hooks = [h for m in int_model.modules() if isinstance(m, (IntConv2d, QuantizePack))
             for h in (m.register_forward_pre_hook(pre, with_kwargs=True),
                       m.register_forward_hook(post, with_kwargs=True))]
    int_model(x)
    for h in hooks:
        h.remove()
    assert sum(isinstance(c[0], IntConv2d) for c in calls) >= 50
    gpu_model = copy.deepcopy(int_model).cuda()
    gpu_modules = dict(gpu_model.named_modules())
    names = {m: n for n, m in int_model.named_modules()}
    for module, args, kwargs, out in calls:
        got = gpu_modules[names[module]](*_cuda_tree(args), **_cuda_tree(kwargs))
        assert_identical(got.cpu(), out)
    for y in gpu_model(x.cuda()):
        assert y.is_cuda and bool(torch.isfinite(y).all())


def _clone(tree):
    if isinstance(tree, torch.Tensor):
        return tree.clone()
    if isinstance(tree, (list, tuple)):
        return type(tree)(_clone(t) for t in tree)
    if isinstance(tree, dict):
        return {k: _clone(v) for k, v in tree.items()}
    return tree


def _cuda_tree(tree):
    if isinstance(tree, torch.Tensor):
        return _to_cuda(tree)
    if isinstance(tree, (list, tuple)):
        return type(tree)(_cuda_tree(t) for t in tree)
    if isinstance(tree, dict):
        return {k: _cuda_tree(v) for k, v in tree.items()}
    return tree


@pytest.mark.cuda
def test_cuda_integer_network(gpu):
    """A small integer network run end to end on the GPU equals the CPU run: quantize-and-pack of a
    float input, two branches written at channel offsets of one packed buffer (a concat), a 3x3
    stride-2 conv over it, a float16 last layer."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 34, 30, generator=g)
    stem = Problem(n=2, cin=3, h=34, w=30, cout=32, k=(6, 6), stride=2, pad=2, dil=1, recipe="lsq_plus_silu", seed=4)
    b1 = Problem(n=2, cin=32, h=17, w=15, cout=24, k=(1, 1), stride=1, pad=0, dil=1, recipe="lsq_relu", seed=5)
    b2 = Problem(n=2, cin=32, h=17, w=15, cout=40, k=(3, 3), stride=1, pad=1, dil=1, recipe="lsq_plus_silu", seed=6)
    down = Problem(n=2, cin=64, h=17, w=15, cout=48, k=(3, 3), stride=2, pad=1, dil=1, recipe="n2uq_silu", seed=7)
    last = Problem(n=2, cin=48, h=9, w=8, cout=16, k=(3, 3), stride=1, pad=1, dil=1, recipe="lsq_relu", seed=8)
    qparams = torch.stack([torch.full((3,), 5.0), torch.zeros(3)]).contiguous()

    def network(run):
        h0 = run("quantize_pack", x, qparams, None, 0, 15)
        h1 = run("conv2d", h0, *stem.args[1:], torch.uint8)
        cat = torch.zeros(2, 17, 15, ic.packed_bytes(64), dtype=torch.uint8)
        run("conv2d_out", h1, *b1.args[1:], 0, cat)
        run("conv2d_out", h1, *b2.args[1:], 24, cat)
        h3 = run("conv2d", cat, *down.args[1:], torch.uint8)
        return h1, cat, h3, run("conv2d", h3, *last.args[1:], torch.float16)

    def cpu(op, *args):
        return getattr(CPU, op)(*args)

    for got, ref in zip(network(gpu), network(cpu)):
        assert_identical(got, ref)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.is_available() and _gpu_mma_path() != "s8",
                    reason="this GPU's arch builds one MMA path (the native int4 MMA): nothing to compare")
def test_cuda_paths_agree(monkeypatch):
    """Where archs.h runs the int8 path (sm_90), it and the (emulated) int4 path of the same source agree
    exactly."""
    p = Problem(**GEOMS["3x3s1"], recipe="odd_signed_plus", seed=9)
    s8 = Gpu("s8", monkeypatch)("conv2d", *p.args, torch.float32)
    s4 = Gpu("s4", monkeypatch)("conv2d", *p.args, torch.float32)
    assert_identical(s8, s4)


@pytest.mark.cuda
def test_cuda_path_selection_errors(monkeypatch):
    p = Problem(**GEOMS["1x1_gemm"])
    monkeypatch.setenv("Q2K_INT_MMA", "int2")
    with pytest.raises(ValueError, match="Q2K_INT_MMA: expected auto, s4 or s8"):
        CPU.conv2d_acc(*[_to_cuda(a) if isinstance(a, torch.Tensor) else a for a in p.acc_args()])
    if _gpu_mma_path() != "s8":
        monkeypatch.setenv("Q2K_INT_MMA", "s8")
        with pytest.raises(ValueError, match=f"built for sm_{_S8_OLDEST_ARCH} only"):
            CPU.conv2d_acc(*[_to_cuda(a) if isinstance(a, torch.Tensor) else a for a in p.acc_args()])
    monkeypatch.setenv("Q2K_INT_MMA", "auto")
    x_cuda = _to_cuda(p.x)
    with pytest.raises(ValueError, match="weight: is on cpu but x is on cuda"):
        CPU.conv2d_acc(x_cuda, *p.acc_args()[1:])
