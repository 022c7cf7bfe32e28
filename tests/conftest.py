import os

# Deterministic cuBLAS needs a fixed workspace; without it, the deterministic-algorithms
# switch below warns on every CUDA matmul, and pytest turns that warning into an error. It
# must be set before CUDA starts, so before torch is imported.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(False)


def pytest_collection_modifyitems(config, items):
    """``gpu``-marked tests are skipped (not silently passed) where there is no CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
