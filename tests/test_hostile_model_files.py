"""Model files that cost memory or time out of proportion to their size, and values a file gives
that used to be coerced or to fail only at run time (issue 23, classes 2, 3, 4 and 14).

Every seed in tests/hostile_corpus/model_files/ is a JSON description of a damage done to a model
that save_int_model wrote: "edits" (set a value at a path in the record, insert a node, or one of
the few whole-file damages below), the "phase" that must refuse it (load_int_model, or the first
forward, which checks the graph's shapes on the meta device before computing anything) and the
fragments the ValueError must hold (besides the file's name, for a load). A seed that got past its
check would allocate gigabytes or hang: the test then fails by running out of memory or time, never
by passing.
"""
import copy
import json
import pathlib
import time
import zipfile

import pytest
import torch

from q2kernels.deploy import load_int_model, save_int_model
from q2kernels.deploy import serialize
from q2kernels.deploy.int_graph import FORWARD_LIVE_FACTOR
from refusals import expect_load_refused
from test_model_files import saved  # noqa: F401  (the fixture: a small converted model, saved)

CORPUS = pathlib.Path(__file__).parent / "hostile_corpus" / "model_files"
SEEDS = sorted(CORPUS.glob("*.json"))
DTYPES = {"float32": torch.float32, "float64": torch.float64, "uint8": torch.uint8}


def _record(saved):
    return torch.load(saved[0], weights_only=True)


# The seeds' small language.
def _tensor(spec):
    t = torch.zeros(spec["zeros"], dtype=DTYPES[spec.get("dtype", "float32")], device=spec.get("device", "cpu"))
    if "expand" in spec:
        t = t.expand(spec["expand"])
    if "as_strided" in spec:
        t = t.as_strided(*spec["as_strided"])
    return t


def _shared(kind, levels):
    """A value of 2**levels items in a few bytes: each level holds the one below twice."""
    v = [0] if kind == "list" else (0,)
    for _ in range(levels):
        v = [v, v] if kind == "list" else (v, v)
    return v


def _deep(levels):
    v = []
    for _ in range(levels):
        v = [v]
    return v


def _value(v):
    if isinstance(v, list):
        return [_value(a) for a in v]
    if not isinstance(v, dict):
        return v
    if "$tensor" in v:
        return _tensor(v["$tensor"])
    if "$shared" in v:
        return _shared(v["$shared"]["kind"], v["$shared"]["levels"])
    if "$deep" in v:
        return _deep(v["$deep"])
    if "$repeat" in v:
        return [_value(v["$repeat"]["value"])] * v["$repeat"]["count"]
    return {k: _value(a) for k, a in v.items()}


def _set(rec, path, value):
    for key in path[:-1]:
        rec = rec[key]
    rec[path[-1]] = value


def _apply(rec, edit):
    op = edit["op"]
    if op == "set":
        _set(rec, edit["path"], _value(edit["value"]))
    elif op == "insert_node":
        rec["nodes"].insert(edit["index"], _value(edit["node"]))
    elif op == "copy_module":
        rec["modules"][edit["to"]] = copy.deepcopy(rec["modules"][edit["from"]])
    elif op == "shared_attrs":  # one tensor under many names: each module copy would be a new allocation
        t = torch.zeros(edit["elements"])
        rec["attrs"].update({f"t{i}": t for i in range(edit["count"])})
    elif op == "shared_key":  # hashing the key takes 2**levels steps, here and while unpickling
        rec["report"] = {_shared("tuple", edit["levels"]): "x"}
    elif op != "compress":  # a whole-file damage, done by _write
        raise AssertionError(f"unknown edit {op!r}")


def _write(seed, saved, tmp_path):
    rec = _record(saved)
    for edit in seed["edits"]:
        _apply(rec, edit)
    path = tmp_path / "hostile.pt"
    torch.save(rec, path)
    if any(e["op"] == "compress" for e in seed["edits"]):
        _deflate(path)
    return path


def _deflate(path):
    """The same archive with its entries compressed (torch's reader inflates them)."""
    with zipfile.ZipFile(path) as z:
        entries = [(i.filename, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in entries:
            z.writestr(name, data)


@pytest.mark.parametrize("seed_path", SEEDS, ids=[p.stem for p in SEEDS])
def test_every_corpus_seed_is_refused_by_name(saved, tmp_path, seed_path):
    seed = json.loads(seed_path.read_text())
    path = _write(seed, saved, tmp_path)
    start = time.monotonic()
    if seed["phase"] == "load":
        expect_load_refused(path, *seed["expect"])
    else:
        model = load_int_model(path)
        x = torch.randn(seed["input"]) if "input" in seed else saved[1]
        with pytest.raises(ValueError) as e:
            model(x)
        for fragment in seed["expect"]:
            assert fragment in str(e.value), str(e.value)
    assert time.monotonic() - start < 30, f"{seed_path.stem}: refused, but only after {time.monotonic() - start:.0f} s"


def test_the_corpus_covers_every_class():
    classes = {json.loads(p.read_text())["class"] for p in SEEDS}
    assert classes == {"tensors", "containers", "graph", "config"}


# What the checks must still let through.
def test_a_saved_model_loads_runs_and_resaves_exactly(saved, tmp_path):
    path, x, expected, _ = saved
    model = load_int_model(path)
    assert torch.equal(model(x), expected)
    assert torch.equal(model(x), expected)  # the second call skips the shape run: same result
    save_int_model(model, tmp_path / "again.pt")
    assert torch.equal(load_int_model(tmp_path / "again.pt")(x), expected)


def test_a_tensor_viewing_part_of_a_larger_storage_loads(saved, tmp_path):
    """A view is not an expansion: its storage holds every element it declares."""
    rec = _record(saved)
    rec["attrs"]["grid"] = torch.arange(64.0)[8:24].view(4, 4)
    torch.save(rec, tmp_path / "view.pt")
    model = load_int_model(tmp_path / "view.pt")
    assert torch.equal(model.net.grid, torch.arange(8.0, 24.0).view(4, 4))


def test_values_are_released_after_their_last_use(saved):
    """The interpreter keeps only what later nodes read: a chain's intermediate values are gone."""
    model = load_int_model(saved[0])
    release = model.net._release
    assert all(len(set(r)) == len(r) for r in release)
    assert sorted(j for r in release for j in r) == list(range(len(release)))


def test_the_forward_budget_grows_with_the_input(saved, tmp_path):
    """expand + contiguous to 80 x the input's elements: refused for an input under the floor only when
    it exceeds the floor, and for a large input only beyond FORWARD_LIVE_FACTOR times its bytes."""
    rec = _record(saved)
    nodes = rec["nodes"]
    x = {"node": nodes[0]["name"]}
    extra = [{"name": "copies", "op": "call_method", "target": "expand",
              "args": {"tuple": [{"node": "one"}, 2 * FORWARD_LIVE_FACTOR, -1, -1, -1, -1]}, "kwargs": {"dict": {}}},
             {"name": "dense", "op": "call_method", "target": "contiguous",
              "args": {"tuple": [{"node": "copies"}]}, "kwargs": {"dict": {}}}]
    one = {"name": "one", "op": "call_method", "target": "unsqueeze", "args": {"tuple": [x, 0]}, "kwargs": {"dict": {}}}
    rec["nodes"] = [nodes[0], one, *extra, *nodes[1:]]
    rec["nodes"][-1]["args"] = {"tuple": [{"tuple": [rec["nodes"][-1]["args"]["tuple"][0], {"node": "dense"}]}]}
    torch.save(rec, tmp_path / "copies.pt")
    model = load_int_model(tmp_path / "copies.pt")
    out, dense = model(saved[1])  # 128 x 1.5 KB: far under the floor
    assert dense.shape == (2 * FORWARD_LIVE_FACTOR, *saved[1].shape) and torch.equal(dense[5], saved[1])
    big = torch.zeros(1, 3, 1024, 1024)  # 12 MiB: 128 copies are 1.5 GiB, over 64 x 12 MiB
    with pytest.raises(ValueError, match="node 'dense'.*FORWARD_LIVE_FACTOR"):
        model(big)


# Class 14: the device a file was saved for.
def test_a_file_saved_from_cuda_tensors_loads_on_the_cpu(saved, tmp_path, monkeypatch):
    """The storages are tagged cuda:0 as torch.save writes them from a GPU; loading must not need one."""
    rec = _record(saved)
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    torch.save(rec, tmp_path / "cuda.pt")
    monkeypatch.undo()
    model = load_int_model(tmp_path / "cuda.pt")
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    assert torch.equal(model(saved[1]), saved[2])


@pytest.mark.parametrize("map_location,error,fragment", [
    ({"cuda:0": "cpu"}, TypeError, "map_location: expected a device"),
    (lambda s, loc: s, TypeError, "map_location: expected a device"),
    ("nowhere", ValueError, "map_location:"),
])
def test_map_location_is_a_device(saved, map_location, error, fragment):
    with pytest.raises(error, match=fragment):
        load_int_model(saved[0], map_location=map_location)


def test_map_location_moves_the_loaded_model(saved):
    model = load_int_model(saved[0], map_location="cpu")
    assert torch.equal(model(saved[1]), saved[2])


def test_the_limits_are_the_documented_ones():
    """docs/threat-model.md quotes these numbers."""
    doc = (pathlib.Path(__file__).parents[1] / "docs" / "threat-model.md").read_text()
    for value in (serialize.MAX_RECORD_ITEMS, serialize.MAX_RECORD_DEPTH, serialize.MAX_TENSOR_ELEMENTS,
                  FORWARD_LIVE_FACTOR):
        assert f"{value:,}".replace(",", " ") in doc or str(value) in doc, value
