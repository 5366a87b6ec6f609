"""Every op benchmark in one run, written as one record: <out>/<gpu>-<commit>.{json,md}.

    python benchmarks/run_all.py [--smoke] [--out benchmarks/results]
"""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402  (sets TRITON_INTERPRET before triton loads)

HERE = Path(__file__).resolve().parent


def main(argv=None):
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
        args.out.mkdir(parents=True, exist_ok=True)
        stem = f"{env['device'].replace(' ', '_')}-{env['commit']}"
        (args.out / f"{stem}.json").write_text(json.dumps(record, indent=1))
        (args.out / f"{stem}.md").write_text(
            f"# q2kernels benchmarks: {env['device']} at {env['commit']}\n\n"
            f"`{json.dumps(env)}`\n\n" + "\n".join(sections))
    return record


if __name__ == "__main__":
    main()
