"""Does L2W beat equal weighting? Seeded study on Fashion-MNIST at 32x32 (issue 8).

For every seed, the same multi-exit network (default ``msdnet_l2w_cifar_tiny``, 5 exits) is trained
twice as a ``timm-l2w train`` run with the same data order, schedule and initialisation: once with
L2W (the paper's CIFAR settings: eps 0.8, col constraint, loss input, target_p_index 15,
meta_interval 1, Adam 1e-4 / wd 1e-4 meta optimizer with cosine annealing) and once with equal
weighting. Each run is evaluated by the package (anytime accuracy of every exit; budgeted accuracy
for the paper's 39 exit distributions, thresholds calibrated on the held-out split of 5,000
training images, accuracy and expected FLOPs on the 10,000 test images).

Runs execute as separate one-thread processes, ``--jobs`` at a time; each writes
``RESULTS/<weighting>_seed<s>.json`` as soon as it finishes and a run whose file exists is skipped,
so the script can be stopped and restarted. Training folders (checkpoints) go to ``RESULTS/runs/``.
L2W runs also checkpoint every ``--checkpoint-every`` steps; after the run the predictor of every
checkpoint is applied to that checkpoint's exit losses on 1,000 held-out images to show how the
predicted weights evolve during training.

Variants besides L2W and equal weighting: L2W at meta interval 10 and 100 (issue 14), and IMTA's
methods (issue 15): equal weighting with gradient equilibrium and one-for-all distillation
(``uniform_ge_kd``) and L2W with distillation (``l2w_kd``). Every run's result file also holds its
budgeted curves under the entropy and patience exit rules (``budgeted_rules``), computed from the same
exit outputs. ``--device cuda`` trains and evaluates every run on the visible GPU
(``benchmarks/gpu_paper_study.sh`` runs the paper-recipe study that way in one prepared script).

The summary (``summary.json``, ``summary.md``, ``l2w_vs_uniform.png``, ``gain_vs_cost.png``) works on
whatever result files exist (it says which are missing) and compares every variant present with
equal weighting of the same seeds. Every budgeted curve goes on one common grid of 39 FLOPs
values (linear interpolation over the range all curves cover). Per L2W variant: the gain of the
seed-mean curves on the grid (mean, share of grid points ahead); the paired gain per seed with a 95%
Student t interval and a percentile bootstrap interval over seeds (the result files hold no per-sample
outputs); the same budget by budget (same q); the gain at the training q; the peak; the anytime gain
per exit; the cost ratio per seed pair (CPU and wall seconds; resumed runs, whose times cover only the
last segment, are left out); and the predictor analysis (weight vs loss correlation per exit at the
end of training and over the checkpoints).

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package (``apt-get install
dataset-fashion-mnist``) or the four IDX files in ``--data-dir``.

    python benchmarks/fidelity.py [--seeds 0 1 2] [--steps 300] [--jobs 2] [--out benchmarks/results/fidelity]
    python benchmarks/fidelity.py --summarize-only      # aggregate the result files present
    python benchmarks/fidelity.py --summarize-only --out DIR --seeds 0 1 2 --variants l2w uniform l2w_int10 l2w_int100

This file is the command line; the study lives in :mod:`timm_l2w.study` (``runner``: the runs;
``stats``: the intervals; ``weights``: the predictor analysis; ``summary``: the comparison;
``report`` and ``plots``: the report files).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from timm_l2w.study.report import markdown as _markdown  # noqa: F401  (tests render the report through it)
from timm_l2w.study.report import summarize
from timm_l2w.study.runner import ROOT, VARIANTS, WEIGHTINGS, launch_all, run_one
from timm_l2w.study.stats import mean_with_intervals  # noqa: F401  (the study's names, as before the split)
from timm_l2w.study.summary import cost_ratio, load_records, run_costs, summarize_records  # noqa: F401
from timm_l2w.study.weights import predictor_summary  # noqa: F401

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "fidelity"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder for result files, logs and plots")
    p.add_argument("--model", default="msdnet_l2w_cifar_tiny")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX files (default: Debian's location)")
    p.add_argument("--steps", type=int, default=300, help="loader batches per run (two updates each)")
    p.add_argument("--epochs", type=int, default=None, help="train this many epochs instead of --steps")
    p.add_argument("--variants", nargs="+", default=list(WEIGHTINGS), choices=sorted(VARIANTS),
                   help="runs per seed: l2w (preset meta interval), uniform, l2w_int10, l2w_int100 (the "
                   "summary covers every variant present and reports these when missing)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=20, help="linear warmup, in updates")
    p.add_argument("--checkpoint-every", type=int, default=50, help="L2W runs: checkpoint every N steps for "
                   "the weights-over-training analysis (0: off)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the runs train and evaluate (cuda: every run on the one visible GPU)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="further `timm-l2w train` flags for both weightings (e.g. --eps 0.4); put it last")
    p.add_argument("--summarize-only", action="store_true", help="only aggregate the result files present")
    p.add_argument("--run-one", nargs=2, metavar=("WEIGHTING", "SEED"), help=argparse.SUPPRESS)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.run_one:
        from timm_l2w.cli.train import parse_args

        run_one(args, args.run_one[0], int(args.run_one[1]), parse_args)
        return 0
    import timm_l2w  # noqa: F401  (fail early if the package is not installed)

    out = Path(args.out)
    if not args.summarize_only:
        launch_all(args, [sys.executable, str(Path(__file__).resolve())])
    summary = summarize(out, args.seeds, args.variants)
    if summary is not None:
        print((out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
