"""Every op benchmark in one run, written as one record: <out>/<gpu>-<commit>.{json,md,png}.

    python benchmarks/run_all.py [--smoke] [--out benchmarks/results]
    python benchmarks/run_all.py --summarize benchmarks/results/<gpu>-<commit>.json   # README table
"""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402  (sets TRITON_INTERPRET before triton loads)

HERE = Path(__file__).resolve().parent


README = HERE.parent / "README.md"
# The headline numbers of a GPU run: (benchmark, row filter, metric) of the q2kernels rows.
SUMMARY = [
    ("fake_quant", "fused fake quant, fwd+bwd vs eager", "speedup_vs_eager"),
    ("fake_quant", "fused fake quant, fwd+bwd vs torch.compile", "speedup_vs_compile"),
    ("n2uq", "N2UQ, fwd+bwd vs eager", "speedup_vs_eager"),
    ("fusion", "gated fusion + LN, fwd+bwd vs eager", "speedup_vs_eager"),
    ("qada", "Q-ADA, fwd+bwd vs eager", "speedup_vs_eager"),
    ("train_step", "YOLOv5s QAT step vs eager modules", "speedup_vs_eager"),
    ("train_step", "YOLOv5s QAT step vs torch.compile", "speedup_vs_compile"),
]


def _summary_into_readme(env, record):
    """Replace the README's results block with the median of each headline metric."""
    import statistics
    lines = [f"Recorded on {env['device']} at {env['commit']} (`benchmarks/results/`):", "",
             "| what | median | min | max |", "|---|---|---|---|"]
    for bench, label, metric in SUMMARY:
        vals = [r[metric] for r in record["benchmarks"].get(bench, [])
                if r.get("impl") == "q2kernels" and r.get(metric) is not None]
        if vals:
            lines.append(f"| {label} | {statistics.median(vals):.2f}x | {min(vals):.2f}x | {max(vals):.2f}x |")
    text = README.read_text()
    start, end = text.index("<!-- results -->"), text.index("<!-- /results -->")
    README.write_text(text[:start] + "<!-- results -->\n" + "\n".join(lines) + "\n" + text[end:])


def _plot(record, path):
    """Speedups of the fused ops against each baseline, one group of bars per benchmark."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    baselines = ("eager", "compile", "native")
    names = list(record["benchmarks"])
    fig, ax = plt.subplots(figsize=(1.8 * len(names) + 2, 4))
    for j, base in enumerate(baselines):
        meds = []
        for name in names:
            vals = sorted(r[f"speedup_vs_{base}"] for r in record["benchmarks"][name]
                          if r.get("impl") == "q2kernels" and r.get(f"speedup_vs_{base}") is not None)
            meds.append(vals[len(vals) // 2] if vals else 0.0)
        ax.bar([i + 0.27 * (j - 1) for i in range(len(names))], meds, width=0.27, label=f"vs {base}")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("median speedup (x)")
    ax.set_title(f"q2kernels on {record['env']['device']} at {record['env']['commit']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--summarize"]:
        # A run recorded on the device machine: put its headline numbers into this checkout's README.
        record = json.loads(Path(argv[1]).read_text())
        _summary_into_readme(record["env"], record)
        return record
    args = common.parse_args(__doc__.splitlines()[0], argv)
    env = common.environment()
    sections, record = [], {"env": env, "benchmarks": {}}
    for path in sorted(HERE.glob("bench_*.py")):
        bench = importlib.import_module(f"benchmarks.{path.stem}")
        name = path.stem.removeprefix("bench_")
        print(f"== {name}", flush=True)
        rows = bench.run(args.smoke)
        record["benchmarks"][name] = rows
        sections.append(common.report(name, rows, bench.COLUMNS, None))
    if args.out is not None:
        if common.HAS_CUDA:
            _summary_into_readme(env, record)
        args.out.mkdir(parents=True, exist_ok=True)
        stem = f"{env['device'].replace(' ', '_')}-{env['commit']}"
        (args.out / f"{stem}.json").write_text(json.dumps(record, indent=1))
        _plot(record, args.out / f"{stem}.png")
        (args.out / f"{stem}.md").write_text(
            f"# q2kernels benchmarks: {env['device']} at {env['commit']}\n\n"
            f"`{json.dumps(env)}`\n\n" + "\n".join(sections))
    return record


if __name__ == "__main__":
    main()
