"""Data-parallel QAT with Q-GBFusion: every rank must hold bitwise-equal parameters and gates.

    torchrun --nproc_per_node 2 python/ddp_train.py [--smoke]

gloo on CPU, nccl on GPUs. The quantizers all-reduce their first-batch initialisation statistics,
so every rank starts from the same step sizes with no code here; the gated fusion's controller
all-reduces the branch gradient energies over the default process group inside the backward, so
each rank moves its gates by the same amount; DDP averages the parameter gradients. The run ends by
comparing every parameter and the gate controller's state across ranks, bit for bit (NaN included),
and says which tensors hold non-finite values, if any.
"""
import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from q2kernels.data import labels_at_stride, make_shapes
from q2kernels.nn import GatedFusion, quantize_model

from qat_custom_model import TwoBranchNet


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--recipe", default="lsq")
    p.add_argument("--lr", type=float, default=0.02)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # identical initial weights on every rank
    model = quantize_model(TwoBranchNet(GatedFusion([32, 32], mode="balanced")), args.recipe, 4, 4).to(device)
    x_all, y_all = make_shapes(64 * world, 32, seed=0)
    ddp = DDP(model, device_ids=[device] if cuda else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)
    g = torch.Generator().manual_seed(1 + rank)  # each rank its own shard of batches
    steps = 20 if args.smoke else 200
    for step in range(steps):
        idx = torch.randint(0, x_all.shape[0], (8,), generator=g)
        x, y = x_all[idx].to(device), labels_at_stride(y_all[idx], 4).to(device)
        loss = nn.functional.cross_entropy(ddp(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # Parameters and the gates' controller state must agree bit for bit. (BatchNorm running
    # statistics are rank-local between DDP's broadcasts of rank 0's buffers at each forward.)
    state = {k: v.detach() for k, v in model.named_parameters()}
    state.update({f"fuse.{k}": getattr(model.fuse, k) for k in ("theta", "grad_norm", "grad_norm_ema", "steps")})
    mismatched, nonfinite = [], [name for name, t in state.items() if not bool(torch.isfinite(t).all())]
    for name, t in state.items():
        gathered = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(gathered, t.contiguous())
        bits = [g.reshape(-1).view(torch.uint8) for g in gathered]  # bitwise: a NaN equals the same NaN
        if not all(torch.equal(bits[0], b) for b in bits[1:]):
            mismatched.append(name)
    if rank == 0:
        gates = model.fuse.gates().tolist()
        print(f"{world} ranks, {steps} steps: loss {loss.item():.3f}, gates {gates}; "
              f"{len(state) - len(mismatched)}/{len(state)} tensors bitwise equal across ranks")
    # Tear down in order: DDP first (its reducer holds the group and its last asynchronous work), then
    # the group, once every rank is done with it, so that no rank's gloo threads outlive it into
    # interpreter shutdown (one CI run saw rank 1 abort there, after all of the above had passed).
    del ddp, opt
    dist.barrier()
    dist.destroy_process_group()
    if nonfinite:
        raise SystemExit(f"rank {rank}: training diverged, non-finite values in {nonfinite}")
    if mismatched:
        raise SystemExit(f"rank {rank}: differ across ranks: {mismatched}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
