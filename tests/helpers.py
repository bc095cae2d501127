"""What the tests share: the tiny multi-exit model, its timm registration, the multi-process launcher.

Tests import it as ``tests.helpers`` (the repository root is on ``sys.path``: ``pythonpath`` in pytest.ini);
the fixtures built on it live in ``tests/conftest.py``. No test module imports another test module.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from timm.models import register_model
from torch import nn

from timm_l2w.exits import exit_distribution
from timm_l2w.models.base import MultiExitModel, select_samples
from timm_l2w.models.ranet import RANet

ROOT = Path(__file__).resolve().parent.parent  # the repository
TESTS = ROOT / "tests"
DATA = TESTS / "data"  # files the tests read (reference manifests)
LAUNCH = TESTS / "launch"  # scripts run under a launcher (accelerate launch), never imported
TINY_MODEL = "l2w_test_tiny"
TINY_CFG_MODEL = "l2w_test_tiny_cfg"  # the same network with a data config of its own (register_tiny_with_cfg)
TINY_DATA_CFG = {"input_size": (3, 24, 24), "crop_pct": 0.8, "interpolation": "bicubic", "mean": (0.5, 0.4, 0.3),
                 "std": (0.25, 0.2, 0.3)}  # none of it timm's default (224 px, 0.875, ImageNet mean / std)
P3 = exit_distribution(0.75, 3)  # the exit distribution of the three-exit meta-step tests


class TinyMultiExit(MultiExitModel):
    """``num_exits`` conv-BN-ReLU blocks, each followed by a pooled linear exit head: fast enough for CPU tests.

    The default is the fixture's model (stride 1, widths ``width * (k + 1)``, 4 classes, 1 channel).
    ``stride=2, doubling=True`` gives the registered ``l2w_test_tiny`` (:func:`tiny_net`: widths
    ``width * 2 ** k``, stride 2); both build their parameters in the same order, so a seed gives the same
    weights as the two separate classes they replace.
    """

    def __init__(self, num_exits: int = 3, num_classes: int = 4, in_chans: int = 1, width: int = 4,
                 stride: int = 1, doubling: bool = False):
        super().__init__()
        self.num_exits, self.num_classes, self.in_chans = num_exits, num_classes, in_chans
        chans = [in_chans] + [width * (2 ** k if doubling else k + 1) for k in range(num_exits)]
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(chans[k], chans[k + 1], 3, stride=stride, padding=1, bias=False),
                          nn.BatchNorm2d(chans[k + 1]), nn.ReLU())
            for k in range(num_exits)
        )
        self.heads = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(chans[k + 1], num_classes))
            for k in range(num_exits)
        )

    def forward_stage(self, index, state):
        state = self.blocks[index](state)
        return state, self.heads[index](state)

    def get_classifiers(self):
        return nn.ModuleList(head[-1] for head in self.heads)


class CountingModel(TinyMultiExit):
    """Records ``(stage, batch size)`` of every stage call."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls = []

    def forward_stage(self, index, state):
        self.calls.append((index, state.shape[0]))
        return super().forward_stage(index, state)


class DropoutMultiExit(TinyMultiExit):
    """TinyMultiExit with dropout before every head: the backends must see the same masks."""

    def forward_stage(self, index, state):
        state = self.blocks[index](state)
        return state, self.heads[index](nn.functional.dropout(state, 0.3, self.training))


def small_ranet(**kwargs) -> RANet:
    """A RANet small enough for CPU tests (5 classes, three scales); ``kwargs`` override its settings."""
    args = dict(scale_list=(1, 2, 3), gr_factor=(2, 1, 1), bn_factor=(2, 1, 1), growth_rate=2, num_channels=4,
                step=1, head_width=8, num_classes=5)
    args.update(kwargs)
    return RANet(**args)


def tiny_net(num_classes: int = 10, in_chans: int = 3, width: int = 8) -> TinyMultiExit:
    """The registered ``l2w_test_tiny``: three stride-2 stages of widths ``width, 2 width, 4 width``."""
    return TinyMultiExit(3, num_classes=num_classes, in_chans=in_chans, width=width, stride=2, doubling=True)


def register_tiny() -> str:
    """Register :func:`tiny_net` in timm as ``l2w_test_tiny`` (once); return the name."""
    if not timm.is_model(TINY_MODEL):
        def l2w_test_tiny(pretrained: bool = False, **kwargs):
            return tiny_net(num_classes=kwargs.get("num_classes", 10), in_chans=kwargs.get("in_chans", 3))

        l2w_test_tiny.__module__ = __name__
        register_model(l2w_test_tiny)
    return TINY_MODEL


def register_tiny_with_cfg() -> str:
    """Register ``l2w_test_tiny_cfg``: :func:`tiny_net` with ``pretrained_cfg`` :data:`TINY_DATA_CFG` (what
    ``timm.data.resolve_data_config(model=...)`` reads), as a timm model with its own preprocessing has."""
    if not timm.is_model(TINY_CFG_MODEL):
        def l2w_test_tiny_cfg(pretrained: bool = False, **kwargs):
            model = tiny_net(num_classes=kwargs.get("num_classes", 10), in_chans=kwargs.get("in_chans", 3))
            model.pretrained_cfg = {"architecture": TINY_CFG_MODEL, **TINY_DATA_CFG}
            return model

        l2w_test_tiny_cfg.__module__ = __name__
        register_model(l2w_test_tiny_cfg)
    return TINY_CFG_MODEL


def write_image_folder(root: Path, classes=("cat", "dog", "owl"), per_class: int = 12, size=10,
                       seed: int = 0) -> Path:
    """PNG class folders ``root/<class>/<i>.png`` of ``size`` (a side, or ``(height, width)``) pixels: each class
    its own mean colour (learnable), noise on top."""
    rng = np.random.default_rng(seed)
    height, width = (size, size) if isinstance(size, int) else size
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(60 + 70 * c, 25, (height, width, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def spy_eval_loaders(monkeypatch) -> list:
    """Make ``timm-l2w eval`` record the ``(held-out, test)`` loaders it evaluates with (it still evaluates);
    returns the list they are appended to."""
    import timm_l2w.cli.eval as cli

    seen, evaluate = [], cli.evaluate_checkpoint

    def spy(model, heldout_loader, test_loader, **kwargs):
        seen.append((heldout_loader, test_loader))
        return evaluate(model, heldout_loader, test_loader, **kwargs)

    monkeypatch.setattr(cli, "evaluate_checkpoint", spy)
    return seen


def loader_images(loader) -> torch.Tensor:
    """Every image a loader gives, in order, as one tensor."""
    return torch.cat([images for images, _ in loader])


def root_on_pythonpath(env: dict) -> dict:
    """``env`` with the repository first on PYTHONPATH: a child process can import ``tests.helpers``."""
    return dict(env, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p))


def accelerate_launch(args: Sequence[str], processes: int = 2, timeout: int = 900,
                      attempts: int = 3) -> subprocess.CompletedProcess:
    """``accelerate launch`` of ``args`` on ``processes`` CPU ranks (the README's multi-process CPU command).

    Every attempt takes a free port of its own (``--main_process_port 0``), not the shared default 29500
    that another test run on the same machine may hold; a port taken between choosing and binding it is
    retried (up to ``attempts`` launches). ``timeout`` is generous: a loaded machine slows the ranks down.
    """
    env = root_on_pythonpath(dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1"))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
           *args]
    for _ in range(attempts):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        clash = any(words in proc.stderr.lower() for words in ("address already in use", "eaddrinuse"))
        if proc.returncode == 0 or not clash:
            return proc
    return proc


def cpu_accelerator(**kwargs):
    """A fresh CPU ``Accelerator(**kwargs)`` (accelerate's shared state reset first: another precision is allowed)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(cpu=True, **kwargs)


def saved_weights(out: Path, require_predictor: bool = False) -> dict:
    """A run's saved tensors: the model's, and the weight predictor's as ``wp.NAME`` (if saved, or required)."""
    tensors = load_file(out / "model.safetensors")
    if require_predictor or (out / "weight_predictor.safetensors").exists():
        tensors.update({f"wp.{k}": v for k, v in load_file(out / "weight_predictor.safetensors").items()})
    return tensors


def assert_staged_matches_forward(model, x, keep=None):
    """Stage-by-stage logits equal ``forward_exits``'; with ``keep``, samples are dropped after stage 0."""
    model.eval()
    with torch.no_grad():
        outs = model.forward_exits(x)
        assert len(outs) == model.num_exits and all(o.shape == (len(x), model.num_classes) for o in outs)
        state = x
        for k in range(model.num_exits):
            state, logits = model.forward_stage(k, state)
            torch.testing.assert_close(logits, outs[k] if keep is None or k == 0 else outs[k][keep])
            if k == 0 and keep is not None:
                state = select_samples(state, keep)


def l2w_loader_batch(l2w, model, opt, x, y):
    """The two updates of one loader batch, as README's loop runs them."""
    for xt, yt in l2w.split(x, y):
        loss = l2w.loss(model(xt), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()


def tiny_package(root: Path, q: float = 1.0):
    """A grayscale TinyMultiExit (3 exits, 10 classes, 16x16 'L' images, stretch preprocessing) with a confidence
    policy calibrated for ``q`` on random images, exported (ONNX only) to ``root / "package"``.

    Returns ``(predictor, package)``: the torch side and the folder the runtime reads.
    """
    from timm_l2w.deploy import export_package
    from timm_l2w.evaluation import ExitOutputs
    from timm_l2w.inference import EarlyExitPredictor

    torch.manual_seed(0)
    model = TinyMultiExit(3, num_classes=10, in_chans=1, width=4, stride=2, doubling=True).eval()
    with torch.no_grad():
        x = torch.rand(96, 1, 16, 16, generator=torch.Generator().manual_seed(1))
        calibration = ExitOutputs.from_logits(model.forward_exits(x), torch.zeros(96, dtype=torch.long))
    predictor = EarlyExitPredictor.from_distribution(model, calibration, q)
    predictor.preprocess = {"input_size": [1, 16, 16], "color": "L", "resize": "stretch", "mean": [0.5],
                            "std": [0.25]}
    package = export_package(model, root / "package", predictor, input_size=(1, 16, 16), pt2=False)
    return predictor, package


def gray_images(count: int, size: int = 12, seed: int = 0):
    """``count`` 8-bit grayscale images ``[count, size, size]`` uint8: smooth random blobs of varied contrast."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(count, 1, 4, 4, generator=gen) * torch.rand(count, 1, 1, 1, generator=gen) * 3
    up = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (up.clamp(0, 1)[:, 0] * 255).round().to(torch.uint8).numpy()
