"""Every timm family as a multi-exit model: one small model per family, wrapped and put through the
whole multi-exit path (issue 20).

Families are timm's model modules (``timm.list_modules()``: resnet, efficientnet, vision_transformer,
...); a family's model is its smallest by parameter count. For each: wrap it, a train-mode forward +
backward, ``forward_exits``, the eval forward equal to the last exit (and to the backbone's own
``forward_head(forward_features(x))``), strictly increasing ``exit_flops``, real early exit
(``EarlyExitPredictor``) equal sample for sample to the exit simulated on ``forward_exits``, and a
checkpoint round trip: ``save_safetensors`` -> ``timm.create_model('multi_exit_l2w', pretrained=True,
pretrained_cfg_overlay=dict(file=...))`` and ``timm-l2w eval FILE``.

The default run takes timm's ``test_*`` models (tiny members of 9 families). The full sweep over
every family is ``slow``; with ``L2W_SWEEP_RESULTS=path.jsonl`` it appends one JSON line per family
(``benchmarks/family_sweep.py`` runs it in the background and turns the lines into the README table).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_l2w
from timm_l2w.cli.eval import main as eval_main
from timm_l2w.models.wrapper import GENERIC_NAME, MultiExitWrapper

NUM_CLASSES = 10  # the digits data set `timm-l2w eval` runs on
SMALL_SIDES = (64, 96, 112, 128, 160)  # tried in order before the family's default input size
PER_MODEL_SECONDS = int(os.environ.get("L2W_SWEEP_SECONDS", "900"))

# name parts that mark a family's small members: only these candidates get their parameters counted
_SIZE_WORDS = ("test", "atto", "femto", "pico", "nano", "xxs", "tiny", "xs", "mini", "micro", "small", "lite",
               "light", "s0", "b0", "t0", "m0", "m1", "s1", "b1", "t8", "12", "18", "26", "_050", "_035", "002")


def families(test_models: bool) -> Dict[str, List[str]]:
    """timm's model modules -> their model names (``test_models``: only timm's ``test_*`` models; else the rest)."""
    out = {}
    for module in timm.list_modules():
        names = [n for n in timm.list_models(module=module) if n.startswith("test_") == test_models
                 and timm.models.model_entrypoint(n).__module__.startswith("timm.")]  # not timm_l2w's own
        if names:
            out[module] = names
    return out


def _params(name: str) -> int:
    """Parameter count from a construction on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = timm.create_model(name)
    return sum(p.numel() for p in model.parameters())


def smallest(names: List[str], candidates: int = 12) -> Tuple[str, int]:
    """The smallest model of ``names``: the best ``candidates`` by name (size words, then length) are counted."""
    def rank(n: str) -> Tuple[int, int, str]:
        hit = [i for i, w in enumerate(_SIZE_WORDS) if w in n]
        return (min(hit) if hit else len(_SIZE_WORDS), len(n), n)

    counted = [(_params(n), n) for n in sorted(names, key=rank)[:candidates]]
    params, name = min(counted)
    return name, params


def _wrap_small(name: str) -> Tuple[MultiExitWrapper, int, Dict[str, Any]]:
    """The wrapper at the smallest side of :data:`SMALL_SIDES` the family runs (``img_size`` where it takes one)."""
    cfg = timm.models.get_pretrained_cfg(name).to_dict()
    default = int(cfg["input_size"][-1])
    errors = []
    for side in [s for s in SMALL_SIDES if s < default] + [None]:
        for kwargs in ([{"img_size": side}, {}] if side else [{}]):
            try:
                model = timm.create_model(GENERIC_NAME, backbone=name, num_classes=NUM_CLASSES, **kwargs).eval()
                x = torch.zeros(1, 3, side or default, side or default)
                with torch.no_grad():
                    model.forward_exits(x)
                return model, side or default, kwargs
            except Exception as err:  # noqa: BLE001 - too small for this family: the next size
                errors.append(err)
                if "cannot trace" in str(err):  # no input size helps
                    raise
    raise errors[-1]


def check_model(name: str, tmp: Path, default_flops: bool = False) -> Dict[str, Any]:
    """Run the whole multi-exit path on ``name`` wrapped; return what the README table shows."""
    start = time.time()
    torch.manual_seed(0)
    model, side, kwargs = _wrap_small(name)
    k = model.num_exits
    x, y = torch.randn(6, 3, side, side), torch.arange(6) % NUM_CLASSES

    # train mode: every exit, gradients into the heads and the backbone
    model.train()
    outs = model(x)
    assert isinstance(outs, tuple) and len(outs) == k and all(o.shape == (6, NUM_CLASSES) for o in outs)
    sum(F.cross_entropy(o, y) for o in outs).backward()
    assert all(h.fc.weight.grad is not None for h in model.heads)
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.backbone.parameters()), \
        "no gradient reached the backbone"
    model.zero_grad(set_to_none=True)

    # eval mode: forward_exits, the eval forward is the last exit and the backbone's own classifier path
    model.eval()
    with torch.no_grad():
        exits = model.forward_exits(x)
        assert len(exits) == k and all(o.shape == (6, NUM_CLASSES) for o in exits)
        last = model(x)
        assert torch.equal(last, exits[-1]), "eval forward != forward_exits' last exit"
        if model._uses_backbone_head(k - 1):
            backbone = model.backbone
            reference = model.heads[-1].fc(backbone.forward_head(backbone.forward_features(x), pre_logits=True))
            assert torch.equal(last, reference), "eval forward != fc(backbone.forward_head(backbone.forward_features))"

    flops = timm_l2w.exit_flops(model, (3, side, side))
    assert all(b > a for a, b in zip(flops, flops[1:])), list(flops)

    # real early exit = the exit simulated on forward_exits, sample for sample
    conf = torch.stack([o.softmax(-1).amax(-1) for o in exits], dim=1)  # [N, K]
    # half the samples leave at each exit; thresholds halfway between two samples' confidences, so the last
    # bits a smaller batch may change (other kernels for the samples still running) decide nothing
    ordered = conf.double().sort(dim=0).values
    thresholds = (ordered[2] + ordered[3]) / 2
    thresholds[-1] = float("inf")
    predicted = timm_l2w.EarlyExitPredictor(model, thresholds).predict(x)
    simulated = timm_l2w.exits.exit_by_threshold(conf, thresholds)
    assert torch.equal(predicted.exit_index, simulated), (predicted.exit_index, simulated)
    stacked = torch.stack(exits)  # [K, N, C]
    expected = stacked[simulated, torch.arange(6)].argmax(-1)
    assert torch.equal(predicted.predictions, expected), (predicted.predictions, expected)

    # checkpoint round trip: timm's pretrained mechanism and `timm-l2w eval FILE` rebuild it from the file
    with torch.no_grad():
        for p in model.heads.parameters():
            p.add_(0.01)  # weights a fresh build cannot have
    path = timm_l2w.save_safetensors(model, tmp / "model.safetensors")
    rebuilt = timm.create_model(GENERIC_NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    ours, theirs = model.state_dict(), rebuilt.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[n], theirs[n]) for n in ours)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model.forward_exits(x[:2]), rebuilt.forward_exits(x[:2])))
    code = eval_main([str(path), "--img-size", str(side), "--held-out", "20", "--batch-size", "64", "--device", "cpu",
                      "--output", str(tmp / "eval"), "--name", "sweep", "--no-progress"])
    assert code == 0
    result = json.loads((tmp / "eval" / "sweep.json").read_text())
    assert len(result["anytime"]) == k

    row = dict(family=_module_of(name), model=name,
               exit_indices=model.exit_indices, exit_modules=[d["module"] for d in model.feature_info],
               layouts=model.exit_layouts, side=side, kwargs=kwargs, flops=list(flops))
    if default_flops:  # the README's numbers: the family's default input size, ImageNet's 1000 classes
        full = MultiExitWrapper(name, num_classes=1000)
        row["default_size"] = list(full.pretrained_cfg["input_size"])
        row["default_flops"] = list(timm_l2w.exit_flops(full))
    row["seconds"] = round(time.time() - start, 1)
    return row


def _module_of(name: str) -> str:
    return timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]


def _record(row: Dict[str, Any]) -> None:
    out = os.environ.get("L2W_SWEEP_RESULTS")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


TEST_FAMILIES = families(test_models=True)


@pytest.mark.parametrize("family", sorted(TEST_FAMILIES))
def test_family_sweep_test_models(family, tmp_path):
    name, _ = smallest(TEST_FAMILIES[family])
    row = check_model(name, tmp_path)
    assert row["family"] == family and len(row["flops"]) == len(row["exit_indices"]) >= 2


def _full_cases() -> List[Tuple[str, Optional[str]]]:
    """(family, its smallest model) for every timm family; computed only when the slow sweep runs."""
    return [(family, smallest(names)[0]) for family, names in sorted(families(test_models=False).items())]


def sweep_one(family: str, name: str, out: Path, tmp: Path) -> Dict[str, Any]:
    """One family in a fresh process (memory back after each; a crash or a hang is that family's row)."""
    import subprocess
    import sys

    cmd = [sys.executable, str(Path(__file__).resolve()), family, name, str(out), str(tmp)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PER_MODEL_SECONDS,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
    except subprocess.TimeoutExpired:
        row = dict(family=family, model=name, ok=False, error=f"TimeoutError: over {PER_MODEL_SECONDS} s")
        _record(row)
        return row
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.is_file() else []
    mine = [r for r in rows if r["family"] == family]
    if mine:
        return mine[-1]
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    row = dict(family=family, model=name, ok=False, error=f"crashed (exit {proc.returncode}): {tail[0][:300]}")
    _record(row)
    return row


@pytest.mark.slow
def test_family_sweep_every_family(tmp_path):
    """Every family (the README table); at least 95% of them must work, the others fail with a clear reason."""
    out = Path(os.environ.get("L2W_SWEEP_RESULTS") or tmp_path / "sweep.jsonl")
    os.environ["L2W_SWEEP_RESULTS"] = str(out)
    done = {json.loads(line)["family"] for line in out.read_text().splitlines() if line.strip()} \
        if out.is_file() else set()  # resume a sweep that was stopped: skip the families already written
    for family, name in _full_cases():
        if family not in done:
            case = tmp_path / family
            case.mkdir()
            sweep_one(family, name, out, case)
    rows = {r["family"]: r for r in (json.loads(line) for line in out.read_text().splitlines() if line.strip())}
    working = [r for r in rows.values() if r["ok"]]
    assert len(working) >= 0.95 * len(rows), [(r["family"], r["error"]) for r in rows.values() if not r["ok"]]
    assert all("cannot be split" in r["error"] or "TimeoutError" in r["error"] for r in rows.values() if not r["ok"])


if __name__ == "__main__":  # one family of the slow sweep: python tests/test_family_sweep.py FAMILY MODEL OUT TMP
    import sys

    family, name, out, tmp = sys.argv[1:5]
    os.environ["L2W_SWEEP_RESULTS"] = out
    torch.set_num_threads(1)
    try:
        result = check_model(name, Path(tmp), default_flops=True)
        result["ok"] = True
    except Exception as err:  # noqa: BLE001 - the reason goes to the table
        result = dict(family=family, model=name, ok=False, error=f"{type(err).__name__}: {str(err)[:500]}")
    _record(result)
