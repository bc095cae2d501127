"""Helper for tests/test_train.py: a tiny registered multi-exit model, and a 2-rank DDP check.

Run under two real CPU ranks (the README's multi-process CPU command)::

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no tests/ddp_check.py OUTPUT_DIR

It trains a few L2W steps with ``timm-l2w train``'s loop and checks that model and weight predictor are
identical on both ranks and that the ranks received different data. Prints ``DDP_OK`` on rank 0.
``tests/ddp_check.py --train ARGS...`` instead runs ``timm-l2w train ARGS...`` with the tiny model
registered (the command line exactly as a user runs it, under the same launcher).
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Sequence

import torch
from torch import nn

import timm
from timm.models import register_model

from timm_l2w.models.base import MultiExitModel

TINY_MODEL = "l2w_test_tiny"


class TinyNet(MultiExitModel):
    """Three conv-BN-ReLU stages (stride 2) with pooled linear exits: fast enough for CPU tests."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: int = 8):
        super().__init__()
        self.num_exits, self.num_classes, self.in_chans = 3, num_classes, in_chans
        chans = [in_chans, width, 2 * width, 4 * width]
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(chans[k], chans[k + 1], 3, stride=2, padding=1, bias=False),
                          nn.BatchNorm2d(chans[k + 1]), nn.ReLU())
            for k in range(3))
        self.heads = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(chans[k + 1], num_classes))
            for k in range(3))

    def forward_stage(self, index, state):
        state = self.blocks[index](state)
        return state, self.heads[index](state)


def register_tiny() -> str:
    """Register :class:`TinyNet` in timm as ``l2w_test_tiny`` (once); return the name."""
    if not timm.is_model(TINY_MODEL):
        def l2w_test_tiny(pretrained: bool = False, **kwargs):
            return TinyNet(num_classes=kwargs.get("num_classes", 10), in_chans=kwargs.get("in_chans", 3))

        l2w_test_tiny.__module__ = __name__
        register_model(l2w_test_tiny)
    return TINY_MODEL


def accelerate_launch(args: Sequence[str], processes: int = 2, timeout: int = 900,
                      attempts: int = 3) -> subprocess.CompletedProcess:
    """``accelerate launch`` of ``args`` on ``processes`` CPU ranks (the README's multi-process CPU command).

    Every attempt takes a free port of its own (``--main_process_port 0``), not the shared default 29500
    that another test run on the same machine may hold; a port taken between choosing and binding it is
    retried (up to ``attempts`` launches). ``timeout`` is generous: a loaded machine slows the ranks down.
    """
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
           *args]
    for _ in range(attempts):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        clash = any(words in proc.stderr.lower() for words in ("address already in use", "eaddrinuse"))
        if proc.returncode == 0 or not clash:
            return proc
    return proc


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
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "--train":
        from timm_l2w.cli.train import main as train_main

        torch.set_num_threads(1)
        register_tiny()
        sys.exit(train_main(sys.argv[2:]))
    sys.exit(main(sys.argv[1]))
