"""`timm-l2w train`'s loop on two DDP ranks (accelerate launch of tests/launch/ddp_check.py): model and weight
predictor stay identical while the ranks see different data."""
from __future__ import annotations

import pytest

from tests.helpers import LAUNCH, accelerate_launch

pytestmark = pytest.mark.multiprocess


def test_two_ddp_ranks_stay_identical_on_different_data(tmp_path):
    proc = accelerate_launch([str(LAUNCH / "ddp_check.py"), str(tmp_path / "ddp")])
    assert proc.returncode == 0 and "DDP_OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
