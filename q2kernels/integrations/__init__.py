"""Integrations with training frameworks. Each is a subpackage that imports its framework, an
optional dependency (`pip install q2kernels[ultralytics]`), so importing q2kernels never does."""

import os
import tempfile


def ultralytics_offline() -> None:
    """Keep Ultralytics offline (no hub, settings sync, font or asset download) with its config under
    the temp dir, unless the environment says otherwise. Ultralytics reads these when it is first
    imported, so a program (the demo, the tests) calls this before importing it."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "0")
    os.environ.setdefault("YOLO_CONFIG_DIR", os.path.join(tempfile.gettempdir(), "q2k_yolo_config"))
