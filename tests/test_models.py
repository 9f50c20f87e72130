"""Encoder, velocity networks and FlowFM: shapes, joint gradients, the precomputed-conditioning
path, sampling determinism, input validation and config handling."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from flowfm_fast import ops
from flowfm_fast.models import (DiT1D, FlowFM, FlowFMConfig, ResNet1DEncoder, ResNet1DGenerator, build_velocity,
                                get_config)

L = 60
VELOCITIES = ["dit", "resnet"]


def tiny(velocity="dit", **kw) -> FlowFMConfig:
    return get_config("tiny", length=L, velocity=velocity, **kw)


def perturb_(module: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Add small noise to every parameter so zero-initialised (adaLN-Zero) layers become non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def make_model(velocity="dit", seed=0, perturb=True) -> FlowFM:
    torch.manual_seed(seed)
    model = FlowFM(tiny(velocity))
    return perturb_(model, seed=seed + 1) if perturb else model


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- shapes --------------------------------------------------------------------------------

@pytest.mark.parametrize("velocity", VELOCITIES)
def test_output_shapes(velocity):
    model = make_model(velocity)
    cfg = model.cfg
    assert isinstance(model.velocity, DiT1D if velocity == "dit" else ResNet1DGenerator)
    assert isinstance(model.encoder, ResNet1DEncoder)
    B = 5
    x = randn(B, cfg.channels, cfg.length)
    z = model.encode(x)
    assert z.shape == (B, cfg.encoder.z_dim) and z.dtype == torch.float32
    t = torch.rand(B, generator=torch.Generator().manual_seed(1))
    v = model.velocity(x, t, z)
    assert v.shape == x.shape and v.dtype == x.dtype
    assert torch.isfinite(v).all()


@pytest.mark.parametrize("velocity", VELOCITIES)
def test_other_channel_counts_and_lengths(velocity):
    cfg = get_config("tiny", channels=6, length=40, velocity=velocity)
    torch.manual_seed(0)
    model = perturb_(FlowFM(cfg))
    x = randn(3, 6, 40)
    z = model.encode(x)
    assert z.shape == (3, cfg.encoder.z_dim)
    assert model.velocity(x, torch.full((3,), 0.3), z).shape == (3, 6, 40)


@pytest.mark.parametrize("segments", [1, 3, 4])
def test_encoder_segment_pooling(segments):
    """z = head(means of the final feature map over equal time segments, channel-major); one segment
    is global average pooling, i.e. head(features(x))."""
    cfg = dataclasses.replace(tiny().encoder, pool_segments=segments)
    torch.manual_seed(0)
    enc = perturb_(ResNet1DEncoder(3, cfg)).eval()
    x = randn(4, 3, L)
    h = enc.out_norm(enc.blocks(enc.stem(x)))        # (B, C, L'); L' = 30 divides into 1, 3 segments
    if h.shape[-1] % segments == 0:
        means = torch.stack([c.mean(-1) for c in h.chunk(segments, dim=-1)], dim=-1)   # (B, C, S)
        torch.testing.assert_close(enc(x), enc.head(means.flatten(1)))
    else:                                            # 30 into 4: adaptive pooling's overlapping bins
        assert enc(x).shape == (4, cfg.z_dim)
    if segments == 1:
        torch.testing.assert_close(enc(x), enc.head(enc.features(x)))
    else:
        assert enc.head.in_features == segments * h.shape[1]


def test_encoder_pool_segments_validated_and_defaulted():
    with pytest.raises(ValueError, match="pool_segments"):
        tiny(encoder=dataclasses.replace(tiny().encoder, pool_segments=0)).validate()
    d = tiny().to_dict()
    del d["encoder"]["pool_segments"]   # a checkpoint written before the option existed
    assert FlowFMConfig.from_dict(d).encoder.pool_segments == 1


def test_velocity_is_zero_at_init_and_depends_on_z_after_perturbation():
    """adaLN-Zero / zero output layers: v == 0 at init. Once weights move, v depends on x, t and z."""
    for velocity in VELOCITIES:
        torch.manual_seed(0)
        model = FlowFM(tiny(velocity))
        x, z = randn(2, 3, L, seed=1), randn(2, 16, seed=2)
        t = torch.tensor([0.2, 0.7])
        assert torch.count_nonzero(model.velocity(x, t, z)) == 0
        perturb_(model)
        v = model.velocity(x, t, z)
        assert not torch.allclose(v, model.velocity(x, t, z + 1.0))
        assert not torch.allclose(v, model.velocity(x, t.flip(0), z))
        assert not torch.allclose(v, model.velocity(x + 1.0, t, z))


# ---- joint loss, gradients reach encoder and velocity --------------------------------------

@pytest.mark.parametrize("velocity", VELOCITIES)
def test_loss_finite_and_grads_reach_both_nets(velocity):
    model = make_model(velocity)
    x1 = randn(8, 3, L)
    loss = model.loss(x1, generator=torch.Generator().manual_seed(0))
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert loss.item() > 0
    loss.backward()

    def grad_norms(mod):
        return {n: (p.grad.abs().sum().item() if p.grad is not None else 0.0) for n, p in mod.named_parameters()}

    enc, vel = grad_norms(model.encoder), grad_norms(model.velocity)
    assert sum(enc.values()) > 0 and sum(vel.values()) > 0
    # every parameter of both networks takes part (after perturbation nothing is structurally zero)
    assert [n for n, g in enc.items() if g == 0] == []
    assert [n for n, g in vel.items() if g == 0] == []
    for p in model.parameters():
        assert torch.isfinite(p.grad).all()
    # conditioning paths in particular: z projection and the encoder head
    assert vel["z_proj.weight"] > 0 and enc["head.weight"] > 0


def test_encoder_grads_are_zero_at_init_without_perturbation():
    """Sanity check that the perturbation above is what makes the gradient test meaningful."""
    torch.manual_seed(0)
    model = FlowFM(tiny("dit"))
    model.loss(randn(4, 3, L), generator=torch.Generator().manual_seed(0)).backward()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.encoder.parameters())


@pytest.mark.parametrize("velocity", VELOCITIES)
def test_loss_decreases_with_optimizer_steps_on_fixed_batch(velocity):
    torch.manual_seed(0)
    model = FlowFM(tiny(velocity))
    x1 = randn(8, 3, L)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def fixed_loss():
        return model.loss(x1, generator=torch.Generator().manual_seed(123))

    with torch.no_grad():
        first = fixed_loss().item()
    for _ in range(15):
        opt.zero_grad()
        fixed_loss().backward()
        opt.step()
    enc_grad = sum(p.grad.abs().sum().item() for p in model.encoder.parameters())
    assert enc_grad > 0  # after a few steps the encoder is coupled in
    with torch.no_grad():
        assert fixed_loss().item() < first


@pytest.mark.parametrize("t_sampling", ["uniform", "logit_normal"])
def test_loss_matches_independent_formula(t_sampling):
    """loss = mean_b mean_{C,L} (v(x_t, t, E(x)) - (x1 - x0))^2 with x_t = (1 - t) x0 + t x1 (sigma_min = 0),
    t ~ U(0, 1) or sigmoid(N(0, 1))."""
    model = make_model("dit").eval()
    model.cfg.t_sampling = t_sampling
    x1 = randn(4, 3, L, seed=5)
    got = model.loss(x1, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(x1.shape, generator=g)
    t = torch.rand(4, generator=g) if t_sampling == "uniform" else torch.sigmoid(torch.randn(4, generator=g))
    xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * x1
    v = model.velocity(xt, t, model.encoder(x1))
    want = ((v - (x1 - x0)) ** 2).mean()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---- precomputed conditioning == plain path --------------------------------------------------

@pytest.mark.parametrize("velocity", VELOCITIES)
def test_prepare_matches_plain_forward(velocity):
    model = make_model(velocity).eval()
    net = model.velocity
    B = 3
    x = randn(B, 3, L, seed=3)
    z = randn(B, model.cfg.encoder.z_dim, seed=4)
    stage_times = torch.tensor([0.0, 0.125, 1 / 3, 0.5, 0.9, 1.0])
    with torch.no_grad():
        prepared = net.prepare(stage_times, z)
        assert len(prepared) == len(stage_times)
        outs = []
        for j, s in enumerate(stage_times):
            fast = net.forward_modulated(x, prepared[j])
            plain = net(x, torch.full((B,), float(s)), z)
            torch.testing.assert_close(fast, plain, atol=1e-6, rtol=1e-5)
            outs.append(fast)
    # the stages really differ (otherwise the check above would be vacuous)
    assert not torch.allclose(outs[0], outs[-1], atol=1e-4)


# ---- sample / reconstruct ------------------------------------------------------------------

@pytest.mark.parametrize("velocity", VELOCITIES)
def test_sample_and_reconstruct_shapes_and_determinism(velocity):
    model = make_model(velocity).eval()
    B = 3
    z = randn(B, model.cfg.encoder.z_dim, seed=9)
    a = model.sample(z, steps=4, generator=torch.Generator().manual_seed(11))
    b = model.sample(z, steps=4, generator=torch.Generator().manual_seed(11))
    c = model.sample(z, steps=4, generator=torch.Generator().manual_seed(12))
    assert a.shape == (B, 3, L)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # the noise drawn is N(0, I) with the given generator; passing it explicitly gives the same result
    x0 = torch.randn(B, 3, L, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(model.sample(z, steps=4, x0=x0), a)
    # the velocity matters: the sample is not just the noise
    assert not torch.allclose(a, x0, atol=1e-3)
    x, traj = model.sample(z, steps=4, method="midpoint", x0=x0, return_trajectory=True)
    assert traj.shape == (5, B, 3, L) and torch.equal(traj[0], x0) and torch.equal(traj[-1], x)

    x = randn(B, 3, L, seed=13)
    r1 = model.reconstruct(x, steps=3, method="heun", generator=torch.Generator().manual_seed(5))
    r2 = model.reconstruct(x, steps=3, method="heun", generator=torch.Generator().manual_seed(5))
    assert r1.shape == (B, 3, L) and torch.equal(r1, r2)
    # reconstruct is sample(encode(x)) with the same noise
    r3 = model.sample(model.encode(x), steps=3, method="heun", generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(r1, r3)


@pytest.mark.parametrize("temperature", [0.0, 0.5, 1.0, 2.0])
def test_reconstruct_temperature_scales_the_starting_noise(temperature):
    model = make_model("dit").eval()
    x = randn(3, 3, L, seed=13)
    r = model.reconstruct(x, steps=3, generator=torch.Generator().manual_seed(5), temperature=temperature)
    x0 = torch.randn(3, 3, L, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(r, model.sample(model.encode(x), steps=3, x0=temperature * x0))
    if temperature == 0.0:   # deterministic: no draw matters
        torch.testing.assert_close(r, model.reconstruct(x, steps=3, generator=torch.Generator().manual_seed(6),
                                                        temperature=0.0))


@pytest.mark.parametrize("temperature", [-0.1, float("nan"), float("inf"), "1"])
def test_reconstruct_rejects_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        make_model("dit").eval().reconstruct(randn(2, 3, L), steps=2, temperature=temperature)


def test_sample_rejects_bad_z():
    model = make_model("dit").eval()
    with pytest.raises(ValueError, match="z"):
        model.sample(torch.zeros(16), steps=2)


# ---- input validation ---------------------------------------------------------------------

BAD_SHAPES = [(2, 4, L), (2, 3, L + 10), (3, L), (1, 2, 3, L)]


@pytest.mark.parametrize("shape", BAD_SHAPES, ids=["channels", "length", "2d", "4d"])
def test_encode_and_loss_reject_bad_shapes(shape):
    model = make_model("dit")
    x = torch.zeros(shape)
    with pytest.raises(ValueError, match=r"\bx\b"):
        model.encode(x)
    with pytest.raises(ValueError, match="x1"):
        model.loss(x)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_encode_and_loss_reject_non_float(dtype):
    model = make_model("dit")
    x = torch.zeros(2, 3, L, dtype=dtype)
    with pytest.raises(TypeError, match=r"\bx\b"):
        model.encode(x)
    with pytest.raises(TypeError, match="x1"):
        model.loss(x)


def test_encode_and_loss_reject_non_tensor():
    model = make_model("dit")
    arr = [[[0.0] * L] * 3] * 2
    with pytest.raises(TypeError, match=r"\bx\b"):
        model.encode(arr)
    with pytest.raises(TypeError, match="x1"):
        model.loss(arr)


# ---- config --------------------------------------------------------------------------------

def test_get_config_errors():
    with pytest.raises(ValueError, match="config"):
        get_config("huge")
    with pytest.raises(ValueError, match="velocity"):
        get_config("tiny", velocity="nope")
    with pytest.raises(ValueError, match="patch"):
        get_config("tiny", length=65)              # tiny dit patch is 10
    with pytest.raises(ValueError, match="t_sampling"):
        get_config("tiny", t_sampling="beta")
    with pytest.raises(ValueError):
        get_config("tiny", channels=0)
    with pytest.raises(TypeError):
        get_config("tiny", bogus=1)
    # the resnet generator has no patch constraint
    assert get_config("tiny", length=65, velocity="resnet").length == 65


def test_named_configs_build():
    for name in ("tiny", "small"):
        cfg = get_config(name)
        assert cfg.velocity == "dit" and cfg.length % cfg.dit.patch == 0
    assert isinstance(build_velocity(tiny("resnet")), ResNet1DGenerator)


@pytest.mark.parametrize("velocity", VELOCITIES)
def test_config_round_trip(velocity):
    cfg = get_config("tiny", length=L, velocity=velocity, sigma_min=0.01, t_sampling="logit_normal")
    d = cfg.to_dict()
    assert FlowFMConfig.from_dict(d) == cfg
    # through JSON (tuples become lists), as stored in a checkpoint
    back = FlowFMConfig.from_dict(json.loads(json.dumps(d)))
    assert back == cfg
    assert back.to_dict() == d
    assert isinstance(back.encoder.widths, tuple)
    # from_dict does not mutate its input
    assert d == cfg.to_dict()


def test_config_from_dict_unknown_key():
    d = tiny().to_dict()
    d["bogus"] = 3
    with pytest.raises(ValueError, match="bogus"):
        FlowFMConfig.from_dict(d)


def test_config_from_dict_validates():
    d = tiny().to_dict()
    d["length"] = 65
    with pytest.raises(ValueError, match="patch"):
        FlowFMConfig.from_dict(d)


def test_config_changes_model():
    a = FlowFM(tiny())
    b = FlowFM(dataclasses.replace(tiny(), encoder=dataclasses.replace(tiny().encoder, z_dim=8)))
    assert b.encode(randn(2, 3, L)).shape == (2, 8)
    assert a.encode(randn(2, 3, L)).shape == (2, 16)


@pytest.mark.parametrize("velocity", ["dit", "resnet"])
def test_loss_under_bf16_autocast_matches_fp32(velocity):
    """Training runs under autocast (bf16 on CUDA; the CPU autocast path checks the same op
    dtype handling here): a finite fp32 loss close to the fp32 one, and fp32 gradients everywhere."""
    model = make_model(velocity)
    x1 = randn(4, 3, L, seed=3)
    ref = model.loss(x1, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model.loss(x1, generator=torch.Generator().manual_seed(1))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=5e-2, atol=5e-2)
    got.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", ["torch"] + (["cpp"] if "cpp" in ops.backends_for("linear_act") else []))
def test_dit_patch_embedding_is_the_strided_convolution(backend):
    """DiT1D.embed computes its Conv1d (kernel = stride = patch) as a GEMM: same values and
    gradients as the convolution itself, at batch 1 and 5 and a length the patch does not divide."""
    cfg = get_config("tiny").dit
    torch.manual_seed(0)
    net = DiT1D(3, 300, 16, cfg)
    for B, L in ((1, 300), (5, 307)):
        x = torch.randn(B, 3, L, requires_grad=True)
        ref = net.patchify(x).transpose(1, 2)
        g_ref = torch.autograd.grad(ref.square().sum(), [x, net.patchify.weight, net.patchify.bias])
        with ops.use_backend(backend):
            out = net.embed(x)
            grads = torch.autograd.grad(out.square().sum(), [x, net.patchify.weight, net.patchify.bias])
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        for g, gr in zip(grads, g_ref):
            torch.testing.assert_close(g, gr, rtol=1e-4, atol=1e-4)
