"""Q2DetectionTrainer under Ultralytics' DDP: two CPU processes (gloo) launched the way Ultralytics
launches its workers (generate_ddp_command: the trainer class made by with_options, its arguments
and callbacks cloudpickled, torch.distributed.run), one epoch of a few steps on each rank's own
shard of a synthetic dataset, validation (gathered on rank 0), rank 0's checkpoints and the final
validation of best.pt. Only what Ultralytics hard-codes for accelerators is changed
(tests/ultralytics_cpu_ddp.py). Needs Ultralytics and cloudpickle (the [ultralytics] extra; see
tests/test_ultralytics.py)."""
import math
import os
import subprocess

import pytest
import torch

from q2kernels.integrations import ultralytics_offline

ultralytics_offline()  # Ultralytics must never reach the network or write outside a temp dir

pytest.importorskip("ultralytics", reason="Ultralytics is not installed (pip install q2kernels[ultralytics])")

import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from ultralytics.nn.tasks import DetectionModel, load_checkpoint  # noqa: E402
from ultralytics.utils.dist import ddp_cleanup, generate_ddp_command  # noqa: E402
from ultralytics.utils.torch_utils import unwrap_model  # noqa: E402

from q2kernels.integrations.ultralytics import (Q2DetectionModel, Q2DetectionTrainer,  # noqa: E402
                                                write_synthetic_dataset)
from q2kernels.nn import GatedFusion, Quantizer  # noqa: E402

from ultralytics_cpu_ddp import cpu_ddp  # noqa: E402

IMGSZ = 64
RANKS = 2
TRAIN_IMAGES, BATCH = 8, 4  # 4 images per rank, 2 per step: 2 optimiser steps on each rank


def _recorder():
    """Callbacks that run in every worker (cloudpickled with the trainer's callbacks; nested
    functions go by value): each step's losses, then, once the epoch, rank 0's validation and its
    checkpoint are done, the rank's model state, written to save_dir/rank{r}.pt."""
    steps = []

    def on_step(trainer):
        steps.append({k: float(v) for k, v in trainer.loss_items.items()})

    def on_end(trainer):
        model = unwrap_model(trainer.model)
        torch.save({
            "world": dist.get_world_size(), "backend": dist.get_backend(), "steps": steps,
            "ddp": isinstance(trainer.model, DistributedDataParallel),
            "theta": {n: m.theta.detach().clone() for n, m in model.named_modules() if isinstance(m, GatedFusion)},
            "quantizers": {f"{n}.{k}": v.detach().clone() for n, q in model.named_modules()
                           if isinstance(q, Quantizer) for k, v in q.state_dict().items()},
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        }, trainer.save_dir / f"rank{dist.get_rank()}.pt")

    return on_step, on_end


def _run(cmd, timeout):
    """cmd (torch.distributed.run) with one thread a process. On timeout, SIGTERM: torchrun passes it
    on to its workers, each in a session of its own."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, err = proc.communicate()
        pytest.fail(f"the DDP run took over {timeout} s:\n{out[-3000:]}{err[-6000:]}")
    return proc.returncode, out, err


def test_two_cpu_ranks_train_through_ultralytics_ddp(tmp_path):
    data = write_synthetic_dataset(tmp_path / "ds", train=TRAIN_IMAGES, val=2, imgsz=IMGSZ, classes=2)
    # Float weights for the teacher: the same file on both ranks, so the same teacher (a model built
    # from the YAML alone is initialised from each rank's own seed).
    torch.manual_seed(0)
    weights = tmp_path / "float.pt"
    torch.save({"model": DetectionModel("yolo11n.yaml", nc=2, verbose=False)}, weights)
    trainer = cpu_ddp(Q2DetectionTrainer.with_options(recipe="lsq"), processes=RANKS)(overrides=dict(
        model=str(weights), data=str(data), epochs=1, imgsz=IMGSZ, batch=BATCH, nbs=BATCH, device="cpu", workers=0,
        amp=False, plots=False, mosaic=0.0, warmup_epochs=0, seed=0, project=str(tmp_path), name="ddp", exist_ok=True))
    on_step, on_end = _recorder()
    trainer.add_callback("on_train_batch_end", on_step)
    trainer.add_callback("on_fit_epoch_end", on_end)

    # BaseTrainer.train's DDP branch, with a timeout.
    cmd, file = generate_ddp_command(trainer)
    try:
        returncode, out, err = _run(cmd, timeout=300)
    finally:
        ddp_cleanup(trainer, file)
    assert returncode == 0, out[-3000:] + err[-6000:]

    ranks = [torch.load(trainer.save_dir / f"rank{r}.pt") for r in range(RANKS)]
    for rank in ranks:
        assert (rank["world"], rank["backend"], rank["ddp"]) == (RANKS, "gloo", True)
        assert len(rank["steps"]) == TRAIN_IMAGES // BATCH  # each rank: its half of the images, BATCH / RANKS a step
        assert all(math.isfinite(v) for step in rank["steps"] for v in step.values()), rank["steps"]
        assert all(step["qada_loss"] > 0 for step in rank["steps"])  # the float teacher ran on every rank
    first, second = ranks
    assert first["steps"] != second["steps"]  # each rank trained on its own shard
    # The gate controllers all-reduce the branch energies: theta is bitwise equal with no buffer
    # broadcast (Ultralytics' DDP has forward_sync_buffers=False), and it moved.
    assert len(first["theta"]) == 4 and first["theta"].keys() == second["theta"].keys()
    for name, theta in first["theta"].items():
        assert torch.equal(theta, second["theta"][name]), name
        assert theta.abs().max() > 0, name
    # The quantizers were initialised from all-reduced statistics and trained on all-reduced gradients.
    assert first["quantizers"].keys() == second["quantizers"].keys()
    for name, value in first["quantizers"].items():
        assert torch.equal(value, second["quantizers"][name]), name
    assert all(bool(v) for k, v in first["quantizers"].items() if k.endswith(".initialized"))
    for name, value in first["params"].items():
        assert torch.equal(value, second["params"][name]), name

    model, _ = load_checkpoint(trainer.wdir / "last.pt")  # rank 0 validated and saved
    assert type(model) is Q2DetectionModel and model.q2["teacher"] == str(weights)
