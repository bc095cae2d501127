"""Every timm family as a multi-exit model: run the slow sweep of tests/models/test_family_sweep.py, make its table.

``run`` starts the sweep (one small model per timm family: wrap, train forward + backward, eval ==
last exit == the backbone's classifier path, increasing exit FLOPs, real early exit == simulated,
checkpoint -> ``timm-l2w eval``) and appends one JSON line per family to
``results/family_sweep.jsonl`` as it goes (a stopped sweep resumes where it was). ``table`` prints the
README's markdown: family, model, exits (``feature_info`` points and their layout), cumulative MFLOPs
per exit at the family's default input size, and the families that do not work with the reason::

    nohup python benchmarks/family_sweep.py run &      # hours on 2 busy CPU cores
    python benchmarks/family_sweep.py table
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results" / "family_sweep.jsonl"


def read_rows(path: Path = RESULTS) -> List[Dict[str, Any]]:
    """The sweep's rows, the last one per family."""
    rows: Dict[str, Dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["family"]] = row
    return [rows[f] for f in sorted(rows)]


def table(rows: List[Dict[str, Any]]) -> str:
    """Markdown: the working families, then the others with their reason."""
    working = [r for r in rows if r["ok"]]
    lines = [f"{len(working)} of {len(rows)} timm families work ({100 * len(working) / max(len(rows), 1):.0f}%).", "",
             "| family | model | exits (feature_info index: layout) | input | MFLOPs per exit |",
             "|---|---|---|---|---|"]
    for r in working:
        exits = ", ".join(f"{i}: {lay.upper()}" for i, lay in zip(r["exit_indices"], r["layouts"]))
        size = "x".join(str(s) for s in r["default_size"][1:])
        mflops = " / ".join(f"{f / 1e6:.1f}" for f in r["default_flops"])
        lines.append(f"| {r['family']} | `{r['model']}` | {exits} | {size} | {mflops} |")
    failed = [r for r in rows if not r["ok"]]
    if failed:
        lines += ["", "Not working:", ""]
        lines += [f"- {r['family']} (`{r['model']}`): {r['error'].splitlines()[0]}" for r in failed]
    return "\n".join(lines)


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["run", "table"])
    p.add_argument("--results", default=str(RESULTS), help="the JSON lines file")
    p.add_argument("--seconds", type=int, default=600, help="time limit per family")
    args = p.parse_args(argv)
    if args.command == "table":
        print(table(read_rows(Path(args.results))))
        return 0
    env = dict(os.environ, L2W_SWEEP_RESULTS=args.results, L2W_SWEEP_SECONDS=str(args.seconds), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "slow", "tests/models/test_family_sweep.py",
           "-k", "every_family", "-p", "no:cacheprovider"]
    return subprocess.call(cmd, cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
