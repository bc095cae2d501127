"""``timm-l2w predict DIR IMAGES... --output predictions.csv``: early-exit predictions for image files.

Runs the exported package in ``DIR`` with onnxruntime (no PyTorch; also ``timm-l2w-predict`` and
``python -m timm_l2w_runtime`` from the torch-free install, ``pip install ./runtime``) and writes one CSV
row per image: ``file``, ``prediction`` (class index), ``label`` (class name, or the index when the policy
has none), ``confidence`` (max softmax at the exit taken), ``exit`` (1-based, cheapest first, as in the
``timm-l2w eval`` tables) and ``error``: empty, or why the file could not be read (the other fields are
then empty). Every readable file is predicted; the exit status is 1 when any file could not be read, 2 on
a usage or package error.
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path
from typing import List, Optional

__all__ = ["main", "console"]


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Early-exit predictions for image files with an exported package (numpy + onnxruntime).")
    p.add_argument("package", help="folder written by timm-l2w export")
    p.add_argument("images", nargs="+", help="image files, or folders searched for them")
    p.add_argument("--output", default="predictions.csv",
                   help="CSV file to write, one row per image; its 'error' column names the files that could not "
                        "be read (default: predictions.csv)")
    p.add_argument("--policy", default=None, help="another policy file for the same model (default: DIR/policy.json)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: its choice)")
    return p


def _write_csv(path: Path, rows: List[dict]) -> None:
    from .policy import write_text_atomic

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def _rows(runtime, out) -> List[dict]:
    """One CSV row per file, in order: the prediction, or the error that kept the file from being predicted."""
    rows = [dict(file=str(f), prediction="", label="", confidence="", exit="", error=out.errors.get(i, ""))
            for i, f in enumerate(out.files)]
    r = out.result
    for j, i in enumerate(out.read):
        p = int(r.predictions[j])
        rows[i].update(prediction=p, label=runtime.label(p), confidence=f"{float(r.confidences[j]):.6g}",
                       exit=int(r.exit_index[j]) + 1)
    return rows


def main(argv: Optional[List[str]] = None, prog: str = "timm-l2w predict") -> int:
    args = _parser(prog).parse_args(argv)
    from .policy import print_policy_warnings
    from .runtime import EarlyExitRuntime

    try:
        if args.batch_size < 1 or (args.threads is not None and args.threads < 1):
            raise ValueError("--batch-size and --threads must be integers >= 1")
        with print_policy_warnings(prog):  # a policy that cannot be checked against the package's weights
            runtime = EarlyExitRuntime(args.package, policy=args.policy, threads=args.threads)
        out = runtime.predict_each_file(args.images, batch_size=args.batch_size)
    except (ValueError, OSError, ImportError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    _write_csv(Path(args.output), _rows(runtime, out))
    result = out.result
    if len(out.read):
        shares = ", ".join(f"{100 * s:.0f}%" for s in result.exit_fractions(runtime.num_exits))
        flops = runtime.expected_flops(result)
        full = (runtime.policy.get("flops") or [None])[-1]
        cost = f"; {flops / 1e6:.3g} MFLOPs per image ({flops / full:.2f}x the last exit)" if flops and full else ""
        print(f"{len(out.read)} images, rule {runtime.policy['rule']}: exits {shares}{cost}")
    print(f"wrote {args.output}")
    if out.errors:
        for message in out.errors.values():
            print(f"{prog}: not predicted: {message}", file=sys.stderr)
        print(f"{prog}: {len(out.errors)} of {len(out.files)} files could not be read (the 'error' column of "
              f"{args.output}); the other {len(out.read)} were predicted", file=sys.stderr)
        return 1
    return 0


def console() -> int:
    """The ``timm-l2w-predict`` command of the torch-free install (``pip install ./runtime``)."""
    return main(prog="timm-l2w-predict")


if __name__ == "__main__":
    sys.exit(main())
