"""Any timm backbone with pretrained weights, made multi-exit, fine-tuned with L2W, evaluated under budgets.

1. The backbone's pretrained weights come as a local timm checkpoint file (no hub is reachable here,
   so the example writes one: a timm model's ``state_dict`` saved with safetensors; pass
   ``--timm-checkpoint`` to use a real one, e.g. a ``model.safetensors`` from the hub).
2. ``timm.create_model('multi_exit_l2w', backbone=NAME, pretrained=True,
   pretrained_cfg_overlay=dict(file=...))`` wraps the backbone (exit heads on its ``feature_info``
   points) and loads the file into it through timm's pretrained mechanism (its classifier dropped).
3. A few L2W steps on the digits, then anytime and budgeted evaluation (accuracy at each average FLOPs
   budget) and real early exit under one budget.
4. The fine-tuned wrapper is saved with ``timm_l2w.save_safetensors``: its metadata rebuilds it
   (``timm-l2w eval FILE``, or ``timm.create_model('multi_exit_l2w', pretrained=True,
   pretrained_cfg_overlay=dict(file=FILE))``). Run::

    python examples/finetune_timm_backbone.py --backbone resnet18 --steps 50 --output tuned.safetensors
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

import timm
import torch
from safetensors.torch import load_file, save_file

import timm_l2w
from timm_l2w.data import create_datasets, create_loaders


def write_timm_checkpoint(backbone: str, path: Path) -> Path:
    """Stand-in for downloaded weights: a timm model's state_dict (classifier included) as safetensors."""
    torch.manual_seed(123)
    source = timm.create_model(backbone)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    return path


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backbone", default="resnet18", help="any timm model name")
    p.add_argument("--timm-checkpoint", default=None, help="a timm checkpoint of the backbone (default: write one)")
    p.add_argument("--exit-indices", type=int, nargs="+", default=None, help="feature_info points with exits")
    p.add_argument("--steps", type=int, default=50, help="loader batches of fine-tuning (two L2W updates each)")
    p.add_argument("--batch-size", type=int, default=32, help="loader batch")
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (small: the backbone is pretrained)")
    p.add_argument("--budget", type=float, default=None, help="average FLOPs budget of the early-exit run "
                                                                "(default: halfway between the first and last exit)")
    p.add_argument("--output", default=None, help="write the fine-tuned wrapper here (.safetensors)")
    args = p.parse_args(argv)

    splits = create_datasets("digits", input_size=32)
    train_loader, held_loader, test_loader = create_loaders(splits, args.batch_size, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.timm_checkpoint) if args.timm_checkpoint else \
            write_timm_checkpoint(args.backbone, Path(tmp) / f"{args.backbone}.safetensors")
        torch.manual_seed(0)
        model = timm.create_model("multi_exit_l2w", backbone=args.backbone, exit_indices=args.exit_indices,
                                  num_classes=splits.num_classes, pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(ckpt)))  # the file goes into the backbone
        source = load_file(str(ckpt))
        own = model.backbone.state_dict()
        loaded = [k for k in own if k in source and torch.equal(own[k], source[k])]
    print(f"backbone {args.backbone}: {len(loaded)} of {len(own)} tensors from {ckpt.name} "
          f"({len(source) - len(loaded)} classifier tensors dropped); exits at feature_info points "
          f"{model.exit_indices} ({', '.join(model.exit_layouts)})")

    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    l2w = timm_l2w.L2W(model, optimizer, eps=0.8, total_steps=2 * args.steps)
    model.train()
    step = 0
    while step < args.steps:
        for x, y in train_loader:
            for xt, yt in l2w.split(x, y):  # two halves, each the other's meta set
                loss = l2w.loss(model(xt), yt)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            step += 1
            if step >= args.steps:
                break
    print(f"fine-tuned {args.steps} steps with L2W: last weighted loss {float(loss.detach()):.3f}")

    flops = timm_l2w.exit_flops(model, splits.input_size)  # what each stage really runs, cumulative
    held = timm_l2w.collect_exit_outputs(model, held_loader)
    test = timm_l2w.collect_exit_outputs(model, test_loader)
    for row in timm_l2w.anytime_metrics(test, flops):
        print(f"exit {row['exit']}: top1 {row['top1']:.1f}% at {row['flops'] / 1e6:.2f} MFLOPs")
    budgeted = timm_l2w.budgeted_evaluation(held, test, flops)
    rows = budgeted.rows()
    for row in rows[:: max(1, len(rows) // 4)]:
        print(f"budget: {row['expected_flops'] / 1e6:.2f} MFLOPs on average -> top1 {row['test_top1']:.1f}%")
    budget = args.budget or (flops[0] + flops[-1]) / 2
    predictor = timm_l2w.EarlyExitPredictor.from_flops_budget(model, held, flops, budget)
    x, y = next(iter(test_loader))
    pred = predictor.predict(x)
    spent = float(torch.as_tensor(list(flops))[pred.exit_index].mean())
    print(f"early exit under {budget / 1e6:.2f} MFLOPs: {float((pred.predictions == y).float().mean()) * 100:.1f}% "
          f"of {len(y)} test images, {spent / 1e6:.2f} MFLOPs each on average, exits "
          f"{pred.exit_fractions(model.num_exits).tolist()}")
    if args.output:
        timm_l2w.save_safetensors(model, args.output)
        print(f"wrote {args.output}: timm-l2w eval {args.output} (or timm.create_model('multi_exit_l2w', "
              f"pretrained=True, pretrained_cfg_overlay=dict(file=...))) rebuilds it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
