"""Property-based tests (hypothesis) of the validation layer at the edges (issue 16).

Generated settings, label tensors and damaged checkpoint files must give the documented error
(:mod:`timm_l2w.errors`: SettingError, LabelError, CheckpointError, ResumeError; all ValueErrors)
with a clear message, or a correct result; never an exception from inside torch or safetensors; and
the input files never change. A small real checkpoint (msdnet_l2w_cifar_tiny on digits, two steps)
is trained once per module and damaged copies of it are used.

Bounded: few examples per property, derandomized (the same examples every run), no example database.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import timm_l2w
from tests.helpers import TinyMultiExit, register_tiny
from timm_l2w import cli
from timm_l2w.checkpoint import convert_release_checkpoint, load_pretrained
from timm_l2w.cli.train import main as train_main
from timm_l2w.cli.train import parse_args
from timm_l2w.errors import CheckpointError, LabelError, ResumeError, SettingError
from timm_l2w.evaluation import ExitOutputs, collect_exit_outputs, load_weights
from timm_l2w.meta import L2W, meta_loss
from timm_l2w.models.factory import create_multi_exit_model
from timm_l2w.training.checkpoints import find_checkpoint
from timm_l2w.training.run import Run
from timm_l2w.weighting import WeightedMultiExitLoss, exit_losses

TINY = register_tiny()
MODEL = "msdnet_l2w_cifar_tiny"
RUN_FLAGS = ["--model", MODEL, "--no-progress", "--batch-size", "16", "--max-steps", "2", "--checkpoint-every", "1",
             "--keep-checkpoints", "2", "--no-eval", "--held-out", "1397", "--log-with", "none"]


SCALE = int(os.environ.get("TIMM_L2W_PROPERTY_SCALE", "1"))  # e.g. 20 for a deeper, randomized search


def bounded(n: int):
    """A bounded, reproducible hypothesis profile: ``n`` examples (times ``TIMM_L2W_PROPERTY_SCALE``;
    derandomized unless scaled), no deadline, no example database."""
    return settings(max_examples=n * SCALE, deadline=None, derandomize=SCALE == 1, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


def _digest(folder: Path) -> Dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert text and "Traceback" not in text, text
    return text


# ----------------------------------------------------------------------------- class 1: settings

NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(
    [0.0, -0.0, 1.0, 0.5, 0.999, 1e-4, -1e-4, -1.0, 1.5, 40.0, math.inf, -math.inf, math.nan]))
INTS = st.one_of(st.integers(-5, 60), st.sampled_from([True, 2.5, 15.0]))
# independent statement of what the API accepts (the oracle; not the validation code)
API_FLOATS: Dict[str, Callable[[float], bool]] = {
    "eps": lambda v: math.isfinite(v) and v >= 0,
    "label_smoothing": lambda v: math.isfinite(v) and 0 <= v < 1,
    "meta_lr": lambda v: math.isfinite(v) and v > 0,
    "meta_weight_decay": lambda v: math.isfinite(v) and v >= 0,
}
API_INTS: Dict[str, Callable[[Any], bool]] = {
    "target_p_index": lambda v: type(v) is int and 1 <= v <= 39,
    "meta_interval": lambda v: type(v) is int and v >= 1,
    "total_steps": lambda v: type(v) is int and v >= 1,
}


def _l2w(**kwargs) -> L2W:
    torch.manual_seed(0)
    model = TinyMultiExit(num_exits=3, num_classes=4, in_chans=1)
    return L2W(model, torch.optim.SGD(model.parameters(), lr=0.1), hidden_sizes=(4,), **kwargs)


@bounded(30)
@given(name=st.sampled_from(sorted(API_FLOATS) + sorted(API_INTS)), data=st.data())
def test_l2w_settings_are_accepted_exactly_when_valid(name, data):
    value = data.draw(NUMBERS if name in API_FLOATS else INTS, label="value")
    valid = (API_FLOATS.get(name) or API_INTS[name])(value)
    if not valid:
        with pytest.raises(SettingError) as info:
            _l2w(**{name: value})
        assert name in _one_line(info.value) and "must be" in str(info.value)
        return
    l2w = _l2w(**{name: value})
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    loss = l2w.loss(l2w.model(x), y)
    if name != "eps" or value < 1e30:  # float32 weights 1 + eps * (G - mean G) overflow beyond ~1e38
        assert torch.isfinite(loss)


@bounded(40)
@given(eps=NUMBERS, smoothing=NUMBERS)
def test_weighted_loss_settings_give_the_equal_weight_loss_or_a_setting_error(eps, smoothing):
    outputs = [torch.randn(5, 4, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    target = torch.tensor([0, 1, 2, 3, 0])
    if not (API_FLOATS["eps"](eps) and API_FLOATS["label_smoothing"](smoothing)):
        with pytest.raises(SettingError) as info:
            WeightedMultiExitLoss(eps=eps, label_smoothing=smoothing)(outputs, target)
        assert ("eps" if not API_FLOATS["eps"](eps) else "label_smoothing") in _one_line(info.value)
        return
    loss = WeightedMultiExitLoss(eps=eps, label_smoothing=smoothing)(outputs, target)  # no predictor: equal weights
    expected = sum(F.cross_entropy(o, target, label_smoothing=smoothing) for o in outputs)
    assert torch.allclose(loss, expected, atol=1e-6)


# flag, a value outside its range (CLI: exit 2, one line naming the flag, no traceback, nothing written)
BAD_TRAIN_FLAGS = st.one_of(
    st.tuples(st.sampled_from(["--lr", "--meta-lr"]), st.sampled_from(["inf", "nan", "-inf", "0", "-0.1"])),
    st.tuples(st.sampled_from(["--weight-decay", "--meta-weight-decay", "--eps", "--min-lr", "--warmup-lr"]),
              st.sampled_from(["inf", "nan", "-1", "-1e-9"])),
    st.tuples(st.sampled_from(["--label-smoothing", "--momentum"]),
              st.sampled_from(["1", "1.5", "-0.1", "nan", "inf"])),
    st.tuples(st.just("--target-p-index"), st.sampled_from(["0", "40", "-3", "100"])),
    st.tuples(st.sampled_from(["--meta-interval", "--hidden", "--max-nonfinite", "--keep-checkpoints",
                               "--eval-batch-size", "--stop-after-steps", "--epochs"]),
              st.integers(-3, 0).map(str)),
    st.tuples(st.sampled_from(["--warmup-steps", "--checkpoint-every", "--workers", "--seed"]),
              st.integers(-5, -1).map(str)),
    st.tuples(st.just("--batch-size"), st.sampled_from(["0", "-2", "-16"])),
)


@bounded(25)
@given(flag_value=BAD_TRAIN_FLAGS)
def test_train_cli_refuses_out_of_range_flags_with_one_line(flag_value, capsys):
    flag, value = flag_value
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        code = cli.main(["train", "--model", TINY, "--max-steps", "1", "--no-progress", "--output", str(out),
                         f"{flag}={value}"])
        err = capsys.readouterr().err.strip()
        assert code == 2, err
        assert len(err.splitlines()) == 1 and "Traceback" not in err and flag in err and "must be" in err, err
        assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))


@bounded(10)
@given(flag=st.sampled_from(["--batch-size", "--img-size", "--num-classes", "--in-chans", "--held-out"]),
       value=st.integers(-4, 0))
def test_eval_cli_refuses_out_of_range_flags(flag, value, capsys):
    with tempfile.TemporaryDirectory() as tmp:
        code = cli.main(["eval", "--model", TINY, "--no-progress", "--device", "cpu", "--output", f"{tmp}/ev",
                         f"{flag}={value}"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and flag in err and "must be >= 1" in err, err
        assert not Path(tmp, "ev").exists()


def test_train_cli_checks_flags_against_each_other(capsys, tmp_path):
    code = cli.main(["train", "--model", TINY, "--max-steps", "1", "--no-progress", "--output", str(tmp_path / "o"),
                     "--lr", "0.01", "--min-lr", "0.1"])
    err = capsys.readouterr().err
    assert code == 2 and "--min-lr" in err and "--lr" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- classes 4 and 5: labels

INTEGER_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]
OTHER_DTYPES = [torch.bool, torch.float32, torch.float64, torch.float16]


@st.composite
def label_cases(draw) -> Tuple[torch.Tensor, int]:
    """Labels of any dtype and values (some outside the classes), and the number of classes."""
    num_classes = draw(st.integers(1, 6))
    batch = draw(st.integers(1, 6))
    dtype = draw(st.sampled_from(INTEGER_DTYPES + OTHER_DTYPES))
    values = draw(st.lists(st.integers(-3, 8), min_size=batch, max_size=batch))
    if dtype == torch.uint8:
        values = [v % 256 for v in values]
    return torch.tensor(values).to(dtype), num_classes


def _label_oracle(labels: torch.Tensor, num_classes: int) -> bool:
    """Usable labels: any integer dtype (not bool), every value a class index."""
    if labels.dtype not in INTEGER_DTYPES:
        return False
    return all(0 <= int(v) < num_classes for v in labels.tolist())


def _assert_label_error(call: Callable[[], Any], labels: torch.Tensor) -> None:
    with pytest.raises(LabelError) as info:
        call()
    message = _one_line(info.value)
    assert "class indices" in message
    assert ("dtype" in message) == (labels.dtype not in INTEGER_DTYPES), message


@bounded(60)
@given(case=label_cases())
def test_label_entry_points_accept_every_integer_dtype_and_refuse_the_rest(case):
    labels, num_classes = case
    before = labels.clone()
    logits = [torch.randn(labels.shape[0], num_classes, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    p = timm_l2w.exits.exit_distribution(0.75, 3)
    calls = {
        "exit_losses": lambda y: exit_losses(logits, y),
        "weighted loss": lambda y: WeightedMultiExitLoss(eps=0.0)(logits, y),
        "meta_loss": lambda y: meta_loss(logits, y, p),
        "ExitOutputs.from_logits": lambda y: ExitOutputs.from_logits(logits, y).losses,
    }
    if _label_oracle(labels, num_classes):
        reference = labels.long()
        for name, call in calls.items():
            assert torch.equal(call(labels), call(reference)), name  # converted, same result as int64
    else:
        for call in calls.values():
            _assert_label_error(lambda call=call: call(labels), labels)
    assert labels.dtype == before.dtype and torch.equal(labels, before)  # the caller's tensor is untouched


@bounded(12)
@given(case=label_cases())
def test_l2w_hook_and_evaluation_loader_check_labels(case):
    labels, num_classes = case
    if labels.shape[0] < 2:
        labels = torch.cat([labels, labels])
    torch.manual_seed(0)
    model = TinyMultiExit(num_exits=2, num_classes=num_classes, in_chans=1)
    x = torch.randn(labels.shape[0], 1, 6, 6)
    l2w = L2W(model, torch.optim.SGD(model.parameters(), lr=0.1), hidden_sizes=(4,), target_p_index=10)

    def hook():
        for xt, yt in l2w.split(x, labels):
            assert torch.isfinite(l2w.loss(model(xt), yt))

    def loader():
        return collect_exit_outputs(model, [(x, labels)]).targets

    if _label_oracle(labels, num_classes):
        hook()
        assert torch.equal(loader(), labels.long())
    else:
        _assert_label_error(hook, labels)
        _assert_label_error(loader, labels)


# ----------------------------------------------------------------------------- the small real checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Output folder of a 2-step run of msdnet_l2w_cifar_tiny on digits, with checkpoints at steps 1 and 2."""
    out = tmp_path_factory.mktemp("properties") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train_main(RUN_FLAGS + ["--output", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def _walk(obj: Any, found: List[Tuple[Any, Any]]) -> None:
    """Every (container, key) holding a tensor in nested dicts and lists, depth first."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        if isinstance(value, torch.Tensor):
            found.append((obj, key))
        else:
            _walk(value, found)


def _mutate_tensor(tensor: torch.Tensor, how: str) -> torch.Tensor:
    if how in ("nan", "inf"):
        out = tensor.clone() if tensor.is_floating_point() else tensor.double()
        out.view(-1)[:1] = math.nan if how == "nan" else -math.inf
        return out
    return tensor.to(getattr(torch, how))  # a dtype change


def _damage_json(path: Path, how: str, data) -> Dict[str, Any]:
    obj = json.loads(path.read_text())
    nested = "epoch_stats" in obj and data.draw(st.booleans(), label="nested")
    target = obj["epoch_stats"] if nested else obj
    key = data.draw(st.sampled_from(sorted(target)), label="json key")
    if how == "drop":
        del target[key]
    elif how == "extra":
        target["unexpected_key"] = 1
    else:  # a value of the wrong type or a non-finite number
        target[key] = {"nan": math.nan, "inf": math.inf}.get(how, "x")
    path.write_text(json.dumps(obj))
    return {"key": key}


def _damage_tensors(path: Path, how: str, data) -> Dict[str, Any]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        obj: Any = load_file(str(path))
        with safe_open(str(path), "pt") as fh:
            metadata = fh.metadata()
    else:
        from accelerate.utils import load as accelerate_load

        obj = accelerate_load(path)
    found: List[Tuple[Any, Any]] = []
    _walk(obj, found)
    container, key = data.draw(st.sampled_from(found), label="tensor")
    info = {"key": key, "floating": container[key].is_floating_point()}
    if how == "drop" and isinstance(container, dict):
        del container[key]
    elif how == "extra" and isinstance(container, dict):
        container["unexpected.weight"] = torch.zeros(3)
    elif how in ("drop", "extra"):
        container[key] = torch.zeros(2, 2, 2)  # inside a list: a tensor of another shape
    else:
        container[key] = _mutate_tensor(container[key], how)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in obj.items()}, str(path), metadata=metadata)
    else:
        torch.save(obj, path)
    return info


BYTE_DAMAGE = ["truncate", "flip", "append", "empty"]
STRUCTURE_DAMAGE = ["nan", "inf", "int32", "bool", "float16", "drop", "extra"]
JSON_DAMAGE = ["nan", "inf", "wrong type", "drop", "extra"]
TENSOR_FILES = (".safetensors", ".pt", ".bin", ".pkl")


def _damage(path: Path, data) -> Dict[str, Any]:
    """Damage ``path`` at the byte level, or rewrite it as a well-formed file of its format with wrong
    contents (NaN/inf, another dtype, a missing or extra entry); returns what was done."""
    kinds = STRUCTURE_DAMAGE if path.suffix in TENSOR_FILES else JSON_DAMAGE if path.suffix == ".json" else []
    how = data.draw(st.sampled_from(BYTE_DAMAGE + kinds), label="damage")
    info: Dict[str, Any] = {"how": how}
    if how not in BYTE_DAMAGE:
        info.update((_damage_json if path.suffix == ".json" else _damage_tensors)(path, how, data))
        return info
    raw = bytearray(path.read_bytes())
    if how == "truncate" and raw:
        raw = raw[: data.draw(st.integers(0, len(raw) - 1), label="keep")]
    elif how == "flip" and raw:
        for pos in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=4), label="positions"):
            raw[pos] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    elif how == "append":
        raw += data.draw(st.binary(min_size=1, max_size=32), label="junk")
    else:
        raw = bytearray()
    path.write_bytes(bytes(raw))
    return info


def _unusable(path: Path, info: Dict[str, Any]) -> bool:
    """Damage no loader may accept: the file no longer holds usable contents of its kind."""
    how = info["how"]
    if path.suffix == ".json":
        if how in BYTE_DAMAGE:
            try:
                json.loads(path.read_bytes().decode("utf-8"))
                return False
            except ValueError:
                return True
        optional = {"args", "nonfinite_run", "meta_skipped"}
        return (how == "drop" and info["key"] not in optional) or (how in ("nan", "inf", "wrong type")
                                                                    and info["key"] != "args")
    if how in ("truncate", "empty", "drop"):
        return True
    return how in ("nan", "inf") or (how in ("int32", "bool") and info["floating"])


# ----------------------------------------------------------------------------- class 2: weights at the edges


@bounded(30)
@given(data=st.data(), entry=st.sampled_from(["train --pretrained-path", "eval", "convert"]))
def test_damaged_weights_are_refused_or_loaded_exactly_by_train_eval_and_convert(trained, data, entry):
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.safetensors"
        shutil.copy(trained / "model.safetensors", path)
        info = _damage(path, data)
        if info["how"] == "extra":
            info["how"] = "drop"  # an unexpected key is refused like a missing one (another architecture)
        before = _digest(Path(tmp))
        torch.manual_seed(0)
        model = create_multi_exit_model(MODEL, num_classes=10, in_chans=1)
        fresh = {k: v.clone() for k, v in model.state_dict().items()}
        out = Path(tmp) / "converted.safetensors"
        try:
            if entry == "train --pretrained-path":
                load_pretrained(model, str(path))
            elif entry == "eval":
                load_weights(model, path)
            else:
                convert_release_checkpoint(path, out, MODEL, num_classes=10, in_chans=1)
        except CheckpointError as err:
            assert "weights.safetensors" in _one_line(err) or "state dict" in str(err), str(err)
            assert not out.exists()
            assert all(torch.equal(v, fresh[k]) for k, v in model.state_dict().items()), "model changed"
        else:
            assert not _unusable(path, info), f"{entry} accepted weights damaged by {info}"
            loaded = load_file(str(out)) if entry == "convert" else model.state_dict()
            for key, value in load_file(str(path)).items():  # exactly the file's values, all finite
                if tuple(loaded[key].shape) == tuple(value.shape):
                    assert torch.equal(loaded[key], value.to(loaded[key].dtype)), key
                    assert not value.is_floating_point() or torch.isfinite(value).all(), key
        after = _digest(Path(tmp))
        assert {k: after.get(k) for k in before} == before  # the input file is unchanged


def _cli_weights_case(tmp: Path, how: str) -> Path:
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp / "model.safetensors"))
    key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[key] = _mutate_tensor(state[key], how)
    path = tmp / f"{how}.safetensors"
    save_file(state, str(path))
    return path


@pytest.mark.parametrize("how", ["nan", "inf", "int32"])
def test_cli_refuses_unusable_weights_in_train_eval_and_convert(trained, tmp_path, capsys, how):
    shutil.copy(trained / "model.safetensors", tmp_path / "model.safetensors")
    bad = _cli_weights_case(tmp_path, how)
    before = _digest(tmp_path)
    for argv in (["train", *RUN_FLAGS, "--max-steps", "1", "--output", str(tmp_path / "out"),
                  "--pretrained-path", str(bad)],
                 ["eval", str(bad), "--model", MODEL, "--device", "cpu", "--no-progress",
                  "--output", str(tmp_path / "ev")],
                 ["convert", str(bad), str(tmp_path / "new.safetensors"), "--model", MODEL]):
        code = cli.main(argv)
        err = capsys.readouterr().err
        assert code == 2 and "unusable weights" in err and bad.name in err and "Traceback" not in err, err
    after = _digest(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before
    assert not (tmp_path / "new.safetensors").exists() and not (tmp_path / "out" / "model.safetensors").exists()
    assert not any(k.startswith("ev/") for k in after)


# ----------------------------------------------------------------------------- class 3: resume


READ_AT_RESUME = ("train_state.json", "state/model.safetensors", "state/optimizer.bin", "state/random_states_0.pkl",
                  "l2w_state.pt")


def _tensors(obj: Any) -> List[torch.Tensor]:
    found: List[Tuple[Any, Any]] = []
    _walk(obj, found)
    return [c[k] for c, k in found if c[k].is_floating_point()]


def _resume_run(trained: Path, output: Path) -> Run:
    """The pieces a ``--resume`` of the trained run builds (model, optimizer, L2W), not yet loaded."""
    run = Run(parse_args(RUN_FLAGS + ["--output", str(output)]))
    run.build()
    return run


def test_damaged_checkpoint_files_are_refused_at_resume_naming_the_older_checkpoint(trained, tmp_path):
    """Every file of a checkpoint folder, damaged in every way: ResumeError naming the file and the next
    older checkpoint, or (damage that cannot matter: the COMPLETE marker's text, a checksums.json whose
    listed digests are still right, or weights that are only different numbers in a folder without
    checksums) a loaded, finite state. The damaged files are never modified by the attempt."""
    newest = find_checkpoint("auto", trained)
    older = sorted(p for p in (trained / "checkpoints").iterdir() if p.name < newest.name)[-1]
    files = sorted(p.relative_to(newest).as_posix() for p in newest.rglob("*") if p.is_file())
    assert {"checksums.json", "state/optimizer.bin", "state/random_states_0.pkl", "l2w_state.pt",
            "state/model.safetensors", "train_state.json", "weight_predictor.safetensors"} <= set(files)
    run = _resume_run(trained, tmp_path / "unused")
    from timm_l2w.state_checks import write_checksums

    @bounded(45)
    @given(rel=st.sampled_from(files), manifest=st.sampled_from(["stale", "rewritten", "deleted"]), data=st.data())
    def check(rel, manifest, data):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "checkpoints"
            shutil.copytree(older, root / older.name)
            folder = root / newest.name
            shutil.copytree(newest, folder)
            original = _digest(folder)
            info = _damage(folder / rel, data)
            if manifest == "rewritten" and rel != "checksums.json":  # as if no checksum could tell
                write_checksums(folder)
            elif manifest == "deleted" and rel != "checksums.json":  # a checkpoint of an older version
                (folder / "checksums.json").unlink()
            before = _digest(folder)
            changed = before.get(rel) != original.get(rel)
            try:
                run.load_checkpoint(folder)
            except ResumeError as err:
                message = _one_line(err)
                assert message.startswith(f"checkpoint {folder} cannot be resumed: ") and rel in message, message
                assert f"--resume {root / older.name}" in message, message
                assert err.older == root / older.name
            else:
                if rel not in ("COMPLETE", "checksums.json") and changed:
                    assert manifest != "stale", f"{rel} damaged by {info} resumed despite its checksum"
                    assert rel not in READ_AT_RESUME or not _unusable(folder / rel, info), \
                        f"{rel} damaged by {info} was resumed"
                assert run.step == json.loads((folder / "train_state.json").read_text())["step"]
                assert all(torch.isfinite(p).all() for p in run.model.parameters())
                assert all(torch.isfinite(t).all() for t in _tensors(run.optimizer.state_dict()))
            assert _digest(folder) == before  # reading never changes the checkpoint

    check()


def test_train_cli_resume_of_a_damaged_checkpoint_exits_2_naming_the_older_one(trained, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    newest = find_checkpoint("auto", out)
    target = newest / "state" / "optimizer.bin"
    target.write_bytes(target.read_bytes()[:1000])
    before = _digest(out)
    code = cli.main(["train", *RUN_FLAGS, "--max-steps", "3", "--output", str(out), "--resume", "auto"])
    err = capsys.readouterr().err
    older = sorted(p for p in (out / "checkpoints").iterdir() if p.name < newest.name)[-1]
    assert code == 2 and "cannot be resumed" in err and "state/optimizer.bin" in err, err
    assert f"--resume {older}" in err and "Traceback" not in err
    assert _digest(out) == before


def test_resume_with_other_flags_asks_for_the_same_flags(trained, tmp_path):
    run = Run(parse_args(RUN_FLAGS + ["--output", str(tmp_path / "o"), "--weighting", "uniform"]))
    run.build()
    newest = find_checkpoint("auto", trained)
    with pytest.raises(ResumeError) as info:
        run.load_checkpoint(newest)
    message = _one_line(info.value)
    assert "--weighting l2w (now uniform)" in message and "flags it was trained with" in message, message
    assert run.step == 0  # nothing was loaded
