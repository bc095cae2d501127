"""The `timm-l2w train` command line: --help shows every default, --version, the start summary, --model-kwargs."""
from __future__ import annotations

import pytest

import timm_l2w
from tests.helpers import register_tiny
from timm_l2w import cli
from timm_l2w.cli.train import build_parser
from timm_l2w.cli.train import main as train_main

TINY = register_tiny()
BASE = ["--model", TINY, "--batch-size", "32", "--lr", "0.05", "--held-out", "1197", "--log-with", "none"]


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


def test_version_on_the_command_and_its_subcommands(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"timm-l2w {timm_l2w.__version__}"
    for sub in ("train", "eval", "demo"):
        with pytest.raises(SystemExit) as info:
            cli.main([sub, "--version"])
        assert info.value.code == 0 and timm_l2w.__version__ in capsys.readouterr().out
