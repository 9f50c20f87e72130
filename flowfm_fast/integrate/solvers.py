"""Explicit Runge-Kutta methods on a fixed time grid.

The velocity model contract is one sentence: ``velocity(x, t, **cond)`` with t of shape (B,).
Networks derived from :class:`~flowfm_fast.models.velocity.ConditionedVelocity` are faster:
when ``z`` is given, the conditioning of every stage time of the grid is computed in one batched
call before the loop (:meth:`prepare`), so the loop runs only the network's blocks.

No allocation inside the loop: the state, the one stage-input buffer and the trajectory are
allocated once per solve, and the updates are the in-place ``ops.euler_step_`` /
``ops.rk_combine`` (fused backends take them over). Only the velocity network allocates (its
output, one per stage). A solve that needs gradients (grad mode on and x0, z, a conditioning
tensor or a parameter requiring grad) updates out of place instead, so backpropagation through the
K steps works (in-place updates would overwrite tensors autograd saved).

CUDA graphs (``graph=None`` means on for CUDA inputs and an ``nn.Module`` velocity when no
gradient is needed, ``graph=True`` for any callable; ignored on other devices): the whole K-step solve, conditioning included, is captured in one CUDA graph
over static input buffers (x0, z and any tensor ``cond``), after running it once on a side stream
so every kernel variant is compiled and autotuned first. Graphs are cached per velocity object
(weakly: a collected model frees its graphs) and per (shape, dtype, device, steps, method,
grid, trajectory, conditioning keys, forced backend, autocast, training flag), up to
:data:`GRAPH_CACHE_SIZE` per velocity, and re-captured when a parameter's storage moved.
Output contract: every call returns fresh tensors copied out of the graph's static output, so a
later call never overwrites an earlier result. The graph reads parameters in place: updating
weights in place is seen by the next replay. A new callable (a fresh lambda) captures anew:
pass the same object to reuse its graph.

NVTX (``FLOWFM_NVTX=1``, see :mod:`flowfm_fast.nvtx`): ``integrate.prepare`` around the
batched conditioning and ``integrate.step{n}`` around each step of an eager solve. NVTX calls run
on the host, so a graph records none: the per-step ranges appear once, inside
``integrate.graph_capture``, and every replay is one ``integrate.graph_replay`` range holding all
K steps' kernels. Pass ``graph=False`` to see the per-step ranges.

Example::

    >>> solver = FixedStepSolver("midpoint")
    >>> x1 = solver.solve(model.velocity, torch.randn(16, 3, 300), steps=8, z=z)
"""
from __future__ import annotations

import collections
import contextlib
import inspect
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable

import torch

from .. import ops
from ..ops import _registry
from ..nvtx import nvtx_range, nvtx_wrap


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


GRAPH_CACHE_SIZE = 16   # graphs kept per velocity object (LRU); each holds its own memory pool
_GRAPH_DEVICES = ("cuda",)


class _Plan:
    """One solve's static part: grid-derived tensors and the buffers the loop writes into.

    Built outside any graph capture (it copies the grid to the device); :meth:`run` only launches
    device work, so it can be captured.
    """

    def __init__(self, tableau: Tableau, times: torch.Tensor, dts: list[float], x0: torch.Tensor,
                 prepared_ok: bool, return_trajectory: bool):
        self.tab, self.dts, self.prepared_ok = tableau, dts, prepared_ok
        B = x0.shape[0]
        self.times32 = times.to(device=x0.device, dtype=torch.float32)
        # A plain velocity fn sees t in x0's precision (the network path embeds t in fp32 anyway).
        t_rows = times.to(device=x0.device, dtype=x0.dtype)[:, None].expand(-1, B)
        self.t_rows = [t_rows[j] for j in range(t_rows.shape[0])]
        self.x = torch.empty_like(x0)
        self.stage_x = torch.empty_like(x0) if len(tableau.c) > 1 else None
        self.traj = x0.new_empty((len(dts) + 1, *x0.shape)) if return_trajectory else None
        self.step_ranges = tuple(f"integrate.step{n}" for n in range(len(dts)))   # NVTX names, built once

    def run(self, velocity: Callable, x0: torch.Tensor, z: torch.Tensor | None, cond: dict,
            differentiable: bool = False):
        """Integrate into ``self.x`` / ``self.traj``; ``differentiable``: out-of-place updates that
        keep autograd history (in-place updates of a tensor autograd saved would break backward),
        returning (x, trajectory or None) instead."""
        tab, S = self.tab, len(self.tab.c)
        prepared = None
        if z is not None and self.prepared_ok:
            with nvtx_range("integrate.prepare"):
                prepared = velocity.prepare(self.times32, z)
        elif z is not None:
            cond = {**cond, "z": z}
        t_rows = self.t_rows

        def f(j, xs):
            if prepared is not None:
                return velocity.forward_modulated(xs, prepared[j])
            return velocity(xs, t_rows[j], **cond)

        if differentiable:
            return self._run_out_of_place(f, x0, S)
        x, stage_x, traj = self.x, self.stage_x, self.traj
        x.copy_(x0)
        if traj is not None:
            traj[0].copy_(x0)
        for n, dt in enumerate(self.dts):
            with nvtx_range(self.step_ranges[n]):
                ks = []
                for i in range(S):
                    xi = x if i == 0 else ops.rk_combine(x, dt, ks, tab.a[i], out=stage_x)
                    ks.append(f(n * S + i, xi))
                if S == 1:
                    ops.euler_step_(x, ks[0], dt)
                else:
                    ops.rk_combine(x, dt, ks, tab.b, out=x)
                if traj is not None:
                    traj[n + 1].copy_(x)

    def _run_out_of_place(self, f, x0, S):
        tab, x = self.tab, x0
        xs = [x0] if self.traj is not None else None
        for n, dt in enumerate(self.dts):
            with nvtx_range(self.step_ranges[n]):
                ks = []
                for i in range(S):
                    ks.append(f(n * S + i, x if i == 0 else ops.rk_combine(x, dt, ks, tab.a[i])))
                x = ops.rk_combine(x, dt, ks, tab.b)
                if xs is not None:
                    xs.append(x)
        return x, (torch.stack(xs) if xs is not None else None)


class _Graphed:
    """A captured solve: static inputs, the graph, its static outputs, and what it must outlive."""

    def __init__(self, plan: _Plan, velocity, x0, z, cond, param_ptrs):
        self.static_x0 = x0.detach().clone()
        self.static_z = z.detach().clone() if z is not None else None
        self.static_cond = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in cond.items()}
        self.plan = plan
        self.param_ptrs = param_ptrs
        self.replays = 0
        with torch.no_grad():
            self._capture(velocity)

    @nvtx_wrap("integrate.graph_capture")
    def _capture(self, velocity) -> None:
        plan, dev = self.plan, self.static_x0.device
        # Warm-up on a side stream (as torch.cuda.graph's docs ask): compiles and autotunes every
        # Triton / cuBLAS variant the loop uses, so nothing is compiled or synchronised in capture.
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                plan.run(velocity, self.static_x0, self.static_z, self.static_cond)
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with contextlib.ExitStack() as stack:
            if torch.is_autocast_enabled("cuda"):
                # Autocast's weight-cast cache must not hand captured memory to later eager code.
                stack.enter_context(torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                                                  cache_enabled=False))
            stack.enter_context(torch.cuda.graph(self.graph))
            plan.run(velocity, self.static_x0, self.static_z, self.static_cond)

    def _replay(self) -> None:
        self.graph.replay()

    def __call__(self, x0, z, cond):
        self.static_x0.copy_(x0)
        if z is not None:
            self.static_z.copy_(z)
        for k, v in cond.items():
            if isinstance(v, torch.Tensor):
                self.static_cond[k].copy_(v)
        # One range for the whole replay: the graph holds no NVTX calls (see the module docstring).
        with nvtx_range("integrate.graph_replay"):
            self._replay()
        self.replays += 1
        # Copy out: the static buffers are overwritten by the next replay.
        x = self.plan.x.clone()
        return x, (self.plan.traj.clone() if self.plan.traj is not None else None)


_GRAPHED = _Graphed   # tests swap in an eager stand-in to check the cache logic without a GPU

# velocity (weakly) -> OrderedDict[key -> _Graphed]; bound methods are keyed on their object.
_GRAPHS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_STATS = {"captures": 0, "replays": 0}


def _needs_grad(velocity, x0, z, cond) -> bool:
    """Grad mode is on and x0, z, a conditioning tensor or a parameter of the velocity module
    requires grad: the solve must then keep autograd history."""
    if not torch.is_grad_enabled():
        return False
    mod = velocity.__self__ if inspect.ismethod(velocity) else velocity
    tensors = [x0, *([z] if z is not None else []), *(v for v in cond.values() if isinstance(v, torch.Tensor))]
    params = mod.parameters() if isinstance(mod, torch.nn.Module) else ()
    return any(t.requires_grad for t in tensors) or any(p.requires_grad for p in params)


def graph_cache_info() -> dict:
    """Counts since the last :func:`clear_graph_cache`: ``captures``, ``replays``, ``cached`` graphs."""
    return dict(_STATS, cached=sum(len(d) for d in _GRAPHS.values()))


def clear_graph_cache() -> None:
    """Drop every cached CUDA graph (and its memory pool) and reset the counts."""
    _GRAPHS.clear()
    _STATS.update(captures=0, replays=0)


def _owner(velocity):
    """(object the cache is keyed on weakly, extra identity) of a velocity callable."""
    if inspect.ismethod(velocity):
        return velocity.__self__, velocity.__func__
    return velocity, None


def _param_ptrs(velocity) -> tuple:
    mod = velocity.__self__ if inspect.ismethod(velocity) else velocity
    if isinstance(mod, torch.nn.Module):
        return tuple(t.data_ptr() for t in (*mod.parameters(), *mod.buffers()))
    return ()


def _tensor_sig(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.dtype, t.device


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
              z: torch.Tensor | None = None, return_trajectory: bool = False, graph: bool | None = None,
              **cond):
        """Integrate from x0 at grid[0] to grid[-1]; returns x (and the (K+1, ...) trajectory).

        ``steps`` uniform steps on [0, 1] (8 when neither steps nor grid is given), or ``grid``.
        ``graph``: replay a cached CUDA graph of the whole solve (CUDA inputs only; ignored
        elsewhere). None (default) uses it on CUDA for an ``nn.Module`` velocity (or a method of
        one) when no gradient is needed; True also for plain callables, and raises when a gradient
        is needed. Results are fresh tensors either way (never a graph's buffer).
        """
        if not isinstance(x0, torch.Tensor) or not x0.is_floating_point():
            raise TypeError("x0 must be a floating-point torch.Tensor")
        if x0.dim() < 1 or x0.shape[0] == 0:
            raise ValueError(f"x0 must be batched and non-empty, got shape {tuple(x0.shape)}")
        if z is not None and (not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[0] != x0.shape[0]):
            raise ValueError(f"z must have shape (B, z_dim) with B = {x0.shape[0]} (x0's batch), "
                             f"got {tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
        if graph not in (None, True, False):
            raise TypeError(f"graph must be None, True or False, got {graph!r}")
        g = make_grid(8 if steps is None and grid is None else steps, grid)
        prepared_ok = z is not None and hasattr(velocity, "prepare") and not cond

        needs_grad = _needs_grad(velocity, x0, z, cond)   # once: it walks the module's parameters
        if self._use_graph(graph, velocity, x0, needs_grad):
            out = self._solve_graphed(velocity, x0, g, z, cond, return_trajectory, prepared_ok)
            if out is not None:
                x, traj = out
                return (x, traj) if return_trajectory else x
        plan = _Plan(self.tableau, self.stage_times(g), (g[1:] - g[:-1]).tolist(), x0, prepared_ok,
                     return_trajectory)
        if needs_grad:
            x, traj = plan.run(velocity, x0, z, cond, differentiable=True)
            return (x, traj) if return_trajectory else x
        plan.run(velocity, x0, z, cond)
        return (plan.x, plan.traj) if return_trajectory else plan.x

    # ---------------------------------------------------------------- CUDA graph path
    @staticmethod
    def _use_graph(graph, velocity, x0, needs_grad: bool) -> bool:
        if graph is False or x0.device.type not in _GRAPH_DEVICES:
            return False
        mod = velocity.__self__ if inspect.ismethod(velocity) else velocity
        if graph is None and not isinstance(mod, torch.nn.Module):
            # Plain functions only on request: a fresh lambda per call would pay a capture per call,
            # and a closure's captured tensors are invisible to the cache key.
            return False
        if needs_grad:
            if graph is True:
                raise ValueError("graph=True gives results without autograd history, but gradients are "
                                 "enabled for these inputs/parameters: call under torch.no_grad() "
                                 "or pass graph=False")
            return False
        return True

    def _solve_graphed(self, velocity, x0, g, z, cond, return_trajectory, prepared_ok):
        owner, extra = _owner(velocity)
        cond_key = []
        for k in sorted(cond):
            v = cond[k]
            if isinstance(v, torch.Tensor):
                cond_key.append((k, _tensor_sig(v)))
            else:
                try:
                    hash(v)
                except TypeError:
                    return None   # an unhashable non-tensor argument cannot key a graph: run eagerly
                cond_key.append((k, v))
        mod = owner if isinstance(owner, torch.nn.Module) else None
        key = (extra, self.method, tuple(g.tolist()), _tensor_sig(x0),
               _tensor_sig(z) if z is not None else None, tuple(cond_key), bool(return_trajectory),
               prepared_ok, _registry.forced_backend(), torch.is_autocast_enabled("cuda"),
               torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None,
               mod.training if mod is not None else None)
        try:
            per_owner = _GRAPHS.get(owner)
            if per_owner is None:
                per_owner = _GRAPHS[owner] = collections.OrderedDict()
        except TypeError:
            warnings.warn(f"{type(owner).__name__} cannot be weakly referenced, so its CUDA graph cannot be "
                          "cached; solving eagerly", RuntimeWarning, stacklevel=3)
            return None
        ptrs = _param_ptrs(velocity)
        entry = per_owner.get(key)
        if entry is None or entry.param_ptrs != ptrs:
            per_owner.pop(key, None)
            # Static buffers are normal tensors even when the first call runs under inference_mode,
            # so that a later call outside it can still copy its inputs in.
            with torch.inference_mode(False):
                plan = _Plan(self.tableau, self.stage_times(g), (g[1:] - g[:-1]).tolist(), x0, prepared_ok,
                             return_trajectory)
                entry = _GRAPHED(plan, velocity, x0, z, cond, ptrs)
            _STATS["captures"] += 1
            per_owner[key] = entry
            while len(per_owner) > GRAPH_CACHE_SIZE:
                per_owner.popitem(last=False)
        else:
            per_owner.move_to_end(key)
        _STATS["replays"] += 1
        with torch.no_grad():
            return entry(x0, z, cond)


def sample(velocity: Callable, x0: torch.Tensor, steps: int | None = None, method: str = "euler", grid=None,
           z: torch.Tensor | None = None, return_trajectory: bool = False, graph: bool | None = None, **cond):
    """Functional form of :meth:`FixedStepSolver.solve`."""
    return FixedStepSolver(method).solve(velocity, x0, steps, grid, z, return_trajectory, graph, **cond)
