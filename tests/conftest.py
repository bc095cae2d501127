"""Shared fixtures: the tiny multi-exit model (tests.helpers.TinyMultiExit), seeded, one thread."""
from __future__ import annotations

import pytest
import torch

import timm_l2w  # noqa: F401  (registers the models)
from tests.helpers import TinyMultiExit


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
