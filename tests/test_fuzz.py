"""Hypothesis fuzz of input validation: the .npy/.npz loader and every op.

Properties: a hostile file makes ``load_windows`` raise :class:`DataError` (a ValueError) or load
windows that keep every promise (float32, (B, C, L), finite, labels in range), never anything else;
a call with one argument made invalid raises ValueError or TypeError on every backend, and odd but
valid inputs (mixed float dtypes, strided, expanded, requiring grad) run or are refused the same way.
"""
from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowfm_fast import ops
from flowfm_fast.data import DataError, load_windows
from flowfm_fast.data.arrays import MAX_CLASSES
from flowfm_fast.ops import use_backend

# Derandomized, so CI sees the same examples each run; FLOWFM_FUZZ_EXPLORE=1 draws fresh ones, and
# FLOWFM_FUZZ_EXAMPLES raises the count, for a longer hunt by hand.
FUZZ = settings(max_examples=int(os.environ.get("FLOWFM_FUZZ_EXAMPLES", "100")), deadline=None, database=None,
                derandomize=not os.environ.get("FLOWFM_FUZZ_EXPLORE"),
                suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------------------------------
# Loader
# --------------------------------------------------------------------------------------------------

X_DTYPES = ["<f4", ">f4", "<f8", "<f2", "|i1", "<i2", "<i4", ">i8", "|u1", "<u8",        # numeric: taken
            "|b1", "<c8", "<c16", "<U3", "|S2", "<M8[s]", "<m8[s]", "|V4", "|O"]       # refused
LABEL_DTYPES = ["<i8", "<i4", "|u1", ">i2", "<f4", "|b1", "<U2", "|O"]


def _oracle_x_ok(a: np.ndarray) -> bool:
    if a.dtype.kind not in "fiu" or a.ndim != 3 or a.size == 0:
        return False
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(a.astype(np.float32)).all())


def _oracle_vec_ok(v: np.ndarray, n: int, labels: bool) -> bool:
    if v.dtype.kind not in "iu" or v.ndim != 1 or v.shape[0] != n:
        return False
    return not labels or bool(((v.astype(np.int64) >= -1) & (v.astype(np.int64) < MAX_CLASSES)).all())


@st.composite
def _arrays(draw, dtypes, max_rank=4):
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=max_rank)))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    base = rng.standard_normal(shape) * draw(st.sampled_from([1.0, 100.0, 1e38, 1e300]))
    if dtype.kind == "f" and base.size and draw(st.booleans()):
        base.flat[draw(st.integers(0, base.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    with np.errstate(over="ignore", invalid="ignore"):
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            a = np.clip(np.nan_to_num(base), info.min, info.max).astype(dtype)
        elif dtype.kind == "O":
            a = base.astype(object)
        elif dtype.kind == "V":
            a = np.zeros(shape, dtype)
        elif dtype.kind in "Mm":
            a = np.zeros(shape, dtype)
        else:
            a = base.astype(dtype)
    return np.asarray(a, dtype=dtype)   # shape (): a 0-d array, not a numpy scalar


def _save(a: np.ndarray, path: Path, **more) -> None:
    if path.suffix == ".npy":
        np.save(path, a, allow_pickle=True)     # object arrays too: the loader must refuse them
    else:
        np.savez(path, x=a, **more)


def _assert_windows_keep_promises(ws, channels=None, length=None):
    x = ws.x
    assert isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim == 3 and x.size > 0
    assert x.flags.c_contiguous and np.isfinite(x).all()
    if channels is not None:
        assert x.shape[1] == channels
    if length is not None:
        assert x.shape[2] == length
    for v, labels in ((ws.y, True), (ws.subject, False)):
        if v is not None:
            assert v.dtype == np.int64 and v.shape == (x.shape[0],)
            if labels:
                assert v.min() >= -1 and v.max() < MAX_CLASSES


def _load(path, **kw):
    """load_windows: windows that keep their promises, or DataError; anything else fails the test."""
    try:
        ws = load_windows(path, **kw)
    except DataError as exc:
        assert str(path) in str(exc)
        assert "\n" not in str(exc).strip()
        return None
    _assert_windows_keep_promises(ws, **kw)
    return ws


@FUZZ
@given(x=_arrays(X_DTYPES), container=st.sampled_from(["npy", "npz"]),
       y=st.one_of(st.none(), _arrays(LABEL_DTYPES, max_rank=2)),
       subject=st.one_of(st.none(), _arrays(LABEL_DTYPES, max_rank=2)))
def test_loader_on_random_arrays(x, container, y, subject):
    more = {k: v for k, v in (("y", y), ("subject", subject)) if v is not None}
    if container == "npy":
        more = {}
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"w.{container}"
        _save(x, p, **more)
        ws = _load(p)
    ok = _oracle_x_ok(x) and all(_oracle_vec_ok(v, x.shape[0], k == "y") for k, v in more.items())
    assert (ws is not None) == ok, (x.dtype, x.shape, {k: (v.dtype, v.shape) for k, v in more.items()})
    if ws is not None:
        np.testing.assert_array_equal(ws.x, x.astype(np.float32))


@FUZZ
@given(container=st.sampled_from(["npy", "npz"]), damage=st.sampled_from(["truncate", "flip", "append", "splice"]),
       where=st.floats(0.0, 1.0), byte=st.integers(1, 255), junk=st.binary(min_size=1, max_size=64),
       channels=st.sampled_from([None, 2, 3]), length=st.sampled_from([None, 5, 8]))
def test_loader_on_damaged_files(container, damage, where, byte, junk, channels, length):
    x = np.random.default_rng(0).standard_normal((4, 3, 8)).astype(np.float32)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"w.{container}"
        _save(x, p, y=np.array([0, 1, -1, 2]))
        raw = bytearray(p.read_bytes())
        i = min(int(where * len(raw)), len(raw) - 1)
        if damage == "truncate":
            raw = raw[:i]
        elif damage == "flip":
            raw[i] ^= byte
        elif damage == "append":
            raw += junk
        else:
            raw[i:i + len(junk)] = junk
        p.write_bytes(bytes(raw))
        _load(p, channels=channels, length=length)


_DESCRS = ["<f4", ">f8", "<i2", "|b1", "<c8", "|O", "<U4", "|V8", "<f4,<i4", "xyz", "", "<f99", "(3,)<f4"]


@FUZZ
@given(descr=st.sampled_from(_DESCRS), fortran=st.sampled_from([False, True, 0, "no", None]),
       shape=st.one_of(st.lists(st.integers(-3, 2 ** 62), max_size=4).map(tuple),
                       st.sampled_from([None, "(2, 3, 4)", [2, 3, 4], (2.0, 3, 4), (True, 3, 4)])),
       data=st.binary(max_size=256), version=st.sampled_from([(1, 0), (2, 0)]),
       container=st.sampled_from(["npy", "npz"]))
def test_loader_on_hostile_headers(descr, fortran, shape, data, version, container):
    """Headers numpy would never write: huge, negative or non-int shapes, odd descrs, wrong flags."""
    header = f"{{'descr': {descr!r}, 'fortran_order': {fortran!r}, 'shape': {shape!r}, }}"
    header = header.encode("latin1")
    pad = 64 - (len(_npy_prefix(version, 0)) + len(header) + 1) % 64
    body = header + b" " * pad + b"\n"
    raw = _npy_prefix(version, len(body)) + body + data
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"w.{container}"
        if container == "npy":
            p.write_bytes(raw)
        else:
            with zipfile.ZipFile(p, "w") as z:
                z.writestr("x.npy", raw)
        _load(p)


def _npy_prefix(version, header_len: int) -> bytes:
    size = header_len.to_bytes(2 if version == (1, 0) else 4, "little")
    return b"\x93NUMPY" + bytes(version) + size


@FUZZ
@given(prefix=st.sampled_from([b"", b"\x93NUMPY", b"\x93NUMPY\x01\x00", b"\x93NUMPY\x03\x00", b"PK\x03\x04",
                               b"PK\x05\x06", b"\x80\x04\x95"]),
       rest=st.binary(max_size=512))
def test_loader_on_random_bytes(prefix, rest):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "w.npy"
        p.write_bytes(prefix + rest)
        assert _load(p) is None


# --------------------------------------------------------------------------------------------------
# Ops
# --------------------------------------------------------------------------------------------------
# A case is a recipe (plain values hypothesis drew) that ``build`` turns into fresh keyword
# arguments, so each backend gets its own tensors (the in-place ops write to theirs), and a list of
# argument roles that says which mutations are surely invalid.

OPS = ("norm_modulate", "gated_residual", "gated_residual_norm_modulate", "fm_interpolate", "fm_loss",
       "timestep_embedding", "euler_step_", "rk_combine")
BACKENDS = ("torch", "cpp")
BAD_DTYPES = (torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64)
NOT_TENSORS = ("cpu", "cuda:0", "meta", 0.5, 3, [0.5, 0.5], (1,), np.zeros(2, np.float32))
NAN = float("nan")
BAD_SCALARS = {
    "eps": [0, 0.0, -1e-6, NAN, "1e-6", None, True, [1e-6]],
    "kind": ["batch", None, 3, "LAYER", ""],
    "act": ["relu", 3, "", "SILU"],
    "sigma_min": [-0.1, 1.0, 1.5, NAN, float("inf"), "0", None, True],
    "dim": [0, -3, 2.5, True, "8", None],
    "max_period": [0, -1.0, NAN, "1e4", None, True],
    "dt": [NAN, float("inf"), -float("inf"), "0.1", None, True, [0.1]],
}


def _rand(g, shape, dtype=torch.float32):
    return torch.randn(shape, generator=g).to(dtype)


def _token_shape(r):
    return (r["B"], r["T"], r["D"]) if r["rank"] == 3 else (r["B"], r["D"])


@st.composite
def _recipe(draw, op):
    r = {"op": op, "seed": draw(st.integers(0, 2 ** 16)), "B": draw(st.integers(1, 3)), "T": draw(st.integers(1, 4)),
         "D": draw(st.integers(1, 8)), "rank": draw(st.sampled_from([2, 3])),
         "act": draw(st.sampled_from([None, "silu", "gelu_tanh"])), "sigma_min": draw(st.sampled_from([0.0, 0.1])),
         "optional": draw(st.lists(st.booleans(), min_size=5, max_size=5))}
    if op == "norm_modulate":
        r["kind"] = draw(st.sampled_from(["layer", "rms", "group"]))
        r["groups"] = draw(st.integers(1, 3))
    elif op == "gated_residual_norm_modulate":
        r["kind"] = draw(st.sampled_from(["layer", "rms"]))
    elif op in ("fm_interpolate", "fm_loss"):
        r["rest"] = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    elif op == "timestep_embedding":
        r["t_int"] = draw(st.booleans())
    elif op == "rk_combine":
        r["stages"] = draw(st.integers(1, 4))
        r["out"] = draw(st.sampled_from([None, "new", "x"]))
    return r


def build(r):
    """(function, kwargs, roles): roles maps each argument to "tensor", "optional", "times" or a
    BAD_SCALARS key."""
    g = torch.Generator().manual_seed(r["seed"])
    op, B, D = r["op"], r["B"], r["D"]
    opt = r["optional"]
    if op in ("norm_modulate", "gated_residual", "gated_residual_norm_modulate"):
        if op == "norm_modulate" and r["kind"] == "group":
            C = r["groups"] * D
            x, feat, mod = _rand(g, (B, C, r["T"])), C, (B, C)
        else:
            x, feat, mod = _rand(g, _token_shape(r)), D, (B, D)
        kw = {"shift": _rand(g, mod) if opt[0] else None, "scale": _rand(g, mod) if opt[1] else None,
              "weight": _rand(g, (feat,)) if opt[2] else None, "bias": _rand(g, (feat,)) if opt[3] else None}
        roles = dict.fromkeys(kw, "optional")
        if op == "gated_residual":
            kw, roles = {}, {}
        if op == "norm_modulate":
            kw.update(x=x, kind=r["kind"], eps=1e-5, act=r["act"])
            roles.update(x="tensor", kind="kind", eps="eps", act="act")
            if r["kind"] == "group":
                kw["num_groups"] = r["groups"]
                roles["num_groups"] = "num_groups"
            return ops.norm_modulate, kw, roles
        kw.update(res=x, h=_rand(g, x.shape), gate=_rand(g, (B, D)))
        roles.update(res="tensor", h="tensor", gate="tensor")
        if op == "gated_residual":
            return ops.gated_residual, kw, roles
        kw.update(kind=r["kind"], eps=1e-5, act=r["act"])
        roles.update(kind="kind", eps="eps", act="act")
        return ops.gated_residual_norm_modulate, kw, roles
    if op in ("fm_interpolate", "fm_loss"):
        shape = (B, *r["rest"])
        kw = {"x0": _rand(g, shape), "x1": _rand(g, shape), "t": torch.rand(B, generator=g),
              "sigma_min": r["sigma_min"]}
        roles = {"x0": "tensor", "x1": "tensor", "t": "times", "sigma_min": "sigma_min"}
        if op == "fm_interpolate":
            return ops.fm_interpolate, kw, roles
        kw.update(v=_rand(g, shape), weight=torch.rand(B, generator=g) if opt[0] else None)
        roles.update(v="tensor", weight="optional")
        return ops.fm_loss, kw, roles
    if op == "timestep_embedding":
        t = torch.randint(0, 1000, (B,), generator=g) if r["t_int"] else torch.rand(B, generator=g)
        return ops.timestep_embedding, {"t": t, "dim": D, "max_period": 10000.0}, \
            {"t": "times_or_steps", "dim": "dim", "max_period": "max_period"}
    x = _rand(g, _token_shape(r))
    if op == "euler_step_":
        return ops.euler_step_, {"x": x, "v": _rand(g, x.shape), "dt": 0.125}, {"x": "tensor", "v": "tensor", "dt": "dt"}
    ks = [_rand(g, x.shape) for _ in range(r["stages"])]
    bs = [float(b) for b in torch.rand(r["stages"], generator=g)]
    out = {None: None, "new": torch.empty_like(x), "x": x}[r["out"]]
    return ops.rk_combine, {"x": x, "dt": 0.25, "ks": ks, "bs": bs, "out": out}, \
        {"x": "tensor", "dt": "dt", "ks": "ks", "bs": "bs", "out": "optional"}


# ---- mutations: each is (name, function kwargs -> kwargs, surely_invalid)

def _tensor_mutation(draw, t, role, n_tensors):
    """(how, replacement, surely invalid) for tensor argument t."""
    kinds = ["not_tensor", "bad_dtype", "empty", "rank", "dim"]
    if n_tensors > 1:
        kinds.append("meta")
    if role == "times":
        kinds += ["t_value", "t_value", "t_float"]
    how = draw(st.sampled_from(kinds))
    if how == "not_tensor":
        choices = list(NOT_TENSORS) + ([] if role == "optional" else [None])
        return how, draw(st.sampled_from(choices)), True
    if how == "bad_dtype":
        dtypes = (torch.bool, torch.complex64) if role == "times_or_steps" else BAD_DTYPES
        return how, torch.ones(t.shape).to(draw(st.sampled_from(dtypes))), True
    if how == "empty":
        shape = list(t.shape)
        shape[draw(st.integers(0, len(shape) - 1))] = 0
        return how, torch.empty(shape, dtype=t.dtype), True
    if how == "rank":
        if draw(st.booleans()) or t.dim() == 1:
            return how, t.unsqueeze(draw(st.integers(0, t.dim()))), False
        return how, t.flatten(), False
    if how == "dim":
        shape = list(t.shape)
        shape[draw(st.integers(0, len(shape) - 1))] += draw(st.integers(1, 3))
        return how, torch.zeros(shape, dtype=t.dtype), False
    if how == "meta":
        return how, t.to("meta"), True
    if how == "t_float":
        return how, draw(st.sampled_from([0.5, 1, [0.5]])), True
    bad = draw(st.sampled_from([NAN, float("inf"), -float("inf"), -0.5, 1.5]))
    t = t.clone()
    t[draw(st.integers(0, t.numel() - 1))] = bad
    return how, t, True


def _mutate(draw, kw, roles):
    """A copy of kw with one argument made invalid: (kwargs, description, surely invalid)."""
    kw = dict(kw)
    name = draw(st.sampled_from(sorted(roles)))
    role = roles[name]
    n_tensors = sum(isinstance(v, torch.Tensor) for v in kw.values()) + len(kw.get("ks", []))
    if role in ("tensor", "optional", "times", "times_or_steps"):
        if kw[name] is None:   # an absent optional tensor: give it one no op takes there
            kw[name] = draw(st.sampled_from([*NOT_TENSORS, torch.zeros(7, 5, 3), torch.zeros(1, dtype=torch.int64)]))
            return kw, f"{name} <- {kw[name]!r}", True
        how, kw[name], sure = _tensor_mutation(draw, kw[name], role, n_tensors)
        return kw, f"{name}: {how}", sure
    if role == "ks":
        n = len(kw["ks"])
        bad_stage = draw(st.sampled_from([None, "k", 1.0, torch.zeros(kw["x"].shape, dtype=torch.int32),
                                          torch.zeros(9, 9), kw["x"][..., :0], kw["x"].to("meta")]))
        choice = draw(st.sampled_from(["empty", "none", "extra", "stage"]))
        i = draw(st.integers(0, n - 1))
        kw["ks"] = {"empty": [], "none": None, "extra": kw["ks"] + [kw["ks"][0]],
                    "stage": kw["ks"][:i] + [bad_stage] + kw["ks"][i + 1:]}[choice]
        return kw, f"ks: {choice} ({type(bad_stage).__name__})", True
    if role == "bs":
        n = len(kw["bs"])
        kw["bs"] = draw(st.sampled_from([[], None, [NAN] * n, ["a"] * n, [True] * n, [1.0] * (n + 1),
                                         [float("inf")] * n, [torch.tensor(1.0)] * n]))
        return kw, f"bs <- {kw['bs']!r}", True
    if role == "num_groups":
        kw[name] = draw(st.sampled_from([0, -2, 2.5, True, "2", None, kw["x"].shape[1] + 1]))
        return kw, f"num_groups <- {kw[name]!r}", True
    kw[name] = draw(st.sampled_from(BAD_SCALARS[role] + (["group"] if name == "kind" and "res" in kw else [])))
    return kw, f"{name} <- {kw[name]!r}", True


def _registry_refusal(exc: BaseException, backend: str | None) -> bool:
    """A forced backend declining valid inputs it has no kernel for: the registry's documented RuntimeError."""
    return backend not in (None, "torch") and isinstance(exc, RuntimeError) and "is forced but cannot run" in str(exc)


def _call(fn, kw, backend):
    with use_backend(backend):
        return fn(**kw)


def _skip_missing(op, backend):
    if backend is not None and backend not in ops.backends_for(op):
        pytest.skip(f"no {backend} backend for {op}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@FUZZ
@given(data=st.data())
def test_op_rejects_invalid_arguments(op, backend, data):
    """One argument made invalid: ValueError or TypeError, on every backend (surely-invalid ones
    always raise; a reshaped tensor may still be valid, then the call must simply work)."""
    _skip_missing(op, backend)
    r = data.draw(_recipe(op), label="recipe")
    fn, kw, roles = build(r)
    kw, what, sure = _mutate(data.draw, kw, roles)
    note = f"{op}[{backend}] {what}"
    try:
        _call(fn, kw, backend)
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        assert msg and "\n" not in msg.strip(), note
        return
    except Exception as exc:  # noqa: BLE001 - the property under test
        if not sure and _registry_refusal(exc, backend):
            return
        raise AssertionError(f"{note}: raised {type(exc).__name__}: {exc}") from exc
    assert not sure, f"{note}: accepted"


# ---- odd but valid layouts

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_TENSOR_ROLES = ("tensor", "optional", "times", "times_or_steps")


def _odd_plan(draw, kw, roles):
    """Per tensor argument: keep, another float dtype, a strided view, an expanded view, or a leaf
    that requires grad (all valid shapes); and for rk_combine, maybe out=x."""
    plan = {}
    for name in sorted(n for n, role in roles.items() if role in _TENSOR_ROLES and kw[n] is not None):
        how = draw(st.sampled_from(["same", "dtype", "strided", "expanded", "grad"]), label=name)
        plan[name] = (how, draw(st.sampled_from(_FLOAT_DTYPES), label=f"{name} dtype"))
    plan["out=x"] = kw.get("out") is not None and draw(st.booleans(), label="out=x")
    return plan


def _apply_odd(plan, kw):
    kw = dict(kw)
    for name, (how, dtype) in ((n, v) for n, v in plan.items() if n != "out=x"):
        t = kw[name]
        if how == "dtype" and t.is_floating_point():
            t = t.to(dtype)
        elif how == "strided":
            t = torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]     # last-dim stride 2
        elif how == "expanded":   # of a copy: a view of x must not also be x (as out) here
            t = t.detach().clone()[:1].expand(t.shape)
        elif how == "grad" and t.is_floating_point():
            t = t.detach().clone().requires_grad_(True)
        kw[name] = t
    if plan["out=x"]:
        kw["out"] = kw["x"]
    return kw


@pytest.mark.parametrize("backend", (None, *BACKENDS))
@pytest.mark.parametrize("op", OPS)
@FUZZ
@given(data=st.data())
def test_op_takes_or_refuses_odd_valid_layouts(op, backend, data):
    """Mixed dtypes, strides, expanded views and grad leaves: each call works, or raises ValueError /
    TypeError (e.g. an expanded tensor written in place), or a forced backend declines it through
    the registry. Where a fused backend ran, it agrees with the reference."""
    _skip_missing(op, backend)
    r = data.draw(_recipe(op), label="recipe")
    fn, kw, roles = build(r)
    plan = _odd_plan(data.draw, kw, roles)
    args = _apply_odd(plan, kw)
    note = f"{op}[{backend}] {plan}"
    try:
        got = _call(fn, args, backend)
    except (ValueError, TypeError):
        return
    except Exception as exc:  # noqa: BLE001 - the property under test
        if _registry_refusal(exc, backend):
            return
        raise AssertionError(f"{note}: raised {type(exc).__name__}: {exc}") from exc
    if backend == "torch":
        return
    want = _call(fn, _apply_odd(plan, build(r)[1]), "torch")   # fresh inputs: in-place ops wrote to args
    low = any(t.dtype in (torch.float16, torch.bfloat16) for t in _flat(args))
    tol = dict(atol=5e-2, rtol=5e-2) if low else dict(atol=1e-4, rtol=1e-4)
    for a, b in zip(_flat(got), _flat(want), strict=True):
        torch.testing.assert_close(a.detach().to(b.dtype), b.detach(), **tol, msg=note)


def _flat(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _flat(item)]
    if isinstance(x, dict):
        return [t for item in x.values() for t in _flat(item)]
    return []


# --------------------------------------------------------------------------------------------------
# What the fuzz found, pinned down
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_dtype,p_dtype", [(torch.float64, torch.float32), (torch.float32, torch.float64)])
@pytest.mark.parametrize("kind", ["layer", "rms", "group"])
def test_norm_modulate_parameters_of_another_float_dtype(backend, x_dtype, p_dtype, kind):
    """The reference used to hand F.layer_norm / rms_norm / group_norm mixed dtypes (RuntimeError)."""
    g = torch.Generator().manual_seed(0)
    x = _rand(g, (2, 4, 5), x_dtype)
    feat = 4 if kind == "group" else 5
    w, b = _rand(g, (feat,), p_dtype), _rand(g, (feat,), p_dtype)
    with use_backend(backend):
        y = ops.norm_modulate(x, kind=kind, weight=w, bias=b, num_groups=2)
    with use_backend("torch"):
        want = ops.norm_modulate(x, kind=kind, weight=w.to(x_dtype), bias=b.to(x_dtype), num_groups=2)
    assert y.dtype == x_dtype
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_norm_with_one_value_per_group(backend):
    """F.group_norm refuses this ("when training"); the kernels normalise each value to about 0, so
    y is about the bias (rstd = 1/sqrt(eps) magnifies the rounding of x - mean)."""
    x, b = torch.randn(1, 3, 1), torch.randn(3)
    with use_backend(backend):
        y = ops.norm_modulate(x, kind="group", num_groups=3, bias=b)
    torch.testing.assert_close(y, b.reshape(1, 3, 1), atol=1e-3, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_targets_are_checked(backend):
    x, k = torch.randn(3, 4), torch.randn(3, 4)
    with use_backend(backend):
        with pytest.raises(ValueError, match="x is written in place.*share memory"):
            ops.euler_step_(torch.randn(1, 4).expand(3, 4), k, 0.1)
        with pytest.raises(ValueError, match="out is written in place.*share memory"):
            ops.rk_combine(x, 0.1, [k], [1.0], out=torch.randn(1, 4).expand(3, 4))
        with pytest.raises(ValueError, match="leaf tensor that requires grad"):
            ops.euler_step_(x.clone().requires_grad_(True), k, 0.1)
        with pytest.raises(ValueError, match="cannot record gradients"):
            ops.rk_combine(x, 0.1, [k.clone().requires_grad_(True)], [1.0], out=torch.empty(3, 4))
        with torch.no_grad():   # the solvers' case: fine without grad mode
            ops.rk_combine(x, 0.1, [k.clone().requires_grad_(True)], [1.0], out=torch.empty(3, 4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_partly_overlapping_in_place_operands_refused(backend):
    """A kernel reading x while writing a shifted view of it gives an order-dependent answer (the C++
    and torch backends disagreed); the same tensor (in place) or disjoint ones are fine."""
    base = torch.arange(10.0).reshape(5, 2)
    with use_backend(backend):
        with pytest.raises(ValueError, match="share memory"):
            ops.rk_combine(base[1:], 1.0, [torch.ones(4, 2)], [1.0], out=base[:4])
        with pytest.raises(ValueError, match="share memory"):
            ops.rk_combine(torch.ones(4, 2), 1.0, [base[1:]], [1.0], out=base[:4])
        with pytest.raises(ValueError, match="share memory"):
            ops.euler_step_(base[:4], base[1:], 1.0)
        x = torch.randn(4, 2)
        ks = [x.clone(), x.clone()]
        want = x + 1.0 * ks[0] + 2.0 * ks[1]
        torch.testing.assert_close(ops.rk_combine(x, 1.0, ks, [1.0, 2.0], out=ks[1]), want)
        torch.testing.assert_close(ops.rk_combine(x.clone(), 1.0, [x], [1.0], out=base[:4].clone()), 2 * x)
        y = x.clone()
        torch.testing.assert_close(ops.euler_step_(y, y, 0.5), 1.5 * x)
        torch.testing.assert_close(ops.euler_step_(base[:2].clone(), base[2:4], 1.0), base[:2] + base[2:4])


def test_rk_combine_without_out_is_differentiable():
    """With out=None the reference used torch.add(out=...) on inputs requiring grad (RuntimeError)."""
    x = torch.randn(3, 4, requires_grad=True)
    ks = [torch.randn(3, 4, requires_grad=True) for _ in range(2)]
    y = ops.rk_combine(x, 0.5, ks, [1.0, 0.25])
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(3, 4))
    torch.testing.assert_close(ks[0].grad, torch.full((3, 4), 0.5))
    torch.testing.assert_close(ks[1].grad, torch.full((3, 4), 0.125))
    with torch.no_grad():
        torch.testing.assert_close(y, ops.rk_combine(x, 0.5, ks, [1.0, 0.25]))


def test_loader_header_that_breaks_numpys_tokenizer(tmp_path):
    """numpy's header parser raised tokenize.TokenError (not a ValueError) for an unbalanced header."""
    p = tmp_path / "w.npy"
    body = b"{'descr': '<f4', 'fortran_order': False, 'shape': (2, [3, 4), }"
    body += b" " * (64 - (10 + len(body) + 1) % 64) + b"\n"
    p.write_bytes(_npy_prefix((1, 0), len(body)) + body + b"\0" * 96)
    assert _load(p) is None
