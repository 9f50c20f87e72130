"""Where the reconstruction error of x -> z -> K-step sample comes from, per activity.

Issue 16's bar is the mean squared error of a reconstruction x -> z -> 8 Euler steps in
standardised units. Started from fresh noise x0 ~ N(0, I), it is a draw from p(x | z) independent
of x, whose error is twice the conditional variance Var(x | z) plus the squared bias; started from
x0 = 0 (deterministic), it lands near E[x | z] and errs by about Var(x | z) plus the bias. Either
way it says how much of a window z pins down. This script separates the parts on held-out HAPT
windows:

- one reconstruction from noise (temperature 1) and the same solve from scaled noise (0.5, and 0:
  the deterministic solve);
- the mean of ``--draws`` reconstructions (an estimate of E[x | z]: what z alone determines);
- Var(x | z) estimated from those draws;
- the error after the best time shift within +-``--max-shift`` samples (how much is lost phase);
- each window's own variance (the error of predicting zeros).

    python benchmarks/recon_diagnosis.py --ckpt runs/demo/pretrain --out benchmarks/results/recon-diagnosis
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from flowfm_fast.datasets import load_bundle
from flowfm_fast.train import load_trained


def per_window(r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return ((r - x) ** 2).mean(dim=(1, 2))


def best_shift(r: torch.Tensor, x: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Per-window MSE minimised over time shifts of ``r`` against ``x`` (overlapping part only)."""
    L = x.shape[-1]
    best = per_window(r, x)
    for s in range(-max_shift, max_shift + 1):
        if s:
            best = torch.minimum(best, per_window(r[..., max(0, s):L + min(0, s)], x[..., max(0, -s):L - max(0, s)]))
    return best


@torch.no_grad()
def diagnose(ckpt, steps: int = 8, draws: int = 8, max_shift: int = 60, seed: int = 0) -> dict:
    model, std, _ = load_trained(ckpt, "cpu")
    model.eval()
    b = load_bundle("hapt", standardizer=std, length=model.cfg.length)
    x, y = torch.from_numpy(b.test.x), torch.from_numpy(b.test.y)
    g = torch.Generator().manual_seed(seed)
    z = model.encode(x)
    x0 = torch.randn(x.shape, generator=g)
    one = {tau: model.sample(z, steps, "euler", x0=tau * x0) for tau in (1.0, 0.5, 0.0)}
    many = torch.stack([one[1.0]] + [model.sample(z, steps, "euler", x0=torch.randn(x.shape, generator=g))
                                     for _ in range(draws - 1)])
    mean = many.mean(0)
    rows = {
        "one reconstruction, noise temperature 1 (a draw of p(x given z))": per_window(one[1.0], x),
        "one reconstruction, temperature 0.5": per_window(one[0.5], x),
        "one reconstruction, temperature 0 (deterministic, from x0 = 0)": per_window(one[0.0], x),
        f"mean of {draws} reconstructions (an estimate of E[x given z])": per_window(mean, x),
        f"temperature 1, best shift within +-{max_shift} samples": best_shift(one[1.0], x, max_shift),
        f"Var(x given z) from {draws} draws": ((many - mean) ** 2).mean(dim=(0, 2, 3)) * draws / (draws - 1),
        "the window's own variance (predicting zeros)": (x ** 2).mean(dim=(1, 2)),
    }
    classes = list(b.classes)
    return {"ckpt": str(ckpt), "steps": steps, "draws": draws, "windows": len(x),
            "counts": {c: int((y == i).sum()) for i, c in enumerate(classes)},
            "rows": {name: {"all": float(v.mean()), **{c: float(v[y == i].mean()) for i, c in enumerate(classes)}}
                     for name, v in rows.items()}}


def table(result: dict) -> str:
    classes = list(result["counts"])
    lines = ["| MSE, standardised units | all | " + " | ".join(f"{c} ({result['counts'][c]})" for c in classes) + " |",
             "|---" * (len(classes) + 2) + "|"]
    for name, r in result["rows"].items():
        lines.append(f"| {name} | " + " | ".join(f"{r[k]:.3f}" for k in ["all", *classes]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--draws", type=int, default=8)
    p.add_argument("--max-shift", type=int, default=60)
    p.add_argument("--out", type=Path, help="write results.json and table.md here")
    a = p.parse_args(argv)
    if a.draws < 2 or a.steps < 1 or a.max_shift < 0:
        p.error("--draws must be >= 2, --steps >= 1, --max-shift >= 0")
    result = diagnose(a.ckpt, a.steps, a.draws, a.max_shift)
    md = table(result)
    print(md)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "results.json").write_text(json.dumps(result, indent=1))
        (a.out / "table.md").write_text(md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
