"""benchmarks/gpu_check.sh: on a machine without a GPU it stops at once, saying why (its stages need one)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs for minutes: run it by hand")
@pytest.mark.slow  # runs the script, which starts Python
def test_without_a_gpu_it_refuses_with_a_message_and_writes_only_the_machine(tmp_path):
    env = {
        **os.environ,
        "OUT": str(tmp_path),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
    }
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "gpu_check: no CUDA device here" in result.stderr
    assert "torch.cuda.is_available() is False" in (tmp_path / "machine.txt").read_text()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["machine.txt"]
