"""Step sizes chosen for a budget of K steps (BOSS: Bellman optimal step sizes, Nguyen et al. 2023).

Given a trained field v, a calibration batch of noise x0 (and conditions z) and a budget K, pick
the K-step time grid 0 = s_0 < ... < s_K = 1 from a fine candidate grid t_0 < ... < t_N that
minimises the summed local error against a fine reference solve:

    cost(i, j) = mean | X(t_j) - Phi(X(t_i), t_i, t_j) |^2,

X the reference trajectory at the candidates (``reference`` method on the candidate grid),
Phi one step of ``method`` from t_i to t_j. The best K-jump path from t_0 to t_N is a shortest
path with exactly K edges: dynamic programming in O(K N^2) over the cost table. Euler's table
needs only the N velocities along the reference (one network call per candidate); a method with
more stages also evaluates its inner stages for every (i, j): about (stages - 1) N^2 / 2 calls,
batched over j.
"""
from __future__ import annotations

from typing import Callable

import torch

from .solvers import METHODS, TABLEAUS, sample


def _call(velocity, x, t, z):
    tt = t.expand(x.shape[0]) if t.dim() == 0 else t
    return velocity(x, tt, z) if z is not None else velocity(x, tt)


@torch.no_grad()
def step_cost_table(velocity: Callable, x0: torch.Tensor, method: str = "euler", z: torch.Tensor | None = None,
                    candidates: int = 64, reference: str = "rk4",
                    max_rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(candidate times (N + 1,) float64, cost (N + 1, N + 1) float64 with +inf where j <= i)."""
    if method not in METHODS or reference not in METHODS:
        raise ValueError(f"method and reference must be in {METHODS}, got {method!r}, {reference!r}")
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise ValueError(f"candidates must be a positive int, got {candidates!r}")
    t = torch.linspace(0.0, 1.0, candidates + 1, dtype=torch.float64)
    _, traj = sample(velocity, x0, None, reference, grid=t.tolist(), z=z, return_trajectory=True, graph=False)
    X = traj
    N, B = candidates, x0.shape[0]
    tab = TABLEAUS[method]
    cost = torch.full((N + 1, N + 1), float("inf"), dtype=torch.float64)
    tx = lambda v: torch.tensor(v, dtype=X.dtype, device=X.device)
    for i in range(N):
        xi = X[i]
        k0 = _call(velocity, xi, tx(float(t[i])), z)                 # stage 0 is shared by every j
        js_all = torch.arange(i + 1, N + 1)
        # at most ~max_rows windows per network call: the inner stages of every j run batched
        for js in js_all.split(max(1, max_rows // B)) if len(tab.c) > 1 else (js_all,):
            cost[i, js] = _step_errors(velocity, tab, X, t, i, js, xi, k0, z).cpu()
    return t, cost


def _step_errors(velocity, tab, X, t, i, js, xi, k0, z):
    """mean |X(t_j) - Phi(X(t_i), t_i, t_j)|^2 for every j in ``js``, (J,) float64."""
    B, J = xi.shape[0], len(js)
    h = (t[js] - t[i]).to(X.dtype).to(X.device)                      # (J,)
    ones = [1] * (xi.dim() - 1)
    hb = h.repeat_interleave(B).view(J * B, *ones)
    xb = xi.repeat(J, *ones)
    zb = z.repeat(J, 1) if z is not None else None
    ks = [k0.repeat(J, *ones)]
    for s in range(1, len(tab.c)):
        xs = xb + hb * sum(a * kk for a, kk in zip(tab.a[s], ks) if a != 0.0)
        ts = (float(t[i]) + tab.c[s] * h).repeat_interleave(B)
        ks.append(_call(velocity, xs, ts, zb))
    step = xb + hb * sum(b * kk for b, kk in zip(tab.b, ks) if b != 0.0)
    return (step - X[js].reshape(J * B, *xi.shape[1:])).double().pow(2).reshape(J, -1).mean(1)


def best_path(cost: torch.Tensor, steps: int) -> tuple[list[int], float]:
    """Indices 0 = i_0 < ... < i_K = N of the K-edge path of least summed cost, and that cost."""
    N = cost.shape[0] - 1
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= N:
        raise ValueError(f"steps must be an int in [1, {N}] (the candidate grid's size), got {steps!r}")
    c = cost.double()
    inf = float("inf")
    D = torch.full((steps + 1, N + 1), inf, dtype=torch.float64)
    arg = torch.zeros((steps + 1, N + 1), dtype=torch.long)
    D[0, 0] = 0.0
    for k in range(1, steps + 1):
        tot = D[k - 1][:, None] + c                       # (from i, to j)
        D[k], arg[k] = tot.min(0)
    path = [N]
    for k in range(steps, 0, -1):
        path.append(int(arg[k, path[-1]]))
    path.reverse()
    return path, float(D[steps, N])


def optimal_grids(velocity: Callable, x0: torch.Tensor, steps, method: str = "euler",
                  z: torch.Tensor | None = None, candidates: int = 64, reference: str = "rk4") -> dict[int, dict]:
    """{K: the BOSS grid record for K steps of ``method``} for every K in ``steps``, from one cost
    table (the table is the expensive part; each extra K is one dynamic programme)."""
    steps = list(steps)
    for K in steps:
        if isinstance(K, bool) or not isinstance(K, int) or K < 1:
            raise ValueError(f"steps must be positive ints, got {K!r}")
        if candidates < K:
            raise ValueError(f"candidates ({candidates}) must be >= steps ({K})")
    t, cost = step_cost_table(velocity, x0, method, z, candidates, reference)
    out = {}
    for K in steps:
        path, total = best_path(cost, K)
        rec = {"grid": [float(t[i]) for i in path], "method": method, "steps": K, "cost": total,
               "candidates": candidates, "reference": reference, "calibration": int(x0.shape[0])}
        if candidates % K == 0:
            u = list(range(0, candidates + 1, candidates // K))
            rec["uniform_cost"] = float(sum(cost[a, b] for a, b in zip(u, u[1:])))
        out[K] = rec
    return out


def optimal_grid(velocity: Callable, x0: torch.Tensor, steps: int, method: str = "euler",
                 z: torch.Tensor | None = None, candidates: int = 64, reference: str = "rk4") -> dict:
    """The BOSS grid for ``steps`` steps of ``method``: ``{"grid": [K + 1 floats], "cost": summed
    local error, "uniform_cost": the same for the uniform K-step grid (when it lies on the
    candidates), ...}``. Pass the result's ``grid`` to ``sample(..., grid=...)``."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    return optimal_grids(velocity, x0, [steps], method, z, candidates, reference)[steps]
