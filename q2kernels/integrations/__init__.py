"""Integrations with training frameworks. Each is a subpackage that imports its framework, an
optional dependency (`pip install q2kernels[ultralytics]`), so importing q2kernels never does."""
