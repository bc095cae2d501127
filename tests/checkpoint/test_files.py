"""Atomic writes (timm_l2w.files): the written files get the user's umask, not the temp file's 0600."""
from __future__ import annotations

import os
import stat

import pytest
import torch

import timm_l2w
from timm_l2w.files import write_json_atomic, write_text_atomic


@pytest.fixture
def umask():
    """Run the test under a chosen umask, then put the previous one back."""
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_results_checkpoints_and_models_get_the_umask_mode(tmp_path, umask, mask, expected):
    umask(mask)
    text = write_text_atomic(tmp_path / "log.csv", "a,b\n")
    js = write_json_atomic(tmp_path / "results.json", {"a": 1})
    model = timm_l2w.save_safetensors({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    reference = tmp_path / "plain.txt"
    reference.write_text("x")  # what open() gives under this umask
    assert _mode(reference) == expected
    assert [_mode(p) for p in (text, js, model)] == [expected] * 3


def test_rewriting_a_file_keeps_its_mode(tmp_path, umask):
    path = write_text_atomic(tmp_path / "shared.csv", "old\n")
    os.chmod(path, 0o640)
    write_text_atomic(path, "new\n")
    assert path.read_text() == "new\n" and _mode(path) == 0o640
