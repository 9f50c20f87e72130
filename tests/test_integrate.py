"""Fixed-step ODE solvers: convergence order, agreement with an independent naive RK,
torchdiffeq parity, trajectories, the velocity contract and input validation."""
from __future__ import annotations

import inspect
import math

import pytest
import torch

from flowfm_fast.integrate import METHODS, FixedStepSolver, make_grid, sample, solvers
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


# ---- torchdiffeq parity: classic RK4 and a tiny FlowFM -----------------------------------------

def _tde_solvers(monkeypatch):
    """torchdiffeq's fixed-grid solvers, plus classic RK4 built from its own ``rk4_step_func``
    (torchdiffeq's "rk4" is the 3/8 rule; the classic tableau is there but not exposed by name)."""
    pytest.importorskip("torchdiffeq")
    from torchdiffeq._impl.odeint import SOLVERS
    from torchdiffeq._impl.rk_common import rk4_step_func
    from torchdiffeq._impl.solvers import FixedGridODESolver

    class RK4Classic(FixedGridODESolver):
        order = 4

        def _step_func(self, func, t0, dt, t1, y0):
            f0 = func(t0, y0)
            return rk4_step_func(func, t0, dt, t1, y0, f0=f0), f0

    monkeypatch.setitem(SOLVERS, "rk4_classic", RK4Classic)
    return {**TDE_METHOD, "rk4": "rk4_classic"}


@pytest.mark.parametrize("method", sorted(ORDERS))
def test_torchdiffeq_parity_every_method(method, monkeypatch):
    import torchdiffeq
    tde = _tde_solvers(monkeypatch)[method]
    x0 = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(5))

    def field(x, t):
        return torch.tanh(x) * torch.cos(2.0 * _tcol(t, x)) - 0.2 * x

    for grid in (torch.linspace(0.0, 1.0, 7), torch.tensor(NONUNIFORM)):
        ref = torchdiffeq.odeint(lambda t, y: field(y, t), x0, grid, method=tde)
        got, traj = sample(field, x0, None, method, grid=grid.tolist(), return_trajectory=True)
        assert float((got - ref[-1]).abs().max()) <= 1e-5, method
        assert float((traj - ref).abs().max()) <= 1e-5, method


@pytest.mark.parametrize("velocity", ["dit", "resnet"])
@pytest.mark.parametrize("method", sorted(ORDERS))
def test_torchdiffeq_parity_tiny_flowfm(method, velocity, monkeypatch):
    """The model's own sampler (prepared conditioning, fused updates) against torchdiffeq's odeint
    of the plain ``v(x, t, z)``, fp32."""
    import torchdiffeq
    tde = _tde_solvers(monkeypatch)[method]
    model = _perturbed_flowfm(velocity)
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(3, 3, 60, generator=g)
    z = torch.randn(3, model.cfg.encoder.z_dim, generator=g)
    net = model.velocity
    with torch.no_grad():
        ref = torchdiffeq.odeint(lambda t, y: net(y, t.expand(y.shape[0]), z), x0,
                                 torch.linspace(0.0, 1.0, 5), method=tde)
        got = model.sample(z, steps=4, method=method, x0=x0)
    assert not torch.allclose(got, x0, atol=1e-3)
    assert float((got - ref[-1]).abs().max()) <= 1e-5


# ---- no allocation inside the loop ----------------------------------------------------------------

class _PtrRecorder:
    """A velocity field recording which buffers it is evaluated at (and where its outputs live)."""

    def __init__(self):
        self.inputs, self.outputs = [], []

    def __call__(self, x, t):
        self.inputs.append(x.data_ptr())
        v = torch.sin(x) + _tcol(t, x)
        self.outputs.append(v.data_ptr())
        return v


@pytest.mark.parametrize("method", sorted(ORDERS))
def test_stage_inputs_reuse_preallocated_buffers(method):
    S = len(FixedStepSolver(method).tableau.c)
    rec = _PtrRecorder()
    x0 = torch.randn(4, 3, 16, generator=torch.Generator().manual_seed(7))
    x = sample(rec, x0, 6, method)
    stage = [rec.inputs[i::S] for i in range(S)]
    assert len(set(stage[0])) == 1, "stage 0 must read the state buffer at every step"
    assert stage[0][0] == x.data_ptr(), "the state is updated in place and returned"
    assert x.data_ptr() != x0.data_ptr()
    if S > 1:
        later = {p for s in stage[1:] for p in s}
        assert len(later) == 1, "every later stage input is the one preallocated stage buffer"
        assert later.isdisjoint(stage[0]) and later.isdisjoint(rec.outputs)


def _count_solver_allocations(method, steps, velocity_factory, return_trajectory=False):
    """Tensors the solver's own code creates (new storage), with the network's calls excluded."""
    from torch.utils._python_dispatch import TorchDispatchMode

    inside = [False]

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not inside[0]:
                ins = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                       if isinstance(a, torch.Tensor)}
                for o in torch.utils._pytree.tree_leaves(out):
                    if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in ins:
                        self.n += 1
            return out

    net = velocity_factory()

    def velocity(x, t):
        inside[0] = True
        try:
            return net(x, t)
        finally:
            inside[0] = False

    x0 = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(8))
    with Count() as c:
        sample(velocity, x0, steps, method, return_trajectory=return_trajectory)
    return c.n


@pytest.mark.parametrize("traj", [False, True], ids=["x", "trajectory"])
@pytest.mark.parametrize("method", sorted(ORDERS))
def test_solver_allocations_do_not_grow_with_steps(method, traj):
    def factory():
        return lambda x, t: torch.cos(x) * _tcol(t, x)
    few = _count_solver_allocations(method, 2, factory, traj)
    many = _count_solver_allocations(method, 16, factory, traj)
    assert few == many, f"{method}: the solver allocated {many - few} more tensors for 14 more steps"
    assert few <= 12, few   # setup only: grid, stage times, state, stage buffer


def test_prepared_path_stage_inputs_reuse_buffers():
    model = _perturbed_flowfm("dit")
    net = model.velocity
    seen = []
    original = net.forward_modulated

    def recording(x, mods):
        seen.append(x.data_ptr())
        return original(x, mods)

    net.forward_modulated = recording
    try:
        z = torch.randn(2, model.cfg.encoder.z_dim)
        with torch.no_grad():
            x = sample(net, torch.randn(2, 3, 60), 5, "rk4", z=z)
    finally:
        del net.forward_modulated
    assert len(seen) == 20
    assert set(seen[0::4]) == {x.data_ptr()}
    assert len(set(seen[1::4]) | set(seen[2::4]) | set(seen[3::4])) == 1


# ---- graph argument (CPU: accepted and ignored) ---------------------------------------------------

def test_graph_ignored_on_cpu():
    from flowfm_fast.integrate import clear_graph_cache, graph_cache_info
    clear_graph_cache()
    model = _perturbed_flowfm("dit")
    z = torch.randn(2, model.cfg.encoder.z_dim)
    x0 = torch.randn(2, 3, 60)
    a = model.sample(z, steps=3, method="heun", x0=x0, graph=True)
    b = model.sample(z, steps=3, method="heun", x0=x0, graph=False)
    c = model.reconstruct(torch.randn(2, 3, 60), steps=2, graph=True)
    assert torch.equal(a, b) and c.shape == (2, 3, 60)
    assert graph_cache_info() == {"captures": 0, "replays": 0, "cached": 0}


def test_bad_graph_argument():
    with pytest.raises(TypeError, match="graph"):
        sample(_zero, torch.zeros(2, 3), 2, "euler", graph="yes")


# ---- graph cache logic on CPU, with an eager stand-in for the CUDA graph -------------------------

class _EagerGraphed(solvers._Graphed):
    """Same static buffers, key and output contract as a captured graph; "replay" reruns the plan
    on the static inputs (the velocity held weakly, as the real graph holds no Python reference)."""

    def _capture(self, velocity):
        import weakref
        self._velocity = weakref.ref(velocity.__self__) if inspect.ismethod(velocity) else weakref.ref(velocity)
        self._func = velocity.__func__ if inspect.ismethod(velocity) else None
        self._replay()

    def _replay(self):
        v = self._velocity()
        v = self._func.__get__(v) if self._func is not None else v
        self.plan.run(v, self.static_x0, self.static_z, self.static_cond)


@pytest.fixture
def cpu_graphs(monkeypatch):
    monkeypatch.setattr(solvers, "_GRAPH_DEVICES", ("cpu",))
    monkeypatch.setattr(solvers, "_GRAPHED", _EagerGraphed)
    solvers.clear_graph_cache()
    yield
    solvers.clear_graph_cache()


def test_graph_cache_logic(cpu_graphs):
    model = _perturbed_flowfm("dit")
    g = torch.Generator().manual_seed(9)
    x0, z = torch.randn(3, 3, 60, generator=g), torch.randn(3, model.cfg.encoder.z_dim, generator=g)
    eager = model.sample(z, steps=4, x0=x0, graph=False)
    a = model.sample(z, steps=4, x0=x0)                               # default: graphed on a graph device
    assert torch.equal(a, eager)
    assert solvers.graph_cache_info() == {"captures": 1, "replays": 1, "cached": 1}
    a_keep = a.clone()
    x0b = torch.randn(3, 3, 60, generator=g)
    b, traj = model.sample(z, steps=4, x0=x0b, return_trajectory=True)
    c = model.sample(z, steps=4, x0=x0b)
    assert torch.equal(a, a_keep), "a later call overwrote an earlier result"
    (entries,) = list(solvers._GRAPHS.values())
    statics = {e.plan.x.data_ptr() for e in entries.values()}
    assert statics.isdisjoint({a.data_ptr(), b.data_ptr(), c.data_ptr()})
    assert solvers.graph_cache_info()["captures"] == 2                # the trajectory is its own graph
    assert torch.equal(traj[-1], b) and torch.equal(b, c)
    model.sample(z[:2], steps=4, x0=x0[:2])                           # new batch: captured anew
    model.sample(z, steps=4, method="rk4", x0=x0)                     # new method
    model.sample(z, x0=x0, grid=[0.0, 0.5, 1.0])                      # new grid
    assert solvers.graph_cache_info()["captures"] == 5
    model.sample(z, steps=4, x0=x0)
    assert solvers.graph_cache_info() == {"captures": 5, "replays": 7, "cached": 5}
    with torch.inference_mode():                                     # captured in inference mode ...
        first = model.sample(z, steps=3, x0=x0)
    torch.testing.assert_close(model.sample(z, steps=3, x0=x0), first)   # ... replayed outside it
    assert solvers.graph_cache_info()["captures"] == 6
    # parameters updated in place: same graph; moved to new storage: captured anew
    with torch.no_grad():
        next(model.velocity.parameters()).mul_(1.5)
    model.sample(z, steps=4, x0=x0)
    assert solvers.graph_cache_info()["captures"] == 6
    p = next(model.velocity.parameters())
    p.data = p.data.clone()
    torch.testing.assert_close(model.sample(z, steps=4, x0=x0), model.sample(z, steps=4, x0=x0, graph=False))
    assert solvers.graph_cache_info()["captures"] == 7
    # the cache holds the model weakly
    del model, entries
    import gc
    gc.collect()
    assert solvers.graph_cache_info()["cached"] == 0


def test_graph_cache_lru_and_plain_fns(cpu_graphs, monkeypatch):
    monkeypatch.setattr(solvers, "GRAPH_CACHE_SIZE", 2)
    x0 = torch.randn(2, 3)
    for steps in (1, 2, 3, 1):
        torch.testing.assert_close(sample(f_cos, x0, steps, graph=True), sample(f_cos, x0, steps, graph=False))
    info = solvers.graph_cache_info()
    assert info["cached"] == 2 and info["captures"] == 4              # steps=1 was evicted by steps=3
    # tensor conditioning is copied into static buffers: new values replay the same graph
    zs = [torch.randn(2, 3) for _ in range(2)]
    def fn(x, t, z, k):
        return x * (k[0] if isinstance(k, list) else k) + z
    for z in zs:
        torch.testing.assert_close(sample(fn, x0, 3, "heun", z=z, k=0.5, graph=True),
                                   sample(fn, x0, 3, "heun", z=z, k=0.5, graph=False))
    assert solvers.graph_cache_info()["captures"] == 5
    sample(fn, x0, 3, "heun", z=zs[0], k=2.0, graph=True)             # another non-tensor value: new graph
    assert solvers.graph_cache_info()["captures"] == 6
    sample(fn, x0, 3, "heun", z=zs[0], k=[2.0], graph=True)           # unhashable: solved eagerly
    sample(fn, x0, 3, "heun", z=zs[0], k=2.0)                         # default: plain callables run eagerly
    assert solvers.graph_cache_info()["captures"] == 6


def test_graph_needs_no_grad(cpu_graphs):
    model = _perturbed_flowfm("dit")
    z = torch.randn(2, model.cfg.encoder.z_dim)
    with pytest.raises(ValueError, match="graph=True"):
        sample(model.velocity, torch.randn(2, 3, 60), 2, z=z, graph=True)
    out = sample(model.velocity, torch.randn(2, 3, 60), 2, z=z)        # default: eager, differentiable
    assert out.requires_grad and solvers.graph_cache_info()["captures"] == 0


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun", "rk4", "rk4_38"])
def test_solve_is_differentiable_when_grad_is_needed(method):
    """With grad on and parameters requiring grad, gradients flow through the K steps and equal
    those of a plain out-of-place loop of the same method (autograd through the reference)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5))

    def velocity(x, t):
        return net(x) * (1.0 + t[:, None])

    x0 = torch.randn(4, 5, requires_grad=True)
    solver = FixedStepSolver(method)
    x1 = solver.solve(velocity, x0, steps=3, graph=False)
    g_ours = torch.autograd.grad(x1.square().sum(), [x0, *net.parameters()])

    tab = solver.tableau
    x, dt = x0, 1.0 / 3
    for n in range(3):
        ks = []
        for i, c in enumerate(tab.c):
            xi = x + dt * sum(a * k for a, k in zip(tab.a[i], ks)) if i else x
            ks.append(velocity(xi, torch.full((4,), (n + c) * dt)))
        x = x + dt * sum(b * k for b, k in zip(tab.b, ks))
    g_want = torch.autograd.grad(x.square().sum(), [x0, *net.parameters()])
    torch.testing.assert_close(x1, x, rtol=1e-6, atol=1e-6)
    for a, b in zip(g_ours, g_want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
