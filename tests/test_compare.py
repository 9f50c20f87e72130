"""``flowfm-fast compare --quick`` end to end (synthetic data, tiny config), and its helpers."""
from __future__ import annotations

import json
import math

import pytest

from flowfm_fast.cli import main
from flowfm_fast.compare import CompareConfig, fm_speedup, time_to_reach


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    assert main(["compare", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    return out


def _finite(x):
    if isinstance(x, dict):
        return all(_finite(v) for v in x.values())
    if isinstance(x, list):
        return all(_finite(v) for v in x)
    return not isinstance(x, float) or math.isfinite(x)


def test_quick_compare_writes_report_and_plots(quick_run):
    report = (quick_run / "report.md").read_text()
    for png in ("probe_f1_vs_time.png", "fid_vs_sampling_time.png"):
        p = quick_run / png
        assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in report
    assert (quick_run / "feature_classifier" / "model.safetensors").is_file()
    assert "Machine:" in report and "-50.4%" in report and "51.0x" in report and "clip" in report
    q = CompareConfig.quick()
    rows = [l for l in report.splitlines() if l.startswith("| fm |") or l.startswith("| ddpm |")]
    sweep_rows = [l for l in rows if l.split("|")[2].strip() in ("euler", "midpoint", "ddpm", "ddim")]
    want = len(q.fm_methods) * len(q.fm_steps) + 1 + len(q.ddim_steps)
    assert len(sweep_rows) == want
    assert f"| ddpm | ddpm | {q.ddpm_steps} |" in report
    for k in q.ddim_steps:
        assert f"| ddpm | ddim | {k} |" in report
    for m in q.fm_methods:
        for k in q.fm_steps:
            assert f"| fm | {m} | {k} |" in report
    for label in ("| probe macro-F1 |", "| sensor-FID |", "| random-init encoder (probe) |",
                  "| supervised from scratch", "| FlowFM (fm) |", "| DDPM counterpart |"):
        assert label in report
    assert "| nan" not in report and "not reached" not in report.split("## 2.")[1]


def test_quick_compare_results_are_finite_and_consistent(quick_run):
    res = json.loads((quick_run / "results.json").read_text())
    assert _finite(res["sampling"]) and _finite(res["objectives"]) and _finite(res["baselines"])
    for obj in ("fm", "ddpm"):
        r = res["objectives"][obj]
        assert r["steps"] == CompareConfig.quick().steps and r["train_seconds"] > 0
        secs = [c["seconds"] for c in r["curve"]]
        assert len(secs) >= 1 and secs == sorted(secs)
        assert all(0.0 <= c["probe_f1"] <= 1.0 and c["fid"] >= 0 for c in r["curve"])
    for rows in res["sampling"].values():
        assert all(r["ms_per_sample"] > 0 and r["fid"] >= 0 and r["recon_mse"] > 0 for r in rows)
    # The synthetic classes are easy: the judge must recognise them, and real-vs-real FID must be small.
    assert res["feature_classifier"]["test_macro_f1"] > 0.8
    assert res["speedup"]["vs_ddpm"]["speedup"] > 0


def test_time_to_reach_and_speedup():
    curve = [{"seconds": 1.0, "f1": 0.5, "fid": 9.0}, {"seconds": 2.0, "f1": 0.8, "fid": 4.0},
             {"seconds": 3.0, "f1": 0.9, "fid": 5.0}]
    assert time_to_reach(curve, "f1", 0.8, True) == 2.0
    assert time_to_reach(curve, "f1", 0.95, True) is None
    assert time_to_reach(curve, "fid", 5.0, False) == 2.0
    ref = {"method": "ddpm", "steps": 1000, "fid": 3.0, "ms_per_sample": 100.0}
    fm = [{"method": "euler", "steps": 1, "fid": 6.0, "ms_per_sample": 1.0},
          {"method": "euler", "steps": 4, "fid": 2.9, "ms_per_sample": 4.0},
          {"method": "midpoint", "steps": 4, "fid": 2.5, "ms_per_sample": 8.0}]
    s = fm_speedup(fm, ref)
    assert s["reached"] and s["fm"]["steps"] == 4 and s["fm"]["method"] == "euler" and s["speedup"] == 25.0
    s = fm_speedup(fm, {**ref, "fid": 1.0})
    assert not s["reached"] and s["fm"]["method"] == "midpoint"


def test_compare_rejects_bad_arguments(tmp_path, capsys):
    assert main(["compare", "--quick", "--eval-every", "0", "--out", str(tmp_path)]) == 2
    assert "eval-every" in capsys.readouterr().err
