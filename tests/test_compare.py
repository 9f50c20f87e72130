"""``flowfm-fast compare --quick`` end to end (synthetic data, tiny config), and its helpers."""
from __future__ import annotations

import json
import math

import pytest

from flowfm_fast.cli import main
from flowfm_fast.compare import CompareConfig, eval_steps, first_nfe_reaching, fm_speedup, time_to_reach


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
    for png in ("probe_f1_vs_time.png", "fid_vs_time.png", "fid_vs_nfe.png"):
        p = quick_run / png
        assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in report
    assert (quick_run / "feature_classifier" / "model.safetensors").is_file()
    assert "Machine:" in report and "-50.4%" in report and "51.0x" in report and "clip" in report
    q = CompareConfig.quick()
    sec2 = report.split("## 2.")[1].split("## 3.")[0]
    rows = [[c.strip() for c in l.split("|")[1:-1]] for l in sec2.splitlines() if l.startswith("| FM") or
            l.startswith("| DDPM")]
    want = (len(q.couplings) * (len(q.fm_methods) * len(q.fm_steps) + len(q.grid_steps))
            + len(q.fm_methods) * len(q.reflow_fm_steps) + len(q.grid_steps)        # the reflowed run
            + 1 + len(q.ddim_steps) * len(q.ddim_spacings))
    assert len(rows) == want
    assert ["DDPM counterpart", "ddpm", str(q.ddpm_steps)] == rows[-1][:3] or any(
        r[:3] == ["DDPM counterpart", "ddpm", str(q.ddpm_steps)] for r in rows)
    for r in rows:                                   # NFE = steps x stages
        stages = 2 if r[1] == "midpoint" else 1
        assert int(r[4]) == stages * int(r[2])
    assert {r[0] for r in rows} == {"FM", "FM, ot", "FM + reflow", "DDPM counterpart"}
    assert {r[3] for r in rows if r[1] == "ddim"} == set(q.ddim_spacings)
    for label in ("| FM |", "| FM, ot |", "| DDPM counterpart |", "| random-init encoder (probe) |",
                  "| supervised from scratch", "## 4. Couplings", "## 5. The DDPM baseline", "Reflow:",
                  "Headline spread"):
        assert label in report
    assert "| nan" not in report and "not reached" not in sec2


def test_quick_compare_results_are_finite_and_consistent(quick_run):
    res = json.loads((quick_run / "results.json").read_text())
    q = CompareConfig.quick()
    assert _finite(res["sampling"]) and _finite(res["variants"]) and _finite(res["baselines"])
    assert set(res["variants"]) == {"fm", "fm-ot", "ddpm"}
    for name, r in res["variants"].items():
        assert r["steps"] == q.steps and r["train_seconds"] > 0
        assert [c["step"] for c in r["curve"]] == eval_steps(q.steps, q.evaluations)
        secs = [c["seconds"] for c in r["curve"]]
        assert secs == sorted(secs)
        assert all(0.0 <= c["probe_f1"] <= 1.0 and c["fid"] >= 0 for c in r["curve"])
    for rows in res["sampling"].values():
        assert all(r["ms_per_sample"] > 0 and r["fid"] >= 0 and r["recon_mse"] > 0 for r in rows)
    hl = res["headline"]
    assert len(hl["fm_fid"]) == len(hl["ddpm_fid"]) == len(q.headline_seeds) and hl["nfe"] <= 8
    assert hl["ddpm_fid"][0] != hl["ddpm_fid"][1]    # another seed, other noise
    assert res["coupling_cost"]["ot"]["seconds_per_call"] > 0
    for g in res["grids"].values():
        assert g["grid"][0] == 0.0 and g["grid"][-1] == 1.0 and g["cost"] <= g["uniform_cost"] + 1e-12
    # The synthetic classes are easy: the judge must recognise them, and real-vs-real FID must be small.
    assert res["feature_classifier"]["test_macro_f1"] > 0.8
    assert res["speedup"]["vs_ddpm"]["speedup"] > 0
    # the deterministic 8-step reconstruction of every FM model, and the augmentation used
    det = res["recon_deterministic_8_steps"]
    assert set(det) == {"fm", "fm-ot", "fm+reflow"} and all(math.isfinite(v) and v > 0 for v in det.values())
    assert res["config"]["augment"] is True
    report = (quick_run / "report.md").read_text()
    assert "| the same, deterministic (x0 = 0, uniform grid) |" in report and "encoder-side augmentation and" in report


def test_compare_no_augment_reaches_every_training_run(tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", "--quick", "--no-augment", "--couplings", "independent", "--reflow-steps", "0",
                 "--out", str(out), "--device", "cpu"]) == 0
    assert json.loads((out / "results.json").read_text())["config"]["augment"] is False
    assert "no augmentation (--no-augment) and" in (out / "report.md").read_text()
    for run in ("train_fm", "train_ddpm"):
        states = sorted((out / run / "checkpoints").glob("step_*/state.json"))
        assert json.loads(states[-1].read_text())["train_config"]["augment"]["enabled"] is False


def test_eval_steps_and_first_nfe():
    assert eval_steps(100, 4) == [25, 50, 75, 100]
    assert eval_steps(3, 12) == [1, 2, 3]
    rows = [{"nfe": 8, "fid": 5.0}, {"nfe": 2, "fid": 9.0}, {"nfe": 4, "fid": 6.0}, {"nfe": 4, "fid": 5.5}]
    assert first_nfe_reaching(rows, 6.0) == {"nfe": 4, "fid": 5.5}
    assert first_nfe_reaching(rows, 1.0) is None


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


@pytest.mark.parametrize("args, match", [(["--evaluations", "0"], "evaluations"),
                                         (["--couplings", "ot", "--reflow-steps", "5"], "independent")])
def test_compare_rejects_bad_arguments(tmp_path, capsys, args, match):
    assert main(["compare", "--quick", *args, "--out", str(tmp_path)]) == 2
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("bad, match", [(dict(ddim_steps=(10, 2000)), "ddim_steps"),
                                        (dict(ddim_spacings=("middle",)), "ddim_spacings"),
                                        (dict(ddpm_prediction="x0"), "ddpm_prediction"),
                                        (dict(grid_steps=(100,)), "grid_candidates"),
                                        (dict(couplings=("ot", "ot")), "each once")])
def test_compare_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        CompareConfig(**bad).validate()
