"""benchmarks/report.py: interleaved cases expand into one row per implementation, ratios are taken
within the case, and the end-to-end bars judge the right rows."""
from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
report = pytest.importorskip("report")


def _stats(median, q1=None, q3=None):
    return {"median": median, "q1": median if q1 is None else q1, "q3": median if q3 is None else q3,
            "min": median, "rounds": 25}


def _interleaved(group, op, velocity, medians, **counters):
    return {"group": group, "name": "test_x", "stats": _stats(sum(medians.values())),
            "extra_info": {"impl": "interleaved", "op": op, "velocity": velocity, "device": "cpu",
                           "interleaved": {k: _stats(v, 0.9 * v, 1.1 * v) for k, v in medians.items()},
                           **counters}}


def _rows(text):
    return {tuple(c.strip() for c in line.strip("|").split("|"))[1]: [c.strip() for c in line.strip("|").split("|")]
            for line in text.splitlines() if line.startswith("| train") or line.startswith("| sample")}


def test_interleaved_case_expands_to_rows_with_ratios_and_bars():
    data = {"benchmarks": [_interleaved("train_step small/dit B=64", "train_step", "dit",
                                        {"eager": 0.200, "compile": 0.180, "cpp": 0.150, "cpp+compile": 0.125},
                                        compile_graphs=2, compile_breaks=0, recompiles_while_timed=0)]}
    rows = _rows(report.table(data))
    assert set(rows) == {"eager", "compile", "cpp", "cpp+compile"}
    # columns: case, impl, median ms, IQR %, vs eager, vs compile, GB/s, % copy BW, bar
    assert rows["cpp"][2] == "150.000" and rows["cpp"][3] == "20%"  # (1.1 - 0.9) * 150 / 150
    assert rows["cpp"][4] == "1.33x" and rows["cpp"][8] == "pass"      # 200 / 150 >= 1.3
    assert rows["cpp+compile"][4] == "1.60x" and rows["cpp+compile"][5] == "1.44x"
    assert rows["cpp+compile"][8] == "pass"
    assert rows["eager"][8] == "" and rows["compile"][8] == ""


def test_e2e_bars_fail_below_and_skip_resnet():
    dit = _interleaved("train_step small/dit B=64", "train_step", "dit",
                       {"eager": 0.200, "compile": 0.180, "cpp": 0.180, "cpp+compile": 0.170},
                       compile_graphs=2, compile_breaks=0, recompiles_while_timed=0)
    resnet = _interleaved("train_step small/resnet B=64", "train_step", "resnet",
                          {"eager": 0.200, "compile": 0.180, "cpp": 0.190, "cpp+compile": 0.185},
                          compile_graphs=2, compile_breaks=0, recompiles_while_timed=0)
    sample = _interleaved("sample euler K=8 small/dit B=1", "sample", "dit",
                          {"eager": 0.050, "compile": 0.020, "cpp": 0.030, "cpp+compile": 0.019},
                          compile_graphs=2, compile_breaks=0, recompiles_while_timed=0)
    text = report.table({"benchmarks": [dit, resnet, sample]})
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    bars = {(line.split("|")[1].strip(), line.split("|")[2].strip()): line.split("|")[9].strip() for line in lines[1:]}
    assert bars[("train_step small/dit B=64", "cpp")].startswith("FAIL: eager 1.11x<1.3x")
    assert "compile 1.06x<1.2x" in bars[("train_step small/dit B=64", "cpp+compile")]
    assert bars[("train_step small/resnet B=64", "cpp")] == ""
    assert bars[("sample euler K=8 small/dit B=1", "cpp+compile")] == "FAIL: compile 1.05x<1.2x"
    assert "0 of 3 pass" in text


def test_recompile_while_timed_marks_the_compiled_rows():
    data = {"benchmarks": [_interleaved("train_step small/dit B=64", "train_step", "dit",
                                        {"eager": 0.2, "compile": 0.18, "cpp": 0.15, "cpp+compile": 0.12},
                                        compile_graphs=2, compile_breaks=0, recompiles_while_timed=3)]}
    text = report.table(data)
    rows = _rows(text)
    assert "compile*" in [line.split("|")[2].strip() for line in text.splitlines() if line.startswith("| train")]
    assert "3 recompile(s) while timed" in text
    assert "cpp" in rows and "eager" in rows
