"""The Triton cache carried to the device (benchmarks/triton_cache.py), proven on the CPU: built for sm_90
by the recorder of tests/triton_spills.py, packed with its fingerprint, unpacked where it was built, and
hit there by the same launches (a hit adds no entry to the cache, a new specialisation does: the
measure the campaign records per stage); refused, with the reason, wherever Triton's key would differ."""
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import triton_cache  # noqa: E402

_WORKLOAD = '''
import torch
import triton
import triton.language as tl


@triton.jit
def _carried_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)


def drive():
    for block in (64, 128):
        x = torch.empty(1000)
        _carried_kernel[(16,)](x, torch.empty_like(x), x.numel(), BLOCK=block)


def drive_more():  # one specialisation the cache does not hold: n is 1, which Triton specialises on
    x = torch.empty(1)
    _carried_kernel[(1,)](x, torch.empty_like(x), x.numel(), BLOCK=64)
'''


def _compile(cache_dir: Path, workload: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(cache_dir), PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_spills.py"), workload], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("triton_cache")
    (tmp / "workload.py").write_text(_WORKLOAD)
    cache_dir, out = tmp / "built-cache", tmp / "prebuilt"
    manifest = triton_cache.build(out, cache_dir, (f"{tmp / 'workload.py'}:drive",))
    return tmp, cache_dir, out, manifest


def test_the_manifest_says_what_the_cache_holds_and_what_built_it(built):
    tmp, cache_dir, out, manifest = built
    assert manifest == json.loads((out / triton_cache.MANIFEST).read_text())
    assert manifest["cache_dir"] == str(cache_dir.resolve()) and manifest["target"] == "cuda:sm_90"
    assert manifest["specialisations"] == 2 and manifest["kernels"] == {"_carried_kernel": 2}
    assert manifest["bytes"] == (out / triton_cache.TAR).stat().st_size
    assert manifest["sha256"] == triton_cache._sha256_file(out / triton_cache.TAR)
    here = triton_cache.fingerprint(90)
    assert {k: manifest[k] for k in triton_cache.FINGERPRINT} == here
    assert here["backend"].endswith("-90") and len(here["triton_key"]) == 64
    with tarfile.open(out / triton_cache.TAR) as tar:
        names = tar.getnames()
    # Relative paths <hash>/<file>, binaries and metadata only (TRITON_STORE_BINARY_ONLY): no PTX or IR.
    assert names and all(len(Path(n).parts) == 2 and not Path(n).is_absolute() for n in names)
    suffixes = {Path(n).suffix for n in names}
    assert {".json", ".cubin"} <= suffixes and not suffixes & {".ptx", ".ttir", ".ttgir", ".llir"}, suffixes
    assert sum(Path(n).name.startswith("__grp__") for n in names) == 2


def test_the_carried_cache_is_hit_where_it_is_unpacked_and_misses_are_counted(built):
    tmp, cache_dir, out, manifest = built
    shutil.rmtree(cache_dir)
    used_dir, info = triton_cache.install(out, 90)
    assert info["used"] and info["carried"] == 2 and used_dir == cache_dir.resolve(), info
    assert "using the carried Triton cache (2 specialisations" in triton_cache.describe_install(used_dir, info)
    before = triton_cache.entries(used_dir)
    assert len(before) == 2
    _compile(used_dir, f"{tmp / 'workload.py'}:drive")
    assert triton_cache.compiled_since(used_dir, before) == {"q2kernels": {}, "inductor": 0, "launchers": 0}
    _compile(used_dir, f"{tmp / 'workload.py'}:drive_more")
    compiled = triton_cache.compiled_since(used_dir, before)
    assert compiled == {"q2kernels": {"_carried_kernel": 1}, "inductor": 0, "launchers": 0}
    assert triton_cache.describe_compiled(compiled) == \
        "1 q2kernels specialisations compiled (_carried_kernel x1), 0 torch.compile kernels, 0 launchers"


def _copy(out: Path, dest: Path, **changes) -> Path:
    shutil.copytree(out, dest)
    manifest = json.loads((dest / triton_cache.MANIFEST).read_text())
    (dest / triton_cache.MANIFEST).write_text(json.dumps(dict(manifest, **changes)))
    return dest


@pytest.mark.parametrize("field", ["python", "libtriton_sha256", "triton_key", "backend", "env"])
def test_a_cache_whose_key_would_differ_is_not_used_and_the_first_difference_is_named(built, tmp_path,
                                                                                       monkeypatch, field):
    _, _, out, manifest = built
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "own"))
    wrong = {"env": {"TRITON_X": "1"}, "python": "2.7"}.get(field, "0" * 64)
    used_dir, info = triton_cache.install(_copy(out, tmp_path / "p", **{field: wrong}), 90)
    assert not info["used"] and used_dir == tmp_path / "own"
    assert info["why"].startswith(f"{field} differs: built with {wrong!r}, here "), info


def test_install_says_why_it_does_not_use_a_cache(built, tmp_path, monkeypatch):
    _, _, out, _ = built
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    used_dir, info = triton_cache.install(tmp_path / "nothing", 90)
    assert used_dir == triton_cache.DEFAULT_DIR and not info["used"] and "is missing" in info["why"]
    assert triton_cache.describe_install(used_dir, info) == (
        f"triton cache: no carried Triton cache ({tmp_path / 'nothing' / triton_cache.MANIFEST} is missing); "
        f"kernels compile into {triton_cache.DEFAULT_DIR}")
    assert "a dry run" in triton_cache.install(out, None)[1]["why"]
    assert "this GPU is sm_80" in triton_cache.install(out, 80)[1]["why"]
    for bad in ("{", json.dumps({"specialisations": 1, "cache_dir": "relative", "target": "cuda:sm_90"}),
                json.dumps({"cache_dir": "/tmp/x", "target": "cuda:sm_90"}), json.dumps([1])):
        folder = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        (folder / triton_cache.MANIFEST).write_text(bad)
        used_dir, info = triton_cache.install(folder, 90)
        assert not info["used"] and "is not a manifest of this script" in info["why"], (bad, info)


def test_a_fingerprint_that_cannot_be_read_leaves_the_cache_unused_not_the_campaign_stopped(built, monkeypatch):
    _, _, out, _ = built

    def broken(arch):
        raise ImportError("cannot import name 'get_cache_invalidating_env_vars'")

    monkeypatch.setattr(triton_cache, "fingerprint", broken)
    used_dir, info = triton_cache.install(out, 90)
    assert not info["used"] and info["why"] == ("could not read this process's fingerprint (ImportError: cannot "
                                                "import name 'get_cache_invalidating_env_vars')")


def test_a_tarball_reaching_outside_its_folder_is_refused(built, tmp_path):
    _, _, out, _ = built
    target = tmp_path / "unpack-here"
    folder = _copy(out, tmp_path / "p", cache_dir=str(target))
    with tarfile.open(folder / triton_cache.TAR, "w:gz") as tar:
        data = b"planted"
        member = tarfile.TarInfo("../escaped.json")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    used_dir, info = triton_cache.install(folder, 90)
    assert not info["used"] and "its sha256 is not the manifest's" in info["why"], info
    # A manifest that vouches for the hostile tarball: the unpacking refuses the member.
    _copy(folder, tmp_path / "q", sha256=triton_cache._sha256_file(folder / triton_cache.TAR))
    used_dir, info = triton_cache.install(tmp_path / "q", 90)
    assert not info["used"] and "could not unpack" in info["why"] and "outside" in info["why"], info
    assert not (tmp_path / "escaped.json").exists()


def test_a_tarball_cut_short_or_missing_is_not_used(built, tmp_path):
    _, _, out, _ = built
    folder = _copy(out, tmp_path / "p")
    whole = (out / triton_cache.TAR).read_bytes()
    (folder / triton_cache.TAR).write_bytes(whole[: len(whole) // 2])
    used_dir, info = triton_cache.install(folder, 90)
    assert not info["used"] and "its sha256 is not the manifest's (cut short or replaced)" in info["why"], info
    (folder / triton_cache.TAR).unlink()
    assert "could not unpack" in triton_cache.install(folder, 90)[1]["why"]


def test_build_refuses_a_cache_dir_in_use_and_a_tarball_too_big_to_carry(built, tmp_path, monkeypatch):
    _, cache_dir, _, _ = built
    used = tmp_path / "used"
    used.mkdir()
    (used / "something").write_text("x")
    with pytest.raises(SystemExit, match="is not empty"):
        triton_cache.build(tmp_path / "o", used, ("ops",))
    monkeypatch.setattr(triton_cache, "MAX_BYTES", 100)
    with pytest.raises(SystemExit, match="over the .* MiB a device call can carry"):
        triton_cache.pack(cache_dir, tmp_path / "o2")
    assert not (tmp_path / "o2" / triton_cache.TAR).exists()


def test_what_a_stage_compiled_is_told_apart_by_kind(tmp_path):
    files = ["A/__grp___fake_quant_fwd_kernel.json", "B/__grp___fake_quant_fwd_kernel.json",
             "C/__grp__triton_poi_fused_add_0.json", "D/__triton_launcher.cpython-312-x86_64-linux-gnu.so",
             "E/cuda_utils.cpython-312-x86_64-linux-gnu.so", "F/_fake_quant_fwd_kernel.cubin"]
    before = {"A/__grp___fake_quant_fwd_kernel.json"}
    for f in files:
        (tmp_path / f).parent.mkdir(exist_ok=True)
        (tmp_path / f).write_text("")
    assert triton_cache.compiled_since(tmp_path, before) == {
        "q2kernels": {"_fake_quant_fwd_kernel": 1}, "inductor": 1, "launchers": 1}
    assert triton_cache.compiled_since(tmp_path / "absent", set()) == {"q2kernels": {}, "inductor": 0, "launchers": 0}
