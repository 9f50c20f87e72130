"""Explicit Runge-Kutta methods on a fixed time grid.

The velocity model contract is one sentence: ``velocity(x, t, **cond)`` with t of shape (B,).
Networks derived from :class:`~flowfm_fast.models.velocity.ConditionedVelocity` are faster:
when ``z`` is given, the conditioning of every stage time of the grid is computed in one batched
call before the loop (:meth:`prepare`), so the loop runs only the network's blocks.

Stage buffers are allocated once per solve; updates go through ``ops.euler_step_`` /
``ops.rk_combine`` so fused backends take them over.

Example::

    >>> solver = FixedStepSolver("midpoint")
    >>> x1 = solver.solve(model.velocity, torch.randn(16, 3, 300), steps=8, z=z)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .. import ops


@dataclass(frozen=True)
class Tableau:
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]   # a[i] holds the i weights of stages 0..i-1 for stage i
    b: tuple[float, ...]


TABLEAUS = {
    "euler": Tableau((0.0,), ((),), (1.0,)),
    "midpoint": Tableau((0.0, 0.5), ((), (0.5,)), (0.0, 1.0)),
    "heun": Tableau((0.0, 1.0), ((), (1.0,)), (0.5, 0.5)),
    "rk4": Tableau((0.0, 0.5, 0.5, 1.0), ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
                   (1 / 6, 1 / 3, 1 / 3, 1 / 6)),
    # Kutta's 3/8 rule: what torchdiffeq calls "rk4".
    "rk4_38": Tableau((0.0, 1 / 3, 2 / 3, 1.0), ((), (1 / 3,), (-1 / 3, 1.0), (1.0, -1.0, 1.0)),
                      (1 / 8, 3 / 8, 3 / 8, 1 / 8)),
}
METHODS = tuple(TABLEAUS)


def make_grid(steps: int | None = None, grid=None, device=None) -> torch.Tensor:
    """A uniform grid of ``steps`` steps on [0, 1], or the user's increasing ``grid`` checked."""
    if grid is not None:
        if steps is not None and len(grid) - 1 != steps:
            raise ValueError(f"steps={steps} disagrees with a grid of {len(grid)} points")
        g = torch.as_tensor(grid, dtype=torch.float64).flatten()
        if g.numel() < 2:
            raise ValueError(f"grid must have at least 2 points, got {g.numel()}")
        if not bool(torch.isfinite(g).all()) or float(g.min()) < 0.0 or float(g.max()) > 1.0:
            raise ValueError("grid must lie within [0, 1]")
        if not bool((g[1:] > g[:-1]).all()):
            raise ValueError("grid must be strictly increasing")
        return g.to(device) if device is not None else g
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    g = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    return g.to(device) if device is not None else g


class FixedStepSolver:
    """Fixed-grid explicit RK solver (``method`` in :data:`METHODS`)."""

    def __init__(self, method: str = "euler"):
        if method not in TABLEAUS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method = method
        self.tableau = TABLEAUS[method]

    def stage_times(self, grid: torch.Tensor) -> torch.Tensor:
        """(steps * stages,) times at which the velocity is evaluated, in loop order."""
        t0, dt = grid[:-1, None], (grid[1:] - grid[:-1])[:, None]
        c = torch.tensor(self.tableau.c, dtype=grid.dtype, device=grid.device)[None, :]
        return (t0 + c * dt).reshape(-1)

    def solve(self, velocity: Callable, x0: torch.Tensor, steps: int | None = None, grid=None,
              z: torch.Tensor | None = None, return_trajectory: bool = False, **cond):
        """Integrate from x0 at grid[0] to grid[-1]; returns x (and the (K+1, ...) trajectory).

        ``steps`` uniform steps on [0, 1] (8 when neither steps nor grid is given), or ``grid``.
        """
        if not isinstance(x0, torch.Tensor) or not x0.is_floating_point():
            raise TypeError("x0 must be a floating-point torch.Tensor")
        if x0.dim() < 1 or x0.shape[0] == 0:
            raise ValueError(f"x0 must be batched and non-empty, got shape {tuple(x0.shape)}")
        if z is not None and (z.dim() != 2 or z.shape[0] != x0.shape[0]):
            raise ValueError(f"z must have shape (B, z_dim) with B = {x0.shape[0]} (x0's batch), "
                             f"got {tuple(z.shape)}")
        g = make_grid(8 if steps is None and grid is None else steps, grid)
        tab = self.tableau
        S = len(tab.c)
        times = self.stage_times(g)
        dts = (g[1:] - g[:-1]).tolist()
        B = x0.shape[0]

        prepared = None
        if z is not None and hasattr(velocity, "prepare") and not cond:
            prepared = velocity.prepare(times.to(device=x0.device, dtype=torch.float32), z)
        elif z is not None:
            cond = {**cond, "z": z}
        # A plain velocity fn sees t in x0's precision (the network path embeds t in fp32 anyway).
        t_rows = times.to(device=x0.device, dtype=x0.dtype)[:, None].expand(-1, B)

        def f(j, xs):
            if prepared is not None:
                return velocity.forward_modulated(xs, prepared[j])
            return velocity(xs, t_rows[j], **cond)

        x = x0.clone()
        stage_x = torch.empty_like(x) if S > 1 else None
        traj = [x0.clone()] if return_trajectory else None
        for n, dt in enumerate(dts):
            ks = []
            for i in range(S):
                xi = x if i == 0 else ops.rk_combine(x, dt, ks, tab.a[i], out=stage_x)
                ks.append(f(n * S + i, xi))
            if S == 1:
                ops.euler_step_(x, ks[0], dt)
            else:
                ops.rk_combine(x, dt, ks, tab.b, out=x)
            if traj is not None:
                traj.append(x.clone())
        return (x, torch.stack(traj)) if return_trajectory else x


def sample(velocity: Callable, x0: torch.Tensor, steps: int | None = None, method: str = "euler", grid=None,
           z: torch.Tensor | None = None, return_trajectory: bool = False, **cond):
    """Functional form of :meth:`FixedStepSolver.solve`."""
    return FixedStepSolver(method).solve(velocity, x0, steps, grid, z, return_trajectory, **cond)
