"""L2W in timm's own train.py through ``timm_l2w.L2WClassificationTask`` (issue 29), driven by timm's pieces
the way train.py drives them: its accumulation arithmetic (the last window of an epoch shorter), the task
call, ``loss / accum_steps``, clipping ``task.get_clip_parameters(exclude_head='agc' in clip_mode)``,
``timm.utils.CheckpointSaver(..., task=task)`` and ``timm.task.resume_task_checkpoint``.

Each meta step is checked against the real update that follows it: a snapshot (model, optimizer, predictor,
``.grad``) taken as the meta step starts is put through the real update (weighted loss with the snapshot's
predictor, backward ``/ accum_steps``, timm's ``dispatch_clip_grad`` on the clipped set, ``step()``) and its
meta loss on the meta half must equal the one L2W reported; the optimizer and meta-optimizer steps must
alternate (a meta step exactly before every update, none elsewhere).
"""
from __future__ import annotations

import argparse
import copy
from typing import List, Optional, Tuple

import pytest
import torch
from timm.optim import create_optimizer_v2
from timm.task import ClassificationTask, resume_task_checkpoint
from timm.utils import CheckpointSaver, NativeScaler, dispatch_clip_grad

from tests.helpers import P3, TinyMultiExit
from timm_l2w import L2WClassificationTask
from timm_l2w.meta import meta_loss
from timm_l2w.weighting import weighted_multi_exit_loss

F64 = torch.float64
EPS = 0.8


def _batches(count: int, size: int = 4, seed: int = 1) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 6, 6, generator=gen, dtype=F64), torch.randint(0, 4, (size,), generator=gen))
            for _ in range(count)]


def _task(seed: int = 0, clip: Optional[Tuple[str, float]] = None, accum: int = 1, epochs: int = 2,
          batches: int = 5, scaler=None, **l2w_kwargs):
    """Model, timm AdamW and the task attached the way the README's train.py line attaches it."""
    torch.manual_seed(seed)
    model = TinyMultiExit(num_exits=3, num_classes=4, in_chans=1).to(F64)
    task = L2WClassificationTask(model=model, criterion=torch.nn.CrossEntropyLoss(), verbose=False,
                                 hidden_sizes=(8,), **l2w_kwargs)
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-2, weight_decay=0.05)
    task.attach(optimizer, scaler, clip_grad=None if clip is None else clip[1],
                clip_mode="norm" if clip is None else clip[0], grad_accum_steps=accum, epochs=epochs,
                batches_per_epoch=batches)
    return model, task, optimizer


def train_epochs(task, optimizer, batches, accum: int, epochs: range, clip=None, scaler=None) -> None:
    """train.py's train_one_epoch arithmetic (written here): ``need_update`` every ``accum`` batches and on the
    last one, the last window's ``accum_steps`` shortened to ``len % accum``, the loss divided by it,
    clipping ``task.get_clip_parameters(exclude_head='agc' in mode)`` on an update, step, zero_grad."""
    count = len(batches)
    for _ in epochs:
        accum_steps = accum
        last_accum_steps = count % accum_steps
        last_window_start = count - last_accum_steps
        task.get_trainable_module().train()
        optimizer.zero_grad()
        for index, (x, y) in enumerate(batches):
            need_update = index == count - 1 or (index + 1) % accum_steps == 0
            if index >= last_window_start:
                accum_steps = last_accum_steps
            loss = task(x, y, need_update=need_update, accum_steps=accum_steps)["loss"]
            if accum_steps > 1:
                loss = loss / accum_steps
            parameters = task.get_clip_parameters(exclude_head="agc" in clip[0]) if clip else None
            if scaler is not None:
                scaler(loss, optimizer, clip_grad=clip and clip[1], clip_mode=clip[0] if clip else "norm",
                       parameters=parameters, need_update=need_update)
            else:
                loss.backward()
                if need_update:
                    if clip:
                        dispatch_clip_grad(parameters, clip[1], mode=clip[0])
                    optimizer.step()
            if need_update:
                optimizer.zero_grad()


class MetaStepSpy:
    """Records, at every meta step, the meta loss L2W reports and the meta loss of the real update from a
    snapshot taken as the meta step starts (``clipped(model)``: the parameters the real update clips); and the
    order of optimizer ('step') and meta-optimizer ('meta') steps."""

    def __init__(self, task, optimizer, clip=None, clipped=None):
        self.pairs: List[Tuple[float, float]] = []
        self.events: List[str] = []
        l2w, model = task.l2w, task.get_trainable_module()
        optimizer.register_step_post_hook(lambda *_: self.events.append("step"))
        l2w.meta_optimizer.register_step_post_hook(lambda *_: self.events.append("meta"))
        original = l2w.meta_update

        def spy(train_batch, meta_batch, *args, accum_steps=None, **kwargs):
            snapshot = copy.deepcopy((model, optimizer, l2w.weight_net))
            grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
            result = original(train_batch, meta_batch, *args, accum_steps=accum_steps, **kwargs)
            self.pairs.append((float(l2w.last_meta_loss), self.real(snapshot, grads, train_batch, meta_batch,
                                                                    accum_steps or 1, clip, clipped)))
            return result

        l2w.meta_update = spy

    @staticmethod
    def real(snapshot, grads, train, meta, accum_steps, clip, clipped) -> float:
        model, optimizer, net = snapshot
        for p, g in zip(model.parameters(), grads):
            p.grad = g
        (weighted_multi_exit_loss(model(train[0]), train[1], net, EPS, "col")[0] / accum_steps).backward()
        if clip is not None:
            dispatch_clip_grad(clipped(model), clip[1], mode=clip[0])
        optimizer.step()
        with torch.no_grad():
            return float(meta_loss(model(meta[0]), meta[1], P3))


def _every_classifier_left_out(model):
    heads = {id(p) for c in model.get_classifiers() for p in c.parameters()}
    return [p for p in model.parameters() if id(p) not in heads]


@pytest.mark.parametrize("batches, accum", [(5, 2), (7, 3), (13, 5)])
def test_uneven_accumulation_windows_stay_in_step_over_epochs(batches, accum):
    """timm shortens the last window (5 batches / 2: windows 2, 2, 1); with 13 / 5 its arithmetic even splits
    the last 3 batches into windows of 2 and 1, both divided by 3. L2W is told, never guesses: no '.grad is
    not zero' error over three epochs, a meta step right before every update and nowhere else, each
    modelling its update exactly."""
    model, task, optimizer = _task(accum=accum, epochs=3, batches=batches, clip=("norm", 0.5))
    spy = MetaStepSpy(task, optimizer, clip=("norm", 0.5), clipped=lambda m: list(m.parameters()))
    train_epochs(task, optimizer, _batches(batches), accum, range(3), clip=("norm", 0.5))
    steps = spy.events.count("step")
    assert spy.events == ["meta", "step"] * steps  # every update preceded by its meta step, no other meta step
    assert task.l2w.step == steps and task.l2w.micro_step == 0
    # two updates per window (13 / 5: windows 5, 5, 2, 1; the last one, 2 halves divided by 3, makes one)
    assert steps == 3 * {(5, 2): 6, (7, 3): 6, (13, 5): 7}[batches, accum]
    for reported, real in spy.pairs:
        assert abs(reported - real) <= 1e-12 * abs(real), (reported, real)


def test_without_accumulation_two_updates_per_loader_batch_each_half_the_others_meta_set():
    """The paper's schedule: per loader batch the task's update on the first half (meta set: the second), then
    the loop's on the second half (meta set: the first), at the parameters the first one left."""
    model, task, optimizer = _task(batches=3)
    halves = []
    original = task.l2w.meta_update
    task.l2w.meta_update = lambda train, meta, *a, **k: halves.append((train[0], meta[0])) or original(train, meta,
                                                                                                        *a, **k)
    batches = _batches(3)
    train_epochs(task, optimizer, batches, 1, range(1))
    assert task.l2w.step == 6 and len(halves) == 6
    for (x, _), (first, second) in zip(batches, zip(halves[::2], halves[1::2])):
        assert torch.equal(first[0], x[:2]) and torch.equal(first[1], x[2:])
        assert torch.equal(second[0], x[2:]) and torch.equal(second[1], x[:2])


def test_agc_virtual_step_is_timms_real_update_on_the_clipped_set():
    """train.py under ``--clip-mode agc`` clips ``task.get_clip_parameters(exclude_head=True)``: every exit's
    classifier left out (timm's base task leaves out the last two parameters, the last exit's). The virtual
    step clips that set: its meta loss equals the real update's, and clipping every parameter would not."""
    clip = ("agc", 0.01)
    model, task, optimizer = _task(clip=clip, batches=3)
    assert {id(p) for p in task.get_clip_parameters(exclude_head=True)} == {
        id(p) for p in _every_classifier_left_out(model)}
    assert len(list(task.get_clip_parameters())) == len(list(model.parameters()))
    spy = MetaStepSpy(task, optimizer, clip=clip, clipped=_every_classifier_left_out)
    every = MetaStepSpy(task, optimizer, clip=clip, clipped=lambda m: list(m.parameters()))  # spies the spy
    train_epochs(task, optimizer, _batches(3), 1, range(1), clip=clip)
    assert len(spy.pairs) == 6 and spy.events == ["meta", "step"] * 6
    for (reported, real), (_, clipped_all) in zip(spy.pairs, every.pairs):
        assert abs(reported - real) <= 1e-12 * abs(real), (reported, real)
        assert abs(reported - clipped_all) > 1e-9 * abs(real)  # the head's clip matters here


def test_checkpoint_saver_and_resume_task_checkpoint_restore_l2w_exactly(tmp_path):
    """CheckpointSaver(task=task) writes the hook's state as 'task_state'; resume_task_checkpoint (weights_only)
    restores predictor, meta optimizer and update counter bit for bit, and training on from the checkpoint
    gives exactly the weights of the uninterrupted run."""
    batches, args = _batches(5), argparse.Namespace(model="l2w_test_tiny")
    model, task, optimizer = _task(accum=2, epochs=3)
    train_epochs(task, optimizer, batches, 2, range(3))
    straight = {k: v.clone() for k, v in task.l2w.weight_net.state_dict().items()}, copy.deepcopy(model.state_dict())

    model, task, optimizer = _task(accum=2, epochs=3)
    train_epochs(task, optimizer, batches, 2, range(2))
    saver = CheckpointSaver(model, optimizer, args=args, checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path),
                            task=task)
    saver.save_checkpoint(1, metric=0.0)
    saved = task.l2w.state_dict()

    resumed_model, resumed, resumed_opt = _task(seed=5, accum=2, epochs=3)
    assert resume_task_checkpoint(resumed, str(tmp_path / "last.pth.tar"), optimizer=resumed_opt) == 2
    state = resumed.l2w.state_dict()
    assert state["step"] == saved["step"] == 12 and resumed.l2w.micro_step == 0
    for key, value in saved["weight_net"].items():
        assert torch.equal(state["weight_net"][key], value), key
    for index, moments in saved["meta_optimizer"]["state"].items():
        for key, value in moments.items():
            assert torch.equal(state["meta_optimizer"]["state"][index][key], value), key
    assert resumed.l2w.meta_optimizer.param_groups[0]["lr"] == task.l2w.meta_optimizer.param_groups[0]["lr"]
    train_epochs(resumed, resumed_opt, batches, 2, range(2, 3))
    for key, value in straight[0].items():
        assert torch.equal(resumed.l2w.weight_net.state_dict()[key], value), key
    for key, value in straight[1].items():
        assert torch.equal(resumed_model.state_dict()[key], value), key


def test_resume_before_attach_is_applied_by_attach_and_a_plain_task_checkpoint_is_refused(tmp_path):
    model, task, optimizer = _task(batches=2)
    train_epochs(task, optimizer, _batches(2), 1, range(1))
    (tmp_path / "l2w").mkdir(), (tmp_path / "plain").mkdir()  # train.py's get_outdir makes them
    CheckpointSaver(model, optimizer, args=argparse.Namespace(model="tiny"), checkpoint_dir=str(tmp_path / "l2w"),
                    task=task).save_checkpoint(0, metric=0.0)
    fresh = L2WClassificationTask(model=TinyMultiExit().to(F64), criterion=torch.nn.CrossEntropyLoss(),
                                  verbose=False, hidden_sizes=(8,))
    fresh_opt = create_optimizer_v2(fresh.get_trainable_module(), "adamw", lr=1e-2)
    resume_task_checkpoint(fresh, str(tmp_path / "l2w" / "last.pth.tar"))
    fresh.attach(fresh_opt)
    assert fresh.l2w.step == task.l2w.step == 4
    assert all(torch.equal(a, b) for a, b in zip(fresh.l2w.weight_net.parameters(), task.l2w.weight_net.parameters()))

    plain = ClassificationTask(model, torch.nn.CrossEntropyLoss(), verbose=False)
    CheckpointSaver(model, optimizer, args=argparse.Namespace(model="tiny"), checkpoint_dir=str(tmp_path / "plain"),
                    task=plain).save_checkpoint(0, metric=0.0)
    with pytest.raises(ValueError, match="no L2W state.*--initial-checkpoint"):
        resume_task_checkpoint(task, str(tmp_path / "plain" / "last.pth.tar"))


def test_timms_loss_scaler_in_the_tasks_own_update():
    """With train.py's NativeScaler (here on the CPU, no autocast: the scale is a power of two, so exact) the
    task's own update goes through the scaler as the loop's does: the same weights as without it."""
    runs = []
    for scaler in (None, NativeScaler(device="cpu")):
        model, task, optimizer = _task(batches=3, scaler=scaler, clip=("norm", 0.5))
        train_epochs(task, optimizer, _batches(3), 1, range(1), clip=("norm", 0.5), scaler=scaler)
        runs.append((task.l2w.step, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0] == 6
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_task_errors_say_what_to_do():
    model = TinyMultiExit()
    with pytest.raises(TypeError, match=r"unexpected arguments \['eps_'\].*'eps'"):
        L2WClassificationTask(model, torch.nn.CrossEntropyLoss(), verbose=False, eps_=0.5)
    task = L2WClassificationTask(model, torch.nn.CrossEntropyLoss(), verbose=False)
    x, y = torch.randn(4, 1, 6, 6), torch.randint(0, 4, (4,))
    with pytest.raises(RuntimeError, match=r"task.attach\(optimizer"):
        task(x, y)
    task.attach(torch.optim.SGD(model.parameters(), lr=0.1), grad_accum_steps=2)
    with pytest.raises(ValueError, match="need_update=need_update, accum_steps=accum_steps"):
        task(x, y)
    task.attach(torch.optim.SGD(model.parameters(), lr=0.1), NativeScaler(device="cpu"), grad_accum_steps=2)
    with pytest.raises(ValueError, match="loss scaler.*--amp-dtype bfloat16"):
        task(x, y, need_update=False, accum_steps=2)


@pytest.mark.parametrize("told", [False, True])
def test_the_hook_in_train_pys_own_loop_is_told_the_windows(told):
    """L2W used directly in train.py's loop (the issue's form: both halves inside a window of ``accum`` loader
    batches, ``grad_accum_steps=2 * accum`` halves per update): left to count, the hook drifts at the
    shorter last window and the next epoch stops with '.grad is not zero'; told ``update=`` /
    ``accum_steps=`` (timm's ``need_update`` and window) its meta steps stay on the updates."""
    from timm_l2w import L2W

    torch.manual_seed(0)
    model = TinyMultiExit().to(F64)
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-2)
    l2w = L2W(model, optimizer, hidden_sizes=(8,), grad_accum_steps=4)
    events: List[str] = []
    optimizer.register_step_post_hook(lambda *_: events.append("step"))
    l2w.meta_optimizer.register_step_post_hook(lambda *_: events.append("meta"))
    batches, accum = _batches(5), 2

    def epoch():
        accum_steps, last = accum, len(batches) % accum
        for index, (x, y) in enumerate(batches):
            need_update = index == len(batches) - 1 or (index + 1) % accum_steps == 0
            if index >= len(batches) - last:
                accum_steps = last
            for half, (xt, yt) in enumerate(l2w.split(x, y)):
                told_kwargs = dict(update=need_update and half == 1, accum_steps=2 * accum_steps) if told else {}
                (l2w.loss(model(xt), yt, **told_kwargs) / (2 * accum_steps)).backward()
            if need_update:
                optimizer.step()
                optimizer.zero_grad()

    if not told:
        with pytest.raises(RuntimeError, match="not zero at the first micro-batch"):
            epoch(), epoch()
        return
    epoch(), epoch()
    assert events == ["meta", "step"] * 6 and l2w.step == 6
