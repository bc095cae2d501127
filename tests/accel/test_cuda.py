"""CUDA checks (run by benchmarks/gpu_check.sh on a GPU machine; skipped where torch sees no CUDA device)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tests.helpers import TinyMultiExit, register_tiny
from timm_l2w import L2W, WeightPredictor, meta_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (benchmarks/gpu_check.sh runs these on a GPU)")
TINY = register_tiny()


@pytest.fixture
def no_tf32():
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _setup(device, dtype=torch.float32):
    torch.manual_seed(0)
    model = TinyMultiExit(num_exits=3, num_classes=4, in_chans=1).to(device, dtype).train()
    x = torch.randn(16, 1, 8, 8, dtype=dtype).to(device)
    y = torch.randint(0, 4, (16,)).to(device)
    return model, x, y


@pytest.mark.parametrize("backend", ["higher", "func"])
def test_meta_step_on_cuda_matches_the_cpu_in_float64(backend):
    grads = {}
    for device in ("cpu", "cuda"):
        model, x, y = _setup(device, torch.float64)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        torch.manual_seed(1)
        net = WeightPredictor(3).to(device, torch.float64)
        r = meta_step(model, opt, net, (x[:8], y[:8]), (x[8:], y[8:]), [0.5, 0.3, 0.2], backend=backend)
        grads[device] = [g.cpu() for g in r.grads]
    for a, b in zip(grads["cpu"], grads["cuda"]):
        assert a.abs().max() > 0
        torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("backend", ["higher", "func"])
def test_fp32_meta_policy_under_cuda_bf16_is_the_fp32_meta_step(backend, no_tf32):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    results = []
    for precision in ("no", "bf16"):
        model, x, y = _setup("cuda")
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        AcceleratorState._reset_state(reset_partial_state=False)
        acc = Accelerator(mixed_precision=precision)
        torch.manual_seed(1)
        l2w = L2W(model, opt, backend=backend, accelerator=acc, meta_precision="fp32")
        model, opt = acc.prepare(model, opt)
        l2w.model, l2w.optimizer = model, opt
        for xt, yt in l2w.split(x, y):
            l2w.loss(model(xt), yt)
            break
        results.append(l2w)
    for a, b in zip(results[1].last_meta_grads, results[0].last_meta_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


def test_backends_agree_with_cuda_dropout_by_replaying_the_masks():
    """The CPU test of test_meta.py with the CUDA RNG: 'func' replays the dropout masks of the training half."""
    from tests.helpers import P3, DropoutMultiExit

    torch.manual_seed(0)
    model = DropoutMultiExit().to("cuda", torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    net = WeightPredictor(3, hidden_sizes=(6,)).to("cuda", torch.float64)
    x = torch.randn(16, 1, 6, 6, dtype=torch.float64, device="cuda")
    y = torch.randint(0, 4, (16,), device="cuda")
    results = []
    for backend in ("higher", "func"):
        torch.manual_seed(1)
        results.append(meta_step(model, opt, net, (x[:8], y[:8]), (x[8:], y[8:]), P3, backend=backend))
        results[-1].after = torch.rand(1, device="cuda")
    assert torch.equal(results[0].after, results[1].after), "the meta step must leave the RNG stream as the model did"
    for a, b in zip(results[0].grads, results[1].grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_fp16_training_on_cuda_scales_and_counts_skipped_updates(tmp_path, monkeypatch):
    import accelerate

    from timm_l2w.cli.train import main

    scalers = []

    class HighScale(accelerate.Accelerator):  # a first scale that overflows fp16: the first updates are skipped
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.scaler is not None:
                self.scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 24, growth_interval=1000)
                scalers.append(self.scaler)

    monkeypatch.setattr(accelerate, "Accelerator", HighScale)
    out = tmp_path / "fp16"
    assert main(["--model", TINY, "--mixed-precision", "fp16", "--max-steps", "6", "--no-eval", "--no-progress",
                 "--batch-size", "32", "--lr", "0.05", "--output", str(out), "--log-with", "none"]) == 0
    row = json.loads((out / "log.json").read_text())[-1]
    skipped = round(math.log2(2.0 ** 24 / scalers[0].get_scale()))
    assert row["skipped_updates"] == skipped >= 1 and skipped < 12
    assert math.isfinite(row["loss"]) and math.isfinite(row["meta_loss"]) and row["skipped_meta_updates"] == 0


def test_early_exit_predictor_on_cuda_agrees_with_the_full_network_at_the_last_exit():
    import timm_l2w

    model, x, _ = _setup("cuda")
    model.eval()
    predictor = timm_l2w.EarlyExitPredictor(model, [2.0, 2.0, 0.0])  # nobody leaves before the last exit
    pred = predictor.predict(x)
    with torch.inference_mode():
        full = model.forward_exits(x)[-1].argmax(1)
    assert pred.predictions.device.type == "cuda" and torch.equal(pred.predictions, full)
    assert pred.exit_fractions(3).tolist() == [0.0, 0.0, 1.0]
