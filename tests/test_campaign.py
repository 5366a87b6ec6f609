"""The staged GPU campaign's driver (benchmarks/gpu_check.sh -> benchmarks/campaign.py), proven on the
CPU: a dry run of every stage writes the per-stage logs, status, rows.jsonl and per-benchmark files;
a stage that passed is skipped when run again; a stage past its time limit is killed and recorded."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import campaign, run_all  # noqa: E402


def _campaign(*args, timeout=3000):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _status(out):
    return [json.loads(line) for line in (out / "stages" / "status.jsonl").read_text().splitlines()]


def test_dry_run_of_every_stage_writes_its_files_and_resumes(tmp_path):
    r = _campaign("--dry-run", "--out", str(tmp_path), "all")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    status = _status(tmp_path)
    assert [s["stage"] for s in status] == [s.name for s in campaign.STAGES]
    assert all(s["result"] == "passed" and s["dry_run"] for s in status)
    for stage in campaign.STAGES:
        log = (tmp_path / "stages" / f"{stage.number}-{stage.name}.log").read_text()
        assert log.startswith(f"== stage {stage.number} {stage.name}: start ")
        assert log.count("== exit 0 at ") == len(stage.commands)
        assert f"== stage {stage.number} {stage.name}: passed at " in log
    setup = (tmp_path / "stages" / "1-setup.log").read_text()
    assert "CUDA_HOME:" in setup and "q2kernels._C built" in setup and "Q2K_INT_MMA=s4" in setup
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert {r["bench"] for r in rows} == set(run_all.ORDER)
    for stage in campaign.STAGES[2:]:  # <gpu>-<commit>-<bench>[-shard<k>of<n>].{json,md}
        name = stage.name.replace("-", "-shard") if "-" in stage.name else stage.name
        assert list(tmp_path.glob(f"*-{name}.json")) and list(tmp_path.glob(f"*-{name}.md")), name
    record = next(p for p in tmp_path.glob("*.json") if not any(f"-{n}" in p.stem for n in run_all.ORDER))
    assert set(json.loads(record.read_text())["benchmarks"]) == set(run_all.ORDER)

    again = _campaign("--dry-run", "--out", str(tmp_path), "1", "fusion-1of3")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stage 1 setup: passed before" in again.stdout and "stage 8 fusion-1of3: passed before" in again.stdout
    assert len(_status(tmp_path)) == len(campaign.STAGES)


def test_stage_past_its_time_limit_is_killed_and_recorded(tmp_path):
    r = _campaign("--dry-run", "--out", str(tmp_path), "--timeout-scale", "0.00001", "setup", timeout=600)
    assert r.returncode == 1
    (status,) = _status(tmp_path)
    assert status["result"] == "timed out" and status["seconds"] < 60
    log = (tmp_path / "stages" / "1-setup.log").read_text()
    assert "== exit killed at the time limit" in log and "setup: timed out at" in log


def test_unknown_stage_and_benchmark_names_are_refused(tmp_path):
    r = _campaign("--dry-run", "--out", str(tmp_path), "benchmark")
    assert r.returncode != 0 and "unknown stage(s) ['benchmark']" in r.stderr
    with pytest.raises(SystemExit, match="--only: unknown benchmark"):
        run_all.selected("fusion,fast", None)


def test_benchmark_selection_keeps_the_priority_order():
    assert run_all.selected(None, None) == list(run_all.ORDER)
    assert run_all.selected("train_step,fake_quant", None) == ["fake_quant", "train_step"]
    assert run_all.selected(None, "fusion,int_conv") == ["fake_quant", "qada", "n2uq", "train_step"]
    assert set(run_all.ORDER) == {p.stem.removeprefix("bench_") for p in (ROOT / "benchmarks").glob("bench_*.py")}
    benches = [s.name.split("-")[0] for s in campaign.STAGES[2:]]
    assert list(dict.fromkeys(benches)) == list(run_all.ORDER)
    assert [s.number for s in campaign.STAGES] == list(range(1, len(campaign.STAGES) + 1))


def test_shards_split_the_cases_and_add_up(tmp_path, monkeypatch):
    from benchmarks import common
    cases = [dict(shape=str((n, 8)), dtype=dt, impl=impl) for n in range(12) for dt in ("bf16", "fp32")
             for impl in ("q2kernels", "eager")]
    owners = []
    for case in cases:
        picked = []
        for k in range(3):
            monkeypatch.setattr(common, "SHARD", (k, 3))
            picked += [k] if common.in_shard(case) else []
        owners.append(picked)
    assert all(len(p) == 1 for p in owners)  # each case in exactly one shard
    assert len({p[0] for p in owners}) == 3  # and no shard empty
    by_case = {}
    for case, (k,) in zip(cases, owners):
        by_case.setdefault((case["shape"], case["dtype"]), set()).add(k)
    assert all(len(ks) == 1 for ks in by_case.values())  # both impls of a case together
    with pytest.raises(SystemExit, match="--shard"):
        run_all.shard("3/3")
