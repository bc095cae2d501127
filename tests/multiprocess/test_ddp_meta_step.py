"""The L2W meta step on two DDP ranks (torch.multiprocessing.spawn, gloo): the weight predictor and its
meta gradients stay identical on both ranks."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.helpers import TinyMultiExit
from timm_l2w import L2W

pytestmark = pytest.mark.multiprocess


def _ddp_worker(rank: int, world: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    # a file rendezvous: no TCP port to race other test runs on this machine for
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # different model/predictor init and data on every rank
        ddp = nn.parallel.DistributedDataParallel(TinyMultiExit())  # DDP copies rank 0's model
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        l2w = L2W(ddp, opt, hidden_sizes=(6,), backend="func", meta_lr=1e-2)
        x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 4, (8,))
        for xt, yt in l2w.split(x, y):
            loss = l2w.loss(ddp(xt), yt)
            opt.zero_grad()
            loss.backward()
            opt.step()
        flat = torch.cat([t.detach().reshape(-1) for t in l2w.weight_net.parameters()])
        torch.save({"phi": flat, "grads": torch.cat([g.reshape(-1) for g in l2w.last_meta_grads])},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_predictor_stays_identical_across_ddp_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["grads"].abs().max() > 0
    torch.testing.assert_close(r0["grads"], r1["grads"], rtol=0, atol=0)
    torch.testing.assert_close(r0["phi"], r1["phi"], rtol=0, atol=0)
