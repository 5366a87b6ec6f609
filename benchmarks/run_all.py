"""Every op benchmark in one run, written as one record: <out>/<gpu>-<commit>.{json,md,png}.

    python benchmarks/run_all.py [--smoke] [--out benchmarks/results] [--only a,b | --skip a,b] [--shard k/n]
    python benchmarks/run_all.py --summarize benchmarks/results/<gpu>-<commit>.json   # README table

Benchmarks run in ORDER (the campaign's priority). With --out, each one's rows are written as soon as
it finishes: <out>/<gpu>-<commit>-<name>.{json,md}, and appended to <out>/rows.jsonl (one row a line,
with its benchmark's name); the record <gpu>-<commit>.json merges into the one already there, so that
runs of a few benchmarks at a time (benchmarks/gpu_check.sh stages) add up to the whole record.
--shard k/n measures only the cases of shard k of n (benchmarks/common.py in_shard): its rows carry
"shard": "k/n", its per-benchmark files are <gpu>-<commit>-<name>-shard<k>of<n>.{json,md}, and in the
record they replace that shard's rows of an earlier run, so that the n shards add up to the benchmark.
"""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402  (sets TRITON_INTERPRET before triton loads)

HERE = Path(__file__).resolve().parent
# Priority order: what a budget-limited GPU session measures first.
ORDER = ("fake_quant", "fusion", "qada", "n2uq", "int_conv", "train_step")


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


def _names(text: str | None, option: str) -> list[str]:
    names = [n for n in (text or "").split(",") if n]
    unknown = sorted(set(names) - set(ORDER))
    if unknown:
        raise SystemExit(f"run_all: {option}: unknown benchmark(s) {', '.join(unknown)}; expected some of "
                         f"{', '.join(ORDER)}")
    return names


def selected(only: str | None, skip: str | None) -> list[str]:
    """The benchmarks to run, in ORDER: --only's (all if not given) less --skip's."""
    chosen = _names(only, "--only") or list(ORDER)
    skipped = set(_names(skip, "--skip"))
    return [n for n in ORDER if n in chosen and n not in skipped]


def shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    k, _, n = text.partition("/")
    if not (k.isdigit() and n.isdigit() and 0 <= int(k) < int(n)):
        raise SystemExit(f"run_all: --shard: expected k/n with 0 <= k < n, got {text!r}")
    return int(k), int(n)


def main(argv=None):
    import argparse
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--summarize"]:
        # A run recorded on the device machine: put its headline numbers into this checkout's README.
        record = json.loads(Path(argv[1]).read_text())
        _summary_into_readme(record["env"], record)
        return record
    pick = argparse.ArgumentParser(add_help=False)
    pick.add_argument("--only", default=None, help="comma-separated benchmarks to run (default: all)")
    pick.add_argument("--skip", default=None, help="comma-separated benchmarks not to run")
    pick.add_argument("--shard", default=None, help="k/n: only the cases of shard k of n")
    picked, rest = pick.parse_known_args(argv)
    names = selected(picked.only, picked.skip)
    common.SHARD = shard(picked.shard)
    tag = {} if common.SHARD is None else {"shard": picked.shard}
    suffix = "" if common.SHARD is None else f"-shard{common.SHARD[0]}of{common.SHARD[1]}"
    args = common.parse_args(__doc__.splitlines()[0], rest)
    env = common.environment()
    stem = f"{env['device'].replace(' ', '_')}-{env['commit']}"
    combined = args.out / f"{stem}.json" if args.out is not None else None
    record = {"env": env, "benchmarks": {}}
    if combined is not None and combined.exists():
        record["benchmarks"] = json.loads(combined.read_text())["benchmarks"]
    for name in names:
        bench = importlib.import_module(f"benchmarks.bench_{name}")
        print(f"== {name}", flush=True)
        rows = [dict(r, **tag) for r in bench.run(args.smoke) if not r.get("other_shard")]
        earlier = [r for r in record["benchmarks"].get(name, []) if tag and r.get("shard") not in (None, tag["shard"])]
        record["benchmarks"][name] = earlier + rows
        common.report(name + suffix, rows, bench.COLUMNS, args.out)
        if args.out is not None:
            with open(args.out / "rows.jsonl", "a") as f:
                for row in rows:
                    f.write(json.dumps({"bench": name, "device": env["device"], "commit": env["commit"],
                                        "copy_gbs": env["copy_gbs"], **row}) + "\n")
    if args.out is not None:
        if common.HAS_CUDA:
            _summary_into_readme(env, record)
        args.out.mkdir(parents=True, exist_ok=True)
        combined.write_text(json.dumps(record, indent=1))
        _plot(record, args.out / f"{stem}.png")
        sections = [common.report_table(name, rows, importlib.import_module(f"benchmarks.bench_{name}").COLUMNS)
                    for name, rows in record["benchmarks"].items()]
        (args.out / f"{stem}.md").write_text(
            f"# q2kernels benchmarks: {env['device']} at {env['commit']}\n\n"
            f"`{json.dumps(env)}`\n\n" + "\n".join(sections))
    return record


if __name__ == "__main__":
    main()
