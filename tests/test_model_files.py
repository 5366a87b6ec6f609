"""Model files (deploy/serialize.py, deploy/int_graph.py) as an attacker or a careless user writes them.

Every file is made by save_int_model and then damaged; each must give a ValueError that names the
file and what is wrong, before anything runs. No content of a file may become code: the injection
below (a placeholder target that Python source generation would execute) must not run.
"""
import copy

import pytest
import torch
from torch import nn

from q2kernels.deploy import convert_to_int, load_int_model, save_int_model
from q2kernels.deploy import int_graph
from q2kernels.deploy.int_graph import IntGraph, MalformedGraph
from q2kernels.nn import DoReFaWeightQuantizer, LSQPlusQuantizer, LSQQuantizer, PACTQuantizer, QConv2d
from q2kernels.ops import int_conv as ic
from refusals import expect_load_refused


class _Net(nn.Module):
    """Integer convs, a float conv, a residual add and a kept-in-float QConv2d (reflect padding)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = QConv2d(8, 8, 3, padding=1, weight_quantizer=LSQQuantizer(4, "signed", axis=0, channels=8),
                         act_quantizer=LSQPlusQuantizer(4))
        self.bn = nn.BatchNorm2d(8)
        self.grouped = QConv2d(8, 8, 3, padding=1, groups=2, padding_mode="reflect",
                               weight_quantizer=DoReFaWeightQuantizer(4), act_quantizer=PACTQuantizer(4))
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        a = self.bn(self.a(self.stem(x)))
        return self.head(a + self.grouped(a))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(2, 3, 8, 8)
    net(x)  # initialise the quantizers
    net.eval()
    with pytest.warns(UserWarning, match="padding_mode='reflect'"):
        model = convert_to_int(net, x)
    path = tmp_path_factory.mktemp("files") / "model.pt"
    save_int_model(model, path)
    return path, x, model(x), model


def _write(tmp_path, record, name="bad.pt"):
    path = tmp_path / name
    torch.save(record, path)
    return path


def _record(saved):
    return torch.load(saved[0], weights_only=True)


def test_round_trip_is_exact_and_runs_without_generated_code(saved):
    path, x, expected, _ = saved
    model = load_int_model(path)
    assert isinstance(model.net, IntGraph)
    assert torch.equal(model(x), expected)


def test_code_in_a_placeholder_target_does_not_run(saved, tmp_path):
    marker = tmp_path / "pwned"
    rec = _record(saved)
    rec["nodes"][0]["target"] = f"x=__import__('os').system('touch {marker}')"
    expect_load_refused(_write(tmp_path, rec), "node 'x'", "is not an identifier")
    assert not marker.exists()


@pytest.mark.parametrize("edit,fragments", [
    (lambda r: r["nodes"][1].update(op="call_function", target="os.system"), ["calls 'os.system'"]),
    (lambda r: r["nodes"][1].update(op="call_function", target="builtins.eval"), ["calls 'builtins.eval'"]),
    (lambda r: r["nodes"][1].update(op="call_method", target="__reduce_ex__"), ["calls method '__reduce_ex__'"]),
    (lambda r: r["nodes"][1].update(op="exec"), ["unknown op 'exec'"]),
    (lambda r: r["nodes"][1].update(op="call_function", target=["unhashable"]), ["calls ['unhashable']"]),
    (lambda r: r["nodes"][1].update(name="a b"), ["name 'a b' is not an identifier"]),
    (lambda r: r["nodes"][1].update(args={"tuple": [{"node": "missing"}]}), ["refers to 'missing'"]),
    (lambda r: r["nodes"][1].update(args={"tuple": [{"evil": 1}]}), ["bad argument value {'evil': 1}"]),
    (lambda r: r["nodes"][1].update(kwargs={"dict": {"a-b": 1}}), ["identifier keys"]),
    (lambda r: r["nodes"][1].update(op="call_module", target="nowhere"), ["calls module 'nowhere'"]),
    (lambda r: r["nodes"][1].update(op="get_attr", target="secret"), ["reads attribute 'secret'"]),
    (lambda r: r["nodes"].pop(), ["the last node, and only it, must be the output"]),
    (lambda r: r["nodes"][1].pop("kwargs"), ["expected a record with keys"]),
    (lambda r: r.update(nodes="x"), ["nodes: expected a non-empty list"]),
])
def test_malformed_nodes_are_refused_by_name(saved, tmp_path, edit, fragments):
    rec = _record(saved)
    edit(rec)
    expect_load_refused(_write(tmp_path, rec), *fragments)


def test_getattr_reads_only_tensor_attributes(saved, tmp_path):
    rec = _record(saved)
    x = rec["nodes"][0]["name"]
    rec["nodes"].insert(1, {"name": "cls", "op": "call_function", "target": "getattr",
                            "args": {"tuple": [{"node": x}, "__class__"]}, "kwargs": {"dict": {}}})
    expect_load_refused(_write(tmp_path, rec), "node 'cls'", "getattr reads one of")


def test_graph_tables_are_the_only_extension_point(monkeypatch):
    """getattr(x, "shape"), getitem and a dtype argument run from the tables; a new function is one
    table entry."""
    def rec(name, op, target, *args):
        return {"name": name, "op": op, "target": target, "args": {"tuple": list(args)}, "kwargs": {"dict": {}}}

    nodes = [rec("x", "placeholder", "x"),
             rec("shape", "call_function", "getattr", {"node": "x"}, "shape"),
             rec("c", "call_function", "_operator.getitem", {"node": "shape"}, 1),
             rec("y", "call_function", "torch.hardtanh", {"node": "x"}),
             rec("out", "output", "output", {"tuple": [{"node": "c"}, {"node": "y"}]})]
    nodes.insert(4, {"name": "p", "op": "call_function", "target": "torch.softmax",
                     "args": {"tuple": [{"node": "y"}, 1]}, "kwargs": {"dict": {"dtype": {"dtype": "float64"}}}})
    nodes[-1]["args"]["tuple"][0]["tuple"].append({"node": "p"})
    with pytest.raises(MalformedGraph, match="calls 'torch.hardtanh'"):
        IntGraph(nodes, {}, {})
    monkeypatch.setitem(int_graph.FUNCTIONS, "torch.hardtanh", torch.nn.functional.hardtanh)
    c, y, p = IntGraph(nodes, {}, {})(torch.full((1, 5, 2, 2), 3.0))
    assert c == 5 and torch.equal(y, torch.ones(1, 5, 2, 2))
    assert p.dtype == torch.float64 and torch.equal(p, torch.full((1, 5, 2, 2), 0.2, dtype=torch.float64))
    nodes[4]["kwargs"]["dict"]["dtype"] = {"dtype": "Tensor"}
    with pytest.raises(MalformedGraph, match="node 'p': bad argument value {'dtype': 'Tensor'}"):
        IntGraph(nodes, {}, {})


def test_empty_truncated_and_corrupt_files(saved, tmp_path):
    data = saved[0].read_bytes()
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    expect_load_refused(empty, "is empty (0 bytes)")
    half = tmp_path / "half.pt"
    half.write_bytes(data[:len(data) // 2])
    expect_load_refused(half, "is truncated or corrupt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes(range(256)) * 8)
    expect_load_refused(junk, "not a model file: it is not a zip archive")
    objects = _write(tmp_path, {"format": "q2kernels.int_model", "payload": _Payload()}, "objects.pt")
    msg = expect_load_refused(objects, "is corrupt or holds objects other than tensors and plain data", "_Payload")
    assert "weights_only` set to `False`" not in msg


class _Payload:
    """An object a model file may not hold."""


@pytest.mark.parametrize("edit,fragments", [
    (lambda r: r.pop("format_version"), ["has no format_version"]),
    (lambda r: r.update(format_version=2), ["has format version 2, this version of q2kernels reads version 1"]),
    (lambda r: r.pop("channel_align"), ["has no channel_align"]),
    (lambda r: r.update(channel_align=2 * ic.CHANNEL_ALIGN),
     [f"packs channels in multiples of {2 * ic.CHANNEL_ALIGN}, this build of q2kernels._C in multiples of "
      f"{ic.CHANNEL_ALIGN}"]),
    (lambda r: r.pop("nodes"), ["has the keys", "expected"]),
    (lambda r: r.pop("format"), ["is not a q2kernels integer model"]),
    (lambda r: r.update(report={"a": 1}), ["report: expected a dict of strings"]),
    (lambda r: r.update(format_version=torch.ones(2)), ["has format version tensor"]),
    (lambda r: r.update({3: "x"}), ["has the keys", "3"]),
    (lambda r: r.update(attrs={"w": "not a tensor"}), ["attrs: w is a str, not a tensor"]),
])
def test_malformed_records_are_refused(saved, tmp_path, edit, fragments):
    rec = _record(saved)
    edit(rec)
    expect_load_refused(_write(tmp_path, rec), *fragments)


def _module_edits():
    def conv_huge(r):
        r["modules"]["head"]["config"]["in_channels"] = 2**40  # would allocate 2**40 * 2 floats

    def int_weight_shape(r):
        r["modules"]["a"]["tensors"]["weight"] = torch.zeros(3, 3, 3, 16, dtype=torch.uint8)

    def int_heads(r):
        r["modules"]["a"]["config"]["heads"][0]["nthr"] = 99

    def quantizer_kind(r):
        r["modules"]["grouped"]["act_quantizer"]["type"] = "Evil"

    def quantizer_bits(r):
        r["modules"]["grouped"]["act_quantizer"]["config"]["bits"] = 3

    def module_type(r):
        r["modules"]["head"]["type"] = "Sequential"

    def module_name(r):
        r["modules"]["x;y"] = r["modules"]["head"]

    def config_value(r):
        r["modules"]["head"]["config"]["padding_mode"] = "evil"

    return [
        (conv_huge, ["module 'head' (Conv2d)", "in_channels: expected an integer in 1..65536, got 1099511627776"]),
        (lambda r: r["modules"]["head"]["config"].update(in_channels=16),
         ["module 'head' (Conv2d)", "needs a tensor weight of shape (2, 16, 1, 1)"]),
        (int_weight_shape, ["module 'a' (IntConv2d)", "weight: expected uint8 (8, 3, 3, 16)"]),
        (int_heads, ["module 'a' (IntConv2d)", "heads: expected dicts"]),
        (lambda r: r["modules"]["a"]["config"].update(groups=0), ["module 'a' (IntConv2d)", "groups: expected"]),
        (lambda r: r["modules"]["a"]["config"].update(groups=3), ["module 'a' (IntConv2d)", "got 3"]),
        (quantizer_kind, ["module 'grouped' (QConv2d) act_quantizer", "registered kind"]),
        (quantizer_bits, ["module 'grouped' (QConv2d)", "holds a PACTQuantizer(bits=4)",
                          "the module is a PACTQuantizer(bits=3)"]),
        (module_type, ["module 'head'", "unknown module type 'Sequential'"]),
    (lambda r: r["modules"]["head"].update(type=["Conv2d"]), ["module 'head'", "unknown module type ['Conv2d']"]),
        (module_name, ["module 'x;y'", "not a dotted path"]),
        (config_value, ["module 'head' (Conv2d)", "padding_mode"]),
    ]


@pytest.mark.parametrize("edit,fragments", _module_edits())
def test_malformed_modules_are_refused_by_name(saved, tmp_path, edit, fragments):
    rec = _record(saved)
    edit(rec)
    expect_load_refused(_write(tmp_path, rec), *fragments)


def test_a_module_name_may_not_shadow_module_attributes(saved, tmp_path):
    rec = _record(saved)
    rec["modules"]["forward"] = copy.deepcopy(rec["modules"]["head"])
    rec["nodes"].insert(1, {"name": "f", "op": "call_module", "target": "forward",
                            "args": {"tuple": [{"node": rec["nodes"][0]["name"]}]}, "kwargs": {"dict": {}}})
    expect_load_refused(_write(tmp_path, rec), "attribute 'forward' already exists")


def test_a_quantizer_state_holds_its_tensors_and_nothing_else(saved, tmp_path):
    """The record's type and config are a quantizer's settings; its state is tensors only."""
    path, x, expected, _ = saved
    rec = _record(saved)
    assert all(isinstance(v, torch.Tensor) for slot in ("weight_quantizer", "act_quantizer")
               for v in rec["modules"]["grouped"][slot]["state"].values())
    assert torch.equal(load_int_model(_write(tmp_path, rec))(x), expected)
    rec["modules"]["grouped"]["act_quantizer"]["state"]["stray"] = torch.zeros(1)
    expect_load_refused(_write(tmp_path, rec, "stray.pt"), "module 'grouped' (QConv2d)", "act_quantizer.stray")
    del rec["modules"]["grouped"]["act_quantizer"]["state"]["stray"]
    rec["modules"]["grouped"]["act_quantizer"]["state"]["_extra_state"] = {"kind": "LSQQuantizer", "bits": 4}
    expect_load_refused(_write(tmp_path, rec, "plain.pt"), "_extra_state is a dict, not a tensor")
    del rec["modules"]["grouped"]["act_quantizer"]["state"]["_extra_state"]
    rec["modules"]["grouped"]["act_quantizer"]["state"]._metadata = {"": ["not", "a", "dict"]}
    expect_load_refused(_write(tmp_path, rec, "metadata.pt"), "module 'grouped' (QConv2d)", "metadata is not a dict")
    rec["modules"]["grouped"]["act_quantizer"]["state"]._metadata = {"": {"q2kernels.quantizer": torch.ones(1)}}
    expect_load_refused(_write(tmp_path, rec, "tensor.pt"), "module 'grouped' (QConv2d)", "a value of type Tensor")


def test_a_file_from_before_the_quantizer_settings_entry_loads(saved, tmp_path):
    """Quantizer states gained an entry (quantizer_settings) after files were written without it: such
    a file, a layer kept in float with its quantizers, loads and computes the same."""
    from q2kernels.nn.quantizers import SETTINGS_KEY

    path, x, expected, _ = saved
    rec = _record(saved)
    for slot in ("weight_quantizer", "act_quantizer"):
        state = rec["modules"]["grouped"][slot]["state"]
        assert SETTINGS_KEY in state
        del state[SETTINGS_KEY]
    assert torch.equal(load_int_model(_write(tmp_path, rec, "older.pt"))(x), expected)


def test_a_loaded_model_checks_its_inputs(saved):
    model = load_int_model(saved[0])
    with pytest.raises(TypeError, match=r"inputs: the model takes 1 input\(s\), got 2"):
        model(saved[1], saved[1])


def test_what_cannot_be_loaded_is_not_saved(saved, tmp_path):
    model = copy.deepcopy(saved[3])
    graph = model.net.graph
    out = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(out):
        graph.call_method("numpy", (out.args[0],))
    model.net.recompile()
    with pytest.raises(ValueError, match="save_int_model: the model cannot be saved: node 'numpy': calls method "
                                         "'numpy', which is not in int_graph.METHODS"):
        save_int_model(model, tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


class _AnchorLike(nn.Module):
    """Float graph code of the kind detection heads hold: shape reads, chunk, view, a dtype argument,
    a constant tensor (a get_attr node)."""

    def __init__(self):
        super().__init__()
        self.anchors = nn.Module()
        self.anchors.register_buffer("grid", torch.arange(18.0))

    def forward(self, x):
        a, b = x.chunk(2, 1)
        n = x.shape[0]
        return torch.cat([torch.softmax(a, 1, dtype=torch.float64).view(n, -1),
                          (b.sigmoid().flatten(1) + self.anchors.grid).double()], 1)


def test_a_float_graph_round_trips_through_the_tables(tmp_path):
    from torch import fx
    from q2kernels.deploy import IntModel
    model = IntModel(fx.symbolic_trace(_AnchorLike()), {})
    x = torch.randn(2, 4, 3, 3)
    save_int_model(model, tmp_path / "m.pt")
    loaded = load_int_model(tmp_path / "m.pt")
    assert isinstance(loaded.net, IntGraph) and torch.equal(loaded(x), model(x))
    assert torch.equal(loaded.net.anchors.grid, torch.arange(18.0))
