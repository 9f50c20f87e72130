"""The Triton norm family (norm_modulate, gated_residual, gated_residual_norm_modulate) beyond
value parity (which every op test checks for each backend): multi-program grids, row loops and
partial-sum tables forced by small tiles, run-to-run identical results, and
torch.compile(fullgraph=True) over a DiT-style block through the custom ops.

On a machine without a GPU these run under TRITON_INTERPRET=1 (tests/conftest.py sets it)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowfm_fast import _backend
import torch.nn.functional as F

from flowfm_fast import ops
from flowfm_fast.ops import _triton, use_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL_TILE = 32

pytestmark = pytest.mark.skipif(
    not (_triton.available() and (DEVICE == "cuda" or _backend.interpreting())),
    reason="triton is not installed, or no GPU and TRITON_INTERPRET is not 1")


# The family's tile sizes, each set where it is read: (module, name). Interpreted, backward,
# token forward (kernels/_blocks.py: also gated_residual's), group forward (kernels/norm_group.py).
TILES = (("_blocks", "INTERPRETER_TILE"), ("_blocks", "GPU_BWD_TILE"), ("_blocks", "GPU_ROW_TILE"),
         ("norm_group", "GPU_GROUP_TILE"))


def _set_tiles(mp, tile):
    from flowfm_fast.kernels import _blocks, norm_group
    modules = {"_blocks": _blocks, "norm_group": norm_group}
    for module, name in TILES:
        mp.setattr(modules[module], name, tile)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 32 elements: one row per tile for D = 37, several chunks per sample and several
    rows per chunk in the backward, group loops over channel and position blocks."""
    _set_tiles(monkeypatch, SMALL_TILE)


def _leaf(*shape, dtype=torch.float32, scale=1.0):
    return (scale * torch.randn(*shape, device=DEVICE)).to(dtype).requires_grad_(True)


def _run_all(dtype=torch.float32):
    """Every op of the family, forward and backward, on shapes that cross tile boundaries."""
    torch.manual_seed(0)
    B, T, D, N, C, L = 3, 5, 37, 9, 12, 45
    x, h = _leaf(B, T, D, dtype=dtype), _leaf(B, T, D, dtype=dtype)
    sh, sc, g = _leaf(B, D, scale=0.3), _leaf(B, D, scale=0.3), _leaf(B, D, scale=0.3)
    w, b = _leaf(D), _leaf(D)
    rows, rsh, rsc = _leaf(N, D, dtype=dtype), _leaf(N, D, scale=0.3), _leaf(N, D, scale=0.3)
    feat, gsh, gsc, gw, gb = _leaf(B, C, L, dtype=dtype), _leaf(B, C, scale=0.3), _leaf(B, C, scale=0.3), \
        _leaf(C), _leaf(C)
    outs = [
        ops.norm_modulate(x, sh, sc, "layer", w, b, act="silu"),
        ops.norm_modulate(rows, rsh, rsc, "rms", w, None, act="gelu_tanh"),
        ops.norm_modulate(feat, gsh, gsc, "group", gw, gb, act="silu", num_groups=4),
        ops.gated_residual(x, h, g),
        ops.gated_residual(rows, rows * 0.5, rsh),
        *ops.gated_residual_norm_modulate(x, h, g, sh, sc, "layer", w, b, act="gelu_tanh"),
        *ops.gated_residual_norm_modulate(rows, rows * 0.5, rsh, rsc, None, "rms", w, None),
    ]
    loss = sum((o.float() * torch.linspace(-1, 1, o.shape[-1], device=DEVICE)).sum() for o in outs)
    leaves = [x, h, sh, sc, g, w, b, rows, rsh, rsc, feat, gsh, gsc, gw, gb]
    return [o.detach() for o in outs] + list(torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("tile", [SMALL_TILE, 256])
def test_small_tiles_match_reference(monkeypatch, tile):
    """Many programs, row loops and partial-sum tables give the reference's values and gradients
    (tile 32: GroupNorm loops over channel and position blocks; 256: one whole group per program)."""
    _set_tiles(monkeypatch, tile)
    with use_backend("torch"):
        want = _run_all()
    with use_backend("triton"):
        got = _run_all()
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"result {i}: {m}")


def test_small_and_large_tiles_agree():
    with use_backend("triton"):
        large = _run_all()
    mp = pytest.MonkeyPatch()
    _set_tiles(mp, SMALL_TILE)
    try:
        with use_backend("triton"):
            small = _run_all()
    finally:
        mp.undo()
    for i, (a, b) in enumerate(zip(small, large)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"result {i}: {m}")


@pytest.mark.parametrize("dtype,tiles", [(torch.float32, "small"), (torch.bfloat16, "default")], ids=str)
def test_deterministic(request, dtype, tiles):
    """No atomics: two runs agree bit for bit, gradients included."""
    if tiles == "small":
        request.getfixturevalue("small_tiles")
    with use_backend("triton"):
        one, two = _run_all(dtype), _run_all(dtype)
    for i, (a, b) in enumerate(zip(one, two)):
        assert torch.equal(a, b), f"result {i} differs between runs"


@pytest.mark.parametrize("tile", [None, SMALL_TILE])
def test_partition_covers_every_row_once(monkeypatch, tile):
    from flowfm_fast.kernels import _blocks as K
    if tile is not None:
        _set_tiles(monkeypatch, tile)
    for B, T, D in [(1, 1, 7), (123, 1, 127), (3, 7, 300), (2, 4096, 1536), (64, 1, 8), (3, 5, 37)]:
        P = K.row_partition(B, T, D)
        assert P.block_d >= D
        assert P.chunk % P.block_t == 0 and (P.nchunk - 1) * P.chunk < T <= P.nchunk * P.chunk
        assert P.bchunk % P.block_b == 0 and (P.nbp - 1) * P.bchunk < B <= P.nbp * P.bchunk
        assert K.row_partition(B, T, D) == P


def test_custom_op_outputs_and_grad_dtypes():
    """Statistics in fp32 for low-precision x; each gradient in its own input's dtype."""
    x = torch.randn(2, 3, 8, device=DEVICE, dtype=torch.bfloat16)
    shift = torch.randn(2, 8, device=DEVICE, dtype=torch.float16)
    scale = torch.randn(2, 8, device=DEVICE)
    w = torch.randn(8, device=DEVICE, dtype=torch.float64)
    y, mean, rstd = torch.ops.flowfm_triton.norm_modulate(x, shift, scale, w, None, "layer", 1e-6, "silu", 1)
    assert y.dtype == torch.bfloat16 and mean.dtype == rstd.dtype == torch.float32 and mean.shape == (6,)
    grads = torch.ops.flowfm_triton.norm_modulate_backward(torch.ones_like(y), x, mean, rstd, shift, scale, w, None,
                                                           "layer", "silu", 1)
    assert [t.dtype for t in grads[:4]] == [torch.bfloat16, torch.float16, torch.float32, torch.float64]
    assert grads[4].numel() == 0


def _dit_block(x, c, feat, w_mod, b_mod, w_attn, w1, w2, ln_w, gw, gb):
    """adaLN-Zero transformer block (norm_modulate -> attention -> fused gated residual + norm ->
    MLP -> gated residual) and a GroupNorm + FiLM + SiLU conv-net step, as in our generators."""
    sh1, sc1, g1, sh2, sc2, g2 = F.linear(F.silu(c), w_mod, b_mod).chunk(6, dim=1)
    h = ops.norm_modulate(x, sh1, sc1, "layer", ln_w, None, eps=1e-6)
    q = k = v = F.linear(h, w_attn).unflatten(-1, (2, -1)).transpose(1, 2)
    h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(-2)
    x, h = ops.gated_residual_norm_modulate(x, h, g1, sh2, sc2, "rms", eps=1e-6)
    h = F.linear(F.gelu(F.linear(h, w1), approximate="tanh"), w2)
    x = ops.gated_residual(x, h, g2)
    f = ops.norm_modulate(feat, c[:, :6], c[:, 6:12], "group", gw, gb, act="silu", num_groups=3)
    return x.square().mean() + (f * torch.linspace(-1, 1, f.shape[-1], device=f.device)).mean()


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(1)
    B, T, D, C, L = 3, 5, 8, 6, 7
    args = [_leaf(B, T, D), _leaf(B, 2 * D), _leaf(B, C, L), _leaf(6 * D, 2 * D, scale=0.2),
            _leaf(6 * D, scale=0.2), _leaf(D, D, scale=0.3), _leaf(4 * D, D, scale=0.3), _leaf(D, 4 * D, scale=0.3),
            _leaf(D), _leaf(C), _leaf(C)]
    with use_backend("triton"):
        eager = _dit_block(*args)
        g_eager = torch.autograd.grad(eager, args)
        compiled = torch.compile(_dit_block, fullgraph=True, backend="aot_eager")
        out = compiled(*args)
        g_out = torch.autograd.grad(out, args)
    with use_backend("torch"):
        ref = _dit_block(*args)
        g_ref = torch.autograd.grad(ref, args)
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b, r in zip(g_out, g_eager, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


def test_kernels_compile_for_sm90():
    """The interpreter runs kernels as Python and accepts what the compiler may not: compile each
    kernel (one dtype, one activation, with and without the optional tensors) to sm_90 cubin."""
    try:
        import triton.backends
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no compiler backends")
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = Path(__file__).with_name("triton_compile_norm.py")
    proc = subprocess.run([sys.executable, str(script), "--quick"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count(" ok") >= 17


MODEL_OPS = ("timestep_embedding", "norm_modulate", "gated_residual_norm_modulate", "fm_interpolate", "fm_loss")


@pytest.mark.parametrize("velocity", ["dit", "resnet"])
def test_training_step_matches_reference_backend(velocity):
    """A whole FlowFM training step (DiT-1D: adaLN norm_modulate and the fused residual chain;
    ResNet-1D: GroupNorm + FiLM + SiLU) on the Triton backend: loss and every parameter gradient
    match the reference backend."""
    missing = [op for op in MODEL_OPS if "triton" not in ops.backends_for(op)]
    if missing:
        pytest.skip(f"no triton backend yet for {missing}")
    from flowfm_fast.models import FlowFM, get_config
    torch.manual_seed(0)
    model = FlowFM(get_config("tiny", length=60, velocity=velocity)).to(DEVICE)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():   # adaLN-Zero starts at zero: perturb so every path carries gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g).to(DEVICE))
    x1 = torch.randn(4, 3, 60, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        model.zero_grad(set_to_none=True)
        with use_backend(backend):
            loss = model.loss(x1, generator=torch.Generator(device=DEVICE).manual_seed(3))
            loss.backward()
        results[backend] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (loss_ref, grads_ref), (loss_tr, grads_tr) = results["torch"], results["triton"]
    torch.testing.assert_close(loss_tr, loss_ref, rtol=1e-5, atol=1e-6)
    assert grads_tr.keys() == grads_ref.keys()
    for name in grads_ref:
        torch.testing.assert_close(grads_tr[name], grads_ref[name], rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_gradients_match_reference(dtype):
    """bf16 / fp16 x and modulation: every gradient in its input's dtype, within a relative 1e-2
    (Frobenius) of the reference backend's (which computes in fp32 and rounds the same way)."""
    results = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(7)
        x, h = _leaf(3, 9, 40, dtype=dtype), _leaf(3, 9, 40, dtype=dtype)
        sh, sc, g = (_leaf(3, 40, dtype=dtype, scale=0.3) for _ in range(3))
        w, b = _leaf(40, dtype=dtype), _leaf(40, dtype=dtype)
        feat, gsh, gsc = _leaf(3, 6, 20, dtype=dtype), _leaf(3, 6, dtype=dtype, scale=0.3), \
            _leaf(3, 6, dtype=dtype, scale=0.3)
        with use_backend(backend):
            outs = [ops.norm_modulate(x, sh, sc, "layer", w, b, act="gelu_tanh"),
                    ops.norm_modulate(feat, gsh, gsc, "group", None, None, act="silu", num_groups=2),
                    *ops.gated_residual_norm_modulate(x, h, g, sh, sc, "rms", w, None, act="silu")]
            loss = sum((o.float() * torch.linspace(-1, 1, o.shape[-1], device=DEVICE)).sum() for o in outs)
            leaves = [x, h, sh, sc, g, w, b, feat, gsh, gsc]
            results[backend] = torch.autograd.grad(loss, leaves)
    for i, (a, r) in enumerate(zip(results["triton"], results["torch"])):
        assert a.dtype == r.dtype == dtype, i
        err = (a.double() - r.double()).norm() / r.double().norm().clamp_min(1e-6)
        assert err < 1e-2, f"gradient {i}: relative error {err:.2e}"


@pytest.mark.parametrize("small_elems", [0, 1 << 20])
def test_gpu_partition_of_small_problems(small_elems, monkeypatch):
    """On a GPU, token backwards up to GPU_SMALL_ELEMS keep one chunk per sample (no second
    reduction launch); above it they split tokens into chunks. Both partitions give the reference's
    gradients (run here under the interpreter with the GPU's tiles and program targets)."""
    from flowfm_fast.kernels import _blocks as K  # the partition's home (and its interpreting)
    monkeypatch.setattr(K, "interpreting", lambda: False)
    monkeypatch.setattr(K, "GPU_SMALL_ELEMS", small_elems)
    B, T, D = 3, 300, 37  # 5 chunks of 64 tokens at the GPU tile, unless kept whole
    P = K.row_partition(B, T, D)
    assert (P.nchunk == 1) == (small_elems > 0)
    results = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(5)
        x, h = _leaf(B, T, D), _leaf(B, T, D)
        sh, sc, g = (_leaf(B, D, scale=0.3) for _ in range(3))
        w = _leaf(D)
        with use_backend(backend):
            res, y = ops.gated_residual_norm_modulate(x, h, g, sh, sc, "layer", w, None, 1e-6, "silu")
            out = ops.norm_modulate(y, sh, sc, "rms", w, None, 1e-6) + ops.gated_residual(res, h, g)
            results[backend] = torch.autograd.grad(out.square().sum(), (x, h, sh, sc, g, w))
    # Three chained ops and a squared loss: fp32 rounding reaches ~1e-4 relative on a few elements;
    # a wrong partition (a chunk dropped or counted twice) would be off by O(1).
    for name, a, b in zip(("x", "h", "shift", "scale", "gate", "weight"), results["triton"], results["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=lambda m: f"grad {name}: {m}")
