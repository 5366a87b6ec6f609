"""The `q2k` command: `q2k demo` (the main job), `q2k doctor` (what runs where), `q2k build` (the C++/CUDA
extension ahead of time), `q2k export` (an integer model file as ONNX), `q2k bench`."""
from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

# --steps: far above what any demo runs (300 QAT steps on a GPU); more is a typo that would run for days.
MAX_STEPS = 100_000

# The checks below serve the parser and the demos' own entry points. They live here, not in
# q2kernels._validate, which imports torch: q2k refuses a bad flag before that import's seconds.


def count_problem(value, lo: int, hi: int) -> str | None:
    """What is wrong with `value` as a whole number in lo..hi, or None."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"expected a whole number in {lo}..{hi}, got {value!r}"
    if not lo <= value <= hi:
        return f"expected a whole number in {lo}..{hi}, got {value}"
    return None


def folder_problem(path) -> str | None:
    """What stops `path` from being (or becoming) a folder this process writes into, or None. Nothing
    is created: a bad path is refused before any work, not after it."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path).strip():
        return f"expected a folder path, got {path!r}"
    try:
        folder = Path(path).expanduser()
        if folder.exists() and not folder.is_dir():
            return f"{os.fspath(path)!r} exists and is not a folder"
        existing = next(p for p in (folder, *folder.parents) if p.exists())
    except (OSError, ValueError) as e:  # a NUL byte, a name too long, a path it may not look into
        return f"{os.fspath(path)!r} is not a usable path ({e})"
    if not existing.is_dir():
        return f"{os.fspath(path)!r} cannot be created: {existing} is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{os.fspath(path)!r} cannot be written: {existing} is not writable"
    return None


def check_steps(steps, name: str = "steps") -> int | None:
    """None (the demo's own number) or a whole number of steps in 1..MAX_STEPS."""
    problem = None if steps is None else count_problem(steps, 1, MAX_STEPS)
    if problem:
        raise ValueError(f"{name}: {problem}")
    return steps


def check_folder(path, name: str = "out") -> Path:
    problem = folder_problem(path)
    if problem:
        raise ValueError(f"{name}: {problem}")
    return Path(path).expanduser()


def check_flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected True or False, got {value!r}")
    return value


def _steps_argument(text: str) -> int:
    try:
        steps = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of steps, got {text!r}") from None
    problem = count_problem(steps, 1, MAX_STEPS)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return steps


def _folder_argument(text: str) -> str:
    problem = folder_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def doctor() -> int:
    import torch

    import q2kernels
    import q2kernels.functional  # noqa: F401  (registers every fused op)
    from q2kernels import _backend

    print(f"q2kernels {q2kernels.__version__}  python {platform.python_version()}  torch {torch.__version__}")
    try:
        import triton
        print(f"triton {triton.__version__}  (interpreter {'on' if _backend.interpreter_enabled() else 'off'})")
    except ImportError:
        print("triton: not installed")
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        print(f"GPU: {torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]}), CUDA {torch.version.cuda}")
    else:
        print("GPU: none")
    print(f"backend requested: {_backend.get_backend()}")
    fused_ops = sorted(n for n in dir(torch.ops.q2kernels)
                       if isinstance(getattr(torch.ops.q2kernels, n), torch._ops.OpOverloadPacket)
                       and not n.endswith("_backward"))
    for device in ("cpu", "cuda"):
        if device == "cuda" and not torch.cuda.is_available():
            print("  CUDA tensors: no GPU here (would run the fused Triton kernels)")
            continue
        try:
            chosen = _backend.resolve(torch.empty(0, device=device))
        except RuntimeError as e:
            chosen = f"error: {e}"
        print(f"  {device.upper()} tensors -> {chosen}: {', '.join(fused_ops)}")
    from q2kernels import _ext
    print(f"CUDA_HOME: {_ext.cuda_home() or 'none found'}  (torch built with CUDA {torch.version.cuda or 'no'})")
    try:
        from q2kernels.ops import int_conv
        with_cuda = _ext.cuda_enabled()
        int_conv.load()
        print(f"C++ extension q2kernels._C: builds and loads ({'with' if with_cuda else 'without'} the CUDA kernels)")
    except Exception as e:  # noqa: BLE001  (report any build failure verbatim)
        print(f"C++ extension q2kernels._C: does not build here: {type(e).__name__}: {e}")
        return 0
    kernels = _ext.registered_kernels()
    for key in ("CPU", "CUDA"):
        ops = {op.split("::")[1]: keys for op, keys in kernels.items()}
        if key == "CUDA":
            ops = {op: keys for op, keys in ops.items() if op not in _ext.CPU_ONLY_OPS}
        missing = sorted(op for op, keys in ops.items() if key not in keys)
        state = "all registered" if not missing else f"missing for {', '.join(missing)}"
        print(f"  {key} kernels of the {len(ops)} q2kernels_int ops: {state}")
    return 0


def build(prebuilt: str | None = None) -> int:
    """Compile (or find in the cache) q2kernels._C and say where it is; with prebuilt, the plain ops
    library for this torch into that folder instead, for a machine with the same torch to load."""
    if prebuilt is not None:
        return _build_prebuilt(Path(prebuilt).expanduser())
    from q2kernels.ops import int_conv

    print("building q2kernels._C (minutes the first time, with the CUDA kernels; then cached)", flush=True)
    lib = int_conv.load()
    print(f"q2kernels._C: {lib.__file__} (CUDA kernels: {'yes' if lib.WITH_CUDA else 'no'})")
    return 0


def _build_prebuilt(folder: Path) -> int:
    import torch

    from q2kernels import _ext

    print(f"building the q2kernels ops library for torch {torch.__version__} into {folder}", flush=True)
    stamp = _ext.build_prebuilt(folder)
    archs = f"CUDA kernels for {', '.join(stamp['archs'])}" if stamp["archs"] else "no CUDA kernels"
    print(f"{folder / _ext.PREBUILT_LIB}: {stamp['size_bytes'] / 2**20:.1f} MiB, {archs}, {len(stamp['ops'])} ops, "
          f"no Python symbols, built in {stamp['build_s']} s; stamp {folder / _ext.PREBUILT_STAMP}")
    return 0


def _shape_argument(text: str) -> tuple[int, ...]:
    parts = text.split(",")
    if len(parts) != 4 or not all(p.strip().isdigit() and 1 <= int(p) <= 8192 for p in parts):
        raise argparse.ArgumentTypeError(f"expected N,C,H,W, four integers in 1..8192, got {text!r}")
    return tuple(int(p) for p in parts)


def export_onnx_file(model_path: Path, out: Path, shape: tuple[int, ...] | None, opset: int | None,
                     deterministic: Path | None = None) -> int:
    """q2k export: load, export with deploy.export_onnx, check in onnxruntime on a random example. With
    `deterministic`, first deploy.deterministic_float, and write that model there: the ONNX then
    reproduces it bit for bit."""
    import torch

    from q2kernels.deploy import deterministic_float, export_onnx, load_int_model, save_int_model
    from q2kernels.deploy.onnx_export import DEFAULT_OPSET
    model = load_int_model(model_path)
    if deterministic is not None:
        model = deterministic_float(model)
        save_int_model(model, deterministic)
        print(f"q2k export: wrote {deterministic}: the model with deterministic float layers")
    if shape is None:
        if model.detect_head is None:
            print(f"q2k export: {model_path} has no detect head to take the input size from: give --shape N,C,H,W",
                  file=sys.stderr)
            return 2
        shape = (1, 3, *model.detect_head.imgsz)
    example = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    report = export_onnx(model, example, out, opset=opset or DEFAULT_OPSET)
    print(f"q2k export: wrote {out} (opset {report.opset}): {report.integer_layers} integer layers, "
          f"{len(report.float_layers)} float ({', '.join(report.float_layers) or 'none'})")
    same = all(report.outputs_identical)
    print(f"onnxruntime on a random {tuple(shape)} input: outputs "
          f"{'bit-identical' if same else 'differ, largest difference ' + str(max(report.max_abs_diff))}")
    if report.float_layers:
        print("the float layers run in onnxruntime's own float kernels, so the outputs can differ in the last "
              "bits; --deterministic-float OUT.q2k makes them deterministic (docs/deploy.md)")
    return 0


def _enable_interpreter_without_gpu() -> None:
    """Without a GPU the fused kernels run through the Triton interpreter; it must be switched on
    before triton is imported, so before q2kernels' kernels load."""
    import os

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def _ultralytics_demo(args) -> int:
    from q2kernels.integrations import ultralytics_offline

    ultralytics_offline()
    try:
        from q2kernels.integrations.ultralytics import demo
    except ImportError as e:
        print(f"q2k demo --ultralytics: {e}", file=sys.stderr)
        return 2
    demo.run(out=args.out or "q2k_yolo_out", smoke=args.smoke)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="q2k", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="versions, GPU, the backend each op uses, the C++ extension")
    build_cmd = sub.add_parser("build", help="compile the C++/CUDA extension q2kernels._C now instead of at the first "
                               "integer op")
    build_cmd.add_argument("--prebuilt", metavar="DIR", type=_folder_argument, default=None,
                           help="build the plain ops library for this torch into DIR, with its stamp, for another "
                                "machine with the same torch (any Python) to load: Q2K_PREBUILT=DIR there (default: "
                                "the checkout's prebuilt/); CUDA kernels for TORCH_CUDA_ARCH_LIST (default 9.0) "
                                "where a build here includes them (Q2K_BUILD_CUDA=1 forces)")
    demo = sub.add_parser("demo", help="the end-to-end demo (the README's first command)")
    demo.add_argument("--smoke", action="store_true", help="a run of under a minute, for CI")
    demo.add_argument("--steps", type=_steps_argument, default=None, help=f"QAT steps per run (1..{MAX_STEPS})")
    demo.add_argument("--out", type=_folder_argument, default=None,
                      help="directory for the plots (default q2k_demo_out), or with --ultralytics for the "
                      "dataset, runs and integer model (default q2k_yolo_out)")
    demo.add_argument("--ultralytics", action="store_true",
                      help="the Ultralytics YOLO demo instead (YOLO11n from YAML: trainer, LayerNorm removal, "
                           "integer model, mAP; needs pip install q2kernels[ultralytics])")
    export = sub.add_parser("export", help="write an integer model file as ONNX (docs/deploy.md)")
    export.add_argument("model", type=Path, help="an integer model file (save_int_model, IntDetector.save)")
    export.add_argument("--onnx", type=Path, required=True, metavar="OUT", help="the .onnx file to write")
    export.add_argument("--shape", type=_shape_argument, default=None, metavar="N,C,H,W",
                        help="the example input's shape, which the export is checked on (default: 1,3 and the "
                             "file's detect head imgsz)")
    export.add_argument("--opset", type=int, default=None, help="ONNX opset, 21..26 (default 21)")
    export.add_argument("--deterministic-float", type=Path, default=None, metavar="OUT.q2k",
                        help="replace the float layers by deterministic ones (deploy.deterministic_float), write "
                             "that model to OUT.q2k and export it: onnxruntime then reproduces it bit for bit")
    sub.add_parser("bench", help="run the benchmark suite: benchmarks/run_all.py [--smoke] [--out DIR]")
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "demo" and args.ultralytics and args.steps is not None:
        demo.error("--steps does not apply with --ultralytics (it trains by epochs)")
    _enable_interpreter_without_gpu()
    if args.command == "doctor":
        return doctor()
    if args.command == "build":
        return build(args.prebuilt)
    if args.command == "export":
        return export_onnx_file(args.model, args.onnx, args.shape, args.opset, args.deterministic_float)
    if args.command == "demo" and args.ultralytics:
        return _ultralytics_demo(args)
    if args.command == "demo":
        from q2kernels import demo as demo_mod
        return demo_mod.main(smoke=args.smoke, steps=args.steps, out=args.out or "q2k_demo_out")
    import runpy
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "run_all.py"
    if not script.exists():
        print(f"q2k bench: {script} not found (the benchmarks live in the source checkout)", file=sys.stderr)
        return 2
    sys.argv = [str(script), *rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
