"""Atomic checkpoints: a directory per step holding

- ``model.safetensors``: model weights (and ``ema.*`` when EMA is on),
- ``optim.safetensors``: optimizer tensors and the training RNG state,
- ``state.json``: model and training config, step, optimizer hyper-parameters, standardisation,
- optionally ``grids.json``: sampling time grids chosen for these weights afterwards
  (``flowfm-fast grid``), keyed by method and number of steps.

Everything is written into a hidden temporary directory, fsynced, then renamed into place (a
rename is atomic), and only then does the ``latest`` pointer (itself replaced atomically) move.
A process killed at any moment therefore leaves either the previous checkpoint or the new one:
temporary directories and step directories without every file are never loaded (and are removed
by the next save). ``state.json`` carries the SHA-256 of both tensor files, so damage inside a
file that still parses is caught as well. Nothing is unpickled: safetensors and JSON only.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE = "state.json"
MODEL = "model.safetensors"
OPTIM = "optim.safetensors"
FILES = (MODEL, OPTIM, STATE)
GRIDS = "grids.json"
TMP_PREFIX = ".tmp-"
STEP_DIR = re.compile(r"step_\d{8}")


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged or does not fit the model."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def step_dir(root, step: int) -> Path:
    """Where checkpoint ``step`` lives under ``root``."""
    return Path(root) / f"step_{step:08d}"


def _is_complete(d: Path) -> bool:
    return STEP_DIR.fullmatch(d.name) is not None and all((d / f).is_file() for f in FILES)


def _contiguous(tensors: dict) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(tensors, json-able rest) of an optimizer's state_dict."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    # A captured step keeps the learning rate as a device tensor (train/graph.py): saved as a number.
    groups = [{k: (float(v) if isinstance(v, torch.Tensor) and v.numel() == 1 else v) for k, v in g.items()}
              for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


_STEP_IMPL = ("fused", "foreach", "capturable", "differentiable")


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict, rest: dict) -> None:
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, idx, k = key.split(".", 2)
            state.setdefault(int(idx), {})[k] = v
    for key, v in rest.get("scalars", {}).items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    # How the step runs (fused / foreach kernels) is this process's choice, not the checkpoint's: a run
    # saved before the trainer used the fused AdamW resumes fused.
    impl = [{k: g[k] for k in _STEP_IMPL if k in g} for g in opt.param_groups]
    opt.load_state_dict({"state": state, "param_groups": rest["param_groups"]})
    for group, keep in zip(opt.param_groups, impl):
        group.update(keep)


def save_checkpoint(root: Path, step: int, model_tensors: dict, optim_tensors: dict, state: dict,
                    keep: int = 2) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically; keep the newest ``keep``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    # Leftovers of a writer killed mid-save (one writer per run directory: rank 0).
    for p in root.glob(TMP_PREFIX + "*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".latest-*"):
        p.unlink(missing_ok=True)
    final = step_dir(root, step)
    tmp = root / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    tmp.mkdir()
    save_file(_contiguous(model_tensors), str(tmp / MODEL))
    save_file(_contiguous(optim_tensors), str(tmp / OPTIM))
    for name in (MODEL, OPTIM):
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    _write_json(tmp / STATE, {**state, "step": step, "sha256": {n: _sha256(tmp / n) for n in (MODEL, OPTIM)}})
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    pointer_tmp = root / f".latest-{os.getpid()}"
    pointer_tmp.write_text(final.name)
    os.replace(pointer_tmp, root / "latest")
    _fsync_dir(root)
    old = sorted(p for p in root.glob("step_*") if p.is_dir() and STEP_DIR.fullmatch(p.name))
    for p in old[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    return final


def write_grids(path, grids: dict) -> Path:
    """Merge ``grids`` ({method: {steps: record}}) into the checkpoint's ``grids.json``, atomically."""
    ckpt = find_checkpoint(path)
    merged = read_grids(ckpt)
    for method, by_steps in grids.items():
        merged.setdefault(method, {}).update({str(k): v for k, v in by_steps.items()})
    tmp = ckpt / f".{GRIDS}-{os.getpid()}"
    _write_json(tmp, merged)
    os.replace(tmp, ckpt / GRIDS)
    _fsync_dir(ckpt)
    return ckpt / GRIDS


def read_grids(path) -> dict:
    """The checkpoint's saved grids ({method: {"K": record}}), {} when none were saved."""
    ckpt = find_checkpoint(path)
    f = ckpt / GRIDS
    if not f.is_file():
        return {}
    try:
        grids = json.loads(f.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{f}: damaged ({exc})") from None
    if not isinstance(grids, dict) or not all(isinstance(v, dict) for v in grids.values()):
        raise CheckpointError(f"{f}: expected {{method: {{steps: record}}}}")
    return grids


def has_checkpoint(root) -> bool:
    """Whether ``root`` (a ``checkpoints`` folder) ever received a checkpoint: a run killed inside
    its first write leaves only a temporary directory, and then there is nothing to resume."""
    root = Path(root)
    return root.is_dir() and any(STEP_DIR.fullmatch(p.name) for p in root.iterdir())


def find_checkpoint(path) -> Path:
    """Resolve a run directory, its ``checkpoints`` folder or a step directory to a complete checkpoint.

    The ``latest`` pointer wins when it names a complete ``step_*`` directory; otherwise the
    highest complete one. Temporary (``.tmp-*``) and incomplete directories are never chosen."""
    p = Path(path)
    if (p / STATE).is_file():
        missing = [f for f in (MODEL, OPTIM) if not (p / f).is_file()]
        if missing:
            raise CheckpointError(f"{p}: incomplete checkpoint, missing {', '.join(missing)}")
        return p
    what_to_pass = ("pass a run directory (pretrain's --out; for the demo, its pretrain folder), its "
                    "checkpoints folder or a step_* folder")
    if not p.is_dir():
        raise CheckpointError(f"{path}: no such directory; {what_to_pass}")
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    if root is p and not any(root.glob("step_*")):
        # A folder holding run directories (the demo's runs/demo holds pretrain/): take its one run.
        runs = sorted(d for d in p.iterdir() if (d / "checkpoints").is_dir())
        if len(runs) == 1:
            return find_checkpoint(runs[0])
        if runs:
            raise CheckpointError(f"{path} holds several runs ({', '.join(d.name for d in runs)}): pass one of them")
        raise CheckpointError(f"{path}: no checkpoint here; {what_to_pass}")
    pointer = root / "latest"
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if _is_complete(cand):
            return cand
    steps = sorted(root.glob("step_*"))
    complete = [d for d in steps if _is_complete(d)]
    if not complete:
        raise CheckpointError(f"{path}: no complete checkpoint ({len(steps)} step folder(s), none complete: "
                              f"a run stopped while writing its first checkpoint?)")
    return complete[-1]


def read_checkpoint(path) -> tuple[dict, dict, dict, Path]:
    """(model tensors, optimizer tensors, state) of the checkpoint at ``path``; raises on damage."""
    ckpt = find_checkpoint(path)
    try:
        state = json.loads((ckpt / STATE).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{ckpt}: damaged {STATE} ({exc})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{ckpt}: {STATE} lacks a step")
    # Checkpoints written before checksums existed have none; every newer one is verified first,
    # so a damaged file is named as such rather than by whatever its parse trips over.
    digests = state.get("sha256") or {}
    if not isinstance(digests, dict):
        raise CheckpointError(f"{ckpt}: {STATE} has a malformed sha256 entry")
    for name in (MODEL, OPTIM):
        if name in digests and _sha256(ckpt / name) != digests[name]:
            raise CheckpointError(f"{ckpt}: {name} is corrupted (its SHA-256 differs from the one in {STATE})")
    try:
        model = load_file(str(ckpt / MODEL))
        optim = load_file(str(ckpt / OPTIM))
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{ckpt}: damaged checkpoint ({exc})") from None
    except Exception as exc:  # safetensors raises its own error type on a corrupt header
        raise CheckpointError(f"{ckpt}: damaged checkpoint ({type(exc).__name__}: {exc})") from None
    return model, optim, state, ckpt


def load_weights(module: torch.nn.Module, tensors: dict, prefix: str = "", where: str = "checkpoint") -> None:
    """Strict load: every key present with its exact shape, or a clear error (no partial loads)."""
    own = module.state_dict()
    got = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    missing = sorted(set(own) - set(got))
    unexpected = sorted(set(got) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{where} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, v in got.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(f"{where}: {prefix}{k} has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}")
    module.load_state_dict(got, strict=True)
