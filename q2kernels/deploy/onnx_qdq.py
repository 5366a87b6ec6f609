"""export_onnx_qdq: a fake-quant (QAT) model as ONNX QuantizeLinear/DequantizeLinear pairs, the form
TensorRT and other Q/DQ consumers build their own integer engines from.

The model is traced as convert_to_int traces it (deploy.trace; QConv2d, quantizers and fusion nodes
are leaves). Each QConv2d becomes:
- its input quantizer as QuantizeLinear -> DequantizeLinear, per tensor: scale = the quantizer's step,
  zero point 0, or the integer -offset/step where the offset (LSQ+'s β) is a whole number of steps;
  an offset that is not is subtracted before and added after the pair. Codes go in int4/uint4 where
  they fit (opset 21 has them), else int8/uint8 (always, with int8_containers=True, for consumers
  without 4-bit Q/DQ); a code range narrower than the container's is clipped first, as the quantizer
  clips.
- its weight as the integer levels (int4 or int8 initializer) -> DequantizeLinear per output channel
  (axis 0): the quantizer protocol's IntWeight, so levels·step is the fake-quant weight.
- Conv with the float bias. BatchNorm, activations and the other float ops as deploy.onnx_export
  writes them.
N2UQ activations (non-uniform thresholds) and quantizers without an integer form have no Q/DQ form
and are refused by name, as are uncalibrated fusion nodes (their LayerNorm).

The result equals the fake-quant model up to the rounding ties of two different computations:
QuantizeLinear divides by the scale where the quantizer multiplies by its reciprocal (x·(1/s) and x/s
differ in the last bit), so a value within an ulp of a decision boundary may take the neighbouring
code (tests/test_onnx_export.py measures how many do).
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from .._validate import check_bool
from ..nn import QConv2d, Quantizer
from ..nn.fusion import GatedFusion
from ..nn.protocol import NoIntegerForm
from . import onnx_export as ox
from .fixed_fusion import FixedFusion
from .onnx_graph import GraphBuilder
from .trace import symbolic_trace

_INT_TYPES = {  # (signed, bits) -> (ONNX type name, numpy dtype of the initializer, lo, hi)
    (True, 4): ("INT4", np.int8, -8, 7), (False, 4): ("UINT4", np.uint8, 0, 15),
    (True, 8): ("INT8", np.int8, -128, 127), (False, 8): ("UINT8", np.uint8, 0, 255)}


def _container(lo: int, hi: int, signed_only: bool = False, min_bits: int = 4):
    """The narrowest of int4/uint4/int8/uint8 (at least min_bits wide) that holds lo..hi (None: none does)."""
    for bits in (b for b in (4, 8) if b >= min_bits):
        for signed in ((True,) if signed_only or lo < 0 else (False, True)):
            name, dtype, tlo, thi = _INT_TYPES[(signed, bits)]
            if tlo <= lo and hi <= thi:
                return name, dtype, tlo, thi
    return None


def _typed_const(g: GraphBuilder, values, container, hint: str) -> str:
    """An initializer of int4/uint4/int8/uint8 values (onnx packs the 4-bit ones)."""
    name_type, dtype, _, _ = container
    arr = np.asarray(values, dtype)
    name = g.name(hint)
    g.initializers.append(g.helper.make_tensor(name, getattr(g.TensorProto, name_type), arr.shape,
                                               arr.flatten().tolist()))
    return name


def _act_qdq(ex: ox._Exporter, q: Quantizer, x: str, min_bits: int) -> str:
    g = ex.g
    try:
        form = q.int_activation()
    except NoIntegerForm as e:
        ex.refuse(f"its activation quantizer {e}")
    if form.thresholds is not None:
        ex.refuse(f"its activation quantizer ({q.kind}) has non-uniform thresholds, which QuantizeLinear "
                  "cannot express")
    step, offset = float(form.step), float(form.offset)
    zp_exact = -offset / step
    zp = int(round(zp_exact)) if offset and float(round(zp_exact)) * step == -offset else 0
    shift = offset if offset and not zp else 0.0
    container = _container(form.qn + zp, form.qp + zp, min_bits=min_bits)
    if container is None:
        ex.refuse(f"its codes {form.qn}..{form.qp} (zero point {zp}) fit no 8-bit container")
    f = lambda v: g.const(np.float32(v), np.float32)  # noqa: E731
    if shift:
        x = g.op("Sub", [x, f(shift)])
    if container[2] < form.qn + zp or form.qp + zp < container[3]:
        x = g.op("Clip", [x, f((form.qn + zp) * step + offset - shift), f((form.qp + zp) * step + offset - shift)])
    zero = _typed_const(g, zp, container, "zero_point")
    scale = f(step)
    y = g.op("DequantizeLinear", [g.op("QuantizeLinear", [x, scale, zero], "q"), scale, zero], "dq")
    return g.op("Add", [y, f(shift)]) if shift else y


def _weight_dq(ex: ox._Exporter, m: QConv2d, min_bits: int) -> str:
    g = ex.g
    w = m.weight.detach().float()
    try:
        form = m.weight_quantizer.int_weight(w, m.weight_quantizer(w).double())
    except NoIntegerForm as e:
        ex.refuse(f"its weight quantizer {e}")
    levels = (form.w_mul * form.codes + form.w_add).detach().cpu().numpy()
    container = _container(int(levels.min()), int(levels.max()), signed_only=True, min_bits=min_bits)
    if container is None:
        ex.refuse(f"its weight levels {int(levels.min())}..{int(levels.max())} fit no int8 container")
    codes = _typed_const(g, levels, container, "weight")
    zero = _typed_const(g, np.zeros(levels.shape[0]), container, "weight_zero")
    scale = g.const(form.step.detach().float().cpu().numpy(), np.float32, "weight_scale")
    return g.op("DequantizeLinear", [codes, scale, zero], "weight_dq", axis=0)


def _qconv(ex: ox._Exporter, m: QConv2d, x):
    g = ex.g
    x = ox._float(ex, x)
    if m.act_quantizer is not None:
        x = _act_qdq(ex, m.act_quantizer, x, ex.min_bits)
    if m.weight_quantizer is not None:
        w = _weight_dq(ex, m, ex.min_bits)
    else:
        w = g.const(m.weight.detach().float().cpu().numpy(), np.float32, "weight")
    if not isinstance(m.padding, tuple) or m.padding_mode != "zeros":
        ex.refuse(f"padding {m.padding!r} ({m.padding_mode}) is not exported")
    inputs = [x, w] + ([g.const(m.bias.detach().float().cpu().numpy(), np.float32, "bias")] if m.bias is not None else [])
    return g.op("Conv", inputs, "qconv", **ox._conv_attrs(m))


def _refuse_fusion(ex: ox._Exporter, m: GatedFusion, *args):
    ex.refuse("a GatedFusion (its per-pixel LayerNorm) is not exported: calibrate_fusion and remove_layernorm "
              "first (deploy.fusion), which leave a FixedFusion")


MODULE_EMITTERS = {**ox.MODULE_EMITTERS, QConv2d: _qconv, GatedFusion: _refuse_fusion}


def export_onnx_qdq(qat_model: nn.Module, example: torch.Tensor, path: str | os.PathLike, *,
                    opset: int = ox.DEFAULT_OPSET, int8_containers: bool = False) -> str:
    """Write the fake-quant model as Q/DQ ONNX to path (module docstring): one float32 input (N, C, H,
    W) of any batch and size, the model's outputs in order. int8_containers: codes in int8/uint8
    (clipped to their 4- or 3-bit range), for consumers without 4-bit Q/DQ. Returns the path. Raises
    ox.ExportRefused naming the first module that has no Q/DQ form."""
    if not isinstance(qat_model, nn.Module):
        raise TypeError(f"qat_model: expected an nn.Module, got {type(qat_model).__name__}")
    if not isinstance(example, torch.Tensor) or example.dim() != 4 or not example.is_floating_point():
        raise ValueError(f"example: expected a float (N, C, H, W) tensor, got {getattr(example, 'shape', example)!r}")
    if not isinstance(opset, int) or isinstance(opset, bool) or not 21 <= opset <= 26:
        raise ValueError(f"opset: expected an int in 21..26, got {opset!r}")
    int8_containers = check_bool(int8_containers, "int8_containers")
    if qat_model.training:
        raise ValueError("qat_model: put it in eval mode first (BatchNorm's running statistics are exported)")
    gm = symbolic_trace(qat_model, is_leaf=lambda m: isinstance(m, (QConv2d, Quantizer, GatedFusion, FixedFusion)))
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    values = _run(gm, nodes, example)
    g = GraphBuilder(opset)
    ex = ox._Exporter(g, dict(gm.named_modules()))
    ex.min_bits = 8 if int8_containers else 4
    ex.ranks = [v.dim() if isinstance(v, torch.Tensor) else None for v in values]
    env: dict = {}
    fill = lambda v: torch.fx.node.map_arg(v, lambda n: env[n])  # noqa: E731
    outputs = []
    for n in nodes:
        ex.node = n.name
        args, kwargs = fill(n.args), fill(n.kwargs)
        if n.op == "placeholder":
            name = g.name(n.name)
            g.inputs.append(g.helper.make_tensor_value_info(name, g.TensorProto.FLOAT,
                                                            ["batch", example.shape[1], "height", "width"]))
            env[n] = name
        elif n.op == "call_module":
            m = gm.get_submodule(n.target)
            emit = MODULE_EMITTERS.get(type(m))
            if emit is None:
                ex.refuse(f"a {type(m).__name__} module ({n.target}) has no Q/DQ ONNX form here")
            env[n] = emit(ex, m, *args, **kwargs)
        elif n.op == "call_function":
            emit = ox.FUNCTION_EMITTERS.get(n.target)
            if emit is None:
                ex.refuse(f"the function {getattr(n.target, '__name__', n.target)} has no ONNX form here")
            env[n] = emit(ex, *args, **kwargs)
        elif n.op == "call_method":
            emit = ox.METHOD_EMITTERS.get(n.target)
            if emit is None:
                ex.refuse(f"the tensor method {n.target} has no ONNX form here")
            first = n.args[0] if n.args else None
            ex.index_of_first_arg = index[first] if isinstance(first, torch.fx.Node) else None
            env[n] = emit(ex, *args, **kwargs)
        elif n.op == "output":
            outputs = ox._flat(args[0])
        else:
            ex.refuse(f"{n.op} nodes are not exported")
    for k, (v, t) in enumerate(zip(outputs, ox._flat(values[-1]))):
        name = g.op("Identity", [ox._float(ex, v)], f"output{k}")
        g.outputs.append(g.helper.make_tensor_value_info(name, g.TensorProto.FLOAT,
                                                         [f"output{k}_dim{d}" for d in range(t.dim())]))
    model = g.model("q2kernels.export_onnx_qdq")
    g.onnx.checker.check_model(model)
    g.onnx.save(model, os.fspath(path))
    return os.fspath(path)


def _run(gm, nodes, x) -> list:
    """Each node's value on x, in node order (the output node's: the model's output)."""
    values = []

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            values.append(value)
            return value

    with torch.no_grad():
        Recorder(gm).run(x)
    return values
