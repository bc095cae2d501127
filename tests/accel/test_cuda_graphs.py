"""CUDA graphs of the update (timm_l2w.accel.cuda_graphs, `timm-l2w train --cuda-graphs`).

On the CPU: the switch falls back with one log line; the replay schedule (static batch buffers, one kind per
half and meta step, the host bookkeeping after each "replay", the device learning rates) run eagerly gives
exactly the ordinary run; the virtual step reads a device learning rate as it reads a number. On CUDA
(skipped here): captured training against eager training, and the L2W update under
``torch.cuda.set_sync_debug_mode('error')``.
"""
from __future__ import annotations

import pytest
import torch

from tests.helpers import TinyMultiExit, l2w_loader_batch, register_tiny, saved_weights
from timm_l2w.cli.train import main

TINY = register_tiny()
BASE = ["--model", TINY, "--no-progress", "--batch-size", "32", "--lr", "0.05", "--no-eval", "--log-with", "none",
        "--held-out", "1197", "--warmup-steps", "2"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_paper_study.sh)")


def test_without_cuda_the_switch_says_why_and_trains_eagerly(tmp_path, capsys):
    assert main(BASE + ["--max-steps", "2", "--cuda-graphs", "--cpu", "--output", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "CUDA graphs off (CUDA graphs need a CUDA device (training on cpu))" in out and "runs eagerly" in out


@pytest.mark.parametrize("extra", [["--weighting", "l2w", "--meta-interval", "3"], ["--weighting", "uniform"]])
def test_the_replay_schedule_run_eagerly_is_the_ordinary_run(tmp_path, monkeypatch, extra):
    """GraphedUpdates(capture=False): staging, warm-up counts, per-kind "replays" (the update without its host
    side, then the host side) and the learning-rate mirrors, on the CPU: the same weights bit for bit."""
    import timm_l2w.accel.cuda_graphs as graphs

    replays = []

    class Eager(graphs.GraphedUpdates):
        def __init__(self, optimizers, log=print, warmup=2, capture=True, blocker=None):
            super().__init__(optimizers, log=log, warmup=1, capture=False, blocker=None)
            replays.append(self)

    args = BASE + ["--max-steps", "7", "--cpu", "--meta-lr", "1e-2"] + extra
    assert main(args + ["--output", str(tmp_path / "plain")]) == 0
    monkeypatch.setattr(graphs, "GraphedUpdates", Eager)
    assert main(args + ["--cuda-graphs", "--output", str(tmp_path / "graphs")]) == 0
    runner = replays[0]
    kinds = 4 if "l2w" in extra else 2  # (half 0 / 1) x (meta step due or not)
    assert len(runner.seen) == kinds and runner.replays == 14 - 1 - kinds  # 14 updates: 1 before, 1 warm-up per kind
    assert runner.disabled is None
    plain, graphed = saved_weights(tmp_path / "plain"), saved_weights(tmp_path / "graphs")
    assert plain.keys() == graphed.keys()
    for key in plain:
        assert torch.equal(plain[key], graphed[key]), key


def test_the_virtual_step_reads_a_device_learning_rate_as_a_number():
    from timm_l2w.optim_step import virtual_step

    torch.manual_seed(0)
    model = TinyMultiExit().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-3, nesterov=True)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # momentum buffers
    grads = [torch.randn_like(p) for p in params]
    number = virtual_step(opt, params, grads)
    opt.param_groups[0]["lr"] = torch.tensor(0.3, dtype=torch.float64)
    device = virtual_step(opt, params, grads)
    assert all(torch.equal(a, b) for a, b in zip(number, device))


@cuda
@pytest.mark.parametrize("backend", ["higher", "func"])
def test_captured_training_matches_eager_training_on_cuda(tmp_path, capsys, backend):
    args = BASE + ["--max-steps", "8", "--weighting", "l2w", "--backend", backend, "--tf32", "off"]
    assert main(args + ["--output", str(tmp_path / "eager")]) == 0
    assert main(args + ["--cuda-graphs", "--output", str(tmp_path / "graphs")]) == 0
    out = capsys.readouterr().out
    assert "CUDA graphs on" in out and "CUDA graphs off" not in out, out
    eager, graphed = saved_weights(tmp_path / "eager"), saved_weights(tmp_path / "graphs")
    for key in eager:
        torch.testing.assert_close(graphed[key].float(), eager[key].float(), rtol=1e-4, atol=1e-5, msg=key)


@cuda
@pytest.mark.parametrize("backend", ["higher", "func"])
def test_l2w_updates_make_no_host_sync_on_cuda(backend):
    from timm_l2w import L2W

    torch.manual_seed(0)
    model = TinyMultiExit(in_chans=1).cuda().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    l2w = L2W(model, opt, hidden_sizes=(8,), backend=backend, total_steps=10)
    x, y = torch.randn(16, 1, 8, 8, device="cuda"), torch.randint(0, 4, (16,), device="cuda")
    l2w_loader_batch(l2w, model, opt, x, y)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        l2w_loader_batch(l2w, model, opt, x, y)
        l2w_loader_batch(l2w, model, opt, x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert l2w.meta_skipped == 0 and l2w.last_meta_loss > 0


def _l2w_run(cuda_graphs, device="cpu", share_forward=True, updates=3):
    from timm_l2w import L2W, WeightPredictor

    torch.manual_seed(0)
    model = TinyMultiExit().to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-3)
    torch.manual_seed(1)
    net = WeightPredictor(3, hidden_sizes=(8,)).to(device)
    l2w = L2W(model, opt, weight_net=net, backend="func", meta_lr=1e-2, total_steps=20, share_forward=share_forward)
    if cuda_graphs:
        from timm_l2w.accel import capture_meta_updates

        capture_meta_updates(l2w)
    gen = torch.Generator().manual_seed(2)
    for _ in range(updates):
        x, y = torch.randn(16, 1, 8, 8, generator=gen).to(device), torch.randint(0, 4, (16,), generator=gen).to(device)
        l2w_loader_batch(l2w, model, opt, x, y)
    return l2w, [t.detach().cpu() for t in list(model.parameters()) + list(net.parameters())]


def test_the_l2w_option_warns_and_runs_eagerly_without_cuda():
    with pytest.warns(RuntimeWarning, match=r"L2W: CUDA graphs off \(CUDA graphs need a CUDA device"):
        l2w, _ = _l2w_run(True, updates=1)
    assert l2w.meta_runner.graphs.disabled is not None and l2w.step == 2


def test_the_l2w_options_replay_schedule_run_eagerly_is_the_unshared_meta_step(monkeypatch):
    """capture_meta_updates(l2w) with the capture replaced by eager calls: the meta update of the static halves
    (its own training forward) is what share_forward=False computes, bit for bit."""
    import timm_l2w.accel.cuda_graphs as graphs

    class Eager(graphs.GraphedUpdates):
        def __init__(self, optimizers, log=print, warmup=1, capture=True, blocker=None):
            super().__init__(optimizers, log=log, warmup=1, capture=False, blocker=None)

    reference, ref_params = _l2w_run(False, share_forward=False)
    monkeypatch.setattr(graphs, "GraphedUpdates", Eager)
    graphed, params = _l2w_run(True)
    runner = graphed.meta_runner.graphs
    assert len(runner.graphs) == 2 and runner.replays == 4  # 6 meta steps: 2 kinds x (warm-up, capture, replay)
    assert all(torch.equal(a, b) for a, b in zip(ref_params, params))
    assert graphed.last_meta_loss == reference.last_meta_loss


@cuda
def test_the_l2w_option_captures_the_meta_update_on_cuda(recwarn):
    reference, ref_params = _l2w_run(False, "cuda", share_forward=False, updates=4)
    graphed, params = _l2w_run(True, "cuda", updates=4)
    assert not [w for w in recwarn if "CUDA graphs off" in str(w.message)], [str(w.message) for w in recwarn]
    runner = graphed.meta_runner.graphs
    assert len(runner.graphs) == 2 and runner.replays >= 4 and graphed.meta_skipped == 0
    for a, b in zip(ref_params, params):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_capture_is_checked_again_for_the_backend_auto_settles_on():
    """backend='auto' settles at the first meta step, before any capture: when it settled on 'func', what
    blocks capture for 'func' (dropout masks a graph cannot replay) turns the graphs off; 'higher' changes nothing."""
    from types import SimpleNamespace

    from timm_l2w.accel.cuda_graphs import GraphedUpdates
    from timm_l2w.training.update import Updater

    lines = []
    for settled, expected in (("higher", None), ("func", "dropout blocks func")):
        updater = Updater.__new__(Updater)  # only the graph bookkeeping of the updater
        updater.graphs = GraphedUpdates([], log=lines.append, capture=False)
        updater.l2w = SimpleNamespace(backend=SimpleNamespace(name=settled))
        updater._graph_backend = "higher"  # the backend 'auto' starts with
        updater._graph_blocker = lambda backend: "dropout blocks func" if backend == "func" else None
        updater._recheck_graphs()
        assert updater.graphs.disabled == expected and updater._graph_backend == settled
    assert lines == ["timm-l2w train: CUDA graphs off (dropout blocks func); the update runs eagerly"]
