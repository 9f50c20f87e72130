"""flowfm_fast.nn: the drop-in norms match torch.nn's (keys, values, gradients) on every backend of
norm_modulate, convert() swaps them in place keeping the weights, and the embedder loads DiT's."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import flowfm_fast.nn as fnn
from flowfm_fast.ops import backends_for, use_backend


@pytest.fixture(params=[pytest.param(b, id=f"backend={b}") for b in backends_for("norm_modulate")])
def backend(request):
    with use_backend(request.param):
        yield request.param


# (constructor args, input shape) of each norm, torch.nn's class and ours.
CASES = [
    (nn.LayerNorm, fnn.LayerNorm, ((16,), {}), (2, 5, 16)),
    (nn.LayerNorm, fnn.LayerNorm, ((7,), {"eps": 1e-6}), (7,)),
    (nn.LayerNorm, fnn.LayerNorm, ((127,), {"bias": False}), (3, 127)),
    (nn.LayerNorm, fnn.LayerNorm, ((16,), {"elementwise_affine": False}), (2, 3, 4, 16)),
    (nn.LayerNorm, fnn.LayerNorm, (((4, 16),), {}), (2, 4, 16)),          # several dims: torch's forward
    (nn.RMSNorm, fnn.RMSNorm, ((16,), {}), (2, 5, 16)),                    # eps None
    (nn.RMSNorm, fnn.RMSNorm, ((300,), {"eps": 1e-6}), (3, 300)),
    (nn.RMSNorm, fnn.RMSNorm, ((16,), {"elementwise_affine": False}), (1, 16)),
    (nn.GroupNorm, fnn.GroupNorm, ((4, 12), {}), (2, 12, 7)),
    (nn.GroupNorm, fnn.GroupNorm, ((3, 12), {"eps": 1e-6}), (2, 12)),      # (N, C): L = 1
    (nn.GroupNorm, fnn.GroupNorm, ((1, 6), {"affine": False}), (3, 6, 4, 5)),
    (nn.GroupNorm, fnn.GroupNorm, ((6, 6), {}), (1, 6, 31)),
]
IDS = [f"{c[0].__name__}{c[2][0]}{c[2][1]}-{c[3]}" for c in CASES]


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p + 0.3 * torch.randn(p.shape, generator=g, device="cpu").to(p.device))
    return module


def _pair(plain_cls, ours_cls, args, seed=0):
    plain = _randomise(plain_cls(*args[0], **args[1]), seed)
    ours = ours_cls(*args[0], **args[1])
    ours.load_state_dict(plain.state_dict(), strict=True)
    return plain, ours


@pytest.mark.parametrize("plain_cls,ours_cls,args,shape", CASES, ids=IDS)
def test_same_state_dict_keys_and_repr(plain_cls, ours_cls, args, shape):
    plain, ours = plain_cls(*args[0], **args[1]), ours_cls(*args[0], **args[1])
    assert isinstance(ours, plain_cls)
    assert list(ours.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert ours.extra_repr() == plain.extra_repr()


@pytest.mark.parametrize("plain_cls,ours_cls,args,shape", CASES, ids=IDS)
def test_matches_torch_nn_values_and_grads(backend, plain_cls, ours_cls, args, shape):
    plain, ours = _pair(plain_cls, ours_cls, args)
    torch.manual_seed(1)
    x = (torch.randn(shape) * 2 + 0.5).requires_grad_(True)
    g = torch.randn(shape)
    y_plain, y = plain(x), ours(x)
    assert y.shape == y_plain.shape and y.dtype == y_plain.dtype
    torch.testing.assert_close(y, y_plain, rtol=1e-5, atol=1e-5)
    grads_plain = torch.autograd.grad(y_plain, [x, *plain.parameters()], g)
    grads = torch.autograd.grad(y, [x, *ours.parameters()], g)
    for a, b in zip(grads, grads_plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("plain_cls,ours_cls,args,shape", [CASES[0], CASES[5], CASES[8]], ids=[IDS[0], IDS[5], IDS[8]])
def test_low_precision_modules(backend, plain_cls, ours_cls, args, shape, dtype):
    plain, ours = _pair(plain_cls, ours_cls, args)
    plain, ours = plain.to(dtype), ours.to(dtype)
    x = torch.randn(shape).to(dtype)
    y, y_plain = ours(x), plain(x)
    assert y.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(y.float(), y_plain.float(), rtol=tol, atol=tol)


def test_empty_input_takes_torch_forward():
    x = torch.randn(0, 16)
    assert fnn.LayerNorm(16)(x).shape == (0, 16)
    assert fnn.RMSNorm(16)(x).shape == (0, 16)


# ----------------------------------------------------------------------------- convert


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 12, 3, padding=1)
        self.gn = nn.GroupNorm(4, 12)
        self.proj = nn.Linear(12, 16)
        self.inner = nn.ModuleDict({"ln": nn.LayerNorm(16), "rms": nn.RMSNorm(16, eps=1e-6)})

    def forward(self, x):
        h = torch.relu(self.gn(self.conv(x))).transpose(1, 2)
        h = self.inner["ln"](self.proj(h))
        return self.inner["rms"](h * 2.0)


class KeepMe(nn.LayerNorm):
    """A user subclass: convert() must leave it alone."""

    def forward(self, x):
        return super().forward(x) * 2.0


def _model():
    torch.manual_seed(2)
    return _randomise(nn.Sequential(Block(), nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16)), KeepMe(16)), 3)


def test_convert_swaps_in_place_keeping_weights(backend):
    model = _model()
    plain = copy.deepcopy(model)
    params_before = dict(model.named_parameters())
    x = torch.randn(2, 3, 11)
    y_plain = plain(x)
    assert fnn.convert(model) is model
    # Same Parameter objects (an optimizer built before still holds them), same keys and values.
    assert all(p is params_before[n] for n, p in model.named_parameters())
    sd, sd_plain = model.state_dict(), plain.state_dict()
    assert list(sd) == list(sd_plain)
    assert all(torch.equal(sd[k], sd_plain[k]) for k in sd)
    kinds = {n: type(m) for n, m in model.named_modules()}
    assert kinds["0.gn"] is fnn.GroupNorm
    assert kinds["0.inner.ln"] is fnn.LayerNorm
    assert kinds["0.inner.rms"] is fnn.RMSNorm
    assert kinds["1.1"] is fnn.LayerNorm
    assert kinds["2"] is KeepMe
    y = model(x)
    torch.testing.assert_close(y, y_plain, rtol=1e-5, atol=1e-5)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, list(model.parameters()), gy)
    grads_plain = torch.autograd.grad(plain(x), list(plain.parameters()), gy)
    for a, b in zip(grads, grads_plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_convert_is_idempotent_and_takes_a_bare_norm():
    ln = nn.LayerNorm(8)
    assert type(fnn.convert(ln)) is fnn.LayerNorm
    assert type(fnn.convert(ln)) is fnn.LayerNorm


def test_convert_rejects_non_modules():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fnn.convert({"ln": nn.LayerNorm(4)})


# ----------------------------------------------------------------------------- DiT embedder


class DiTTimestepEmbedder(nn.Module):
    """DiT's (facebookresearch/DiT models.py) embedder, written out as the compatibility oracle."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


def test_timestep_embedder_loads_dit_weights_and_matches():
    torch.manual_seed(4)
    dit = DiTTimestepEmbedder(32)
    ours = fnn.TimestepEmbedder(32)
    assert list(ours.state_dict()) == list(dit.state_dict())
    ours.load_state_dict(dit.state_dict(), strict=True)
    t = torch.rand(7)
    # Flow time t in [0, 1] is DiT's 1000 * t.
    torch.testing.assert_close(ours(t), dit(t * 1000), rtol=1e-4, atol=1e-4)


def test_adaln_modulation_loads_dit_weights_and_matches():
    """DiT's adaLN_modulation is nn.Sequential(SiLU, Linear): its state_dict loads into ours."""
    torch.manual_seed(5)
    dit = nn.Sequential(nn.SiLU(), nn.Linear(16, 6 * 8))
    ours = fnn.AdaLNModulation(16, 8, 6)
    ours.load_state_dict(dit.state_dict(), strict=True)
    c = torch.randn(3, 16)
    for a, b in zip(ours(c), dit(c).chunk(6, dim=1)):
        torch.testing.assert_close(a, b)
    # and inside a parent module, under a prefix
    parent_dit, parent = nn.ModuleDict({"adaLN_modulation": dit}), nn.ModuleDict({"adaLN_modulation": ours})
    parent.load_state_dict(parent_dit.state_dict(), strict=True)
    # its own keys still round-trip
    fnn.AdaLNModulation(16, 8, 6).load_state_dict(ours.state_dict(), strict=True)
