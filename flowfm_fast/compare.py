"""The paper's comparison: FlowFM against its diffusion counterpart (DDPM, T = 1000, cosine
schedule, eps prediction) with the same data, encoder, network, optimizer and step budget.

Both objectives are trained by the same loop (``train_flowfm``); every ``eval_every_s`` seconds
of training time a callback probes the encoder (linear probe, macro-F1) and measures the
sensor-FID of the model's standard sampler (FM: 16 Euler steps; DDPM: DDIM 50), outside the
training clock. Afterwards: sensor-FID, MMD and reconstruction error versus sampling steps, wall
time per sample, the FM speedup at matched quality, and the representation baselines.

Generated windows are conditioned on z = E(x) of held-out real windows (x -> z -> K-step sample),
so one sampling pass gives both the sensor-FID / MMD against those real windows and the
reconstruction error. Lives at the top of the package beside ``demo`` because it uses train and
eval together.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from .data import AugmentConfig
from .datasets import load_bundle
from .eval import finetune, probe_scores
from .eval.generation import (classifier_f1, frechet_distance_from_features, mmd_rbf,
                              train_feature_classifier, FeatureClassifierConfig)
from .models import get_config
from .plots import save_figure
from .progress import run_jobs
from .train import TrainConfig, build_model, train_flowfm

PAPER = {"training_time_reduction": 0.504, "max_inference_speedup": 51.0}
OBJECTIVES = ("fm", "ddpm")


@dataclass
class CompareConfig:
    config: str = "small"
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    ema: float = 0.999
    max_minutes: float | None = None        # per objective, the same cap for both
    eval_every_s: float = 60.0              # training seconds between probe / FID evaluations
    n_eval: int = 512                       # held-out windows for sensor-FID, MMD and reconstruction
    fm_steps: tuple[int, ...] = (1, 2, 4, 8, 16)
    fm_methods: tuple[str, ...] = ("euler", "midpoint")
    ddim_steps: tuple[int, ...] = (10, 50, 100)
    ddpm_steps: int = 1000                  # ancestral chain length (1000 = full DDPM; fewer respaces it)
    ddpm_clip: bool = True                  # clip DDPM's x0_hat to the training windows' max |x| (clip_denoised)
    standard_fm: tuple[str, int] = ("euler", 16)
    standard_ddpm: tuple[str, int] = ("ddim", 50)
    classifier_steps: int = 600
    classifier_dim: int = 32
    baseline_seeds: tuple[int, ...] = (0, 1, 2)
    supervised_steps: int = 300
    seed: int = 0

    @classmethod
    def quick(cls, **kw) -> "CompareConfig":
        base = dict(config="tiny", steps=30, batch_size=32, ema=0.0, eval_every_s=0.2, n_eval=64,
                    fm_steps=(1, 2, 4), fm_methods=("euler", "midpoint"), ddim_steps=(2, 5), ddpm_steps=20,
                    standard_fm=("euler", 4), standard_ddpm=("ddim", 5), classifier_steps=60, classifier_dim=8,
                    baseline_seeds=(0,), supervised_steps=20)
        base.update(kw)
        return cls(**base)


def machine_description(device) -> str:
    dev = torch.device(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    if dev.type == "cuda":
        desc += f", GPU {torch.cuda.get_device_name(dev)}"
    return f"{desc}; device {dev}; torch {torch.__version__}; {platform.system()} {platform.release()}"


class _Clock:
    """Per-sample wall time of a sampling call (synchronised on CUDA)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def __call__(self, fn):
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if self.cuda:
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0


def generate(model, x_ref: torch.Tensor, method: str, steps: int, seed: int, batch: int = 256,
             clip_x0: float | None = None) -> np.ndarray:
    """x -> z = E(x) -> ``steps``-step sample with ``method``, batch by batch, fixed noise seed."""
    gen = torch.Generator(device=x_ref.device).manual_seed(seed)
    clip = clip_x0 if model.cfg.objective == "ddpm" else None
    outs = [model.reconstruct(x_ref[i:i + batch], steps, method, generator=gen, clip_x0=clip).float().cpu()
            for i in range(0, len(x_ref), batch)]
    return torch.cat(outs).numpy()


def sample_metrics(model, clf, x_ref_np: np.ndarray, f_ref: np.ndarray, method: str, steps: int, seed: int,
                   device, clip_x0: float | None = None) -> dict:
    x_ref = torch.from_numpy(x_ref_np).to(device)
    gen, seconds = _Clock(device)(lambda: generate(model, x_ref, method, steps, seed, clip_x0=clip_x0))
    return {"method": method, "steps": steps,
            "fid": frechet_distance_from_features(f_ref, clf.embed(gen)),
            "mmd": mmd_rbf(x_ref_np, gen),
            "recon_mse": float(np.mean((gen - x_ref_np) ** 2)),
            "ms_per_sample": 1000.0 * seconds / len(x_ref_np)}


def time_to_reach(curve: list[dict], key: str, target: float, higher_is_better: bool) -> float | None:
    """Training seconds of the first evaluation at or past ``target`` (None if never)."""
    for rec in curve:
        v = rec[key]
        if v is not None and math.isfinite(v) and (v >= target if higher_is_better else v <= target):
            return rec["seconds"]
    return None


def fm_speedup(fm_rows: list[dict], ref: dict) -> dict:
    """The fastest FM setting whose sensor-FID is at most ``ref``'s, and its speedup over ``ref``."""
    ok = [r for r in fm_rows if r["fid"] <= ref["fid"]]
    if not ok:
        best = min(fm_rows, key=lambda r: r["fid"])
        return {"reached": False, "ref": ref, "fm": best, "speedup": ref["ms_per_sample"] / best["ms_per_sample"]}
    fm = min(ok, key=lambda r: r["ms_per_sample"])
    return {"reached": True, "ref": ref, "fm": fm, "speedup": ref["ms_per_sample"] / fm["ms_per_sample"]}


def _fmt(v, spec=".3f"):
    if v is None:
        return "not reached"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan"
    return format(v, spec)


def _mean_sd(xs):
    xs = np.asarray(xs, dtype=np.float64)
    return f"{xs.mean():.3f}" if len(xs) == 1 else f"{xs.mean():.3f} ± {xs.std(ddof=1):.3f} (n={len(xs)})"


def run_compare(out, data: str = "hapt", cfg: CompareConfig | None = None, device="cpu",
                progress: bool = True) -> Path:
    """Train both objectives, measure, and write ``out/report.md``, ``results.json`` and PNG plots."""
    cfg = cfg or CompareConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    t_start = time.perf_counter()
    bundle = load_bundle(data)
    if bundle.train is None or bundle.test is None:
        raise ValueError("compare needs labelled train and test windows (hapt or synthetic)")
    tr, te = bundle.train, bundle.test
    rng = np.random.default_rng(cfg.seed)
    ref_idx = np.sort(rng.choice(len(te), size=min(cfg.n_eval, len(te)), replace=False))
    x_ref = np.ascontiguousarray(te.x[ref_idx])
    clip = float(np.abs(bundle.pretrain.x).max()) if cfg.ddpm_clip else None

    # The judge: trained on the real training split only, saved, never the encoder under test.
    clf = train_feature_classifier(
        tr.x, tr.y, len(bundle.classes), out / "feature_classifier", steps=cfg.classifier_steps, seed=cfg.seed,
        mean=bundle.standardizer.mean, std=bundle.standardizer.std, device=device,
        cfg=FeatureClassifierConfig(channels=tr.x.shape[1], classes=len(bundle.classes), feature_dim=cfg.classifier_dim))
    f_ref = clf.embed(x_ref)
    clf_info = {"test_macro_f1": classifier_f1(clf.cpu(), te.x, te.y),
                "real_train_vs_test_fid": frechet_distance_from_features(
                    clf.embed(tr.x[rng.choice(len(tr), size=min(len(x_ref), len(tr)), replace=False)]), f_ref)}
    clf.to(device)

    _warm_up(cfg, bundle, device)
    results: dict = {"config": dataclasses.asdict(cfg), "data": data, "machine": machine_description(device),
                     "feature_classifier": clf_info, "ddpm_clip_x0": clip, "objectives": {}}
    models = {}
    for obj in OBJECTIVES:
        model_cfg = get_config(cfg.config, objective=obj, channels=tr.x.shape[1], length=tr.x.shape[2])
        tc = TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, ema_decay=cfg.ema, seed=cfg.seed,
                         warmup_steps=max(1, min(100, cfg.steps // 10)), ckpt_every=cfg.steps,
                         max_minutes=cfg.max_minutes, augment=AugmentConfig(), log_every=max(1, min(25, cfg.steps)))
        method, k = cfg.standard_fm if obj == "fm" else cfg.standard_ddpm
        curve: list[dict] = []
        next_eval = [cfg.eval_every_s]

        def evaluate(step, seconds, model):
            model.eval()
            # One BLAS thread for the probe, so idle BLAS workers cannot spin on the cores the
            # next training steps need (a precaution: on 2 cores the clock of whichever objective
            # is evaluated more often would pay for it).
            with threadpool_limits(1):
                f1 = probe_scores(model.encoder, tr, te, 1.0, (0,), device)[0]
            fid = sample_metrics(model, clf, x_ref, f_ref, method, k, cfg.seed, device, clip)["fid"]
            curve.append({"step": step, "seconds": seconds, "probe_f1": f1, "fid": fid})

        def callback(step, seconds, model):
            if seconds >= next_eval[0] and step < cfg.steps:
                evaluate(step, seconds, model)
                while next_eval[0] <= seconds:
                    next_eval[0] += cfg.eval_every_s

        run_dir = out / f"train_{obj}"
        res = train_flowfm(model_cfg, bundle.pretrain.x, tc, run_dir, bundle.standardizer, device=device,
                           progress=progress, callback=callback)
        model = res.eval_model.eval()
        evaluate(res.step, res.seconds, model)
        models[obj] = model
        results["objectives"][obj] = {"steps": res.step, "train_seconds": res.seconds,
                                      "seconds_per_step": res.seconds / max(1, res.step), "curve": curve,
                                      "final_probe_f1": curve[-1]["probe_f1"], "final_fid": curve[-1]["fid"],
                                      "standard_sampler": f"{method} {k}"}

    # 1. training time to the same quality
    R = results["objectives"]
    f1_target = min(R[o]["final_probe_f1"] for o in OBJECTIVES) - 0.01
    fid_target = max(R[o]["final_fid"] for o in OBJECTIVES)
    ttq = {}
    for name, key, target, hib in (("probe_f1", "probe_f1", f1_target, True), ("fid", "fid", fid_target, False)):
        t = {o: time_to_reach(R[o]["curve"], key, target, hib) for o in OBJECTIVES}
        ratio = t["fm"] / t["ddpm"] if t["fm"] is not None and t["ddpm"] else None
        ttq[name] = {"target": target, "seconds": t, "fm_over_ddpm": ratio}
    results["time_to_quality"] = ttq

    # 2. quality and wall time versus sampling steps
    jobs = {("fm", m, k): (lambda m=m, k=k: sample_metrics(models["fm"], clf, x_ref, f_ref, m, k, cfg.seed, device))
            for m in cfg.fm_methods for k in cfg.fm_steps}
    jobs[("ddpm", "ddpm", cfg.ddpm_steps)] = lambda: sample_metrics(models["ddpm"], clf, x_ref, f_ref, "ddpm",
                                                                    cfg.ddpm_steps, cfg.seed, device, clip)
    for k in cfg.ddim_steps:
        jobs[("ddpm", "ddim", k)] = (lambda k=k: sample_metrics(models["ddpm"], clf, x_ref, f_ref, "ddim", k,
                                                                cfg.seed, device, clip))
    done = run_jobs(jobs, "sampling sweep (FID per sampler and steps)", progress)
    sweep = {o: [r for (obj, _, _), r in done.items() if obj == o] for o in OBJECTIVES}
    results["sampling"] = sweep

    # 3. FM speedup at matched sensor-FID
    ddpm_full = sweep["ddpm"][0]
    best_ddim = min(sweep["ddpm"][1:], key=lambda r: r["fid"]) if len(sweep["ddpm"]) > 1 else ddpm_full
    results["speedup"] = {"vs_ddpm": fm_speedup(sweep["fm"], ddpm_full), "vs_best_ddim": fm_speedup(sweep["fm"], best_ddim)}

    # 4. representation: final probes and baselines
    model_cfg = get_config(cfg.config, channels=tr.x.shape[1], length=tr.x.shape[2])
    baselines = run_jobs({
        **{("rand", s): (lambda s=s: probe_scores(build_model(model_cfg, 1000 + s).encoder, tr, te, 1.0, (0,),
                                                  device)[0]) for s in cfg.baseline_seeds},
        **{("sup", s): (lambda s=s: finetune(build_model(model_cfg, 2000 + s).encoder, tr.x, tr.y, te.x, te.y,
                                             len(bundle.classes), bundle.standardizer.mean, bundle.standardizer.std,
                                             steps=cfg.supervised_steps, seed=s, device=device)["macro_f1"])
           for s in cfg.baseline_seeds}}, "baselines (random-init probes, supervised training)", progress)
    rand = [baselines[("rand", s)] for s in cfg.baseline_seeds]
    sup = [baselines[("sup", s)] for s in cfg.baseline_seeds]
    results["baselines"] = {"random_init_probe_f1": rand, "supervised_f1": sup}
    results["total_seconds"] = time.perf_counter() - t_start

    plots = _plots(out, results)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    report = out / "report.md"
    report.write_text(_report(results, cfg, data, bundle, plots))
    return report


def _warm_up(cfg: CompareConfig, bundle, device) -> None:
    """A few untimed steps of both objectives first, so neither pays the process's first-call costs
    (extension load, allocator growth, kernel selection) on its clock."""
    x = bundle.pretrain.x[: 4 * cfg.batch_size]
    for obj in OBJECTIVES:
        model_cfg = get_config(cfg.config, objective=obj, channels=x.shape[1], length=x.shape[2])
        tc = TrainConfig(steps=3, batch_size=cfg.batch_size, warmup_steps=1, ckpt_every=1000, seed=cfg.seed)
        with tempfile.TemporaryDirectory() as tmp:
            train_flowfm(model_cfg, x, tc, tmp, bundle.standardizer, device=device, progress=False)


def _plots(out: Path, results: dict) -> dict:
    import matplotlib   # lazy: only the report draws, and matplotlib costs start-up time
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = {"fm": "FlowFM (flow matching)", "ddpm": "DDPM counterpart"}
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for o, rec in results["objectives"].items():
        c = rec["curve"]
        ax.plot([r["seconds"] for r in c], [r["probe_f1"] for r in c], "o-", label=names[o])
    rand = results["baselines"]["random_init_probe_f1"]
    ax.axhline(float(np.mean(rand)), color="gray", ls="--", label="random-init encoder")
    ax.set_xlabel("training wall time (s)")
    ax.set_ylabel("linear-probe macro-F1")
    ax.legend(fontsize=8)
    p1 = save_figure(fig, out / "probe_f1_vs_time.png")

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for o, rows in results["sampling"].items():
        groups: dict[str, list] = {}
        for r in rows:
            groups.setdefault(r["method"], []).append(r)
        for m, rs in groups.items():
            ax.plot([r["ms_per_sample"] for r in rs], [r["fid"] for r in rs], "o-", label=f"{o}: {m}")
            for r in rs:
                ax.annotate(str(r["steps"]), (r["ms_per_sample"], r["fid"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("sampling wall time per window (ms, log)")
    ax.set_ylabel("sensor-FID")
    ax.legend(fontsize=8)
    p2 = save_figure(fig, out / "fid_vs_sampling_time.png")
    return {"probe": p1.name, "fid": p2.name}


def _report(res: dict, cfg: CompareConfig, data: str, bundle, plots: dict) -> str:
    R, ttq, sp = res["objectives"], res["time_to_quality"], res["speedup"]
    ci = res["feature_classifier"]
    L = ["# FlowFM versus its diffusion counterpart", "",
         f"Machine: {res['machine']}.", "",
         f"Data: {data}; {len(bundle.pretrain)} pretraining windows, {len(bundle.train)} labelled train / "
         f"{len(bundle.test)} held-out test windows. Config `{cfg.config}` for both objectives; same encoder, "
         f"network, AdamW (lr {cfg.lr}, batch {cfg.batch_size}, EMA {cfg.ema}), augmentation and "
         f"{cfg.steps} steps. Generation metrics on {min(cfg.n_eval, len(bundle.test))} held-out windows "
         f"(x -> z -> K-step sample). Total {res['total_seconds'] / 60:.1f} min.", "",
         ("DDPM samplers clip the predicted clean window x0_hat to +-" + f"{res['ddpm_clip_x0']:.2f} (the training "
          "windows' largest |x|, standardised), as the reference code's clip_denoised does; unclipped, "
          "eps errors near k = T are amplified by up to 1 / sqrt(abar_T) ~ 2e4."
          if res["ddpm_clip_x0"] is not None else "DDPM samplers do not clip x0_hat (--no-ddpm-clip)."), "",
         *([f"**Warning:** EMA decay {cfg.ema} averages over ~{1 / (1 - cfg.ema):.0f} steps and the run "
            f"has {cfg.steps}: the evaluated (EMA) weights still weigh the initial ones "
            f"{cfg.ema ** cfg.steps:.0%}.", ""] if cfg.ema > 0 and cfg.ema ** cfg.steps > 0.05 else []),
         f"Sensor-FID features: a separately trained ResNet-1D activity classifier ({cfg.classifier_dim}-d "
         f"features, test macro-F1 {ci['test_macro_f1']:.3f}); real train vs real test windows give FID "
         f"{ci['real_train_vs_test_fid']:.3f} (the floor).", "",
         "## Against the paper", "",
         "| claim | paper | ours |", "|---|---|---|"]
    red = ttq["probe_f1"]["fm_over_ddpm"]
    red_fid = ttq["fid"]["fm_over_ddpm"]
    L.append(f"| training time to the same probe F1 | -{100 * PAPER['training_time_reduction']:.1f}% | "
             + (f"{100 * (red - 1):+.1f}%" if red is not None else "not reached") + " |")
    L.append("| training time to the same sensor-FID | - | "
             + (f"{100 * (red_fid - 1):+.1f}%" if red_fid is not None else "not reached") + " |")
    L.append(f"| inference speedup at matched quality | up to {PAPER['max_inference_speedup']:.1f}x | "
             f"{sp['vs_ddpm']['speedup']:.1f}x over DDPM-{cfg.ddpm_steps}"
             + ("" if sp["vs_ddpm"]["reached"] else " (FID not matched)")
             + f", {sp['vs_best_ddim']['speedup']:.1f}x over DDIM-{sp['vs_best_ddim']['ref']['steps']}"
             + ("" if sp["vs_best_ddim"]["reached"] else " (FID not matched)") + " |")
    L += ["", "## 1. Training time to the same quality", "",
          "Targets: probe macro-F1 = lower final F1 - 0.01; sensor-FID = the worse of the two final FIDs "
          "(standard samplers: FM " + R["fm"]["standard_sampler"] + ", DDPM " + R["ddpm"]["standard_sampler"] + ").",
          "", "| quality | target | FM seconds | DDPM seconds | FM / DDPM |", "|---|---|---|---|---|"]
    for name, label in (("probe_f1", "probe macro-F1"), ("fid", "sensor-FID")):
        t = ttq[name]
        L.append(f"| {label} | {t['target']:.3f} | {_fmt(t['seconds']['fm'], '.1f')} | "
                 f"{_fmt(t['seconds']['ddpm'], '.1f')} | {_fmt(t['fm_over_ddpm'])} |")
    L += ["", "| objective | steps | train s | s / step | final probe F1 | final sensor-FID | evaluations |",
          "|---|---|---|---|---|---|---|"]
    for o, r in R.items():
        L.append(f"| {o} | {r['steps']} | {r['train_seconds']:.1f} | {r['seconds_per_step']:.3f} | "
                 f"{r['final_probe_f1']:.3f} | {r['final_fid']:.3f} | {len(r['curve'])} |")
    L += ["", f"![probe F1 vs time]({plots['probe']})", "",
          "## 2. Sensor-FID, MMD and reconstruction versus sampling steps", "",
          "| model | sampler | steps | sensor-FID | MMD^2 | recon MSE | ms / sample |", "|---|---|---|---|---|---|---|"]
    for o, rows in res["sampling"].items():
        for r in rows:
            L.append(f"| {o} | {r['method']} | {r['steps']} | {r['fid']:.3f} | {r['mmd']:.4f} | "
                     f"{r['recon_mse']:.4f} | {r['ms_per_sample']:.3f} |")
    L += ["", f"![sensor-FID vs sampling time]({plots['fid']})", "", "## 3. FM speedup at matched sensor-FID", "",
          "| reference | ref FID | ref ms / sample | FM setting | FM FID | FM ms / sample | speedup | FID matched |",
          "|---|---|---|---|---|---|---|---|"]
    for key in ("vs_ddpm", "vs_best_ddim"):
        s = sp[key]
        L.append(f"| {s['ref']['method']} {s['ref']['steps']} | {s['ref']['fid']:.3f} | {s['ref']['ms_per_sample']:.3f} | "
                 f"{s['fm']['method']} {s['fm']['steps']} | {s['fm']['fid']:.3f} | {s['fm']['ms_per_sample']:.3f} | "
                 f"{s['speedup']:.1f}x | {'yes' if s['reached'] else 'no (best FM shown)'} |")
    b = res["baselines"]
    L += ["", "## 4. Representation: linear probe macro-F1 on held-out subjects", "",
          "| encoder | macro-F1 |", "|---|---|",
          f"| FlowFM (fm) | {R['fm']['final_probe_f1']:.3f} |",
          f"| DDPM counterpart | {R['ddpm']['final_probe_f1']:.3f} |",
          f"| random-init encoder (probe) | {_mean_sd(b['random_init_probe_f1'])} |",
          f"| supervised from scratch (fine-tuned, {cfg.supervised_steps} steps) | {_mean_sd(b['supervised_f1'])} |",
          "", "Wall times are single runs on the machine above; per-sample times divide one batched call by the "
          "number of windows.", ""]
    return "\n".join(L)
