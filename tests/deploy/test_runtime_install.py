"""The torch-free runtime is its own distribution (runtime/pyproject.toml): it installs into a fresh venv
without PyTorch (numpy, onnxruntime, pillow from the package index) and its ``timm-l2w-predict`` command
predicts what ``EarlyExitPredictor`` predicts on an exported package."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import timm_l2w
import timm_l2w_runtime
from tests.helpers import ROOT, gray_images, tiny_package
from timm_l2w_runtime import EarlyExitRuntime

RUNTIME = ROOT / "runtime"
# what `pip install ./runtime` may bring: the runtime, its three dependencies and theirs (onnxruntime's)
ALLOWED = {"timm-l2w-runtime", "numpy", "onnxruntime", "pillow", "protobuf", "flatbuffers", "packaging", "coloredlogs",
           "humanfriendly", "sympy", "mpmath", "pyreadline3"}


def _name(name: str) -> str:
    return name.lower().replace("_", "-")


def _run(args, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, **kwargs)


def test_the_runtime_distribution_declares_three_dependencies_and_one_version_and_ships_in_timm_l2w_too():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((RUNTIME / "pyproject.toml").read_text())["project"]
    assert project["name"] == "timm-l2w-runtime"
    assert sorted(_name(d.split(">")[0].split("=")[0].split("<")[0]) for d in project["dependencies"]) == [
        "numpy", "onnxruntime", "pillow"]
    assert project["scripts"] == {"timm-l2w-predict": "timm_l2w_runtime.predict:console"}
    assert project["version"] == timm_l2w_runtime.__version__ == timm_l2w.__version__
    assert {p.name for p in (RUNTIME / "timm_l2w_runtime").glob("*.py")} >= {"__init__.py", "runtime.py", "predict.py"}
    # timm_l2w ships the same package from runtime/ (it writes the policy and package format), with
    # onnxruntime only in its deploy extra
    setup = (ROOT / "setup.py").read_text()
    assert 'package_dir={"timm_l2w_runtime": "runtime/timm_l2w_runtime"}' in setup
    install_requires = setup[setup.index("install_requires"):setup.index("extras_require")]
    assert "onnxruntime" not in install_requires and "timm-l2w-runtime" not in install_requires
    for requirements in ("requirements.txt", "requirements-dev.txt"):
        lines = [line for line in (ROOT / requirements).read_text().splitlines() if line.startswith("-e ")]
        assert lines == ["-e .[dev,deploy]"] if requirements == "requirements-dev.txt" else lines == ["-e ."]


def test_runtime_installs_without_torch_and_predicts_like_the_predictor(tmp_path):
    """``python -m venv`` + ``pip install ./runtime``: no torch in pip's report or in the venv; the venv's
    ``timm-l2w-predict`` and ``python -m timm_l2w_runtime`` give EarlyExitPredictor's exits and predictions."""
    predictor, package = tiny_package(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    for i, a in enumerate(gray_images(40)):
        Image.fromarray(a).save(images / f"{i:02d}.png")

    source = tmp_path / "src"  # a copy: the build leaves build/ and *.egg-info beside the sources
    shutil.copytree(RUNTIME, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", venv], timeout=120).returncode == 0
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / "python"
    report = tmp_path / "report.json"
    proc = _run([python, "-m", "pip", "install", "--disable-pip-version-check", "--report", report, source],
                cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    installed = {_name(item["metadata"]["name"]) for item in json.loads(report.read_text())["install"]}
    assert {"timm-l2w-runtime", "numpy", "onnxruntime", "pillow"} <= installed <= ALLOWED, installed
    listed = _run([python, "-m", "pip", "list", "--format", "json"], timeout=120)
    names = {_name(p["name"]) for p in json.loads(listed.stdout)}
    assert not names & {"torch", "torchvision", "timm", "timm-l2w", "triton"}, names
    assert _run([python, "-c", "import torch"], cwd=tmp_path, timeout=60).returncode != 0
    where = _run([python, "-c", "import timm_l2w_runtime as r; print(r.__file__)"], cwd=tmp_path, timeout=60)
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout + where.stderr  # the installed copy

    out = tmp_path / "predictions.csv"
    proc = _run([bindir / "timm-l2w-predict", package, images, "--output", out, "--batch-size", "16"],
                cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "40 images, rule confidence" in proc.stdout
    rows = list(csv.DictReader(out.open()))
    module_out = tmp_path / "module.csv"
    proc = _run([python, "-m", "timm_l2w_runtime", package, images, "--output", module_out], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert module_out.read_text() == out.read_text()

    files = sorted(images.glob("*.png"))
    x = EarlyExitRuntime(package).preprocess(files)  # the runtime's preprocessing, fed to the torch predictor
    want = predictor.predict(torch.from_numpy(x))
    assert [Path(r["file"]).name for r in rows] == [f.name for f in files]
    assert [int(r["exit"]) - 1 for r in rows] == want.exit_index.tolist()
    assert len(set(want.exit_index.tolist())) > 1  # a real early exit: several exits taken
    assert [int(r["prediction"]) for r in rows] == want.predictions.tolist()
    np.testing.assert_allclose([float(r["confidence"]) for r in rows], want.confidences.numpy(), atol=1e-5)
    assert all(r["error"] == "" for r in rows)


def test_timm_l2w_predict_runs_the_runtime_and_a_missing_onnxruntime_names_the_torch_free_install(
        tmp_path, monkeypatch, capsys):
    from timm_l2w.cli import main as timm_l2w_main
    from timm_l2w_runtime import runtime as runtime_module

    assert timm_l2w_main(["predict", str(tmp_path / "missing"), str(tmp_path)]) == 2
    assert "timm-l2w predict: error: package folder" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # any import of onnxruntime now fails
    with pytest.raises(ImportError, match=r"pip install \./runtime from a clone of timm_l2w"):
        runtime_module._onnxruntime()
