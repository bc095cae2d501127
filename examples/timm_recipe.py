"""timm's training recipe around a multi-exit ViT, with L2W added in four marked lines.

The recipe pieces are timm's own: ``create_optimizer_v2('adamw', layer_decay=...)`` (no weight decay on
biases and norms, layer-wise lr decay), ``create_scheduler_v2`` (cosine with warmup, stepped per update),
``Mixup`` / CutMix with ``SoftTargetCrossEntropy``, ``ModelEmaV3``, gradient accumulation
(``accelerator.accumulate``) and clipping (``accelerator.clip_grad_norm_``). The lines marked ``# L2W``
are all L2W adds: the hook (told about the loss and the clipping, so its virtual step is the update that
really happens; it reads the accumulation from the accelerator), the split of every loader batch into a
training half and a meta half, and the weighted loss. Without them (and with
``loss = sum(train_loss_fn(o, yt) for o in outputs)``) this is the equal-weight multi-exit baseline.
Run::

    python examples/timm_recipe.py                          # one process, built-in digits
    accelerate launch examples/timm_recipe.py               # any number of processes / GPUs
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import timm
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

import timm_l2w  # registers the multi-exit models in timm
from timm_l2w.data import create_datasets, create_loaders


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_tiny_l2w")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many loader batches")
    p.add_argument("--batch-size", type=int, default=32, help="loader batch per process (two halves)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--layer-decay", type=float, default=0.75)
    p.add_argument("--grad-accum-steps", type=int, default=2, help="halves accumulated into one update")
    p.add_argument("--clip-grad", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    set_seed(args.seed)
    accelerator = Accelerator(gradient_accumulation_steps=args.grad_accum_steps)
    splits = create_datasets("digits", input_size=32)  # built-in, offline
    train_loader, _, test_loader = create_loaders(splits, args.batch_size, seed=args.seed)
    model = timm.create_model(args.model, num_classes=splits.num_classes, img_size=32, drop_path_rate=0.05)
    optimizer = create_optimizer_v2(model, "adamw", lr=args.lr, weight_decay=0.05, layer_decay=args.layer_decay)
    updates_per_epoch = 2 * len(train_loader) // args.grad_accum_steps  # two halves per loader batch
    scheduler, _ = create_scheduler_v2(optimizer, "cosine", num_epochs=args.epochs, warmup_epochs=0,
                                       updates_per_epoch=updates_per_epoch, step_on_epochs=False)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=splits.num_classes)
    train_loss_fn = SoftTargetCrossEntropy()
    model_ema = ModelEmaV3(model, decay=0.998)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    l2w = timm_l2w.L2W(model, optimizer, criterion=train_loss_fn, clip_grad=args.clip_grad,  # L2W
                       total_steps=updates_per_epoch * args.epochs, accelerator=accelerator)  # L2W

    model.train()
    updates, step = 0, 0
    for epoch in range(args.epochs):
        for x, y in train_loader:
            x, y = mixup(x, y)
            for xt, yt in l2w.split(x, y):  # L2W: two halves, each the meta set of the other's update
                with accelerator.accumulate(model):
                    outputs = model(xt)  # train mode: a tuple, one logits tensor per exit
                    loss = l2w.loss(outputs, yt)  # L2W: meta step when due, then the weighted multi-exit loss
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(model.parameters(), args.clip_grad)
                    optimizer.step()
                    optimizer.zero_grad()
                if accelerator.sync_gradients:  # an update happened
                    updates += 1
                    scheduler.step_update(num_updates=updates)
                    model_ema.update(accelerator.unwrap_model(model), step=updates)
            step += 1
            if args.max_steps is not None and step >= args.max_steps:
                break
        if accelerator.is_main_process:
            print(f"epoch {epoch + 1}: loss {loss.item():.4f}, {updates} updates, lr "
                  f"{optimizer.param_groups[-1]['lr']:.3g}")

    ema = model_ema.module  # eval mode: model(x) gives only the last exit; forward_exits(x) gives every exit
    correct = torch.zeros(ema.num_exits)
    seen = 0
    with torch.no_grad():
        for x, y in test_loader:
            x, y = x.to(accelerator.device), y.to(accelerator.device)
            correct += torch.stack([o.argmax(1).eq(y) for o in ema.forward_exits(x)], 1).sum(0).cpu()
            seen += len(y)
    if accelerator.is_main_process:
        print("EMA test accuracy per exit: " + " / ".join(f"{100 * c / seen:.1f}%" for c in correct.tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
