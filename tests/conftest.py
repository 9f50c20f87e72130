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


# On a machine with a GPU, the triton and cuda backends are tested on CUDA tensors: a test that is
# parametrised over backends (a fixture named *backend with the value "triton" or "cuda"), or marked
# gpu_tensors, runs with torch's default device set to CUDA, so every tensor it makes without
# naming a device lands there. Without a GPU nothing changes (Triton runs under its interpreter on
# CPU tensors; the cuda backend is not registered).
GPU_BACKENDS = ("triton", "cuda")


def _wants_cuda(item) -> bool:
    if not torch.cuda.is_available():
        return False
    if item.get_closest_marker("gpu_tensors") is not None:
        return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any(name.endswith("backend") and value in GPU_BACKENDS for name, value in params.items())


@pytest.fixture(autouse=True)
def _gpu_backends_on_cuda_tensors(request):
    if _wants_cuda(request.node):
        with torch.device("cuda"):
            yield
    else:
        yield
