"""The C++ CPU kernels' per-capability variants (csrc/common/cpu_variants.h): every variant this
build and CPU offer gives the reference's results, the variants agree with each other, the choice
is switchable at run time and by FLOWFM_CPU_CAPABILITY, and the portable binary uses no AVX
instruction outside the AVX2 / AVX-512 variants."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from flowfm_fast import _backend, ops
from flowfm_fast.ops import _ext, _registry, use_backend

from test_cpp_backend import _run_all

pytestmark = pytest.mark.skipif(not _ext.has_kernel("norm_modulate", "cpp"),
                                reason="flowfm_fast._C (cpp backend) is not built")

CAPABILITIES = _backend.cpu_capabilities()


@pytest.fixture
def capability(request):
    before = _backend.cpu_capability()
    _backend.set_cpu_capability(request.param)
    try:
        yield request.param
    finally:
        _backend.set_cpu_capability(before)


def test_capabilities_are_ordered_and_include_the_baseline():
    assert CAPABILITIES[0] == "default"
    assert list(CAPABILITIES) == [c for c in _backend.CPU_CAPABILITY_NAMES if c in CAPABILITIES]
    assert _backend.cpu_capability() in CAPABILITIES
    info = _backend.extension.build_info()
    assert f"capability={_backend.cpu_capability()}" in info and ",".join(CAPABILITIES) in info


def test_the_best_variant_runs_by_default():
    if os.environ.get("FLOWFM_CPU_CAPABILITY"):
        pytest.skip("FLOWFM_CPU_CAPABILITY forces the variant in this run")
    code = "from flowfm_fast import _backend as b; print(b.cpu_capability(), b.cpu_capabilities()[-1])"
    env = {k: v for k, v in os.environ.items() if k != "FLOWFM_CPU_CAPABILITY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    current, best = out.stdout.split()
    assert current == best


@pytest.mark.parametrize("capability", CAPABILITIES, indirect=True)
def test_every_op_matches_the_reference(capability):
    """Forward and every gradient of every op, fp32, sizes with SIMD tails (131, 300, 3001). The
    tolerance covers d/dt through timestep_embedding(1000 t), whose fp32 sin / cos of arguments
    in the hundreds differ from the reference by ~1e-3 relative in every variant."""
    assert _backend.extension.cpu_capability() == capability
    with use_backend("cpp"):
        ours = _run_all(torch.float32)
    with use_backend("torch"):
        ref = _run_all(torch.float32)
    assert len(ours) == len(ref)
    for i, (a, b) in enumerate(zip(ours, ref)):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-4, msg=lambda m, i=i: f"result {i} ({capability}): {m}")


@pytest.mark.skipif(len(CAPABILITIES) < 2, reason="one CPU variant on this machine")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_variants_agree(dtype):
    before = _backend.cpu_capability()
    results = {}
    try:
        with use_backend("cpp"):
            for cap in CAPABILITIES:
                _backend.set_cpu_capability(cap)
                results[cap] = _run_all(dtype)
    finally:
        _backend.set_cpu_capability(before)
    base = results["default"]
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for cap, res in results.items():
        for i, (a, b) in enumerate(zip(res, base)):
            torch.testing.assert_close(a.float(), b.float(), **tol, msg=lambda m, i=i, c=cap: f"{c} result {i}: {m}")


# Values that reach every branch of the vector exp: below and above its clamp, around 0, the
# overflow side of SiLU's exp(-u); 34 of them, so a vector tail (8 and 16 lanes) is exercised.
# (Non-finite inputs cannot be isolated here: the GEMM in front of the activation mixes a row.)
EDGE = [-1e4, -100.0, -88.0, -87.0, -30.0, -9.0, -1.0, -1e-3, 0.0, 1e-3, 0.5, 1.0, 3.0, 9.0, 30.0, 87.0, 88.0,
        100.0, 1e4]


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("capability", CAPABILITIES, indirect=True)
def test_activation_at_the_edges(capability, act):
    torch.manual_seed(3)
    x = torch.cat([torch.tensor(EDGE), 4 * torch.randn(15)]).reshape(1, -1).repeat(3, 1).requires_grad_(True)
    eye = torch.eye(x.shape[1])
    with use_backend("cpp"):
        y = ops.linear_act(x, eye, None, act)
        (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    ref_fn = F.silu if act == "silu" else (lambda u: F.gelu(u, approximate="tanh"))
    xr = x.detach().double().requires_grad_(True)
    yr = ref_fn(xr)
    (gr,) = torch.autograd.grad(yr, xr, torch.ones_like(yr))
    torch.testing.assert_close(y.detach(), yr.detach().float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, gr.float(), rtol=1e-4, atol=1e-5)


def test_registry_choice_follows_the_capability():
    """The capability is part of the selection cache key: a rank declared for one capability
    (``cpu:<capability>``) applies when that variant runs, and switching back restores the choice."""
    if len(CAPABILITIES) < 2:
        pytest.skip("one CPU variant on this machine")
    before = _backend.cpu_capability()
    x = torch.zeros(2)
    try:
        for cap in CAPABILITIES:
            _backend.set_cpu_capability(cap)
            impl = _registry.select("gated_residual", x.device)
            want = "cpp" if _registry.impl_for("gated_residual", "cpp").rank("cpu", cap) > 0 else "torch"
            assert impl.backend == want, cap
    finally:
        _backend.set_cpu_capability(before)


def test_bad_capability_is_a_clear_error():
    with pytest.raises(ValueError, match="capability must be one of default, avx2, avx512, got 'sse9'"):
        _backend.set_cpu_capability("sse9")
    with pytest.raises(ValueError, match="CPU capability must be one of"):  # the C++ check itself
        _backend.extension.set_cpu_capability("sse9")
    missing = [c for c in _backend.CPU_CAPABILITY_NAMES if c not in CAPABILITIES]
    if missing:
        with pytest.raises(ValueError, match=f"'{missing[0]}' is not available"):
            _backend.set_cpu_capability(missing[0])
    assert _backend.cpu_capability() in CAPABILITIES  # unchanged


def _import_with(value):
    env = dict(os.environ, FLOWFM_CPU_CAPABILITY=value)
    code = "from flowfm_fast import _backend as b; print(b.cpu_capability(), b.extension.cpu_capability())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_environment_forces_a_variant():
    out = _import_with("default")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["default", "default"]
    bad = _import_with("avx9000")
    assert bad.returncode != 0 and "FLOWFM_CPU_CAPABILITY must be one of" in bad.stderr
    missing = [c for c in _backend.CPU_CAPABILITY_NAMES if c not in CAPABILITIES]
    if missing:
        out = _import_with(missing[0])
        assert out.returncode != 0 and f"FLOWFM_CPU_CAPABILITY='{missing[0]}' is not available" in out.stderr


VARIANT = re.compile(r"flowfm::cpu::(avx2|avx512)::")
WIDE = re.compile(r"%[yz]mm\d|\{%k[1-7]\}|^\s*[0-9a-f]+:\s+v[a-z0-9]+\s")


def test_no_avx_outside_the_variants():
    """A portable build runs on any x86-64 CPU: only functions of the avx2 / avx512 variants may
    touch ymm / zmm registers; in particular no torch inline function or template instantiation
    (a shared symbol the linker could pick for baseline code) was compiled for AVX."""
    if _backend.extension.cpu_capability_build() != "per-capability":
        pytest.skip(f"build is {_backend.extension.cpu_capability_build()}, not per-capability")
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump not found")
    so = _backend.extension.__file__
    text = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", so], capture_output=True, text=True,
                          check=True).stdout
    offenders, name, in_variant = set(), None, False
    for line in text.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            name = m.group(1)
            in_variant = bool(VARIANT.search(name))
            continue
        if name and not in_variant and WIDE.search(line):
            offenders.add(name)
    # The variants' OpenMP regions are outlined by GCC as <function>._omp_fn.N (named after the
    # variant's function, so they match VARIANT too).
    assert not offenders, f"AVX code outside the variants: {sorted(offenders)[:10]}"
