"""Anytime and budgeted evaluation: checked against a plain per-sample loop of the procedure in docs/method.md §6."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from timm_l2w.evaluation import (
    ExitOutputs,
    anytime_metrics,
    budgeted_evaluation,
    collect_exit_outputs,
    evaluate_checkpoint,
    save_results,
)
from timm_l2w.exits import exit_distribution, paper_distributions


def reference_budgeted(heldout: ExitOutputs, test: ExitOutputs, p, flops):
    """docs/method.md §6 (budgeted evaluation), one sample at a time with Python lists.

    The specification, not the code.
    """
    ch, ct = heldout.confidences.tolist(), test.confidences.tolist()
    n, K = len(ch), len(ch[0])
    T = [math.inf] * K
    T[-1] = -math.inf
    exited = [False] * n
    for k in range(K - 1):
        count = math.floor(n * float(p[k]))
        walk = sorted((i for i in range(n) if not exited[i]), key=lambda i: -ch[i][k])
        if count == 0 or count > len(walk):
            continue
        T[k] = ch[walk[count - 1]][k]
        for i in range(n):
            if ch[i][k] >= T[k]:
                exited[i] = True

    def run(conf, outputs):
        exits = []
        for i in range(len(conf)):
            for k in range(K):
                if k == K - 1 or conf[i][k] >= T[k]:
                    exits.append(k)
                    break
        correct = outputs.correct.tolist()
        acc = 100.0 * sum(correct[i][e] for i, e in enumerate(exits)) / len(exits)
        fractions = [exits.count(k) / len(exits) for k in range(K)]
        return acc, sum(f * fl for f, fl in zip(fractions, flops)), fractions

    return T, run(ct, test), run(ch, heldout)


def random_outputs(n: int, K: int, C: int, g: torch.Generator, ties: bool) -> ExitOutputs:
    logits = [torch.randn(n, C, generator=g) * (k + 1) for k in range(K)]
    if ties:  # many equal confidences within and across samples
        logits = [(lg * 2).round() / 2 for lg in logits]
    return ExitOutputs.from_logits(logits, torch.randint(0, C, (n,), generator=g))


@pytest.mark.parametrize("K", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("ties", [False, True])
def test_budgeted_matches_reference_loop(K, ties):
    g = torch.Generator().manual_seed(10 * K + ties)
    heldout = random_outputs(37, K, 5, g, ties)
    test = random_outputs(23, K, 5, g, ties)
    flops = [10.0 * (k + 1) ** 1.5 for k in range(K)]
    dists = torch.cat([paper_distributions(K)[::6], exit_distribution(0.3, K)[None]])
    if K > 1:  # a budget where floor(n * p_k) = 0 at exit 1 (+inf threshold, nobody leaves there)
        zero_first = torch.full((K,), 1.0 / (K - 1), dtype=torch.float64)
        zero_first[0] = 0.01
        dists = torch.cat([dists, (zero_first / zero_first.sum())[None]])
    res = budgeted_evaluation(heldout, test, flops, dists)
    assert len(res) == dists.shape[0]
    for b, p in enumerate(dists):
        T, (acc, eflops, frac), (h_acc, h_flops, h_frac) = reference_budgeted(heldout, test, p, flops)
        assert res.thresholds[b].tolist() == T
        assert res.test_top1[b].item() == pytest.approx(acc, abs=1e-9)
        assert res.expected_flops[b].item() == pytest.approx(eflops, rel=1e-12)
        assert res.test_exit_fractions[b].tolist() == pytest.approx(frac, abs=1e-12)
        assert res.heldout_top1[b].item() == pytest.approx(h_acc, abs=1e-9)
        assert res.heldout_expected_flops[b].item() == pytest.approx(h_flops, rel=1e-12)
        assert res.heldout_exit_fractions[b].tolist() == pytest.approx(h_frac, abs=1e-12)
    if K > 1:
        assert res.thresholds[-1, 0] == math.inf and res.test_exit_fractions[-1, 0] == 0


def test_default_is_the_papers_39_budgets():
    g = torch.Generator().manual_seed(0)
    heldout, test = random_outputs(200, 5, 10, g, False), random_outputs(100, 5, 10, g, False)
    res = budgeted_evaluation(heldout, test, [1, 2, 3, 4, 5])
    assert len(res) == 39 and res.q[14].item() == pytest.approx(0.75)
    # back-loading the exits (larger q) costs more on the held-out set
    assert (res.heldout_expected_flops[1:] >= res.heldout_expected_flops[:-1] - 1e-9).all()
    rows = res.rows()
    assert rows[0]["budget"] == 1 and set(rows[0]) >= {"test_top1", "expected_flops", "threshold_5", "test_fraction_1"}


def test_outputs_and_anytime_metrics():
    logits = [torch.tensor([[3.0, 1, 0, 0, 0, 0], [-1, 0.1, 0.2, 0.3, 0.4, 5]]),
              torch.tensor([[0.5, 2, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]])]
    targets = torch.tensor([0, 0])
    out = ExitOutputs.from_logits(logits, targets)
    assert out.predictions.tolist() == [[0, 1], [5, 0]]
    assert out.top5.tolist() == [[True, True], [False, True]]  # target 0 is the lowest of 6 logits once
    assert out.confidences[0, 0].item() == pytest.approx(torch.softmax(logits[0][0], 0).max().item())
    rows = anytime_metrics(out, [1.0, 2.0])
    assert [r["top1"] for r in rows] == [50.0, 50.0]
    expected_loss = torch.nn.functional.cross_entropy(logits[1], targets).item()
    assert rows[1]["loss"] == pytest.approx(expected_loss) and rows[1]["flops"] == 2.0


def test_collect_matches_full_forward(tiny_model):
    x, y = torch.randn(10, 1, 8, 8), torch.randint(0, 4, (10,))
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    out = collect_exit_outputs(tiny_model, loader)
    tiny_model.eval()
    with torch.no_grad():
        direct = ExitOutputs.from_logits(tiny_model.forward_exits(x), y)
    assert torch.allclose(out.confidences, direct.confidences, atol=1e-6)
    assert torch.equal(out.targets, y) and out.num_exits == 3 and out.num_samples == 10


def test_bad_inputs():
    g = torch.Generator().manual_seed(0)
    a3, a2 = random_outputs(10, 3, 4, g, False), random_outputs(10, 2, 4, g, False)
    with pytest.raises(ValueError, match="same model"):
        budgeted_evaluation(a3, a2, [1, 2])
    with pytest.raises(ValueError, match="one cumulative value per exit"):
        budgeted_evaluation(a3, a3, [1, 2])
    with pytest.raises(ValueError, match="strictly increasing"):
        budgeted_evaluation(a3, a3, [1, 3, 2])
    with pytest.raises(ValueError, match="empty"):
        ExitOutputs(*(torch.zeros(0, 3) for _ in range(4)), torch.zeros(0))
    with pytest.raises(ValueError, match="no batches"):
        collect_exit_outputs(torch.nn.Linear(2, 2), [])
    with pytest.raises(ValueError, match="sum to 1"):
        budgeted_evaluation(a3, a3, [1, 2, 3], [[0.5, 0.5, 0.5]])
    with pytest.raises(TypeError, match="ExitOutputs"):
        budgeted_evaluation(a3.confidences, a3, [1, 2, 3])
    with pytest.raises(ValueError, match="targets must be"):
        ExitOutputs.from_logits([torch.zeros(3, 4)], torch.zeros(3, 4))


def test_save_results_and_plot(tmp_path):
    g = torch.Generator().manual_seed(1)
    heldout, test = random_outputs(50, 3, 4, g, False), random_outputs(40, 3, 4, g, False)
    res = budgeted_evaluation(heldout, test, [1e6, 2e6, 3e6])
    anytime = anytime_metrics(test, [1e6, 2e6, 3e6])
    paths = save_results(tmp_path, anytime, res, name="m", extra={"model": "tiny"})
    with open(paths["budgeted_csv"]) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 39 and float(rows[3]["test_top1"]) == pytest.approx(res.test_top1[3].item())
    assert rows[0]["threshold_3"] == "-inf"
    data = json.loads(paths["json"].read_text())  # strict JSON: no bare Infinity
    assert data["model"] == "tiny" and data["budgeted"][0]["threshold_3"] == "-inf"
    assert data["anytime"][2]["top1"] == pytest.approx(anytime[2]["top1"])
    from timm_l2w.evaluation import plot_budgeted

    png = plot_budgeted({"a": res, "b": res.rows()[::2]}, tmp_path / "p.png", anytime={"a": anytime})
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_evaluate_checkpoint_end_to_end(tiny_model, tmp_path):
    from safetensors.torch import save_file

    ckpt = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, str(ckpt))
    fresh = type(tiny_model)()
    x, y = torch.randn(24, 1, 8, 8), torch.randint(0, 4, (24,))
    held = DataLoader(TensorDataset(x[:12], y[:12]), batch_size=5)
    test = DataLoader(TensorDataset(x[12:], y[12:]), batch_size=5)
    result = evaluate_checkpoint(fresh, held, test, checkpoint=ckpt, out_dir=tmp_path / "out", name="tiny")
    assert torch.equal(fresh.blocks[0][0].weight, tiny_model.blocks[0][0].weight)
    assert len(result["budgeted"]) == 39 and len(result["anytime"]) == 3
    assert result["flops"][0] < result["flops"][1] < result["flops"][2]
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"tiny_anytime.csv", "tiny_budgeted.csv", "tiny.json",
                                                              "tiny.png"}


def test_cli_eval_on_digits(tmp_path, monkeypatch, capsys):
    """`timm-l2w eval` on built-in digits: loads the checkpoint, writes the tables and the plot."""
    import timm
    from safetensors.torch import save_file

    from tests.helpers import TinyMultiExit
    from timm_l2w.cli import main as cli_main

    trained = TinyMultiExit(num_exits=3, num_classes=10, in_chans=3)
    ckpt = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(ckpt))
    made = {}

    def create_model(name, **kwargs):
        made.update(kwargs, name=name)
        made["model"] = TinyMultiExit(num_exits=3, **kwargs)
        return made["model"]

    monkeypatch.setattr(timm, "create_model", create_model)
    out = tmp_path / "res"
    rc = cli_main(["eval", str(ckpt), "--model", "tiny", "--dataset", "digits", "--img-size", "8",
                   "--output", str(out), "--device", "cpu", "--no-progress"])
    assert rc == 0 and made["num_classes"] == 10 and made["in_chans"] == 3
    assert torch.equal(made["model"].heads[2][2].weight, trained.heads[2][2].weight)
    assert "budgeted: best test top1" in capsys.readouterr().out
    data = json.loads((out / "tiny.json").read_text())
    assert len(data["budgeted"]) == 39 and len(data["anytime"]) == 3
    assert (out / "tiny.png").exists() and (out / "tiny_budgeted.csv").exists()


def test_checkpoint_that_does_not_fit(tiny_model, tmp_path):
    from safetensors.torch import save_file

    ckpt = tmp_path / "other.safetensors"
    save_file({"blocks.0.0.weight": torch.zeros(2, 2, 3, 3)}, str(ckpt))
    loader = DataLoader(TensorDataset(torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)), batch_size=4)
    with pytest.raises(ValueError, match="missing keys"):
        evaluate_checkpoint(tiny_model, loader, loader, checkpoint=ckpt)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate_checkpoint(tiny_model, loader, loader, checkpoint=tmp_path / "nope.safetensors")


def test_subset_keeps_every_table_of_the_chosen_samples_in_order():
    logits = [torch.randn(6, 4), torch.randn(6, 4)]
    out = ExitOutputs.from_logits(logits, torch.tensor([0, 1, 2, 3, 0, 1]))
    out.input_size = (3, 8, 8)
    rows = torch.tensor([4, 0, 4])
    part = out.subset(rows)
    for name in ("confidences", "predictions", "top5", "losses", "targets", "entropies"):
        assert torch.equal(getattr(part, name), getattr(out, name)[rows]), name
    assert part.input_size == (3, 8, 8) and part.num_samples == 3
    mask = torch.tensor([True, False, True, False, False, False])
    assert torch.equal(out.subset(mask).confidences, out.confidences[[0, 2]])
