"""How long the paper-recipe study can train in the time left (benchmarks/gpu_paper_study.sh, issue 24).

The study trains equal weighting and L2W (meta interval 1), three seeds each, all six at once on one GPU.
From the measured throughput (``benchmarks/train_throughput.py``'s JSON: the rows of ``--model`` at
``--batch``) this picks the faster mode (eager, or CUDA graphs where they ran) and the number of whole
epochs whose training fits in ``seconds``: six runs share the GPU, so an epoch of all of them takes
``3 N / r_l2w + 3 N / r_uniform`` (``N`` training images, ``r`` images/s), divided by ``efficiency`` (how much
of one process's rate six processes together reach) and after ``overhead_s`` for start-up and the final
evaluation. Under one epoch it gives a number of loader batches instead. Without usable rows it assumes
``fallback_l2w`` / ``fallback_uniform`` images/s.

    python benchmarks/paper_study_plan.py THROUGHPUT.json SECONDS [--model msdnet_l2w_cifar] [--batch 1024]
    # prints three lines: fidelity.py's length flag (e.g. "--epochs 4"), the runs' "--cuda-graphs" (or an
    # empty line), the plan as JSON
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

TRAIN_IMAGES = 55_000  # Fashion-MNIST's 60,000 training images less the 5,000 held out for calibration


def _rate(rows, weighting: str, mode: str) -> Optional[float]:
    for r in rows:
        if r["weighting"] == weighting and r.get("mode", "eager") == mode \
                and r.get("path", "sync-free") == "sync-free" \
                and (weighting == "uniform" or r["meta_interval"] == 1):
            if mode == "graphs" and not str(r.get("graphs", "")).startswith("on"):
                return None  # graphs fell back: this row is an eager one
            return float(r["images_per_s"])
    return None


def study_plan(throughput: Optional[Dict[str, Any]], seconds: float, model: str = "msdnet_l2w_cifar",
               batch: int = 1024, train_images: int = TRAIN_IMAGES, seeds: int = 3, overhead_s: float = 60.0,
               efficiency: float = 0.7, fallback_l2w: float = 1000.0, fallback_uniform: float = 4000.0
               ) -> Dict[str, Any]:
    """The study's length and mode (see the module docstring)."""
    rows = [r for r in (throughput or {}).get("rows", []) if r["model"] == model and r["batch"] == batch]
    options = {}
    for mode in ("eager", "graphs"):
        l2w, uniform = _rate(rows, "l2w", mode), _rate(rows, "uniform", mode)
        if l2w and uniform:
            options[mode] = (l2w, uniform)
    measured = bool(options)
    if not measured:
        options = {"eager": (fallback_l2w, fallback_uniform)}
    per_image = {mode: seeds / l2w + seeds / uniform for mode, (l2w, uniform) in options.items()}
    mode = min(per_image, key=per_image.get)
    train_s = max(0.0, seconds - overhead_s) * efficiency
    epoch_s = per_image[mode] * train_images
    steps_per_epoch = train_images // batch
    plan: Dict[str, Any] = {"mode": mode, "cuda_graphs": mode == "graphs", "measured": measured,
                            "images_per_s": {"l2w": options[mode][0], "uniform": options[mode][1]},
                            "seconds": seconds, "train_seconds": train_s, "epoch_seconds_all_runs": epoch_s}
    epochs = math.floor(train_s / epoch_s) if epoch_s > 0 else 0
    if epochs >= 1:
        plan["epochs"] = epochs
    else:
        plan["steps"] = max(1, math.floor(train_s / (per_image[mode] * batch)))
        plan["steps"] = min(plan["steps"], steps_per_epoch)
    return plan


def flags(plan: Dict[str, Any]) -> Tuple[str, str]:
    """The plan as flags: (fidelity.py's ``--epochs E`` or ``--steps S``, the runs' ``--cuda-graphs`` or '')."""
    length = f"--epochs {plan['epochs']}" if "epochs" in plan else f"--steps {plan['steps']}"
    return length, "--cuda-graphs" if plan["cuda_graphs"] else ""


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("throughput", help="train_throughput.py's JSON (a missing file: the fallback rates)")
    p.add_argument("seconds", type=float, help="wall time left for the study")
    p.add_argument("--model", default="msdnet_l2w_cifar")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--train-images", type=int, default=TRAIN_IMAGES)
    p.add_argument("--overhead", type=float, default=60.0, help="seconds for start-up and the final evaluation")
    p.add_argument("--efficiency", type=float, default=0.7)
    args = p.parse_args(argv)
    path = Path(args.throughput)
    throughput = json.loads(path.read_text()) if path.is_file() else None
    plan = study_plan(throughput, args.seconds, args.model, args.batch, args.train_images,
                      overhead_s=args.overhead, efficiency=args.efficiency)
    length, graphs = flags(plan)
    print(length)
    print(graphs)
    print(json.dumps(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
