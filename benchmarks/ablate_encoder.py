"""Representation ablations on HAPT (issue 17, part 3): what moves the encoder's probe.

Each trained variant is the demo's pretraining recipe (``small``, B = 64, lr 1e-3, EMA 0.999,
encoder-side augmentation, logit-normal t) with one thing changed, trained for ``--steps`` steps
with every ``--seeds`` seed, then probed on held-out subjects: linear probe with all labels, and
with 1 and 5 labelled windows per class (``--draws`` draws each), and its reconstruction error
(x -> z -> 8 Euler steps, every test window, from noise and from x0 = 0). Rows read the raw
weights; three rows need no training of their own: "EMA" probes the baseline run's EMA weights,
"z from pooled features" probes the baseline encoder before its output projection, and
"random-init" probes untrained encoders.

    python benchmarks/ablate_encoder.py --out /tmp/ablate --steps 1000 --seeds 0 1
    python benchmarks/ablate_encoder.py --out /tmp/ablate --table benchmarks/results/ablate-encoder-avx2/README.md

Training resumes where it stopped and finished variants are not retrained (scores are cached in
each run's folder), so the command can be repeated or interrupted.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from flowfm_fast.data import AugmentConfig
from flowfm_fast.datasets import load_bundle
from flowfm_fast.eval import probe_per_class, probe_scores
from flowfm_fast.models import get_config
from flowfm_fast.models.configs import EncoderConfig
from flowfm_fast.train import TrainConfig, build_model, train_flowfm

PER_CLASS = (1, 5)
BASE_ENCODER = EncoderConfig()

# name -> (model config overrides, train config overrides, gyro)
VARIANTS = {
    "baseline (demo recipe)": ({}, {}, False),
    "+ gyroscope (6 channels)": ({"channels": 6}, {}, True),
    "encoder 2x wider": ({"encoder": dataclasses.replace(BASE_ENCODER, widths=(64, 128, 256))}, {}, False),
    "encoder 2x deeper": ({"encoder": dataclasses.replace(BASE_ENCODER, blocks_per_stage=2)}, {}, False),
    "no augmentation": ({}, {"augment": AugmentConfig(enabled=False)}, False),
    "stronger augmentation": ({}, {"augment": AugmentConfig(max_angle_deg=60.0, scale_low=0.6, scale_high=1.4,
                                                             jitter_std=0.1)}, False),
    "generator rebuilds the augmented window": ({}, {"augment": AugmentConfig(target="augmented")}, False),
    "z from 4 time segments": ({"encoder": dataclasses.replace(BASE_ENCODER, pool_segments=4)}, {}, False),
    "z from 8 time segments": ({"encoder": dataclasses.replace(BASE_ENCODER, pool_segments=8)}, {}, False),
    "no augmentation, z from 8 time segments": ({"encoder": dataclasses.replace(BASE_ENCODER, pool_segments=8)},
                                                {"augment": AugmentConfig(enabled=False)}, False),
}


class _Pooled(torch.nn.Module):
    """An encoder read before its output projection (the pooled features)."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, x):
        return self.encoder.features(x)


def _scores(encoder, bundle, draws, model=None) -> dict:
    full = probe_scores(encoder, bundle.train, bundle.test, 1.0, (0,))[0]
    few = probe_per_class(encoder, bundle.train, bundle.test, PER_CLASS, draws)
    out = {"100%": [full], **{f"{k}/class": v for k, v in few.items()}}
    if model is not None:   # reconstruction x -> z -> 8 Euler steps of every test window, standardised units
        x = torch.from_numpy(bundle.test.x)
        with torch.no_grad():
            r = model.eval().reconstruct(x, 8, "euler", generator=torch.Generator().manual_seed(0))
            r0 = model.reconstruct(x, 8, "euler", temperature=0.0)   # deterministic, from x0 = 0
        out["recon"] = [float(torch.mean((r - x) ** 2))]
        out["recon_det"] = [float(torch.mean((r0 - x) ** 2))]
    return out


def run_variant(name: str, seed: int, steps: int, out: Path, draws: int) -> dict:
    """Train (or resume) one variant with one seed and return its rows' scores (cached)."""
    run = out / name.replace(" ", "_").replace("/", "_") / f"seed{seed}"
    cached = run / "scores.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    cfg_over, train_over, gyro = VARIANTS[name]
    cfg = get_config("small", **cfg_over)
    bundle = load_bundle("hapt", gyro=gyro)
    tc = TrainConfig(steps=steps, batch_size=64, lr=1e-3, warmup_steps=100, ckpt_every=max(1, steps // 4),
                     seed=seed, ema_decay=0.999, **{"augment": AugmentConfig(), **train_over})
    res = train_flowfm(cfg, bundle.pretrain.x, tc, run, bundle.standardizer, resume=True, device="cpu",
                       progress=True)
    seconds = res.seconds   # includes the time before a resume (from the checkpoint)
    # Every row reads the raw weights: an EMA of decay 0.999 still carries e^-1 of the random init
    # after 1,000 steps, so at these budgets it measures the average's lag, not the variant.
    rows = {name: _scores(res.model.encoder, bundle, draws, res.model)}
    if name.startswith("baseline"):
        rows["EMA 0.999 weights (baseline run)"] = _scores(res.ema.encoder, bundle, draws, res.ema)
        rows["z from pooled features (baseline run)"] = _scores(_Pooled(res.model.encoder), bundle, draws)
    result = {"rows": rows, "train_seconds": seconds, "steps": res.step}
    cached.write_text(json.dumps(result, indent=1))
    return result


def random_init(seeds, out: Path, draws: int, gyro: bool) -> dict:
    """Scores of untrained ``small`` encoders (one per seed): the floor every pretrained row should clear."""
    # keyed by the seeds too: a later call with more seeds must not reuse a smaller call's rows
    cached = out / f"random_init{'_gyro' if gyro else ''}_seeds{'-'.join(map(str, seeds))}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    bundle = load_bundle("hapt", gyro=gyro)
    cfg = get_config("small", channels=6 if gyro else 3)
    rows = [_scores(build_model(cfg, 1000 + s).encoder, bundle, draws) for s in seeds]
    result = {k: [v for r in rows for v in r[k]] for k in rows[0]}
    cached.write_text(json.dumps(result, indent=1))
    return result


def _cell(xs) -> str:
    xs = np.asarray(xs, dtype=np.float64)
    return f"{xs.mean():.3f}" if len(xs) == 1 else f"{xs.mean():.3f} ± {xs.std(ddof=1):.3f}"


def table(results: dict, steps: int, seeds, draws: int) -> str:
    """Markdown: one row per variant, mean ± sd over seeds (100 %) and over seeds x draws (k/class)."""
    cols = ["100%", *[f"{k}/class" for k in PER_CLASS]]
    base = results.get("baseline (demo recipe)")
    lines = [f"| variant | runs | probe, all labels | " + " | ".join(f"probe, {k} per class" for k in PER_CLASS)
             + " | change vs baseline (all labels) | recon MSE, 8 steps | recon MSE, 8 steps from x0 = 0 |",
             "|---" * (6 + len(PER_CLASS)) + "|"]
    for name, scores in results.items():
        n = len(scores["100%"])
        delta = "-" if base is None or scores is base else f"{np.mean(scores['100%']) - np.mean(base['100%']):+.3f}"
        lines.append(f"| {name} | {n} | " + " | ".join(_cell(scores[c]) for c in cols) + f" | {delta} | "
                     + " | ".join(_cell(scores[c]) if c in scores else "-" for c in ("recon", "recon_det")) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--draws", type=int, default=10)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME")
    p.add_argument("--table", type=Path, help="also write the markdown table here")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    results, seconds = {}, {}
    for name in a.variants:
        for seed in a.seeds:
            r = run_variant(name, seed, a.steps, a.out, a.draws)
            seconds.setdefault(name, []).append(r["train_seconds"])
            for row, scores in r["rows"].items():
                merged = results.setdefault(row, {})
                for col, v in scores.items():
                    merged.setdefault(col, []).extend(v)
    results["random-init encoder (no pretraining)"] = random_init(a.seeds, a.out, a.draws, gyro=False)
    if any(VARIANTS[name][2] for name in a.variants):
        results["random-init encoder, 6 channels"] = random_init(a.seeds, a.out, a.draws, gyro=True)
    (a.out / "results.json").write_text(json.dumps({"steps": a.steps, "seeds": a.seeds, "draws": a.draws,
                                                     "rows": results, "train_seconds": seconds}, indent=1))
    md = table(results, a.steps, a.seeds, a.draws)
    print(md)
    if a.table:
        a.table.parent.mkdir(parents=True, exist_ok=True)
        a.table.write_text(md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
