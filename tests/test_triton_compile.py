"""Every Triton kernel, as the ops really launch it, compiled for Hopper (sm_90) with the ptxas that
ships in the triton wheel — no GPU needed. The interpreter runs kernels as Python, so what only the
GPU compiler rejects (a global that is not a constexpr, a type that changes across a loop, a
pointer of the wrong type) and register spills would otherwise first show on a GPU machine.

A subprocess imports q2kernels with the interpreter off, replaces JITFunction.run with a recorder,
drives each op forward and backward on small CPU tensors (the kernels never run: their launch
arguments are recorded), then compiles every distinct specialisation and reads its resource usage.
"""
import os
import subprocess
import sys

_SCRIPT = r"""
import os, re, subprocess, sys, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

launches = {}

def record(self, *args, grid, warmup, **kwargs):
    bound = dict(zip(self.arg_names, args), **kwargs)
    options = {k: bound.pop(k) for k in ("num_warps", "num_stages") if k in bound}
    def typ(name, v):
        if isinstance(v, tuple):  # a Triton tuple argument: typed element by element
            return tuple(typ(name, e) for e in v)
        if isinstance(v, torch.Tensor):
            return "*" + {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                          torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8", torch.bool: "i1"}[v.dtype]
        if isinstance(v, bool):
            return "i1"
        if isinstance(v, int):
            return "i32" if -2**31 <= v < 2**31 else "i64"
        if isinstance(v, float):
            return "fp32"
        raise TypeError(f"{self.fn.__name__}.{name}: cannot type {v!r}")

    sig, const = {}, {}
    for p in self.params:
        v = bound[p.name]
        if p.is_constexpr:
            sig[p.name], const[p.name] = "constexpr", v
        else:
            sig[p.name] = typ(p.name, v)
    key = (self.fn.__qualname__, tuple(sorted(sig.items())), tuple(sorted((k, repr(v)) for k, v in const.items())))
    launches[key] = (self, sig, const, options)

JITFunction.run = record

import q2kernels.functional as F
from q2kernels.ops import _layout
exec(open(sys.argv[1]).read())

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
for (name, _, _), (fn, sig, const, options) in sorted(launches.items(), key=lambda kv: repr(kv[0])):
    k = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                           text=True, check=True).stdout
    os.unlink(f.name)
    res = re.search(r"REG:\d+ STACK:\d+ SHARED:\d+ LOCAL:\d+", usage).group(0)
    print(f"{name} {res} {sorted((k, v) for k, v in const.items())}")
"""

# Op calls that reach every kernel and every constexpr branch that matters (kinds, layouts,
# per-channel tilings, dtypes, int64 offsets). Run inside the subprocess, after JITFunction.run
# is replaced, with `torch`, `F` (q2kernels.functional) and `_layout` in scope.
_DRIVE = r"""
def fwd_bwd(fn, *tensors):
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in tensors]
    out = fn(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(torch.ones_like(out))

from q2kernels import use_backend
import q2kernels._backend as _b
_b.resolve = lambda x: "triton"  # CPU tensors, interpreter off: the launches are only recorded

x = torch.randn(2, 6, 4, 4)
xl = x.to(memory_format=torch.channels_last)
s1, s6 = torch.tensor([0.3]), torch.rand(6) + 0.1
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    fwd_bwd(lambda x, s: F.lsq_quantize(x, s, 4), x.to(dtype), s1)
fwd_bwd(lambda x, s: F.lsq_quantize(x, s, 4, axis=1), x, s6)
fwd_bwd(lambda x, s: F.lsq_quantize(x, s, 4, axis=1), xl, s6)
fwd_bwd(lambda x, s, b: F.lsq_plus_quantize(x, s, b, 4, axis=1), xl, s6, s6.clone())
fwd_bwd(lambda x, a: F.pact_quantize(x, a, 4), x.bfloat16(), s1)
fwd_bwd(lambda w: F.dorefa_weight_quantize(w, 4), x)

one = torch.tensor([1.0])
for bits, dtype, xx in ((4, torch.bfloat16, xl), (8, torch.float32, x), (2, torch.float16, xl)):
    n = 2**bits - 1
    fwd_bwd(lambda x, st, a, a1, a2: F.n2uq_act_quantize(x, st, a, a1, a2, bits), xx.to(dtype),
            torch.zeros(1), torch.full((n,), 2.0 / n), one, one.clone())
    fwd_bwd(lambda w: F.n2uq_weight_quantize(w, bits), xx.to(dtype))

T = torch.randn(2, 24, 9, 9)
for dtype, fmt, kw in ((torch.bfloat16, torch.contiguous_format, dict(delta=torch.rand(24) + 0.1)),
                       (torch.float32, torch.contiguous_format, dict(divergence="kl")),
                       (torch.float16, torch.channels_last, dict())):
    Tc, Sc = T.to(dtype).to(memory_format=fmt), torch.randn_like(T).to(dtype).to(memory_format=fmt)
    Sq = None if kw.get("divergence") == "kl" else (Sc + 0.01)
    fwd_bwd(lambda S: F.q_ada_loss(Tc, S, Sq, form="simam", **kw), Sc)
fwd_bwd(lambda S: F.q_ada_loss(torch.randn(1, 4, 90, 90), S, form="simam"), torch.randn(1, 4, 90, 90))  # rows in chunks
for dtype, fmt, hw in ((torch.bfloat16, torch.contiguous_format, 9), (torch.float16, torch.channels_last, 9),
                       (torch.bfloat16, torch.contiguous_format, 90)):  # Q-ADA's Q2 form, the teacher's own Tq
    Tc = torch.randn(1, 24, hw, hw).to(dtype).to(memory_format=fmt)
    Sc = torch.randn_like(Tc)
    fwd_bwd(lambda S: F.q_ada_loss(Tc, S, Sc + 0.01, 0.25, Tq=Tc + 0.01, form="q2"), Sc)
fwd_bwd(lambda S: F.q_ada_loss(T, S, form="q2", divergence="kl"), torch.randn_like(T))

from q2kernels.ops import fusion as _fusion
def fusion_case(channels, fuse, dtype, fmt, affine):
    xs = [torch.randn(1, c, 40, 40).to(dtype).to(memory_format=fmt).requires_grad_() for c in channels]
    C = sum(channels) if fuse == "concat" else channels[0]
    gb = (torch.ones(C, requires_grad=True), torch.zeros(C, requires_grad=True)) if affine else (None, None)
    F.gated_fusion(xs, torch.zeros(len(xs), requires_grad=True), *gb, fuse=fuse).backward(torch.randn(1, C, 40, 40))
for fmt in (torch.contiguous_format, torch.channels_last):
    fusion_case([512, 256], "concat", torch.bfloat16, fmt, True)
    fusion_case([128, 256], "concat", torch.float32, fmt, True)
fusion_case([256, 256], "sum", torch.float16, torch.channels_last, False)
fusion_case([64, 32, 16, 16], "concat", torch.bfloat16, torch.channels_last, True)

# int64 offsets (tensors over 2^31 elements), forced on small tensors
_layout.needs_int64 = lambda t: True
_fusion._max_offset = lambda t: 2**31
fwd_bwd(lambda x, s: F.lsq_quantize(x, s, 4, axis=1), xl, s6)
fwd_bwd(lambda w: F.dorefa_weight_quantize(w, 4), x.bfloat16())
fwd_bwd(lambda x, st, a, a1, a2: F.n2uq_act_quantize(x, st, a, a1, a2, 4), xl.bfloat16(),
        torch.zeros(1), torch.full((15,), 2.0 / 15), one, one.clone())
fwd_bwd(lambda w: F.n2uq_weight_quantize(w, 4), x)
fwd_bwd(lambda S: F.q_ada_loss(T.to(memory_format=torch.channels_last), S, S + 0.01),
        torch.randn_like(T).to(memory_format=torch.channels_last))
fusion_case([512, 256], "concat", torch.bfloat16, torch.channels_last, True)
"""


def test_every_kernel_compiles_for_sm90_without_spills(tmp_path):
    drive = tmp_path / "drive.py"
    drive.write_text(_DRIVE)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _SCRIPT, str(drive)], capture_output=True, text=True,
                       env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    lines = r.stdout.strip().splitlines()
    print(r.stdout)
    compiled = {line.split()[0] for line in lines}
    for kernel in ("_fake_quant_fwd_kernel", "_fake_quant_bwd_kernel", "_absmax_kernel", "_dorefa_fwd_kernel",
                   "_dorefa_bwd_partials_kernel", "_dorefa_bwd_kernel", "_ltq_tables_kernel", "_ltq_fwd_kernel",
                   "_ltq_bwd_kernel", "_ltq_bwd_finish_kernel", "_n2uq_weight_fwd_kernel", "_n2uq_weight_bwd_kernel",
                   "_q_ada_fwd_kernel", "_q_ada_bwd_kernel", "_gated_fusion_fwd_kernel", "_gated_fusion_bwd_kernel"):
        assert kernel in compiled, f"{kernel} was never launched by the driver calls"
    spills = [line for line in lines if "LOCAL:0" not in line]
    assert not spills, "register spills:\n" + "\n".join(spills)
