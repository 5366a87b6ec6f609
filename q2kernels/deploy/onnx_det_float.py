"""The ONNX form of the deterministic float ops (ops.det_float, deploy.det_float): the same float32
operations in the same order, so onnxruntime gives the bits q2kernels gives.

Each product and each sum of the C++ loop is one elementwise Mul or Add (float32, rounded to nearest
even; onnxruntime fuses neither into an fma), over whole maps at once:
- det_conv2d: for each tap (i, j), a strided Slice of the zero-padded input is the window every
  output reads at that tap; for each input channel ci and tap (ci outer, then i, then j), the
  accumulator gets Add(acc, Mul(window[ci], weight[:, ci, i, j])). acc starts at +0, as in the C++.
  A padded tap adds w·0 = ±0, which leaves an accumulator that is never -0 unchanged, as skipping it
  does in the C++. Then the bias and the epilogue's ReLU or SiLU (onnx_graph.relu_det, silu_det).
- det_matmul and det_softmax's sum run over a runtime size (tokens of an attention), so they are an
  ONNX Loop over k that adds one term per iteration, in order.
- det_silu: onnx_graph.silu_det.
"""
from __future__ import annotations

import numpy as np

from ..ops import det_float as df
from .det_float import DetConv2d


def _float(ex, v) -> str:
    if not isinstance(v, str):
        ex.refuse(f"expected a float tensor, got {type(v).__name__}")
    return v


def _windows(g, x: str, m: DetConv2d) -> list[list[str]]:
    """windows[i][j]: the (N, C, H_out, W_out) values tap (i, j) reads (x already padded)."""
    (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
    i64 = lambda v: g.const(np.asarray(v, np.int64), np.int64)  # noqa: E731
    hw = g.op("Shape", [x], start=2, end=4)
    step = i64([sh, sw])
    # H_out - 1 = (H_padded - dh·(kh-1) - 1) // sh; tap (i, j) reads rows i·dh + sh·(0..H_out-1).
    last = g.op("Mul", [g.op("Div", [g.op("Sub", [hw, i64([dh * (kh - 1) + 1, dw * (kw - 1) + 1])]), step]), step])
    axes = i64([2, 3])
    return [[g.op("Slice", [x, i64([i * dh, j * dw]), g.op("Add", [last, i64([i * dh + 1, j * dw + 1])]), axes, step],
                  "window") for j in range(kw)] for i in range(kh)]


def det_conv(ex, m: DetConv2d, x):
    g = ex.g
    x = _float(ex, x)
    (ph, pw) = m.padding
    if ph or pw:
        x = g.op("Pad", [x, g.const(np.asarray([0, 0, ph, pw, 0, 0, ph, pw], np.int64), np.int64)], "pad")
    windows = _windows(g, x, m)
    (kh, kw) = m.kernel_size
    cin, cout, groups = m.in_channels, m.out_channels, m.groups
    cpi, cpo = cin // groups, cout // groups
    w = m.weight.detach().float().cpu().numpy()
    if groups == 1 and cin > 1:
        sizes = g.const(np.ones(cin, np.int64), np.int64)
        pieces = [[[] for _ in range(kw)] for _ in range(kh)]
        for i in range(kh):
            for j in range(kw):
                outs = [g.name("channel") for _ in range(cin)]
                g.nodes.append(g.helper.make_node("Split", [windows[i][j], sizes], outs, name=g.name("n_split"),
                                                  axis=1))
                pieces[i][j] = outs

        def tap(ci, i, j):
            return pieces[i][j][ci]
    elif groups == 1:
        def tap(ci, i, j):
            return windows[i][j]
    else:
        # Output channel co reads input channel (co // cpo)·cpi + ci: a Gather (none where that is co).
        def tap(ci, i, j):
            index = np.arange(cout) // cpo * cpi + ci
            if np.array_equal(index, np.arange(cin)):
                return windows[i][j]
            return g.op("Gather", [windows[i][j], g.const(index.astype(np.int64), np.int64)], axis=1)
    acc = g.const(np.float32(0), np.float32)
    for ci in range(cpi):
        for i in range(kh):
            for j in range(kw):
                acc = g.op("Add", [acc, g.op("Mul", [tap(ci, i, j), g.channel_const(w[:, ci, i, j])])])
    if m.bias is not None:
        acc = g.op("Add", [acc, g.channel_const(m.bias.detach().float().cpu().numpy())])
    return {"identity": lambda v: v, "relu": g.relu_det, "silu": g.silu_det}[m.act](acc)


def det_matmul(ex, a, b):
    """sum over k in order of a[..., :, k:k+1] · b[..., k:k+1, :] (an ONNX Loop over k)."""
    g = ex.g
    a, b = _float(ex, a), _float(ex, b)
    count = g.op("Squeeze", [g.op("Shape", [a], start=-1)])
    shape = g.op("Concat", [g.op("Shape", [a], end=-1), g.op("Shape", [b], start=-1)], axis=0)

    def body(k, acc):
        kk = g.op("Unsqueeze", [k, g.const(np.asarray([0], np.int64), np.int64)])
        col = g.op("Gather", [a, kk], axis=-1)   # (..., M, 1)
        row = g.op("Gather", [b, kk], axis=-2)   # (..., 1, N)
        return g.op("Add", [acc, g.op("Mul", [col, row])])
    return g.loop(count, g.zeros_like_shape(shape), body)


def det_softmax(ex, x, dim: int):
    """exp_det(x - max) / (their sum in order along dim)."""
    g = ex.g
    x = _float(ex, x)
    rank = ex.ranks[ex.index_of_first_arg]
    if not isinstance(dim, int) or isinstance(dim, bool) or not -rank <= dim < rank:
        ex.refuse(f"det_softmax: dim {dim!r} of a rank-{rank} tensor")
    axis = dim % rank
    axes = g.const(np.asarray([axis], np.int64), np.int64)
    top = g.op("ReduceMax", [x, axes], keepdims=1)
    e = g.exp_det(g.op("Sub", [x, top]))
    count = g.op("Squeeze", [g.op("Shape", [x], start=axis, end=axis + 1)])
    reduced = g.op("Shape", [top])

    def body(k, s):
        return g.op("Add", [s, g.op("Gather", [e, g.op("Unsqueeze", [k, g.const(np.asarray([0], np.int64),
                                                                                np.int64)])], axis=axis)])
    return g.op("Div", [e, g.loop(count, g.zeros_like_shape(reduced), body)])


MODULE_EMITTERS = {DetConv2d: det_conv}
FUNCTION_EMITTERS = {
    df.det_matmul: det_matmul,
    df.det_softmax: det_softmax,
    df.det_silu: lambda ex, x: ex.g.silu_det(_float(ex, x)),
}
