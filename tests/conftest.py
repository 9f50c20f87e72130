"""Test setup. Triton kernels run on the CPU under its interpreter where no NVIDIA GPU is present;
TRITON_INTERPRET must be in the environment before triton is first imported, so it is decided
here without importing torch (which may import triton)."""
import os
import shutil

if shutil.which("nvidia-smi") is None and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The test models are tiny: intra-op threads only add overhead, and stall badly when a
    2-core machine is busy, so the suite runs single-threaded (tests of thread-count
    independence set their own)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
