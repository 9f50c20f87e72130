"""Joint training loop: loss falls, LR schedule, batch order, checkpoints (round trip, exact
resume, damaged / half-written directories) and encoder-side augmentation."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from flowfm_fast.data import AugmentConfig, augment, random_rotations
from flowfm_fast.train import (CheckpointError, TrainConfig, batch_indices, build_model, find_checkpoint,
                               load_trained, lr_factor, read_checkpoint, train_flowfm)
from flowfm_fast.train.loop import make_step
from tiny_training import model_cfg, synthetic_windows


@pytest.fixture(scope="module")
def data():
    return synthetic_windows()


def train_cfg(**kw):
    base = dict(steps=12, batch_size=16, lr=3e-3, warmup_steps=3, log_every=2, ckpt_every=100, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- training works ---------------------------------------------------------------------------

def test_loss_falls_on_synthetic(data, tmp_path):
    X, std = data
    cfg = train_cfg(steps=80, lr=3e-3, warmup_steps=10, log_every=4)
    res = train_flowfm(model_cfg(), X, cfg, tmp_path, std, progress=False)
    assert res.step == 80
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == list(range(4, 81, 4))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in recs)
    first = np.mean([r["loss"] for r in recs[:4]])
    last = np.mean([r["loss"] for r in recs[-4:]])
    assert last <= 0.8 * first, (first, last)
    assert res.last_loss == recs[-1]["loss"]
    # the logged learning rate follows the schedule
    for r in recs:
        assert r["lr"] == pytest.approx(cfg.lr * lr_factor(r["step"] - 1, cfg))
    assert res.checkpoint is not None and res.checkpoint.name == "step_00000080"
    assert find_checkpoint(tmp_path) == res.checkpoint


def test_train_rejects_bad_windows(data, tmp_path):
    X, std = data
    with pytest.raises(ValueError, match="windows"):
        train_flowfm(model_cfg(), X[:, :2], train_cfg(steps=1), tmp_path, std, progress=False)
    with pytest.raises(ValueError, match="windows"):
        train_flowfm(model_cfg(), X[:, :, :50], train_cfg(steps=1), tmp_path, std, progress=False)


@pytest.mark.parametrize("field,value", [("steps", 0), ("batch_size", 0), ("lr", 0.0), ("ema_decay", 1.0),
                                         ("ema_decay", -0.1)])
def test_train_config_validation(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(train_cfg(), **{field: value}).validate()


def test_train_config_round_trip():
    cfg = train_cfg(augment=AugmentConfig(max_angle_deg=10.0, enabled=False), max_minutes=1.5)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# ---- LR schedule and batch order -------------------------------------------------------------

def test_lr_factor_schedule():
    cfg = TrainConfig(steps=200, warmup_steps=20, min_lr_ratio=0.1)
    f = [lr_factor(s, cfg) for s in range(cfg.steps + 1)]
    warm = f[:cfg.warmup_steps]
    # warmup: positive, linear increments, reaching the peak 1
    assert warm[0] > 0
    diffs = np.diff(warm)
    assert np.all(diffs > 0) and np.allclose(diffs, diffs[0])
    assert warm[-1] == pytest.approx(1.0)
    assert max(f) == pytest.approx(1.0)
    assert all(v <= 1.0 + 1e-12 for v in f)
    # cosine decay after warmup, monotone, to min_lr_ratio at the end
    decay = f[cfg.warmup_steps:]
    assert decay[0] == pytest.approx(1.0)
    assert np.all(np.diff(decay) <= 1e-12)
    assert f[cfg.steps] == pytest.approx(cfg.min_lr_ratio)
    assert f[cfg.steps - 1] == pytest.approx(cfg.min_lr_ratio, abs=1e-3)
    mid = cfg.warmup_steps + (cfg.steps - cfg.warmup_steps) // 2
    assert f[mid] == pytest.approx((1 + cfg.min_lr_ratio) / 2)
    quarter = cfg.warmup_steps + (cfg.steps - cfg.warmup_steps) // 4
    assert f[quarter] == pytest.approx(cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * (1 + math.cos(math.pi / 4)) / 2)
    # never below the floor, even past the end
    assert lr_factor(cfg.steps + 50, cfg) == pytest.approx(cfg.min_lr_ratio)


def test_lr_factor_without_warmup():
    cfg = TrainConfig(steps=100, warmup_steps=0, min_lr_ratio=0.0)
    assert lr_factor(0, cfg) == pytest.approx(1.0)
    assert lr_factor(100, cfg) == pytest.approx(0.0, abs=1e-12)


def test_batch_indices_epochs_are_permutations():
    n, batch, seed = 64, 16, 3
    per_epoch = n // batch
    epochs = []
    for e in range(3):
        idx = torch.cat([batch_indices(e * per_epoch + s, n, batch, seed) for s in range(per_epoch)])
        assert idx.shape == (n,)
        assert torch.equal(torch.sort(idx).values, torch.arange(n))
        epochs.append(idx)
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    # each batch has the requested size and a deterministic content for the seed
    for s in range(8):
        b = batch_indices(s, n, batch, seed)
        assert b.shape == (batch,) and b.dtype == torch.int64
        assert torch.equal(b, batch_indices(s, n, batch, seed))
    assert not torch.equal(batch_indices(0, n, batch, seed), batch_indices(0, n, batch, seed + 1))


def test_batch_indices_uneven_and_small():
    n, batch = 70, 16
    per_epoch = n // batch
    idx = torch.cat([batch_indices(s, n, batch, 0) for s in range(per_epoch)])
    assert idx.numel() == per_epoch * batch and idx.unique().numel() == idx.numel()
    assert int(idx.min()) >= 0 and int(idx.max()) < n
    small = batch_indices(5, 10, 16, 0)
    assert torch.equal(torch.sort(small).values, torch.arange(10))


# ---- checkpoints ------------------------------------------------------------------------------

def test_checkpoint_round_trip_no_ema(data, tmp_path):
    X, std = data
    res = train_flowfm(model_cfg(), X, train_cfg(steps=6), tmp_path, std, progress=False)
    assert res.ema is None
    model, std2, state = load_trained(tmp_path)
    assert state_equal(model.state_dict(), res.model.state_dict())
    assert not model.training
    assert state["step"] == 6
    np.testing.assert_array_equal(std2.mean, std.mean)
    np.testing.assert_array_equal(std2.std, std.std)
    assert model.cfg == model_cfg()
    # it is the trained model, not a fresh init
    fresh = type(model)(model_cfg())
    assert not state_equal(fresh.state_dict(), model.state_dict())
    # loading by step directory or checkpoints folder gives the same
    model_b, _, _ = load_trained(tmp_path / "checkpoints" / "step_00000006")
    assert state_equal(model_b.state_dict(), model.state_dict())


@pytest.mark.parametrize("velocity", ["dit", "resnet"])
def test_checkpoint_round_trip_ema(data, tmp_path, velocity):
    X, std = data
    res = train_flowfm(model_cfg(velocity=velocity), X, train_cfg(steps=6, ema_decay=0.9), tmp_path, std,
                       progress=False)
    assert res.ema is not None and res.eval_model is res.ema
    ema_sd, model_sd = res.ema.state_dict(), res.model.state_dict()
    assert not state_equal(ema_sd, model_sd)
    loaded, _, _ = load_trained(tmp_path)
    assert state_equal(loaded.state_dict(), ema_sd)
    raw, _, _ = load_trained(tmp_path, use_ema=False)
    assert state_equal(raw.state_dict(), model_sd)




def _drop_last_checkpoint(out: Path, last: int, keep: int) -> None:
    root = out / "checkpoints"
    shutil.rmtree(root / f"step_{last:08d}")
    (root / "latest").write_text(f"step_{keep:08d}")


@pytest.mark.parametrize("ema_decay", [0.0, 0.8], ids=["no_ema", "ema"])
def test_resume_is_exact(data, tmp_path, ema_decay):
    X, std = data
    N = 12
    cfg = train_cfg(steps=N, ckpt_every=N // 2, keep_checkpoints=10, ema_decay=ema_decay)
    a = train_flowfm(model_cfg(), X, cfg, tmp_path / "a", std, progress=False)
    b_dir = tmp_path / "b"
    b = train_flowfm(model_cfg(), X, cfg, b_dir, std, progress=False)
    assert state_equal(a.model.state_dict(), b.model.state_dict())   # determinism on CPU
    ckpts = sorted(p.name for p in (b_dir / "checkpoints").glob("step_*"))
    assert ckpts == [f"step_{N // 2:08d}", f"step_{N:08d}"]

    _drop_last_checkpoint(b_dir, N, N // 2)
    assert find_checkpoint(b_dir).name == f"step_{N // 2:08d}"
    with open(b_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 13, "lo')   # a record cut short by the kill
    r = train_flowfm(model_cfg(), X, cfg, b_dir, std, resume=True, progress=False)
    assert r.step == N
    assert state_equal(r.model.state_dict(), a.model.state_dict())
    if ema_decay:
        assert state_equal(r.ema.state_dict(), a.ema.state_dict())
    # the records after the checkpoint (and the torn line) are replaced by the resumed run's, which
    # logs the same losses as the uninterrupted one: one clean curve
    assert read_metrics(b_dir) == [{**rec, "seconds": rec_b["seconds"]}
                                   for rec, rec_b in zip(read_metrics(tmp_path / "a"), read_metrics(b_dir))]
    assert [rec["step"] for rec in read_metrics(b_dir)] == list(range(cfg.log_every, N + 1, cfg.log_every))
    assert find_checkpoint(b_dir).name == f"step_{N:08d}"


def test_resume_of_finished_run_is_a_no_op(data, tmp_path):
    X, std = data
    cfg = train_cfg(steps=4)
    a = train_flowfm(model_cfg(), X, cfg, tmp_path, std, progress=False)
    r = train_flowfm(model_cfg(), X, cfg, tmp_path, std, resume=True, progress=False)
    assert r.step == 4
    assert state_equal(r.model.state_dict(), a.model.state_dict())


@pytest.fixture
def trained_run(data, tmp_path):
    X, std = data
    out = tmp_path / "run"
    train_flowfm(model_cfg(), X, train_cfg(steps=4, ckpt_every=2, keep_checkpoints=5), out, std, progress=False)
    return out


def test_half_written_checkpoints_are_skipped(trained_run):
    root = trained_run / "checkpoints"
    good = root / "step_00000004"
    assert find_checkpoint(trained_run) == good
    # an unfinished temporary directory with a higher step, fully populated
    shutil.copytree(good, root / ".tmp-step_00000009-12345")
    # a step directory missing its weights, with the pointer moved onto it
    partial = root / "step_00000008"
    shutil.copytree(good, partial)
    (partial / "model.safetensors").unlink()
    (root / "latest").write_text(partial.name)
    assert find_checkpoint(trained_run) == good
    assert find_checkpoint(root) == good
    # and with no pointer at all
    (root / "latest").unlink()
    assert find_checkpoint(trained_run) == good
    # a step directory missing state.json is skipped as well
    no_state = root / "step_00000007"
    shutil.copytree(good, no_state)
    (no_state / "state.json").unlink()
    assert find_checkpoint(trained_run) == good
    _, _, state, where = read_checkpoint(trained_run)
    assert where == good and state["step"] == 4
    model, _, _ = load_trained(trained_run)
    assert model is not None


def test_no_complete_checkpoint_raises(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step_00000001").mkdir(parents=True)
    with pytest.raises(CheckpointError):
        find_checkpoint(tmp_path)
    with pytest.raises(CheckpointError):
        find_checkpoint(tmp_path / "missing")


def test_a_folder_holding_one_run_resolves_to_it(trained_run, tmp_path):
    """``sample --ckpt runs/demo``: the demo folder holds its run in pretrain/; that run is taken."""
    demo = tmp_path / "demo"
    demo.mkdir()
    shutil.copytree(trained_run, demo / "pretrain")
    assert find_checkpoint(demo) == find_checkpoint(demo / "pretrain")
    assert find_checkpoint(demo).parent.parent == demo / "pretrain"
    shutil.copytree(trained_run, demo / "other")
    with pytest.raises(CheckpointError, match="several runs.*other, pretrain"):
        find_checkpoint(demo)


def test_missing_checkpoint_messages_say_what_to_pass(tmp_path):
    (tmp_path / "empty").mkdir()
    for where in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(CheckpointError, match="pass a run directory"):
            find_checkpoint(where)
    (tmp_path / "run" / "checkpoints" / "step_00000002").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"no complete checkpoint \(1 step folder"):
        find_checkpoint(tmp_path / "run")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupted_weights_raise(trained_run, data, damage):
    X, std = data
    f = trained_run / "checkpoints" / "step_00000004" / "model.safetensors"
    raw = f.read_bytes()
    if damage == "garbage":
        f.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif damage == "truncated":
        f.write_bytes(raw[: len(raw) // 2])
    else:
        f.write_bytes(b"")
    with pytest.raises(CheckpointError):
        read_checkpoint(trained_run)
    with pytest.raises(CheckpointError):
        load_trained(trained_run)
    with pytest.raises(CheckpointError):
        train_flowfm(model_cfg(), X, train_cfg(steps=6, ckpt_every=2, keep_checkpoints=5), trained_run, std,
                     resume=True, progress=False)


def test_corrupted_state_json_raises(trained_run):
    (trained_run / "checkpoints" / "step_00000004" / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError):
        load_trained(trained_run)


@pytest.mark.parametrize("other", [dict(velocity="resnet"), dict(sigma_min=0.1)], ids=["velocity", "sigma_min"])
def test_resume_with_other_model_config_raises(trained_run, data, other):
    X, std = data
    with pytest.raises(CheckpointError):
        train_flowfm(model_cfg(**other), X, train_cfg(steps=6, ckpt_every=2, keep_checkpoints=5), trained_run, std,
                     resume=True, progress=False)


def test_keep_checkpoints_prunes(data, tmp_path):
    X, std = data
    train_flowfm(model_cfg(), X, train_cfg(steps=6, ckpt_every=1, keep_checkpoints=2), tmp_path, std,
                 progress=False)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000005", "step_00000006"]
    assert not list(root.glob(".tmp-*")) and not list(root.glob(".latest-*"))
    assert (root / "latest").read_text().strip() == "step_00000006"


# ---- augmentation -----------------------------------------------------------------------------

def test_random_rotations_are_rotations():
    max_angle = math.radians(30.0)
    R = random_rotations(500, max_angle, generator=torch.Generator().manual_seed(0)).double()
    assert R.shape == (500, 3, 3)
    eye = torch.eye(3, dtype=torch.float64).expand(500, 3, 3)
    torch.testing.assert_close(R @ R.transpose(1, 2), eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(500, dtype=torch.float64), atol=1e-5, rtol=0)
    cos_angle = ((R.diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2).clamp(-1, 1)
    angle = torch.arccos(cos_angle)
    assert float(angle.max()) <= max_angle + 1e-3
    # angles spread over [0, max]: not all tiny
    assert float(angle.max()) > 0.8 * max_angle and float(angle.min()) < 0.2 * max_angle
    # deterministic given the generator
    R2 = random_rotations(500, max_angle, generator=torch.Generator().manual_seed(0)).double()
    assert torch.equal(R, R2)
    # zero max angle: identity
    torch.testing.assert_close(random_rotations(4, 0.0), torch.eye(3).expand(4, 3, 3))


@pytest.fixture(scope="module")
def aug_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 40, generator=g)
    mean = torch.tensor([0.1, -0.5, 9.8])
    std = torch.tensor([0.5, 1.5, 2.0])
    return x, mean, std


def test_augment_disabled_is_identity(aug_inputs):
    x, mean, std = aug_inputs
    keep = x.clone()
    out = augment(x, mean, std, AugmentConfig(enabled=False), torch.Generator().manual_seed(0))
    assert torch.equal(out, keep)
    assert torch.equal(x, keep)


def test_augment_changes_input_keeps_shape(aug_inputs):
    x, mean, std = aug_inputs
    keep = x.clone()
    out = augment(x, mean, std, AugmentConfig(), torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert not torch.allclose(out, x, atol=1e-2)
    assert torch.equal(x, keep), "augment modified its input"
    again = augment(x, mean, std, AugmentConfig(), torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_augment_rotation_only_preserves_raw_norms(aug_inputs):
    """Rotation acts on physical units: de-standardised per-sample vector norms are preserved."""
    x, mean, std = aug_inputs
    cfg = AugmentConfig(max_angle_deg=45.0, scale_low=1.0, scale_high=1.0, jitter_std=0.0)
    out = augment(x, mean, std, cfg, torch.Generator().manual_seed(0))
    raw_in = x * std[None, :, None] + mean[None, :, None]
    raw_out = out * std[None, :, None] + mean[None, :, None]
    torch.testing.assert_close(raw_out.norm(dim=1), raw_in.norm(dim=1), atol=1e-4, rtol=1e-5)
    assert not torch.allclose(raw_out, raw_in, atol=1e-2)


def test_augment_scale_only(aug_inputs):
    x, mean, std = aug_inputs
    cfg = AugmentConfig(max_angle_deg=0.0, scale_low=0.5, scale_high=2.0, jitter_std=0.0)
    out = augment(x, mean, std, cfg, torch.Generator().manual_seed(0))
    raw_in = x * std[None, :, None] + mean[None, :, None]
    raw_out = out * std[None, :, None] + mean[None, :, None]
    # one scale factor per window (least-squares fit), within range
    s = (raw_out * raw_in).flatten(1).sum(1) / (raw_in * raw_in).flatten(1).sum(1)
    torch.testing.assert_close(raw_out, s[:, None, None] * raw_in, atol=1e-4, rtol=1e-5)
    assert float(s.min()) >= 0.5 - 1e-5 and float(s.max()) <= 2.0 + 1e-5
    assert float(s.max() - s.min()) > 0.1   # windows get different factors


@pytest.mark.parametrize("kw", [dict(target="noisy"), dict(max_angle_deg=-1.0), dict(max_angle_deg=200.0),
                                dict(scale_low=0.0), dict(scale_low=1.2, scale_high=1.1), dict(jitter_std=-0.1)],
                         ids=lambda d: next(iter(d)))
def test_augment_config_validation(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        AugmentConfig(**kw)


@pytest.mark.parametrize("target", ["clean", "augmented"])
def test_augment_target_is_what_the_generator_rebuilds(data, target):
    """The step hands the loss (generator target, encoder input): the clean window and its augmented
    copy by default, the augmented copy twice with target="augmented"."""
    X, std = data
    model = build_model(model_cfg(), 0)
    seen = []

    def loss_fn(x1, x_enc, gen):
        seen.append((x1.clone(), x_enc.clone()))
        return sum(p.sum() for p in model.parameters()) * 0.0 + (x_enc - x1).square().mean()

    cfg = train_cfg(augment=AugmentConfig(target=target))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    step = make_step(loss_fn, model, opt, None, cfg, torch.Generator().manual_seed(0), torch.zeros(3),
                     torch.ones(3), torch.device("cpu"))
    x1 = torch.from_numpy(X[:8]).float()
    loss, _ = step(x1)
    target_seen, enc_seen = seen[0]
    assert not torch.allclose(enc_seen, x1, atol=1e-3)   # the encoder sees an augmented copy
    if target == "clean":
        assert torch.equal(target_seen, x1) and float(loss) > 1e-4
    else:
        assert torch.equal(target_seen, enc_seen) and float(loss) == 0.0


def test_augment_six_channels_and_non_triads():
    g = torch.Generator().manual_seed(2)
    x6 = torch.randn(4, 6, 20, generator=g)
    cfg = AugmentConfig(max_angle_deg=30.0, scale_low=1.0, scale_high=1.0, jitter_std=0.0)
    zeros, ones = torch.zeros(6), torch.ones(6)
    out6 = augment(x6, zeros, ones, cfg, torch.Generator().manual_seed(0))
    assert out6.shape == x6.shape
    for i in (0, 3):   # each xyz triad is rotated: norms preserved per triad
        torch.testing.assert_close(out6[:, i:i + 3].norm(dim=1), x6[:, i:i + 3].norm(dim=1), atol=1e-4, rtol=1e-5)
    x4 = torch.randn(4, 4, 20, generator=g)
    out4 = augment(x4, torch.zeros(4), torch.ones(4), AugmentConfig(), torch.Generator().manual_seed(0))
    assert out4.shape == x4.shape and not torch.allclose(out4, x4)
