import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(False)


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
