import sys
from pathlib import Path

import pytest
import torch

# the oracles and helpers: test files import them by name (from oracle import ...), as the workers beside them do
sys.path.insert(0, str(Path(__file__).parent / "support"))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped on a machine without a CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (benchmarks/gpu_check.sh runs these where there is one)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
