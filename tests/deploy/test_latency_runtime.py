"""The torch-free runtime measures its own latency table (``EarlyExitRuntime.stage_latency``,
``timm-l2w-predict DIR --measure-latency``), and ``timm-l2w eval --latency-budget`` chooses a policy with a
table measured here (torch or onnx) or read from a file. No timing is asserted."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import timm
import torch

import timm_l2w
from tests.helpers import register_tiny, tiny_package
from timm_l2w.cli.eval import main as eval_main
from timm_l2w_runtime import EarlyExitRuntime
from timm_l2w_runtime.latency import check_latency_table, expected_latency_ms
from timm_l2w_runtime.policy import read_policy
from timm_l2w_runtime.predict import main as predict_main

TINY = register_tiny()


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return tiny_package(tmp_path_factory.mktemp("tiny"))


def test_the_runtime_times_its_own_stages_and_predicts_as_before(package):
    predictor, folder = package
    runtime = EarlyExitRuntime(folder, threads=1)
    x = np.random.default_rng(0).standard_normal((7, 1, 16, 16), dtype=np.float32)
    before = runtime.predict(x)
    table = runtime.stage_latency([4, 1], repeats=2, warmup=1, clock="process")
    check_latency_table(table, num_exits=3)
    assert table["target"] == "onnxruntime" and table["batch_sizes"] == [1, 4] and table["clock"] == "process"
    assert table["device"]["provider"] == "CPUExecutionProvider" and table["device"]["threads"] == 1
    assert table["input_size"] == [1, 16, 16] and table["rule"] == "confidence"
    assert min(map(min, table["stage_ms"])) > 0 and table["gather_ms"][0] == [0.0, 0.0]
    after = runtime.predict(x)  # the timing left the runtime as it was: its policy decides again
    assert np.array_equal(after.exit_index, before.exit_index) and len(set(after.exit_index.tolist())) > 1
    assert np.array_equal(after.exit_index, predictor.predict(torch.from_numpy(x)).exit_index.numpy())


def test_predict_measure_latency_prints_and_writes_the_table(package, tmp_path, capsys):
    out = tmp_path / "table.json"
    code = predict_main([str(package[1]), "--measure-latency", "--latency-batch-sizes", "1", "2",
                         "--latency-repeats", "1", "--threads", "1", "--latency-output", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "latency table (onnxruntime" in printed and "batch 2" in printed
    table = check_latency_table(json.loads(out.read_text()), num_exits=3)
    fractions = read_policy(package[1] / "policy.json")["calibration_exit_fractions"]
    assert f"{expected_latency_ms(table, fractions, 2):.4g} ms at batch 2" in printed
    assert table["rounds"] == 3 and "slowest of 3 rounds' medians of 1 runs" in printed  # the default rounds
    assert predict_main([str(package[1]), "--measure-latency", "--latency-rounds", "0"]) == 2
    assert "--latency-repeats, --latency-rounds and --threads must be integers >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:  # no images and no --measure-latency: argparse's usage error
        predict_main([str(package[1])])
    assert usage.value.code == 2
    assert "images (or --measure-latency)" in capsys.readouterr().err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model(TINY, num_classes=10)
    return timm_l2w.save_safetensors(model, tmp_path_factory.mktemp("ckpt") / "m.safetensors",
                                     metadata={"model": TINY})


def eval_args(checkpoint, out, *extra):
    return [str(checkpoint), "--dataset", "digits", "--input-size", "16", "--held-out", "60", "--output", str(out),
            "--no-progress", "--cpu", "--latency-repeats", "1", "--latency-threads", "1", *extra]


def test_eval_latency_budget_writes_a_policy_with_the_table_and_ms_beside_flops(checkpoint, tmp_path, capsys):
    assert eval_main(eval_args(checkpoint, tmp_path / "ev", "--latency-budget", "1000",
                               "--latency-batch-size", "3", "--latency-rounds", "2")) == 0
    printed = capsys.readouterr().out
    assert "latency table (torch" in printed and "budgeted, expected ms per image at batch 3" in printed
    assert "slowest of 2 rounds' medians of 1 runs" in printed
    policy = read_policy(tmp_path / "ev" / f"{TINY}_confidence_latency1000ms_batch3_policy.json")
    assert policy["budget"] == {"latency_ms": 1000.0, "batch_size": 3}
    assert policy["latency"]["batch_sizes"] == [1, 2, 3] and policy["latency"]["target"] == "torch"
    assert policy["latency"]["rounds"] == 2 and policy["latency"]["round_spread"] >= 0
    assert 0 < policy["expected_latency_ms"] <= 1000
    rows = list(csv.DictReader((tmp_path / "ev" / f"{TINY}_budgeted.csv").open()))
    assert len(rows) == 39 and all(float(r["expected_ms"]) > 0 and float(r["heldout_expected_ms"]) > 0 for r in rows)
    saved = json.loads((tmp_path / "ev" / f"{TINY}.json").read_text())
    assert saved["latency"] == policy["latency"] and saved["latency_batch_size"] == 3
    assert "expected_ms" in saved["budgeted"][0] and saved["num_test"] > 0  # the other entries are kept

    # a table measured elsewhere (the deployment machine), and a budget nothing fits
    table = dict(policy["latency"], device={"name": "the deployment machine"})
    (tmp_path / "table.json").write_text(json.dumps(table))
    assert eval_main(eval_args(checkpoint, tmp_path / "ev2", "--latency-budget", "1000", "--latency-batch-size", "3",
                               "--latency-table", str(tmp_path / "table.json"))) == 0
    policy = read_policy(tmp_path / "ev2" / f"{TINY}_confidence_latency1000ms_batch3_policy.json")
    assert policy["latency"]["device"] == {"name": "the deployment machine"}
    cheapest = min(float(r["heldout_expected_ms"]) for r in rows)
    assert eval_main(eval_args(checkpoint, tmp_path / "ev3", "--latency-budget", f"{cheapest / 100:g}",
                               "--latency-table", str(tmp_path / "table.json"))) == 2
    err = capsys.readouterr().err
    assert "timm-l2w eval: error: no exit distribution fits a budget of" in err and "raise the budget" in err


def test_eval_takes_exactly_one_budget_and_a_readable_table(checkpoint, tmp_path, capsys):
    assert eval_main(eval_args(checkpoint, tmp_path, "--latency-budget", "5", "--q", "1")) == 2
    assert "exactly one of --q" in capsys.readouterr().err
    assert eval_main(eval_args(checkpoint, tmp_path, "--latency-table", str(tmp_path / "none.json"))) == 2
    assert "pass --latency-budget MS with it" in capsys.readouterr().err
    assert eval_main(eval_args(checkpoint, tmp_path, "--latency-budget", "5", "--latency-table",
                               str(tmp_path / "none.json"))) == 2
    assert "latency table" in capsys.readouterr().err and not (tmp_path / f"{TINY}.json").exists()
    assert eval_main(eval_args(checkpoint, tmp_path, "--latency-budget", "0")) == 2
    assert "latency_budget must be > 0" in capsys.readouterr().err
    assert eval_main(eval_args(checkpoint, tmp_path, "--latency-budget", "5", "--latency-rounds", "0")) == 2
    assert "--latency-rounds must be >= 1, got 0" in capsys.readouterr().err
