"""Regression tests for what a new user hit in their first hour (issue 13): FLOPs at the wrong image
size, resuming finished or multi-process runs, fine-tuning from a checkpoint, CLI rough edges."""
from __future__ import annotations

import pytest
import timm
import torch

import timm_l2w


def _outputs(model, size: int, n: int = 8):
    torch.manual_seed(0)
    loader = [(torch.randn(n, 3, size, size), torch.randint(0, 10, (n,)))]
    return timm_l2w.collect_exit_outputs(model, loader)


def test_flops_counted_at_another_image_size_are_refused_not_silently_wrong():
    model = timm.create_model("resnet18_l2w", num_classes=10)  # configured for 224x224, run at 32x32
    heldout, test = _outputs(model, 32), _outputs(model, 32)
    assert test.input_size == (3, 32, 32)
    with pytest.raises(ValueError, match=r"exit_flops\(model, input_size=\(3, 32, 32\)\)"):
        timm_l2w.budgeted_evaluation(heldout, test, timm_l2w.exit_flops(model))
    with pytest.raises(ValueError, match="224x224 images but the outputs come from 3x32x32"):
        timm_l2w.anytime_metrics(test, timm_l2w.exit_flops(model))
    flops = timm_l2w.exit_flops(model, test.input_size)
    assert [round(f / 1e6, 1) for f in flops] == [11.9, 20.3, 28.7, 37.1]  # not 584 / 996 / 1407 / 1818
    result = timm_l2w.budgeted_evaluation(heldout, test, flops)
    assert float(result.expected_flops.max()) <= flops[-1] + 1e-6


# ----------------------------------------------------------------------------- the training CLI

import hashlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from timm_l2w.cli.train import build_parser, main as train_main  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from ddp_check import accelerate_launch, register_tiny  # noqa: E402

TINY = register_tiny()
BASE = ["--model", TINY, "--batch-size", "32", "--lr", "0.05", "--held-out", "1197", "--log-with", "none"]


def _hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_auto_on_a_finished_run_changes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    args = BASE + ["--max-steps", "3", "--output", str(out)]
    assert train_main(args) == 0
    before = _hashes(out)
    assert "model.safetensors" in before and f"{TINY}_l2w.json" in before
    capsys.readouterr()
    assert train_main(args + ["--resume", "auto"]) == 0
    printed = capsys.readouterr().out
    assert "already complete (step 3 of 3)" in printed and "epoch 1:" not in printed
    assert _hashes(out) == before  # no step 4 checkpoint, no second log row, same model file
    # results lost (e.g. killed after the last checkpoint): only the final files are written again
    (out / "model.safetensors").unlink()
    (out / f"{TINY}_l2w.json").unlink()
    assert train_main(args + ["--resume", "auto"]) == 0
    after = _hashes(out)
    from safetensors.torch import load_file

    rewritten, kept = load_file(out / "model.safetensors"), load_file(out / "checkpoints" / "step_00000003" / "model.safetensors")
    assert set(rewritten) == set(kept) and all(torch.equal(rewritten[k], kept[k]) for k in kept)
    assert (out / f"{TINY}_l2w.json").is_file() and after["log.csv"] == before["log.csv"] and sorted((out / "checkpoints").iterdir())[-1].name == "step_00000003"


def test_pretrained_path_of_another_configuration_fails_clearly(tmp_path, capsys):
    tiny = timm.create_model("msdnet_l2w_cifar_tiny", num_classes=100)
    ckpt = timm_l2w.save_safetensors(tiny, tmp_path / "tiny.safetensors", metadata={"model": "msdnet_l2w_cifar_tiny"})
    code = train_main(["--model", "msdnet_l2w_cifar", "--pretrained-path", str(ckpt), "--max-steps", "1",
                       "--no-eval", "--output", str(tmp_path / "out"), "--log-with", "none"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "saved from msdnet_l2w_cifar_tiny" in err and "--model msdnet_l2w_cifar_tiny" in err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_pretrained_path_with_other_classes_reinitialises_only_the_exit_classifiers(tmp_path, capsys):
    torch.manual_seed(1)
    pre = timm.create_model("msdnet_l2w_cifar_tiny", num_classes=100)
    ckpt = timm_l2w.save_safetensors(pre, tmp_path / "pre.safetensors")
    out = tmp_path / "ft"
    code = train_main(["--model", "msdnet_l2w_cifar_tiny", "--pretrained-path", str(ckpt), "--max-steps", "1",
                       "--lr", "1e-9", "--warmup-lr", "1e-9", "--no-eval", "--output", str(out), "--log-with", "none"])
    printed = capsys.readouterr().out
    assert code == 0
    heads = [f"classifier.{k}.linear.{p}" for k in range(5) for p in ("weight", "bias")]
    line = next(ln for ln in printed.splitlines() if "re-initialised" in ln)
    assert "10 exit classifier tensors re-initialised for 10 classes: " in line
    assert sorted(line.split("classes: ")[1].split(", ")) == sorted(heads)
    from safetensors.torch import load_file

    tuned = load_file(out / "model.safetensors")
    body = [k for k, v in pre.state_dict().items() if v.is_floating_point() and "running" not in k and k not in heads]
    assert body and all(torch.allclose(pre.state_dict()[k], tuned[k], atol=1e-6) for k in body)  # loaded
    assert all(tuned[k].shape[0] == 10 for k in heads)  # fresh 10-class exit classifiers


def test_help_shows_every_default():
    parser = build_parser()
    text = " ".join(parser.format_help().split())
    for flag, shown in (("--epochs", "300"), ("--lr", "0.1"), ("--mixed-precision", "no"), ("--seed", "0"),
                        ("--momentum", "0.9"), ("--weighting", "l2w")):
        assert f"(default: {shown})" in text.split(flag, 2)[2].split("--", 1)[0] or f"(default: {shown})" in text
    for action in parser._actions:
        if action.default not in (None, False, {}) and action.option_strings and action.dest not in ("help", "version"):
            assert f"(default: {action.default})" in text, action.dest
    assert "cifar 0.8, imagenet 0.3" in text  # --eps: the preset's values, not "None"


def test_log_start_summary_without_progress_bars_or_carriage_returns(tmp_path, capsys):
    assert train_main(BASE + ["--max-steps", "2", "--no-eval", "--output", str(tmp_path)]) == 0  # bars on, no TTY
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "\r" not in captured.out
    assert "world size 1 (1 process)" in captured.out and "device cpu" in captured.out
    assert "mixed precision no" in captured.out
    assert train_main(BASE + ["--max-steps", "2", "--no-eval", "--no-progress", "--output", str(tmp_path / "b")]) == 0
    assert "epoch 1: loss" in capsys.readouterr().out  # --no-progress keeps the per-epoch summary


def test_vit_img_size_from_the_command_line(tmp_path, capsys):
    args = ["--model", "vit_tiny_l2w", "--max-steps", "1", "--batch-size", "8", "--no-eval", "--log-with", "none",
            "--weighting", "uniform"]
    assert train_main(args + ["--output", str(tmp_path / "a")]) == 2
    assert "--model-kwargs img_size=32" in capsys.readouterr().err
    assert train_main(args + ["--output", str(tmp_path / "b"), "--model-kwargs", "img_size=32"]) == 0


# ----------------------------------------------------------------------------- two CPU ranks

import subprocess  # noqa: E402


def _launch_two_ranks(*argv: str) -> subprocess.CompletedProcess:
    """The README's 2-rank CPU command, running ``timm-l2w train`` with the tiny test model."""
    return accelerate_launch([str(Path(__file__).parent / "ddp_check.py"), "--train", *argv])


def test_two_cpu_ranks_log_world_size_pause_once_and_resume(tmp_path):
    args = BASE + ["--max-steps", "4", "--no-eval", "--no-progress", "--output", str(tmp_path)]
    first = _launch_two_ranks(*args, "--stop-after-steps", "2")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-4000:]
    assert "world size 2 (2 processes" in first.stdout and "device cpu" in first.stdout
    assert first.stderr.count("paused after step 2") == 1  # both ranks stop, one says so
    second = _launch_two_ranks(*args, "--resume", "auto")  # used to fail: map_location cpu:0
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-4000:]
    assert "cannot be resumed" not in second.stderr
    log = json.loads((tmp_path / "log.json").read_text())
    assert log[-1]["step"] == 4 and (tmp_path / "model.safetensors").is_file()


def test_a_checkpoint_that_cannot_be_placed_on_this_device_is_not_called_damaged(tmp_path, capsys, monkeypatch):
    args = BASE + ["--max-steps", "2", "--no-eval", "--no-progress", "--output", str(tmp_path)]
    assert train_main(args + ["--stop-after-steps", "1"]) == 0
    import accelerate

    def refuse(self, *a, **k):
        raise RuntimeError("Attempting to deserialize object on a CUDA device but torch.cuda.is_available() is False.")

    monkeypatch.setattr(accelerate.Accelerator, "load_state", refuse)
    capsys.readouterr()
    assert train_main(args + ["--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert "is intact but its tensors cannot be placed on this process's device" in err
    assert "damaged" not in err.replace("not damaged", "") and "Traceback" not in err


def test_eval_takes_the_model_from_the_checkpoint_metadata(tmp_path, capsys):
    from timm_l2w.cli.eval import main as eval_main

    model = timm.create_model("msdnet_l2w_cifar_tiny", num_classes=10)
    ckpt = timm_l2w.save_safetensors(model, tmp_path / "model.safetensors")  # records model and num_classes
    assert eval_main([str(ckpt), "--dataset", "digits", "--output", str(tmp_path / "eval")]) == 0
    captured = capsys.readouterr()
    assert "msdnet_l2w_cifar_tiny" in captured.out and captured.out.count("MFLOPs") >= 5
    assert "\r" not in captured.err  # no progress bar when stderr is not a terminal
    assert eval_main([str(ckpt), "--model", "msdnet_l2w_cifar", "--output", str(tmp_path / "e2")]) == 2
    assert "saved from msdnet_l2w_cifar_tiny" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the L2W hook

import math  # noqa: E402
import warnings  # noqa: E402

from timm_l2w.meta import step as meta_mod  # noqa: E402


def test_skipped_first_meta_step_gives_no_scheduler_warning_and_the_meta_lr_follows_the_updates(monkeypatch):
    model = timm.create_model(TINY, num_classes=4, in_chans=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    l2w = timm_l2w.L2W(model, opt, hidden_sizes=(8,), meta_lr=1e-3, total_steps=4)
    real = meta_mod.meta_step

    def first_is_nan(*a, **k):  # the first meta step has a non-finite meta loss and is skipped
        result = real(*a, **k)
        if l2w.step == 0:
            result.meta_loss = torch.tensor(float("nan"))
        return result

    monkeypatch.setattr(meta_mod, "meta_step", first_is_nan)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,))
    lrs = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            for xt, yt in l2w.split(x, y):
                l2w.loss(model(xt), yt)
                lrs.append(l2w.meta_optimizer.param_groups[0]["lr"])
    assert l2w.meta_skipped == 1
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]
    assert lrs == pytest.approx([0.5e-3 * (1 + math.cos(math.pi * min(t, 4) / 4)) for t in range(1, 7)])


def test_l2w_on_a_single_exit_model_points_to_multi_exit_wrapper():
    model = timm.create_model("resnet18", num_classes=10)
    with pytest.raises(ValueError, match=r"not a multi-exit model.*MultiExitWrapper\('resnet18'"):
        timm_l2w.L2W(model, torch.optim.SGD(model.parameters(), lr=0.1))


# ----------------------------------------------------------------------------- documentation

import re  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def test_docs_stand_on_their_own_no_missing_spec_files_and_referenced_docs_exist():
    files = [p for d in ("timm_l2w", "examples", "benchmarks", "docs") for p in (ROOT / d).rglob("*")
             if p.suffix in (".py", ".md")] + [ROOT / "README.md"]
    outside = ("PAPER" + ".md", "DESIGN" + ".md", "/" + "work" + "/")  # not in the repository; no machine paths
    hits = [f"{p.relative_to(ROOT)}: {word}" for p in files for word in outside if word in p.read_text()]
    assert not hits, hits
    cited = {m for p in files for m in re.findall(r"docs/[\w./-]+\.md", p.read_text())}
    assert "docs/method.md" in cited and all((ROOT / c).is_file() for c in cited), cited


def _readme_block(title: str) -> str:
    """The first ```python block after ``title`` in the README."""
    text = (ROOT / "README.md").read_text()
    return text.split(title, 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_save_load_finetune_flow_works_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = timm.create_model("msdnet_l2w_cifar", num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # trained weights, unlike a fresh initialisation
    scope = {"timm": timm, "timm_l2w": timm_l2w, "model": model}
    exec(_readme_block("**Save, load back, fine-tune**"), scope)
    ref, loaded, tuned = model.state_dict(), scope["loaded"].state_dict(), scope["tuned"].state_dict()
    assert all(torch.equal(ref[k], loaded[k]) for k in ref)  # the 10-class heads too: nothing re-initialised
    heads = [k for k in tuned if tuned[k].shape != ref[k].shape]
    assert len(heads) == 10 and all(tuned[k].shape[0] == 5 for k in heads)  # 5 exits x (weight, bias)
    assert all(torch.equal(ref[k], tuned[k]) for k in ref if k not in heads)


def test_early_exit_budget_refuses_flops_counted_at_another_size():
    model = timm.create_model("resnet18_l2w", num_classes=10)
    calibration = _outputs(model, 32)
    with pytest.raises(ValueError, match=r"exit_flops\(model, input_size=\(3, 32, 32\)\)"):
        timm_l2w.EarlyExitPredictor.from_flops_budget(model, calibration, timm_l2w.exit_flops(model), 30e6)
    predictor = timm_l2w.EarlyExitPredictor.from_flops_budget(
        model, calibration, timm_l2w.exit_flops(model, calibration.input_size), 30e6)
    assert predictor is not None


# ----------------------------------------------------------------------------- round three (issue 23)

from timm_l2w import cli  # noqa: E402
from timm_l2w.files import read_metadata  # noqa: E402


def _checkpoints(out: Path) -> list:
    return sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith("."))


def test_a_fresh_run_into_another_runs_output_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    first = BASE + ["--max-steps", "4", "--checkpoint-every", "2", "--no-eval", "--no-progress", "--output", str(out)]
    assert train_main(first) == 0
    before = _hashes(out)
    capsys.readouterr()
    again = BASE + ["--max-steps", "1", "--no-eval", "--no-progress", "--output", str(out)]
    assert train_main(again) == 2
    err = capsys.readouterr().err
    assert "holds another run (checkpoints up to step 4)" in err and "--resume auto" in err and "--overwrite" in err
    assert _hashes(out) == before  # refused before anything was written
    assert train_main(again + ["--overwrite"]) == 0
    assert _checkpoints(out) == ["step_00000001"]  # the old run's checkpoints are gone: resume auto finds the new one
    log = json.loads((out / "log.json").read_text())
    assert [row["step"] for row in log] == [1]


def test_resume_with_another_batch_size_is_refused_and_a_resume_says_its_step(tmp_path, capsys):
    out = tmp_path / "run"
    args = BASE + ["--max-steps", "4", "--no-eval", "--no-progress", "--output", str(out)]
    assert train_main(args + ["--stop-after-steps", "2"]) == 0
    capsys.readouterr()
    other = [a if a != "32" else "16" for a in args]  # --batch-size 16
    assert train_main(other + ["--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert "--batch-size 32 (now 16)" in err and "cannot be resumed" in err and "Traceback" not in err
    assert train_main(args + ["--resume", "auto"]) == 0
    assert "resumed from step 2" in capsys.readouterr().out


def test_model_file_records_class_names_and_data_and_eval_uses_them(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--model", TINY, "--batch-size", "32", "--lr", "0.05", "--log-with", "none", "--max-steps", "2"]
    assert train_main(args + ["--dataset", "digits-affine", "--input-size", "16", "--no-progress",
                              "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "loss" in printed and "(sum over the 3 exits)" in printed  # the printed loss is labelled
    assert "data: 7,182 / 300 / 300 images (train / held-out / test), 10 classes: 0, 1, 2" in printed
    meta = read_metadata(out / "model.safetensors")
    assert json.loads(meta["class_names"]) == [str(d) for d in range(10)]
    assert (meta["dataset"], meta["input_size"]) == ("digits-affine", "16")
    assert eval_main_cli([str(out / "model.safetensors"), "--output", str(tmp_path / "ev"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "data set digits-affine, 16x16 images (recorded in" in printed
    assert json.loads((tmp_path / "ev" / f"{TINY}.json").read_text())["num_test"] == 300


def eval_main_cli(argv):
    from timm_l2w.cli.eval import main as eval_main

    return eval_main(argv)


def test_eval_of_a_missing_file_says_so(tmp_path, capsys):
    assert eval_main_cli([str(tmp_path / "nope.safetensors"), "--output", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and "nope.safetensors" in err and "records no model name" not in err


def test_eval_without_dataset_on_a_checkpoint_without_a_record_says_what_it_uses(tmp_path, capsys):
    model = timm.create_model(TINY, num_classes=10)
    ckpt = timm_l2w.save_safetensors(model, tmp_path / "m.safetensors", metadata={"model": TINY})
    assert eval_main_cli([str(ckpt), "--input-size", "8", "--cpu", "--output", str(tmp_path / "ev"),
                          "--no-progress"]) == 0  # --input-size and --cpu: the spellings of timm-l2w train
    assert "records none: evaluating on digits" in capsys.readouterr().out
    five = timm_l2w.save_safetensors(timm.create_model(TINY, num_classes=5), tmp_path / "five.safetensors",
                                     metadata={"model": TINY})
    assert eval_main_cli([str(five), "--img-size", "8", "--output", str(tmp_path / "ev5")]) == 2
    err = capsys.readouterr().err  # not a label error from deep inside: which data to pass
    assert "has 10 classes but the model only 5" in err and "--dataset" in err


def test_train_pretrained_path_takes_the_model_the_file_records(tmp_path, capsys):
    ckpt = timm_l2w.save_safetensors(timm.create_model(TINY, num_classes=10), tmp_path / "pre.safetensors",
                                     metadata={"model": TINY})
    run = ["--pretrained-path", str(ckpt), "--max-steps", "1", "--batch-size", "8", "--no-eval", "--no-progress",
           "--log-with", "none", "--img-size", "16", "--device", "cpu"]  # timm-l2w eval's spellings
    assert train_main(run + ["--output", str(tmp_path / "a")]) == 0  # no --model
    assert f"; {TINY} on digits" in capsys.readouterr().out
    assert read_metadata(tmp_path / "a" / "model.safetensors")["model"] == TINY
    assert train_main(run + ["--model", "msdnet_l2w_cifar_tiny", "--output", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert f"--model msdnet_l2w_cifar_tiny, but {ckpt} was saved from {TINY}" in err and f"--model {TINY}" in err


def test_version_on_the_command_and_its_subcommands(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"timm-l2w {timm_l2w.__version__}"
    for sub in ("train", "eval", "demo"):
        with pytest.raises(SystemExit) as info:
            cli.main([sub, "--version"])
        assert info.value.code == 0 and timm_l2w.__version__ in capsys.readouterr().out


def test_eps_above_the_sign_bound_warns_and_is_allowed():
    from timm_l2w.validation import negative_weights_note
    from timm_l2w.weighting import normalize_weights

    note = negative_weights_note(0.8, "col", 5, 32)  # the paper's CIFAR setting, 5 exits
    assert note and "0.625" in note and "-0.28" in note and "docs/method.md" in note
    extreme = torch.tensor([[-1.0, 1.0, 1.0, 1.0, 1.0]])  # G's limits: one exit low, the others high
    assert float(normalize_weights(extreme, 0.8, "col").min()) == pytest.approx(-0.28)
    assert negative_weights_note(0.625, "col", 5, 32) is None and negative_weights_note(0.3, "mat", 5, 32) is None
    assert "Weights can be negative" in (ROOT / "docs" / "method.md").read_text()


def test_eps_warning_during_training(tmp_path):
    with pytest.warns(UserWarning, match="below zero"):
        assert train_main(BASE + ["--max-steps", "1", "--no-eval", "--no-progress", "--output", str(tmp_path / "a")]) == 0
    import warnings as _warnings

    with _warnings.catch_warnings():
        _warnings.simplefilter("error", UserWarning)  # 3 exits: 0.75 keeps every weight >= 0, no warning
        assert train_main(BASE + ["--max-steps", "1", "--eps", "0.75", "--no-eval", "--no-progress",
                                  "--output", str(tmp_path / "b")]) == 0
