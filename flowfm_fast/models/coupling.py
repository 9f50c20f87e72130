"""Couplings of noise x0 and data x1 within a batch, applied before the flow-matching path.

- ``independent``: the pairs as drawn (x0 ~ N(0, I) independent of x1).
- ``ot``: minibatch exact optimal transport on the squared distance |x0_i - x1_j|^2 (OT-CFM,
  Tong et al. 2024): x0 is re-ordered by the optimal assignment. With a condition z that varies
  per window, the noise paired with windows of one kind then comes from one region of the prior,
  while sampling draws x0 from all of it; plain minibatch OT can hurt conditional generation
  (Cheng & Schwing 2025, arXiv 2503.10636).
- ``c2ot``: that paper's condition-aware OT. Each noise sample carries the condition of the
  window it was drawn beside (z_i), the cost adds w (1 - cos(z_i, z_j)), and w is chosen per
  batch so that a fraction ``target_r`` of the (i, j) entries cost no more than window j's own
  independent pair (their adaptive search; 0.2 is the paper's value for continuous conditions).
  w -> inf gives back the independent pairs (also where no finite w meets the target), w = 0
  plain OT.
- ``wcfm``: Weighted CFM (Calvo-Ordonez et al. 2025): the independent pairs kept, each weighted
  by the Gibbs kernel exp(-c(x0_i, x1_i) / eps), normalised to mean 1 over the batch, which
  ``fm_loss``'s ``weight`` carries into the fused loss kernels. ``eps`` is relative to the batch's
  mean pair cost (costs concentrate around 2 C L, so an absolute eps would depend on the window
  size).

The assignment is scipy's ``linear_sum_assignment`` (Jonker-Volgenant) on the host: a sync per
step, so ``ot`` and ``c2ot`` cannot be captured in a CUDA graph (``wcfm`` can).
"""
from __future__ import annotations

import math

import numpy as np
import torch

COUPLINGS = ("independent", "ot", "wcfm", "c2ot")
ASSIGNED = ("ot", "c2ot")            # the couplings that solve an assignment on the host


def pair_costs(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """(B, B) fp32 matrix of |x0_i - x1_j|^2 (rows noise, columns data)."""
    a, b = x0.detach().flatten(1).float(), x1.detach().flatten(1).float()
    return ((a * a).sum(1, keepdim=True) - 2.0 * a @ b.T + (b * b).sum(1)[None, :]).clamp_min_(0.0)


def condition_costs(z: torch.Tensor) -> torch.Tensor:
    """(B, B) cosine distance 1 - cos(z_i, z_j) of the conditions (C2OT's choice for continuous
    ones); exactly 0 on the diagonal, and entries within fp32 rounding of 0 are 0."""
    u = torch.nn.functional.normalize(z.detach().float(), dim=1)
    C = 1.0 - u @ u.T
    return C.masked_fill_(C < 1e-6, 0.0).fill_diagonal_(0.0)


def cheaper_fraction(M: torch.Tensor, C: torch.Tensor, w: float) -> float:
    """Fraction of entries (i, j) with M_ij + w C_ij <= M_jj: how many re-pairings of window j
    cost no more than its own independent pair (w = inf: those with C_ij = 0 and M_ij <= M_jj)."""
    diag = torch.diagonal(M)[None, :]
    if math.isinf(w):
        return float(((C == 0) & (M <= diag)).float().mean())
    return float(((M + w * C) <= diag).float().mean())


def search_condition_weight(M: torch.Tensor, C: torch.Tensor, target_r: float, iters: int = 40) -> float:
    """The smallest w (to a relative 2^-iters of the bracket) whose cheaper fraction is <= target_r;
    0 when plain OT already meets it, inf when no finite w can (a batch of fewer than 1 / target_r
    windows, or many identical conditions): then the pairs stay independent."""
    if cheaper_fraction(M, C, 0.0) <= target_r:
        return 0.0
    if cheaper_fraction(M, C, math.inf) > target_r:
        return math.inf
    hi = float(M.mean()) + 1.0            # the scale at which the condition term starts to count
    while cheaper_fraction(M, C, hi) > target_r:
        hi *= 2.0
    lo = 0.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if cheaper_fraction(M, C, mid) > target_r:
            lo = mid
        else:
            hi = mid
    return hi


def assign(cost: torch.Tensor) -> torch.Tensor:
    """perm with x0[perm] paired to x1 in order, minimising sum_j cost[perm[j], j] (exact)."""
    from scipy.optimize import linear_sum_assignment
    c = cost.double().cpu().numpy()
    if not np.isfinite(c).all():
        raise ValueError("coupling cost has non-finite entries (inf or nan in x0, x1 or z)")
    rows, cols = linear_sum_assignment(c)
    perm = np.empty_like(rows)
    perm[cols] = rows
    return torch.from_numpy(perm).to(cost.device)


def gibbs_weights(x0: torch.Tensor, x1: torch.Tensor, eps: float) -> torch.Tensor:
    """exp(-c_i / (eps mean(c))) of the pairs (x0_i, x1_i), normalised to mean 1 (fp32, (B,), no grad)."""
    c = (x0.detach().float() - x1.detach().float()).flatten(1).pow(2).sum(1)
    return torch.softmax(-c / (eps * c.mean().clamp_min(1e-12)), 0) * c.shape[0]


def couple(kind: str, x0: torch.Tensor, x1: torch.Tensor, z: torch.Tensor | None = None,
           eps: float = 0.1, target_r: float = 0.2) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x0 re-paired with x1 in order, per-pair loss weights or None) for coupling ``kind``.
    ``independent`` and ``wcfm`` are tensor ops (``torch.compile(fullgraph=True)`` traces them);
    ``ot`` and ``c2ot`` leave the graph for the host assignment."""
    if kind == "independent":
        return x0, None
    if kind not in COUPLINGS:
        raise ValueError(f"coupling must be one of {COUPLINGS}, got {kind!r}")
    if kind == "wcfm":
        return x0, gibbs_weights(x0, x1, eps)
    if kind == "c2ot" and z is None:
        raise ValueError("coupling='c2ot' needs the conditions z")
    perm = _assignment(kind, x0, x1, z, target_r)
    return (x0, None) if perm is None else (x0[perm], None)


@torch.compiler.disable
@torch.no_grad()
def _assignment(kind: str, x0, x1, z, target_r: float) -> torch.Tensor | None:
    """The permutation of x0 that ``ot`` / ``c2ot`` pair with x1 (None: keep the drawn pairs)."""
    M = pair_costs(x0, x1)
    if kind == "c2ot":
        C = condition_costs(z)
        w = search_condition_weight(M, C, target_r)
        if math.isinf(w):
            return None
        M = M + w * C
    return assign(M)
