"""``flowfm-fast`` end to end on the tiny config with synthetic data, and hostile input."""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from flowfm_fast.cli import main
from flowfm_fast.data import make_synthetic

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CONSOLE_SCRIPT = Path(sys.executable).with_name("flowfm-fast")


@pytest.fixture(autouse=True, scope="module")
def _env(tmp_path_factory):
    """Cache in a temporary directory."""
    cache = tmp_path_factory.mktemp("flowfm_cache_cli")
    old = os.environ.get("FLOWFM_CACHE")
    os.environ["FLOWFM_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("FLOWFM_CACHE", None)
    else:
        os.environ["FLOWFM_CACHE"] = old


def run_cli(*argv) -> tuple[int, str, str]:
    """main(argv) in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def run_subprocess(cmd, cache_dir) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLOWFM_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def _last_json(stdout: str) -> dict:
    lines = [ln for ln in stdout.strip().splitlines() if ln.strip()]
    assert lines, "no output"
    return json.loads(lines[-1])


def _assert_one_error_line(err: str, cmd: str):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"flowfm-fast {cmd}: error:"), err
    assert "Traceback" not in err


PRETRAIN = ("pretrain", "--config", "tiny", "--data", "synthetic", "--quiet", "--device", "cpu")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run") / "pre"
    rc, out, err = run_cli(*PRETRAIN, "--steps", 20, "--out", d)
    assert rc == 0, err
    res = _last_json(out)
    assert res["step"] == 20
    return d


def _copy_run(run_dir, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return dst


# --------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------

def test_pretrain_writes_checkpoint_and_metrics(run_dir):
    ck = run_dir / "checkpoints"
    assert (ck / "latest").is_file()
    step_dir = ck / (ck / "latest").read_text().strip()
    assert step_dir.name == "step_00000020"
    for f in ("model.safetensors", "optim.safetensors", "state.json"):
        assert (step_dir / f).is_file()
    state = json.loads((step_dir / "state.json").read_text())
    assert state["step"] == 20
    assert len(state["standardizer"]["mean"]) == 3
    assert state["model_config"]["channels"] == 3 and state["model_config"]["length"] == 300
    recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    assert recs and recs[-1]["step"] == 20
    assert all(np.isfinite(r["loss"]) for r in recs)
    assert not list(ck.glob(".tmp*")), "temporary checkpoint directory left behind"


def test_pretrain_resume_continues(run_dir, tmp_path):
    d = _copy_run(run_dir, tmp_path)
    rc, out, err = run_cli(*PRETRAIN, "--steps", 30, "--out", d, "--resume")
    assert rc == 0, err
    assert _last_json(out)["step"] == 30
    recs = [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    steps = [r["step"] for r in recs]
    assert steps[0] == 20 and steps[-1] == 30, steps   # appended, continued from 20
    assert (d / "checkpoints" / "latest").read_text().strip() == "step_00000030"
    # Training is deterministic on CPU: a run that silently started again from step 0 would end with
    # exactly the weights of a fresh 30-step run. A resumed one cannot (its first 20 steps followed the
    # 20-step schedule).
    fresh = tmp_path / "fresh"
    rc, out, err = run_cli(*PRETRAIN, "--steps", 30, "--out", fresh)
    assert rc == 0, err
    from safetensors.torch import load_file
    a = load_file(str(d / "checkpoints" / "step_00000030" / "model.safetensors"))
    b = load_file(str(fresh / "checkpoints" / "step_00000030" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a), "--resume restarted from scratch"


def test_pretrain_resume_with_another_config_is_refused(run_dir, tmp_path):
    d = _copy_run(run_dir, tmp_path)
    before = sorted(p.name for p in (d / "checkpoints").iterdir())
    rc, out, err = run_cli(*PRETRAIN, "--velocity", "resnet", "--steps", 30, "--out", d, "--resume")
    assert rc == 2
    _assert_one_error_line(err, "pretrain")
    assert "config" in err
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == before


def test_pretrain_augment_target_reaches_the_checkpoint_and_is_checked_on_resume(run_dir, tmp_path):
    d = tmp_path / "aug"
    rc, out, err = run_cli(*PRETRAIN, "--steps", 2, "--augment-target", "augmented", "--out", d)
    assert rc == 0, err
    state = json.loads((d / "checkpoints" / "step_00000002" / "state.json").read_text())
    assert state["train_config"]["augment"]["target"] == "augmented"
    # the run made with the default target refuses to resume under the other one
    rc, out, err = run_cli(*PRETRAIN, "--steps", 30, "--augment-target", "augmented",
                           "--out", _copy_run(run_dir, tmp_path), "--resume")
    assert rc == 2 and "augment" in err
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        main([*PRETRAIN, "--augment-target", "noisy", "--out", str(tmp_path / "bad")])
    assert exc.value.code == 2 and "--augment-target" in err.getvalue()


def test_probe_prints_macro_f1(run_dir):
    rc, out, err = run_cli("probe", "--ckpt", run_dir, "--data", "synthetic", "--label-fraction", "1.0", "0.1",
                           "--seeds", 2, "--device", "cpu")
    assert rc == 0, err
    printed = _last_json(out)
    res = printed["linear_probe_macro_f1"]
    assert set(res) == {"1.0", "0.1"}
    assert len(res["1.0"]) == 1 and len(res["0.1"]) == 2
    for v in res["1.0"] + res["0.1"]:
        assert 0.0 <= v <= 1.0
    assert printed["summary"]["0.1"]["n"] == 2
    assert printed["summary"]["0.1"]["mean"] == pytest.approx(sum(res["0.1"]) / 2)
    assert "fraction 1.0 uses every labelled window" in printed["note"]  # why 1.0 has one score


def test_probe_per_class(run_dir):
    rc, out, err = run_cli("probe", "--ckpt", run_dir, "--data", "synthetic", "--per-class", 1, 3,
                           "--draws", 4, "--device", "cpu")
    assert rc == 0, err
    printed = _last_json(out)
    shots = printed["per_class_macro_f1"]
    assert set(shots) == {"1", "3"} and all(len(v) == 4 for v in shots.values())
    assert all(0.0 <= f <= 1.0 for v in shots.values() for f in v)
    assert printed["per_class_summary"]["3"]["n"] == 4
    rc, out, err = run_cli("probe", "--ckpt", run_dir, "--data", "synthetic", "--per-class", 0, "--device", "cpu")
    assert rc == 2 and "--per-class" in err


def test_probe_baselines_on_the_same_labels(run_dir):
    rc, out, err = run_cli("probe", "--ckpt", run_dir, "--data", "synthetic", "--per-class", 2, "--draws", 3,
                           "--label-fraction", 0.5, 1.0, "--seeds", 2, "--random-init", 2, "--finetune",
                           "--finetune-steps", 3, "--device", "cpu")
    assert rc == 0, err
    printed = _last_json(out)
    rand = printed["random_init_probe"]
    assert rand["encoders"] == 2
    assert rand["per_class_summary"]["2"]["n"] == 6            # 2 encoders x 3 draws
    assert rand["summary"]["0.5"]["n"] == 4 and rand["summary"]["1.0"]["n"] == 2
    for name in ("finetune", "scratch"):
        rows = printed[name]
        assert rows["steps"] == 3
        assert rows["per_class_summary"]["2"]["n"] == 3
        assert rows["summary"]["0.5"]["n"] == 2 and rows["summary"]["1.0"]["n"] == 1
        assert all(0.0 <= r["mean"] <= 1.0 for r in (*rows["summary"].values(), *rows["per_class_summary"].values()))
    rc, out, err = run_cli("probe", "--ckpt", run_dir, "--data", "synthetic", "--random-init", -1, "--device", "cpu")
    assert rc == 2 and "--random-init" in err


def test_sample_writes_npz_and_pngs(run_dir, tmp_path):
    out_npz = tmp_path / "d2" / "s.npz"
    rc, out, err = run_cli("sample", "--ckpt", run_dir, "--data", "synthetic", "--n", 3, "--steps", 2,
                           "--out", out_npz, "--device", "cpu")
    assert rc == 0, err
    info = _last_json(out)
    assert out_npz.is_file()
    with np.load(out_npz, allow_pickle=False) as z:
        assert {"real", "reconstructed", "generated"} <= set(z.files)
        arrays = {k: z[k] for k in ("real", "reconstructed", "generated")}
    for k, a in arrays.items():
        assert a.shape == (3, 3, 300), k
        assert np.isfinite(a).all(), k
    # "real" is in physical units again: synthetic test windows, one class after another.
    test = make_synthetic(n=128, length=300, seed=2)
    first_of = [int(np.flatnonzero(test.y == c)[0]) for c in range(3)]
    np.testing.assert_allclose(arrays["real"], test.x[first_of], atol=1e-4)
    pngs = sorted(out_npz.parent.glob("*.png"))
    assert len(pngs) == 2, pngs
    for p in pngs:
        assert p.read_bytes()[:8] == PNG_MAGIC
    assert Path(info["png_reconstructed"]).is_file() and Path(info["png_generated"]).is_file()


def test_sample_bad_arguments(run_dir, tmp_path):
    rc, out, err = run_cli("sample", "--ckpt", run_dir, "--data", "synthetic", "--n", 0, "--out", tmp_path / "s.npz")
    assert rc == 2
    _assert_one_error_line(err, "sample")
    assert not (tmp_path / "s.npz").exists()


def test_demo_quick(tmp_path):
    d = tmp_path / "demo"
    t0 = time.perf_counter()
    rc, out, err = run_cli("demo", "--quick", "--out", d, "--device", "cpu")
    elapsed = time.perf_counter() - t0
    assert rc == 0, err
    assert elapsed < 60, f"demo --quick took {elapsed:.1f} s"
    report = (d / "report.md").read_text()
    for needle in ("Linear probe", "Fine-tuning", "macro-F1", "| encoder | labels | macro-F1 |",
                   "FlowFM pretrained", "random-init encoder", "supervised from scratch",
                   "Label efficiency", "| k per class | probe, FlowFM | probe, random-init | probe gain | fine-tuned FlowFM |"):
        assert needle in report, needle
    assert (d / "label_efficiency.png").stat().st_size > 1000
    results = json.loads((d / "results.json").read_text())
    for table in ("probe", "finetune"):
        assert results[table]
        for vals in results[table].values():
            assert vals and all(0.0 <= v <= 1.0 for v in vals)
    assert results["pretrain_steps"] == 30
    few = results["per_class"]
    assert set(few["FlowFM pretrained"]) == {"1", "2", "5", "10"}
    assert len(few["FlowFM pretrained"]["1"]) == 10 and len(few["random-init encoder"]["1"]) == 30
    for name in ("fine-tuned FlowFM encoder", "supervised from scratch"):
        assert set(few[name]) == {"1", "2", "5", "10"} and all(len(v) == 10 for v in few[name].values())
    assert "fine-tune - scratch >= 2 sd at 1 per class" in results["checks"]
    for png in ("samples_reconstructed.png", "samples_generated.png"):
        assert (d / png).read_bytes()[:8] == PNG_MAGIC


# --------------------------------------------------------------------------------------------------
# Hostile input
# --------------------------------------------------------------------------------------------------

class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _write_bad(kind: str, tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    if kind == "2d":
        p = tmp_path / "bad.npy"
        np.save(p, rng.standard_normal((8, 300)).astype(np.float32))
    elif kind == "nan":
        p = tmp_path / "bad.npy"
        x = rng.standard_normal((8, 3, 300)).astype(np.float32)
        x[3, 1, 4] = np.nan
        np.save(p, x)
    elif kind == "object":
        p = tmp_path / "bad.npy"
        a = np.empty((2, 3, 300), dtype=object)
        a[...] = 0.0
        a[0, 0, 0] = _Evil(tmp_path / "pwned")
        np.save(p, a, allow_pickle=True)
    elif kind == "pickle":
        p = tmp_path / "bad.npy"
        p.write_bytes(pickle.dumps(_Evil(tmp_path / "pwned")))
    elif kind == "wrong-length":
        p = tmp_path / "bad.npy"
        np.save(p, rng.standard_normal((8, 3, 101)).astype(np.float32))  # not a multiple of the patch
    elif kind == "missing":
        p = tmp_path / "missing.npy"
    elif kind in ("bool", "complex", "strings"):
        p = tmp_path / "bad.npy"
        x = rng.standard_normal((8, 3, 300))
        np.save(p, {"bool": x > 0, "complex": x.astype(np.complex64), "strings": x.astype(str)}[kind])
    elif kind == "inf":
        p = tmp_path / "bad.npz"
        x = rng.standard_normal((8, 3, 300)).astype(np.float32)
        x[0, 0, 0] = -np.inf
        np.savez(p, x=x)
    elif kind == "zero-windows":
        p = tmp_path / "bad.npy"
        np.save(p, np.zeros((0, 3, 300), np.float32))
    elif kind == "huge-header":   # claims 10^12 float32 elements: refused from the header, nothing allocated
        p = tmp_path / "bad.npy"
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False,
                                                   "shape": (10 ** 6, 3, 333334)})
        p.write_bytes(buf.getvalue() + b"\0" * 4096)
    elif kind == "object-labels":
        p = tmp_path / "bad.npz"
        y = np.empty(8, dtype=object)
        y[:] = 0
        y[0] = _Evil(tmp_path / "pwned")
        np.savez(p, x=rng.standard_normal((8, 3, 300)).astype(np.float32), y=y)
    elif kind == "truncated-npz":
        p = tmp_path / "bad.npz"
        np.savez(p, x=rng.standard_normal((8, 3, 300)).astype(np.float32))
        p.write_bytes(p.read_bytes()[:1000])
    else:
        raise AssertionError(kind)
    return p


HOSTILE = ["2d", "nan", "inf", "object", "object-labels", "pickle", "wrong-length", "missing", "truncated-npz",
           "bool", "complex", "strings", "zero-windows", "huge-header"]


@pytest.mark.parametrize("kind", HOSTILE)
def test_pretrain_hostile_data(kind, tmp_path):
    bad = _write_bad(kind, tmp_path)
    out_dir = tmp_path / "out"
    rc, out, err = run_cli(*PRETRAIN, "--steps", 5, "--data", bad, "--out", out_dir)
    assert rc == 2
    _assert_one_error_line(err, "pretrain")
    assert str(bad) in err
    assert out.strip() == ""
    assert not out_dir.exists() or not (out_dir / "checkpoints").exists()
    assert not out_dir.exists(), "nothing should be written for unusable data"
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("kind", ["object", "huge-header", "nan", "strings"])
@pytest.mark.parametrize("flag", ["--data", "--test-data"])
def test_probe_and_sample_hostile_data(kind, flag, run_dir, tmp_path):
    """The subcommands that read user arrays with a trained model: one line, exit 2, nothing written."""
    bad = _write_bad(kind, tmp_path)
    good = tmp_path / "good.npz"
    w = make_synthetic(n=16, length=300, seed=3)
    np.savez(good, x=w.x, y=w.y)
    data = {"--data": good, "--test-data": good, flag: bad}
    for cmd, extra in (("probe", ()), ("sample", ("--out", tmp_path / "s" / "s.npz"))):
        rc, out, err = run_cli(cmd, "--ckpt", run_dir, "--data", data["--data"], "--test-data", data["--test-data"],
                               "--device", "cpu", *extra)
        assert rc == 2, (cmd, err)
        _assert_one_error_line(err, cmd)
        assert str(bad) in err
        assert out.strip() == ""
    assert not (tmp_path / "s").exists()
    assert not (tmp_path / "pwned").exists()


def test_bad_device_is_one_error_line(tmp_path):
    rc, out, err = run_cli(*PRETRAIN, "--steps", 1, "--device", "not-a-device", "--out", tmp_path / "out")
    assert rc == 2
    _assert_one_error_line(err, "pretrain")
    assert "--device" in err


def test_compare_takes_only_named_datasets(tmp_path):
    bad = _write_bad("2d", tmp_path)
    with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit) as ei:
        main(["compare", "--quick", "--data", str(bad), "--out", str(tmp_path / "out")])
    assert ei.value.code == 2
    assert not (tmp_path / "out").exists()


def test_user_error_message_is_one_line_and_bugs_keep_tracebacks(monkeypatch, tmp_path):
    import flowfm_fast.cli as cli

    def multi_line(_a):
        raise ValueError("first line\n\n  second line\n")

    def bug(_a):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(cli, "cmd_demo", multi_line)
    rc, out, err = run_cli("demo", "--out", tmp_path)
    assert rc == 2
    assert err == "flowfm-fast demo: error: first line; second line\n"
    monkeypatch.setenv("FLOWFM_DEBUG", "1")   # validation errors with their traceback, for bug reports
    with pytest.raises(ValueError, match="second line"):
        run_cli("demo", "--out", tmp_path)
    monkeypatch.delenv("FLOWFM_DEBUG")
    monkeypatch.setattr(cli, "cmd_demo", bug)
    with pytest.raises(RuntimeError, match="internal bug"):
        run_cli("demo", "--out", tmp_path)


def test_console_script_hostile_data_exit_code(tmp_path, _env):
    bad = _write_bad("2d", tmp_path)
    out_dir = tmp_path / "out"
    cmd = [str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.is_file() else [sys.executable, "-m", "flowfm_fast.cli"]
    p = run_subprocess(cmd + ["pretrain", "--config", "tiny", "--data", str(bad), "--steps", "5",
                              "--out", str(out_dir), "--quiet"], _env)
    assert p.returncode == 2, p.stderr
    _assert_one_error_line(p.stderr, "pretrain")
    assert p.stdout.strip() == ""
    assert not out_dir.exists()


def test_probe_nonexistent_checkpoint(tmp_path, _env):
    p = run_subprocess([sys.executable, "-m", "flowfm_fast.cli", "probe", "--ckpt", str(tmp_path / "nonexistent"),
                        "--data", "synthetic"], _env)
    assert p.returncode == 2, p.stderr
    _assert_one_error_line(p.stderr, "probe")
    assert p.stdout.strip() == ""


def test_probe_run_dir_without_checkpoints(tmp_path):
    d = tmp_path / "run"
    (d / "checkpoints").mkdir(parents=True)
    rc, out, err = run_cli("probe", "--ckpt", d, "--data", "synthetic")
    assert rc == 2
    _assert_one_error_line(err, "probe")


@pytest.mark.parametrize("kind", ["random", "truncated", "empty", "foreign-tensors", "bad-state-json",
                                  "state-without-config"])
def test_probe_corrupted_checkpoint(kind, run_dir, tmp_path):
    d = _copy_run(run_dir, tmp_path)
    step = d / "checkpoints" / "step_00000020"
    model = step / "model.safetensors"
    if kind == "random":
        model.write_bytes(np.random.default_rng(0).bytes(model.stat().st_size))
    elif kind == "truncated":
        model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    elif kind == "empty":
        model.write_bytes(b"")
    elif kind == "foreign-tensors":
        from safetensors.torch import save_file
        save_file({"model.something": torch.zeros(3)}, str(model))
    elif kind == "bad-state-json":
        (step / "state.json").write_text("{not json")
    elif kind == "state-without-config":
        (step / "state.json").write_text(json.dumps({"step": 20}))
    rc, out, err = run_cli("probe", "--ckpt", d, "--data", "synthetic", "--device", "cpu")
    assert rc == 2
    _assert_one_error_line(err, "probe")
    assert out.strip() == ""


def test_spread_indices_takes_classes_in_turn():
    from flowfm_fast.eval.samples import spread_indices
    y = np.array([0, 0, 1, 1, 2, 2, 0, -1])
    picks = spread_indices(y, 5, len(y))
    assert list(y[picks[:3]]) == [0, 1, 2]          # one of each class first
    assert len(set(picks.tolist())) == 5 and (y[picks] >= 0).all()
    assert list(spread_indices(None, 10, 4)) == [0, 1, 2, 3]
    assert list(spread_indices(np.full(6, -1), 2, 6)) == [0, 1]


def test_pretrain_takes_the_window_length_of_user_files(tmp_path):
    """User windows of another length (here 120 samples) train a model of that length."""
    from flowfm_fast.data import make_synthetic
    from flowfm_fast.train import load_trained
    data = tmp_path / "w.npz"
    w = make_synthetic(n=32, length=120, seed=0)
    np.savez(data, x=w.x, y=w.y)
    out = tmp_path / "run"
    assert main(["pretrain", "--config", "tiny", "--data", str(data), "--steps", "2", "--batch-size", "8",
                 "--out", str(out), "--quiet"]) == 0
    model, _, _ = load_trained(out)
    assert model.cfg.length == 120
    assert model.sample(torch.zeros(2, model.cfg.encoder.z_dim), steps=1).shape == (2, 3, 120)
    odd = tmp_path / "odd.npy"
    np.save(odd, make_synthetic(n=8, length=125, seed=0).x)   # not a multiple of the DiT patch
    assert main(["pretrain", "--config", "tiny", "--data", str(odd), "--steps", "1", "--out",
                 str(tmp_path / "odd"), "--quiet"]) == 2


def test_top_level_help_is_plain_text_and_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text  # reST markup would show raw
    for command in ("pretrain", "probe", "sample", "compare", "demo", "profile"):
        assert command in text
    assert "--help" in text.split("options:")[-1]  # the epilogue points at each command's options


def _numbers(results: dict) -> dict:
    """What a demo measured, without its timings."""
    drop = {"timings_s", "pretrain_seconds", "checkpoint"}
    out = {k: v for k, v in results.items() if k not in drop}
    out["recon_mse_by_steps"] = {k: v[0] for k, v in results["recon_mse_by_steps"].items()}
    out["sampling"] = {k: v for k, v in results["sampling"].items()
                       if "second" not in k and k != "npz" and not k.startswith("png")}
    return out


@pytest.mark.slow
def test_demo_is_deterministic_and_says_where_its_checkpoint_is(tmp_path):
    """The demo trains a fixed number of steps: two runs give the same numbers, and the report names
    the checkpoint folder that `sample --ckpt` takes."""
    from flowfm_fast.demo import run_demo
    runs = [run_demo(tmp_path / f"demo{i}", quick=True, device="cpu") for i in range(2)]
    a, b = (json.loads((r.parent / "results.json").read_text()) for r in runs)
    assert a["pretrain_steps"] == a["planned_steps"] == 30 and a["checks"] is not None
    assert _numbers(a) == _numbers(b)
    report = runs[0].read_text()
    assert f"Checkpoint: `{tmp_path / 'demo0' / 'pretrain'}`" in report
    assert "Short run" not in report and ("PASS" in report or "MISS" in report)
    rc, out, err = run_cli("sample", "--ckpt", tmp_path / "demo0", "--data", "synthetic", "--n", "2",
                           "--steps", "2", "--out", tmp_path / "s.npz", "--device", "cpu")
    assert rc == 0, err  # the demo folder itself is accepted: its one run is taken


def test_demo_cut_short_by_its_budget_says_so(tmp_path):
    from flowfm_fast.demo import run_demo
    report = run_demo(tmp_path / "demo", quick=True, minutes=1e-6, device="cpu")
    results = json.loads((report.parent / "results.json").read_text())
    assert results["pretrain_steps"] < results["planned_steps"] and results["checks"] is None
    text = report.read_text()
    assert text.index("Short run: pretraining stopped at step") < text.index("## Linear probe")
    assert "PASS" not in text and "MISS" not in text and "not judged" in text
