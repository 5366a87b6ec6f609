"""The GPU campaign in stages that each fit one device call (benchmarks/gpu_check.sh is the entry).

    python benchmarks/campaign.py [--out DIR] [--dry-run] [--force] [--timeout-scale X] STAGE ...
    python benchmarks/campaign.py next --budget SECONDS [--results benchmarks/results] [--out DIR] [--dry-run]

STAGE is a number or a name from STAGES, or `all`. `next` picks the stages still pending in the
committed results (every <results>/*/campaign.json: passed there = done) in priority order, each
costed at its recorded duration there (else its estimate, Stage.estimate_s), as many as fit the
budget; each stage's own time limit is cut to what is left of the budget, so the call ends in it.

A device call brings back at most 8 files, at most 2 folders down, so a call writes exactly FILES,
and nothing else, into one folder DIR/<device>-<commit>/ (DIR: --out, else $OUT, else
benchmarks/results), meant to be committed unedited as benchmarks/results/<device>-<commit>/:
  campaign.json   env (device name, commit, torch, ...), every stage's status (passed, failed,
                  timed out; seconds; limit) and every row of every benchmark (each with its device);
                  `python benchmarks/run_all.py --summarize` reads it;
  campaign.log    every command's output, with start and end times and exit codes, as it happens;
  tables.md       the stage table and the benchmarks' markdown tables;
  extra.tar.gz    the rest (per-benchmark json/md, the plot), from a scratch folder outside DIR.
campaign.json and tables.md are rewritten after every stage; a stage cut off by its limit keeps the
rows it printed ("measured: {...}" lines of its log) as rows with "partial": true.
Triton's cache: the one carried in the prebuilt folder ($Q2K_PREBUILT, else prebuilt/;
benchmarks/triton_cache.py builds it here) is unpacked and used by every stage where its fingerprint
is the device's, and every stage records the Triton kernels it compiled ("triton_compiled": a launch
the cache held compiles none), so the first device call measures whether it is hit.
A stage that passed in that folder is not run again (resumable) unless --force. --dry-run is the CPU
proof of the driver: the same stages, commands and files at smoke sizes through the Triton
interpreter (pip only resolves the install), which CI runs (tests/test_campaign*.py).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import triton_cache  # noqa: E402
PY = sys.executable
RESULTS = ROOT / "benchmarks" / "results"
FILES = ("campaign.json", "campaign.log", "tables.md", "extra.tar.gz")
SAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class Stage:
    number: int
    name: str
    limit_s: int          # the stage's own time limit on the device
    commands: tuple       # each a function (dry_run) -> argv
    estimate_s: int = 300  # expected seconds on an H100/H200 (benchmarks/NOTES.md), until one is recorded

    @property
    def bench(self) -> str | None:
        """The benchmark a benchmark stage runs (its rows' "bench"), else None."""
        name = self.name.split("-")[0]
        return name if self.number > 2 else None


def _install(dry):
    return [PY, "-m", "pip", "install", "--no-build-isolation", "--no-deps", *(["--dry-run"] if dry else []), "-e", "."]


def _build(dry):
    return [PY, "-c", "from q2kernels import _ext; m = _ext.load(); print('q2kernels._C built, CUDA kernels:', m.WITH_CUDA)"]


def _doctor(dry):
    return [PY, "-m", "q2kernels.cli", "doctor"]


def _device_info(dry):
    # The device's name and measured copy bandwidth, as a row of the results (NOTES.md's floors use it).
    return [PY, "benchmarks/device_info.py", "--out", "{scratch}"]


def _pytest(*args):
    return lambda dry: [PY, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args]


def _int_mma_s4(dry):
    # The int4-MMA path forced on sm_90 (emulated there): the same kernel source the sm_8x GPUs run.
    # Another kernel path than the first run of this file (the int8 MMA), not a repetition.
    return ["env", "Q2K_INT_MMA=s4", *_pytest("-m", "cuda", "tests/test_int_conv_cuda.py")(dry)]


def _bench(name, shard=None):
    def argv(dry):
        return [PY, "benchmarks/run_all.py", "--only", name, *(["--shard", shard] if shard else []),
                *(["--smoke"] if dry else []), "--out", "{scratch}"]
    return argv


def _sharded(first: int, name: str, n: int, estimate_s: int) -> tuple:
    """A benchmark too long for one stage, in n stages of one shard each (run_all.py --shard)."""
    return tuple(Stage(first + k, f"{name}-{k}of{n}", 300, (_bench(name, f"{k}/{n}"),), estimate_s)
                 for k in range(n))


# Each stage's estimated time on the H100/H200, from counted work, is in benchmarks/NOTES.md.
STAGES = (
    Stage(1, "setup", 300, (_install, _build, _doctor, _device_info,
                            _pytest("-m", "cuda", "tests/test_int_conv_cuda.py", "tests/test_grouped_conv.py",
                                    "tests/test_det_float.py"),
                            _int_mma_s4, _pytest("tests/test_dorefa.py")), 200),
    Stage(2, "triton_at_scale", 300, (_pytest("-m", "cuda", "tests/test_fake_quant.py", "tests/test_n2uq.py",
                                              "tests/test_ada.py", "tests/test_fusion.py"),), 260),
    *_sharded(3, "fake_quant", 4, 230),
    *_sharded(7, "fusion", 3, 205),
    Stage(10, "qada", 300, (_bench("qada"),), 200),
    Stage(11, "n2uq", 300, (_bench("n2uq"),), 175),
    Stage(12, "int_conv", 300, (_bench("int_conv"),), 180),
    Stage(13, "train_step", 300, (_bench("train_step"),), 280),
)


def stages_named(names: list[str]) -> list[Stage]:
    by_key = {str(s.number): s for s in STAGES} | {s.name: s for s in STAGES}
    if names == ["all"]:
        return list(STAGES)
    unknown = [n for n in names if n not in by_key]
    if unknown or not names:
        raise SystemExit(f"campaign: unknown stage(s) {unknown or '(none given)'}; expected all, next or some of "
                         + ", ".join(f"{s.number}/{s.name}" for s in STAGES))
    return [by_key[n] for n in names]


def _stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())


# ---- what is recorded ------------------------------------------------------------------------------

def environment(dry: bool) -> dict:
    """The device this call runs on (torch.cuda.get_device_name, else cpu-<arch>) and the code's commit."""
    from benchmarks import common  # torch; sets TRITON_INTERPRET first without a GPU
    import torch
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, text=True,
                           capture_output=True).stdout.strip() != ""
    env = {"device": common.device_name(), "commit": common.commit(), "dirty": dirty, "torch": torch.__version__,
           "cuda": torch.version.cuda, "python": sys.version.split()[0], "dry_run": dry}
    if torch.cuda.is_available():
        env["capability"] = "sm_%d%d" % torch.cuda.get_device_capability()
    return env


def tag(env: dict) -> str:
    """<device>-<commit>, in the letters a device call's files may be named with."""
    return SAFE.sub("_", f"{env['device']}-{env['commit']}")


def load(folder: Path) -> dict | None:
    path = folder / "campaign.json"
    return json.loads(path.read_text()) if path.exists() else None


def history(results: Path, dry: bool) -> list[dict]:
    """Every stage record in the committed results (<results>/*/campaign.json) of this mode (dry or not)."""
    records = []
    for path in sorted(results.glob("*/campaign.json")):
        data = json.loads(path.read_text())
        records += [dict(r, folder=path.parent.name) for r in data.get("stages", [])
                    if bool(r.get("dry_run")) == dry]
    return records


def plan(records: list[dict], budget_s: float) -> list[tuple[Stage, float]]:
    """(stage, expected seconds) of the stages not passed in `records` that fit `budget_s`, in priority
    order: never-tried stages by number, then those that failed or timed out before; a stage that
    does not fit is passed over for a later, shorter one."""
    passed = {r["stage"] for r in records if r["result"] == "passed"}
    last = {r["stage"]: r for r in records}
    pending = [s for s in STAGES if s.name not in passed]
    pending = [s for s in pending if s.name not in last] + [s for s in pending if s.name in last]
    chosen, left = [], budget_s
    for s in pending:
        r = last.get(s.name)
        expect = float(s.estimate_s if r is None else max(r["seconds"], r["limit_s"] if r["result"] == "timed out"
                                                           else 0))
        if expect <= left:
            chosen.append((s, expect))
            left -= expect
    return chosen


def _salvage(log_text: str, bench: str, tag_: dict) -> list[dict]:
    """The rows a stage printed ("measured: {...}") before it was cut off."""
    rows = []
    for line in log_text.splitlines():
        if line.startswith("measured: "):
            try:
                rows.append({"bench": bench, **json.loads(line[len("measured: "):]), **tag_, "partial": True})
            except json.JSONDecodeError:
                pass
    return rows


class Record:
    """The folder a call writes: FILES and nothing else; its scratch work lives outside it."""

    def __init__(self, folder: Path, env: dict, triton_cache_dir: Path):
        self.folder, self.env, self.triton_cache_dir = folder, env, triton_cache_dir
        folder.mkdir(parents=True, exist_ok=True)
        self.scratch = Path(tempfile.mkdtemp(prefix="q2k-campaign-"))
        old = load(folder) or {}
        self.stages = old.get("stages", [])
        self.rows = old.get("rows", [])
        self.log = folder / "campaign.log"
        if old.get("extra_files") and (folder / "extra.tar.gz").exists():
            with tarfile.open(folder / "extra.tar.gz") as tar:
                tar.extractall(self.scratch, filter="data")

    def passed(self) -> set[str]:
        return {r["stage"] for r in self.stages if r["result"] == "passed"}

    def _new_rows(self, offset: int) -> tuple[list[dict], int]:
        path = self.scratch / "rows.jsonl"
        if not path.exists():
            return [], offset
        lines = path.read_text().splitlines()
        return [json.loads(line) for line in lines[offset:]], len(lines)

    def run(self, stage: Stage, dry: bool, limit_s: float, env: dict) -> dict:
        _, offset = self._new_rows(0)
        with open(self.log, "a") as log:
            log_start = log.tell()
        kernels_before = triton_cache.entries(self.triton_cache_dir)
        record = run_stage(stage, self.log, self.scratch, dry, limit_s, env)
        record["device"], record["commit"] = self.env["device"], self.env["commit"]
        # The Triton kernels this stage compiled (none for a launch the carried cache held).
        record["triton_compiled"] = triton_cache.compiled_since(self.triton_cache_dir, kernels_before)
        with open(self.log, "a") as log:
            log.write(f"== stage {stage.number} {stage.name}: triton: "
                      f"{triton_cache.describe_compiled(record['triton_compiled'])}\n")
        self.stages.append(record)
        rows, _ = self._new_rows(offset)
        if not rows and stage.bench and record["result"] != "passed":
            with open(self.log) as log:
                log.seek(log_start)
                shard = stage.name.partition("-")[2].replace("of", "/") or None
                rows = _salvage(log.read(), stage.bench,
                                {"device": self.env["device"], "commit": self.env["commit"],
                                 **({"shard": shard} if shard else {})})
        self.rows += [dict(r, stage=stage.name) for r in rows]
        self.write()
        return record

    def write(self) -> None:
        benchmarks = {}
        for r in self.rows:
            if r.get("bench") != "device":
                benchmarks.setdefault(r["bench"], []).append({k: v for k, v in r.items() if k != "bench"})
        device_rows = [r for r in self.rows if r.get("bench") == "device"]
        extra = sorted(p.relative_to(self.scratch).as_posix() for p in self.scratch.rglob("*") if p.is_file())
        data = {"format": 1, "env": self.env, "device_info": device_rows, "stages": self.stages,
                "benchmarks": benchmarks, "rows": self.rows, "extra_files": extra}
        _atomic(self.folder / "campaign.json", json.dumps(data, indent=1))
        _atomic(self.folder / "tables.md", self.tables(benchmarks, device_rows))
        tmp = self.folder / ".extra.tar.gz.tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            for name in extra:
                tar.add(self.scratch / name, arcname=name)
        os.replace(tmp, self.folder / "extra.tar.gz")

    def tables(self, benchmarks: dict, device_rows: list[dict]) -> str:
        lines = [f"# q2kernels GPU campaign: {self.env['device']} at {self.env['commit']}", "",
                 f"`{json.dumps(self.env)}`", "", "| stage | result | seconds | limit s | end |", "|---|---|---|---|---|"]
        lines += [f"| {r['number']} {r['stage']} | {r['result']} | {r['seconds']} | {r['limit_s']:.0f} | {r['end']} |"
                  for r in self.stages]
        for r in device_rows:
            lines += ["", f"Device: {r.get('device')}, measured copy bandwidth {r.get('copy_gbs')} GB/s "
                          f"(read + write), {r.get('capability')}"]
        for name, rows in benchmarks.items():
            columns = list(dict.fromkeys(k for r in rows for k in r if k not in ("device", "commit", "stage")))
            lines += ["", f"## {name}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
        return "\n".join(lines) + "\n"

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_stage(stage: Stage, log_path: Path, scratch: Path, dry: bool, limit_s: float, env: dict) -> dict:
    """Runs the stage's commands in order under one time limit; the first failure ends the stage."""
    start = time.monotonic()
    result = "passed"
    with open(log_path, "a") as log:
        log.write(f"== stage {stage.number} {stage.name}: start {_stamp()} (limit {limit_s:.0f} s)\n")
        for command in stage.commands:
            argv = [a.replace("{scratch}", str(scratch)) for a in command(dry)]
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
    return {"stage": stage.name, "number": stage.number, "result": result, "seconds": round(seconds, 1),
            "limit_s": limit_s, "dry_run": dry, "end": _stamp()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stages", nargs="+", help="stage numbers or names, all, or next")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or RESULTS),
                   help="the call's files go to OUT/<device>-<commit>/ (default: $OUT, else benchmarks/results)")
    p.add_argument("--results", type=Path, default=RESULTS, help="committed results that `next` continues")
    p.add_argument("--budget", type=float, default=None, help="seconds this call may spend on stages")
    p.add_argument("--dry-run", action="store_true", help="CPU: smoke sizes through the Triton interpreter")
    p.add_argument("--force", action="store_true", help="run stages that already passed in the folder again")
    p.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every stage's time limit")
    args = p.parse_args(argv)
    if args.timeout_scale <= 0:
        p.error("--timeout-scale: must be positive")
    if args.stages[0] == "next":
        if len(args.stages) != 1 or args.budget is None:
            p.error("next: takes no stage names and needs --budget SECONDS")
        chosen = [s for s, _ in plan(history(args.results.resolve(), args.dry_run), args.budget)]
    else:
        chosen = stages_named(args.stages)
    env = environment(args.dry_run)
    # Triton's cache for every stage: the one carried in the prebuilt folder where it fits this device.
    arch = int(env["capability"][3:]) if "capability" in env else None
    cache_dir, env["triton_cache"] = triton_cache.install(Path(os.environ.get("Q2K_PREBUILT") or ROOT / "prebuilt"),
                                                         arch)
    name, results, n = tag(env), args.results.resolve(), 1
    # A second call on the same commit (its first call's folder copied into the results, not yet
    # committed) gets a folder of its own: <device>-<commit>_2, ...
    while args.out.resolve() != results and (results / name).exists():
        n += 1
        name = f"{tag(env)}_{n}"
    record = Record(args.out.resolve() / name, env, cache_dir)
    proc_env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT), TRITON_CACHE_DIR=str(cache_dir))
    if args.dry_run:
        proc_env["TRITON_INTERPRET"] = "1"
    print(f"campaign on {env['device']} at {env['commit']}: "
          f"{', '.join(f'{s.number} {s.name}' for s in chosen) or 'nothing pending fits the budget'}", flush=True)
    cache_line = triton_cache.describe_install(cache_dir, env["triton_cache"])
    with open(record.log, "a") as log:
        log.write(f"== {cache_line}\n")
    print(cache_line, flush=True)
    done = record.passed()
    failures = 0
    start = time.monotonic()
    try:
        for stage in chosen:
            if stage.name in done and not args.force:
                print(f"stage {stage.number} {stage.name}: passed before in {record.folder}, skipped "
                      "(--force runs it again)")
                continue
            limit = stage.limit_s * args.timeout_scale
            if args.budget is not None:
                left = args.budget - (time.monotonic() - start)
                if left < min(limit, 30):
                    print(f"stage {stage.number} {stage.name}: {left:.0f} s of the budget left, not started")
                    continue
                limit = min(limit, left)
            r = record.run(stage, args.dry_run, limit, proc_env)
            print(f"stage {stage.number} {stage.name}: {r['result']} in {r['seconds']} s", flush=True)
            failures += r["result"] != "passed"
        record.write()
    finally:
        record.close()
    print(f"files: {record.folder} ({', '.join(FILES)}); commit them unedited as "
          f"benchmarks/results/{record.folder.name}/")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
