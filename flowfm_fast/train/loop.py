"""Joint FlowFM training: one flow-matching loss trains encoder and generator together.

Deterministic on CPU for a fixed seed: model init, data order (a permutation per epoch derived
from seed and epoch) and every random draw (noise, t, augmentation, from a generator reseeded each
step from seed, step and rank) are functions of the step, so a resumed run continues exactly.
Under ``torchrun`` the model is wrapped in DDP and each rank trains on its slice of the global
batch (:mod:`flowfm_fast.train.distributed`); rank 0 alone logs and writes checkpoints.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.augment import AugmentConfig, augment
from ..data.windows import Standardizer
from ..models import FlowFM, FlowFMConfig
from ..nvtx import nvtx_range
from .checkpoint import (CheckpointError, load_weights, optimizer_from_flat, optimizer_to_flat,
                         has_checkpoint, read_checkpoint, save_checkpoint, step_dir)
from .distributed import current_world, step_seed
from .graph import CapturedStep, check_capturable, set_lr


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    ema_decay: float = 0.0          # 0 turns EMA off
    seed: int = 0
    log_every: int = 25
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    max_minutes: float | None = None  # stop early (with a checkpoint) once this much wall time is spent
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self) -> "TrainConfig":
        for name in ("steps", "batch_size", "log_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        return self

    # What fixes the sequence of batches and draws, and whether EMA weights exist: resuming with
    # any of these changed would silently continue a different run.
    RESUME_FIELDS = ("seed", "batch_size", "ema_decay", "augment")

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        return cls(augment=AugmentConfig(**d.pop("augment", {})), **d)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def batch_indices(step: int, n: int, batch: int, seed: int) -> torch.Tensor:
    """Indices of ``step``'s batch: epoch-wise permutations, stateless so resume needs only the step."""
    per_epoch = max(1, n // batch)
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    if n < batch:
        return perm
    return perm[pos * batch:(pos + 1) * batch]


def param_groups(model: torch.nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """The trainer's AdamW (betas 0.9 / 0.99, no decay on biases and norm gains). torch's fused
    kernel on CPU and CUDA: one pass over all parameters instead of ~6 small ops per tensor
    (small config on the 2-core CPU: 0.56 vs 3.8 ms a step); the same state_dict either way."""
    devices = {p.device.type for p in model.parameters()}
    fused = devices <= {"cpu", "cuda"} or None
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.99), fused=fused)


@dataclass
class TrainResult:
    model: FlowFM
    ema: FlowFM | None
    step: int
    seconds: float
    last_loss: float
    checkpoint: Path | None

    @property
    def eval_model(self) -> FlowFM:
        return self.ema if self.ema is not None else self.model


@contextlib.contextmanager
def _cudnn_autotuned():
    """cuDNN times its convolution algorithms once per shape (the step's shapes never change): its
    default pick for the encoder's backward was an FFT algorithm taking ~8 of the ~10 ms of GPU work
    in a `small` step on an H200 (benchmarks/results/h200/profile.log). Only this flag is touched
    (torch.backends.cudnn.flags would reset the user's other cuDNN settings), and restored."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def build_model(cfg: FlowFMConfig, seed: int) -> FlowFM:
    torch.manual_seed(seed)
    return FlowFM(cfg)


class _Loss(torch.nn.Module):
    """``model.loss`` as a forward, the call DDP wraps to overlap its gradient all-reduce with backward."""

    def __init__(self, model: FlowFM):
        super().__init__()
        self.model = model

    def forward(self, x1, x_enc, generator):
        return self.model.loss(x1, x_enc, generator=generator)


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the records of steps <= ``step`` (what the checkpoint resumed from covers): a killed
    run logged steps it will train again, and may have died inside a line. Replaced atomically."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in keep))
    tmp.replace(path)


def _windows_fingerprint(X: torch.Tensor) -> dict:
    """Shape and the sums of 64 evenly spaced windows: batches are drawn by index, so resuming on
    other windows (another file, another order) would silently continue a different run. Sums
    compared with a tolerance rather than a hash of the bytes, because the same windows loaded on
    another machine may differ in the last bit (numpy's SIMD paths), and that must still resume."""
    probe = torch.linspace(0, X.shape[0] - 1, min(X.shape[0], 64)).round().long()
    return {"shape": list(X.shape), "probe_sums": X[probe].double().sum((1, 2)).tolist()}


def _same_windows(saved, now: dict) -> bool:
    try:
        return (saved["shape"] == now["shape"] and len(saved["probe_sums"]) == len(now["probe_sums"])
                and np.allclose(saved["probe_sums"], now["probe_sums"], rtol=1e-5, atol=1e-3))
    except (KeyError, TypeError, ValueError):
        return False


def _check_resume_config(state: dict, model_cfg: FlowFMConfig, cfg: TrainConfig, data: dict, where) -> None:
    try:
        same_model = FlowFMConfig.from_dict(state.get("model_config") or {}) == model_cfg
    except (TypeError, ValueError):
        same_model = False
    if not same_model:
        raise CheckpointError(f"{where}: checkpoint was made with another model config")
    saved = state.get("train_config")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{where}: state.json lacks the training config")
    now = cfg.to_dict()
    if isinstance(saved.get("augment"), dict):   # fields added since (e.g. target) take their defaults
        saved = {**saved, "augment": {**dataclasses.asdict(AugmentConfig()), **saved["augment"]}}
    differ = [k for k in TrainConfig.RESUME_FIELDS if k in saved and saved[k] != now[k]]
    if differ:
        diffs = ", ".join(f"{k}: checkpoint {saved[k]!r}, now {now[k]!r}" for k in differ)
        raise CheckpointError(f"{where}: checkpoint was made with another training config ({diffs})")
    saved = state.get("windows")   # absent in checkpoints older than the check
    if saved is not None and not _same_windows(saved, data):
        raise CheckpointError(f"{where}: checkpoint was made on other pretraining windows "
                              f"(shape {saved.get('shape') if isinstance(saved, dict) else '?'}, now {data['shape']})")


def restore_state(tensors: dict, optim_tensors: dict, state: dict, where, model, ema, opt,
                  device) -> tuple[int, float]:
    """Load a checkpoint's weights (``model.*``, and ``ema.*`` when ``ema``) and optimizer state;
    returns (step, training seconds) to continue from."""
    load_weights(model, tensors, "model.", str(where))
    if ema is not None:
        load_weights(ema, tensors, "ema.", str(where))
    try:
        optimizer_from_flat(opt, {k: v.to(device) for k, v in optim_tensors.items()}, state["optimizer"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: optimizer state does not fit the model ({exc})") from None
    return int(state["step"]), float(state.get("train_seconds", 0.0))


def make_step(loss_fn, model: FlowFM, opt: torch.optim.Optimizer, ema: FlowFM | None, cfg: TrainConfig,
              gen: torch.Generator, mean: torch.Tensor, std: torch.Tensor, device: torch.device,
              captured: bool = False):
    """The training step ``step(x1, share=1.0) -> (loss, grad_norm)``, both device tensors:
    augmentation, loss, backward, clipping, AdamW and EMA. Nothing in it reads a value back to the
    host, so the same function runs eagerly or captured as a CUDA graph (``captured``: autocast's
    cast cache off, as torch asks of captured regions). ``share`` weights this rank's loss under
    DDP (see train_flowfm)."""
    use_amp = device.type == "cuda"
    params = list(model.parameters())
    ema_pairs = None if ema is None else (list(ema.parameters()), params, list(ema.buffers()), list(model.buffers()))

    rebuild_augmented = cfg.augment.enabled and cfg.augment.target == "augmented"

    def step(x1: torch.Tensor, share: float = 1.0):
        x_enc = augment(x1, mean, std, cfg.augment, gen)
        with _cudnn_autotuned():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp, cache_enabled=not captured):
                loss = loss_fn(x_enc if rebuild_augmented else x1, x_enc, gen)
            opt.zero_grad(set_to_none=True)
            with nvtx_range("train.backward"):
                (loss * share if share != 1 else loss).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        with nvtx_range("train.optimizer_step"):
            opt.step()
        if ema_pairs is not None:
            ema_params, model_params, ema_buffers, model_buffers = ema_pairs
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, model_params, 1.0 - cfg.ema_decay)
                for b_ema, b in zip(ema_buffers, model_buffers):
                    b_ema.copy_(b)
        return loss.detach(), grad_norm
    return step


def train_flowfm(model_cfg: FlowFMConfig, windows: np.ndarray, cfg: TrainConfig, out_dir, standardizer: Standardizer,
                 resume: bool = False, device: str | torch.device = "cpu", progress: bool = True,
                 extra_state: dict | None = None, callback=None, cuda_graph: bool = False) -> TrainResult:
    """Train a FlowFM on standardised ``windows`` (N, C, L); checkpoints and ``metrics.jsonl`` go to out_dir.

    ``callback(step, seconds, eval_model)`` runs after every step (``eval_model``: the EMA model
    when EMA is on); the time it takes is left out of the training clock, so evaluations made
    from it (the probe curve of ``flowfm-fast compare``) do not count as training time.

    When a torch.distributed process group is initialised (``flowfm-fast pretrain`` under torchrun
    joins one), every rank calls this with the same arguments and its own ``device``: each trains
    on its slice of the global ``cfg.batch_size`` batch, rank 0 alone writes metrics and
    checkpoints (the others wait for it) and the callback runs on every rank. ``out_dir`` must be
    one directory all ranks see for ``resume``.

    ``cuda_graph=True`` (CUDA, one process): the whole step is captured once as a CUDA graph and
    replayed from a static batch buffer (:mod:`flowfm_fast.train.graph`); the same draws, losses
    and weights as the uncaptured run within fp32 rounding. It raises a ``CaptureError`` naming
    what it cannot capture (another device, torchrun, a coupling solved on the host)."""
    cfg.validate()
    device = torch.device(device)
    world = current_world()
    if cuda_graph:
        check_capturable(device, world.active, model_cfg.coupling)
    out = Path(out_dir)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if windows.ndim != 3 or tuple(windows.shape[1:]) != (model_cfg.channels, model_cfg.length):
        raise ValueError(f"windows must have shape (N, {model_cfg.channels}, {model_cfg.length}), got {windows.shape}")
    if world.size > min(cfg.batch_size, windows.shape[0]):
        raise ValueError(f"batch_size {cfg.batch_size} over {windows.shape[0]} windows leaves some of the "
                         f"{world.size} processes without a window; use a batch_size >= the number of processes")
    model = build_model(model_cfg, cfg.seed).to(device)
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay)
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema_decay > 0 else None
    gen = torch.Generator(device=device)
    start, elapsed_before = 0, 0.0

    X = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32))
    data = _windows_fingerprint(X)
    if resume and has_checkpoint(out / "checkpoints"):
        tensors, optim_tensors, state, where = read_checkpoint(out)
        _check_resume_config(state, model_cfg, cfg, data, where)
        start, elapsed_before = restore_state(tensors, optim_tensors, state, where, model, ema, opt, device)
    # A rank that resumed from another step (out_dir not shared between machines) would train a
    # different model under the same all-reduce: stop all of them instead.
    world.check_same(start, "the step to resume from (is --out on a filesystem every node shares?)", device)
    loss_fn = _Loss(model)
    if world.active:
        device_ids = None
        if device.type == "cuda":
            device_ids = [device.index if device.index is not None else torch.cuda.current_device()]
        loss_fn = torch.nn.parallel.DistributedDataParallel(loss_fn, device_ids=device_ids)

    mean = torch.as_tensor(standardizer.mean, device=device)
    std = torch.as_tensor(standardizer.std, device=device)
    step_fn = make_step(loss_fn, model, opt, ema, cfg, gen, mean, std, device, captured=cuda_graph)
    runner = None
    if cuda_graph:
        shape = (min(cfg.batch_size, X.shape[0]), *X.shape[1:])
        runner = CapturedStep(step_fn, shape, device, gen, opt)
    log_f = None
    if world.is_main:
        if resume:
            _truncate_metrics(out / "metrics.jsonl", start)
        log_f = open(out / "metrics.jsonl", "a")

    def checkpoint(step: int, seconds: float) -> Path:
        model_t = {f"model.{k}": v for k, v in model.state_dict().items()}
        if ema is not None:
            model_t.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
        opt_t, opt_rest = optimizer_to_flat(opt)
        state = {"model_config": model_cfg.to_dict(), "train_config": cfg.to_dict(), "optimizer": opt_rest,
                 "standardizer": standardizer.to_dict(), "windows": data, "train_seconds": seconds,
                 **(extra_state or {})}
        return save_checkpoint(out / "checkpoints", step, model_t, opt_t, state, cfg.keep_checkpoints)

    bar = None
    if progress and world.is_main:
        from tqdm.auto import tqdm   # lazy: only an interactive run draws a bar
        bar = tqdm(total=cfg.steps, initial=start, desc="pretrain", unit="step", dynamic_ncols=True)
    t0 = time.perf_counter()
    model.train()
    step, loss_val, last_ckpt = start, float("nan"), None
    try:
        while step < cfg.steps:
            lr = cfg.lr * lr_factor(step, cfg)
            for g in opt.param_groups:
                set_lr(g, lr)
            batch = batch_indices(step, X.shape[0], cfg.batch_size, cfg.seed)
            idx = world.shard(batch)
            gen.manual_seed(step_seed(cfg.seed, step, world.rank))
            if runner is not None:
                loss, grad_norm = runner(X[idx])
            else:
                # DDP averages gradients over ranks; weighting each rank's batch mean by its share
                # makes that average the gradient of the global batch mean, also when slices differ
                # in size.
                share = len(idx) * world.size / len(batch)
                loss, grad_norm = step_fn(X[idx].to(device, non_blocking=True), share)
            step += 1
            seconds = elapsed_before + time.perf_counter() - t0
            if step % cfg.log_every == 0 or step == cfg.steps:
                loss_val = (float(world.sum(loss.detach().float() * len(idx))) / len(batch) if world.active
                            else float(loss.detach()))
                if not math.isfinite(loss_val):
                    raise FloatingPointError(f"loss became {loss_val} at step {step}")
                rec = {"step": step, "loss": loss_val, "lr": lr,
                       "grad_norm": float(grad_norm), "seconds": round(seconds, 3)}
                if log_f is not None:
                    log_f.write(json.dumps(rec) + "\n")
                    log_f.flush()
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_val:.4f}")
            if bar is not None:
                bar.update(1)
            if callback is not None:
                c0 = time.perf_counter()
                callback(step, seconds, ema if ema is not None else model)
                model.train()
                t0 += time.perf_counter() - c0
            # Rank clocks differ: rank 0's decides, so every rank stops after the same step.
            out_of_time = cfg.max_minutes is not None and world.any(
                world.is_main and seconds >= 60 * cfg.max_minutes, device)
            if step % cfg.ckpt_every == 0 or step == cfg.steps or out_of_time:
                last_ckpt = checkpoint(step, seconds) if world.is_main else step_dir(out / "checkpoints", step)
                world.barrier()
            if out_of_time:
                break
    finally:
        if log_f is not None:
            log_f.close()
        if bar is not None:
            bar.close()
    # DDP hands rank 0's BatchNorm running statistics to every rank before each forward, but each
    # rank then updates its own; after the last step every rank returns what rank 0 saved.
    world.broadcast_([b for m in (model, ema) if m is not None for b in m.buffers()])
    model.eval()
    if ema is not None:
        ema.eval()
    return TrainResult(model, ema, step, elapsed_before + time.perf_counter() - t0, loss_val, last_ckpt)


def load_trained(path, device="cpu", use_ema: bool = True) -> tuple[FlowFM, Standardizer, dict]:
    """(model in eval mode, standardiser, state) from a run directory or checkpoint."""
    tensors, _, state, where = read_checkpoint(path)
    try:
        cfg = FlowFMConfig.from_dict(state["model_config"])
        std = Standardizer.from_dict(state["standardizer"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: unreadable config ({exc})") from None
    model = FlowFM(cfg)
    prefix = "ema." if use_ema and any(k.startswith("ema.") for k in tensors) else "model."
    load_weights(model, tensors, prefix, str(where))
    return model.to(device).eval(), std, state
