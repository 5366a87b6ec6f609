"""A small ONNX graph builder for the exporters (deploy.onnx_export, deploy.onnx_qdq), and the exact
float arithmetic of the integer epilogue written as ONNX operators.

ONNX has no fused multiply-add, and the epilogue (csrc/epilogue.h, docs/math.md §7) uses fma: a
Mul then an Add rounds twice and can differ from fma in the last bit, which can move a code across a
rounding boundary. `fma` below computes fma(a, b, c) of float32 operands exactly as IEEE's single
rounding does, from float64 operations that ONNX has:

1. p = a·b in float64 is exact (24 + 24 significand bits <= 53), and t = p + c is p + c rounded to
   float64; TwoSum gives its exact error e (p + c = t + e exactly).
2. Rounding t to float32 gives the correctly rounded result, unless t lies exactly halfway between
   two float32 neighbours while e != 0 (a double rounding): t's rounding then picks the even
   neighbour f, while the exact value lies past the midpoint, towards the other one, g, when e has
   the sign of t - f. (t can never cross a midpoint: the midpoints are float64 numbers.)
3. g = f + 2·(t - f) is exact in float64; t is a midpoint exactly when t != f and g is a float32.
   The result is g where t is a midpoint and e·(t - f) > 0, else f.

exp_det, silu_det, the quantizers and the epilogue then follow csrc/epilogue.h operation by
operation (tests/test_onnx_export.py checks them against the C++ ops bit for bit).
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np

from ..ops.int_conv import AFF_ADD, AFF_MUL, ALPHA, BIAS, GAMMA, Q_MUL, Q_OFF


def onnx_modules():
    """onnx and its helpers, imported on first use: onnx is an optional extra (pip install "q2kernels[onnx]")."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as e:
        raise ImportError("the ONNX export needs onnx: pip install \"q2kernels[onnx]\" (onnx and onnxruntime)") from e
    return onnx, TensorProto, helper, numpy_helper


def f32(decimal: str) -> np.float32:
    """The float32 nearest to a decimal literal, rounded once, as a C++ compiler reads 1.2345f
    (np.float32(float(s)) rounds twice: to float64 first)."""
    if decimal in ("inf", "-inf"):
        return np.float32(decimal)
    exact = Fraction(decimal)
    below = np.float32(float(exact))
    candidates = [np.nextafter(below, np.float32(-np.inf)), below, np.nextafter(below, np.float32(np.inf))]
    best = min(candidates, key=lambda c: (abs(Fraction(float(c)) - exact), int(c.view(np.int32)) & 1))
    return np.float32(best)


class GraphBuilder:
    """Nodes, initializers and unique names of one ONNX graph. Each emitting method returns the name
    of the value it made."""

    def __init__(self, opset: int):
        self.onnx, self.TensorProto, self.helper, self.numpy_helper = onnx_modules()
        self.opset = opset
        self.nodes, self.initializers, self.inputs, self.outputs = [], [], [], []
        self._names: set[str] = set()
        self._constants: dict = {}

    def name(self, hint: str) -> str:
        base = "".join(ch if ch.isalnum() or ch in "_." else "_" for ch in hint) or "v"
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, **attrs) -> str:
        out = self.name(hint or op_type.lower())
        self.nodes.append(self.helper.make_node(op_type, inputs, [out], name=self.name("n_" + out), **attrs))
        return out

    def const(self, value, dtype, hint: str = "c") -> str:
        """An initializer holding value as dtype (a numpy dtype); equal constants are shared."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._constants:
            name = self.name(hint)
            self.initializers.append(self.numpy_helper.from_array(arr, name))
            self._constants[key] = name
        return self._constants[key]

    def channel_const(self, values, dtype=np.float32, hint: str = "c") -> str:
        """A per-channel constant, shaped (1, C, 1, 1) to broadcast over (N, C, H, W)."""
        return self.const(np.asarray(values, dtype).reshape(1, -1, 1, 1), dtype, hint)

    def cast(self, x: str, to: str) -> str:
        return self.op("Cast", [x], to={"float32": self.TensorProto.FLOAT, "float64": self.TensorProto.DOUBLE,
                                        "int8": self.TensorProto.INT8, "int32": self.TensorProto.INT32,
                                        "int64": self.TensorProto.INT64}[to])

    def where(self, cond: str, a: str, b: str) -> str:
        return self.op("Where", [cond, a, b])

    def model(self, producer: str):
        graph = self.helper.make_graph(self.nodes, "q2kernels", self.inputs, self.outputs, self.initializers)
        m = self.helper.make_model(graph, opset_imports=[self.helper.make_opsetid("", self.opset)],
                                   producer_name=producer)
        m.ir_version = min(m.ir_version, 10)  # onnxruntime reads IR <= 10 (ONNX 1.16 on)
        return m

    def loop(self, count: str, state: str, body) -> str:
        """An ONNX Loop of `count` (an int64 scalar) iterations carrying one float32 value from `state`:
        each iteration's value is body(i, value) (names; body emits its nodes through this builder,
        reading outer values and constants freely). Sums whose length is a runtime size (a matmul's
        inner dimension, a softmax's axis) run in order this way."""
        outer, self.nodes = self.nodes, []
        i, cond, value = self.name("i"), self.name("cond"), self.name("carried")
        result = body(i, value)
        cond_out = self.op("Identity", [cond])
        nodes, self.nodes = self.nodes, outer
        info = self.helper.make_tensor_value_info
        graph = self.helper.make_graph(
            nodes, self.name("loop_body"),
            [info(i, self.TensorProto.INT64, []), info(cond, self.TensorProto.BOOL, []),
             info(value, self.TensorProto.FLOAT, None)],
            [info(cond_out, self.TensorProto.BOOL, []), info(result, self.TensorProto.FLOAT, None)])
        return self.op("Loop", [count, "", state], "loop", body=graph)

    def zeros_like_shape(self, shape: str) -> str:
        """A float32 tensor of +0 of the given shape (an int64 1-d value)."""
        zero = self.numpy_helper.from_array(np.zeros(1, np.float32), self.name("zero"))
        return self.op("ConstantOfShape", [shape], "zeros", value=zero)

    # Exact float32 arithmetic (module docstring).
    def fma(self, a: str, b: str, c: str) -> str:
        """fma(a, b, c) of float32 values (names), rounded once."""
        ad, bd, cd = (self.cast(v, "float64") for v in (a, b, c))
        p = self.op("Mul", [ad, bd])
        t = self.op("Add", [p, cd])
        # TwoSum: e = (p - (t - (t - p))) + (c - (t - p)), with p + c = t + e exactly.
        bv = self.op("Sub", [t, p])
        av = self.op("Sub", [t, bv])
        e = self.op("Add", [self.op("Sub", [p, av]), self.op("Sub", [cd, bv])])
        f = self.cast(t, "float32")
        fd = self.cast(f, "float64")
        d = self.op("Sub", [t, fd])
        g = self.op("Add", [fd, self.op("Add", [d, d])])
        g32 = self.cast(g, "float32")
        zero = self.const(0.0, np.float64)
        midpoint = self.op("And", [self.op("Equal", [self.cast(g32, "float64"), g]),
                                   self.op("Not", [self.op("Equal", [d, zero])])])
        past = self.op("Greater", [self.op("Mul", [e, d]), zero])
        return self.where(self.op("And", [midpoint, past]), g32, f)

    def exp_det(self, x: str) -> str:
        """csrc/epilogue.h exp_det: Cody-Waite reduction, a degree-7 Taylor polynomial, 2^k; NaN stays
        NaN, x > 88.72 gives inf, x < -87 gives 0."""
        c = lambda s: self.const(f32(s), np.float32)  # noqa: E731 (a float32 literal, as the C++ writes it)
        in_range = self.op("And", [self.op("LessOrEqual", [x, c("88.72")]), self.op("GreaterOrEqual", [x, c("-87.0")])])
        # 0 where the result is not this branch's (out of range, ±inf, NaN): keeps k's table index in range.
        xs = self.where(in_range, x, c("0"))
        k = self.op("Round", [self.op("Mul", [xs, c("1.44269502")])])
        r = self.fma(k, c("-0.693145751953125"), xs)
        r = self.fma(k, c("-1.42860677e-06"), r)
        p = c("1.98412698e-04")
        for coef in ("1.38888889e-03", "8.33333333e-03", "4.16666667e-02", "1.66666667e-01", "0.5", "1.0", "1.0"):
            p = self.fma(p, r, c(coef))
        # ldexp(p, k): p·2^k in float64 is exact (2^k from a table, k in [-126, 128]), rounded once.
        pow2 = self.const([2.0 ** k for k in range(-130, 131)], np.float64, "pow2")
        idx = self.cast(self.op("Add", [k, c("130")]), "int64")
        scaled = self.cast(self.op("Mul", [self.cast(p, "float64"), self.op("Gather", [pow2, idx], axis=0)]), "float32")
        out = self.where(self.op("Less", [x, c("-87.0")]), c("0"), scaled)
        out = self.where(self.op("Greater", [x, c("88.72")]), c("inf"), out)
        return self.where(self.op("IsNaN", [x]), x, out)

    def silu_det(self, x: str) -> str:
        """x / (1 + exp_det(-x))."""
        e = self.exp_det(self.op("Neg", [x]))
        return self.op("Div", [x, self.op("Add", [self.const(np.float32(1), np.float32), e])])

    def relu_det(self, x: str) -> str:
        """y < 0 ? 0 : y (keeps -0 and NaN as the C++ does)."""
        zero = self.const(np.float32(0), np.float32)
        return self.where(self.op("Less", [x, zero]), zero, x)

    def quantize_round(self, z: str, q_mul: str, q_off: str, qn: int, qp: int) -> str:
        """R(clip((z - q_off)·q_mul, qn, qp)) as int8 codes; NaN gives qn (the first comparison is false)."""
        v = self.op("Mul", [self.op("Sub", [z, q_off]), q_mul])
        lo, hi = self.const(np.float32(qn), np.float32), self.const(np.float32(qp), np.float32)
        v = self.where(self.op("Greater", [v, lo]), v, lo)
        v = self.where(self.op("Less", [v, hi]), v, hi)
        return self.cast(self.op("Round", [v]), "int8")

    def quantize_thresholds(self, z: str, q_mul: str, q_off: str, thresholds: np.ndarray, qn: int) -> str:
        """qn + #{i : (z - q_off)·q_mul > t_i} as int8 codes (NaN counts none)."""
        u = self.op("Mul", [self.op("Sub", [z, q_off]), q_mul])
        above = self.op("Greater", [self.op("Unsqueeze", [u, self.const([-1], np.int64)]),
                                    self.const(np.asarray(thresholds, np.float32), np.float32, "thresholds")])
        count = self.op("ReduceSum", [self.cast(above, "int32"), self.const([-1], np.int64)], keepdims=0)
        return self.cast(self.op("Add", [count, self.const(np.int32(qn), np.int32)]), "int8")

    def affine(self, y: str, mul: np.ndarray, add: np.ndarray) -> str:
        """fma(mul, y, add) per channel; with mul = 1 it is one rounded add (1·y is exact), with add = +0
        one rounded product plus +0 (which turns a -0 product into +0, as the fma does)."""
        if np.all(mul == 1):
            return self.op("Add", [y, self.channel_const(add)])
        if np.all(np.asarray(add, np.float32).view(np.int32) == 0):
            return self.op("Add", [self.op("Mul", [self.channel_const(mul), y]), self.const(np.float32(0), np.float32)])
        return self.fma(self.channel_const(mul), y, self.channel_const(add))

    def epilogue(self, acc: str, taps: str | None, ep: np.ndarray, act: str, codes: bool, qn: int = 0, qp: int = 15,
                 thresholds: np.ndarray | None = None) -> str:
        """The integer conv's epilogue (csrc/epilogue.h) on the float32 values of I (acc) and J (taps; None:
        J = 0) with the float32 (EPILOGUE_ROWS, C) rows ep: the head's int8 codes, or z (float32)."""
        alpha, gamma, bias = (self.channel_const(ep[r]) for r in (ALPHA, GAMMA, BIAS))
        if taps is not None:
            inner = self.fma(gamma, taps, bias)
        else:  # fma(gamma, 0, bias): gamma·0 is an exact (signed) zero, so one rounded add
            inner = self.channel_const(ep[GAMMA] * np.float32(0) + ep[BIAS])
        y = self.fma(alpha, acc, inner)
        y = {"identity": lambda v: v, "relu": self.relu_det, "silu": self.silu_det}[act](y)
        z = self.affine(y, ep[AFF_MUL], ep[AFF_ADD])
        if not codes:
            return z
        q_mul, q_off = self.channel_const(ep[Q_MUL]), self.channel_const(ep[Q_OFF])
        if thresholds is not None:
            return self.quantize_thresholds(z, q_mul, q_off, thresholds, qn)
        return self.quantize_round(z, q_mul, q_off, qn, qp)
