"""Optimal K-step grids (BOSS): the dynamic programme against brute force, the cost table against
single steps taken by hand, a grid that beats the uniform one on an ODE with a known solution,
saving with the checkpoint and the CLI."""
from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from flowfm_fast.cli import main
from flowfm_fast.integrate import METHODS, sample
from flowfm_fast.integrate.boss import best_path, optimal_grid, optimal_grids, step_cost_table
from flowfm_fast.models import FlowFM, get_config
from flowfm_fast.train import CheckpointError, read_grids, write_grids


def late_field(x, t):
    """dx/dt = -20 t^19 x: x(1) = x(0) exp(-1), all the change packed near t = 1."""
    return -20.0 * t.to(x.dtype).view(-1, *([1] * (x.dim() - 1))) ** 19 * x


def test_best_path_is_the_brute_force_optimum():
    g = torch.Generator().manual_seed(0)
    N, K = 8, 3
    cost = torch.rand(N + 1, N + 1, generator=g, dtype=torch.float64)
    cost = torch.where(torch.arange(N + 1)[None, :] > torch.arange(N + 1)[:, None], cost, torch.inf)
    path, total = best_path(cost, K)
    brute = min((sum(float(cost[a, b]) for a, b in zip((0, *mid, N), (*mid, N))), (0, *mid, N))
                for mid in itertools.combinations(range(1, N), K - 1))
    assert total == pytest.approx(brute[0])
    assert tuple(path) == brute[1]
    with pytest.raises(ValueError, match="steps"):
        best_path(cost, N + 1)


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
def test_cost_table_matches_single_steps(method):
    x0 = torch.randn(3, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t, cost = step_cost_table(late_field, x0, method, candidates=6, reference="rk4")
    _, traj = sample(late_field, x0, None, "rk4", grid=t.tolist(), return_trajectory=True)
    for i, j in [(0, 6), (2, 3), (1, 5), (4, 6)]:
        one = sample(late_field, traj[i], None, method, grid=[float(t[i]), float(t[j])])
        assert float(cost[i, j]) == pytest.approx(float(((one - traj[j]) ** 2).mean()), rel=1e-6, abs=1e-12)
    assert bool(torch.isinf(cost[3, 2])) and bool(torch.isinf(cost[2, 2]))


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_cost_table_keeps_each_window_with_its_condition(method):
    """A field that depends on z (one rate per window): every cost entry equals the single step
    taken by hand, so the batched stages keep x, t and z of each window together; chunking the
    j axis (max_rows) changes nothing."""
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 2, 3, dtype=torch.float64, generator=g)
    z = torch.linspace(0.5, 3.0, 4, dtype=torch.float64).view(4, 1)
    f = lambda x, t, z: -z.view(-1, 1, 1) * t.to(x.dtype).view(-1, 1, 1) ** 3 * x
    t, cost = step_cost_table(f, x0, method, z=z, candidates=6)
    _, chunked = step_cost_table(f, x0, method, z=z, candidates=6, max_rows=8)
    torch.testing.assert_close(chunked, cost)
    _, traj = sample(f, x0, None, "rk4", grid=t.tolist(), z=z, return_trajectory=True)
    for i, j in [(0, 6), (1, 4), (3, 5)]:
        one = sample(f, traj[i], None, method, grid=[float(t[i]), float(t[j])], z=z)
        assert float(cost[i, j]) == pytest.approx(float(((one - traj[j]) ** 2).mean()), rel=1e-9, abs=1e-15)
    # the same table with the conditions shuffled against the windows differs
    _, wrong = step_cost_table(f, x0, method, z=z.flip(0), candidates=6)
    assert not torch.allclose(wrong[0, 1:], cost[0, 1:])


@pytest.mark.parametrize("K", [2, 4, 8])
def test_optimal_grid_beats_uniform_on_a_late_field(K):
    x0 = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    rec = optimal_grid(late_field, x0, K, "euler", candidates=64)
    g = rec["grid"]
    assert len(g) == K + 1 and g[0] == 0.0 and g[-1] == 1.0 and all(b > a for a, b in zip(g, g[1:]))
    assert rec["cost"] <= rec["uniform_cost"]
    exact = x0 * math.exp(-1.0)
    err_opt = float((sample(late_field, x0, None, "euler", grid=g) - exact).abs().max())
    err_uni = float((sample(late_field, x0, K, "euler") - exact).abs().max())
    assert err_opt < 0.75 * err_uni
    assert g[1] > 0.5                        # the field is ~0 early: one long first step


def test_optimal_grids_share_one_table():
    x0 = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    many = optimal_grids(late_field, x0, [2, 4, 8], "euler", candidates=16)
    for K in (2, 4, 8):
        one = optimal_grid(late_field, x0, K, "euler", candidates=16)
        assert many[K]["grid"] == one["grid"] and many[K]["cost"] == pytest.approx(one["cost"])
    assert many[8]["cost"] <= many[4]["cost"] <= many[2]["cost"]    # more steps never cost more locally


def test_optimal_grid_validation():
    x0 = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="candidates"):
        optimal_grid(late_field, x0, 8, candidates=4)
    with pytest.raises(ValueError, match="steps"):
        optimal_grid(late_field, x0, 0)
    with pytest.raises(ValueError, match="method"):
        optimal_grid(late_field, x0, 2, method="dopri5")


def test_model_optimal_grid_runs_with_z():
    torch.manual_seed(0)
    m = FlowFM(get_config("tiny", length=60)).eval()
    for p in m.velocity.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    z = torch.randn(4, 16)
    rec = m.optimal_grid(z, 3, "midpoint", generator=torch.Generator().manual_seed(0), candidates=9)
    assert rec["cost"] <= rec["uniform_cost"] + 1e-12
    out = m.sample(z, None, "midpoint", grid=rec["grid"])
    assert out.shape == (4, 3, 60) and bool(torch.isfinite(out).all())
    ddpm = FlowFM(get_config("tiny", length=60, objective="ddpm"))
    with pytest.raises(ValueError, match="flow-matching"):
        ddpm.optimal_grid(z, 3)


def _tiny_run(tmp_path, *extra):
    out = tmp_path / "run"
    assert main(["pretrain", "--data", "synthetic", "--config", "tiny", "--steps", "4", "--batch-size", "8",
                 "--ckpt-every", "4", "--out", str(out), "--quiet", "--device", "cpu", *extra]) == 0
    return out


def test_grids_saved_with_checkpoint_merge_and_reject_damage(tmp_path):
    run = _tiny_run(tmp_path)
    assert read_grids(run) == {}
    write_grids(run, {"euler": {4: {"grid": [0, 0.5, 0.7, 0.9, 1]}}})
    write_grids(run, {"euler": {2: {"grid": [0, 0.6, 1]}}, "heun": {2: {"grid": [0, 0.4, 1]}}})
    g = read_grids(run)
    assert g["euler"]["4"]["grid"] == [0, 0.5, 0.7, 0.9, 1] and g["euler"]["2"]["grid"] == [0, 0.6, 1]
    assert g["heun"]["2"]["grid"] == [0, 0.4, 1]
    f = next(run.rglob("grids.json"))
    f.write_text("{not json")
    with pytest.raises(CheckpointError, match="damaged"):
        read_grids(run)


def test_cli_grid_then_sample_optimal(tmp_path, capsys):
    run = _tiny_run(tmp_path)
    # nothing saved yet: the error names the command to run
    assert main(["sample", "--ckpt", str(run), "--data", "synthetic", "--steps", "3", "--grid", "optimal",
                 "--out", str(tmp_path / "s.npz"), "--device", "cpu"]) == 2
    assert "flowfm-fast grid --ckpt" in capsys.readouterr().err
    assert main(["grid", "--ckpt", str(run), "--data", "synthetic", "--steps", "3", "--calib", "8",
                 "--candidates", "12", "--device", "cpu"]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    grid = rep["grids"]["3"]["grid"]
    assert len(grid) == 4 and grid[0] == 0.0 and grid[-1] == 1.0
    assert main(["sample", "--ckpt", str(run), "--data", "synthetic", "--steps", "3", "--grid", "optimal",
                 "--out", str(tmp_path / "s.npz"), "--device", "cpu"]) == 0
    import numpy as np
    assert np.load(tmp_path / "s.npz")["grid"].tolist() == grid


def test_cli_grid_refuses_ddpm_run(tmp_path, capsys):
    run = _tiny_run(tmp_path, "--objective", "ddpm")
    assert main(["grid", "--ckpt", str(run), "--data", "synthetic", "--steps", "2", "--device", "cpu"]) == 2
    assert "flow-matching" in capsys.readouterr().err
