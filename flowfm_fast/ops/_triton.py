"""The Triton kernels of ``flowfm_fast.kernels`` as registry backends.

Each op family wraps its Triton launches in an op of the ``flowfm_triton`` namespace
(:func:`custom_op` below), with a fake (meta) kernel and a registered autograd formula, so
torch.compile(fullgraph=True) sees one opaque op. (``torch.library.triton_op`` would let Inductor
look inside, but its fake-tensor trace runs the kernel, which fails under ``TRITON_INTERPRET=1``,
the way CI runs these kernels on the CPU; opaque custom ops work in both places.)

Where the kernels run: CUDA tensors always; CPU tensors only under ``TRITON_INTERPRET=1`` (set
before triton is first imported), which is how the tests exercise them without a GPU. There the
backend is only used when forced; on CPU the automatic choice stays the C++ extension.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Callable, Mapping

import torch

from .. import _backend
from ._registry import FORCED_ONLY, register
from ._spec import KernelSpec

NAMESPACE = "flowfm_triton"


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Triton is importable (its kernels may still have no device to run on)."""
    return importlib.util.find_spec("triton") is not None


def kernel_module(name: str):
    """``flowfm_fast.kernels.<name>``, imported on first use (importing the package never imports
    triton). Installed, setup.py maps the top-level ``kernels/`` there; from a plain checkout
    (``PYTHONPATH=.``) the same folder is attached as that package here."""
    full = f"flowfm_fast.kernels.{name}"
    module = sys.modules.get(full)
    if module is not None:
        return module
    if "flowfm_fast.kernels" not in sys.modules and importlib.util.find_spec("flowfm_fast.kernels") is None:
        folder = Path(__file__).resolve().parents[2] / "kernels"
        spec = importlib.util.spec_from_file_location(
            "flowfm_fast.kernels", folder / "__init__.py", submodule_search_locations=[str(folder)])
        if spec is None or not (folder / "__init__.py").exists():
            raise ImportError(f"flowfm_fast.kernels is not installed and {folder} has no kernels")
        package = importlib.util.module_from_spec(spec)
        sys.modules["flowfm_fast.kernels"] = package
        spec.loader.exec_module(package)
    return importlib.import_module(full)


def launcher(module: str, function: str) -> Callable:
    """A function that calls ``flowfm_fast.kernels.<module>.<function>``, importing it on first call."""
    def launch(*args):
        return getattr(kernel_module(module), function)(*args)
    launch.__name__ = f"{module}_{function}"
    return launch


_LIB = None


def _lib() -> torch.library.Library:
    global _LIB
    if _LIB is None:  # kept for the life of the process: the ops live as long as it
        _LIB = torch.library.Library(NAMESPACE, "DEF")
    return _LIB


def _eager_ok(args) -> bool:
    """The op may skip the dispatcher: plain tensors, no torch.compile trace, no torch.func
    transform, no Python dispatch mode (FakeTensor, FlopCounter, ...) and no TorchScript trace:
    all of those need the registered op."""
    return (not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0
            and torch._C._functorch.peek_interpreter_stack() is None and not torch._C._get_tracing_state()
            and all(type(a) is torch.Tensor or type(a) is torch.nn.Parameter or not isinstance(a, torch.Tensor)
                    for a in args))


class TritonOp:
    """A ``flowfm_triton`` op: its schema, one Python kernel for CPU (interpreter) and CUDA tensors,
    and ``register_fake`` / ``register_autograd`` as on :func:`torch.library.custom_op`'s ops.

    Defined through :class:`torch.library.Library` rather than ``torch.library.custom_op``, whose
    per-call Python layers (default filling, a dynamo-disable wrapper, ...) took ~40 us of host time
    a call here with the launches stubbed out; on the H200 the fused ops' host time made a ``small``
    training step CPU-bound (benchmarks/results/h200/NOTES.md).

    Calls in eager mode skip the dispatcher too: the kernel runs directly, inside a
    :class:`torch.autograd.Function` built from the same autograd formula when a gradient is
    needed. (torch.library's autograd wrapper re-fills the schema's defaults and redispatches on
    every call; skipping it and the dispatcher's Python trampoline saved 35-175 us of host time per
    fwd+bwd of one op on the H200 machine, 5-25 %: benchmarks/results/h200/host.log.)
    torch.compile, torch.func transforms, dispatch modes and tensor subclasses get the registered
    op, so what they see is unchanged."""

    def __init__(self, name: str, fn: Callable, schema: str | None, mutates_args):
        self.qualname = f"{NAMESPACE}::{name}"
        if schema is None:
            infer = getattr(torch.library, "infer_schema", None)  # public from torch 2.5
            if infer is None:
                from torch._library.infer_schema import infer_schema as infer
            schema = infer(fn, mutates_args=mutates_args)
        lib = _lib()
        lib.define(name + schema)
        for key in ("CPU", "CUDA"):
            lib.impl(name, fn, key)
        self._op = getattr(getattr(torch.ops, NAMESPACE), name).default
        self._fn = fn
        self._function = None  # the eager autograd.Function, once register_autograd gave a formula
        # Positions of the arguments the op writes to (from the schema's alias annotations).
        self._mutates = tuple(i for i, a in enumerate(self._op._schema.arguments)
                              if a.alias_info is not None and a.alias_info.is_write)

    def __call__(self, *args):
        if _eager_ok(args):
            if not (torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)):
                return self._call(self._fn, args)
            if self._function is None or self._mutates:
                # torch's fallback for such an op would warn and hand back zero gradients.
                raise RuntimeError(f"{self.qualname} has no derivative (in-place updates and the backward "
                                   "kernels themselves): double backward and in-place updates of tensors "
                                   "that require grad need the reference backend (flowfm_fast.ops.use_backend('torch'))")
            return self._call(self._function.apply, args)
        return self._op(*args)  # tracing, transforms, dispatch modes: the registered op

    def _call(self, fn, args):
        if torch.autograd._profiler_enabled():  # the op's name in torch.profiler traces, as the dispatcher gives
            with torch.autograd.profiler.record_function(self.qualname):
                return self._bump(fn(*args), args)
        return self._bump(fn(*args), args)

    def _bump(self, out, args):
        # In-place ops outside the dispatcher: bump the mutated tensors' version counters, so
        # autograd still notices a tensor it saved being overwritten.
        if self._mutates:
            torch.autograd.graph.increment_version([args[i] for i in self._mutates if i < len(args)])
        return out

    def register_fake(self, fn: Callable) -> Callable:
        torch.library.register_fake(self.qualname, fn, lib=_lib())
        return fn

    def register_autograd(self, backward: Callable, *, setup_context: Callable | None = None) -> None:
        torch.library.register_autograd(self.qualname, backward, setup_context=setup_context, lib=_lib())
        fn, qualname = self._fn, self.qualname

        # The old-style forward(ctx, ...): with a separate setup_context, Function.apply binds the
        # arguments through inspect.signature on every call (~60 us here).
        class Function(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *args):
                output = fn(*args)
                if setup_context is not None:
                    setup_context(ctx, args, output)
                return output

            @staticmethod
            def backward(ctx, *grads):
                # Grad mode is on inside backward only under create_graph=True. The formulas build
                # on saved, non-differentiable kernel outputs (dv, mean, rstd): a second derivative
                # through them would come out silently wrong, so refuse it.
                if torch.is_grad_enabled() and (any(g is not None and g.requires_grad for g in grads) or any(
                        t is not None and t.requires_grad for t in ctx.saved_tensors)):
                    raise RuntimeError(f"{qualname} has no derivative in the triton backend (double backward, "
                                       "create_graph=True): compute higher-order gradients with "
                                       "flowfm_fast.ops.use_backend('torch')")
                return backward(ctx, *grads)

        Function.__name__ = Function.__qualname__ = self.qualname.replace("::", "_")
        self._function = Function


def custom_op(name: str, *, schema: str | None = None, mutates_args=()) -> Callable[[Callable], TritonOp]:
    """Decorator: ``fn`` becomes the op ``flowfm_triton::name`` (schema inferred from its annotations
    unless given)."""
    return lambda fn: TritonOp(name, fn, schema, mutates_args)


def bind(spec: KernelSpec, kernel: Callable, backward_op: "TritonOp | None" = None) -> TritonOp:
    """Define ``flowfm_triton::<spec.name>`` running ``kernel``, with the spec's fake kernel and,
    where it has one, its derivative built on ``backward_op`` (the Triton op of ``spec.backward``)."""
    triton_op = TritonOp(spec.name, kernel, spec.schema, spec.mutates_args)
    triton_op.register_fake(spec.fake)
    if spec.derivative is not None:
        if spec.backward is not None and backward_op is None:
            raise ValueError(f"{spec.name}: its derivative calls {spec.backward.name}: pass that op")
        triton_op.register_autograd(spec.derivative(backward_op), setup_context=spec.setup_context)
    return triton_op


def register_triton(op_name: str, fn: Callable, ranks: Mapping[str, int],
                    accepts: Callable[[tuple], bool] | None = None) -> None:
    """Register ``fn`` (which calls a ``flowfm_triton`` op) as the ``triton`` backend of ``op_name``.
    On the CPU, Triton runs only in its interpreter, and there only when forced."""
    if available():
        ranks = dict(ranks)
        if _backend.interpreting():
            ranks.setdefault("cpu", FORCED_ONLY)
        register(op_name, "triton", ranks=ranks, accepts=accepts)(fn)
