"""The analysis helpers of the scripts in benchmarks/ that write committed results."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_recon_best_shift_finds_a_time_offset():
    rd = _load("recon_diagnosis")
    x = torch.randn(4, 3, 300, generator=torch.Generator().manual_seed(0))
    r = torch.roll(x, 7, dims=-1)                     # each window 7 samples late
    plain = rd.per_window(r, x)
    assert torch.all(plain > 1.0)                     # unaligned white noise: ~2 per sample
    assert torch.all(rd.best_shift(r, x, 10) < 1e-12)
    assert torch.all(rd.best_shift(r, x, 3) > 0.5)    # 7 is out of reach
    assert torch.equal(rd.best_shift(r, x, 0), plain)


def test_recon_table_has_one_row_per_reading():
    rd = _load("recon_diagnosis")
    result = {"counts": {"a": 2, "b": 3},
              "rows": {"one": {"all": 0.5, "a": 0.25, "b": 0.75}, "two": {"all": 0.1, "a": 0.2, "b": 0.3}}}
    lines = rd.table(result).splitlines()
    assert lines[0] == "| MSE, standardised units | all | a (2) | b (3) |"
    assert lines[2] == "| one | 0.500 | 0.250 | 0.750 |" and len(lines) == 4


def test_ablation_table_means_sds_and_changes():
    ab = _load("ablate_encoder")
    cols = {"1/class": [0.5, 0.7], "5/class": [0.8, 0.8]}
    results = {"baseline (demo recipe)": {"100%": [0.90, 0.92], **cols, "recon": [0.4, 0.6]},
               "other": {"100%": [0.95], **cols}}
    lines = ab.table(results, 10, [0, 1], 2).splitlines()
    assert lines[2] == "| baseline (demo recipe) | 2 | 0.910 ± 0.014 | 0.600 ± 0.141 | 0.800 ± 0.000 | - | 0.500 ± 0.141 |"
    assert lines[3] == "| other | 1 | 0.950 | 0.600 ± 0.141 | 0.800 ± 0.000 | +0.040 | - |"
    with pytest.raises(KeyError):
        ab.table({"other": results["other"]}, 10, [0], 2)   # no baseline to compare with
