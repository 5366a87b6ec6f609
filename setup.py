# The package metadata lives in pyproject.toml. The C++/CUDA extension q2kernels._C is compiled
# with ninja on first use and cached (q2kernels/_ext.py), so installing never needs a compiler or
# a matching CUDA toolkit, and `pip install --no-build-isolation --no-deps -e .` works offline.
from setuptools import setup

setup()
