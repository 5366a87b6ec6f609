"""The GPU architectures are one table, csrc/cuda/archs.h (kGpuArchs: sm_NN -> MMA path), and every
consumer reads it; this test fails when one of them disagrees with it:
- the table itself, read twice: by q2kernels._ext's parser (q2kernels._ext.parse_gpu_archs) and by the
  C++ compiler (a small program that includes archs.h and prints its rows, its lookup gpu_arch_of for
  every compute capability, and mma_path_built);
- the build: q2kernels/_ext.py's GPU_ARCHS, CUDA_ARCHS, the -gencode flags of CUDA_FLAGS (machine code
  for every row, the newest row's PTX too), PREBUILT_ARCHS a subset; no arch number written there;
- the dispatcher: csrc/cuda/register_cuda.cpp::mma_path asks gpu_arch_of and mma_path_built and
  compares no number itself;
- the kernel's compile-time guard: csrc/cuda/int_conv_kernel.cuh::kS8PathBuilt, its guard block
  compiled with __CUDA_ARCH__ set to each row (and unset, the host pass): the int8 path is built
  exactly where the row runs it; nothing under csrc/ compares __CUDA_ARCH__ with a number;
- tests/test_cuda_compile.py: its archs and the archs of each path come from _ext's table, its
  path ids from params.h's MmaPath, and no arch number is written there;
- the Python code that asks which path a GPU runs (ARCH_USERS: the CUDA conv tests, the conv benchmark,
  the SASS report): each reads the table (_ext.gpu_arch_of, GPU_ARCHS, test_cuda_compile's INT8_ARCHS
  ...), compares no compute capability itself (`get_device_capability()[0] >= 9`, or a name bound from
  it, outside a gpu_arch_of(...) call) and writes no arch number in a string ("sm_90"; docstrings,
  being prose, are not read).
The checker (disagreements) reads a source tree; it runs on the checkout, and on modified copies of
it in a temporary folder, to prove that each kind of disagreement is found, and that adding a row to
the table (say sm_100) is all it takes.

A C++ compiler is required (the CPU build of q2kernels._C needs one): its absence is a failure.
"""
from __future__ import annotations

import ast
import importlib.util
import itertools
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from torch.utils import cpp_extension

from q2kernels import _ext

ROOT = Path(__file__).resolve().parent.parent
ARCHS_H = "csrc/cuda/archs.h"
PARAMS_H = "csrc/cuda/params.h"
DISPATCHER = "csrc/cuda/register_cuda.cpp"
KERNEL = "csrc/cuda/int_conv_kernel.cuh"
EXT = "q2kernels/_ext.py"
COMPILE_TEST = "tests/test_cuda_compile.py"
CONV_TEST = "tests/test_int_conv_cuda.py"
CONV_BENCH = "benchmarks/bench_int_conv.py"
SASS_REPORT = "tests/cuda_sass_report.py"
# Python files that decide by the GPU's arch which MMA path runs (or was built): they ask the table.
ARCH_USERS = (CONV_TEST, CONV_BENCH, SASS_REPORT)
# What reading the table looks like in them: q2kernels._ext's lookup and rows, or test_cuda_compile's
# archs (themselves read from _ext's table, checked above).
TABLE_NAMES = {"gpu_arch_of", "GPU_ARCHS", "CUDA_ARCHS", "INT4_NATIVE", "INT8_ARCHS"}
# Compute capabilities the lookup is compared on: below, inside and past the table (Blackwell is 10.0,
# 12.0; 13.x leaves room for rows to come).
CAPABILITIES = range(0, 140)
CPP_PATHS = {0: "s4", 1: "s8"}  # what the C++ program prints for params.h MmaPath, checked against params.h


_strip_cpp_comments = _ext._strip_comments  # what the parser of the table strips


def _cpp_code(text: str) -> str:
    """C++ source without comments, string literals or preprocessor lines: the code that decides."""
    code = re.sub(r'"(?:\\.|[^"\\])*"', '""', _strip_cpp_comments(text))
    return "\n".join(line for line in code.splitlines() if not line.lstrip().startswith("#"))


def _mma_path_enum(params_h: str) -> dict[str, int]:
    """params.h's `enum class MmaPath : int { kS4 = 0, kS8 = 1 };` -> {"s4": 0, "s8": 1}."""
    m = re.search(r"enum\s+class\s+MmaPath\s*:\s*int\s*\{([^}]*)\}", _strip_cpp_comments(params_h))
    if m is None:
        return {}
    return {_ext.MMA_PATHS.get(name, name): int(value)
            for name, value in re.findall(r"(\w+)\s*=\s*(\d+)", m[1])}


def _guard_block(kernel: str) -> str | None:
    """The lines of int_conv_kernel.cuh that define kS8PathBuilt, with the #if ... #endif around them."""
    lines = kernel.splitlines()
    hits = [i for i, line in enumerate(lines) if re.search(r"\bkS8PathBuilt\s*=", line)]
    if not hits:
        return None
    first, last = hits[0], hits[-1]
    depth = 0
    for i in range(first, -1, -1):  # the #if that opens the block around the first definition
        word = lines[i].lstrip()
        if word.startswith("#endif"):
            depth += 1
        elif word.startswith("#if"):
            if depth == 0:
                first = i
                break
            depth -= 1
    depth = 0
    for i in range(first, len(lines)):  # its #endif
        word = lines[i].lstrip()
        if word.startswith("#if"):
            depth += 1
        elif word.startswith("#endif"):
            depth -= 1
            if depth == 0:
                last = max(last, i)
                break
    return "\n".join(lines[first:last + 1])


def _compiled_view(root: Path, tmp: Path, table: tuple) -> dict:
    """What the C++ compiler reads in archs.h (the rows, gpu_arch_of per capability, mma_path_built), and
    kS8PathBuilt as int_conv_kernel.cuh's guard block computes it for each row's __CUDA_ARCH__ and for
    the host pass. Raises RuntimeError with the compiler's log where it does not compile."""
    block = _guard_block((root / KERNEL).read_text())
    guards = ""
    for arch in [None] + [int(a.arch) for a in table]:
        name = "host" if arch is None else f"arch{arch}"
        define = "" if arch is None else f"#define __CUDA_ARCH__ {arch * 10}\n"
        guards += (f"{define}namespace q2k {{ namespace cuda {{ namespace {name} {{\n{block or ''}\n}} }} }}\n"
                   f"#undef __CUDA_ARCH__\n"
                   f"static void print_{name}() {{ std::printf(\"guard {arch or 0} %d\\n\", "
                   f"int(q2k::cuda::{name}::kS8PathBuilt)); }}\n")
    calls = "".join(f"print_{'host' if a is None else f'arch{a}'}();\n"
                    for a in [None] + [int(r.arch) for r in table])
    program = f"""#include <cstdio>
#include "archs.h"
{guards}
int main() {{
  using namespace q2k::cuda;
  for (const GpuArch& r : kGpuArchs) std::printf("row %d %d\\n", r.arch, int(r.path));
  for (int cc = {CAPABILITIES.start}; cc < {CAPABILITIES.stop}; ++cc) {{
    const GpuArch* r = gpu_arch_of(cc);
    std::printf("of %d %d\\n", cc, r == nullptr ? -1 : r->arch);
  }}
  for (const GpuArch& r : kGpuArchs) {{
    std::printf("built %d %d %d\\n", r.arch, int(mma_path_built(MmaPath::kS4, r.arch * 10)),
                int(mma_path_built(MmaPath::kS8, r.arch * 10)));
  }}
  {calls}
  return 0;
}}
"""
    src, exe = tmp / "archs_view.cpp", tmp / "archs_view"
    src.write_text(program)
    cxx = shutil.which(cpp_extension.get_cxx_compiler())
    if cxx is None:
        pytest.fail(f"no C++ compiler ({cpp_extension.get_cxx_compiler()}): the CPU build of q2kernels._C needs one")
    cmd = [cxx, "-std=c++17", f"-I{root / 'csrc' / 'cuda'}", f"-I{root / 'csrc'}", str(src),
           "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{r.stdout}{r.stderr}")
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    view: dict = {"rows": [], "of": {}, "built": {}, "guard": {}}
    for line in out.splitlines():
        kind, *values = line.split()
        v = [int(x) for x in values]
        if kind == "row":
            view["rows"].append((str(v[0]), CPP_PATHS.get(v[1], str(v[1]))))
        elif kind == "of":
            view["of"][v[0]] = None if v[1] < 0 else str(v[1])
        elif kind == "built":
            view["built"][str(v[0])] = {"s4": bool(v[1]), "s8": bool(v[2])}
        elif kind == "guard":
            view["guard"][str(v[0]) if v[0] else "host"] = bool(v[1])
    return view


def _load_ext(root: Path):
    """root's q2kernels/_ext.py, executed as a module of its own (it reads root's csrc/; it builds
    nothing at import)."""
    name = f"_q2k_ext_view_{abs(hash(str(root)))}"
    spec = importlib.util.spec_from_file_location(name, root / EXT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


def _arch_literals(tree: ast.AST) -> list[str]:
    """String constants of a Python file that are an arch number ("90", "sm_90", "compute_90")."""
    return sorted({n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                   and re.fullmatch(r"(sm_|compute_)?\d{2,3}[a-z]?", n.value)})


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring constants of a module and its functions and classes."""
    return {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
            and isinstance(node.body[0].value.value, str)}


def _arch_strings(tree: ast.AST) -> list[str]:
    """String constants (parts of f-strings included, docstrings and f-string format specs such as the
    12 of {label:12} not) that name an arch: "90", "sm_90", "built for sm_90 only", "compute_90"."""
    prose = _docstrings(tree) | {id(c) for n in ast.walk(tree) if isinstance(n, ast.FormattedValue)
                                 and n.format_spec is not None for c in ast.walk(n.format_spec)}
    return sorted({n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                   and id(n) not in prose and (re.fullmatch(r"\d{2,3}[a-z]?", n.value)
                                               or re.search(r"\b(sm|compute)_\d{2,3}", n.value))})


def _call_name(node: ast.Call) -> str | None:
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None


def _reads_capability(node: ast.AST, bound: set[str]) -> bool:
    """Whether the value of node carries the GPU's compute capability (torch.cuda.get_device_capability(),
    a .major or .minor, or a name in bound: a variable or function bound from one) other than as the
    argument of the table's lookup gpu_arch_of(...). A comparison, and the test of `a if test else b`,
    decide on it rather than carry it: they are reported as comparisons, their results bind nothing."""
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, ast.Call) and _call_name(n) == "gpu_arch_of" or isinstance(n, ast.Compare):
            continue
        if isinstance(n, ast.IfExp):
            stack += [n.body, n.orelse]
            continue
        if (isinstance(n, ast.Call) and _call_name(n) == "get_device_capability"
                or isinstance(n, ast.Attribute) and n.attr in ("major", "minor")
                or isinstance(n, ast.Name) and n.id in bound):
            return True
        stack.extend(ast.iter_child_nodes(n))
    return False


def _capability_comparisons(tree: ast.AST) -> list[str]:
    """The comparisons of a Python file that decide on the compute capability itself rather than through
    the table: `get_device_capability()[0] >= 9`, `major < 9` after `major, minor = ...capability()`,
    `cc >= 90` after `cc = 10 * major + minor`, `f() >= 9` where f returns one of those."""
    bound: set[str] = set()
    while True:  # the names bound from the capability, directly or through other such names
        grown = set(bound)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)) and node.value is not None \
                    and _reads_capability(node.value, bound):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                grown |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(
                    isinstance(r, ast.Return) and r.value is not None and _reads_capability(r.value, bound)
                    for r in ast.walk(node)):
                grown.add(node.name)
        if grown == bound:
            break
        bound = grown
    return [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Compare)
            and any(_reads_capability(side, bound) for side in [n.left, *n.comparators])]


def _assigned_from(tree: ast.AST, target: str) -> set[str]:
    """The `_ext.X` attributes read by the top-level assignment to target (empty if none)."""
    for node in getattr(tree, "body", []):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == target for t in node.targets):
            return {n.attr for n in ast.walk(node.value)
                    if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "_ext"}
    return set()


def _expected_gencode(table: tuple) -> list[str]:
    *machine_only, newest = [a.arch for a in table]
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in machine_only] + \
        [f"-gencode=arch=compute_{newest},code=[sm_{newest},compute_{newest}]"]


def disagreements(root: Path, tmp: Path) -> list[str]:
    """Every way in which a consumer of the table in root's source tree disagrees with it (tmp: a
    scratch folder for the compiled view)."""
    out: list[str] = []
    try:
        table = _ext.parse_gpu_archs((root / ARCHS_H).read_text())
    except ValueError as e:
        return [f"{ARCHS_H}: the table does not parse: {e}"]
    rows = [(a.arch, a.mma_path) for a in table]
    enum = _mma_path_enum((root / PARAMS_H).read_text())
    if enum != {p: i for i, p in CPP_PATHS.items()}:
        out.append(f"{PARAMS_H}: MmaPath is {enum}, this checker and tests/test_cuda_compile.py read "
                   f"{ {p: i for i, p in CPP_PATHS.items()} }")

    # The C++ compiler's reading of the table, its lookup, and the kernel's guard.
    try:
        cpp = _compiled_view(root, tmp, table)
    except RuntimeError as e:
        out.append(f"{ARCHS_H} / the guard of {KERNEL} do not compile: {e}")
    else:
        if cpp["rows"] != rows:
            out.append(f"{ARCHS_H}: the compiler reads the rows {cpp['rows']}, _ext's parser {rows}")
        for cc in CAPABILITIES:
            py = _ext.gpu_arch_of(cc, table)
            if cpp["of"].get(cc) != (py.arch if py else None):
                out.append(f"gpu_arch_of({cc}): archs.h gives {cpp['of'].get(cc)}, q2kernels._ext.gpu_arch_of "
                           f"{py.arch if py else None}")
        for arch, path in rows:
            built = cpp["built"].get(arch, {})
            if built != {"s4": True, "s8": path == "s8"}:
                out.append(f"{ARCHS_H}: mma_path_built for sm_{arch} (row path {path}) gives {built}: the row's "
                           "path and the int4 path must be built, the int8 path only where the row runs it")
            if cpp["guard"].get(arch) != (path == "s8"):
                out.append(f"{KERNEL}: kS8PathBuilt is {cpp['guard'].get(arch)} for __CUDA_ARCH__ {arch}0, the "
                           f"table runs {path} on sm_{arch}")
        if cpp["guard"].get("host") is not True:
            out.append(f"{KERNEL}: kS8PathBuilt is {cpp['guard'].get('host')} without __CUDA_ARCH__ (host pass, "
                       "CPU emulator), expected True")
    kernel = (root / KERNEL).read_text()
    if _guard_block(kernel) is None or not re.search(r"\bmma_path_built\s*\(\s*MmaPath::kS8\s*,\s*__CUDA_ARCH__\s*\)",
                                                     _cpp_code(kernel)):
        out.append(f"{KERNEL}: kS8PathBuilt is not mma_path_built(MmaPath::kS8, __CUDA_ARCH__)")
    for path in sorted((root / "csrc").rglob("*")):
        if path.suffix in (".h", ".cuh", ".cpp", ".cu") and path.as_posix() != (root / ARCHS_H).as_posix():
            text = _strip_cpp_comments(path.read_text())
            if re.search(r"__CUDA_ARCH__\s*(<|>|==|!=)|(<|>|==|!=)=?\s*__CUDA_ARCH__", text):
                out.append(f"{path.relative_to(root)}: compares __CUDA_ARCH__ itself (a second copy of the table); "
                           "use archs.h mma_path_built")
    for name in (KERNEL, DISPATCHER):
        if not re.search(r'#include\s+"archs\.h"', (root / name).read_text()):
            out.append(f"{name}: does not include archs.h")

    # The dispatcher: the table's lookup, no number of its own.
    code = _cpp_code((root / DISPATCHER).read_text())
    for call in ("gpu_arch_of(", "mma_path_built(", "row->path"):
        if call not in code:
            out.append(f"{DISPATCHER}: mma_path does not use {call.rstrip('(')} of archs.h")
    compared = re.findall(r"[^\s()]+\s*(?:<=?|>=?|==|!=)\s*\d+|\b\d+\s*(?:<=?|>=?|==|!=)", code)
    if compared:
        out.append(f"{DISPATCHER}: compares numbers itself ({compared}): the arch rule is archs.h's")

    # The build.
    try:
        ext = _load_ext(root)
    except Exception as e:  # noqa: BLE001  (whatever stops the copy's _ext.py loading is a disagreement)
        out.append(f"{EXT}: does not load: {type(e).__name__}: {e}")
    else:
        ext_rows = [(a.arch, a.mma_path) for a in getattr(ext, "GPU_ARCHS", ())]  # its own GpuArch class
        if ext_rows != rows:
            out.append(f"{EXT}: GPU_ARCHS is {ext_rows}, the table {rows}")
        if tuple(getattr(ext, "CUDA_ARCHS", ())) != tuple(a for a, _ in rows):
            out.append(f"{EXT}: CUDA_ARCHS is {getattr(ext, 'CUDA_ARCHS', None)}, the table's archs "
                       f"{tuple(a for a, _ in rows)}")
        gencode = [f for f in getattr(ext, "CUDA_FLAGS", []) if f.startswith("-gencode")]
        if gencode != _expected_gencode(table):
            out.append(f"{EXT}: CUDA_FLAGS' -gencode are {gencode}, the table's {_expected_gencode(table)}")
        prebuilt = [ext._nvcc_arch(a) for a in re.split(r"[;\s]+", ext.PREBUILT_ARCHS.strip())]
        if not set(prebuilt) <= {a for a, _ in rows}:
            out.append(f"{EXT}: PREBUILT_ARCHS {ext.PREBUILT_ARCHS} is not a subset of the table's archs")
    literals = _arch_literals(ast.parse((root / EXT).read_text()))
    if literals:
        out.append(f"{EXT}: writes arch numbers {literals} (the table is archs.h's)")

    # The compile test: its archs from _ext's table, its path ids from params.h.
    tree = ast.parse((root / COMPILE_TEST).read_text())
    for target, attr in (("ARCHS", {"CUDA_ARCHS", "GPU_ARCHS"}), ("INT4_NATIVE", {"GPU_ARCHS"}),
                         ("INT8_ARCHS", {"GPU_ARCHS"})):
        if not _assigned_from(tree, target) & attr:
            out.append(f"{COMPILE_TEST}: {target} is not read from q2kernels._ext's table")
    literals = _arch_literals(tree)
    if literals:
        out.append(f"{COMPILE_TEST}: writes arch numbers {literals} (the table is archs.h's)")
    ids = next((ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "PATH_IDS" for t in n.targets)), None)
    if ids != enum:
        out.append(f"{COMPILE_TEST}: PATH_IDS is {ids}, params.h's MmaPath {enum}")

    # The Python code that picks or reports a path by the GPU's arch: the table's rule, none of its own.
    for name in ARCH_USERS:
        tree = ast.parse((root / name).read_text())
        names = {n.attr if isinstance(n, ast.Attribute) else n.id for n in ast.walk(tree)
                 if isinstance(n, (ast.Attribute, ast.Name))}
        if not names & TABLE_NAMES:
            out.append(f"{name}: does not read the arch table (none of {sorted(TABLE_NAMES)})")
        compared = _capability_comparisons(tree)
        if compared:
            out.append(f"{name}: compares the compute capability itself ({compared}): ask "
                       "_ext.gpu_arch_of(10 * major + minor).mma_path")
        literals = _arch_strings(tree)
        if literals:
            out.append(f"{name}: writes arch numbers {literals} (the table is archs.h's)")
    return out


def _copy_tree(dest: Path) -> Path:
    """The files the checker reads, copied under dest."""
    shutil.copytree(ROOT / "csrc", dest / "csrc", ignore=shutil.ignore_patterns("*.o", "*.so", "__pycache__"))
    for name in (EXT, COMPILE_TEST, *ARCH_USERS):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    return dest


def _edit(root: Path, name: str, old: str, new: str) -> None:
    text = (root / name).read_text()
    assert text.count(old) == 1, f"{name}: the text to replace is not there once: {old!r}"
    (root / name).write_text(text.replace(old, new))


def test_every_consumer_agrees_with_the_table(tmp_path):
    assert disagreements(ROOT, tmp_path) == []


def test_the_loaded_extension_and_compile_test_read_the_table():
    """The modules as this process imports them (not only their source) hold the table's archs."""
    import test_cuda_compile as tcc

    table = _ext.read_gpu_archs()
    assert _ext.GPU_ARCHS == table and _ext.CUDA_ARCHS == tuple(a.arch for a in table)
    assert tcc.ARCHS == _ext.CUDA_ARCHS
    assert set(tcc.INT4_NATIVE) == {a.arch for a in table if a.mma_path == "s4"}
    assert set(tcc.INT8_ARCHS) == {a.arch for a in table if a.mma_path == "s8"}
    assert tcc.PATH_IDS == _mma_path_enum((ROOT / PARAMS_H).read_text())


def test_behaviour_is_unchanged():
    """The table holds what the four hand-written places said before it (issue 20): sm_80/86/89 run
    the native int4 MMA, sm_90 and newer the int8 MMA, nothing below sm_80; the same nvcc flags."""
    assert [(a.arch, a.mma_path) for a in _ext.GPU_ARCHS] == [("80", "s4"), ("86", "s4"), ("89", "s4"), ("90", "s8")]
    for major, minor in itertools.product(range(0, 13), range(0, 10)):
        row = _ext.gpu_arch_of(10 * major + minor)
        assert (row.mma_path if row else None) == (None if major < 8 else "s8" if major >= 9 else "s4"), (major, minor)
    assert _ext.CUDA_FLAGS == ["-O3", "-std=c++17", "--fmad=false", "--threads=4", "-DQ2K_WITH_CUDA",
                               "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_86,code=sm_86",
                               "-gencode=arch=compute_89,code=sm_89",
                               "-gencode=arch=compute_90,code=[sm_90,compute_90]"]


# Each edit of a copy of the tree, and a phrase of the disagreement it must be reported as.
BREAKS = {
    "dispatcher hard-codes the rule": (
        DISPATCHER, "return row->path;", "return major >= 9 ? MmaPath::kS8 : MmaPath::kS4;",
        "compares numbers itself"),
    "dispatcher checks s8 by number": (
        DISPATCHER, "mma_path_built(MmaPath::kS8, row->arch * 10)", "cc >= 90", "compares numbers itself"),
    "guard compares __CUDA_ARCH__ (the old form)": (
        KERNEL, "#if defined(__CUDA_ARCH__)\nconstexpr bool kS8PathBuilt = mma_path_built(MmaPath::kS8, "
                "__CUDA_ARCH__);",
        "#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900\nconstexpr bool kS8PathBuilt = false;",
        "compares __CUDA_ARCH__ itself"),
    "guard builds the int8 path everywhere": (
        KERNEL, "mma_path_built(MmaPath::kS8, __CUDA_ARCH__)", "mma_path_built(MmaPath::kS4, __CUDA_ARCH__)",
        "kS8PathBuilt is True for __CUDA_ARCH__ 800"),
    "lookup off by one": (
        ARCHS_H, "if (kGpuArchs[i].arch <= cc) row", "if (kGpuArchs[i].arch < cc) row",
        "gpu_arch_of(80): archs.h gives None"),
    "mma_path_built inverted": (
        ARCHS_H, "(row != nullptr && row->path == path)", "(row != nullptr && row->path != path)",
        "kS8PathBuilt is False for __CUDA_ARCH__ 900"),
    "a row the parser cannot read": (
        ARCHS_H, "{90, MmaPath::kS8},", "{90, MmaPath::kS8}, {100, MmaPath::kS8},", "the table does not parse"),
    "a row hidden behind a macro": (
        ARCHS_H, "{90, MmaPath::kS8},", "#ifdef Q2K_SM100\n    {100, MmaPath::kS8},\n#endif\n    {90, MmaPath::kS8},",
        "the table does not parse"),
    "build writes its own arch list": (
        EXT, "CUDA_ARCHS = tuple(a.arch for a in GPU_ARCHS)", 'CUDA_ARCHS = ("80", "86", "89")',
        "CUDA_ARCHS is ('80', '86', '89')"),
    "build gives PTX for every arch": (
        EXT, 'f"-gencode=arch=compute_{a},code=sm_{a}" for a in machine_only',
        'f"-gencode=arch=compute_{a},code=[sm_{a},compute_{a}]" for a in machine_only', "CUDA_FLAGS' -gencode"),
    "compile test writes its own int4 archs": (
        COMPILE_TEST, 'INT4_NATIVE = tuple(a.arch for a in _ext.GPU_ARCHS if a.mma_path == "s4")',
        'INT4_NATIVE = ("80", "86", "89")', "INT4_NATIVE is not read from"),
    "conv test hard-codes the int8 rule (the old form)": (
        CONV_TEST, 'return ["s8", "s4"] if _gpu_mma_path() == "s8" else ["s4"]',
        'return ["s8", "s4"] if torch.cuda.get_device_capability()[0] >= 9 else ["s4"]',
        "compares the compute capability itself"),
    "conv test decides on a major bound from the capability": (
        CONV_TEST, "    row = _ext.gpu_arch_of(10 * major + minor)\n    return row.mma_path if row else None",
        '    return "s8" if major >= 9 else "s4"', "'major >= 9'"),
    "conv test decides through a function of the capability": (
        CONV_TEST, '    return ["s8", "s4"] if _gpu_mma_path() == "s8" else ["s4"]',
        '    def major():\n        return torch.cuda.get_device_capability()[0]\n\n'
        '    return ["s8", "s4"] if major() >= 9 else ["s4"]',
        "'major() >= 9'"),
    "SASS report reads no table": (
        SASS_REPORT, 'arch.removeprefix("sm_") not in tcc.INT8_ARCHS', 'arch.removeprefix("sm_") not in ("9" + "0",)',
        "does not read the arch table"),
    "conv test expects the s8 error to name sm_90": (
        CONV_TEST, 'match=f"built for sm_{_S8_OLDEST_ARCH} only"', 'match="built for sm_90 only"',
        "writes arch numbers ['built for sm_90 only']"),
    "benchmark hard-codes the rule (the old form)": (
        CONV_BENCH, '    major, minor = torch.cuda.get_device_capability()\n'
                    '    row = _ext.gpu_arch_of(10 * major + minor)\n    return row.mma_path if row else "s4"',
        '    return "s8" if torch.cuda.get_device_capability()[0] >= 9 else "s4"',
        "compares the compute capability itself"),
    "SASS report keeps the s8 stubs of sm_90 only (the old form)": (
        SASS_REPORT, 'arch.removeprefix("sm_") not in tcc.INT8_ARCHS', 'arch != "sm_90"',
        "writes arch numbers ['sm_90']"),
    "MmaPath renumbered": (
        PARAMS_H, "enum class MmaPath : int { kS4 = 0, kS8 = 1 };", "enum class MmaPath : int { kS4 = 1, kS8 = 0 };",
        "MmaPath is"),
}


@pytest.mark.parametrize("name", BREAKS)
def test_the_checker_finds_a_disagreement(tmp_path, name):
    file, old, new, phrase = BREAKS[name]
    root = _copy_tree(tmp_path / "tree")
    _edit(root, file, old, new)
    found = disagreements(root, tmp_path)
    assert any(phrase in line for line in found), found


def test_an_unedited_copy_agrees(tmp_path):
    """The copies the cases above edit agree with their table before the edit."""
    assert disagreements(_copy_tree(tmp_path / "tree"), tmp_path) == []


def test_a_new_row_is_the_only_edit(tmp_path):
    """Adding an architecture is adding its row: with sm_100 in the table, every consumer follows and
    nothing disagrees (the build gets its machine code and PTX, the lookup and the guard its path)."""
    root = _copy_tree(tmp_path / "tree")
    _edit(root, ARCHS_H, "    {90, MmaPath::kS8},", "    {90, MmaPath::kS8},\n    {100, MmaPath::kS8},  // Blackwell")
    assert disagreements(root, tmp_path) == []
    ext = _load_ext(root)
    assert ext.CUDA_ARCHS == ("80", "86", "89", "90", "100")
    assert ext.CUDA_FLAGS[-2:] == ["-gencode=arch=compute_90,code=sm_90",
                                   "-gencode=arch=compute_100,code=[sm_100,compute_100]"]
    assert ext.gpu_arch_of(120).arch == "100"


@pytest.mark.parametrize("text,error", [
    ("", "expected one"),
    ("inline constexpr GpuArch kGpuArchs[] = {\n};", "each arch once"),
    ("inline constexpr GpuArch kGpuArchs[] = {\n  {90, MmaPath::kS8},\n  {80, MmaPath::kS4},\n};", "oldest first"),
    ("inline constexpr GpuArch kGpuArchs[] = {\n  {80, MmaPath::kS4},\n  {80, MmaPath::kS8},\n};", "each arch once"),
    ("inline constexpr GpuArch kGpuArchs[] = {\n  {80, MmaPath::kS2},\n};", "not a row"),
    ("inline constexpr GpuArch kGpuArchs[] = {\n  {kAmpere, MmaPath::kS4},\n};", "not a row"),
])
def test_the_parser_refuses_what_it_does_not_understand(text, error):
    with pytest.raises(ValueError, match=error):
        _ext.parse_gpu_archs(text)


def test_the_parser_reads_rows_and_ignores_comments():
    text = ("// kGpuArchs[] = { {70, MmaPath::kS4} };  a comment is no table\n"
            "inline constexpr GpuArch kGpuArchs[] = {\n  {80, MmaPath::kS4},  // A100\n"
            "  /* a block comment */\n  { 90 , MmaPath::kS8 }\n};\n")
    assert _ext.parse_gpu_archs(text) == (_ext.GpuArch("80", "s4"), _ext.GpuArch("90", "s8"))
