"""FlowFM: encoder E(x) -> z and a z-conditioned flow-matching velocity network v(x_t, t, z),
trained together with one loss; gradients reach both through z.

``cfg.objective = "ddpm"`` turns the same model into its diffusion counterpart: the same encoder
and network, whose output is read as the noise prediction eps(x_k, 1 - k/T, z) of a cosine-schedule
DDPM (:mod:`flowfm_fast.models.diffusion`); everything else (training loop, augmentation,
checkpoints, evaluation) is shared."""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops
from ..integrate import boss
from ..integrate import sample as ode_sample
from ..nvtx import nvtx_wrap
from . import coupling, diffusion
from .configs import FlowFMConfig
from .dit1d import DiT1D
from .encoder import ResNet1DEncoder
from .resnet1d_gen import ResNet1DGenerator


def build_velocity(cfg: FlowFMConfig) -> nn.Module:
    z_dim = cfg.encoder.z_dim
    if cfg.velocity == "dit":
        return DiT1D(cfg.channels, cfg.length, z_dim, cfg.dit)
    return ResNet1DGenerator(cfg.channels, z_dim, cfg.resnet)


DDPM_METHODS = ("ddim", "ddpm")


class FlowFM(nn.Module):
    """Joint representation encoder and conditional flow-matching generator.

    >>> model = FlowFM(get_config("tiny"))
    >>> loss = model.loss(x1)              # x1: (B, 3, 300) data windows
    >>> z = model.encode(x1)
    >>> x = model.sample(z, steps=8)       # noise -> windows, conditioned on z
    """

    def __init__(self, cfg: FlowFMConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.encoder = ResNet1DEncoder(cfg.channels, cfg.encoder)
        self.velocity = build_velocity(cfg)
        self.schedule = diffusion.CosineSchedule(cfg.diffusion_steps) if cfg.objective == "ddpm" else None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self._check_windows(x, "x")
        return self.encoder(x)

    def sample_t(self, batch: int, device, generator=None) -> torch.Tensor:
        if self.cfg.t_sampling == "logit_normal":
            return torch.sigmoid(torch.randn(batch, device=device, generator=generator))
        return torch.rand(batch, device=device, generator=generator)

    @nvtx_wrap("flowfm.loss")
    def loss(self, x1: torch.Tensor, x_enc: torch.Tensor | None = None, generator=None,
             weight: torch.Tensor | None = None) -> torch.Tensor:
        """Flow-matching loss of reconstructing x1 from noise given z = E(x_enc) (x_enc defaults to
        x1; training passes an augmented view so the encoder learns invariances), the noise paired
        with the windows by ``cfg.coupling`` (:mod:`~flowfm_fast.models.coupling`). With
        ``objective="ddpm"``: the eps- (or v-, ``cfg.prediction``) prediction loss at k ~ U{1..T} instead."""
        self._check_windows(x1, "x1")
        z = self.encoder(x1 if x_enc is None else x_enc)
        x0 = torch.randn(x1.shape, device=x1.device, dtype=x1.dtype, generator=generator)
        if self.schedule is not None:
            k = self.schedule.sample_k(x1.shape[0], x1.device, generator)
            x_k = self.schedule.q_sample(x1, k, x0)
            t_net = self.schedule.t_net(k).to(device=x1.device, dtype=torch.float32)
            target = diffusion.v_target(x1, x0, self.schedule, k) if self.cfg.prediction == "v" else x0
            return diffusion.eps_loss(self.velocity(x_k, t_net, z), target, weight)
        x0, w_pair = coupling.couple(self.cfg.coupling, x0, x1, z, self.cfg.coupling_eps, self.cfg.coupling_target_r)
        if w_pair is not None:
            weight = w_pair if weight is None else weight * w_pair
        t = self.sample_t(x1.shape[0], x1.device, generator)
        x_t, _ = ops.fm_interpolate(x0, x1, t, self.cfg.sigma_min)
        v = self.velocity(x_t, t, z)
        return ops.fm_loss(v, x0, x1, t, weight, self.cfg.sigma_min)

    @torch.no_grad()
    def sample(self, z: torch.Tensor, steps: int | None = None, method: str | None = None,
               x0: torch.Tensor | None = None, generator=None, grid=None, return_trajectory: bool = False,
               graph: bool | None = None, clip_x0: float | None = None, spacing: str | None = None):
        """Integrate noise x0 ~ N(0, I) to data along v(., t, z): ``steps`` uniform steps (8 by
        default) of ``method`` (euler by default) or the increasing ``grid``. ``graph``: CUDA-graph
        replay of the whole solve (None: on for CUDA; see :mod:`flowfm_fast.integrate.solvers`);
        the result is always a fresh tensor.

        ``objective="ddpm"``: ``method`` is "ddim" (default; eta = 0, ``steps`` default 50) or
        "ddpm" (ancestral, ``steps`` default T, fewer steps respace the chain); ``grid``,
        ``return_trajectory`` and ``graph`` do not apply; ``clip_x0`` bounds the predicted clean
        window (see :func:`~flowfm_fast.models.diffusion.ddpm_sample`); ``spacing`` is the timestep
        spacing, "leading" (default) or "trailing" (see :meth:`~flowfm_fast.models.diffusion.CosineSchedule.timesteps`)."""
        if z.dim() != 2:
            raise ValueError(f"z must have shape (B, z_dim), got {tuple(z.shape)}")
        if x0 is None:
            x0 = torch.randn(z.shape[0], self.cfg.channels, self.cfg.length, device=z.device,
                             dtype=z.dtype, generator=generator)
        if self.schedule is not None:
            method = method or "ddim"
            if method not in DDPM_METHODS:
                raise ValueError(f"a ddpm model samples with method in {DDPM_METHODS}, got {method!r}")
            if grid is not None or return_trajectory:
                raise ValueError("grid and return_trajectory apply to flow-matching models only")
            spacing = spacing or "leading"
            if method == "ddpm":
                return diffusion.ddpm_sample(self.velocity, z, x0, self.schedule, steps, generator, clip_x0, spacing,
                                             self.cfg.prediction)
            return diffusion.ddim_sample(self.velocity, z, x0, self.schedule, 50 if steps is None else steps,
                                         generator=generator, clip_x0=clip_x0, spacing=spacing,
                                         prediction=self.cfg.prediction)
        method = method or "euler"
        if clip_x0 is not None or spacing is not None:
            raise ValueError("clip_x0 and spacing apply to ddpm models only")
        if method in DDPM_METHODS:
            raise ValueError(f"method {method!r} needs a model trained with objective='ddpm'")
        return ode_sample(self.velocity, x0, steps, method, grid, z=z, return_trajectory=return_trajectory,
                          graph=graph)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, steps: int | None = 8, method: str | None = None, generator=None,
                    graph: bool | None = None, clip_x0: float | None = None, grid=None, spacing: str | None = None,
                    temperature: float = 1.0):
        """x -> z = E(x) -> K-step sample (``method`` None: euler, or ddim for a ddpm model).

        ``temperature`` scales the starting noise: 1 draws a sample of p(x | z) (its expected
        squared error is twice Var(x | z) plus the bias), 0 integrates from x0 = 0, a deterministic
        reconstruction near E[x | z] (the diffusion-autoencoder reading). The ancestral ddpm sampler
        still adds its per-step noise."""
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        z = self.encode(x)
        x0 = None
        if temperature != 1.0:
            x0 = temperature * torch.randn(x.shape, device=z.device, dtype=z.dtype, generator=generator)
        return self.sample(z, steps, method, x0=x0, generator=generator, graph=graph, clip_x0=clip_x0,
                           grid=grid, spacing=spacing)

    @torch.no_grad()
    def optimal_grids(self, z: torch.Tensor, steps, method: str = "euler", x0: torch.Tensor | None = None,
                      generator=None, candidates: int = 64, reference: str = "rk4") -> dict[int, dict]:
        """{K: the K-step time grid for ``method`` that best follows a fine ``reference`` solve on
        the calibration conditions ``z``} for every K in ``steps`` (BOSS;
        :func:`flowfm_fast.integrate.boss.optimal_grids`); pass a record's ``"grid"`` to ``sample``."""
        if self.schedule is not None:
            raise ValueError("optimal grids apply to flow-matching models only")
        if x0 is None:
            x0 = torch.randn(z.shape[0], self.cfg.channels, self.cfg.length, device=z.device, dtype=z.dtype,
                             generator=generator)
        return boss.optimal_grids(self.velocity, x0, steps, method, z=z, candidates=candidates, reference=reference)

    def optimal_grid(self, z: torch.Tensor, steps: int, method: str = "euler", **kw) -> dict:
        """:meth:`optimal_grids` for one budget ``steps``."""
        return self.optimal_grids(z, [steps], method, **kw)[steps]

    def _check_windows(self, x, name):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        want = (self.cfg.channels, self.cfg.length)
        if x.dim() != 3 or tuple(x.shape[1:]) != want:
            raise ValueError(f"{name} must have shape (B, {want[0]}, {want[1]}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got {x.dtype}")
