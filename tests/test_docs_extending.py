"""docs/extending.md names only what exists. Every `backticked` span of it that is a repository path
(q2kernels/, tests/, benchmarks/, csrc/, docs/, python/), a `path::name` (a name defined in that
file), or a dotted name under q2kernels., benchmarks. or tests. is resolved here, and the test fails
naming each one that does not: a rename that forgets the guide fails here.

Dotted names are resolved from the source (ast) first, so a module that needs an optional
dependency (the Ultralytics integration) is checked without importing it; a name the source does not
define at top level (a lazy re-export such as q2kernels.deploy.convert_to_int) is then imported."""
from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "extending.md"
ROOTS = ("q2kernels", "tests", "benchmarks", "csrc", "docs", "python")
PYTHON_ROOTS = ("q2kernels", "tests", "benchmarks")


def _spans(text: str) -> list[str]:
    """The `code` spans of a markdown text, fenced blocks left out."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.findall(r"`([^`\n]+)`", text)


def _module_file(parts: list[str]) -> tuple[Path, int] | None:
    """The file of the longest module prefix of the dotted parts, and how many parts it took."""
    for n in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:n])
        for f in (base.with_suffix(".py"), base / "__init__.py"):
            if f.is_file():
                return f, n
    return None


def _defines(tree: ast.AST, name: str) -> ast.AST | None:
    """The node in tree's body (a module or a class) that binds `name`, or None."""
    for node in getattr(tree, "body", []):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return node
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
        for t in targets:
            elts = t.elts if isinstance(t, ast.Tuple) else [t]
            if any(isinstance(e, ast.Name) and e.id == name for e in elts):
                return node
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if any((a.asname or a.name.split(".")[0]) == name for a in node.names):
                return node
    return None


def _dotted_exists(name: str) -> bool:
    parts = name.split(".")
    found = _module_file(parts)
    if found is None:
        return False
    path, n = found
    node: ast.AST | None = ast.parse(path.read_text())
    for attr in parts[n:]:
        node = _defines(node, attr) if node is not None else None
    if node is not None:
        return True
    try:  # not defined at top level in the source: a lazy or computed attribute
        obj = importlib.import_module(".".join(parts[:n]))
        for attr in parts[n:]:
            obj = getattr(obj, attr)
        return True
    except Exception:  # noqa: BLE001  (any failure to resolve is a missing name)
        return False


def _path_exists(span: str) -> bool:
    if "*" in span:
        return any(ROOT.glob(span))
    return (ROOT / span).exists()


def _symbol_in_file(path: str, symbol: str) -> bool:
    file = ROOT / path
    if not file.is_file():
        return False
    if file.suffix == ".py":
        node: ast.AST | None = ast.parse(file.read_text())
        for attr in symbol.split("."):
            node = _defines(node, attr) if node is not None else None
        return node is not None
    return re.search(rf"\b{re.escape(symbol)}\b", file.read_text()) is not None


def _classify(span: str) -> str | None:
    span = span.strip()
    if "<" in span or " " in span:
        return None  # a pattern (benchmarks/bench_<op>.py) or a command line
    head = span.split("/")[0]
    if "::" in span and "/" in span.split("::")[0]:
        return "symbol" if head in ROOTS else None
    if "/" in span:
        return "path" if head in ROOTS else None
    if re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)+", span) and span.split(".")[0] in PYTHON_ROOTS:
        return "dotted"
    return None


def _checked_spans() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"path": [], "symbol": [], "dotted": []}
    for span in _spans(DOC.read_text()):
        kind = _classify(span)
        if kind and span not in out[kind]:
            out[kind].append(span)
    return out


def test_the_guide_names_real_things():
    spans = _checked_spans()
    # The guide is about files and functions: if the parser found few, it is the parser that is wrong.
    assert len(spans["path"]) >= 30 and len(spans["dotted"]) >= 40 and len(spans["symbol"]) >= 15, \
        {k: len(v) for k, v in spans.items()}
    missing = [s for s in spans["path"] if not _path_exists(s)]
    missing += [s for s in spans["symbol"] if not _symbol_in_file(*s.split("::", 1))]
    missing += [s for s in spans["dotted"] if not _dotted_exists(s)]
    assert not missing, f"docs/extending.md names what does not exist: {missing}"


@pytest.mark.parametrize("span,ok", [
    ("q2kernels/ops/fake_quant.py", True), ("q2kernels/ops/nope.py", False),
    ("q2kernels.ops.fake_quant.LSQ", True), ("q2kernels.ops.fake_quant.NOPE", False),
    ("q2kernels.deploy.convert_to_int", True),            # a lazy re-export, imported
    ("q2kernels.nn.quantizers.Quantizer.int_weight", True), ("q2kernels.nn.quantizers.Quantizer.nope", False),
    ("tests/test_toy_quantizer.py::ToyUniformQuantizer.int_activation", True),
    ("tests/test_toy_quantizer.py::nope", False),
    ("csrc/cuda/register_cuda.cpp::mma_path", True), ("csrc/cuda/register_cuda.cpp::nope_path", False),
])
def test_the_checker_tells_real_from_missing(span, ok):
    kind = _classify(span)
    check = {"path": _path_exists, "dotted": _dotted_exists,
             "symbol": lambda s: _symbol_in_file(*s.split("::", 1))}[kind]
    assert check(span) is ok


def test_the_toy_quantizer_follows_the_guides_steps():
    """tests/test_toy_quantizer.py is the guide's worked example: its quantizer defines what steps 1-6
    of "A quantizer" ask for, and its comments carry the step numbers in order."""
    source = (ROOT / "tests" / "test_toy_quantizer.py").read_text()
    tree = ast.parse(source)
    toy = _defines(tree, "ToyUniformQuantizer")
    assert isinstance(toy, ast.ClassDef) and any(getattr(b, "id", None) == "Quantizer" for b in toy.bases)
    for member in ("state_keys", "__init__", "quantize", "initialize", "config", "int_activation", "int_weight",
                   "step_size"):
        assert _defines(toy, member) is not None, member
    assert "register_recipe(" in source
    steps = [int(n) for n in re.findall(r"# Step (\d)", source)]
    assert steps == sorted(steps) and set(steps) == {1, 2, 3, 4, 5, 6}, steps
    guide = DOC.read_text()
    for n, title in enumerate(["Subclass", "The forward", "The first-batch initialisation",
                               "The deployment protocol", "The quantisation step", "A recipe"], 1):
        assert f"{n}. **{title}**" in guide, title
