"""``flowfm-fast``: pretrain, probe, sample, compare, demo, profile.

Errors a user can fix (bad files, bad arguments, damaged checkpoints) print one line and exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from ._malloc import tune_cpu_allocator
from .data import AugmentConfig, DataError
from .datasets import load_bundle
from .integrate import METHODS
from .models import CONFIG_NAMES, get_config
from .models.coupling import COUPLINGS
from .models.diffusion import PREDICTIONS, SPACINGS
from .models.flowfm import DDPM_METHODS
from .profiling import run_profile
from .train import CheckpointError, TrainConfig, build_model, read_grids, write_grids, current_world, init_from_env, load_trained, train_flowfm

# The top of the CLI layer: it may import every module of the package (tests/test_imports.py
# writes the layer order down). flowfm_fast.eval, .compare and .demo are imported inside the
# commands that use them: they pull in scikit-learn and scipy, which `--help`, pretrain and
# profile do not need and which cost start-up time.

# What input validation raises (the data and checkpoint loaders, configs, argument checks) and what a
# bad path the user gave raises. Anything else is a bug and keeps its traceback.
USER_ERRORS = (DataError, CheckpointError, ValueError, TypeError, FileNotFoundError, NotADirectoryError,
               IsADirectoryError, PermissionError)


def _add_data_args(p):
    p.add_argument("--data", default="hapt", help="hapt | synthetic | path to .npy/.npz windows (B, C, L)")
    p.add_argument("--test-data", default=None, help="labelled held-out .npz (with --data PATH)")
    p.add_argument("--gyro", action="store_true", help="HAPT: add the 3 gyroscope channels")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available")
    try:
        return torch.device(name)
    except RuntimeError:  # torch's message for an unknown device type lists every backend it knows
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None


def cmd_pretrain(a) -> int:
    b = load_bundle(a.data, None, a.gyro, length=None)
    try:
        cfg = get_config(a.config, velocity=a.velocity, objective=a.objective, channels=b.pretrain.x.shape[1],
                         length=b.pretrain.x.shape[2], coupling=a.coupling, prediction=a.prediction)
    except ValueError as exc:  # the windows' shape does not fit the model config
        raise DataError(f"{a.data}: windows of shape {b.pretrain.x.shape[1:]} do not fit --config {a.config}: {exc}") from None
    tc = TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, ema_decay=a.ema, seed=a.seed,
                     warmup_steps=min(a.warmup, max(1, a.steps // 10)), ckpt_every=a.ckpt_every, log_every=a.log_every,
                     max_minutes=a.max_minutes, augment=AugmentConfig(enabled=not a.no_augment, target=a.augment_target))
    # Under torchrun (WORLD_SIZE > 1) every process joins one DDP group; alone, nothing changes.
    device, joined = init_from_env(_device(a.device))
    world = current_world()
    try:
        res = train_flowfm(cfg, b.pretrain.x, tc, a.out, b.standardizer, resume=a.resume, device=device,
                           progress=not a.quiet, extra_state={"channels": list(b.channels), "classes": list(b.classes)},
                           cuda_graph=a.cuda_graph)
    finally:
        if joined:
            torch.distributed.destroy_process_group()
    if world.is_main:
        print(json.dumps({"step": res.step, "seconds": round(res.seconds, 1), "loss": res.last_loss,
                          "checkpoint": str(res.checkpoint)}))
    return 0


def cmd_probe(a) -> int:
    from .eval import finetune, finetune_per_class, label_subset, probe_per_class, probe_scores   # lazy: scikit-learn
    dev = _device(a.device)
    model, std, _ = load_trained(a.ckpt, dev)
    b = load_bundle(a.data, a.test_data, a.gyro, standardizer=std, length=model.cfg.length)
    if b.train is None or b.test is None:
        raise DataError("the probe needs labelled train and test windows (HAPT, synthetic, or --data with y "
                        "and --test-data)")
    if a.seeds < 1:
        raise ValueError("--seeds must be >= 1")
    if a.draws < 1 or any(k < 1 for k in a.per_class):
        raise ValueError("--draws and every --per-class value must be >= 1")
    if a.random_init < 0 or a.finetune_steps < 1:
        raise ValueError("--random-init must be >= 0 and --finetune-steps >= 1")
    res = {str(frac): probe_scores(model.encoder, b.train, b.test, frac, tuple(range(a.seeds)), dev)
           for frac in a.label_fraction}
    def summary(scores: dict) -> dict:
        return {k: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}
                for k, v in scores.items()}
    report = {"linear_probe_macro_f1": res, "summary": summary(res)}
    if a.per_class:
        shots = {str(k): v for k, v in probe_per_class(model.encoder, b.train, b.test, a.per_class, a.draws, dev).items()}
        report.update(per_class_macro_f1=shots, per_class_summary=summary(shots))
    seeds = tuple(range(a.seeds))
    # Baselines on the same label draws: the probe of random-init encoders of the run's config, and
    # fine-tuning the pretrained encoder against supervised training from scratch; each is reported
    # as the pretrained probe is ("summary" per label fraction, "per_class_summary" per k).
    if a.random_init:
        encoders = [build_model(model.cfg, 1000 + i).encoder.to(dev) for i in range(a.random_init)]
        fracs = {str(f): [v for e in encoders for v in probe_scores(e, b.train, b.test, f, seeds, dev)]
                 for f in a.label_fraction}
        shots = {str(k): [v for e in encoders for v in probe_per_class(e, b.train, b.test, (k,), a.draws, dev)[k]]
                 for k in a.per_class}
        report["random_init_probe"] = {"encoders": a.random_init, "summary": summary(fracs),
                                       "per_class_summary": summary(shots)}
    if a.finetune:
        n_cls, mean, sd = len(b.classes), b.standardizer.mean, b.standardizer.std
        for name, make in (("finetune", lambda s: model.encoder),
                           ("scratch", lambda s: build_model(model.cfg, 3000 + s).encoder)):
            fracs = {str(f): [finetune(make(s), b.train.x[idx], b.train.y[idx], b.test.x, b.test.y, n_cls, mean, sd,
                                       steps=a.finetune_steps, seed=s, device=dev)["macro_f1"]
                              for s in (seeds if f < 1.0 else seeds[:1]) for idx in [label_subset(b.train.y, f, s)]]
                     for f in a.label_fraction}
            shots = {str(k): v for k, v in finetune_per_class(make, b.train, b.test, n_cls, mean, sd, a.per_class,
                                                              a.draws, a.finetune_steps, dev).items()}
            report[name] = {"steps": a.finetune_steps, "summary": summary(fracs), "per_class_summary": summary(shots)}
    if a.seeds > 1 and any(frac >= 1.0 for frac in a.label_fraction):
        report["note"] = ("fraction 1.0 uses every labelled window, so its probe has one score; --seeds draws "
                          "the label subsets of fractions below 1.0")
    print(json.dumps(report))
    return 0


def cmd_sample(a) -> int:
    from .eval.samples import sample_and_plot   # lazy: scikit-learn (see the note at the imports)
    if a.method is not None and a.method not in METHODS + DDPM_METHODS:
        raise ValueError(f"--method must be one of {METHODS + DDPM_METHODS}")
    if a.n < 1 or a.steps < 1:
        raise ValueError("--n and --steps must be >= 1")
    dev = _device(a.device)
    model, std, _ = load_trained(a.ckpt, dev)
    method = a.method or ("ddim" if model.cfg.objective == "ddpm" else "euler")
    grid = None
    if a.grid == "optimal":
        if model.cfg.objective != "fm":
            raise ValueError("--grid optimal applies to flow-matching runs; a ddpm run takes --spacing")
        grid = saved_grid(a.ckpt, method, a.steps)
    if a.spacing is not None and model.cfg.objective != "ddpm":
        raise ValueError("--spacing applies to ddpm runs (ddim / ddpm samplers)")
    b = load_bundle(a.data, a.test_data, a.gyro, standardizer=std, length=model.cfg.length)
    print(json.dumps(sample_and_plot(model, b, Path(a.out), a.n, a.steps, method, a.seed, dev, graph=a.graph,
                                     grid=grid, spacing=a.spacing)))
    return 0


def cmd_grid(a) -> int:
    for name in ("calib", "candidates"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name} must be >= 1")
    if min(a.steps) < 1 or max(a.steps) > a.candidates:
        raise ValueError(f"--steps must lie in [1, --candidates={a.candidates}], got {a.steps}")
    dev = _device(a.device)
    model, std, _ = load_trained(a.ckpt, dev)
    if model.cfg.objective != "fm":
        raise ValueError(f"--ckpt {a.ckpt}: optimal grids apply to flow-matching runs, this one is "
                         f"objective {model.cfg.objective!r}")
    b = load_bundle(a.data, a.test_data, a.gyro, standardizer=std, length=model.cfg.length)
    rng = np.random.default_rng(a.seed)
    idx = np.sort(rng.choice(len(b.pretrain), size=min(a.calib, len(b.pretrain)), replace=False))
    z = model.encode(torch.from_numpy(np.ascontiguousarray(b.pretrain.x[idx])).to(dev))
    gen = torch.Generator(device=dev).manual_seed(a.seed)
    records = model.optimal_grids(z, sorted(set(a.steps)), a.method, generator=gen, candidates=a.candidates)
    where = write_grids(a.ckpt, {a.method: records})
    print(json.dumps({"saved": str(where), "method": a.method,
                      "grids": {K: {k: r[k] for k in ("grid", "cost", "uniform_cost") if k in r}
                                for K, r in records.items()}}))
    return 0


def cmd_reflow(a) -> int:
    from .train.reflow import ReflowConfig, run_reflow
    cfg = ReflowConfig(pairs=a.pairs, gen_method=a.gen_method, gen_steps=a.gen_steps, steps=a.steps,
                       batch_size=a.batch_size, lr=a.lr, ema_decay=a.ema, seed=a.seed, ckpt_every=a.ckpt_every)
    dev = _device(a.device)
    src, std, _ = load_trained(a.ckpt, "cpu")
    b = load_bundle(a.data, None, a.gyro, standardizer=std, length=src.cfg.length)
    res = run_reflow(a.ckpt, b.pretrain.x, cfg, Path(a.out), dev, resume=a.resume, progress=not a.quiet)
    print(json.dumps(res))
    return 0


def saved_grid(ckpt, method: str, steps: int) -> list[float]:
    """The optimal grid saved with ``ckpt`` for ``method`` and ``steps``, or an error saying how to make it."""
    rec = read_grids(ckpt).get(method, {}).get(str(steps))
    if rec is None:
        raise ValueError(f"--grid optimal: no {steps}-step {method} grid is saved with {ckpt}; make one with "
                         f"flowfm-fast grid --ckpt {ckpt} --steps {steps} --method {method}")
    return rec["grid"]


def cmd_demo(a) -> int:
    from .demo import run_demo   # lazy: scikit-learn, scipy (see the note at the imports)
    report = run_demo(Path(a.out), quick=a.quick, minutes=a.minutes, device=_device(a.device), seed=a.seed)
    print(f"report written to {report}")
    return 0


def cmd_compare(a) -> int:
    from .compare import CompareConfig, run_compare   # lazy: scikit-learn, scipy (see the note at the imports)
    kw = {k: v for k, v in (("config", a.config), ("steps", a.steps), ("evaluations", a.evaluations),
                            ("ddpm_steps", a.ddpm_steps), ("max_minutes", a.max_minutes), ("n_eval", a.n_eval),
                            ("ema", a.ema), ("seed", a.seed), ("reflow_steps", a.reflow_steps),
                            ("ddpm_prediction", a.ddpm_prediction)) if v is not None}
    if a.couplings is not None:
        kw["couplings"] = tuple(a.couplings)
    if a.no_grids:
        kw["grid_steps"] = ()
    if a.no_ddpm_clip:
        kw["ddpm_clip"] = False
    if a.no_augment:
        kw["augment"] = False
    cfg = (CompareConfig.quick(**kw) if a.quick else CompareConfig(**kw)).validate()
    data = a.data or ("synthetic" if a.quick else "hapt")
    report = run_compare(Path(a.out), data, cfg, _device(a.device), progress=not (a.quick or a.quiet))
    print(f"report written to {report}")
    return 0


def cmd_profile(a) -> int:
    for name in ("batch", "steps", "sample_steps", "rows"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if a.warmup < 0:
        raise ValueError("--warmup must be >= 0")
    report = run_profile(Path(a.out), _device(a.device), config=a.config, velocity=a.velocity, batch=a.batch,
                         steps=a.steps, warmup=a.warmup, sample_steps=a.sample_steps, method=a.method, graph=a.graph,
                         rows=a.rows, seed=a.seed)
    print(json.dumps(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flowfm-fast", epilog="Each command's options: flowfm-fast COMMAND --help. User guide: docs/cli.md.",
        description="FlowFM on wearable-sensor windows: pretrain, probe, sample, grid, reflow, compare, demo, profile.")
    sub = p.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("pretrain", help="joint FlowFM pretraining")
    _add_data_args(q)
    q.add_argument("--config", default="small", choices=CONFIG_NAMES)
    q.add_argument("--velocity", default="dit", choices=("dit", "resnet"))
    q.add_argument("--objective", default="fm", choices=("fm", "ddpm"),
                   help="flow matching, or the DDPM counterpart (T=1000, cosine; --prediction) with the same networks")
    q.add_argument("--prediction", default="eps", choices=PREDICTIONS,
                   help="ddpm: the network predicts the noise (eps) or v = sqrt(abar) eps - sqrt(1 - abar) x")
    q.add_argument("--coupling", default="independent", choices=COUPLINGS,
                   help="pairing of noise and windows per batch (flow matching): independent | ot (minibatch "
                        "optimal transport) | wcfm (Gibbs-weighted pairs) | c2ot (condition-aware OT)")
    q.add_argument("--steps", type=int, default=2000)
    q.add_argument("--batch-size", type=int, default=64)
    q.add_argument("--lr", type=float, default=1e-3)
    q.add_argument("--warmup", type=int, default=100)
    q.add_argument("--ema", type=float, default=0.999, help="EMA decay (0 = off); evaluation uses the EMA weights")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--ckpt-every", type=int, default=250)
    q.add_argument("--log-every", type=int, default=25, help="steps between metrics.jsonl records")
    q.add_argument("--max-minutes", type=float, default=None)
    q.add_argument("--no-augment", action="store_true")
    q.add_argument("--augment-target", choices=AugmentConfig.TARGETS, default="clean",
                   help="what the generator rebuilds: the clean window (z learns to ignore the augmented pose) "
                        "or the augmented window the encoder saw (z keeps the pose; see docs/data.md)")
    q.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    q.add_argument("--cuda-graph", action="store_true",
                   help="CUDA, one process: capture the whole training step once as a CUDA graph and replay it")
    q.add_argument("--out", default="runs/pretrain")
    q.add_argument("--device", default="auto")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(fn=cmd_pretrain)

    q = sub.add_parser("probe", help="linear probe of a pretrained encoder (macro-F1)")
    _add_data_args(q)
    q.add_argument("--ckpt", required=True, help="run directory or checkpoint")
    q.add_argument("--label-fraction", type=float, nargs="+", default=[1.0])
    q.add_argument("--seeds", type=int, default=3)
    q.add_argument("--per-class", type=int, nargs="+", default=[],
                   help="also probe with this many labelled windows per class (e.g. 1 2 5 10), --draws draws each")
    q.add_argument("--draws", type=int, default=10, help="random draws of the labelled windows per --per-class value")
    q.add_argument("--random-init", type=int, default=0, metavar="N",
                   help="also probe N random-init encoders of the run's config on the same labels (a baseline)")
    q.add_argument("--finetune", action="store_true",
                   help="also fine-tune the encoder and train one from scratch on the same labels (slow: minutes)")
    q.add_argument("--finetune-steps", type=int, default=100, help="training steps of --finetune (default 100)")
    q.add_argument("--device", default="auto")
    q.set_defaults(fn=cmd_probe)

    q = sub.add_parser("sample", help="reconstruct and generate windows (.npz + PNGs)")
    _add_data_args(q)
    q.add_argument("--ckpt", required=True)
    q.add_argument("--n", type=int, default=8)
    q.add_argument("--steps", type=int, default=8)
    q.add_argument("--method", default=None, choices=METHODS + ("ddim", "ddpm"),
                   help="default: euler (fm models), ddim (ddpm models)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", default="runs/samples/samples.npz")
    q.add_argument("--device", default="auto")
    q.add_argument("--graph", action=argparse.BooleanOptionalAction, default=None,
                   help="replay the K-step solve as one CUDA graph (default: on for CUDA; no effect on CPU)")
    q.add_argument("--grid", default="uniform", choices=("uniform", "optimal"),
                   help="fm runs: uniform steps, or the grid saved for this --method and --steps by flowfm-fast grid")
    q.add_argument("--spacing", default=None, choices=SPACINGS,
                   help="ddpm runs: timestep spacing of ddim / ddpm (default leading)")
    q.set_defaults(fn=cmd_sample)

    q = sub.add_parser("reflow", help="fine-tune a trained fm run's velocity on its own (noise, sample) pairs")
    _add_data_args(q)
    q.add_argument("--ckpt", required=True, help="the trained fm run (its EMA weights generate the pairs)")
    q.add_argument("--pairs", type=int, default=4096, help="(x0, x1_hat, z) triples generated once")
    q.add_argument("--gen-method", default="midpoint", choices=METHODS)
    q.add_argument("--gen-steps", type=int, default=16, help="steps of the teacher's solve per pair")
    q.add_argument("--steps", type=int, default=1000, help="fine-tuning steps")
    q.add_argument("--batch-size", type=int, default=64)
    q.add_argument("--lr", type=float, default=2e-4)
    q.add_argument("--ema", type=float, default=0.999, help="EMA decay (0 = off)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--ckpt-every", type=int, default=250)
    q.add_argument("--resume", action="store_true", help="continue from the reflow run's latest checkpoint")
    q.add_argument("--out", default="runs/reflow")
    q.add_argument("--device", default="auto")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(fn=cmd_reflow)

    q = sub.add_parser("grid", help="choose K-step time grids for a trained fm run (BOSS) and save them with it")
    _add_data_args(q)
    q.add_argument("--ckpt", required=True, help="run directory or checkpoint (the grids are saved into it)")
    q.add_argument("--steps", type=int, nargs="+", default=[4, 8], help="step budgets K")
    q.add_argument("--method", default="euler", choices=METHODS)
    q.add_argument("--calib", type=int, default=128, help="calibration windows (their z condition the solves)")
    q.add_argument("--candidates", type=int, default=64, help="fine candidate grid size N (cost ~ N calls for euler)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", default="auto")
    q.set_defaults(fn=cmd_grid)

    q = sub.add_parser("compare", help="FlowFM (couplings, optimal grids, reflow) vs its DDPM counterpart: time to quality, FID vs NFE, report")
    q.add_argument("--data", default=None, choices=("hapt", "synthetic"),
                   help="hapt | synthetic (default: hapt; synthetic with --quick)")
    q.add_argument("--config", default=None, choices=CONFIG_NAMES, help="default: small (tiny with --quick)")
    q.add_argument("--steps", type=int, default=None, help="training steps per variant (default 2000)")
    q.add_argument("--evaluations", type=int, default=None,
                   help="probe / FID evaluations per variant at evenly spaced steps (default 12)")
    q.add_argument("--couplings", nargs="+", default=None, choices=COUPLINGS,
                   help="FM variants, one training run each (default: all four)")
    q.add_argument("--reflow-steps", type=int, default=None,
                   help="reflow fine-tuning steps of the independent-coupling run (default 1000; 0 skips)")
    q.add_argument("--no-grids", action="store_true", help="skip the optimal (BOSS) Euler grids")
    q.add_argument("--ddpm-prediction", default=None, choices=PREDICTIONS,
                   help="parameterisation of the DDPM counterpart (default v)")
    q.add_argument("--ddpm-steps", type=int, default=None, help="ancestral DDPM chain length (default 1000)")
    q.add_argument("--n-eval", type=int, default=None, help="held-out windows for the generation metrics")
    q.add_argument("--max-minutes", type=float, default=None, help="training wall-time cap per variant")
    q.add_argument("--ema", type=float, default=None, help="EMA decay of both runs (default 0.999; 0 = off)")
    q.add_argument("--no-ddpm-clip", action="store_true",
                   help="do not clip DDPM's predicted clean window to the training data's range")
    q.add_argument("--no-augment", action="store_true",
                   help="train every variant without encoder-side augmentation (z keeps the pose: better "
                        "reconstructions, a slightly weaker probe)")
    q.add_argument("--quick", action="store_true", help="tiny config, synthetic data, few steps (for tests)")
    q.add_argument("--seed", type=int, default=None)
    q.add_argument("--out", default="runs/compare")
    q.add_argument("--device", default="auto")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(fn=cmd_compare)

    q = sub.add_parser("demo", help="the main job: pretrain on HAPT, evaluate against baselines, sample, report")
    q.add_argument("--out", default="runs/demo")
    q.add_argument("--minutes", type=float, default=None,
                   help="optional pretraining wall-time budget (default: none, the full fixed number of steps; "
                        "a run it cuts short says so in its report)")
    q.add_argument("--quick", action="store_true", help="tiny config on synthetic data (seconds; for tests)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", default="auto")
    q.set_defaults(fn=cmd_demo)

    q = sub.add_parser("profile", help="a few training steps and a K-step sampling under torch.profiler "
                                        "(Chrome trace + top-ops table)")
    q.add_argument("--config", default="small", choices=CONFIG_NAMES)
    q.add_argument("--velocity", default="dit", choices=("dit", "resnet"))
    q.add_argument("--batch", type=int, default=64, help="windows per training step and per sampling")
    q.add_argument("--steps", type=int, default=3, help="profiled training steps")
    q.add_argument("--warmup", type=int, default=1, help="unprofiled training steps and samplings first")
    q.add_argument("--sample-steps", type=int, default=8, help="K of the profiled sampling")
    q.add_argument("--method", default="euler", choices=METHODS)
    q.add_argument("--graph", action=argparse.BooleanOptionalAction, default=None,
                   help="sample as one CUDA-graph replay (default: on for CUDA; no effect on CPU)")
    q.add_argument("--rows", type=int, default=30, help="rows per top-ops table")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", default="runs/profile")
    q.add_argument("--device", default="auto")
    q.set_defaults(fn=cmd_profile)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # The CLI owns its process: let the heap keep activation memory (see flowfm_fast._malloc).
    tune_cpu_allocator()
    try:
        return args.fn(args)
    except USER_ERRORS as exc:
        if os.environ.get("FLOWFM_DEBUG", "") not in ("", "0"):
            raise  # the traceback, for telling a validation error from a bug
        print(f"flowfm-fast {args.cmd}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line, as argparse prints its errors."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return "; ".join(lines) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
