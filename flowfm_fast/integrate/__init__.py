"""Fixed-step ODE solvers for ``dx/dt = v(x, t)`` from t = 0 (noise) to t = 1 (data)."""
from .solvers import (GRAPH_CACHE_SIZE, METHODS, TABLEAUS, FixedStepSolver, clear_graph_cache, graph_cache_info,
                      make_grid, sample)

__all__ = ["GRAPH_CACHE_SIZE", "METHODS", "TABLEAUS", "FixedStepSolver", "clear_graph_cache", "graph_cache_info",
           "make_grid", "sample"]
