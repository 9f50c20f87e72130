"""Triton kernels of ``norm_modulate``: ``y = act(norm(x) * (1 + scale) + shift)``.

Token kinds (``layer`` / ``rms``), x viewed as R rows of D features (tokens (B, T, D): R = B * T,
row r belongs to sample r // T; rows (N, D): T = 1)::

    xhat = (x - mean) * rstd            (rms: mean = 0)
    a    = xhat * w + bias              (the norm's own affine; ones / zeros when absent)
    u    = a * (1 + scale[b]) + shift[b]
    y    = act(u)

GroupNorm (``group``): x (B, C, L), statistics over each of G groups of C / G channels times L,
modulation (B, C) broadcast over L; same formula per element with w, bias, shift, scale per channel.

Layouts: x and dy are read through their strides (any (B, T, D) / (N, D) / (B, C, L) view, no copy);
y and dx are written contiguous; shift / scale / weight / bias are small and made contiguous. Each
tensor is loaded in its own dtype and converted in registers to the accumulation dtype (fp32, or
fp64 for fp64 x), so modulation may be of another dtype than x; mean / rstd are stored in it.

Backward, without atomics: dx needs only its own row (group). The parameter gradients are sums
over rows. Token kinds: program (p, c) of :func:`_blocks.row_partition` owns a block of samples
and a chunk of their tokens, walks them in (samples, tokens, features) tiles, and writes its sums
to its own slots: dshift / dscale as (B, nchunk, D) partials, dweight / dbias as (programs, D)
partials. GroupNorm: one program per (sample, group) or per block of whole groups writes dshift /
dscale directly and dweight / dbias as (B, C) partials. A second, fixed-order ``sum`` over the
partials axis finishes them. The partition depends only on the shape and on the device kind (GPU
or the interpreter), so gradients are deterministic run to run.

Contract: fp32 within 1e-5 relative of the float64 formula (the tests hold it to 1e-5 forward,
1e-4 for gradients after the reductions); bf16 / fp16 within the Liger-style tolerances
(2e-2 / 2e-3). fp64 inputs are computed in fp64. Bit-exact: two runs with the same shapes on the
same device kind, forward and backward (no atomics, fixed partition). Close, not bit-exact,
versus the reference, the C++ backend, or the same rows under another shape (summation orders
follow the tiles).

Where the code lives: this module is the entry the ops layer calls (``forward`` / ``backward``,
through ``flowfm_fast.ops._triton.launcher("norm_modulate", ...)``) and only dispatches on
``kind``: the token kinds' kernels and launches are in :mod:`.norm_tokens`, GroupNorm's in
:mod:`.norm_group`, and the blocks they share (with :mod:`.gated_residual` too: activations,
loads, tile / warp / partition sizing and their tuning constants, the partial-sum finish) in
:mod:`._blocks`.
"""
from __future__ import annotations

from . import norm_group, norm_tokens


def forward(x, shift, scale, weight, bias, kind: str, eps: float, act: str | None, num_groups: int):
    """(y, mean, rstd): y in x's dtype, mean / rstd in the accumulation dtype, (R,) or (B, G)."""
    if kind == "group":
        return norm_group.forward(x, shift, scale, weight, bias, eps, act, num_groups)
    return norm_tokens.forward(x, shift, scale, weight, bias, kind, eps, act)


def backward(dy, x, mean, rstd, shift, scale, weight, bias, kind: str, act: str | None, num_groups: int):
    """(dx, dshift, dscale, dweight, dbias), each in its input's dtype; an empty tensor where the
    input was None."""
    if kind == "group":
        return norm_group.backward(dy, x, mean, rstd, shift, scale, weight, bias, act, num_groups)
    return norm_tokens.backward(dy, x, mean, rstd, shift, scale, weight, bias, kind, act)
