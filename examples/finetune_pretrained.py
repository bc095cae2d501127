"""Fine-tune a pretrained multi-exit model on new classes with L2W.

Loads a checkpoint in the paper's release layout (``.pth.tar``, read with ``weights_only=True``) or
any ``.safetensors`` file written by timm_l2w, gives the model the data set's number of classes
(the exit classifiers start fresh, everything else is loaded), and fine-tunes with the L2W hook.
Run::

    python examples/finetune_pretrained.py --checkpoint msdnet_cifar100.safetensors --model msdnet_l2w_cifar
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import timm
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

import timm_l2w
from timm_l2w.data import create_datasets, create_loaders
from timm_l2w.train import load_pretrained


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help=".safetensors or release .pth.tar")
    p.add_argument("--model", default="msdnet_l2w_cifar", help="the architecture the checkpoint belongs to")
    p.add_argument("--dataset", default="digits", help="built-in data set with the new classes")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.01, help="small: the backbone is pretrained")
    p.add_argument("--eps", type=float, default=0.8, help="L2W weight range (paper: 0.8 CIFAR, 0.3 ImageNet)")
    p.add_argument("--output", default=None, help="write the fine-tuned weights here (.safetensors)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    set_seed(args.seed)
    accelerator = Accelerator()
    splits = create_datasets(args.dataset, data_dir=args.data_dir, input_size=32)
    train_loader, _, test_loader = create_loaders(splits, args.batch_size, seed=args.seed)
    model = timm.create_model(args.model, num_classes=splits.num_classes)
    fresh = load_pretrained(model, args.checkpoint)  # heads of another num_classes keep their new init
    if accelerator.is_main_process:
        print(f"loaded {args.checkpoint}; new classifier tensors: {len(fresh)}")
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    l2w = timm_l2w.L2W(model, optimizer, eps=args.eps, total_steps=2 * args.steps, accelerator=accelerator)

    model.train()
    step = 0
    while step < args.steps:
        for x, y in train_loader:
            for xt, yt in l2w.split(x, y):
                loss = l2w.loss(model(xt), yt)  # train mode: model(xt) is the tuple of every exit
                optimizer.zero_grad()
                accelerator.backward(loss)
                optimizer.step()
            step += 1
            if step >= args.steps:
                break

    model.eval()  # eval mode: model(x) gives only the last exit; forward_exits(x) gives every exit
    net = accelerator.unwrap_model(model)
    correct = torch.zeros(net.num_exits)
    with torch.no_grad():
        for x, y in test_loader:
            x, y = x.to(accelerator.device), y.to(accelerator.device)
            correct += torch.stack([o.argmax(1).eq(y) for o in net.forward_exits(x)], 1).sum(0).cpu()
    if accelerator.is_main_process:
        print("test accuracy per exit after fine-tuning: "
              + " / ".join(f"{100 * c / len(splits.test):.1f}%" for c in correct.tolist()))
        if args.output:
            timm_l2w.save_safetensors(net, args.output, metadata={"model": args.model,
                                                                  "num_classes": splits.num_classes})
            print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
