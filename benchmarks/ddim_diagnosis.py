"""Why does DDIM on a trained eps-network get worse with more steps? (issue 16, part 1)

Given a DDPM-objective run (``flowfm-fast pretrain --objective ddpm``), measures on held-out
HAPT windows:

1. the network's noise-prediction error by timestep k: E|eps_hat - eps|^2 and the x0_hat error
   it implies, (1 - abar) / abar * E|eps_hat - eps|^2;
2. DDIM trajectories x -> z -> K steps for several K, spacings and with/without x0 clipping:
   per step the x0_hat error against the window that z encodes, the share of clipped entries and
   the rms of x; the final reconstruction MSE and rms.

    python benchmarks/ddim_diagnosis.py --ckpt runs/ddpm --out benchmarks/results/ddim-diagnosis
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from flowfm_fast.datasets import load_bundle
from flowfm_fast.models import diffusion
from flowfm_fast.train import load_trained

KS = (1, 2, 3, 5, 10, 20, 50, 100, 200, 300, 500, 700, 800, 900, 950, 980, 990, 1000)


@torch.no_grad()
def eps_error_by_k(model, x, seed=0):
    sch, g = model.schedule, torch.Generator().manual_seed(seed)
    z = model.encode(x)
    rows = []
    for k in KS:
        kk = torch.full((x.shape[0],), k, dtype=torch.long)
        eps = torch.randn(x.shape, generator=g)
        x_k = sch.q_sample(x, kk, eps)
        out = model.velocity(x_k, sch.t_net(kk).float(), z)
        a = float(sch.alpha_bar[k])
        x0, e = diffusion._x0_eps(out, x_k, a, model.cfg.prediction, None)
        rows.append({"k": k, "abar": a, "eps_mse": float(((e - eps) ** 2).mean()),
                     "x0_mse": float(((x0 - x) ** 2).mean()), "eps_hat_rms": float(e.pow(2).mean().sqrt())})
    return rows


@torch.no_grad()
def ddim_trace(model, x, K, spacing, clip, seed=0):
    """DDIM as diffusion.ddim_sample does it, recording every step."""
    sch = model.schedule
    z = model.encode(x)
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(x.shape, generator=g)
    ks = sch.timesteps(K, spacing)
    ab = sch.alpha_bar
    steps = []
    for k, kp in zip(ks[:-1], ks[1:]):
        a, ap = float(ab[k]), float(ab[kp])
        t = sch.t_net(torch.full((x.shape[0],), k)).float()
        out = model.velocity(xs, t, z)
        x0, _ = diffusion._x0_eps(out, xs, a, model.cfg.prediction, None)
        clipped = float((x0.abs() > clip).float().mean()) if clip is not None else 0.0
        x0, e = diffusion._x0_eps(out, xs, a, model.cfg.prediction, clip)
        steps.append({"k": k, "x0_hat_mse": float(((x0 - x) ** 2).mean()), "clipped": clipped,
                      "x_rms": float(xs.pow(2).mean().sqrt())})
        xs = math.sqrt(ap) * x0 + math.sqrt(max(0.0, 1 - ap)) * e
    return {"K": K, "spacing": spacing, "clip": clip, "recon_mse": float(((xs - x) ** 2).mean()),
            "out_rms": float(xs.pow(2).mean().sqrt()), "steps": steps}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--out", default="runs/ddim-diagnosis")
    a = p.parse_args(argv)
    model, _, _ = load_trained(a.ckpt)
    if model.schedule is None:
        raise SystemExit("--ckpt must be a run trained with --objective ddpm")
    bundle = load_bundle("hapt")
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(len(bundle.test), size=min(a.n, len(bundle.test)), replace=False))
    x = torch.from_numpy(np.ascontiguousarray(bundle.test.x[idx]))
    clip = float(np.abs(bundle.pretrain.x).max())
    out = {"ckpt": a.ckpt, "prediction": model.cfg.prediction, "eps_error_by_k": eps_error_by_k(model, x),
           "traces": []}
    for K in (10, 50, 100):
        for spacing in diffusion.SPACINGS:
            for c in (clip, None):
                tr = ddim_trace(model, x, K, spacing, c)
                out["traces"].append(tr)
                print(f"K={K:4d} {spacing:8s} clip={c}: recon {tr['recon_mse']:.3f} rms {tr['out_rms']:.3f}")
    for r in out["eps_error_by_k"]:
        print(f"k={r['k']:5d} abar={r['abar']:.2e} eps_mse={r['eps_mse']:.4f} x0_mse={r['x0_mse']:.4g} "
              f"eps_hat_rms={r['eps_hat_rms']:.3f}")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "diagnosis.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
