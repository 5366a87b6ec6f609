"""The staged GPU campaign's driver (benchmarks/gpu_check.sh -> benchmarks/campaign.py), proven on the
CPU: a dry run writes its four files (campaign.FILES) into <out>/<device>-<commit>/; a stage that
passed is skipped when run again; a stage past its time limit is killed and recorded. The whole
campaign, call by call with `next`, is tests/test_campaign_next.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import campaign, run_all  # noqa: E402


def _campaign(*args, timeout=3000, **env_vars):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **env_vars)
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _folder(out):
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    return folder


def _status(out):
    return json.loads((_folder(out) / "campaign.json").read_text())["stages"]


def test_dry_run_of_stages_writes_its_four_files_and_resumes(tmp_path):
    # The whole campaign's dry run, call by call, is tests/test_campaign_next.py; here two stages.
    out, triton_dir = tmp_path / "out", tmp_path / "triton-cache"
    r = _campaign("--dry-run", "--out", str(out), "1", "n2uq", TRITON_CACHE_DIR=str(triton_dir))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    folder = _folder(out)
    assert sorted(p.name for p in folder.iterdir()) == sorted(campaign.FILES)
    assert [p for p in out.iterdir()] == [folder]
    status = _status(out)
    assert [s["stage"] for s in status] == ["setup", "n2uq"]
    assert all(s["result"] == "passed" and s["dry_run"] for s in status)
    log = (folder / "campaign.log").read_text()
    for stage in campaign.stages_named(["1", "n2uq"]):
        assert f"== stage {stage.number} {stage.name}: start " in log
        assert f"== stage {stage.number} {stage.name}: passed at " in log
    assert log.count("== exit 0 at ") == sum(len(s.commands) for s in campaign.stages_named(["1", "n2uq"]))
    assert "CUDA_HOME:" in log and "q2kernels._C built" in log and "Q2K_INT_MMA=s4" in log
    assert all(f"tests/{t}.py" in log for t in ("test_grouped_conv", "test_dorefa", "test_det_float"))
    data = json.loads((folder / "campaign.json").read_text())
    # The Triton cache: never used without a GPU (benchmarks/triton_cache.py, tests/test_triton_cache.py);
    # every stage records what it compiled, nothing under the interpreter.
    assert not data["env"]["triton_cache"]["used"] and "== triton cache: " in log
    assert f"kernels compile into {triton_dir}" in log
    assert all(s["triton_compiled"] == {"q2kernels": {}, "inductor": 0, "launchers": 0} for s in status)
    assert log.count(": triton: 0 q2kernels specialisations compiled, 0 torch.compile kernels, 0 launchers") == 2
    assert data["env"]["device"] and folder.name == campaign.tag(data["env"])
    (device,) = data["device_info"]
    assert device["device"] == data["env"]["device"] and "copy_gbs" in device
    assert set(data["benchmarks"]) == {"n2uq"}
    assert all(r["device"] == data["env"]["device"] for r in data["benchmarks"]["n2uq"])
    assert "## n2uq" in (folder / "tables.md").read_text()

    again = _campaign("--dry-run", "--out", str(out), "1", "n2uq", TRITON_CACHE_DIR=str(triton_dir))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stage 1 setup: passed before" in again.stdout and "stage 11 n2uq: passed before" in again.stdout
    assert len(_status(out)) == 2
    assert sorted(p.name for p in folder.iterdir()) == sorted(campaign.FILES)


def test_stage_past_its_time_limit_is_killed_and_recorded(tmp_path):
    r = _campaign("--dry-run", "--out", str(tmp_path), "--timeout-scale", "0.00001", "setup", timeout=600)
    assert r.returncode == 1
    (status,) = _status(tmp_path)
    assert status["result"] == "timed out" and status["seconds"] < 60
    log = (_folder(tmp_path) / "campaign.log").read_text()
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
