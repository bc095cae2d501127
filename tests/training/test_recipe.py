"""timm's recipe pieces in `timm-l2w train` and in the example: optimizers, Mixup/CutMix, clipping, EMA."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import register_tiny
from timm_l2w.cli.train import main, parse_args
from timm_l2w.training.checkpoints import EMA_FILE

TINY = register_tiny()
BASE = ["--model", TINY, "--no-progress", "--batch-size", "32", "--held-out", "1197"]  # 300 training images


def _run(out: Path, *extra: str) -> int:
    return main(BASE + ["--output", str(out), *extra])


@pytest.mark.parametrize("weighting, opt", [("uniform", "adamw"), ("l2w", "adamw"), ("l2w", "lamb")])
def test_adamw_mixup_cutmix_clipping_and_ema_train_and_evaluate_the_ema(tmp_path, weighting, opt):
    out = tmp_path / f"{weighting}-{opt}"
    assert _run(out, "--weighting", weighting, "--opt", opt, "--lr", "2e-3", "--weight-decay", "0.05",
                "--filter-bias-and-bn", "--mixup", "0.8", "--cutmix", "1.0", "--label-smoothing", "0.1",
                "--clip-grad", "1.0", "--model-ema", "--model-ema-decay", "0.9", "--channels-last",
                "--max-steps", "6") == 0
    log = json.loads((out / "log.json").read_text())[-1]
    assert log["skipped_updates"] == 0 and log["loss"] > 0
    model, ema = load_file(out / "model.safetensors"), load_file(out / EMA_FILE)
    assert set(model) == set(ema)
    assert any(not torch.equal(model[k], ema[k]) for k in model if model[k].is_floating_point())
    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    assert torch.equal(load_file(ckpt / EMA_FILE)[next(iter(ema))], ema[next(iter(ema))])
    # the final evaluation is the EMA's: its anytime accuracy is what the EMA weights give
    import timm

    results = json.loads((out / f"{TINY}_{weighting}.json").read_text())
    net = timm.create_model(TINY, num_classes=10)
    net.load_state_dict(ema)
    from timm_l2w.data import create_datasets, create_loaders
    from timm_l2w.evaluation import anytime_metrics, collect_exit_outputs

    splits = create_datasets("digits", input_size=32, held_out=1197)
    test_loader = create_loaders(splits, 32)[2]
    top1 = [row["top1"] for row in anytime_metrics(collect_exit_outputs(net, test_loader))]
    assert top1 == pytest.approx([row["top1"] for row in results["anytime"]], abs=1e-9)


def test_ema_resumes_exactly(tmp_path):
    args = ["--weighting", "uniform", "--opt", "adamw", "--lr", "2e-3", "--model-ema", "--model-ema-decay", "0.5",
            "--max-steps", "6", "--no-eval", "--mixup", "0.5"]
    assert _run(tmp_path / "straight", *args) == 0
    again = tmp_path / "resumed"
    assert _run(again, *args, "--stop-after-steps", "3") == 0
    assert _run(again, *args, "--resume", "auto") == 0
    for name in ("model.safetensors", EMA_FILE):
        a, b = load_file(tmp_path / "straight" / name), load_file(again / name)
        assert [k for k in a if not torch.equal(a[k], b[k])] == [], name


def test_recipe_flags_are_checked_with_clear_errors(tmp_path, capsys):
    for extra, message in [(["--opt", "nonexistent_opt"], "--opt nonexistent_opt"),
                           (["--layer-decay", "1.5"], "--layer-decay"),
                           (["--mixup", "-1"], "--mixup"),
                           (["--model-ema-decay", "1"], "--model-ema-decay"),
                           (["--clip-grad", "0"], "--clip-grad")]:
        code = _run(tmp_path / "bad", "--max-steps", "1", "--no-eval", *extra)
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, (extra, err)


def test_recipe_flags_use_timms_names():
    args = parse_args(["--opt", "lamb", "--opt-eps", "1e-6", "--opt-betas", "0.9", "0.99", "--momentum", "0.8",
                       "--layer-decay", "0.7", "--clip-grad", "3", "--clip-mode", "agc", "--grad-accum-steps", "2",
                       "--mixup", "0.8", "--cutmix", "1", "--model-ema", "--model-ema-decay", "0.99"])
    assert (args.opt, args.opt_eps, args.opt_betas, args.layer_decay, args.clip_mode) == (
        "lamb", 1e-6, [0.9, 0.99], 0.7, "agc")
    assert ((args.grad_accum_steps, args.mixup, args.cutmix, args.model_ema, args.model_ema_decay)
            == (2, 0.8, 1, True, 0.99))


def test_gradient_accumulation_updates_once_per_window_and_resumes_exactly(tmp_path):
    args = ["--weighting", "uniform", "--max-steps", "6", "--no-eval", "--grad-accum-steps", "4", "--batch-size", "30"]
    assert _run(tmp_path / "straight", *args) == 0
    log = json.loads((tmp_path / "straight" / "log.json").read_text())[-1]
    assert log["step"] == 6
    assert log["updates"] == 3  # the real optimizer updates: 12 halves in windows of 4
    again = tmp_path / "resumed"
    assert _run(again, *args, "--stop-after-steps", "2") == 0
    assert _run(again, *args, "--resume", "auto") == 0
    assert json.loads((again / "log.json").read_text())[-1]["updates"] == 3  # the count continues on resume
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(again / "model.safetensors")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    # one update per window: 12 halves / 4 = 3 updates (the cosine schedule's length), not 12
    from timm_l2w.training.run import Run

    run = Run(parse_args(BASE + args + ["--output", str(tmp_path / "probe")]))
    run.build()
    assert run.total_updates == 3


def test_gradient_accumulation_windows_must_fit_the_checkpoints(tmp_path, capsys):
    for extra, message in [(["--grad-accum-steps", "3"], "even number"),
                           (["--grad-accum-steps", "4", "--max-steps", "3", "--batch-size", "30"],
                            "--max-steps (3 loader batches"),
                           (["--grad-accum-steps", "4"], "an epoch (9 loader batches")]:
        code = _run(tmp_path / "bad", "--no-eval", *(["--max-steps", "2"] if "--max-steps" not in extra else []),
                    *extra)
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, (extra, err)


def test_agc_leaves_the_exit_classifiers_out_as_timms_train_py_and_the_virtual_step_clips_the_same(tmp_path):
    """``--clip-mode agc`` clips what timm's train.py clips (every parameter but the classifiers: here every
    exit's), and L2W's virtual step is told that set."""
    from timm_l2w.training.run import Run
    from timm_l2w.training.update import agc_parameters

    run = Run(parse_args(BASE + ["--clip-grad", "0.01", "--clip-mode", "agc", "--output", str(tmp_path / "p")]))
    run.build()
    model = run.accelerator.unwrap_model(run.model)
    heads = {id(p) for c in model.get_classifiers() for p in c.parameters()}
    expected = {id(p) for p in model.parameters()} - heads
    assert len(heads) == 6 and {id(p) for p in agc_parameters(run.model)} == expected
    assert {id(p) for p in run.l2w.clip_parameters} == expected
    assert _run(tmp_path / "run", "--clip-grad", "0.01", "--clip-mode", "agc", "--max-steps", "2", "--no-eval") == 0
