"""The edge side must import and start without torch (Jetson installs have none)."""

from __future__ import annotations

import subprocess
import sys

from helpers import BLOCK_TORCH

def test_daemon_side_imports_without_torch():
    code = BLOCK_TORCH + (
        "import linecam.cli, linecam.runtime.service, linecam.runtime.daemon, linecam.camera.synthetic\n"
        "import linecam.camera.replay, linecam.camera.genicam, linecam.events, linecam.calibration.thresholds\n"
        "import linecam.export\n"  # the package itself is importable; torch loads only when training
        "assert 'torch' not in sys.modules\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_export_cli_says_how_to_get_torch():
    code = BLOCK_TORCH + (
        "from click.testing import CliRunner\n"
        "from linecam.export.cli import main as m\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
