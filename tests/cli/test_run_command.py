"""``timm-l2w run SCRIPT ARGS``: timm's own scripts (validate.py, benchmark.py, ...) with the models registered."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tests.helpers import root_on_pythonpath
from timm_l2w import cli

SCRIPT = textwrap.dedent("""
    # a stand-in for one of timm's scripts: it imports timm only and reads its own argv
    import sys
    import timm
    import torch

    model = timm.create_model(sys.argv[2], num_classes=4).eval()
    print(sys.argv[0].endswith("script.py"), tuple(model(torch.randn(1, 3, 32, 32)).shape))
    sys.exit(int(sys.argv[3]) if len(sys.argv) > 3 else 0)
""")


def test_a_timm_script_sees_the_registered_models_and_its_own_arguments(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    command = [sys.executable, "-m", "timm_l2w.cli", "run", str(script), "--model", "msdnet_l2w_cifar_tiny"]
    proc = subprocess.run(command, capture_output=True, text=True, env=root_on_pythonpath(dict(os.environ)),
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True (1, 4)"


def test_the_scripts_exit_status_is_the_commands_and_argv_is_restored(tmp_path, capsys):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    argv = list(sys.argv)
    assert cli.main(["run", str(script), "--model", "msdnet_l2w_cifar_tiny", "3"]) == 3
    assert capsys.readouterr().out.strip() == "True (1, 4)" and sys.argv == argv


def test_a_missing_script_and_no_script_say_what_to_pass(tmp_path, capsys):
    assert cli.main(["run", str(tmp_path / "validate.py")]) == 2
    assert "timm-l2w run: error: no script" in capsys.readouterr().err
    assert cli.main(["run"]) == 2 and "usage: timm-l2w run SCRIPT" in capsys.readouterr().out
    assert cli.main(["run", "--help"]) == 0
