"""An ordinary accelerate training loop of a multi-exit model, with the L2W hook added.

The lines L2W adds or changes are marked ``# L2W``; remove them (and use the commented equal-weight
loss) to get the usual multi-exit baseline. Run::

    python examples/accelerate_loop.py                     # one process
    accelerate launch examples/accelerate_loop.py          # any number of processes / GPUs
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import timm
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

import timm_l2w  # registers the multi-exit models in timm
from timm_l2w.data import create_datasets, create_loaders


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="msdnet_l2w_cifar_tiny")
    p.add_argument("--steps", type=int, default=100, help="loader batches to train on")
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    set_seed(args.seed)
    accelerator = Accelerator()
    splits = create_datasets("digits", input_size=32)  # built-in, offline
    train_loader, _, test_loader = create_loaders(splits, args.batch_size, seed=args.seed)
    model = timm.create_model(args.model, num_classes=splits.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    l2w = timm_l2w.L2W(model, optimizer, total_steps=2 * args.steps, accelerator=accelerator)  # L2W

    model.train()
    step = 0
    while step < args.steps:
        for x, y in train_loader:
            for xt, yt in l2w.split(x, y):  # L2W: two halves, each the meta set of the other's update
                outputs = model(xt)  # train mode: a tuple, one logits tensor per exit
                loss = l2w.loss(outputs, yt)  # L2W: meta step, then the weighted multi-exit loss
                # equal weighting instead: loss = sum(F.cross_entropy(o, yt) for o in outputs)
                optimizer.zero_grad()
                accelerator.backward(loss)
                optimizer.step()
            step += 1
            if accelerator.is_main_process and step % 10 == 0:
                print(f"step {step}: loss {loss.item():.4f} meta loss {l2w.last_meta_loss:.4f}")  # L2W
            if step >= args.steps:
                break

    model.eval()  # eval mode: model(x) gives only the last exit; forward_exits(x) gives every exit
    net = accelerator.unwrap_model(model)
    correct = torch.zeros(net.num_exits)
    seen = 0
    with torch.no_grad():
        for x, y in test_loader:
            x, y = x.to(accelerator.device), y.to(accelerator.device)
            correct += torch.stack([o.argmax(1).eq(y) for o in net.forward_exits(x)], 1).sum(0).cpu()
            seen += len(y)
    if accelerator.is_main_process:
        print("test accuracy per exit: " + " / ".join(f"{100 * c / seen:.1f}%" for c in correct.tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
