"""`bash benchmarks/gpu_check.sh next --budget SECONDS`, proven on the CPU: each call picks the pending
stages that fit its budget from the committed results, writes only what a device call can bring back
(campaign.FILES: at most 4 files, one folder down, plain names), and the next call, once those files
are committed under the results folder, goes on where the last one stopped until every stage passed."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import campaign, run_all  # noqa: E402

NAME = re.compile(r"^[A-Za-z0-9._-]+$")
# benchmarks/NOTES.md "GPU campaign stages": the first call of every drawn device.
CALL_BUDGET = 540


def _next(out, results, budget, timeout=3000):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("OUT", None)
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "next", "--budget", str(budget),
                           "--dry-run", "--results", str(results), "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def check_device_files(out: Path) -> list[Path]:
    """What a device call brings back: at most 8 files, at most 2 folders below $OUT, plain names; the
    campaign's own rule is stricter: at most 4 files, in one folder."""
    files = [p for p in out.rglob("*") if p.is_file() or p.is_symlink()]
    assert len(files) <= 4, files
    for p in out.rglob("*"):
        rel = p.relative_to(out)
        assert all(NAME.match(part) for part in rel.parts), rel
        if p.is_file():
            assert len(rel.parts) <= 2, rel  # $OUT/<device>-<commit>/<file>
            assert not p.is_symlink() and p.stat().st_size < 16 * 2**20, rel
    return files


def _fake(results: Path, folder: str, records: list[dict]) -> None:
    (results / folder).mkdir(parents=True)
    (results / folder / "campaign.json").write_text(json.dumps({"stages": records}))


def _rec(stage, result="passed", seconds=100.0, dry=True):
    s = campaign.stages_named([str(stage)])[0]
    return {"stage": s.name, "number": s.number, "result": result, "seconds": seconds, "limit_s": 300.0,
            "dry_run": dry}


def test_plan_takes_pending_stages_that_fit_in_priority_order(tmp_path):
    by = {s.number: s for s in campaign.STAGES}
    # Nothing recorded: estimates, in stage order, passing over what does not fit.
    assert [s.number for s, _ in campaign.plan([], by[1].estimate_s + by[2].estimate_s)] == [1, 2]
    assert by[3].estimate_s < by[2].estimate_s
    assert [s.number for s, _ in campaign.plan([_rec(1)], by[2].estimate_s - 1)] == [3]
    records = [_rec(1), _rec(2), _rec(3, "failed", 50.0), _rec(4, "timed out", 300.0), _rec(5, seconds=10.0)]
    # A passed stage is done; one that failed or timed out comes after the never-tried ones, costed at
    # its recorded time (its limit when it timed out).
    chosen = campaign.plan(records, 10_000)
    assert [s.number for s, _ in chosen] == [6, 7, 8, 9, 10, 11, 12, 13, 3, 4]
    assert dict((s.number, t) for s, t in chosen)[3] == 50.0 and dict((s.number, t) for s, t in chosen)[4] == 300.0
    assert campaign.plan(records + [_rec(n) for n in range(3, 14)], 10_000) == []


def test_next_reads_committed_results_of_its_own_mode_only(tmp_path):
    results = tmp_path / "results"
    _fake(results, "NVIDIA_H100_80GB_HBM3-abc1234", [_rec(n, dry=False) for n in range(1, 14)])
    _fake(results, "cpu-x86_64-abc1234", [_rec(n) for n in range(1, 13)])
    assert [r["stage"] for r in campaign.history(results, dry=True)] == [s.name for s in campaign.STAGES[:12]]
    assert len(campaign.history(results, dry=False)) == 13
    assert [s.number for s, _ in campaign.plan(campaign.history(results, True), 600)] == [13]
    # Nothing pending that fits: the call says so and writes its (empty) record, nothing else.
    r = _next(tmp_path / "out", results, 100)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "nothing pending fits the budget" in r.stdout
    check_device_files(tmp_path / "out")


def test_a_whole_campaign_in_budgeted_calls_each_committed_before_the_next(tmp_path):
    # Every stage's dry run, in the calls NOTES.md plans (`next --budget 540` per drawn device), each
    # call's files counted as the device tool counts them and then "committed" under results/.
    results = tmp_path / "results"
    results.mkdir()
    ran = []
    for call in range(len(campaign.STAGES) + 1):
        expected = [s.name for s, _ in campaign.plan(campaign.history(results, True), CALL_BUDGET)]
        if not expected:
            break
        out = tmp_path / f"out{call}"
        r = _next(out, results, CALL_BUDGET)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        files = check_device_files(out)
        (folder,) = {f.parent for f in files}
        assert sorted(f.name for f in files) == sorted(campaign.FILES)
        data = json.loads((folder / "campaign.json").read_text())
        assert [s["stage"] for s in data["stages"]] == expected
        assert all(s["result"] == "passed" for s in data["stages"])
        assert sum(s["seconds"] for s in data["stages"]) < 3000
        ran += expected
        # The same commit throughout this test: each call's folder gets a name not yet in results/.
        assert folder.name == campaign.tag(data["env"]) + ("" if call == 0 else f"_{call + 1}")
        shutil.copytree(folder, results / folder.name)
    assert sorted(ran) == sorted(s.name for s in campaign.STAGES) and len(ran) == len(set(ran))
    assert call >= 2
    benches = {}
    for path in results.glob("*/campaign.json"):
        data = json.loads(path.read_text())
        for name, rows in data["benchmarks"].items():
            benches.setdefault(name, []).extend(rows)
        assert all(r["device"] == data["env"]["device"] for rows in data["benchmarks"].values() for r in rows)
    assert set(benches) == set(run_all.ORDER)
    # At smoke sizes a shard may hold no case; each row says which shard measured it.
    assert {r["shard"] for r in benches["fake_quant"]} <= {"0/4", "1/4", "2/4", "3/4"}
