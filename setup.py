# The package metadata lives in pyproject.toml. The C++/CUDA extension q2kernels._C is compiled
# with ninja on first use and cached (q2kernels/_ext.py), so installing never needs a compiler or
# a matching CUDA toolkit, and `pip install --no-build-isolation --no-deps -e .` works offline.
#
# The sources stay in csrc/ beside the package (the layout of flash-attention and vLLM); a wheel
# carries them inside the package, as q2kernels/_csrc, so that an installed q2kernels builds its
# extension exactly as a checkout does. The sdist takes csrc/ through MANIFEST.in.
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCE_SUFFIXES = {".h", ".cuh", ".cpp", ".cu"}


class BuildPyWithSources(build_py):
    """build_py that also copies csrc/ (C++/CUDA sources only) to q2kernels/_csrc in the build."""

    def run(self):
        super().run()
        if self.editable_mode:
            return
        dest = Path(self.build_lib) / "q2kernels" / "_csrc"
        shutil.rmtree(dest, ignore_errors=True)
        for src in sorted(CSRC.rglob("*")):
            if src.is_file() and src.suffix in SOURCE_SUFFIXES:
                target = dest / src.relative_to(CSRC)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target)


setup(cmdclass={"build_py": BuildPyWithSources})
