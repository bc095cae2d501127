"""Deploy: exported stages + the onnxruntime runtime give EarlyExitPredictor's decisions without PyTorch.

One export per model family (module-scoped): MSDNet (list of multi-scale maps as the state), RANet
(a dict of an image pyramid and flow outputs, partly passed on unchanged) and a wrapped timm
backbone (one tensor). The runtime runs in a subprocess where importing torch fails.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch

import timm_l2w  # noqa: F401  (registers the models)
from timm_l2w.deploy import export_package
from timm_l2w.evaluation import ExitOutputs
from timm_l2w.exits import RULES, exit_confidence, exit_rule
from timm_l2w.inference import EarlyExitPredictor
from timm_l2w.models.base import MultiExitModel
from timm_l2w.preprocessing import preprocess_from_loader
from timm_l2w_runtime import EarlyExitRuntime, PackageError, PolicyError, preprocess_image, read_policy
from timm_l2w_runtime import rules as numpy_rules

SIZE = (3, 32, 32)
MODELS = {
    "msdnet": ("msdnet_l2w_cifar_tiny", dict(n_blocks=3)),
    "ranet": ("ranet_l2w_cifar", dict(scale_list=(1, 2, 3), gr_factor=(2, 1, 1), bn_factor=(2, 1, 1), growth_rate=2,
                                      num_channels=4, step=1, head_width=8, num_blocks=1, block_step=1)),
    "wrapper": ("resnet18_l2w", {}),
}
# three budgets of the paper's family for the confidence rule, and the other two rules
POLICIES = [("confidence", 0.5), ("confidence", 1.0), ("confidence", 2.0), ("entropy", 1.0), ("patience", 2)]

RUNTIME_SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["torch"] = None  # any import of torch now raises ImportError
    import numpy as np
    from timm_l2w_runtime import EarlyExitRuntime
    package, data, out = sys.argv[1:4]
    policies = sys.argv[4:]
    x = np.load(data)
    results = {}
    for i, policy in enumerate(policies):
        runtime = EarlyExitRuntime(package, policy=policy, threads=1)
        for batch in (64, 1):
            r = runtime.predict(x, batch_size=batch)
            results.update({f"{i}_{batch}_pred": r.predictions, f"{i}_{batch}_exit": r.exit_index,
                            f"{i}_{batch}_conf": r.confidences})
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "timm_l2w", "timm") and sys.modules[m])
    assert not leaked, f"the runtime imported {leaked}"
    np.savez(out, **results)
""")


def _predictor(model, calibration: ExitOutputs, rule: str, budget) -> EarlyExitPredictor:
    if not exit_rule(rule).calibrated:
        return EarlyExitPredictor(model, rule=rule, patience=budget)
    return EarlyExitPredictor.from_distribution(model, calibration, budget, rule=rule)


def _export(kind: str, root: Path) -> SimpleNamespace:
    """A model, its package (first policy inside), every policy as a file and the test images."""
    name, kwargs = MODELS[kind]
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = timm.create_model(name, num_classes=10, **kwargs).eval()
    gen = torch.Generator().manual_seed(1)
    calib_x, test_x = torch.randn(96, *SIZE, generator=gen), torch.randn(64, *SIZE, generator=gen)
    with torch.no_grad():
        calibration = ExitOutputs.from_logits(model.forward_exits(calib_x), torch.zeros(96, dtype=torch.long))
    predictors = [_predictor(model, calibration, rule, budget) for rule, budget in POLICIES]
    policy_files = [predictor.save(root / f"policy_{i}.json", input_size=SIZE)
                    for i, predictor in enumerate(predictors)]
    package = export_package(model, root / "package", predictors[0], input_size=SIZE, pt2=kind == "msdnet")
    torch.set_num_threads(threads)
    return SimpleNamespace(kind=kind, model=model, package=package, predictors=predictors, policies=policy_files,
                           test_x=test_x, root=root, calibration=calibration)


@pytest.fixture(scope="module")
def msdnet_package(tmp_path_factory):
    return _export("msdnet", tmp_path_factory.mktemp("msdnet"))


@pytest.fixture(scope="module")
def ranet_package(tmp_path_factory):
    return _export("ranet", tmp_path_factory.mktemp("ranet"))


@pytest.fixture(scope="module")
def wrapper_package(tmp_path_factory):
    return _export("wrapper", tmp_path_factory.mktemp("wrapper"))


@pytest.fixture(params=list(MODELS))
def exported(request):
    """Each model family's package in turn (exported once per test module)."""
    return request.getfixturevalue(f"{request.param}_package")


def test_runtime_without_torch_equals_early_exit_predictor(exported):
    data, out = exported.root / "test_x.npy", exported.root / "runtime.npz"
    np.save(data, exported.test_x.numpy())
    proc = subprocess.run([sys.executable, "-c", RUNTIME_SCRIPT, str(exported.package), str(data), str(out),
                           *map(str, exported.policies)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = np.load(out)
    seen_exits = set()
    for i, predictor in enumerate(exported.predictors):
        want = predictor.predict(exported.test_x)
        for batch in (64, 1):
            where = f"{exported.kind}, policy {POLICIES[i]}, batch {batch}"
            np.testing.assert_array_equal(got[f"{i}_{batch}_exit"], want.exit_index.numpy(), err_msg=where)
            np.testing.assert_array_equal(got[f"{i}_{batch}_pred"], want.predictions.numpy(), err_msg=where)
            np.testing.assert_allclose(got[f"{i}_{batch}_conf"], want.confidences.numpy(), atol=1e-5, err_msg=where)
        seen_exits |= set(want.exit_index.tolist())
        if i < 3:  # the three budgets send samples to several exits (a real early exit at batch > 1)
            assert len(set(want.exit_index.tolist())) > 1, POLICIES[i]
    assert len(seen_exits) == exported.predictors[0].num_exits


def test_the_two_rule_registries_are_twins():
    """Every exit rule exists on both sides (torch, numpy) with the same parameter, and the runtime test above
    exports a policy of each."""
    assert tuple(RULES) == numpy_rules.EXIT_RULES and {rule for rule, _ in POLICIES} == set(RULES)
    for name, rule in RULES.items():
        twin = numpy_rules.exit_rule(name)
        assert (twin.name, twin.parameter) == (rule.name, rule.parameter)
    with pytest.raises(ValueError, match="unknown exit rule"):
        numpy_rules.exit_rule("margin")


@pytest.mark.parametrize("name", list(RULES))
def test_the_two_rules_decide_alike_stage_by_stage(name):
    """Each registered rule and its numpy twin leave the same samples at every exit, memory and cuts included."""
    gen = torch.Generator().manual_seed(3)
    num_exits, n = 4, 200
    logits = torch.randn(num_exits, n, 5, generator=gen) * torch.linspace(0.5, 3, num_exits)[:, None, None]
    logits[1:, : n // 2] = logits[:1, : n // 2]  # half the samples agree at every exit (patience)
    rule, twin = RULES[name], numpy_rules.exit_rule(name)
    if rule.calibrated:
        signal = ExitOutputs.from_logits(list(logits), torch.zeros(n, dtype=torch.long)).signal(rule)
        params = rule.calibrate(signal, [[0.3, 0.3, 0.2, 0.2]])[0].tolist()
    else:
        params = 2
    memory = twin_memory = None
    active = torch.arange(n)
    for k in range(num_exits - 1):
        z = logits[k, active]
        conf, pred = exit_confidence(z)
        leave, memory = rule.leave(k, z, conf, pred, params, memory)
        np_conf, np_pred = numpy_rules.exit_confidence(z.numpy())
        np_leave, twin_memory = twin.leave(k, z.numpy(), np_conf, np_pred, params, twin_memory)
        np.testing.assert_array_equal(np_leave, leave.numpy(), err_msg=f"{name}, exit {k}")
        stay = ~leave
        memory, twin_memory = rule.keep(memory, stay), twin.keep(twin_memory, np.flatnonzero(stay.numpy()))
        active = active[stay]
    assert 0 < len(active) < n // 2, name  # real decisions: most samples left early, some reached the last exit


def test_manifest_describes_the_stage_graphs(exported):
    manifest = json.loads((exported.package / "manifest.json").read_text())
    assert manifest["num_exits"] == exported.model.num_exits and manifest["input_size"] == list(SIZE)
    assert manifest["stages"][0]["inputs"] == ["image"]
    for k, stage in enumerate(manifest["stages"]):
        assert stage["outputs"][-1] == stage["logits"] == f"logits{k}"
        for name in stage["outputs"]:
            assert manifest["tensors"][name]["shape"][0] == "batch"
    if exported.kind == "ranet":  # the image pyramid is passed on without being a graph output again
        passed = [n for s in manifest["stages"][1:] for n in s.get("state", []) if n not in s["outputs"]]
        assert passed and all(n.startswith("state0_") for n in passed)
        assert "['starts']" in manifest["tensors"][passed[0]]["path"]
    assert manifest["verified_max_relative_difference"] < 1e-4


def test_pt2_programs_run_the_stages(msdnet_package):
    exported = msdnet_package  # the .pt2 programs are exported for this package only (to keep the tests fast)
    manifest = json.loads((exported.package / "manifest.json").read_text())
    x = exported.test_x[:5]
    with torch.no_grad():
        want = exported.model.forward_exits(x)
        state = {"image": x}
        for k, stage in enumerate(manifest["stages"]):
            program = torch.export.load(str(exported.package / stage["pt2"])).module()
            outputs = dict(zip(stage["outputs"], program(*[state[n] for n in stage["pt2_inputs"]])))
            torch.testing.assert_close(outputs[stage["logits"]], want[k], atol=1e-5, rtol=1e-5)
            state = {n: outputs.get(n, state.get(n)) for n in stage.get("state", [])}


def test_policy_round_trip(exported, tmp_path):
    model = exported.model
    for i, predictor in enumerate(exported.predictors):
        predictor.class_names = [f"class {c}" for c in range(10)]
        path = predictor.save(tmp_path / f"p{i}.json", input_size=SIZE)
        loaded = EarlyExitPredictor.load(path, model)
        assert (loaded.rule, loaded.patience, loaded.budget) == (predictor.rule, predictor.patience, predictor.budget)
        if predictor.thresholds is None:
            assert loaded.thresholds is None
        else:
            assert torch.equal(loaded.thresholds, predictor.thresholds)  # exact, infinities included
            assert math.isinf(float(loaded.thresholds[-1]))
        assert loaded.class_names == predictor.class_names and loaded.flops_input_size == SIZE
        assert loaded.preprocess == read_policy(path)["preprocess"] and len(loaded.flops) == model.num_exits
        assert torch.equal(loaded.predict(exported.test_x).exit_index, predictor.predict(exported.test_x).exit_index)
        predictor.class_names = None


@pytest.mark.parametrize("rule", ["confidence", "patience"])
def test_flops_budget_policy_records_its_budget(msdnet_package, rule, tmp_path):
    model, calibration = msdnet_package.model, msdnet_package.calibration
    flops = timm_l2w.exit_flops(model, SIZE)
    budget = 0.5 * (flops[0] + flops[-1])
    predictor = EarlyExitPredictor.from_flops_budget(model, calibration, flops, budget, rule=rule)
    policy = read_policy(predictor.save(tmp_path / "policy.json"))
    assert policy["budget"] == {"flops": budget} and policy["flops"] == list(flops)
    assert policy["flops_input_size"] == list(SIZE) == policy["preprocess"]["input_size"]
    assert flops[0] <= policy["expected_flops"] <= budget
    assert math.isclose(sum(policy["calibration_exit_fractions"]), 1.0)
    assert (policy["patience"] is not None) == (rule == "patience")


def test_damaged_package_is_a_clear_error(msdnet_package, tmp_path):
    exported = msdnet_package
    bad = tmp_path / "bad"
    shutil.copytree(exported.package, bad)
    (bad / "stage_1.onnx").unlink()
    with pytest.raises(PackageError, match=r"stage 1 is missing: .*stage_1\.onnx does not exist"):
        EarlyExitRuntime(bad)
    shutil.copy(exported.package / "stage_1.onnx", bad / "stage_1.onnx")
    (bad / "stage_2.onnx").write_bytes((exported.package / "stage_2.onnx").read_bytes()[:500])
    with pytest.raises(PackageError, match="stage 2 .* is not a loadable ONNX graph"):
        EarlyExitRuntime(bad)
    (bad / "manifest.json").unlink()
    with pytest.raises(PackageError, match="holds no manifest.json"):
        EarlyExitRuntime(bad)
    with pytest.raises(PackageError, match="does not exist"):
        EarlyExitRuntime(tmp_path / "nowhere")


def test_policy_for_another_model_is_a_clear_error(msdnet_package, tmp_path):
    exported = msdnet_package
    other = timm.create_model("msdnet_l2w_cifar_tiny", num_classes=10, n_blocks=4)
    foreign = EarlyExitPredictor(other, rule="patience", patience=2).save(tmp_path / "foreign.json", input_size=SIZE)
    with pytest.raises(PolicyError, match="has 4 exits, this model 3"):
        EarlyExitRuntime(exported.package, policy=foreign)
    with pytest.raises(PolicyError, match="has 4 exits, this model 3"):
        EarlyExitPredictor.load(foreign, exported.model)
    renamed = json.loads(Path(exported.policies[0]).read_text())
    renamed["model"] = "ranet_l2w_cifar"
    (tmp_path / "renamed.json").write_text(json.dumps(renamed))
    with pytest.raises(PolicyError, match="calibrated for ranet_l2w_cifar, not msdnet_l2w_cifar_tiny"):
        EarlyExitRuntime(exported.package, policy=tmp_path / "renamed.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(PolicyError, match="not readable JSON"):
        EarlyExitRuntime(exported.package, policy=tmp_path / "junk.json")
    runtime = EarlyExitRuntime(exported.package)
    with pytest.raises(ValueError, match=r"expected a non-empty image batch \[N, 3, 32, 32\]"):
        runtime.predict(np.zeros((2, 3, 16, 16), dtype=np.float32))


class DictStateModel(MultiExitModel):
    """Only the contract: a dict state holding the image (passed on unchanged), one tensor under two keys
    and a number that is not a tensor."""

    num_exits, num_classes, in_chans = 3, 4, 3

    def __init__(self):
        super().__init__()
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(3, 3, 3, padding=1) for _ in range(3))
        self.heads = torch.nn.ModuleList(torch.nn.Linear(3, 4) for _ in range(3))

    def forward_stage(self, index, state):
        if index == 0:
            state = {"image": state, "x": state, "scale": 2.0}
        x = (torch.relu(self.convs[index](state["x"])) * state["scale"]
             + state["image"].mean(dim=(1, 2, 3))[:, None, None, None])
        state = {"image": state["image"], "x": x, "same": x, "scale": state["scale"]}
        return state, self.heads[index](x.mean(dim=(2, 3)))


def test_any_model_meeting_the_contract_exports(tmp_path):
    model = DictStateModel().eval()
    x = torch.randn(40, *SIZE)
    with torch.no_grad():
        calibration = ExitOutputs.from_logits(model.forward_exits(x), torch.zeros(40, dtype=torch.long))
    predictor = EarlyExitPredictor.from_distribution(model, calibration, 0.8)
    package = export_package(model, tmp_path / "package", predictor, input_size=SIZE, pt2=False)
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["stages"][1]["inputs"] == ["image", "state0_0"]  # the shared tensor goes in once
    assert manifest["stages"][1]["outputs"] == ["state1_0", "logits1"]  # the image is passed on, not output
    got, want = EarlyExitRuntime(package).predict(x[:17].numpy()), predictor.predict(x[:17])
    np.testing.assert_array_equal(got.exit_index, want.exit_index.numpy())
    np.testing.assert_array_equal(got.predictions, want.predictions.numpy())
    assert len(set(want.exit_index.tolist())) > 1


# every registered model at a small input size it accepts (the ImageNet MSDNets / RANet at 160 px)
REGISTERED = {"vit_tiny_l2w": ({"img_size": 32}, 32), "convnext_atto_l2w": ({}, 64),
              "multi_exit_l2w": ({"backbone": "test_efficientnet"}, 32), "msdnet_l2w": ({}, 160),
              "msdnet_l2w_step6": ({}, 160), "msdnet_l2w_step7": ({}, 160), "ranet_l2w": ({}, 160)}


@pytest.mark.slow
@pytest.mark.parametrize("name", timm.list_models("*l2w*"))
def test_every_registered_model_exports(name, tmp_path):
    """Long (about 15 minutes on 2 cores); the default tests cover the three state layouts."""
    kwargs, side = REGISTERED.get(name, ({}, 32))
    model = timm.create_model(name, num_classes=10, **kwargs).eval()
    size = (3, side, side)
    calib_x, test_x = torch.randn(16, *size), torch.randn(12, *size)
    with torch.no_grad():
        calibration = ExitOutputs.from_logits(model.forward_exits(calib_x), torch.zeros(16, dtype=torch.long))
    predictor = EarlyExitPredictor.from_distribution(model, calibration, 1.0)
    package = export_package(model, tmp_path / "package", predictor, input_size=size, pt2=False)
    got, want = EarlyExitRuntime(package).predict(test_x.numpy()), predictor.predict(test_x)
    np.testing.assert_array_equal(got.exit_index, want.exit_index.numpy())
    np.testing.assert_array_equal(got.predictions, want.predictions.numpy())


# ----------------------------------------------------------------------------- preprocessing


def test_stretch_preprocessing_matches_the_builtin_data_sets():
    from PIL import Image

    from timm_l2w.data import create_eval_loaders

    _, test_loader, info = create_eval_loaders("digits", batch_size=8, input_size=32)
    pre = preprocess_from_loader(test_loader, info["input_size"])
    assert pre["resize"] == "stretch" and pre["color"] == "L" and pre["input_size"] == [3, 32, 32]
    images = np.random.default_rng(0).integers(0, 256, size=(4, 1, 8, 11), dtype=np.uint8)
    want = test_loader.collate_fn.transform(torch.from_numpy(images)).numpy()
    got = np.stack([preprocess_image(Image.fromarray(img[0]), pre) for img in images])
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("crop_pct, interpolation, shape", [(0.875, "bilinear", (45, 37)), (1.0, "bicubic", (30, 64))])
def test_shorter_side_preprocessing_matches_timm_eval_transform(crop_pct, interpolation, shape):
    from PIL import Image
    from timm.data import create_transform

    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    transform = create_transform(32, is_training=False, crop_pct=crop_pct, interpolation=interpolation,
                                 mean=mean, std=std)
    loader = SimpleNamespace(collate_fn=None, dataset=SimpleNamespace(transform=transform))
    pre = preprocess_from_loader(loader, SIZE)
    assert pre["resize"] == "shorter_side" and pre["resize_size"] == math.floor(32 / crop_pct)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, size=(*shape, 3), dtype=np.uint8))
    np.testing.assert_allclose(preprocess_image(img, pre), transform(img).numpy(), atol=1e-5)


# ----------------------------------------------------------------------------- command line


def test_train_eval_export_predict_from_the_command_line(tmp_path, capsys):
    """The user's path: train, `eval --q` writes the policy, `export`, `predict` (torch-free) on image files."""
    from PIL import Image
    from safetensors import safe_open

    from timm_l2w.cli.eval import main as eval_main
    from timm_l2w.cli.export import main as export_main
    from timm_l2w.cli.train import main as train_main
    from timm_l2w.data import create_eval_loaders

    run, ev, package = tmp_path / "run", tmp_path / "eval", tmp_path / "package"
    assert train_main(["--model", "msdnet_l2w_cifar_tiny", "--model-kwargs", "n_blocks=2", "--dataset", "digits",
                       "--weighting", "uniform", "--max-steps", "3", "--batch-size", "32", "--no-eval", "--no-progress",
                       "--output", str(run)]) == 0
    checkpoint = run / "model.safetensors"
    with safe_open(str(checkpoint), framework="pt") as f:
        assert json.loads(f.metadata()["class_names"]) == [str(d) for d in range(10)]
    assert eval_main([str(checkpoint), "--dataset", "digits", "--q", "0.5", "--output", str(ev), "--no-progress"]) == 0
    policy = ev / "msdnet_l2w_cifar_tiny_confidence_q0.5_policy.json"
    doc = read_policy(policy)
    assert doc["budget"] == {"q": 0.5} and doc["class_names"][3] == "3" and doc["preprocess"]["resize"] == "stretch"
    assert export_main([str(checkpoint), "--policy", str(policy), "--output", str(package)]) == 0
    assert not list(package.glob("*.pt2"))  # ONNX only unless --pt2

    _, test_loader, _ = create_eval_loaders("digits", batch_size=40, input_size=32)
    raw = (test_loader.dataset.images[:40, 0] * 255).round().to(torch.uint8)  # digits as 8x8 PNG files
    files = []
    for i, img in enumerate(raw.numpy()):
        files.append(tmp_path / "images" / f"{i:02d}.png")
        files[-1].parent.mkdir(exist_ok=True)
        Image.fromarray(img).save(files[-1])
    csv_path = tmp_path / "predictions.csv"
    script = ("import sys; sys.modules['torch'] = None; from timm_l2w_runtime.predict import main; "
              "sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", script, str(package), str(tmp_path / "images"), "--output",
                           str(csv_path), "--batch-size", "16"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "40 images, rule confidence" in proc.stdout
    rows = list(__import__("csv").DictReader(csv_path.open()))
    assert [Path(r["file"]).name for r in rows] == [f.name for f in files]

    model = timm.create_model("msdnet_l2w_cifar_tiny", num_classes=10, n_blocks=2)
    model.load_state_dict(timm_l2w.load_state_dict(checkpoint))
    want = EarlyExitPredictor.load(policy, model).predict(test_loader.collate_fn.transform(raw[:, None]))
    assert [int(r["exit"]) - 1 for r in rows] == want.exit_index.tolist()
    assert [int(r["prediction"]) for r in rows] == want.predictions.tolist()
    assert [r["label"] for r in rows] == [str(p) for p in want.predictions.tolist()]


@pytest.mark.parametrize("flags, message", [
    (["--q", "0.5", "--flops-budget", "1e6"], "pass exactly one of --q"),
    (["--q", "0.5", "--exit-rule", "patience"], "pass --flops-budget F"),
    (["--q", "-1"], "q"),
])
def test_eval_policy_flags_are_checked_first(flags, message, capsys):
    from timm_l2w.cli.eval import main as eval_main

    assert eval_main(["--model", "msdnet_l2w_cifar_tiny", "--output", "unused", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_predict_command_errors_are_messages(tmp_path, capsys):
    from timm_l2w_runtime.predict import main as predict_main

    assert predict_main([str(tmp_path / "missing"), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "timm-l2w predict: error: package folder" in err and "Traceback" not in err
