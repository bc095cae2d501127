"""Bad input sweep (issue 7): every bad input to the public API or a CLI gives a clear error naming the
problem and the fix (CLI: exit code 2, no traceback), and no file already on disk changes. A malicious
pickle (``__reduce__`` that writes a marker file) never runs through any of our loaders."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import timm_l2w
from tests.helpers import register_tiny, tiny_net
from timm_l2w import cli
from timm_l2w.meta import L2W

TINY = register_tiny()
TRAIN = ["train", "--model", TINY, "--no-progress", "--batch-size", "16", "--max-steps", "1", "--no-eval",
         "--held-out", "1397"]
MARKER = "PWNED"


class _Evil:
    """Unpickling this writes a marker file (what an attacker's checkpoint would do)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), MARKER))


def _evil_file(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Evil(marker)}, path)
    return path


def _model():
    torch.manual_seed(0)
    return tiny_net(num_classes=10, in_chans=3)


def _l2w_step(x, y):
    model = _model()
    l2w = L2W(model, torch.optim.SGD(model.parameters(), lr=0.1), hidden_sizes=(8,))
    for xt, yt in l2w.split(x, y):
        l2w.loss(model(xt), yt)


X, Y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))


def _files(tmp: Path) -> dict:
    """The files every case starts with (hashed before and after)."""
    model = _model()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "good.safetensors"))
    (tmp / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\0" * 64)
    good = (tmp / "good.safetensors").read_bytes()
    (tmp / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    torch.save(model.state_dict(), tmp / "good.pth")
    (tmp / "truncated.pth").write_bytes((tmp / "good.pth").read_bytes()[:300])
    other = tiny_net(num_classes=10, in_chans=3, width=4)  # another architecture (other widths)
    save_file({f"other.{k}": v.contiguous() for k, v in other.state_dict().items()}, str(tmp / "other.safetensors"))
    _evil_file(tmp / "evil.pth", tmp / "marker")
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(tmp.iterdir()) if p.is_file()}


# (name, kind, call or argv, words the message must contain)
API_CASES = [
    ("wrong image channels", lambda t: _l2w_step(torch.randn(8, 1, 32, 32), Y), ["1 channel", "in_chans"]),
    ("not an image batch", lambda t: _model()(torch.randn(3, 32, 32)), ["[B, C, H, W]"]),
    ("label out of range", lambda t: _l2w_step(X, torch.full((8,), 10)), ["[0, 9]", "num_classes"]),
    ("negative label", lambda t: _l2w_step(X, torch.full((8,), -1)), ["[0, 9]", "remap"]),
    ("float labels", lambda t: _l2w_step(X, Y.float()), ["float32", "long"]),
    ("batch too small to split", lambda t: _l2w_step(X[:1], Y[:1]), ["cannot be split", "batch size >= 2"]),
    ("eps negative", lambda t: L2W(_model(), torch.optim.SGD(_model().parameters(), lr=0.1), eps=-1),
     ["eps must be >= 0"]),
    ("unknown constraint", lambda t: L2W(_model(), torch.optim.SGD(_model().parameters(), lr=0.1), constraint="diag"),
     ["constraint 'diag'", "'row', 'col', 'mat'"]),
    ("unknown input type", lambda t: L2W(_model(), torch.optim.SGD(_model().parameters(), lr=0.1), input_type="logits"),
     ["input_type 'logits'", "'loss'"]),
    ("q index zero", lambda t: L2W(_model(), torch.optim.SGD(_model().parameters(), lr=0.1), target_p_index=0),
     ["target_p_index", "paper: 15"]),
    ("empty loader", lambda t: timm_l2w.collect_exit_outputs(_model(), []), ["no batches"]),
    ("corrupt safetensors", lambda t: timm_l2w.load_state_dict(t / "corrupt.safetensors"),
     ["not a readable safetensors", "again"]),
    ("truncated safetensors", lambda t: timm_l2w.load_state_dict(t / "truncated.safetensors"),
     ["truncated or corrupt"]),
    ("truncated .pth", lambda t: timm_l2w.load_state_dict(t / "truncated.pth"), ["truncated or corrupt"]),
    ("checkpoint of another architecture",
     lambda t: timm_l2w.state_checks.check_state_dict(_model(), timm_l2w.load_state_dict(t / "other.safetensors")),
     ["missing keys", "fix:"]),
    ("malicious pickle", lambda t: timm_l2w.load_state_dict(t / "evil.pth"), ["weights_only", "trust"]),
]

CLI_CASES = [
    ("unknown model (train)", TRAIN + ["--model", "nope_net"], ["unknown model 'nope_net'"]),
    ("unknown dataset (train)", TRAIN + ["--dataset", "cifar-11"], ["unknown dataset 'cifar-11'"]),
    ("batch too small (train)", TRAIN + ["--batch-size", "1"], ["two equal halves", "multiple of 2"]),
    ("max-nonfinite zero (train)", TRAIN + ["--max-nonfinite", "0"], ["--max-nonfinite must be >= 1"]),
    ("pretrained of another architecture (train)", TRAIN + ["--pretrained-path", "{t}/other.safetensors"],
     ["another architecture"]),
    ("malicious pretrained pickle (train)", TRAIN + ["--pretrained-path", "{t}/evil.pth"], ["weights_only"]),
    ("output not writable (train)", TRAIN + ["--output", "{t}/good.safetensors/out"], ["not writable", "--output"]),
    ("corrupt checkpoint (eval)", ["eval", "{t}/corrupt.safetensors", "--model", TINY, "--img-size", "8",
                                   "--device", "cpu", "--no-progress"], ["not a readable safetensors"]),
    ("another architecture (eval)", ["eval", "{t}/other.safetensors", "--model", TINY, "--img-size", "8",
                                     "--device", "cpu", "--no-progress"], ["missing keys"]),
    ("malicious pickle (eval)", ["eval", "{t}/evil.pth", "--model", TINY, "--img-size", "8", "--device", "cpu",
                                 "--no-progress"], ["weights_only"]),
    ("unknown model (eval)", ["eval", "--model", "nope_net", "--no-progress"], ["unknown model 'nope_net'"]),
    ("truncated checkpoint (convert)", ["convert", "{t}/truncated.pth", "{t}/new.safetensors", "--model", TINY],
     ["truncated or corrupt"]),
    ("malicious pickle (convert)", ["convert", "{t}/evil.pth", "{t}/new.safetensors", "--model", TINY],
     ["weights_only"]),
    ("unknown model (convert)", ["convert", "{t}/good.pth", "{t}/new.safetensors", "--model", "nope_net"],
     ["unknown model 'nope_net'"]),
]


@pytest.mark.parametrize("name, call, words", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input_is_a_clear_error(tmp_path, name, call, words):
    before = _files(tmp_path)
    with pytest.raises((ValueError, TypeError)) as info:
        call(tmp_path)
    message = str(info.value)
    assert all(w in message for w in words), f"{name}: {message}"
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(tmp_path.iterdir()) if p.is_file()}
    assert after == before and not (tmp_path / "marker").exists()


@pytest.mark.parametrize("name, argv, words", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_exits_2_without_traceback(tmp_path, capsys, name, argv, words):
    before = _files(tmp_path)
    argv = [a.replace("{t}", str(tmp_path)) for a in argv]
    if argv[0] == "train" and "--output" not in argv:
        argv += ["--output", str(tmp_path / "out")]
    if argv[0] == "eval":
        argv += ["--output", str(tmp_path / "eval")]
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, f"{name}: exit {code}\n{err}"
    assert all(w in err for w in words) and "Traceback" not in err, f"{name}: {err}"
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(tmp_path.iterdir()) if p.is_file()}
    assert after == before and not (tmp_path / "marker").exists()
    assert not (tmp_path / "new.safetensors").exists()


def test_malicious_pickle_in_a_checkpoint_never_runs_on_resume(tmp_path, capsys):
    """Each pickled file of a real checkpoint replaced by a malicious one: resume refuses, nothing runs."""
    out = tmp_path / "run"
    base = TRAIN[1:] + ["--output", str(out)]
    from timm_l2w.cli.train import main
    from timm_l2w.training.checkpoints import find_checkpoint

    assert main(base) == 0
    ckpt = find_checkpoint("auto", out)
    for rel in ("state/optimizer.bin", "state/random_states_0.pkl", "l2w_state.pt"):
        original = (ckpt / rel).read_bytes()
        _evil_file(ckpt / rel, tmp_path / "marker")
        code = main(base + ["--resume", "auto", "--max-steps", "2"])
        err = capsys.readouterr().err
        assert code == 2 and "cannot be resumed" in err and "weights_only" in err, f"{rel}: {err}"
        assert not (tmp_path / "marker").exists(), f"{rel}: the pickle ran"
        (ckpt / rel).write_bytes(original)
    assert main(base + ["--resume", "auto", "--max-steps", "2"]) == 0  # the restored checkpoint resumes


def test_unwritable_output_fails_before_training(tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:  # root ignores permission bits: make the OS refuse writes there instead
        real_mkdir = Path.mkdir

        def refuse(self, *args, **kwargs):
            if locked in self.parents:
                raise PermissionError(13, "Permission denied", str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", refuse)
    locked.chmod(0o500)
    try:
        code = cli.main(TRAIN + ["--output", str(locked / "out")])
    finally:
        locked.chmod(0o700)
    assert code == 2 and "not writable" in capsys.readouterr().err
