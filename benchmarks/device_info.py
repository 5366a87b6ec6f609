"""The device a campaign runs on, as one row: its name (torch.cuda.get_device_name, e.g. an H100 or an
H200), compute capability, memory and measured device-to-device copy bandwidth (read + write bytes,
benchmarks/common.py copy_bandwidth_gbs): the bandwidth every floor in benchmarks/NOTES.md is taken
against for this device.

    python benchmarks/device_info.py [--out DIR]    # prints the row; with --out, appends it to DIR/rows.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402  (sets TRITON_INTERPRET before triton loads)

import torch  # noqa: E402


def row() -> dict:
    r = {"bench": "device", **common.environment()}
    if common.HAS_CUDA:
        props = torch.cuda.get_device_properties(0)
        r.update(capability="sm_%d%d" % torch.cuda.get_device_capability(), sms=props.multi_processor_count,
                 memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return r


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    r = row()
    print(f"device: {json.dumps(r)}", flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "rows.jsonl", "a") as f:
            f.write(json.dumps(r) + "\n")
    return r


if __name__ == "__main__":
    main()
