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
    assert lines[2] == "| baseline (demo recipe) | 2 | 0.910 ± 0.014 | 0.600 ± 0.141 | 0.800 ± 0.000 | - | 0.500 ± 0.141 | - |"
    assert lines[3] == "| other | 1 | 0.950 | 0.600 ± 0.141 | 0.800 ± 0.000 | +0.040 | - | - |"
    with_det = ab.table({"other": {**results["other"], "recon": [0.3], "recon_det": [0.125]}}, 10, [0], 2)
    assert with_det.splitlines()[2].endswith("| 0.300 | 0.125 |")
    # without the baseline among the variants, the change column stays empty
    alone = ab.table({"other": results["other"]}, 10, [0], 2).splitlines()
    assert alone[2] == "| other | 1 | 0.950 | 0.600 ± 0.141 | 0.800 ± 0.000 | - | - | - |"


def test_random_init_rows_follow_the_seeds(tmp_path, monkeypatch):
    # a later call with more seeds must score every seed, not reuse the first call's cached rows
    ab = _load("ablate_encoder")
    monkeypatch.setattr(ab, "load_bundle", lambda name, gyro: None)
    monkeypatch.setattr(ab, "build_model", lambda cfg, seed: type("M", (), {"encoder": seed})())
    monkeypatch.setattr(ab, "_scores", lambda encoder, bundle, draws: {"100%": [float(encoder)]})
    assert ab.random_init([0], tmp_path, 1, gyro=False) == {"100%": [1000.0]}
    assert ab.random_init([0, 1], tmp_path, 1, gyro=False) == {"100%": [1000.0, 1001.0]}
    assert ab.random_init([0], tmp_path, 1, gyro=False) == {"100%": [1000.0]}   # cached, same seeds


def _compare_result(seed, fm_fid, ddpm_fid, reflow_fid, fm_curve_s, ddpm_curve_s):
    """A compare results.json reduced to what compare_seeds reads."""
    def row(method, steps, grid, fid, nfe, ms):
        return {"method": method, "steps": steps, "grid": grid, "seed": seed, "fid": fid, "nfe": nfe,
                "ms_per_sample": ms, "recon_mse": 0.4}

    def curve(seconds, final_f1, final_fid):
        return [{"seconds": s, "probe_f1": final_f1 * (i + 1) / len(seconds),
                 "fid": final_fid * len(seconds) / (i + 1)} for i, s in enumerate(seconds)]
    return {
        "config": {"seed": seed},
        "sampling": {"ddpm": [row("ddpm", 1000, "leading", ddpm_fid, 1000, 600.0)],
                     "fm": [row("euler", 8, "optimal", fm_fid, 8, 5.0), row("euler", 1, "uniform", 90.0, 1, 1.0)],
                     "fm+reflow": [row("euler", 4, "optimal", reflow_fid, 4, 3.0)]},
        "variants": {"fm": {"final_probe_f1": 0.9, "final_fid": fm_fid, "curve": curve(fm_curve_s, 0.9, fm_fid)},
                     "ddpm": {"final_probe_f1": 0.9, "final_fid": ddpm_fid,
                              "curve": curve(ddpm_curve_s, 0.9, ddpm_fid)}},
        "best_recon_8_steps": {"recon_mse": 0.4},
    }


def test_compare_seeds_reads_fixed_settings_and_spreads():
    cs = _load("compare_seeds")
    a = cs.summarise(_compare_result(0, 16.0, 20.0, 25.0, [10, 20, 30], [20, 40, 60]))
    b = cs.summarise(_compare_result(1, 22.0, 20.0, 18.0, [10, 20, 30], [10, 20, 30]))
    assert a["fid"]["FM Euler 8, optimal grid"] == 16.0 and a["fid"]["FM midpoint 4 (NFE 8)"] is None
    # seed 0: only FM Euler 8 reaches DDPM; seed 1: only the reflow row, at half the NFE
    assert a["first_reaching"].startswith("fm euler 8") and a["speedup"] == pytest.approx(120.0)
    assert b["first_reaching"].startswith("fm+reflow euler 4") and b["speedup"] == pytest.approx(200.0)
    # F1 curves reach 0.89 at their last point: FM 30 s, DDPM 60 s (seed 0), equal (seed 1)
    assert a["time"]["probe_f1"] == pytest.approx(0.5) and b["time"]["probe_f1"] == pytest.approx(1.0)
    md = cs.table([a, b]).splitlines()
    assert md[2].startswith("| 0 | 20.0 | 16.0 | - | 25.0 |")
    assert "| mean ± sd (2 runs) | 20.0 ± 0.0 | 19.0 ± 4.2 |" in md[4]
    assert md[-1] == "| 1 | fm+reflow euler 4 (optimal), NFE 4 | 200 | - | - | - | - |"
    # the deterministic reconstruction column: "-" for runs made before compare measured it
    assert a["recon_8_deterministic"] is None
    c = cs.summarise({**_compare_result(2, 16.0, 20.0, 25.0, [10], [10]),
                      "recon_deterministic_8_steps": {"fm": 0.125, "fm+reflow": 0.2}})
    assert c["recon_8_deterministic"] == 0.125
    row = cs.table([a, c]).splitlines()[3].split(" | ")
    assert row[-3] == "0.125" and cs.table([a]).splitlines()[2].split(" | ")[-3] == "-"


def test_compare_cpu_variants_times_every_variant_and_restores_the_capability(capsys):
    from flowfm_fast import _backend

    cv = _load("compare_cpu_variants")
    before, threads = _backend.cpu_capability(), torch.get_num_threads()
    x = torch.randn(3, 5, requires_grad=True)
    med = cv.time_case(lambda: (x * 2).sum(1), (x,), "fwd+bwd", 2, _backend.cpu_capabilities())
    assert set(med) == {"reference", *_backend.cpu_capabilities()}
    assert all(t > 0 for t in med.values())
    cv.main(["--case", "norm_modulate", "--rounds", "1", "--threads", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| norm_modulate")]
    assert len(rows) == 2 * len(cv.CASES["norm_modulate"])  # fwd and fwd+bwd of each shape
    assert all(line.count("x)") == len(_backend.cpu_capabilities()) for line in rows)
    assert (_backend.cpu_capability(), torch.get_num_threads()) == (before, threads)
    with pytest.raises(SystemExit):
        cv.main(["--rounds", "0"])


def test_compare_gemm_times_every_path_and_restores_threads(monkeypatch):
    from flowfm_fast.ops import _ext

    if not _ext.has_kernel("linear_act", "cpp"):
        pytest.skip("flowfm_fast._C (cpp backend) is not built")
    cg = _load("compare_gemm")
    # The timed callables compute what they are named for: the op's dW equals gu^T x.
    fns = cg.cases(7, 5, 3)
    assert set(fns) == {"fwd", "dW"} and {"ours", "aten"} <= set(fns["dW"])
    torch.testing.assert_close(fns["dW"]["ours"]()[1], fns["dW"]["aten"](), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fns["fwd"]["ours"]()[0], fns["fwd"]["aten"](), rtol=1e-5, atol=1e-5)
    times = cg.measure(fns["fwd"], rounds=2, calls=1)
    assert set(times) == set(fns["fwd"]) and all(len(v) == 2 and min(v) > 0 for v in times.values())
    monkeypatch.setattr(cg, "SHAPES", [(7, 5, 3)])
    threads = torch.get_num_threads()
    lines = cg.main(["--rounds", "1", "--threads", "1"])
    assert [line.split(" | ")[0] for line in lines[4:]] == ["| fwd", "| dW"]
    assert torch.get_num_threads() == threads
    with pytest.raises(SystemExit):
        cg.main(["--rounds", "0"])
