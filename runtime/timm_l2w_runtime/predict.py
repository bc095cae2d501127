"""``timm-l2w predict DIR IMAGES... --output predictions.csv``: early-exit predictions for image files.

Runs the exported package in ``DIR`` with onnxruntime (no PyTorch; also ``timm-l2w-predict`` and
``python -m timm_l2w_runtime`` from the torch-free install, ``pip install ./runtime``) and writes one CSV
row per image: ``file``, ``prediction`` (class index), ``label`` (class name, or the index when the policy
has none), ``confidence`` (max softmax at the exit taken), ``exit`` (1-based, cheapest first, as in the
``timm-l2w eval`` tables) and ``error``: empty, or why the file could not be read (the other fields are
then empty). Every readable file is predicted; the exit status is 1 when any file could not be read, 2 on
a usage or package error. ``--measure-latency`` times every stage of the package on this machine instead
(the latency table of :mod:`timm_l2w_runtime.latency`, for ``timm-l2w eval --latency-table``).
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

__all__ = ["main", "console"]


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Early-exit predictions for image files with an exported package (numpy + onnxruntime).")
    p.add_argument("package", help="folder written by timm-l2w export")
    p.add_argument("images", nargs="*", help="image files, or folders searched for them")
    p.add_argument("--output", default="predictions.csv",
                   help="CSV file to write, one row per image; its 'error' column names the files that could not "
                        "be read (default: predictions.csv)")
    p.add_argument("--policy", default=None, help="another policy file for the same model (default: DIR/policy.json)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: its choice)")
    p.add_argument("--measure-latency", action="store_true",
                   help="instead of predicting: time every stage of the package on this machine at "
                        "--latency-batch-sizes and print the latency table and the policy's expected ms per image "
                        "(timm-l2w eval --latency-table FILE --latency-budget MS chooses a policy with it)")
    p.add_argument("--latency-batch-sizes", type=int, nargs="+", default=[1, 8, 64], metavar="B",
                   help="batch sizes to time (default: 1 8 64)")
    p.add_argument("--latency-repeats", type=int, default=10,
                   help="timed runs per batch size and round (default: 10)")
    p.add_argument("--latency-rounds", type=int, default=3,
                   help="rounds over every batch size, one after another; the table holds the slowest round's "
                        "medians, so it covers the machine's drift while measuring (default: 3)")
    p.add_argument("--latency-output", default=None, metavar="FILE", help="also write the latency table as JSON")
    return p


def _with_runtime(args: argparse.Namespace, prog: str, count: Tuple[str, int],
                  job: Callable[[Any], Any]) -> Optional[Tuple[Any, Any]]:
    """``(runtime, job(runtime))`` for the package of ``args``; ``None`` after printing the error (a count or
    ``--threads`` below 1, a package or policy that cannot be used, a file that cannot be read)."""
    from .policy import print_policy_warnings
    from .runtime import EarlyExitRuntime

    try:
        if count[1] < 1 or (args.threads is not None and args.threads < 1):
            raise ValueError(f"{count[0]} and --threads must be integers >= 1")
        with print_policy_warnings(prog):  # a policy that cannot be checked against the package's weights
            runtime = EarlyExitRuntime(args.package, policy=args.policy, threads=args.threads)
        return runtime, job(runtime)
    except (ValueError, OSError, ImportError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return None


def _measure_latency(args: argparse.Namespace, prog: str) -> int:
    """``--measure-latency``: the package's latency table, printed (and written to ``--latency-output``)."""
    import json

    from .latency import expected_latency_ms, latency_table_text
    from .policy import write_text_atomic

    done = _with_runtime(args, prog, ("--latency-repeats, --latency-rounds",
                                      min(args.latency_repeats, args.latency_rounds)),
                         lambda runtime: runtime.stage_latency(args.latency_batch_sizes, repeats=args.latency_repeats,
                                                               rounds=args.latency_rounds))
    if done is None:
        return 2
    runtime, table = done
    print(latency_table_text(table))
    fractions = runtime.policy.get("calibration_exit_fractions")
    if fractions:
        expected = ", ".join(f"{expected_latency_ms(table, fractions, b):.4g} ms at batch {b}"
                             for b in table["batch_sizes"])
        print(f"the policy ({runtime.policy['rule']}, held-out exits "
              f"{', '.join(f'{100 * f:.0f}%' for f in fractions)}): expected {expected} per image")
    if args.latency_output:
        write_text_atomic(Path(args.latency_output), json.dumps(table, indent=2) + "\n")
        print(f"wrote {args.latency_output}")
    return 0


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
    parser = _parser(prog)
    args = parser.parse_args(argv)
    if args.measure_latency:
        return _measure_latency(args, prog)
    if not args.images:
        parser.error("the following arguments are required: images (or --measure-latency)")
    done = _with_runtime(args, prog, ("--batch-size", args.batch_size),
                         lambda runtime: runtime.predict_each_file(args.images, batch_size=args.batch_size))
    if done is None:
        return 2
    runtime, out = done
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
