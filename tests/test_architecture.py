"""The layering of docs/architecture.md, checked on the source: the import rules its table states
(parsed with ast, every import statement, also those inside functions), and the page's opening (one
mermaid picture, then the table naming each folder of the package and the repository)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"

# area -> the q2kernels areas (first component below q2kernels) its modules must never import.
FORBIDDEN = {
    "ops": {"nn", "deploy", "integrations", "functional"},
    "nn": {"deploy", "integrations"},
    "deploy": {"integrations"},
    "reference": {"ops", "nn", "deploy", "integrations", "functional"},
}


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path = ROOT) -> set[str]:
    """Every q2kernels module (or module.name) the file imports, relative imports resolved."""
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from .. import functional` imports the module q2kernels.functional: keep both forms.
            out |= {source} | {f"{source}.{a.name}" for a in node.names}
    return {m for m in out if m == "q2kernels" or m.startswith("q2kernels.")}


def area(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def violations(root: Path = ROOT) -> list[str]:
    out = []
    for path in sorted((root / "q2kernels").rglob("*.py")):
        mine = area(_module_name(path, root))
        for target in sorted(imports(path, root)):
            if area(target) in FORBIDDEN.get(mine, ()):
                out.append(f"{path.relative_to(root)} imports {target}")
    return out


def test_no_layer_imports_upwards():
    assert not violations(), "imports against docs/architecture.md's table:\n" + "\n".join(violations())


def test_the_checker_sees_relative_absolute_and_nested_imports(tmp_path):
    """The parser resolves the import forms the package uses; a violation planted in each form is found."""
    fake = tmp_path / "q2kernels"
    (fake / "ops").mkdir(parents=True)
    (fake / "ops" / "__init__.py").write_text("")
    (fake / "ops" / "a.py").write_text("from ..nn import QConv2d\n")
    (fake / "ops" / "b.py").write_text("def f():\n    import q2kernels.deploy.convert\n")
    (fake / "ops" / "c.py").write_text("from .. import functional as qF\nfrom . import _layout\n")
    (fake / "ops" / "ok.py").write_text("from ..reference import qrange\nfrom ..constants import SCALE_FLOOR\n")
    found = violations(tmp_path)
    assert found == ["q2kernels/ops/a.py imports q2kernels.nn", "q2kernels/ops/a.py imports q2kernels.nn.QConv2d",
                     "q2kernels/ops/b.py imports q2kernels.deploy.convert",
                     "q2kernels/ops/c.py imports q2kernels.functional"], found


def test_the_page_opens_with_the_picture_and_the_table():
    text = DOC.read_text()
    body = text.split("\n", 1)[1].lstrip()
    assert body.startswith("```mermaid\n"), "docs/architecture.md must open with its mermaid picture"
    picture = body.split("```", 2)[1]
    for step in ("quantize_model", "prepare", "Triton", "remove_layernorm", "convert_to_int", "verify_int_model",
                 "save_int_model", "load_int_model", "load_detector"):
        assert step in picture, step
    rows = re.findall(r"^\| `([^`]+)`", text, flags=re.M)
    for folder in ("q2kernels/ops/", "q2kernels/nn/", "q2kernels/reference/", "q2kernels/deploy/",
                   "q2kernels/integrations/", "q2kernels/models/", "csrc/", "benchmarks/", "tests/", "python/",
                   "docs/"):
        assert folder in rows, folder
    assert all((ROOT / r).is_dir() for r in rows), [r for r in rows if not (ROOT / r).is_dir()]


@pytest.mark.parametrize("name,text", [("reference", "`constants` only"), ("ops", "never nn, deploy"),
                                       ("nn", "never deploy or integrations"), ("deploy", "never integrations")])
def test_the_table_states_the_rules_checked_here(name, text):
    row = next(line for line in DOC.read_text().splitlines() if line.startswith(f"| `q2kernels/{name}/`"))
    assert text in row, row
