"""cli-probe: tests/nvme/kernel_cli_probe.py in the guest (see that probe's docstring)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from testbed.scenarios.nvme_probe import run_probe

if __name__ == "__main__":
    run_probe("cli")
