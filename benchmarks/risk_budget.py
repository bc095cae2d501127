"""Risk-controlled exit policies on a trained model: what each risk budget costs and what it keeps on unseen images.

The model (MSDNet-CIFAR by default, weights from ``--checkpoint`` or a short equal-weight training on the built-in
digits-affine, 32x32) is evaluated once on the held-out split (``--held-out`` images) and the test split. For each
risk, ``--max-risk`` EPS and ``--confidence`` 1-DELTA, :meth:`timm_l2w.EarlyExitPredictor.from_risk` picks the
policy (docs/risk.md); the table gives its expected FLOPs, its upper bound and held-out risk, and its risk on the
test split, which the choice never saw (a check of the guarantee on one draw, with the test split's own sampling
noise). Writes ``results/risk_budget.json``; last line: ``test_risk_within_eps=<how many of the rows>/<rows>``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).parent))
from early_exit_latency import load_or_train  # noqa: E402

import timm_l2w  # noqa: E402
from timm_l2w.data import create_datasets, create_loaders  # noqa: E402
from timm_l2w.evaluation import collect_exit_outputs  # noqa: E402
from timm_l2w.evaluation.risk import RISKS, risk_losses  # noqa: E402
from timm_l2w.exits import exit_rule  # noqa: E402
from timm_l2w.files import write_text_atomic  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help=".safetensors weights of --model for 10 digit classes")
    parser.add_argument("--model", default="msdnet_l2w_cifar")
    parser.add_argument("--train-seconds", type=float, default=60.0)
    parser.add_argument("--held-out", type=int, default=600)
    parser.add_argument("--max-risks", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2])
    parser.add_argument("--confidence", type=float, default=0.9)
    parser.add_argument("--exit-rule", default="confidence")
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)

    splits = create_datasets("digits-affine", input_size=32, in_chans=3, held_out=args.held_out)
    train_loader, held_loader, test_loader = create_loaders(splits, batch_size=64, eval_batch_size=256)
    model = timm.create_model(args.model, num_classes=splits.num_classes)
    steps = load_or_train(model, args.checkpoint, train_loader, args.train_seconds)
    flops = timm_l2w.exit_flops(model, (3, 32, 32))
    heldout, test = collect_exit_outputs(model, held_loader), collect_exit_outputs(model, test_loader)
    rule = exit_rule(args.exit_rule)
    rows = []
    for risk in RISKS:
        for eps in args.max_risks:
            row = {"risk": risk, "max_risk": eps, "confidence": args.confidence}
            try:
                predictor = timm_l2w.EarlyExitPredictor.from_risk(model, heldout, flops, eps, args.confidence, risk,
                                                                  rule=rule)
            except ValueError as err:
                rows.append({**row, "error": str(err)})
                continue
            params = predictor.thresholds if rule.calibrated else predictor.patience
            test_exits = rule.exits(test.signal(rule), params)
            shares = torch.bincount(test_exits, minlength=model.num_exits).double() / len(test_exits)
            rows.append({**row, **predictor.budget,
                         "heldout_mflops": sum(p * f for p, f in zip(predictor.calibration_fractions, flops)) / 1e6,
                         "test_mflops": float(shares @ torch.as_tensor(flops, dtype=torch.float64)) / 1e6,
                         "full_mflops": flops[-1] / 1e6,
                         "test_risk": float(risk_losses(test, test_exits, risk).mean()),
                         "test_top1": float(test.correct[torch.arange(len(test_exits)), test_exits].double().mean()),
                         "last_exit_test_top1": float(test.correct[:, -1].double().mean())})
    result = {"model": args.model, "dataset": "digits-affine", "train_steps": steps, "rule": rule.name,
              "num_heldout": heldout.num_samples, "num_test": test.num_samples, "rows": rows}
    out = Path(args.out_dir) / "risk_budget.json"
    write_text_atomic(out, json.dumps(result, indent=2) + "\n")
    print(f"{args.model}, {steps} training steps, {heldout.num_samples} held-out / {test.num_samples} test images")
    print("| risk | EPS | upper bound | held-out risk (n) | test risk | MFLOPs (test) of full | test top-1 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['risk']} | {r['max_risk']:g} | no policy: {r['error'].split(':')[1].strip()} | | | | |")
            continue
        print(f"| {r['risk']} | {r['max_risk']:g} | {r['risk_upper_bound']:.3f} | {r['heldout_risk']:.3f} ({r['n']}) "
              f"| {r['test_risk']:.3f} | {r['test_mflops']:.1f} of {r['full_mflops']:.1f} | "
              f"{100 * r['test_top1']:.1f}% (last exit {100 * r['last_exit_test_top1']:.1f}%) |")
    ok = [r for r in rows if "error" not in r]
    print(f"wrote {out}")
    print(f"test_risk_within_eps={sum(r['test_risk'] <= r['max_risk'] for r in ok)}/{len(ok)}")


if __name__ == "__main__":
    main()
