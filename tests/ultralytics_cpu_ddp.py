"""Ultralytics' own DDP, on CPU processes with gloo: for a test on a machine without GPUs.

Ultralytics (8.4) trains with DDP only on accelerators, in four places:
- BaseTrainer.__init__ counts the devices of `device`, none for "cpu" (world_size 0: one process);
- BaseTrainer._setup_ddp, run first in each worker, picks an accelerator (set_device) and NCCL;
- BaseTrainer._setup_train wraps the model in DistributedDataParallel(device_ids=[device.index]),
  [None] on the CPU, which DDP refuses for a CPU module (it takes no device_ids there);
- BaseTrainer.final_eval validates best.pt on every rank, and BaseValidator.__call__ puts a DDP
  rank's model on AutoBackend(device=torch.device("cuda", torch.cuda.current_device())).
cpu_ddp(trainer_cls, processes) is trainer_cls with those four changed and nothing else: the launch
(generate_ddp_command: the trainer class, arguments and callbacks cloudpickled, torch.distributed.run),
the DistributedSampler, the loss scaling, the broadcasts, the validation gathered on rank 0 and the
checkpoints stay Ultralytics' own. The workers import this module (it is on the launching process's sys.path, which
Ultralytics' generated worker script restores).
"""
from __future__ import annotations

from datetime import timedelta
from unittest import mock

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from ultralytics.engine import validator
from ultralytics.nn.autobackend import AutoBackend
from ultralytics.utils import LOCAL_RANK, RANK


class _CPUDistributedDataParallel(DistributedDataParallel):
    """DDP of a CPU module given Ultralytics' device_ids=[None]."""

    def __init__(self, module, device_ids=None, **kwargs):
        super().__init__(module, **kwargs)


class _NoAccelerator:
    """What BaseValidator.__call__ asks a DDP rank's accelerator module for: a device index, for the
    torch.device that _autobackend_on_cpu then replaces (torch.cuda would fail without a driver)."""

    @staticmethod
    def current_device() -> int:
        return 0


def _autobackend_on_cpu(*args, device=None, **kwargs):
    return AutoBackend(*args, device=torch.device("cpu"), **kwargs)


class CPUDDP:
    """The mixin cpu_ddp() puts before a trainer class, with `processes` set (module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.device.type != "cpu":
            raise ValueError(f"device: cpu_ddp trains on CPU processes, got {self.args.device!r}")
        self.world_size = self.processes
        self.ddp = LOCAL_RANK == -1  # the launching process starts the workers; a worker trains

    def _setup_ddp(self):
        # A short timeout: a rank stuck in a collective fails within a test's time, with its stack.
        dist.init_process_group("gloo", rank=RANK, world_size=self.world_size, timeout=timedelta(minutes=2))

    def _setup_train(self):
        with mock.patch.object(nn.parallel, "DistributedDataParallel", _CPUDistributedDataParallel):
            super()._setup_train()

    def final_eval(self):
        with mock.patch.object(validator, "get_torch_device_backend", lambda device_type: _NoAccelerator), \
                mock.patch.object(validator, "AutoBackend", _autobackend_on_cpu):
            super().final_eval()


def cpu_ddp(trainer_cls: type, processes: int = 2) -> type:
    """trainer_cls training in `processes` CPU processes under Ultralytics' DDP (module docstring)."""
    if processes < 2:
        raise ValueError(f"processes: DDP needs at least 2, got {processes}")
    return type(trainer_cls.__name__, (CPUDDP, trainer_cls), {"processes": processes, "__module__": __name__})
