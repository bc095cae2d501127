"""A 2-rank DDP check of ``timm-l2w train``'s loop: a script run under a launcher, never imported by a test.

Run under two real CPU ranks (the README's multi-process CPU command), from the repository root::

    PYTHONPATH=. ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no tests/launch/ddp_check.py OUTPUT_DIR

It trains a few L2W steps with ``timm-l2w train``'s loop and checks that model and weight predictor are
identical on both ranks and that the ranks received different data. Prints ``DDP_OK`` on rank 0.
``tests/launch/ddp_check.py --train ARGS...`` instead runs ``timm-l2w train ARGS...`` with the tiny model
registered (the command line exactly as a user runs it, under the same launcher). The tests start it with
:func:`tests.helpers.accelerate_launch` (which puts the repository on PYTHONPATH).
"""
from __future__ import annotations

import sys

import torch

from tests.helpers import TINY_MODEL, register_tiny


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for p in params])


def main(out_dir: str) -> int:
    import torch.distributed as dist
    from accelerate import Accelerator

    from timm_l2w.cli.train import parse_args
    from timm_l2w.data import create_datasets, create_loaders
    from timm_l2w.training.loop import train

    torch.set_num_threads(1)
    register_tiny()
    args = parse_args(["--model", TINY_MODEL, "--max-steps", "3", "--batch-size", "16", "--output", out_dir,
                       "--no-progress", "--no-eval", "--held-out", "100", "--lr", "0.05"])
    result = train(args)
    assert dist.is_initialized() and dist.get_world_size() == 2, "not running with two ranks"
    rank = dist.get_rank()
    for name, module in (("model", result["model"]), ("weight predictor", result["weight_net"])):
        mine = _flat(module.parameters())
        both = [torch.empty_like(mine) for _ in range(2)]
        dist.all_gather(both, mine)
        assert torch.equal(both[0], both[1]), (
            f"{name} parameters differ across ranks (max {float((both[0] - both[1]).abs().max()):.3g})")
    # the loader the training loop uses gives each rank its own samples
    acc = Accelerator()
    splits = create_datasets("digits", held_out=100)
    loader = acc.prepare(create_loaders(splits, 8, seed=0)[0])
    loader.sampler.set_epoch(0) if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch") else None
    x, _ = next(iter(loader))
    xs = [torch.empty_like(x) for _ in range(2)]
    dist.all_gather(xs, x.contiguous())
    assert not torch.equal(xs[0], xs[1]), "both ranks received the same batch"
    assert result["history"][-1]["step"] == 3
    if rank == 0:
        print("DDP_OK", flush=True)
    dist.destroy_process_group()  # a clean exit: a gloo group still alive at interpreter exit can abort the rank
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "--train":
        from timm_l2w.cli.train import main as train_main

        torch.set_num_threads(1)
        register_tiny()
        sys.exit(train_main(sys.argv[2:]))
    sys.exit(main(sys.argv[1]))
