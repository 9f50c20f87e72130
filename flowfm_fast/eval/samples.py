"""Reconstructed and generated windows of a trained FlowFM, saved as .npz and PNGs."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..plots import plot_windows
from .probe import encode_windows


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


def sample_and_plot(model, bundle, out_npz: Path, n: int, steps: int, method: str, seed: int, device="cpu",
                    graph: bool | None = None, grid=None, spacing: str | None = None) -> dict:
    """Reconstruct n held-out windows and generate n new ones with ``steps`` steps of ``method``
    (on ``grid`` when given: fm runs; with timestep ``spacing``: ddpm runs); .npz and two PNGs."""
    src = bundle.test if bundle.test is not None else bundle.pretrain
    picked = spread_indices(src.y, n, len(src))
    x_real = src.x[picked]
    titles = None
    if src.y is not None and (src.y[picked] >= 0).all():
        titles = [f"real: {bundle.classes[int(y)]}" if int(y) < len(bundle.classes) else f"real: class {int(y)}"
                  for y in src.y[picked]]
    gen = torch.Generator(device=device).manual_seed(seed)
    xr = torch.from_numpy(x_real).to(device)
    t0 = time.perf_counter()
    kw = dict(generator=gen, graph=graph, grid=grid, spacing=spacing)
    recon = model.reconstruct(xr, steps, method, **kw).cpu().numpy()
    t_recon = time.perf_counter() - t0
    z_pool = encode_windows(model.encoder, bundle.pretrain.x[:2048], device=device)
    z_new = torch.from_numpy(gaussian_z(z_pool, n, seed)).to(device)
    generated = model.sample(z_new, steps, method, **kw).cpu().numpy()
    std = bundle.standardizer
    real_u, recon_u, gen_u = std.invert(x_real), std.invert(recon), std.invert(generated)
    out_npz = Path(out_npz)
    out_npz.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out_npz, real=real_u, reconstructed=recon_u, generated=gen_u, steps=steps, method=method,
             grid=np.asarray(grid if grid is not None else [], dtype=np.float64))
    png_recon = plot_windows(out_npz.with_name(out_npz.stem + "_reconstructed.png"),
                             {"real": real_u, "reconstructed": recon_u}, bundle.channels, titles=titles,
                             note=f"each real window and its reconstruction x -> z -> {steps}-step {method} sample")
    png_gen = plot_windows(out_npz.with_name(out_npz.stem + "_generated.png"),
                           {"real": real_u, "generated": gen_u}, bundle.channels, titles=titles,
                           note="generated windows are NOT paired with the real ones drawn beside them: their z "
                                "are drawn from a Gaussian fitted to encoded windows")
    mse = float(np.mean((recon - x_real) ** 2))
    return {"npz": str(out_npz), "png_reconstructed": str(png_recon), "png_generated": str(png_gen),
            "recon_mse_standardised": mse, "recon_seconds": t_recon, "n": n, "steps": steps, "method": method}
