"""Q-GBFusion under data parallelism: two CPU processes (gloo), DDP, each rank on its own data.
The controller all-reduces the branch energies inside the backward, so after every step both ranks
hold bitwise-equal gate logits and EMA, with no buffer broadcast to paper over a difference; and
those values are docs/math.md §5 reproduced by hand from the ranks' own gradients."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import q2kernels
from q2kernels.nn import GatedFusion

from gate_controller_oracle import controller_by_hand

STEPS = 20


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.fuse = GatedFusion([4, 6], mode="balanced")
        self.head = nn.Conv2d(10, 2, 1)

    def forward(self, x):
        return self.head(self.fuse([self.a(x), 5 * self.b(x)]))


def _gathered(t):
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def _train(model, fusion, rank, backend, steps, check):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(100 + rank)  # every rank its own data
    with q2kernels.use_backend(backend):
        for step in range(steps):
            x = torch.randn(2, 3, 5, 5, generator=g)
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
            if check:
                for name in ("theta", "grad_norm", "grad_norm_ema", "steps"):
                    mine, other = _gathered(getattr(fusion, name))
                    assert torch.equal(mine, other), f"step {step}: {name} differs across ranks"


def _energies_are_summed(rank, process_group):
    """The balanced module's G is the norm of the ranks' summed energies E (each rank's own E
    captured here from the reference's backward, which does not all-reduce)."""
    g = torch.Generator().manual_seed(7 + rank)
    xs = [torch.randn(2, c, 3, 3, generator=g) * (1 + rank) for c in (4, 6)]
    dy = torch.randn(2, 10, 3, 3, generator=g)
    torch.manual_seed(0)
    m = GatedFusion([4, 6], mode="balanced", process_group=process_group)
    with q2kernels.use_backend("reference"):
        m([x.clone().requires_grad_() for x in xs]).backward(dy)
    seen = []
    y = q2kernels.reference.gated_fusion([x.clone().requires_grad_() for x in xs], torch.zeros(2), m.gamma,
                                         m.beta, on_energies=lambda e, a: seen.append(e))  # m's gates
    y.backward(dy)
    local = _gathered(seen[0])
    assert not torch.equal(local[0], local[1])
    assert torch.equal(m.grad_norm, torch.sqrt(local[0] + local[1]))


def _three_steps_by_hand(rank, backend):
    """3 steps (the first, then the EMA; theta centred each time) of a balanced module with its
    default constants, against the hand-written loop fed with E_k = sum over the ranks of each
    rank's sum(dx_k^2) (float64, from the grads autograd returned on that rank)."""
    torch.manual_seed(0)
    m = GatedFusion([4, 6], mode="balanced", affine=False)
    g = torch.Generator().manual_seed(31 + rank)
    energies = []
    with q2kernels.use_backend(backend):
        for step in range(3):
            xs = [(torch.randn(2, c, 3, 3, generator=g) * (1 + k + rank)).requires_grad_() for k, c in enumerate((4, 6))]
            m(xs).backward(torch.randn(2, 10, 3, 3, generator=g))
            mine = torch.stack([x.grad.double().square().sum() for x in xs])
            energies.append(sum(_gathered(mine)).tolist())
            want_g, want_gbar, want_theta = controller_by_hand(energies, [0.0, 0.0])[-1]
            torch.testing.assert_close(m.grad_norm.double(), torch.tensor(want_g, dtype=torch.float64),
                                       rtol=1e-6, atol=0, msg=f"step {step}: G")
            torch.testing.assert_close(m.grad_norm_ema.double(), torch.tensor(want_gbar, dtype=torch.float64),
                                       rtol=1e-6, atol=0, msg=f"step {step}: Gbar")
            torch.testing.assert_close(m.theta.double(), torch.tensor(want_theta, dtype=torch.float64),
                                       rtol=0, atol=1e-6, msg=f"step {step}: theta")
            for name in ("theta", "grad_norm", "grad_norm_ema"):
                mine_t, other = _gathered(getattr(m, name))
                assert torch.equal(mine_t, other), f"step {step}: {name} differs across ranks"
    assert m.theta.abs().max() > 1e-3, "the gates never moved"


def _worker(rank, world, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _three_steps_by_hand(rank, "reference")
        _three_steps_by_hand(rank, "triton")
        _energies_are_summed(rank, None)  # the default group
        _energies_are_summed(rank, dist.new_group([0, 1]))
        torch.manual_seed(0)
        net = _Net()
        # No buffer broadcast: equality must come from the all-reduced energies alone.
        _train(DDP(net, broadcast_buffers=False), net.fuse, rank, "triton", STEPS, check=True)
        assert int(net.fuse.steps) == STEPS
        assert net.fuse.theta.abs().max() > 1e-3, "the gates never moved"
        # The default DDP setup (buffers broadcast from rank 0 each forward) runs the loop as well.
        torch.manual_seed(0)
        net2 = _Net()
        _train(DDP(net2), net2.fuse, rank, "reference", 3, check=True)
    finally:
        dist.destroy_process_group()


def test_gates_bitwise_equal_across_two_gloo_ranks(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous")), nprocs=2, join=True)
