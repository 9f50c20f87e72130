"""Shared benchmark setup: thread count fixed, machine facts recorded in the JSON.

Run:  pytest benchmarks --benchmark-json=benchmarks/results/<machine>.json
      python benchmarks/report.py benchmarks/results/<machine>.json
"""
from __future__ import annotations

import platform

import pytest
import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_benchmark_update_machine_info(config, machine_info):
    import flowfm_fast
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
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
