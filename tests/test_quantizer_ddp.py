"""Quantizer initialisation under torch.distributed: two CPU processes (gloo), each with its own first
batch, must start from the same parameters with no user code — the statistics are all-reduced — and
those are the parameters the concatenation of both batches would give (written out here)."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from q2kernels.nn import LSQPlusQuantizer, LSQQuantizer, PACTQuantizer


def _batches():
    g = torch.Generator().manual_seed(5)
    # Rank 1's first batch is all zeros: on its own it would leave LSQ with s = 0.
    return [torch.randn(2, 3, 4, 4, generator=g) * 3, torch.zeros(1, 3, 4, 4)]


def _expected(both):
    flat = both.flatten()
    per_channel = both.transpose(0, 1).reshape(3, -1)
    return {
        "lsq": 2 * flat.abs().mean() / 7 ** 0.5,
        "lsq_channel": 2 * per_channel.abs().mean(1) / 7 ** 0.5,
        "lsq_plus": ((flat.max() - flat.min()) / 15, flat.min()),
        "pact": flat.max(),
    }


def _worker(rank, world, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        batches = _batches()
        x = batches[rank]
        exp = _expected(torch.cat(batches))
        quantizers = {"lsq": LSQQuantizer(4), "lsq_channel": LSQQuantizer(4, axis=1, channels=3),
                      "lsq_plus": LSQPlusQuantizer(4), "pact": PACTQuantizer(4)}
        for q in quantizers.values():
            q(x)
            assert q._initialized
        params = torch.cat([p.detach().reshape(-1) for q in quantizers.values() for p in q.parameters()])
        gathered = [torch.empty_like(params) for _ in range(world)]
        dist.all_gather(gathered, params)
        assert torch.equal(gathered[0].view(torch.int32), gathered[1].view(torch.int32)), "ranks differ"
        torch.testing.assert_close(quantizers["lsq"].s.detach(), exp["lsq"].reshape(1))
        torch.testing.assert_close(quantizers["lsq_channel"].s.detach(), exp["lsq_channel"])
        torch.testing.assert_close(quantizers["lsq_plus"].s.detach(), exp["lsq_plus"][0].reshape(1))
        torch.testing.assert_close(quantizers["lsq_plus"].beta.detach(), exp["lsq_plus"][1].reshape(1))
        torch.testing.assert_close(quantizers["pact"].alpha.detach(), exp["pact"].reshape(1))
    finally:
        dist.destroy_process_group()


def test_first_batch_init_is_all_reduced_across_two_gloo_ranks(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous")), nprocs=2, join=True)
