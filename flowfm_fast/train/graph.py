"""One captured training step on CUDA: ``train_flowfm(..., cuda_graph=True)``.

The whole step (augmentation, encoder, path, velocity, loss, backward, gradient clipping, fused
AdamW, EMA update) is captured once as a CUDA graph and replayed every step from a static batch
buffer, following torch's whole-network capture recipe (``torch.cuda.graphs``):

- the first ``warmup`` steps run uncaptured on a side stream (they are real training steps: they
  initialise the optimizer state and let cuDNN pick its algorithms for the fixed shapes);
- the data loader copies each batch into the static buffer ``x1`` before the replay;
- every random draw (t, noise, augmentation) comes from the trainer's generator, registered with
  the graph, so each replay draws fresh values from the seed the loop sets for that step (a
  capture that baked its draws in would train on the same noise every step);
- the learning rate is a device tensor the loop fills each step (a Python float would be baked
  in); AdamW runs with ``capturable=True``; autocast's cast cache is off, as torch asks of
  captured regions;
- nothing in the step reads a value back to the host: loss and gradient norm stay on the device
  (static outputs of the graph) and the loop reads them every ``log_every`` steps.

What cannot be captured raises a :class:`CaptureError` naming it: a device other than CUDA,
torchrun (DDP) training, or a step that reads a value back to the host (found by running the
first warm-up step under :class:`forbid_host_syncs`).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from ..models.coupling import ASSIGNED
from ..ops import _validate

aten = torch.ops.aten


class CaptureError(ValueError):
    """A training setup that cannot run as one captured CUDA graph (the message names why)."""


# What reads device values back to the host (the sync a CUDA graph cannot contain): ATen ops
# (.item() / bool() / float() of a tensor, ops whose output shape depends on the values) and the
# Tensor methods that hand values to Python without an ATen op on a CPU tensor (tolist, numpy).
_HOST_SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
                  aten.unique_consecutive.default, aten._unique2.default, aten.repeat_interleave.Tensor}
_HOST_SYNC_METHODS = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.item}


def _refuse(what) -> CaptureError:
    return CaptureError(f"the training step reads a value back to the host ({what}); "
                        f"a CUDA graph cannot capture that: run without cuda_graph")


class _ForbidOps(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _HOST_SYNC_OPS:
            raise _refuse(func)
        return func(*args, **(kwargs or {}))


class _ForbidMethods(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _HOST_SYNC_METHODS:
            raise _refuse(f"Tensor.{func.__name__}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def forbid_host_syncs():
    """Inside the block, anything that reads tensor values back to the host raises
    :class:`CaptureError` naming it. Works on every device: a CPU run finds the same reads a CUDA
    capture would fail on."""
    with _ForbidMethods(), _ForbidOps():
        yield


def check_capturable(device: torch.device, distributed: bool, coupling: str = "independent") -> None:
    """Raise :class:`CaptureError` where ``cuda_graph=True`` cannot work."""
    if coupling in ASSIGNED:
        raise CaptureError(f"cuda_graph=True cannot capture coupling={coupling!r}: its assignment is "
                           "solved on the host every step; use coupling 'independent' or 'wcfm'")
    if device.type != "cuda":
        raise CaptureError(f"cuda_graph=True needs a CUDA device, got device {str(device)!r}")
    if distributed:
        raise CaptureError("cuda_graph=True does not capture torchrun (DDP) training: its gradient "
                           "all-reduce would need a capture-safe NCCL setup; run without --cuda-graph "
                           "under torchrun")


def set_lr(group: dict, value: float) -> None:
    """Set a param group's learning rate, in place where it is a device tensor (captured steps)."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        lr.fill_(value)
    else:
        group["lr"] = value


def prepare_optimizer(opt: torch.optim.Optimizer, device: torch.device) -> None:
    """Make ``opt`` capture-safe: ``capturable=True`` and the learning rate a device tensor."""
    for group in opt.param_groups:
        group["capturable"] = True
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), device=device)


class CapturedStep:
    """``step(x1) -> outputs`` (device tensors only) run as warm-up steps, then captured and replayed.

    ``generator``: the generator the step draws from (None: torch's default CUDA generator).
    ``__call__(x1_host)`` copies the batch into the static buffer and runs the next step; the
    returned tensors are the graph's static outputs, overwritten by the next replay (read them
    before the next call, or clone them).
    """

    def __init__(self, step: Callable[[torch.Tensor], tuple], x1_shape, device: torch.device,
                 generator: torch.Generator | None, optimizer: torch.optim.Optimizer, warmup: int = 3):
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (the optimizer state must exist before capture), got {warmup}")
        self.step, self.device, self.generator, self.optimizer = step, device, generator, optimizer
        self.x1 = torch.zeros(x1_shape, device=device)
        self.warmup_left = warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: tuple | None = None
        self._checked = False

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, x1_host: torch.Tensor) -> tuple:
        if tuple(x1_host.shape) != tuple(self.x1.shape):
            raise ValueError(f"a captured step takes batches of shape {tuple(self.x1.shape)}, got "
                             f"{tuple(x1_host.shape)}: the graph was captured for that shape")
        self.x1.copy_(x1_host, non_blocking=True)
        if self.graph is None and self.warmup_left > 0:
            self.warmup_left -= 1
            return self._warm()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.outputs

    def _warm(self) -> tuple:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), _validate.value_checks_off():
            # The first warm-up step also proves the step never reads a value back to the host,
            # with an error naming the op instead of a failed capture.
            with (forbid_host_syncs() if not self._checked else contextlib.nullcontext()):
                out = self.step(self.x1)
            self._checked = True
        torch.cuda.current_stream(self.device).wait_stream(side)
        return out

    def _capture(self) -> None:
        prepare_optimizer(self.optimizer, self.device)
        graph = torch.cuda.CUDAGraph()
        if self.generator is not None:  # torch registers its default generator itself
            graph.register_generator_state(self.generator)
        torch.cuda.synchronize(self.device)
        with torch.cuda.graph(graph), _validate.value_checks_off():
            self.outputs = self.step(self.x1)
        self.graph = graph
