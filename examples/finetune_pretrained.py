"""Fine-tune a saved multi-exit model on new classes with L2W: the README's save -> load -> fine-tune flow.

The checkpoint is a ``.safetensors`` file written by ``timm_l2w.save_safetensors``, ``timm-l2w train``
(``model.safetensors``) or ``timm-l2w convert`` (a released ``.pth.tar``); the model name and its number
of classes are read from the file's metadata unless given. The model is built by timm's own pretrained
route, ``timm.create_model(name, pretrained=True, num_classes=N_new,
pretrained_cfg_overlay=dict(file=..., num_classes=N_file))``: every tensor is loaded except the exit
classifiers when ``N_new`` differs from ``N_file`` (they start fresh). The fine-tuned model is saved the
same way, so it loads back with the same call. Run::

    python examples/finetune_pretrained.py --checkpoint my_model.safetensors --output tuned.safetensors
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
from timm_l2w.files import read_metadata


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help=".safetensors written by timm_l2w")
    p.add_argument("--model", default=None, help="the checkpoint's architecture (default: from its metadata)")
    p.add_argument("--checkpoint-classes", type=int, default=None,
                   help="classes of the checkpoint's exit classifiers (default: from its metadata)")
    p.add_argument("--dataset", default="digits", help="built-in data set with the new classes")
    p.add_argument("--data-dir", default=None, help="folder with the data set files")
    p.add_argument("--steps", type=int, default=100, help="loader batches of fine-tuning")
    p.add_argument("--batch-size", type=int, default=32, help="loader batch (two L2W updates on its halves)")
    p.add_argument("--lr", type=float, default=0.01, help="small: the backbone is pretrained")
    p.add_argument("--eps", type=float, default=0.8, help="L2W weight range (paper: 0.8 CIFAR, 0.3 ImageNet)")
    p.add_argument("--output", default=None, help="write the fine-tuned weights here (.safetensors)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh classifiers and the data order")
    args = p.parse_args(argv)

    meta = read_metadata(args.checkpoint)
    name = args.model or meta.get("model")
    file_classes = args.checkpoint_classes or (int(meta["num_classes"]) if "num_classes" in meta else None)
    if not name or not file_classes:
        print(f"error: {args.checkpoint} records no model name / number of classes: pass --model and "
              f"--checkpoint-classes", file=sys.stderr)
        return 2
    set_seed(args.seed)
    accelerator = Accelerator()
    splits = create_datasets(args.dataset, data_dir=args.data_dir, input_size=32)
    train_loader, _, test_loader = create_loaders(splits, args.batch_size, seed=args.seed)
    try:  # the README's route: timm loads the file, dropping the exit classifiers if the classes differ
        model = timm.create_model(name, pretrained=True, num_classes=splits.num_classes,
                                  pretrained_cfg_overlay=dict(file=args.checkpoint, num_classes=file_classes))
    except (RuntimeError, ValueError) as err:
        print(f"error: {args.checkpoint} does not fit {name}: it is a checkpoint of another architecture or "
              f"configuration ({str(err).strip().splitlines()[0][:300]}); pass the --model it was saved from",
              file=sys.stderr)
        return 2
    fresh = "exit classifiers start fresh" if file_classes != splits.num_classes else "every tensor loaded"
    if accelerator.is_main_process:
        print(f"loaded {args.checkpoint} into {name}: {file_classes} -> {splits.num_classes} classes, {fresh}")
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    l2w = timm_l2w.L2W(model, optimizer, eps=args.eps, total_steps=2 * args.steps, accelerator=accelerator)

    model.train()  # train mode: model(x) returns every exit's logits (the L2W loss needs them all)
    step = 0
    while step < args.steps:
        for x, y in train_loader:
            for xt, yt in l2w.split(x, y):
                loss = l2w.loss(model(xt), yt)
                optimizer.zero_grad()
                accelerator.backward(loss)
                optimizer.step()
            step += 1
            if step >= args.steps:
                break

    net = accelerator.unwrap_model(model)
    net.eval()  # eval mode: forward_exits gives every exit (model(x) would give only the last)
    correct = torch.zeros(net.num_exits)
    with torch.no_grad():
        for x, y in test_loader:
            x, y = x.to(accelerator.device), y.to(accelerator.device)
            correct += torch.stack([o.argmax(1).eq(y) for o in net.forward_exits(x)], 1).sum(0).cpu()
    if accelerator.is_main_process:
        print("test accuracy per exit after fine-tuning: "
              + " / ".join(f"{100 * c / len(splits.test):.1f}%" for c in correct.tolist()))
        if args.output:
            timm_l2w.save_safetensors(net, args.output)  # records the model name and the new num_classes
            print(f"wrote {args.output} (load it back with pretrained_cfg_overlay=dict(file=..., "
                  f"num_classes={splits.num_classes}))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
