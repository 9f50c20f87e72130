"""Shared benchmark setup: thread count fixed, machine facts recorded in the JSON.

Run:  pytest benchmarks --benchmark-json=benchmarks/results/<machine>.json
      python benchmarks/report.py benchmarks/results/<machine>.json
"""
from __future__ import annotations

import os
import platform
import time

# Inductor's background compile-worker pool (processes that import torch, then compile) competes
# for the 2 cores with whatever is timed right after a compile; compile in-process instead.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import pytest
import torch

from flowfm_fast._malloc import tune_cpu_allocator

# As the CLI does: freed tensor memory stays in the heap, so no implementation's timing is
# dominated by first-touch page faults of fresh allocations (~0.25 ms per MB on this VM).
ALLOCATOR_TUNED = tune_cpu_allocator()

# fp32 elements of the copy: 64 MiB, well outside the CPU caches; 1 GiB on a GPU, so the copy is
# not launch-bound and is well outside the L2.
COPY_NUMEL = (256 if torch.cuda.is_available() else 16) * 2 ** 20
_CONFIG = None


def pytest_addoption(parser):
    parser.addoption("--cold-cache", action="store_true",
                     help="op suites: evict the CPU L3 / GPU L2 before every timed call (pedantic rounds), so "
                          "GB/s is comparable with the DRAM copy bandwidth; default: hot caches, as in a loop")


def pytest_configure(config):
    global _CONFIG
    _CONFIG = config


def cold_cache() -> bool:
    return bool(_CONFIG is not None and _CONFIG.getoption("--cold-cache", default=False))


def cold_rounds() -> int:
    """Rounds of a cold-cache case: 5 x --benchmark-min-rounds (25 by default)."""
    return 5 * max(1, int(_CONFIG.getoption("benchmark_min_rounds", default=5) or 5)) if _CONFIG else 25


def cache_flusher(device: torch.device):
    """A callable that reads and writes a buffer several times the last-level cache."""
    buf = torch.zeros((256 if device.type == "cuda" else 128) * 2 ** 20 // 4, device=device)

    def flush():
        buf.add_(1.0)
        sync(device)
    return flush


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def measure_copy_bandwidth(device: torch.device, rounds: int = 20) -> dict:
    """Median GB/s of a large ``dst.copy_(src)`` (read + write): the roofline the op suites'
    GB/s are compared against. Same numel as bench_copy.py's benchmark."""
    src = torch.randn(COPY_NUMEL, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(rounds + 2):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        if i >= 2:  # two warm-up rounds
            times.append(time.perf_counter() - t0)
    med = sorted(times)[len(times) // 2]
    nbytes = 2 * src.numel() * src.element_size()
    return {"gbps": nbytes / med / 1e9, "bytes": nbytes, "median_s": med, "rounds": rounds}


@pytest.fixture(scope="session", autouse=True)
def copy_bandwidth(request, device) -> dict:
    """Copy bandwidth measured once at the start of every benchmark session (and again at its end,
    in machine_info), so a run of op suites alone still carries its own roofline in the JSON."""
    result = measure_copy_bandwidth(device)
    request.config._flowfm_copy_bandwidth = {"device": device.type, "start": result}
    return result


def pytest_benchmark_update_machine_info(config, machine_info):
    import flowfm_fast
    copy = getattr(config, "_flowfm_copy_bandwidth", None)
    if copy is not None:
        copy = dict(copy, end=measure_copy_bandwidth(torch.device(copy["device"])))
        copy["gbps"] = max(copy["start"]["gbps"], copy["end"]["gbps"])
        machine_info["copy_bandwidth"] = copy
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["allocator_tuned"] = ALLOCATOR_TUNED
    machine_info["flowfm_fast"] = flowfm_fast.__version__
    machine_info["backends"] = flowfm_fast.backend_summary()
    try:
        import triton
        machine_info["triton"] = triton.__version__
    except ImportError:
        machine_info["triton"] = None
    if torch.cuda.is_available():
        machine_info["gpu"] = torch.cuda.get_device_name()
    machine_info["platform"] = platform.platform()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Keep the summary statistics, drop each case's per-round timings: with tiny ops timed for
    hundreds of thousands of rounds they made a committed JSON 15 MB (report.py reads the medians)."""
    for b in output_json.get("benchmarks", []):
        b.get("stats", {}).pop("data", None)
