"""The GPU campaign in stages that each fit one device call (benchmarks/gpu_check.sh is the entry).

    python benchmarks/campaign.py [--out DIR] [--dry-run] [--force] [--timeout-scale X] STAGE ...

STAGE is a number or a name from STAGES, or `all`. A device task has 15 minutes, machine start
included, and one call at most 10: each stage is sized to finish within 5 minutes on the H200 (the
estimate of each, from counted work, is in benchmarks/NOTES.md) and runs under its own time limit.
Everything goes to DIR ($OUT, else benchmarks/results) as it happens:
  stages/<n>-<name>.log    every command's output, with start and end times and exit codes;
  stages/status.jsonl      one line per finished stage: passed, failed or timed out, and seconds;
  rows.jsonl, <gpu>-<commit>-<bench>.{json,md}, <gpu>-<commit>.{json,md,png}   (benchmarks/run_all.py).
A stage that passed in DIR is not run again (resumable) unless --force. --dry-run is the CPU proof
of the driver: the same stages, commands and files at smoke sizes through the Triton interpreter
(pip only resolves the install), which CI runs (tests/test_campaign.py).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


@dataclass(frozen=True)
class Stage:
    number: int
    name: str
    limit_s: int          # the stage's own time limit on the device
    commands: tuple       # each a function (dry_run) -> argv


def _install(dry):
    return [PY, "-m", "pip", "install", "--no-build-isolation", "--no-deps", *(["--dry-run"] if dry else []), "-e", "."]


def _build(dry):
    return [PY, "-c", "from q2kernels import _ext; m = _ext.load(); print('q2kernels._C built, CUDA kernels:', m.WITH_CUDA)"]


def _doctor(dry):
    return [PY, "-m", "q2kernels.cli", "doctor"]


def _pytest(*args):
    return lambda dry: [PY, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args]


def _int_mma_s4(dry):
    # The int4-MMA path forced on sm_90 (emulated there): the same kernel source the sm_8x GPUs run.
    return ["env", "Q2K_INT_MMA=s4", *_pytest("-m", "cuda", "tests/test_int_conv_cuda.py")(dry)]


def _bench(name, shard=None):
    def argv(dry):
        return [PY, "benchmarks/run_all.py", "--only", name, *(["--shard", shard] if shard else []),
                *(["--smoke"] if dry else []), "--out", "{out}"]
    return argv


def _sharded(first: int, name: str, n: int) -> tuple:
    """A benchmark too long for one stage, in n stages of one shard each (run_all.py --shard)."""
    return tuple(Stage(first + k, f"{name}-{k}of{n}", 300, (_bench(name, f"{k}/{n}"),)) for k in range(n))


# Each stage's estimated time on the H200, from counted work, is in benchmarks/NOTES.md.
STAGES = (
    Stage(1, "setup", 300, (_install, _build, _doctor, _pytest("-m", "cuda", "tests/test_int_conv_cuda.py"),
                            _int_mma_s4)),
    Stage(2, "triton_at_scale", 300, (_pytest("-m", "cuda", "tests/test_fake_quant.py", "tests/test_n2uq.py",
                                              "tests/test_ada.py", "tests/test_fusion.py"),)),
    *_sharded(3, "fake_quant", 4),
    *_sharded(7, "fusion", 3),
    Stage(10, "qada", 300, (_bench("qada"),)),
    Stage(11, "n2uq", 300, (_bench("n2uq"),)),
    Stage(12, "int_conv", 300, (_bench("int_conv"),)),
    Stage(13, "train_step", 300, (_bench("train_step"),)),
)


def stages_named(names: list[str]) -> list[Stage]:
    by_key = {str(s.number): s for s in STAGES} | {s.name: s for s in STAGES}
    if names == ["all"]:
        return list(STAGES)
    unknown = [n for n in names if n not in by_key]
    if unknown or not names:
        raise SystemExit(f"campaign: unknown stage(s) {unknown or '(none given)'}; expected all or some of "
                         + ", ".join(f"{s.number}/{s.name}" for s in STAGES))
    return [by_key[n] for n in names]


def passed(out: Path) -> set[str]:
    status = out / "stages" / "status.jsonl"
    if not status.exists():
        return set()
    return {r["stage"] for r in map(json.loads, status.read_text().splitlines()) if r["result"] == "passed"}


def _stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())


def run_stage(stage: Stage, out: Path, dry: bool, limit_s: float, env: dict) -> dict:
    """Runs the stage's commands in order under one time limit; the first failure ends the stage."""
    log_path = out / "stages" / f"{stage.number}-{stage.name}.log"
    start = time.monotonic()
    result = "passed"
    with open(log_path, "a") as log:
        log.write(f"== stage {stage.number} {stage.name}: start {_stamp()} (limit {limit_s:.0f} s)\n")
        for command in stage.commands:
            argv = [a.replace("{out}", str(out)) for a in command(dry)]
            left = limit_s - (time.monotonic() - start)
            log.write(f"$ {' '.join(argv)}\n")
            log.flush()
            proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=max(left, 0))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc, result = None, "timed out"
            log.write(f"== exit {rc if rc is not None else 'killed at the time limit'} at {_stamp()}\n")
            if rc is None:
                break
            if rc != 0:
                result = "failed"
                break
        seconds = time.monotonic() - start
        log.write(f"== stage {stage.number} {stage.name}: {result} at {_stamp()} after {seconds:.1f} s\n")
    record = {"stage": stage.name, "number": stage.number, "result": result, "seconds": round(seconds, 1),
              "limit_s": limit_s, "dry_run": dry, "end": _stamp()}
    with open(out / "stages" / "status.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stages", nargs="+", help="stage numbers or names, or all")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results"))
    p.add_argument("--dry-run", action="store_true", help="CPU: smoke sizes through the Triton interpreter")
    p.add_argument("--force", action="store_true", help="run stages that already passed in --out again")
    p.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every stage's time limit")
    args = p.parse_args(argv)
    if args.timeout_scale <= 0:
        p.error("--timeout-scale: must be positive")
    chosen = stages_named(args.stages)
    out = args.out.resolve()
    (out / "stages").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"
    done = passed(out)
    failures = 0
    for stage in chosen:
        if stage.name in done and not args.force:
            print(f"stage {stage.number} {stage.name}: passed before in {out}, skipped (--force runs it again)")
            continue
        r = run_stage(stage, out, args.dry_run, stage.limit_s * args.timeout_scale, env)
        print(f"stage {stage.number} {stage.name}: {r['result']} in {r['seconds']} s "
              f"(log: {out / 'stages' / f'{stage.number}-{stage.name}.log'})", flush=True)
        failures += r["result"] != "passed"
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
