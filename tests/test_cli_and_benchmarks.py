"""The README's first command (`q2k demo --smoke`), `q2k doctor`, and every benchmark's CPU smoke
mode: each must run to the end and report what it promises."""
import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _q2k(*args):
    return subprocess.run([sys.executable, "-m", "q2kernels.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def test_doctor_reports_versions_and_backends():
    r = _q2k("doctor")
    assert r.returncode == 0, r.stderr
    assert "torch" in r.stdout and "triton" in r.stdout and "GPU:" in r.stdout
    assert "CPU tensors -> reference" in r.stdout and "fake_quant" in r.stdout


def test_demo_smoke_runs_end_to_end(tmp_path):
    """`q2k demo --smoke`: float, QAT (LSQ W4A4, PACT W3A3, N2UQ W4A4 + Q-GBFusion + Q-ADA),
    calibration, LayerNorm removal and its fine-tuning, integer conversion; the demo itself asserts
    integer == fake-quant (the fine-tuned LN-free model for the Q2 run), the balanced gates reducing
    the branch gradient-norm imbalance, and fused == reference."""
    r = _q2k("demo", "--smoke", "--out", str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "demo OK" in out
    for run in ("lsq-W4A4", "pact-W3A3", "n2uq-W4A4+Q2"):
        assert f"\n{run} " in out
    line = next(l for l in out.splitlines() if l.startswith("n2uq-W4A4+Q2"))
    before, after = (float(v) for v in line.split("|log G0/G1|")[1].split("->"))
    assert after < before
    # float, fake-quant, LN removed, fine-tuned, integer: all measured for the Q2 run
    metrics = line.split()[1:6]
    assert all(0.0 <= float(v) <= 1.0 for v in metrics), line
    assert "Adam steps at lr" in out and "fine-tuning regains" in out
    if importlib.util.find_spec("onnxruntime") is not None:
        # The ONNX column: the deterministic integer model in onnxruntime, bit-identical on every image.
        for run in ("lsq-W4A4", "pact-W3A3", "n2uq-W4A4+Q2"):
            same, total = next(l for l in out.splitlines() if l.startswith(run + " ")).split()[6].split("/")
            assert same == total and int(total) > 0, run
    assert "fused kernels vs reference" in out and ": agree" in out
    assert (tmp_path / "loss_curves.png").stat().st_size > 0
    assert (tmp_path / "gradient_balance_n2uq-W4A4+Q2.png").stat().st_size > 0


@pytest.mark.skipif(importlib.util.find_spec("ultralytics") is not None,
                    reason="Ultralytics is installed here: tests/test_ultralytics.py runs this demo")
def test_ultralytics_demo_without_ultralytics_says_what_to_install():
    """`q2k demo --ultralytics` in an environment without the extra (the main one, where CI runs this
    file); the Ultralytics CI step runs the demo itself (python/ultralytics_qat.py --smoke)."""
    r = _q2k("demo", "--ultralytics", "--smoke")
    assert r.returncode == 2 and "pip install q2kernels[ultralytics]" in r.stderr, r.stdout + r.stderr
    r = _q2k("demo", "--ultralytics", "--steps", "3")
    assert r.returncode == 2 and "--steps does not apply" in r.stderr, r.stdout + r.stderr


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "benchmarks").glob("bench_*.py")))
def test_benchmark_smoke(name, tmp_path):
    bench = importlib.import_module(f"benchmarks.{name}")
    rows = bench.main(["--smoke", "--out", str(tmp_path)])
    assert rows and all(r["fwd_ms"] > 0 for r in rows if "fwd_ms" in r)
    assert list(tmp_path.glob("*.json")) and list(tmp_path.glob("*.md"))


def test_q2k_bench_runs_every_benchmark_into_one_record(tmp_path):
    r = _q2k("bench", "--smoke", "--out", str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    benches = {p.stem.removeprefix("bench_") for p in (ROOT / "benchmarks").glob("bench_*.py")}
    # The whole-run record <gpu>-<commit>.json beside each benchmark's <gpu>-<commit>-<name>.json.
    (record,) = [p for p in tmp_path.glob("*.json") if not any(p.stem.endswith(f"-{n}") for n in benches)]
    names = set(json.loads(record.read_text())["benchmarks"])
    assert names == benches
    assert {p.suffix for p in tmp_path.iterdir()} == {".json", ".md", ".png", ".jsonl"}


def test_recorded_gpu_run_summarised_into_the_readme(tmp_path, monkeypatch):
    run_all = importlib.import_module("benchmarks.run_all")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results -->\nnothing yet\n<!-- /results -->\nrest\n")
    monkeypatch.setattr(run_all, "README", readme)
    rows = [{"impl": "q2kernels", "speedup_vs_eager": v} for v in (2.0, 4.0, 9.0)] + [{"impl": "eager"}]
    record = tmp_path / "H100-abc.json"
    record.write_text(json.dumps({"env": {"device": "H100", "commit": "abc"}, "benchmarks": {"fake_quant": rows}}))
    run_all.main(["--summarize", str(record)])
    text = readme.read_text()
    assert "Recorded on H100 at abc" in text and "| fused fake quant, fwd+bwd vs eager | 4.00x | 2.00x | 9.00x |" in text
    assert text.startswith("intro\n") and text.endswith("<!-- /results -->\nrest\n") and "nothing yet" not in text
