"""Fixed-step ODE solvers: convergence order, agreement with an independent naive RK,
torchdiffeq parity, trajectories, the velocity contract and input validation."""
from __future__ import annotations

import math

import pytest
import torch

from flowfm_fast.integrate import METHODS, FixedStepSolver, make_grid, sample
from flowfm_fast.models import FlowFM, get_config

ORDERS = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4, "rk4_38": 4}


def _tcol(t, x):
    """t of shape (B,) (flowfm_fast) or () (torchdiffeq), broadcast against x (B, ...)."""
    t = t.to(x.dtype)
    return t.reshape(-1, *([1] * (x.dim() - 1))) if t.dim() else t


# ---- fields with closed-form solutions on [0, 1] (no blow-up for the chosen x0) ----------------

def f_linear_t(x, t):            # dx/dt = -2 t x  ->  x(1) = x0 exp(-1)
    return -2.0 * _tcol(t, x) * x


def f_riccati(x, t):             # dx/dt = x^2     ->  x(1) = x0 / (1 - x0), x0 < 1
    return x * x


def f_cos(x, t):                 # dx/dt = cos(t) x ->  x(1) = x0 exp(sin 1)
    return torch.cos(_tcol(t, x)) * x


X0_RICCATI = torch.tensor([[0.1, 0.3], [0.45, -0.5], [-1.0, 0.2]], dtype=torch.float64)

PROBLEMS = {
    "linear_t": (f_linear_t, lambda x0: x0 * math.exp(-1.0)),
    "riccati": (f_riccati, lambda x0: x0 / (1.0 - x0)),
    "cos": (f_cos, lambda x0: x0 * math.exp(math.sin(1.0))),
}


def test_methods_listed():
    assert set(METHODS) == set(ORDERS)


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("method", sorted(ORDERS))
def test_convergence_order(method, problem):
    f, exact = PROBLEMS[problem]
    x0 = X0_RICCATI.clone()
    want = exact(x0)
    errs = []
    for steps in (4, 8, 16, 32, 64):
        x = sample(f, x0, steps, method)
        assert x.dtype == torch.float64 and x.shape == x0.shape
        errs.append(float((x - want).abs().max()))
    assert all(e > 0 and math.isfinite(e) for e in errs), errs
    rates = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
    order = ORDERS[method]
    # asymptotic rate over the two finest refinements
    assert min(rates[2:]) > order - 0.3, (method, problem, errs, rates)
    # and it is not a higher-order method in disguise
    assert rates[-1] < order + 0.7, (method, problem, errs, rates)
    assert errs[-1] < errs[0]


# ---- an independent, naive, per-step Runge-Kutta (textbook formulas, written out by hand) -----

def _step_euler(f, x, t, h, T):
    return x + h * f(x, T(t))


def _step_midpoint(f, x, t, h, T):
    k1 = f(x, T(t))
    k2 = f(x + (h / 2) * k1, T(t + h / 2))
    return x + h * k2


def _step_heun(f, x, t, h, T):
    k1 = f(x, T(t))
    k2 = f(x + h * k1, T(t + h))
    return x + (h / 2) * (k1 + k2)


def _step_rk4(f, x, t, h, T):
    k1 = f(x, T(t))
    k2 = f(x + (h / 2) * k1, T(t + h / 2))
    k3 = f(x + (h / 2) * k2, T(t + h / 2))
    k4 = f(x + h * k3, T(t + h))
    return x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)


def _step_rk4_38(f, x, t, h, T):
    k1 = f(x, T(t))
    k2 = f(x + (h / 3) * k1, T(t + h / 3))
    k3 = f(x + h * (k2 - k1 / 3), T(t + 2 * h / 3))
    k4 = f(x + h * (k1 - k2 + k3), T(t + h))
    return x + (h / 8) * (k1 + 3 * k2 + 3 * k3 + k4)


NAIVE = {"euler": _step_euler, "midpoint": _step_midpoint, "heun": _step_heun, "rk4": _step_rk4,
         "rk4_38": _step_rk4_38}


def naive_solve(method, f, x0, grid):
    B = x0.shape[0]

    def T(s):
        return torch.full((B,), s, dtype=x0.dtype)

    x = x0.clone()
    for a, b in zip(grid, grid[1:]):
        x = NAIVE[method](f, x, a, b - a, T)
    return x


def f_nonlinear_autonomous(x, t):
    return torch.sin(x) - 0.3 * x * x + 0.1


def f_nonlinear_t(x, t):
    tc = _tcol(t, x)
    return torch.sin(3.0 * tc) * x - 0.5 * x * x + tc


UNIFORM8 = [i / 8 for i in range(9)]
UNIFORM3 = [0.0, 1 / 3, 2 / 3, 1.0]
NONUNIFORM = [0.0, 0.1, 0.35, 0.6, 1.0]


@pytest.mark.parametrize("grid", [UNIFORM3, UNIFORM8, NONUNIFORM], ids=["uniform3", "uniform8", "nonuniform"])
@pytest.mark.parametrize("method", sorted(ORDERS))
def test_matches_naive_rk_float64(method, grid):
    """Autonomous nonlinear field: independent of how t is represented."""
    x0 = torch.linspace(-2.0, 2.0, 12, dtype=torch.float64).reshape(4, 3)
    want = naive_solve(method, f_nonlinear_autonomous, x0, grid)
    if grid in (UNIFORM3, UNIFORM8):
        got = sample(f_nonlinear_autonomous, x0, len(grid) - 1, method)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    got = sample(f_nonlinear_autonomous, x0, None, method, grid=grid)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    got_t = sample(f_nonlinear_autonomous, x0, None, method, grid=torch.tensor(grid, dtype=torch.float64))
    torch.testing.assert_close(got_t, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun", "rk4"])   # 3/8-rule stages are thirds
def test_matches_naive_rk_float64_time_dependent_uniform_dyadic(method):
    """Time-dependent field on a grid whose stage times are exact in float32 (multiples of 1/16):
    the solver agrees with the naive RK to float64 precision."""
    x0 = torch.linspace(-1.0, 1.0, 8, dtype=torch.float64).reshape(4, 2)
    grid = [i / 8 for i in range(9)]
    want = naive_solve(method, f_nonlinear_t, x0, grid)
    got = sample(f_nonlinear_t, x0, 8, method)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("method", ["midpoint", "rk4_38"])
def test_matches_naive_rk_float64_time_dependent_nonuniform(method):
    x0 = torch.linspace(-1.0, 1.0, 8, dtype=torch.float64).reshape(4, 2)
    want = naive_solve(method, f_nonlinear_t, x0, NONUNIFORM)
    got = sample(f_nonlinear_t, x0, None, method, grid=NONUNIFORM)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_time_dtype_follows_x0_float64():
    seen = []

    def fn(x, t):
        seen.append(t.dtype)
        return torch.zeros_like(x)

    sample(fn, torch.zeros(2, 3, dtype=torch.float64), 2, "euler")
    assert seen and all(d == torch.float64 for d in seen)


# ---- torchdiffeq parity on a fixed grid ---------------------------------------------------------

TDE_METHOD = {"euler": "euler", "midpoint": "midpoint", "rk4_38": "rk4", "heun": "heun2"}


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-7)], ids=["fp32", "fp64"])
@pytest.mark.parametrize("method", sorted(TDE_METHOD))
def test_torchdiffeq_parity(method, dtype, tol):
    torchdiffeq = pytest.importorskip("torchdiffeq")
    from torchdiffeq._impl.odeint import SOLVERS
    tde = TDE_METHOD[method]
    if tde not in SOLVERS:
        pytest.skip(f"torchdiffeq has no {tde!r}")
    steps = 7
    x0 = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(0)).to(dtype)

    def field(x, t):
        return torch.tanh(x) * torch.cos(2.0 * _tcol(t, x)) - 0.2 * x

    t_grid = torch.linspace(0.0, 1.0, steps + 1, dtype=dtype)
    ref = torchdiffeq.odeint(lambda t, y: field(y, t), x0, t_grid, method=tde)
    got, traj = sample(field, x0, steps, method, return_trajectory=True)
    assert got.dtype == dtype
    assert float((got - ref[-1]).abs().max()) <= tol
    assert float((traj - ref).abs().max()) <= tol


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4_38"])
def test_torchdiffeq_parity_nonuniform_grid(method):
    torchdiffeq = pytest.importorskip("torchdiffeq")
    x0 = 0.5 * torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    grid = torch.tensor(NONUNIFORM)
    ref = torchdiffeq.odeint(lambda t, y: f_nonlinear_t(y, t), x0, grid, method=TDE_METHOD[method])
    got = sample(f_nonlinear_t, x0, None, method, grid=NONUNIFORM)
    assert float(ref[-1].abs().max()) < 10.0
    assert float((got - ref[-1]).abs().max()) <= 1e-5


# ---- trajectory and the velocity contract -------------------------------------------------------

@pytest.mark.parametrize("method", sorted(ORDERS))
def test_return_trajectory(method):
    x0 = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(2))
    keep = x0.clone()
    x, traj = sample(f_cos, x0, 5, method, return_trajectory=True)
    assert traj.shape == (6, 3, 2, 4)
    assert torch.equal(traj[0], keep)
    assert torch.equal(traj[-1], x)
    assert torch.equal(x0, keep), "x0 was modified in place"
    x_only = sample(f_cos, x0, 5, method)
    assert torch.equal(x_only, x)
    assert torch.equal(x0, keep)
    # the trajectory is the sequence of step results: a 2-step solve equals its 2nd point over a coarser grid
    x_a, traj_a = sample(f_cos, x0, None, method, grid=[0.0, 0.4, 1.0], return_trajectory=True)
    x_b = sample(f_cos, x0, None, method, grid=[0.0, 0.4])
    torch.testing.assert_close(traj_a[1], x_b, atol=1e-6, rtol=0)


def test_plain_velocity_fn_t_shape_and_cond_passthrough():
    B = 4
    calls = []

    def fn(x, t, scale, offset):
        calls.append((tuple(t.shape), scale, offset))
        assert t.shape == (B,)
        return torch.full_like(x, float(scale)) + offset

    x0 = torch.zeros(B, 2, 3)
    offset = torch.arange(6.0).reshape(1, 2, 3)
    x = sample(fn, x0, 4, "euler", scale=2.0, offset=offset)
    # constant velocity: x(1) = x0 + (scale + offset)
    torch.testing.assert_close(x, (2.0 + offset).expand(B, 2, 3))
    assert len(calls) == 4 and all(c[0] == (B,) and c[1] == 2.0 for c in calls)


def test_plain_velocity_fn_sees_grid_times():
    seen = []

    def fn(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    sample(fn, torch.zeros(3, 2), None, "midpoint", grid=[0.0, 0.5, 1.0])
    times = [float(t[0]) for t in seen]
    assert times == pytest.approx([0.0, 0.25, 0.5, 0.75])
    assert all(bool((t == t[0]).all()) for t in seen)


def test_plain_fn_receives_z_as_kwarg():
    B = 3
    z = torch.randn(B, 5)
    got = {}

    def fn(x, t, z):
        got["z"] = z
        return z[:, :2].sum(dim=1, keepdim=True).expand_as(x)

    x = sample(fn, torch.zeros(B, 4), 2, "heun", z=z)
    assert got["z"] is z
    torch.testing.assert_close(x, z[:, :2].sum(dim=1, keepdim=True).expand(B, 4))


def _perturbed_flowfm(velocity: str) -> FlowFM:
    torch.manual_seed(0)
    model = FlowFM(get_config("tiny", length=60, velocity=velocity)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("velocity", ["dit", "resnet"])
@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
def test_prepared_path_matches_plain_lambda(velocity, method):
    model = _perturbed_flowfm(velocity)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 3, 60, generator=g)
    z = torch.randn(2, model.cfg.encoder.z_dim, generator=g)
    net = model.velocity
    with torch.no_grad():
        fast = sample(net, x0, 3, method, z=z)
        plain = sample(lambda x, t, z: net(x, t, z), x0, 3, method, z=z)
        grid_fast = sample(net, x0, None, method, grid=NONUNIFORM, z=z)
        grid_plain = sample(lambda x, t, z: net(x, t, z), x0, None, method, grid=NONUNIFORM, z=z)
    assert not torch.allclose(fast, x0, atol=1e-3), "velocity is trivially zero; perturbation failed"
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grid_fast, grid_plain, atol=1e-5, rtol=1e-5)


def test_solver_class_and_functional_agree():
    x0 = torch.randn(2, 3, generator=torch.Generator().manual_seed(4))
    a = FixedStepSolver("rk4").solve(f_cos, x0, 6)
    b = sample(f_cos, x0, 6, "rk4")
    assert torch.equal(a, b)


# ---- bad input ------------------------------------------------------------------------------

def _zero(x, t, **_):
    return torch.zeros_like(x)


@pytest.mark.parametrize("steps,exc", [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError),
                                       ("4", TypeError)])
def test_bad_steps(steps, exc):
    with pytest.raises(exc, match="steps"):
        sample(_zero, torch.zeros(2, 3), steps, "euler")
    with pytest.raises(exc, match="steps"):
        make_grid(steps)


@pytest.mark.parametrize("grid", [
    [0.0, 0.5, 0.5, 1.0],          # not strictly increasing
    [0.0, 0.6, 0.3, 1.0],          # decreasing
    [1.0, 0.0],                    # reversed
    [-0.1, 0.5, 1.0],              # below 0
    [0.0, 0.5, 1.2],               # above 1
    [0.0, float("nan"), 1.0],      # not finite
    [0.5],                         # one point
    [],                            # empty
], ids=["flat", "decreasing", "reversed", "below0", "above1", "nan", "one_point", "empty"])
def test_bad_grid(grid):
    with pytest.raises(ValueError, match="grid"):
        sample(_zero, torch.zeros(2, 3), None, "euler", grid=grid)


def test_z_batch_mismatch():
    model = _perturbed_flowfm("dit")
    with pytest.raises(ValueError, match="z"):
        sample(model.velocity, torch.zeros(2, 3, 60), 2, "euler", z=torch.zeros(3, model.cfg.encoder.z_dim))
    with pytest.raises(ValueError, match="z"):
        sample(_zero, torch.zeros(2, 3), 2, "euler", z=torch.zeros(2))


def test_unknown_method():
    with pytest.raises(ValueError, match="method"):
        sample(_zero, torch.zeros(2, 3), 2, "rk45")
    with pytest.raises(ValueError, match="method"):
        FixedStepSolver("dopri5")


def test_bad_x0():
    with pytest.raises(TypeError, match="x0"):
        sample(_zero, torch.zeros(2, 3, dtype=torch.int64), 2, "euler")
    with pytest.raises(TypeError, match="x0"):
        sample(_zero, [[0.0, 1.0]], 2, "euler")
    with pytest.raises(ValueError, match="x0"):
        sample(_zero, torch.zeros(0, 3), 2, "euler")
