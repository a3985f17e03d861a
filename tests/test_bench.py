"""The benchmarks' smoke runs: bench.py runs every path and leaves no temporary directory behind; routed.py runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_smoke_run_cleans_up_after_itself(tmp_path):
    scratch, out = tmp_path / "tmp", tmp_path / "out"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--smoke", "--no-traffic", "--out", str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(path.name for path in out.iterdir()) == ["results.json", "results.md", "results.png"]
    assert [path.name for path in scratch.iterdir() if path.name.startswith("engine-opt")] == []


@pytest.mark.slow
def test_the_routed_benchmark_smoke_run_prints_its_table():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "benchmarks" / "routed.py"), "--smoke"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 32 x 1 |")]
    assert len(rows) == 2 and all(line.count("|") == 7 for line in rows)  # clipping off and on
