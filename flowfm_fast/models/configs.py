"""Model configs. ``tiny`` is for tests, ``small`` the CPU demo, ``base`` the GPU default."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .coupling import COUPLINGS


@dataclass
class EncoderConfig:
    widths: tuple[int, ...] = (32, 64, 128)   # one stage per width; stages after the first halve L
    blocks_per_stage: int = 1
    kernel_size: int = 5
    z_dim: int = 128
    # z = head(features averaged over this many equal time segments): 1 is global average pooling
    # (shift-invariant, z forgets where in the window things happen); more keeps coarse timing
    pool_segments: int = 1


@dataclass
class DiTConfig:
    patch: int = 10          # Conv1d(k = stride = patch): 300 samples -> 30 tokens
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0


@dataclass
class ResNetGenConfig:
    width: int = 64
    depth: int = 4
    groups: int = 8
    kernel_size: int = 3


@dataclass
class FlowFMConfig:
    channels: int = 3
    length: int = 300
    velocity: str = "dit"             # "dit" | "resnet"
    sigma_min: float = 0.0
    t_sampling: str = "logit_normal"  # "uniform" | "logit_normal" (sigmoid of N(0, 1): mid-t weighted; better features)
    objective: str = "fm"             # "fm" (flow matching) | "ddpm" (the diffusion counterpart, see prediction)
    diffusion_steps: int = 1000       # T of the DDPM objective (cosine schedule)
    prediction: str = "eps"           # ddpm: the network predicts "eps" (Ho et al.) or "v" (Salimans & Ho)
    coupling: str = "independent"     # noise-data pairing per batch: see models.coupling.COUPLINGS
    coupling_eps: float = 0.1         # wcfm: Gibbs temperature, relative to the batch's mean pair cost
    coupling_target_r: float = 0.2    # c2ot: share of re-pairings no costlier than the independent pair
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    resnet: ResNetGenConfig = field(default_factory=ResNetGenConfig)

    def validate(self) -> "FlowFMConfig":
        if self.velocity not in ("dit", "resnet"):
            raise ValueError(f"velocity must be 'dit' or 'resnet', got {self.velocity!r}")
        if self.t_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"t_sampling must be 'uniform' or 'logit_normal', got {self.t_sampling!r}")
        if self.objective not in ("fm", "ddpm"):
            raise ValueError(f"objective must be 'fm' or 'ddpm', got {self.objective!r}")
        if self.coupling not in COUPLINGS:
            raise ValueError(f"coupling must be one of {COUPLINGS}, got {self.coupling!r}")
        if self.coupling != "independent" and self.objective != "fm":
            raise ValueError(f"coupling={self.coupling!r} pairs noise with data for flow matching; "
                             f"objective={self.objective!r} needs coupling='independent'")
        if self.prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {self.prediction!r}")
        if self.prediction != "eps" and self.objective != "ddpm":
            raise ValueError(f"prediction={self.prediction!r} is a ddpm parameterisation; objective "
                             f"{self.objective!r} predicts the velocity")
        if not self.coupling_eps > 0:
            raise ValueError(f"coupling_eps must be > 0, got {self.coupling_eps}")
        if not 0 < self.coupling_target_r < 1:
            raise ValueError(f"coupling_target_r must lie in (0, 1), got {self.coupling_target_r}")
        if self.encoder.pool_segments < 1:
            raise ValueError(f"encoder.pool_segments must be >= 1, got {self.encoder.pool_segments}")
        if self.diffusion_steps < 1:
            raise ValueError(f"diffusion_steps must be >= 1, got {self.diffusion_steps}")
        if self.channels < 1 or self.length < 1:
            raise ValueError(f"channels and length must be positive, got {self.channels}, {self.length}")
        if self.velocity == "dit" and self.length % self.dit.patch:
            raise ValueError(f"length={self.length} must be a multiple of dit.patch={self.dit.patch}")
        if self.velocity == "dit" and self.dit.dim % self.dit.heads:
            raise ValueError(f"dit.dim={self.dit.dim} must be a multiple of dit.heads={self.dit.heads}")
        if self.velocity == "resnet" and self.resnet.width % self.resnet.groups:
            raise ValueError(f"resnet.width={self.resnet.width} must be a multiple of resnet.groups")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FlowFMConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown FlowFMConfig fields: {sorted(unknown)}")
        enc = EncoderConfig(**{**d.pop("encoder", {})})
        enc.widths = tuple(enc.widths)
        return cls(encoder=enc, dit=DiTConfig(**d.pop("dit", {})),
                   resnet=ResNetGenConfig(**d.pop("resnet", {})), **d).validate()


def get_config(name: str, **overrides) -> FlowFMConfig:
    """A named config (``tiny``, ``small``, ``base``) with top-level fields overridden."""
    if name == "tiny":
        cfg = FlowFMConfig(encoder=EncoderConfig(widths=(8, 16), z_dim=16),
                           dit=DiTConfig(patch=10, dim=32, depth=2, heads=2, mlp_ratio=2.0),
                           resnet=ResNetGenConfig(width=16, depth=2, groups=4))
    elif name == "small":
        cfg = FlowFMConfig()
    elif name == "base":
        cfg = FlowFMConfig(encoder=EncoderConfig(widths=(64, 128, 256, 256), blocks_per_stage=2, z_dim=256),
                           dit=DiTConfig(patch=10, dim=384, depth=8, heads=6),
                           resnet=ResNetGenConfig(width=128, depth=8, groups=32))
    else:
        raise ValueError(f"config must be one of ('tiny', 'small', 'base'), got {name!r}")
    return dataclasses.replace(cfg, **overrides).validate()


CONFIG_NAMES = ("tiny", "small", "base")
