"""The docs stand on their own (no missing spec files, referenced docs exist) and the README's
save / load / fine-tune flow runs as written."""
from __future__ import annotations

import re

import timm
import torch

import timm_l2w
from tests.helpers import ROOT


def test_docs_stand_on_their_own_no_missing_spec_files_and_referenced_docs_exist():
    files = [p for d in ("timm_l2w", "examples", "benchmarks", "docs") for p in (ROOT / d).rglob("*")
             if p.suffix in (".py", ".md")] + [ROOT / "README.md"]
    outside = ("PAPER" + ".md", "DESIGN" + ".md", "/" + "work" + "/")  # not in the repository; no machine paths
    hits = [f"{p.relative_to(ROOT)}: {word}" for p in files for word in outside if word in p.read_text()]
    assert not hits, hits
    cited = {m for p in files for m in re.findall(r"docs/[\w./-]+\.md", p.read_text())}
    assert "docs/method.md" in cited and all((ROOT / c).is_file() for c in cited), cited


def _readme_block(title: str) -> str:
    """The first ```python block after ``title`` in the README."""
    text = (ROOT / "README.md").read_text()
    return text.split(title, 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_save_load_finetune_flow_works_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = timm.create_model("msdnet_l2w_cifar", num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # trained weights, unlike a fresh initialisation
    scope = {"timm": timm, "timm_l2w": timm_l2w, "model": model}
    exec(_readme_block("**Save, load back, fine-tune**"), scope)
    ref, loaded, tuned = model.state_dict(), scope["loaded"].state_dict(), scope["tuned"].state_dict()
    assert all(torch.equal(ref[k], loaded[k]) for k in ref)  # the 10-class heads too: nothing re-initialised
    heads = [k for k in tuned if tuned[k].shape != ref[k].shape]
    assert len(heads) == 10 and all(tuned[k].shape[0] == 5 for k in heads)  # 5 exits x (weight, bias)
    assert all(torch.equal(ref[k], tuned[k]) for k in ref if k not in heads)
