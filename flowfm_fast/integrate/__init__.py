"""Fixed-step ODE solvers for ``dx/dt = v(x, t)`` from t = 0 (noise) to t = 1 (data)."""
from .solvers import METHODS, TABLEAUS, FixedStepSolver, make_grid, sample

__all__ = ["METHODS", "TABLEAUS", "FixedStepSolver", "make_grid", "sample"]
