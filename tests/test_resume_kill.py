"""Fault tolerance: a run killed with SIGKILL resumes to exactly the weights of an uninterrupted
run; a crash at any point inside a checkpoint write never leaves a half-written checkpoint that
gets loaded; damaged checkpoints and checkpoints of another config fail with a clear error."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flowfm_fast.cli import main
from flowfm_fast.data import make_synthetic
from flowfm_fast.train import CheckpointError, TrainConfig, find_checkpoint, read_checkpoint, train_flowfm
from flowfm_fast.train import checkpoint as ckpt_mod
from tiny_training import L, model_cfg, synthetic_windows

ROOT = Path(__file__).resolve().parents[1]
# The same thread count in every process compared: CPU reductions may depend on it.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def final_tensors(out: Path, step: int) -> tuple[dict, dict]:
    d = ckpt_mod.step_dir(out / "checkpoints", step)
    return load_file(str(d / ckpt_mod.MODEL)), load_file(str(d / ckpt_mod.OPTIM))


# ---- SIGKILL, then --resume, through the CLI ------------------------------------------------

STEPS = 60   # 512 synthetic windows / 16 per batch = 32 steps an epoch: the first kill is mid-epoch
PRETRAIN = [sys.executable, "-m", "flowfm_fast.cli", "pretrain", "--data", "synthetic", "--config", "tiny",
            "--steps", str(STEPS), "--batch-size", "16", "--lr", "3e-3", "--ema", "0.9", "--ckpt-every", "5",
            "--log-every", "5", "--device", "cpu", "--quiet"]


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def latest_step(out: Path) -> int:
    try:
        return int((out / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    except (OSError, ValueError):
        return 0


def run_and_kill(args: list[str], out: Path, at_least: int) -> int:
    """Start a run, SIGKILL it as soon as a checkpoint at step >= ``at_least`` exists; its step then."""
    proc = subprocess.Popen(args + ["--out", str(out)], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while latest_step(out) < at_least:
            if proc.poll() is not None:
                pytest.fail(f"run ended ({proc.returncode}) before it could be killed: {proc.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint within 120 s")
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    step = latest_step(out)
    assert step < STEPS, "the run finished before the kill landed"
    return step


def run(args: list[str], out: Path) -> None:
    r = subprocess.run(args + ["--out", str(out)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-4000:]


def test_sigkill_twice_then_resume_equals_uninterrupted(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    run(PRETRAIN, full)
    first = run_and_kill(PRETRAIN, cut, at_least=10)
    second = run_and_kill(PRETRAIN + ["--resume"], cut, at_least=first + 15)
    assert first < second < STEPS
    run(PRETRAIN + ["--resume"], cut)
    model_a, optim_a = final_tensors(full, STEPS)
    model_b, optim_b = final_tensors(cut, STEPS)
    # bit for bit: weights, EMA weights, BatchNorm statistics and the AdamW moments
    assert any(k.startswith("ema.") for k in model_a)
    assert tensors_equal(model_a, model_b)
    assert tensors_equal(optim_a, optim_b)
    assert not list((cut / "checkpoints").glob(ckpt_mod.TMP_PREFIX + "*"))
    # one clean loss curve, the uninterrupted one: steps logged before a kill are replaced on resume
    assert losses(cut) == losses(full)


# ---- a crash at each point of a checkpoint write (in process) --------------------------------

@pytest.fixture(scope="module")
def data():
    return synthetic_windows()


def train_cfg(**kw):
    base = dict(steps=12, batch_size=16, lr=3e-3, warmup_steps=3, log_every=2, ckpt_every=4, keep_checkpoints=10,
                ema_decay=0.8, seed=0)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    X, std = data
    out = tmp_path_factory.mktemp("full")
    train_flowfm(model_cfg(), X, train_cfg(), out, std, progress=False)
    return out


class Killed(BaseException):
    """Stands in for SIGKILL: no ``except Exception`` handler runs, nothing is cleaned up."""


# (function to break, which of its calls dies): the second checkpoint (step 8) is cut short, or
# the first (step 4), when there is nothing to resume from and the run starts again.
CRASH_POINTS = {
    "after_model_file": ("save_file", 4),       # model.safetensors written, optim not
    "before_state_json": ("_write_json", 2),     # both tensor files, no state.json
    "before_rename": ("rename", 2),              # a complete temporary directory
    "before_pointer": ("replace", 2),            # step_00000008 in place, `latest` still on step 4
    "first_before_rename": ("rename", 1),        # only a temporary directory
}


@pytest.mark.parametrize("point", list(CRASH_POINTS))
def test_crash_inside_checkpoint_write_is_never_loaded(data, uninterrupted, tmp_path, monkeypatch, point):
    X, std = data
    name, nth = CRASH_POINTS[point]
    target = os if name in ("rename", "replace") else ckpt_mod
    real, calls = getattr(target, name), []

    def dying(*args, **kw):
        calls.append(1)
        if len(calls) == nth:
            raise Killed(point)
        return real(*args, **kw)

    with monkeypatch.context() as m:
        m.setattr(target, name, dying)
        with pytest.raises(Killed):
            train_flowfm(model_cfg(), X, train_cfg(), tmp_path, std, progress=False)
    root = tmp_path / "checkpoints"
    leftovers = list(root.glob(ckpt_mod.TMP_PREFIX + "*"))
    assert leftovers or point == "before_pointer"
    # whatever was left, the checkpoint found is a complete one from before the crash
    if point.startswith("first"):
        with pytest.raises(CheckpointError, match="no complete checkpoint"):
            find_checkpoint(tmp_path)
    else:
        assert find_checkpoint(tmp_path).name == "step_00000004"
        _, _, state, _ = read_checkpoint(tmp_path)
        assert state["step"] == 4
    train_flowfm(model_cfg(), X, train_cfg(), tmp_path, std, resume=True, progress=False)
    assert tensors_equal(final_tensors(tmp_path, 12)[0], final_tensors(uninterrupted, 12)[0])
    assert tensors_equal(final_tensors(tmp_path, 12)[1], final_tensors(uninterrupted, 12)[1])
    assert not list(root.glob(ckpt_mod.TMP_PREFIX + "*")), "the next save removes what a killed one left"


def test_pointer_outside_the_checkpoints_is_ignored(uninterrupted, tmp_path):
    import shutil
    shutil.copytree(uninterrupted / "checkpoints", tmp_path / "checkpoints")
    (tmp_path / "elsewhere").mkdir()
    for f in ckpt_mod.FILES:
        (tmp_path / "elsewhere" / f).write_text("{}")
    (tmp_path / "checkpoints" / "latest").write_text("../elsewhere")
    assert find_checkpoint(tmp_path).name == "step_00000012"


# ---- damage and another config: clear errors, never a partial load ---------------------------

@pytest.mark.parametrize("name", [ckpt_mod.MODEL, ckpt_mod.OPTIM])
def test_flipped_byte_inside_tensor_data_is_caught(uninterrupted, tmp_path, name):
    """The header still parses, so without the SHA-256 in state.json this would load silently."""
    import shutil
    shutil.copytree(uninterrupted / "checkpoints" / "step_00000012", tmp_path / "step_00000012")
    f = tmp_path / "step_00000012" / name
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0x10
    f.write_bytes(bytes(raw))
    load_file(str(f))   # still a valid safetensors file
    with pytest.raises(CheckpointError, match=f"{name} is corrupted"):
        read_checkpoint(tmp_path / "step_00000012")


def test_step_directory_missing_a_file_raises(uninterrupted, tmp_path):
    import shutil
    d = tmp_path / "step_00000012"
    shutil.copytree(uninterrupted / "checkpoints" / "step_00000012", d)
    (d / ckpt_mod.OPTIM).unlink()
    with pytest.raises(CheckpointError, match="incomplete checkpoint, missing optim.safetensors"):
        read_checkpoint(d)


@pytest.mark.parametrize("other", [dict(seed=1), dict(batch_size=8), dict(ema_decay=0.0),
                                   dict(augment=dict(enabled=False)), dict(augment=dict(target="augmented"))],
                         ids=["seed", "batch_size", "ema_decay", "augment", "augment_target"])
def test_resume_with_other_training_config_raises(data, uninterrupted, tmp_path, other):
    import dataclasses
    import shutil
    from flowfm_fast.data import AugmentConfig
    X, std = data
    shutil.copytree(uninterrupted, tmp_path / "run")
    if "augment" in other:
        other = {"augment": AugmentConfig(**other["augment"])}
    cfg = dataclasses.replace(train_cfg(steps=16), **other)
    field = next(iter(other))
    with pytest.raises(CheckpointError, match=f"another training config \\({field}: checkpoint"):
        train_flowfm(model_cfg(), X, cfg, tmp_path / "run", std, resume=True, progress=False)


def test_resume_of_a_checkpoint_older_than_an_augment_field(data, uninterrupted, tmp_path):
    """state.json written before AugmentConfig grew ``target``: the missing field takes its default."""
    import shutil
    X, std = data
    shutil.copytree(uninterrupted, tmp_path / "run")
    state_path = find_checkpoint(tmp_path / "run") / ckpt_mod.STATE
    state = json.loads(state_path.read_text())
    del state["train_config"]["augment"]["target"]
    state_path.write_text(json.dumps(state))
    r = train_flowfm(model_cfg(), X, train_cfg(steps=16), tmp_path / "run", std, resume=True, progress=False)
    assert r.step == 16


@pytest.mark.parametrize("change", ["fewer", "reordered", "other_file"])
def test_resume_on_other_windows_raises(data, uninterrupted, tmp_path, change):
    import shutil
    X, std = data
    shutil.copytree(uninterrupted, tmp_path / "run")
    other = {"fewer": X[:-1], "reordered": X[::-1].copy(),
             "other_file": std.apply(make_synthetic(n=64, channels=3, length=L, classes=4, seed=5).x)}[change]
    with pytest.raises(CheckpointError, match="other pretraining windows"):
        train_flowfm(model_cfg(), other, train_cfg(steps=16), tmp_path / "run", std, resume=True, progress=False)


def test_resume_tolerates_last_bit_differences_in_the_windows(data, uninterrupted, tmp_path):
    """The same windows loaded on another machine may differ in the last bit: that still resumes."""
    import shutil
    X, std = data
    shutil.copytree(uninterrupted, tmp_path / "run")
    nudged = np.nextafter(X, np.float32(np.inf))
    r = train_flowfm(model_cfg(), nudged, train_cfg(steps=14, warmup_steps=2), tmp_path / "run", std, resume=True,
                     progress=False)
    assert r.step == 14


def test_resume_may_extend_the_run(data, uninterrupted, tmp_path):
    import shutil
    X, std = data
    shutil.copytree(uninterrupted, tmp_path / "run")
    r = train_flowfm(model_cfg(), X, train_cfg(steps=14, warmup_steps=2), tmp_path / "run", std, resume=True,
                     progress=False)
    assert r.step == 14


def test_cli_resume_errors_are_one_line(tmp_path, capsys):
    args = ["pretrain", "--data", "synthetic", "--config", "tiny", "--steps", "2", "--batch-size", "8",
            "--ckpt-every", "1", "--device", "cpu", "--quiet", "--out", str(tmp_path)]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args + ["--resume", "--velocity", "resnet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another model config" in err
    assert main(args + ["--resume", "--seed", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "seed: checkpoint 0, now 3" in err
    f = find_checkpoint(tmp_path) / ckpt_mod.MODEL
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0xFF
    f.write_bytes(bytes(raw))
    assert main(args + ["--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.safetensors is corrupted" in err
