"""The machine's copy bandwidth (the roofline of the memory-bound ops), as its own benchmark.

conftest.py also measures it at the start and end of every session (``machine_info``), so a run of
op suites alone still has a roofline; report.py takes the best of all measurements in the JSON.
"""
from __future__ import annotations

import torch

from conftest import COPY_NUMEL, sync


def test_copy_bandwidth(benchmark, device):
    """Roofline reference: bytes moved by a large copy (read + write)."""
    src = torch.randn(COPY_NUMEL, device=device)
    dst = torch.empty_like(src)

    def run():
        dst.copy_(src)
        sync(device)

    benchmark.group = "copy bandwidth"
    benchmark.extra_info.update(impl="copy", op="copy", device=device.type, bytes=2 * src.numel() * src.element_size())
    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=2)
