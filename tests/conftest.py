"""Shared test fixtures: a tiny multi-exit model that meets the contract."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import timm_l2w
from timm_l2w.models.base import MultiExitModel


class TinyMultiExit(MultiExitModel):
    """K conv-BN-ReLU blocks, each followed by a pooled linear exit head."""

    def __init__(self, num_exits: int = 3, num_classes: int = 4, in_chans: int = 1, width: int = 4):
        super().__init__()
        self.num_exits, self.num_classes, self.in_chans = num_exits, num_classes, in_chans
        chans = [in_chans] + [width * (k + 1) for k in range(num_exits)]
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(chans[k], chans[k + 1], 3, padding=1, bias=False),
                          nn.BatchNorm2d(chans[k + 1]), nn.ReLU())
            for k in range(num_exits)
        )
        self.heads = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(chans[k + 1], num_classes))
            for k in range(num_exits)
        )

    def forward_stage(self, index, state):
        state = self.blocks[index](state)
        return state, self.heads[index](state)


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return TinyMultiExit()


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seeded, one intra-op thread: on a shared 2-core machine extra threads spin (10-30x slower)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
