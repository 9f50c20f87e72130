"""``flowfm-fast``: pretrain, probe, sample, demo.

Errors a user can fix (bad files, bad arguments, damaged checkpoints) print one line and exit 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .data import DataError
from .train import CheckpointError

USER_ERRORS = (DataError, CheckpointError, ValueError, TypeError, FileNotFoundError)


def _add_data_args(p):
    p.add_argument("--data", default="hapt", help="hapt | synthetic | path to .npy/.npz windows (B, C, L)")
    p.add_argument("--test-data", default=None, help="labelled held-out .npz (with --data PATH)")
    p.add_argument("--gyro", action="store_true", help="HAPT: add the 3 gyroscope channels")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available")
    return torch.device(name)


def cmd_pretrain(a) -> int:
    from .datasets import load_bundle
    from .models import get_config
    from .train import TrainConfig, train_flowfm
    from .data import AugmentConfig
    b = load_bundle(a.data, None, a.gyro)
    cfg = get_config(a.config, velocity=a.velocity, channels=b.pretrain.x.shape[1])
    tc = TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, ema_decay=a.ema, seed=a.seed,
                     warmup_steps=min(a.warmup, max(1, a.steps // 10)), ckpt_every=a.ckpt_every,
                     max_minutes=a.max_minutes, augment=AugmentConfig(enabled=not a.no_augment))
    res = train_flowfm(cfg, b.pretrain.x, tc, a.out, b.standardizer, resume=a.resume, device=_device(a.device),
                       progress=not a.quiet, extra_state={"channels": list(b.channels), "classes": list(b.classes)})
    print(json.dumps({"step": res.step, "seconds": round(res.seconds, 1), "loss": res.last_loss,
                      "checkpoint": str(res.checkpoint)}))
    return 0


def run_probe(model, bundle, fractions=(1.0,), seeds=(0,), device="cpu") -> dict:
    from .eval import encode_windows, label_subset, linear_probe
    if bundle.train is None or bundle.test is None:
        raise DataError("the probe needs labelled train and test windows (HAPT, synthetic, or --data with y and --test-data)")
    ftr = encode_windows(model.encoder, bundle.train.x, device=device)
    fte = encode_windows(model.encoder, bundle.test.x, device=device)
    out = {}
    for frac in fractions:
        scores = []
        for seed in (seeds if frac < 1.0 else seeds[:1]):
            idx = label_subset(bundle.train.y, frac, seed)
            scores.append(linear_probe(ftr[idx], bundle.train.y[idx], fte, bundle.test.y)["macro_f1"])
        out[str(frac)] = scores
    return out


def cmd_probe(a) -> int:
    from .datasets import load_bundle
    from .train import load_trained
    dev = _device(a.device)
    model, std, _ = load_trained(a.ckpt, dev)
    b = load_bundle(a.data, a.test_data, a.gyro, standardizer=std, length=model.cfg.length)
    res = run_probe(model, b, tuple(a.label_fraction), tuple(range(a.seeds)), dev)
    print(json.dumps({"linear_probe_macro_f1": res}))
    return 0


def gaussian_z(z: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Draws from a Gaussian fitted to encoded windows: new conditions for unconditional-style generation."""
    rng = np.random.default_rng(seed)
    cov = np.cov(z, rowvar=False) + 1e-5 * np.eye(z.shape[1])
    return rng.multivariate_normal(z.mean(0), cov, size=n).astype(np.float32)


def spread_indices(y, n: int, total: int) -> np.ndarray:
    """Up to n of ``total`` window indices, taking the classes in turn (the first n without labels)."""
    if y is None or (y < 0).all():
        return np.arange(min(n, total))
    per_class = [np.flatnonzero(y == c) for c in np.unique(y[y >= 0])]
    picks = [idx[i] for i in range(max(map(len, per_class))) for idx in per_class if i < len(idx)]
    return np.asarray(picks[:n])


def sample_and_plot(model, bundle, out_npz: Path, n: int, steps: int, method: str, seed: int, device="cpu") -> dict:
    from .eval import encode_windows
    from .plots import plot_windows
    src = bundle.test if bundle.test is not None else bundle.pretrain
    x_real = src.x[spread_indices(src.y, n, len(src))]
    gen = torch.Generator(device=device).manual_seed(seed)
    xr = torch.from_numpy(x_real).to(device)
    t0 = time.perf_counter()
    recon = model.reconstruct(xr, steps, method, generator=gen).cpu().numpy()
    t_recon = time.perf_counter() - t0
    z_pool = encode_windows(model.encoder, bundle.pretrain.x[:2048], device=device)
    z_new = torch.from_numpy(gaussian_z(z_pool, n, seed)).to(device)
    generated = model.sample(z_new, steps, method, generator=gen).cpu().numpy()
    std = bundle.standardizer
    real_u, recon_u, gen_u = std.invert(x_real), std.invert(recon), std.invert(generated)
    out_npz = Path(out_npz)
    out_npz.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out_npz, real=real_u, reconstructed=recon_u, generated=gen_u, steps=steps, method=method)
    png_recon = plot_windows(out_npz.with_name(out_npz.stem + "_reconstructed.png"),
                             {"real": real_u, "reconstructed": recon_u}, bundle.channels)
    png_gen = plot_windows(out_npz.with_name(out_npz.stem + "_generated.png"),
                           {"real": real_u, "generated": gen_u}, bundle.channels)
    mse = float(np.mean((recon - x_real) ** 2))
    return {"npz": str(out_npz), "png_reconstructed": str(png_recon), "png_generated": str(png_gen),
            "recon_mse_standardised": mse, "recon_seconds": t_recon, "n": n, "steps": steps, "method": method}


def cmd_sample(a) -> int:
    from .datasets import load_bundle
    from .integrate import METHODS
    from .train import load_trained
    if a.method not in METHODS:
        raise ValueError(f"--method must be one of {METHODS}")
    if a.n < 1 or a.steps < 1:
        raise ValueError("--n and --steps must be >= 1")
    dev = _device(a.device)
    model, std, _ = load_trained(a.ckpt, dev)
    b = load_bundle(a.data, a.test_data, a.gyro, standardizer=std, length=model.cfg.length)
    print(json.dumps(sample_and_plot(model, b, Path(a.out), a.n, a.steps, a.method, a.seed, dev)))
    return 0


def cmd_demo(a) -> int:
    from .demo import run_demo
    report = run_demo(Path(a.out), quick=a.quick, minutes=a.minutes, device=_device(a.device), seed=a.seed)
    print(f"report written to {report}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .integrate import METHODS
    from .models import CONFIG_NAMES
    p = argparse.ArgumentParser(prog="flowfm-fast", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("pretrain", help="joint FlowFM pretraining")
    _add_data_args(q)
    q.add_argument("--config", default="small", choices=CONFIG_NAMES)
    q.add_argument("--velocity", default="dit", choices=("dit", "resnet"))
    q.add_argument("--steps", type=int, default=2000)
    q.add_argument("--batch-size", type=int, default=64)
    q.add_argument("--lr", type=float, default=1e-3)
    q.add_argument("--warmup", type=int, default=100)
    q.add_argument("--ema", type=float, default=0.999, help="EMA decay (0 = off); evaluation uses the EMA weights")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--ckpt-every", type=int, default=250)
    q.add_argument("--max-minutes", type=float, default=None)
    q.add_argument("--no-augment", action="store_true")
    q.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    q.add_argument("--out", default="runs/pretrain")
    q.add_argument("--device", default="auto")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(fn=cmd_pretrain)

    q = sub.add_parser("probe", help="linear probe of a pretrained encoder (macro-F1)")
    _add_data_args(q)
    q.add_argument("--ckpt", required=True, help="run directory or checkpoint")
    q.add_argument("--label-fraction", type=float, nargs="+", default=[1.0])
    q.add_argument("--seeds", type=int, default=3)
    q.add_argument("--device", default="auto")
    q.set_defaults(fn=cmd_probe)

    q = sub.add_parser("sample", help="reconstruct and generate windows (.npz + PNGs)")
    _add_data_args(q)
    q.add_argument("--ckpt", required=True)
    q.add_argument("--n", type=int, default=8)
    q.add_argument("--steps", type=int, default=8)
    q.add_argument("--method", default="euler", choices=METHODS)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", default="runs/samples/samples.npz")
    q.add_argument("--device", default="auto")
    q.set_defaults(fn=cmd_sample)

    q = sub.add_parser("demo", help="the main job: pretrain on HAPT, evaluate against baselines, sample, report")
    q.add_argument("--out", default="runs/demo")
    q.add_argument("--minutes", type=float, default=10.0, help="pretraining wall-time cap")
    q.add_argument("--quick", action="store_true", help="tiny config on synthetic data (seconds; for tests)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", default="auto")
    q.set_defaults(fn=cmd_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except USER_ERRORS as exc:
        print(f"flowfm-fast {args.cmd}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
