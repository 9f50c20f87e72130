"""DDPM counterpart: cosine schedule values, loss, samplers against hand-checked cases, the
objective switch through config, training, checkpoints and the CLI."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from flowfm_fast.cli import main
from flowfm_fast.data import Standardizer, make_synthetic
from flowfm_fast.models import FlowFM, FlowFMConfig, get_config
from flowfm_fast.models.diffusion import CosineSchedule, ddim_sample, ddpm_sample, eps_loss
from flowfm_fast.train import CheckpointError, TrainConfig, load_trained, train_flowfm

L = 60


def test_cosine_schedule_matches_formula():
    sch = CosineSchedule(1000)
    f = lambda k: math.cos((k / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    assert sch.alpha_bar[0] == 1.0 and sch.beta[0] == 0.0
    for k in (1, 10, 500, 900):
        assert float(sch.alpha_bar[k]) == pytest.approx(f(k) / f(0), rel=1e-9)
    assert float(sch.beta.max()) == pytest.approx(0.999)
    assert bool((sch.alpha_bar[1:] < sch.alpha_bar[:-1]).all())
    assert float(sch.alpha_bar[1000]) < 1e-6


def test_timesteps_spacing():
    sch = CosineSchedule(1000)
    assert sch.timesteps(1000) == list(range(1000, -1, -1))
    assert sch.timesteps(10) == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1, 0]
    with pytest.raises(ValueError):
        sch.timesteps(0)
    with pytest.raises(ValueError):
        sch.timesteps(1001)


def test_q_sample_and_eps_loss():
    sch = CosineSchedule(100)
    x, eps = torch.randn(4, 3, 10), torch.randn(4, 3, 10)
    k = torch.tensor([1, 20, 50, 100])
    ab = sch.alpha_bar[k].float().view(-1, 1, 1)
    torch.testing.assert_close(sch.q_sample(x, k, eps), ab.sqrt() * x + (1 - ab).sqrt() * eps)
    assert float(eps_loss(eps, eps)) == 0.0
    w = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert float(eps_loss(eps + 1, eps, w)) == pytest.approx(0.25)


class OracleEps(torch.nn.Module):
    """The exact eps of a point mass at ``x_data``: eps = (x_k - sqrt(abar) x_data) / sqrt(1 - abar)."""

    def __init__(self, sch, x_data):
        super().__init__()
        self.sch, self.x_data = sch, x_data

    def forward(self, x, t, z):
        k = torch.round((1 - t.double()) * self.sch.T).long()
        ab = self.sch.alpha_bar[k].to(x.dtype).view(-1, 1, 1)
        return (x - ab.sqrt() * self.x_data) / (1 - ab).sqrt()


@pytest.mark.parametrize("steps", [1, 10, 100])
def test_ddim_with_oracle_lands_on_the_data(steps):
    sch = CosineSchedule(1000)
    x_data = torch.randn(2, 3, 10, dtype=torch.float64)
    x_T = torch.randn(2, 3, 10, dtype=torch.float64)
    out = ddim_sample(OracleEps(sch, x_data), torch.zeros(2, 4, dtype=torch.float64), x_T, sch, steps)
    torch.testing.assert_close(out, x_data, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("steps", [None, 50])
def test_ddpm_ancestral_with_oracle_lands_on_the_data(steps):
    sch = CosineSchedule(1000)
    x_data = torch.randn(2, 3, 10, dtype=torch.float64)
    x_T = torch.randn(2, 3, 10, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    out = ddpm_sample(OracleEps(sch, x_data), torch.zeros(2, 4, dtype=torch.float64), x_T, sch, steps, g)
    torch.testing.assert_close(out, x_data, rtol=1e-5, atol=1e-5)


def test_ddpm_ancestral_recovers_gaussian_data_distribution():
    """Data N(m, s^2) per coordinate has the closed-form eps: samples must have mean m and sd s."""
    sch, m, s = CosineSchedule(1000), 1.5, 0.5

    def eps(x, t, z):
        k = torch.round((1 - t.double()) * sch.T).long()
        ab = sch.alpha_bar[k].to(x.dtype).view(-1, 1, 1)
        var = ab * s * s + (1 - ab)
        return (1 - ab).sqrt() * (x - ab.sqrt() * m) / var

    x_T = torch.randn(4000, 1, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = ddpm_sample(eps, torch.zeros(4000, 1, dtype=torch.float64), x_T, sch, 200,
                      torch.Generator().manual_seed(2))
    assert float(out.mean()) == pytest.approx(m, abs=0.03)
    assert float(out.std()) == pytest.approx(s, abs=0.03)


def test_prepared_conditioning_matches_plain_forward():
    torch.manual_seed(0)
    m = FlowFM(get_config("tiny", length=L, objective="ddpm")).eval()
    for p in m.velocity.parameters():          # adaLN-Zero starts at zero output: perturb it
        p.data.add_(0.05 * torch.randn_like(p))
    z = torch.randn(3, 16)
    x_T = torch.randn(3, 3, L)
    fast = ddim_sample(m.velocity, z, x_T, m.schedule, 20)
    plain = ddim_sample(lambda x, t, zz: m.velocity(x, t, zz), z, x_T, m.schedule, 20)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)


def test_objective_switch_in_model_and_config():
    cfg = get_config("tiny", length=L, objective="ddpm")
    assert FlowFMConfig.from_dict(cfg.to_dict()) == cfg
    assert FlowFMConfig.from_dict({k: v for k, v in get_config("tiny").to_dict().items()
                                   if k not in ("objective", "diffusion_steps")}).objective == "fm"
    with pytest.raises(ValueError, match="objective"):
        get_config("tiny", objective="score")
    torch.manual_seed(0)
    m = FlowFM(cfg)
    for p in m.velocity.parameters():          # adaLN-Zero: z reaches the output only once trained
        p.data.add_(0.05 * torch.randn_like(p))
    x = torch.randn(4, 3, L)
    loss = m.loss(x, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert math.isfinite(float(loss.detach()))
    assert m.encoder.head.weight.grad is not None and float(m.encoder.head.weight.grad.abs().sum()) > 0
    m.eval()
    z = m.encode(x)
    for method, steps in (("ddim", 5), ("ddpm", 7), (None, None)):
        out = m.sample(z, steps, method, generator=torch.Generator().manual_seed(0))
        assert out.shape == x.shape and bool(torch.isfinite(out).all())
    with pytest.raises(ValueError, match="ddpm"):
        m.sample(z, 4, "euler")
    with pytest.raises(ValueError, match="ddpm"):
        FlowFM(get_config("tiny", length=L)).sample(z, 4, "ddim")


@pytest.fixture(scope="module")
def data():
    ws = make_synthetic(n=64, channels=3, length=L, classes=4, seed=0)
    std = Standardizer.fit(ws.x)
    return std.apply(ws.x), std


def test_ddpm_training_loss_falls_and_checkpoint_keeps_objective(data, tmp_path):
    x, std = data
    cfg = get_config("tiny", length=L, objective="ddpm")
    tc = TrainConfig(steps=40, batch_size=16, lr=3e-3, warmup_steps=3, log_every=2, ckpt_every=100)
    train_flowfm(cfg, x, tc, tmp_path / "run", std, progress=False)
    losses = [json.loads(l)["loss"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3])
    model, _, state = load_trained(tmp_path / "run")
    assert model.cfg.objective == "ddpm" and state["model_config"]["objective"] == "ddpm"
    with pytest.raises(CheckpointError, match="another model config"):
        train_flowfm(get_config("tiny", length=L), x, tc, tmp_path / "run", std, resume=True, progress=False)


def test_cli_pretrain_objective_ddpm_and_sample(tmp_path, capsys):
    out = tmp_path / "pre"
    assert main(["pretrain", "--config", "tiny", "--data", "synthetic", "--objective", "ddpm", "--steps", "3",
                 "--batch-size", "8", "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    model, _, _ = load_trained(out)
    assert model.cfg.objective == "ddpm"
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(out), "--data", "synthetic", "--n", "2", "--steps", "3",
                 "--out", str(tmp_path / "s.npz"), "--device", "cpu"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["method"] == "ddim" and math.isfinite(res["recon_mse_standardised"])


def test_ancestral_x0_form_equals_eps_form_unclipped():
    """The posterior-mean (x0) form must equal the eps form x' = (x - beta/sqrt(1-abar) eps)/sqrt(1-beta)."""
    sch = CosineSchedule(1000)
    x = torch.randn(3, 2, 5, dtype=torch.float64)
    e = torch.randn(3, 2, 5, dtype=torch.float64)
    for k, kp in ((1000, 999), (500, 480), (20, 0)):
        a, ap = float(sch.alpha_bar[k]), float(sch.alpha_bar[kp])
        beta = 1 - a / ap
        x0 = (x - math.sqrt(1 - a) * e) / math.sqrt(a)
        post = math.sqrt(ap) * beta / (1 - a) * x0 + math.sqrt(1 - beta) * (1 - ap) / (1 - a) * x
        torch.testing.assert_close(post, (x - beta / math.sqrt(1 - a) * e) / math.sqrt(1 - beta))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_clip_x0_bounds_a_bad_predictor(sampler):
    """An untrained (zero-output, as adaLN-Zero starts) eps predictor explodes through 1/sqrt(abar_T) unclipped; clipping x0_hat keeps
    the samples bounded, and a loose clip changes nothing for the exact oracle."""
    sch = CosineSchedule(1000)
    x_data = torch.randn(2, 3, 10, dtype=torch.float64).clamp(-2, 2)
    oracle = OracleEps(sch, x_data)
    bad = lambda x, t, z: torch.zeros_like(x)
    z = torch.zeros(2, 4, dtype=torch.float64)
    x_T = torch.randn(2, 3, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    run = (lambda net, clip: ddpm_sample(net, z, x_T, sch, None, torch.Generator().manual_seed(1), clip)
           if sampler == "ddpm" else ddim_sample(net, z, x_T, sch, 100, clip_x0=clip))
    assert float(run(bad, None).abs().max()) > 50
    assert float(run(bad, 3.0).abs().max()) <= 3.5
    torch.testing.assert_close(run(oracle, 10.0), x_data, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="ddpm models only"):
        FlowFM(get_config("tiny", length=L)).sample(torch.zeros(1, 16), 2, clip_x0=1.0)
