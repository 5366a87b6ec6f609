"""Triton's kernel cache, compiled here for the device and carried to it, so that device time is not
spent compiling what a CPU can compile.

    python benchmarks/triton_cache.py build [--out prebuilt] [--cache-dir /tmp/q2k-triton-cache]

`build` compiles every Triton specialisation that the campaign's GPU tests and benchmarks launch
(tests/triton_spills.py's recorder and workloads: keyed as Triton keys them, for sm_90 by the ptxas
of the triton wheel) into an empty Triton cache at --cache-dir, with TRITON_STORE_BINARY_ONLY (cubin
and metadata only), and writes OUT/triton-cache.tar.gz and OUT/triton-cache.json (the manifest: what
the cache was built with, where, and which kernels it holds).

Triton finds a kernel in its cache by a hash of: every file of the triton package (libtriton.so of
this Python's ABI included), the kernel's source and specialisation, ptxas's version and the target,
the compile options and any cache-invalidating TRITON_* variables. So the cache is built with the
device's Python (3.12) and Triton (3.6.0), and it only helps where all of those match: `install`
compares the manifest with the device's own fingerprint, names the first part that differs, and uses
the cache only when none does. Triton's group files hold absolute paths, so the cache is unpacked
where it was built (--cache-dir, default /tmp/q2k-triton-cache; the manifest says where).

The campaign (benchmarks/campaign.py) installs the carried cache before its stages, points every
stage's TRITON_CACHE_DIR at it, and records per stage the Triton kernels compiled during it (new
entries of the cache: a hit adds none), q2kernels' kernels by name, torch.compile's (inductor,
"triton_*") as a count. That count is the measurement of whether the carried cache is hit there.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TAR, MANIFEST = "triton-cache.tar.gz", "triton-cache.json"
DEFAULT_DIR = Path("/tmp/q2k-triton-cache")
# A device call carries at most 64 MiB with the working tree (~3 MiB) and the prebuilt ops library (~2 MiB).
MAX_BYTES = 48 * 2**20
ARCH = 90  # the device's GPUs (H100, H200): sm_90
# The manifest's fields that enter Triton's cache key (or explain a difference in it), in the order a
# mismatch is reported: the first names the cause.
FINGERPRINT = ("triton", "python", "libtriton_sha256", "triton_key", "backend", "env")


def fingerprint(arch: int) -> dict:
    """What Triton's cache key depends on beyond the kernel itself, in this process, for cuda:sm_<arch>."""
    import triton
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.cache import triton_key

    libtriton = Path(triton.__file__).parent / "_C" / ("libtriton." + _ext_suffix())
    return {"triton": triton.__version__, "python": ".".join(platform.python_version_tuple()[:2]),
            "libtriton_sha256": _sha256_file(libtriton),
            "triton_key": hashlib.sha256(triton_key().encode()).hexdigest(),
            "backend": make_backend(GPUTarget("cuda", arch, 32)).hash(),
            "env": get_cache_invalidating_env_vars()}


def _ext_suffix() -> str:
    import sysconfig
    return sysconfig.get_config_var("EXT_SUFFIX").split(".")[-1]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---- the cache's entries ---------------------------------------------------------------------------

def entries(cache_dir: Path) -> set[str]:
    """The compiled kernels in a Triton cache, one group file (<hash>/__grp__<kernel>.json) each, and
    the host-side launchers Triton builds with the C compiler at a kernel's first launch, one per
    argument signature (<hash>/__triton_launcher.<ext>): not carried (they link the device's libcuda),
    counted so that the device shows what they cost."""
    if not cache_dir.is_dir():
        return set()
    return {p.relative_to(cache_dir).as_posix() for pattern in ("*/__grp__*.json", "*/__triton_launcher.*")
            for p in cache_dir.glob(pattern)}


def _is_launcher(entry: str) -> bool:
    return "/__triton_launcher." in entry


def kernel_name(entry: str) -> str:
    return entry.split("/__grp__", 1)[1][: -len(".json")]


def compiled_since(cache_dir: Path, before: set[str]) -> dict:
    """What was compiled since `before` (entries(cache_dir) then): q2kernels' kernels by name and count,
    torch.compile's (inductor names its kernels triton_*) as one count, and the launchers built."""
    new = entries(cache_dir) - before
    names = Counter(kernel_name(e) for e in new if not _is_launcher(e))
    inductor = sum(n for k, n in names.items() if k.startswith("triton_"))
    return {"q2kernels": dict(sorted((k, n) for k, n in names.items() if not k.startswith("triton_"))),
            "inductor": inductor, "launchers": sum(map(_is_launcher, new))}


def describe_compiled(compiled: dict) -> str:
    ours = compiled["q2kernels"]
    return (f"{sum(ours.values())} q2kernels specialisations compiled"
            + (f" ({', '.join(f'{k} x{n}' for k, n in ours.items())})" if ours else "")
            + f", {compiled['inductor']} torch.compile kernels, {compiled['launchers']} launchers")


# ---- build (here) ----------------------------------------------------------------------------------

def build(out: Path, cache_dir: Path = DEFAULT_DIR,
          workloads: tuple[str, ...] = ("ops", "cuda_tests", "benchmarks")) -> dict:
    """Compiles the workloads' specialisations (for sm_90, tests/triton_spills.py's target) into the
    empty cache_dir and packs it into `out`."""
    cache_dir = cache_dir.resolve()
    if cache_dir.exists() and any(cache_dir.iterdir()):
        raise SystemExit(f"triton_cache: --cache-dir {cache_dir} is not empty; remove it or name another "
                         "(the tarball must hold exactly this build)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(cache_dir), TRITON_STORE_BINARY_ONLY="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_spills.py"), *workloads], env=env,
                       capture_output=True, text=True)
    summary = [line for line in r.stdout.splitlines() if "specialisations of" in line]
    # triton_spills exits 1 when a specialisation spills unlisted: it still compiled every one.
    if r.returncode not in (0, 1) or not summary:
        raise SystemExit(f"triton_cache: tests/triton_spills.py failed (exit {r.returncode}):\n"
                         + r.stdout[-4000:] + r.stderr[-4000:])
    return pack(cache_dir, out)


def pack(cache_dir: Path, out: Path) -> dict:
    """Writes out/TAR (the cache's entries, paths relative to it) and out/MANIFEST; returns the manifest."""
    cache_dir = cache_dir.resolve()
    found = sorted(e for e in entries(cache_dir) if not _is_launcher(e))
    if not found:
        raise SystemExit(f"triton_cache: no compiled kernels in {cache_dir}")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (TAR + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for folder in sorted({e.split("/")[0] for e in found}):
            for path in sorted((cache_dir / folder).iterdir()):
                if path.is_file() and ".tmp." not in path.name and path.name != "lock":
                    tar.add(path, arcname=f"{folder}/{path.name}")
    size = tmp.stat().st_size
    if size > MAX_BYTES:
        tmp.unlink()
        raise SystemExit(f"triton_cache: {size / 2**20:.1f} MiB packed, over the {MAX_BYTES / 2**20:g} MiB a "
                         "device call can carry beside the tree")
    os.replace(tmp, out / TAR)
    manifest = {"format": 1, "cache_dir": str(cache_dir), "target": f"cuda:sm_{ARCH}", **fingerprint(ARCH),
                "specialisations": len(found), "bytes": size, "sha256": _sha256_file(out / TAR),
                "kernels": dict(sorted(Counter(kernel_name(e) for e in found).items()))}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


# ---- install (on the device) -----------------------------------------------------------------------

def install(folder: Path, arch: int | None) -> tuple[Path, dict]:
    """The Triton cache directory for the campaign's stages, and what was done, in a record for its log
    and campaign.json: the carried cache of `folder` unpacked where it was built when its fingerprint
    is this process's for cuda:sm_<arch>; else an empty or earlier cache ($TRITON_CACHE_DIR, else
    DEFAULT_DIR), with the reason."""
    fallback = Path(os.environ.get("TRITON_CACHE_DIR") or DEFAULT_DIR)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return fallback, {"used": False, "why": f"no carried Triton cache ({manifest_path} is missing)"}
    try:
        manifest = json.loads(manifest_path.read_text())
        carried, cache_dir, sha256 = int(manifest["specialisations"]), Path(manifest["cache_dir"]), manifest["sha256"]
        if not cache_dir.is_absolute() or manifest.get("target") != f"cuda:sm_{ARCH}":
            raise ValueError("cache_dir must be absolute and target cuda:sm_90")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return fallback, {"used": False, "why": f"{manifest_path} is not a manifest of this script: {e}"}
    info = {"used": False, "carried": carried}
    if arch is None:
        return fallback, dict(info, why="no GPU in this process (a dry run compiles nothing)")
    if arch != ARCH:
        return fallback, dict(info, why=f"built for sm_{ARCH}, this GPU is sm_{arch}")
    try:
        here = fingerprint(arch)
    except Exception as e:  # noqa: BLE001 - an optional speed-up must never stop the campaign's stages
        return fallback, dict(info, why=f"could not read this process's fingerprint ({type(e).__name__}: {e})")
    for field in FINGERPRINT:
        if manifest.get(field) != here[field]:
            return fallback, dict(info, why=f"{field} differs: built with {manifest.get(field)!r}, here "
                                            f"{here[field]!r}")
    try:
        if _sha256_file(folder / TAR) != sha256:
            raise ValueError("its sha256 is not the manifest's (cut short or replaced)")
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tarfile.open(folder / TAR) as tar:
            tar.extractall(cache_dir, filter="data")
    except Exception as e:  # noqa: BLE001 - as above: a bad tarball (missing, truncated, hostile) is not used
        return fallback, dict(info, why=f"could not unpack {folder / TAR} into {cache_dir}: {e}")
    return cache_dir, dict(info, used=True, why=f"fingerprint matches; unpacked into {cache_dir}")


def describe_install(cache_dir: Path, info: dict) -> str:
    if "carried" not in info:
        return f"triton cache: {info['why']}; kernels compile into {cache_dir}"
    carried = f"the carried Triton cache ({info['carried']} specialisations for sm_{ARCH})"
    if info["used"]:
        return f"triton cache: using {carried}: {info['why']}"
    return f"triton cache: not using {carried}: {info['why']}; kernels compile into {cache_dir}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="compile the campaign's Triton specialisations for sm_90 and pack them")
    b.add_argument("--out", type=Path, default=ROOT / "prebuilt", help="folder for the tarball and manifest")
    b.add_argument("--cache-dir", type=Path, default=DEFAULT_DIR, help="an empty folder: where the cache is "
                   "built and, on the device, unpacked (an absolute path)")
    b.add_argument("workloads", nargs="*", default=["ops", "cuda_tests", "benchmarks"],
                   help="tests/triton_workloads.py functions or FILE.py:FUNCTION")
    args = p.parse_args(argv)
    manifest = build(args.out, args.cache_dir, tuple(args.workloads))
    print(f"{args.out / TAR}: {manifest['specialisations']} specialisations of {len(manifest['kernels'])} kernels, "
          f"{manifest['bytes'] / 2**20:.1f} MiB, for {manifest['target']} with triton {manifest['triton']} on "
          f"Python {manifest['python']}; unpacks into {manifest['cache_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
