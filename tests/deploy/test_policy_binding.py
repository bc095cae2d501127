"""A policy is bound to the weights it was calibrated on: its ``weights_sha256`` (timm_l2w.files.weights_digest)
must be the digest of the weights ``timm-l2w export`` ships (CLI and Python) and of the package the runtime loads
(the manifest's); a policy without a digest is used with a one-line warning. ``.pt2`` programs only with --pt2,
and the export says how far it got, stage by stage."""
from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import register_tiny, tiny_net
from timm_l2w.checkpoint import save_safetensors
from timm_l2w.cli.export import main as export_main
from timm_l2w.deploy import export_package
from timm_l2w.evaluation import ExitOutputs
from timm_l2w.files import load_state_dict, weights_digest
from timm_l2w.inference import EarlyExitPredictor
from timm_l2w_runtime import EarlyExitRuntime, PolicyError, PolicyWarning, check_policy, read_policy
from timm_l2w_runtime.predict import main as predict_main

SIZE = (3, 16, 16)
PREPROCESS = {"input_size": list(SIZE), "color": "RGB", "resize": "stretch", "mean": [0.5] * 3, "std": [0.25] * 3}


def _calibrated(model, q: float) -> EarlyExitPredictor:
    x = torch.rand(64, *SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        calibration = ExitOutputs.from_logits(model.eval().forward_exits(x), torch.zeros(64, dtype=torch.long))
    predictor = EarlyExitPredictor.from_distribution(model, calibration, q)
    predictor.preprocess = dict(PREPROCESS)
    return predictor


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two checkpoints of the same model (runs A and B), policies of each, and A's package exported by the CLI."""
    root = tmp_path_factory.mktemp("binding")
    name = register_tiny()
    models, files = {}, {}
    for run, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        models[run] = tiny_net(num_classes=10).eval()
        files[run] = save_safetensors(models[run], root / f"{run}.safetensors")
    policies = {"a": _calibrated(models["a"], 1.0).save(root / "a_policy.json"),
                "a_other_budget": _calibrated(models["a"], 0.5).save(root / "a_q0.5_policy.json"),
                "b": _calibrated(models["b"], 1.0).save(root / "b_policy.json")}
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = export_main([str(files["a"]), "--model", name, "--policy", str(policies["a"]),
                            "--output", str(root / "package")])
    assert code == 0, err.getvalue()
    return SimpleNamespace(root=root, name=name, models=models, files=files, policies=policies,
                           package=root / "package", stdout=out.getvalue(), stderr=err.getvalue())


def _export_cli(runs, checkpoint, policy, output, *flags):
    return export_main([str(checkpoint), "--model", runs.name, "--policy", str(policy), "--output", str(output),
                        *flags])


# ----------------------------------------------------------------------------- the digest


def test_the_digest_names_the_weights_not_their_layout():
    torch.manual_seed(0)
    model = tiny_net(num_classes=10)
    digest = weights_digest(model)
    assert len(digest) == 64 and digest == weights_digest(model.state_dict())
    assert weights_digest({f"module.{k}": v for k, v in model.state_dict().items()}) == digest  # DDP names
    assert weights_digest(tiny_net(num_classes=10)) != digest  # another initialisation
    assert weights_digest(model.to(memory_format=torch.channels_last)) == digest  # same values, other layout
    state = model.state_dict()
    first = next(k for k, v in state.items() if v.is_floating_point())
    changed = dict(state, **{first: state[first].clone(memory_format=torch.contiguous_format)})
    changed[first].view(-1)[0] += 1e-6
    assert weights_digest(changed) != digest
    assert weights_digest(dict(state, **{first: state[first].double()})) != digest  # dtype
    assert weights_digest(dict(state, **{first: state[first].reshape(-1)})) != digest  # shape
    assert weights_digest({"x": state[first]}) != weights_digest({"y": state[first]})  # names


def test_a_policy_records_the_digest_of_its_weights_and_load_keeps_it(runs):
    policy = read_policy(runs.policies["a"])
    assert policy["weights_sha256"] == weights_digest(runs.models["a"])
    assert policy["weights_sha256"] == weights_digest(load_state_dict(runs.files["a"]))  # the file's weights
    loaded = EarlyExitPredictor.load(runs.policies["b"], runs.models["a"])  # not checked here, but kept
    assert loaded.to_policy()["weights_sha256"] == weights_digest(runs.models["b"])
    bad = dict(policy, weights_sha256="abc")
    with pytest.raises(PolicyError, match="weights_sha256 must be a sha256 digest"):
        check_policy(bad)


# ----------------------------------------------------------------------------- export


def test_cli_export_refuses_a_policy_of_other_weights(runs, capsys):
    assert _export_cli(runs, runs.files["a"], runs.policies["b"], runs.root / "refused") == 2
    err = capsys.readouterr().err
    assert err.startswith("timm-l2w export: error: ") and len(err.strip().splitlines()) == 1
    a, b = weights_digest(runs.models["a"])[:12], weights_digest(runs.models["b"])[:12]
    assert f"calibrated on weights with sha256 {b}..., but the weights of a.safetensors have sha256 {a}..." in err
    assert "timm-l2w eval CHECKPOINT --q Q" in err and "pass the policy of this checkpoint" in err
    assert not (runs.root / "refused" / "manifest.json").exists()


def test_python_export_refuses_a_policy_of_other_weights(runs, tmp_path):
    foreign = read_policy(runs.policies["b"])
    with pytest.raises(PolicyError, match="calibrated on weights with sha256 .*, but the weights exported have"):
        export_package(runs.models["a"], tmp_path / "p1", foreign)
    predictor_b = _calibrated(runs.models["b"], 1.0)  # a predictor of run B, for A's weights
    with pytest.raises(PolicyError, match="but the weights of a.safetensors have"):
        export_package(runs.models["a"], tmp_path / "p2", predictor_b, checkpoint=runs.files["a"])
    assert not list(tmp_path.rglob("*.onnx"))


def test_cli_export_writes_the_digest_onnx_only_and_its_progress(runs):
    manifest = json.loads((runs.package / "manifest.json").read_text())
    assert manifest["weights_sha256"] == weights_digest(runs.models["a"]) == read_policy(
        runs.package / "policy.json")["weights_sha256"]
    assert manifest["checkpoint"] == "a.safetensors"  # the name, not the machine's path
    assert sorted(p.name for p in runs.package.glob("stage_*")) == [f"stage_{k}.onnx" for k in range(3)]
    assert all("pt2" not in stage for stage in manifest["stages"])
    lines = runs.stderr.splitlines()
    assert [line.split(" ...")[0] for line in lines] == [f"exporting stage {k}/3 (ONNX)" for k in (1, 2, 3)] + [
        "checking the 3 ONNX graphs against PyTorch (onnxruntime)"]
    assert all(line.endswith(" s") for line in lines) and f"wrote {runs.package}" in runs.stdout


def test_a_policy_without_digest_is_exported_with_a_warning_and_pt2_on_request(runs, tmp_path, capsys):
    doc = json.loads(Path(runs.policies["a"]).read_text())
    del doc["weights_sha256"]
    old = tmp_path / "old_policy.json"
    old.write_text(json.dumps(doc))
    out = tmp_path / "package"
    out.mkdir()
    (out / "stage_7.onnx").write_bytes(b"an earlier export's stage")
    assert _export_cli(runs, runs.files["a"], old, out, "--pt2", "--no-progress") == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if "warning" in line]
    assert len(warning) == 1 and warning[0].startswith("timm-l2w export: warning: ")
    assert "records no weights_sha256 (an older or hand-written policy): whether it was calibrated on the weights of " \
           "a.safetensors cannot be checked" in warning[0]
    assert "exporting stage" not in err  # --no-progress
    assert sorted(p.name for p in out.glob("stage_*")) == sorted(
        [f"stage_{k}.onnx" for k in range(3)] + [f"stage_{k}.pt2" for k in range(3)])  # the stale stage is gone
    manifest = json.loads((out / "manifest.json").read_text())
    assert [stage["pt2"] for stage in manifest["stages"]] == [f"stage_{k}.pt2" for k in range(3)]
    assert manifest["weights_sha256"] == weights_digest(runs.models["a"])
    assert "weights_sha256" not in read_policy(out / "policy.json")  # shipped as it came: still unchecked

    with pytest.warns(PolicyWarning, match="cannot be checked"):  # the Python API: a warning
        export_package(runs.models["a"], tmp_path / "python", doc, verify=False)


# ----------------------------------------------------------------------------- runtime


def test_runtime_refuses_a_policy_of_other_weights_and_takes_one_of_the_same(runs):
    with pytest.raises(PolicyError, match=r"b_policy\.json was calibrated on weights with sha256 .*, but the weights "
                                          r"of .*package \(exported from a\.safetensors\) have sha256"):
        EarlyExitRuntime(runs.package, policy=runs.policies["b"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # checked: no warning
        own = EarlyExitRuntime(runs.package)
        other_budget = EarlyExitRuntime(runs.package, policy=runs.policies["a_other_budget"])
    assert own.policy["budget"] == {"q": 1.0} and other_budget.policy["budget"] == {"q": 0.5}


def test_runtime_warns_when_it_cannot_check(runs, tmp_path, capsys):
    doc = json.loads(Path(runs.policies["a_other_budget"]).read_text())
    del doc["weights_sha256"]
    (tmp_path / "old_policy.json").write_text(json.dumps(doc))
    with pytest.warns(PolicyWarning, match="old_policy.json records no weights_sha256"):
        EarlyExitRuntime(runs.package, policy=tmp_path / "old_policy.json")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "image.png")
    assert predict_main([str(runs.package), str(tmp_path / "image.png"), "--policy", str(tmp_path / "old_policy.json"),
                         "--output", str(tmp_path / "predictions.csv")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("timm-l2w predict: warning: ") and "cannot be checked" in err[0]
    old_package = tmp_path / "old_package"  # exported before manifests recorded the digest
    old_package.mkdir()
    for file in runs.package.iterdir():
        (old_package / file.name).write_bytes(file.read_bytes())
    manifest = json.loads((old_package / "manifest.json").read_text())
    del manifest["weights_sha256"]
    (old_package / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(PolicyWarning, match="a package exported by an older timm_l2w.*export the package again"):
        EarlyExitRuntime(old_package, policy=runs.policies["b"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EarlyExitRuntime(old_package)  # its own policy: checked (or warned about) when it was exported
