"""DDPM counterpart of the flow-matching objective (Ho et al. 2020; cosine schedule of Nichol &
Dhariwal 2021): epsilon or v prediction with the same conditioned networks, ancestral and DDIM samplers.

Discrete timesteps k = 1..T, k = T is (almost) pure noise. The schedule:

    alpha_bar(k) = f(k) / f(0),  f(k) = cos^2(((k / T + s) / (1 + s)) * pi / 2),  s = 0.008
    beta_k = min(1 - alpha_bar(k) / alpha_bar(k - 1), 0.999),  alpha_bar recomputed as prod(1 - beta)

Forward process: x_k = sqrt(abar_k) x + sqrt(1 - abar_k) eps. The network predicts eps (or
v = sqrt(abar_k) eps - sqrt(1 - abar_k) x, ``prediction="v"``) from (x_k, t_net, z), where the
network's time input follows the package convention (t = 0 noise, t = 1 data):
``t_net = 1 - k / T``, so the same timestep embedder serves both objectives.
"""
from __future__ import annotations

import math

import torch

from ..nvtx import nvtx_range

SCHEDULE_OFFSET = 0.008
MAX_BETA = 0.999
SPACINGS = ("leading", "trailing")
PREDICTIONS = ("eps", "v")            # what the network outputs: the noise, or v = sqrt(abar) eps - sqrt(1 - abar) x
# Rows of conditioning computed per batched ``prepare`` call: at 1000 steps the modulations of
# every step at once would take (steps x B x 6 x depth x dim) floats (~0.9 GB for small at B=64).
PREPARE_ROWS = 4096


class CosineSchedule:
    """``alpha_bar`` (T + 1,) float64 with alpha_bar[0] = 1, and ``beta`` (T + 1,) with beta[0] = 0.

    >>> sch = CosineSchedule(1000)
    >>> x_k = sch.q_sample(x, k, eps)
    """

    def __init__(self, T: int = 1000, s: float = SCHEDULE_OFFSET, max_beta: float = MAX_BETA):
        if T < 1:
            raise ValueError(f"T must be >= 1, got {T}")
        self.T = T
        k = torch.arange(T + 1, dtype=torch.float64)
        f = torch.cos((k / T + s) / (1 + s) * math.pi / 2) ** 2
        abar_raw = f / f[0]
        beta = (1 - abar_raw[1:] / abar_raw[:-1]).clamp(max=max_beta)
        self.beta = torch.cat([torch.zeros(1, dtype=torch.float64), beta])
        self.alpha_bar = torch.cumprod(1 - self.beta, 0)

    def t_net(self, k: torch.Tensor) -> torch.Tensor:
        """Network time input of timestep k: 1 - k / T (t = 1 is data, as for flow matching)."""
        return 1.0 - k.double() / self.T

    def coeffs(self, k: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(abar_k), sqrt(1 - abar_k)) as (B, 1, 1) tensors in ``like``'s dtype and device."""
        ab = self.alpha_bar[k.cpu()]
        shape = (-1,) + (1,) * (like.dim() - 1)
        return (ab.sqrt().to(like.device, like.dtype).view(shape),
                (1 - ab).sqrt().to(like.device, like.dtype).view(shape))

    def q_sample(self, x: torch.Tensor, k: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_k = sqrt(abar_k) x + sqrt(1 - abar_k) eps."""
        a, b = self.coeffs(k, x)
        return a * x + b * eps

    def sample_k(self, batch: int, device, generator=None) -> torch.Tensor:
        """k ~ Uniform{1, ..., T} (the DDPM training distribution)."""
        return torch.randint(1, self.T + 1, (batch,), device=device, generator=generator)

    def timesteps(self, steps: int, spacing: str = "leading") -> list[int]:
        """Descending ``steps`` timesteps for a strided sampler, ending in 0 (abar = 1).

        ``"leading"``: k_i = i * (T // steps) + 1 (DDIM's original spacing; the first step sits at
        k = (steps - 1) * (T // steps) + 1 < T, so the chain starts from N(0, I) treated as a
        slightly-less-noisy level). ``"trailing"``: k_i = round(T - i * T / steps), the first step
        at k = T where x_T ~ N(0, I) is exactly the training marginal (Lin et al. 2024, table 2).
        Both visit every k at steps = T."""
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise TypeError(f"steps must be an int, got {type(steps).__name__}")
        if not 1 <= steps <= self.T:
            raise ValueError(f"steps must lie in [1, T={self.T}], got {steps}")
        if spacing == "leading":
            stride = self.T // steps
            return [i * stride + 1 for i in reversed(range(steps))] + [0]
        if spacing == "trailing":
            return [int(round(self.T - i * self.T / steps)) for i in range(steps)] + [0]
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")


def eps_loss(eps_hat: torch.Tensor, eps: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """mean_b w_b * mean_{C,L} (eps_hat - eps)^2 (w_b = 1 by default), accumulated in fp32 (the
    v-prediction loss too, with v and its target in place of eps)."""
    per = ((eps_hat.float() - eps.float()) ** 2).flatten(1).mean(1)
    if weight is not None:
        per = per * weight.float()
    return per.mean()


def _eps_fn(net, z: torch.Tensor, sch: CosineSchedule, ks: list[int]):
    """eps(x, i) for the i-th of the timesteps ``ks``, the conditioning of all of them computed in
    batched chunks (``prepare``) when the network supports it."""
    B = z.shape[0]
    t = sch.t_net(torch.tensor(ks, dtype=torch.long)).to(device=z.device, dtype=torch.float32)
    if not hasattr(net, "prepare"):
        return lambda x, i: net(x, t[i].expand(B), z)
    chunk = max(1, PREPARE_ROWS // max(1, B))
    cache: dict[int, list] = {}

    def eps(x, i):
        c0 = (i // chunk) * chunk
        if c0 not in cache:
            cache.clear()
            cache[c0] = net.prepare(t[c0:c0 + chunk], z)
        return net.forward_modulated(x, cache[c0][i - c0])
    return eps


def v_target(x: torch.Tensor, eps: torch.Tensor, sch: "CosineSchedule", k: torch.Tensor) -> torch.Tensor:
    """v = sqrt(abar_k) eps - sqrt(1 - abar_k) x (Salimans & Ho 2022), the target of prediction="v"."""
    a, b = sch.coeffs(k, x)
    return a * eps - b * x


def _x0_eps(out, x, a: float, prediction: str, clip_x0: float | None):
    """(x0_hat, eps_hat) at a step with abar = a from the network output ``out``.

    eps: x0_hat = (x - sqrt(1 - a) eps_hat) / sqrt(a), whose error is the eps error times
    sqrt((1 - a) / a) (~2e4 at k = T); v: x0_hat = sqrt(a) x - sqrt(1 - a) v_hat and
    eps_hat = sqrt(1 - a) x + sqrt(a) v_hat, errors never amplified. With ``clip_x0``, x0_hat is
    clipped to [-clip_x0, clip_x0] and eps_hat recomputed from it, so the two stay consistent."""
    sa, sb = math.sqrt(a), math.sqrt(1.0 - a)
    if prediction == "v":
        x0, e = sa * x - sb * out, sb * x + sa * out
    else:
        x0, e = (x - sb * out) / sa, out
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
        e = (x - sa * x0) / sb
    return x0, e


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


@torch.no_grad()
def ddpm_sample(net, z: torch.Tensor, x_T: torch.Tensor, sch: CosineSchedule, steps: int | None = None,
                generator=None, clip_x0: float | None = None, spacing: str = "leading",
                prediction: str = "eps") -> torch.Tensor:
    """Ancestral sampling over ``steps`` timesteps (T by default: the full DDPM chain), through the
    posterior q(x_k' | x_k, x0_hat): on a step k > k' with respaced beta = 1 - abar_k / abar_k'
    (Nichol & Dhariwal),
    x' = sqrt(abar_k') beta / (1 - abar_k) x0_hat + sqrt(1 - beta) (1 - abar_k') / (1 - abar_k) x + sigma noise,
    sigma^2 = beta (1 - abar_k') / (1 - abar_k), no noise on the last step. Unclipped this is the
    eps form x' = (x - beta / sqrt(1 - abar_k) eps_hat) / sqrt(1 - beta) + sigma noise; ``clip_x0``
    clips x0_hat first (the ``clip_denoised`` of the reference code; near k = T, 1 / sqrt(abar_k)
    ~ 2e4 amplifies any eps error). ``prediction``: what ``net`` outputs, "eps" or "v" (x0_hat and
    eps_hat from either as :func:`_x0_eps` says)."""
    _check_prediction(prediction)
    ks = sch.timesteps(sch.T if steps is None else steps, spacing)
    eps = _eps_fn(net, z, sch, ks[:-1])
    ab = sch.alpha_bar
    x = x_T.clone()
    for i, (k, kp) in enumerate(zip(ks[:-1], ks[1:])):
        with nvtx_range("ddpm.step"):
            a, ap = float(ab[k]), float(ab[kp])
            beta = 1.0 - a / ap
            x0, _ = _x0_eps(eps(x, i), x, a, prediction, clip_x0)
            x = (math.sqrt(ap) * beta / (1.0 - a)) * x0 + (math.sqrt(1.0 - beta) * (1.0 - ap) / (1.0 - a)) * x
            if kp > 0:
                var = beta * (1.0 - ap) / (1.0 - a)
                noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
                x = x + math.sqrt(var) * noise
    return x


@torch.no_grad()
def ddim_sample(net, z: torch.Tensor, x_T: torch.Tensor, sch: CosineSchedule, steps: int = 50,
                eta: float = 0.0, generator=None, clip_x0: float | None = None,
                spacing: str = "leading", prediction: str = "eps") -> torch.Tensor:
    """DDIM (Song et al. 2021) over ``steps`` timesteps: x0_hat = (x - sqrt(1 - abar_k) eps_hat) / sqrt(abar_k),
    x' = sqrt(abar_k') x0_hat + sqrt(1 - abar_k' - sigma^2) eps_hat + sigma noise,
    sigma = eta sqrt((1 - abar_k') / (1 - abar_k)) sqrt(1 - abar_k / abar_k'); eta = 0 is deterministic.
    ``clip_x0`` clips x0_hat and recomputes eps_hat = (x - sqrt(abar_k) x0_hat) / sqrt(1 - abar_k) from it;
    ``prediction``: what ``net`` outputs, "eps" or "v" (see :func:`_x0_eps`)."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    _check_prediction(prediction)
    ks = sch.timesteps(steps, spacing)
    eps = _eps_fn(net, z, sch, ks[:-1])
    ab = sch.alpha_bar
    x = x_T.clone()
    for i, (k, kp) in enumerate(zip(ks[:-1], ks[1:])):
        with nvtx_range("ddim.step"):
            a, ap = float(ab[k]), float(ab[kp])
            x0, e = _x0_eps(eps(x, i), x, a, prediction, clip_x0)
            sigma = eta * math.sqrt((1.0 - ap) / (1.0 - a)) * math.sqrt(max(0.0, 1.0 - a / ap))
            x = math.sqrt(ap) * x0 + math.sqrt(max(0.0, 1.0 - ap - sigma ** 2)) * e
            if sigma > 0 and kp > 0:
                x = x + sigma * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    return x
