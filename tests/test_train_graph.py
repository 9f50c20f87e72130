"""The captured training step (train_flowfm(cuda_graph=True), flowfm_fast.train.graph).

On the CPU: the refusals, the learning-rate and optimizer plumbing, and that the step function the
graph captures reads nothing back to the host. On a GPU (skipped elsewhere): a captured run against
an uncaptured one with the same seed."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from flowfm_fast import ops
from flowfm_fast.ops import _validate
from flowfm_fast.train import TrainConfig, build_model, train_flowfm
from flowfm_fast.train.checkpoint import optimizer_to_flat
from flowfm_fast.train.graph import (CaptureError, CapturedStep, check_capturable, forbid_host_syncs,
                                     prepare_optimizer, set_lr)
from flowfm_fast.train.loop import _Loss, make_optimizer, make_step
from tiny_training import model_cfg, synthetic_windows


@pytest.fixture(scope="module")
def data():
    return synthetic_windows()


def _cfg(**kw):
    base = dict(steps=6, batch_size=16, lr=3e-3, warmup_steps=2, log_every=1, ckpt_every=100, seed=0)
    base.update(kw)
    return TrainConfig(**base)


# ---- refusals -----------------------------------------------------------------------------------


def test_cuda_graph_refuses_the_cpu(data, tmp_path):
    x, std = data
    with pytest.raises(CaptureError, match="cuda_graph=True needs a CUDA device"):
        train_flowfm(model_cfg(), x, _cfg(), tmp_path, std, device="cpu", cuda_graph=True, progress=False)
    assert isinstance(CaptureError("x"), ValueError)  # the CLI reports it as a user error


def test_cuda_graph_refuses_ddp():
    with pytest.raises(CaptureError, match="torchrun"):
        check_capturable(torch.device("cuda"), distributed=True)
    check_capturable(torch.device("cuda"), distributed=False)  # one CUDA process: accepted


def test_cli_cuda_graph_on_cpu_is_a_clear_error(tmp_path, capsys):
    from flowfm_fast.cli import main
    rc = main(["pretrain", "--config", "tiny", "--data", "synthetic", "--steps", "2", "--device", "cpu",
                   "--cuda-graph", "--out", str(tmp_path / "run"), "--quiet"])
    assert rc != 0
    assert "cuda_graph=True needs a CUDA device" in capsys.readouterr().err


def test_captured_step_checks_its_arguments():
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        CapturedStep(lambda x1: (), (2, 3, 4), torch.device("cpu"), torch.Generator(), None, warmup=0)
    step = CapturedStep(lambda x1: (), (2, 3, 4), torch.device("cpu"), torch.Generator(), None)
    with pytest.raises(ValueError, match=r"batches of shape \(2, 3, 4\)"):
        step(torch.zeros(3, 3, 4))


# ---- what the graph captures reads nothing back --------------------------------------------------


def test_forbid_host_syncs_catches_reads():
    x = torch.randn(8)
    with forbid_host_syncs():
        y = (x * 2).sum()  # device work is fine
        with pytest.raises(CaptureError, match="Tensor.item"):
            y.item()
        with pytest.raises(CaptureError, match="_local_scalar_dense"):
            bool(x.any())
        with pytest.raises(CaptureError, match="nonzero"):
            x.nonzero()
        with pytest.raises(CaptureError, match="tolist"):  # no ATen op on a CPU tensor: caught as a method
            x.tolist()
    assert float(y) == pytest.approx(float(2 * x.sum()))  # outside the block reads work again


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_training_step_reads_nothing_back(data, ema_decay):
    """The step function train_flowfm captures, run on the CPU under forbid_host_syncs (as the first
    warm-up step runs on CUDA): it trains (loss finite, weights move) without one host read."""
    x, std = data
    cfg = _cfg(ema_decay=ema_decay)
    model = build_model(model_cfg(), 0)
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay)
    ema = copy.deepcopy(model).requires_grad_(False) if ema_decay else None
    gen = torch.Generator()
    mean, sd = torch.as_tensor(std.mean), torch.as_tensor(std.std)
    step = make_step(_Loss(model), model, opt, ema, cfg, gen, mean, sd, torch.device("cpu"), captured=True)
    before = [p.detach().clone() for p in model.parameters()]
    x1 = torch.from_numpy(x[:16]).float()
    with forbid_host_syncs(), pytest.raises(CaptureError, match="tolist"):
        step(x1)  # the eager value check of t reads it back: the detector sees it
    with _validate.value_checks_off(), forbid_host_syncs():
        for s in range(2):
            gen.manual_seed(s)
            loss, grad_norm = step(x1)
    assert torch.isfinite(loss) and torch.isfinite(grad_norm) and grad_norm > 0
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    if ema is not None:
        assert any(not torch.equal(e, p) for e, p in zip(ema.parameters(), model.parameters()))


def test_value_checks_off_is_scoped():
    x0, x1 = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    bad_t = torch.tensor([0.5, 1.5])
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        ops.fm_interpolate(x0, x1, bad_t)
    with pytest.raises(RuntimeError, match="boom"), _validate.value_checks_off():
        ops.fm_interpolate(x0, x1, bad_t)  # not checked here: the captured step draws t itself
        raise RuntimeError("boom")
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):  # restored after an exception
        ops.fm_interpolate(x0, x1, bad_t)
    with _validate.value_checks_off(), pytest.raises(ValueError, match="shape"):
        ops.fm_interpolate(x0, x1, torch.rand(3))  # shapes are still checked


# ---- learning rate and optimizer plumbing --------------------------------------------------------


def test_lr_tensor_is_filled_in_place_and_saved_as_a_number():
    model = build_model(model_cfg(), 0)
    opt = make_optimizer(model, 1e-3, 0.01)
    set_lr(opt.param_groups[0], 5e-4)
    assert opt.param_groups[0]["lr"] == 5e-4                    # a float stays a float
    prepare_optimizer(opt, torch.device("cpu"))
    lr = opt.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and float(lr) == pytest.approx(5e-4)
    assert all(g["capturable"] for g in opt.param_groups)
    set_lr(opt.param_groups[0], 2e-4)
    assert opt.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(2e-4)  # same tensor: the graph reads it
    _, rest = optimizer_to_flat(opt)
    json.dumps(rest)  # checkpoints stay JSON
    assert rest["param_groups"][0]["lr"] == pytest.approx(2e-4)


# ---- on a GPU --------------------------------------------------------------------------------------


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def deterministic_cudnn(monkeypatch):
    """Both runs on the same cuDNN algorithms: the trainer's autotuning could pick others per run."""
    import contextlib
    from flowfm_fast.train import loop
    monkeypatch.setattr(loop, "_cudnn_autotuned", contextlib.nullcontext)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("ema_decay", [0.0, 0.99])
def test_captured_run_matches_uncaptured(data, tmp_path, ema_decay, deterministic_cudnn):
    """50 steps with the same seed: the captured run draws fresh t / noise / augmentation every
    replay (its losses track the uncaptured run's step by step) and ends at the same weights."""
    x, std = data
    cfg = _cfg(steps=50, ema_decay=ema_decay)
    plain = train_flowfm(model_cfg(), x, cfg, tmp_path / "plain", std, device="cuda", progress=False)
    graph = train_flowfm(model_cfg(), x, cfg, tmp_path / "graph", std, device="cuda", progress=False,
                         cuda_graph=True)
    a, b = _losses(tmp_path / "plain"), _losses(tmp_path / "graph")
    assert len(a) == len(b) == 50 and len(set(b)) > 40
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=2e-3, atol=1e-4)
    for (name, p), q in zip(plain.model.state_dict().items(), graph.model.state_dict().values()):
        torch.testing.assert_close(q.float(), p.float(), rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_run_resumes(data, tmp_path, deterministic_cudnn):
    x, std = data
    full = train_flowfm(model_cfg(), x, _cfg(steps=12, ckpt_every=6), tmp_path / "full", std, device="cuda",
                        progress=False, cuda_graph=True)
    train_flowfm(model_cfg(), x, _cfg(steps=6, ckpt_every=6), tmp_path / "part", std, device="cuda",
                 progress=False, cuda_graph=True)
    resumed = train_flowfm(model_cfg(), x, _cfg(steps=12, ckpt_every=6), tmp_path / "part", std, device="cuda",
                           progress=False, cuda_graph=True, resume=True)
    for p, q in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        torch.testing.assert_close(q.float(), p.float(), rtol=1e-3, atol=1e-4)
