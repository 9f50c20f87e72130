"""Encoder, velocity networks and the FlowFM model."""
from .configs import CONFIG_NAMES, DiTConfig, EncoderConfig, FlowFMConfig, ResNetGenConfig, get_config
from .dit1d import DiT1D
from .encoder import ResNet1DEncoder
from .flowfm import FlowFM, build_velocity
from .resnet1d_gen import ResNet1DGenerator
from .velocity import ConditionedVelocity

__all__ = ["CONFIG_NAMES", "ConditionedVelocity", "DiT1D", "DiTConfig", "EncoderConfig", "FlowFM",
           "FlowFMConfig", "ResNet1DEncoder", "ResNet1DGenerator", "ResNetGenConfig", "build_velocity",
           "get_config"]
