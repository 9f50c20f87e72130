"""The paper's comparison: FlowFM against its diffusion counterpart (DDPM, T = 1000, cosine
schedule) with the same data, encoder, network, optimizer and step budget, and the few-step levers
of the seed papers on the FM side: noise-data couplings (independent, OT, WCFM, C2OT), optimal
step grids (BOSS) and reflow.

Every variant is trained by the same loop (``train_flowfm``) for the same number of steps; at
``evaluations`` evenly spaced steps a callback probes the encoder (linear probe, macro-F1) and
measures the sensor-FID of the variant's standard sampler (FM: 16 Euler steps; DDPM: 50 DDIM
steps), outside the training clock. Afterwards: sensor-FID, MMD and reconstruction error versus
network evaluations (NFE) for every variant and sampler, wall time per sample, the first NFE at
which an FM variant reaches DDPM-1000's sensor-FID and its speedup there (with the spread over
sampling seeds), and the representation baselines.

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
from dataclasses import dataclass
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
from .models.coupling import ASSIGNED, couple
from .models.diffusion import PREDICTIONS, SPACINGS
from .plots import save_figure
from .progress import run_jobs
from .train import TrainConfig, build_model, load_trained, train_flowfm
from .train.reflow import ReflowConfig, run_reflow

PAPER = {"training_time_reduction": 0.504, "max_inference_speedup": 51.0}
DDPM = "ddpm"
REFLOW = "+reflow"
NFE_PER_STEP = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4, "rk4_38": 4, "ddim": 1, "ddpm": 1}


@dataclass
class CompareConfig:
    config: str = "small"
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    ema: float = 0.999
    augment: bool = True                    # encoder-side augmentation (the demo recipe); off keeps pose in z
    max_minutes: float | None = None        # per variant, the same cap for all
    evaluations: int = 12                   # probe / FID evaluations per variant, at evenly spaced steps
    n_eval: int = 512                       # held-out windows for sensor-FID, MMD and reconstruction
    couplings: tuple[str, ...] = ("independent", "ot", "wcfm", "c2ot")   # one FM training run each
    fm_steps: tuple[int, ...] = (1, 2, 4, 8, 16)
    fm_methods: tuple[str, ...] = ("euler", "midpoint")
    grid_steps: tuple[int, ...] = (2, 4, 8)  # optimal (BOSS) Euler grids per FM variant; () skips them
    grid_candidates: int = 64
    grid_calib: int = 128
    reflow_steps: int = 1000                # 0 skips reflow (of the independent-coupling run)
    reflow_pairs: int = 4096
    reflow_fm_steps: tuple[int, ...] = (1, 2, 4, 8)
    ddpm_prediction: str = "v"              # the DDPM counterpart's parameterisation (see report section 5)
    ddim_steps: tuple[int, ...] = (10, 50, 100)
    ddim_spacings: tuple[str, ...] = ("leading", "trailing")
    ddpm_steps: int = 1000                  # ancestral chain length (1000 = full DDPM; fewer respaces it)
    ddpm_clip: bool = True                  # clip DDPM's x0_hat to the training windows' max |x| (clip_denoised)
    standard_fm: tuple[str, int] = ("euler", 16)
    standard_ddpm: tuple[str, int] = ("ddim", 50)
    headline_seeds: tuple[int, ...] = (0, 1, 2)   # sampling seeds of the headline rows (spread)
    classifier_steps: int = 600
    classifier_dim: int = 32
    baseline_seeds: tuple[int, ...] = (0, 1, 2)
    supervised_steps: int = 300
    seed: int = 0

    @classmethod
    def quick(cls, **kw) -> "CompareConfig":
        base = dict(config="tiny", steps=30, batch_size=32, ema=0.0, evaluations=3, n_eval=64,
                    couplings=("independent", "ot"), fm_steps=(1, 2, 4), fm_methods=("euler", "midpoint"),
                    grid_steps=(2,), grid_candidates=8, grid_calib=16, reflow_steps=10, reflow_pairs=64,
                    reflow_fm_steps=(1, 2), ddim_steps=(2, 5), ddpm_steps=20, standard_fm=("euler", 4),
                    standard_ddpm=("ddim", 5), headline_seeds=(0, 1), classifier_steps=60, classifier_dim=8,
                    baseline_seeds=(0,), supervised_steps=20)
        base.update(kw)
        return cls(**base)

    def validate(self) -> "CompareConfig":
        for name in ("steps", "evaluations", "n_eval", "ddpm_steps", "batch_size", "grid_candidates", "grid_calib"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.reflow_steps < 0:
            raise ValueError(f"reflow_steps must be >= 0, got {self.reflow_steps}")
        if not self.couplings or len(set(self.couplings)) != len(self.couplings):
            raise ValueError(f"couplings must name at least one coupling, each once, got {self.couplings}")
        if self.reflow_steps and "independent" not in self.couplings:
            raise ValueError("reflow fine-tunes the independent-coupling run: keep 'independent' in couplings")
        if not self.headline_seeds:
            raise ValueError("headline_seeds must hold at least one seed")
        if self.ddpm_steps > 1000 or (self.ddim_steps and max(self.ddim_steps) > 1000) or min(self.ddim_steps, default=1) < 1:
            raise ValueError(f"ddpm_steps and ddim_steps must lie in [1, T=1000], got {self.ddpm_steps}, {self.ddim_steps}")
        if not set(self.ddim_spacings) <= set(SPACINGS):
            raise ValueError(f"ddim_spacings must be among {SPACINGS}, got {self.ddim_spacings}")
        if self.ddpm_prediction not in PREDICTIONS:
            raise ValueError(f"ddpm_prediction must be one of {PREDICTIONS}, got {self.ddpm_prediction!r}")
        if self.grid_steps and max(self.grid_steps) > self.grid_candidates:
            raise ValueError(f"grid_steps {self.grid_steps} exceed grid_candidates={self.grid_candidates}")
        return self


def variant_name(coupling: str) -> str:
    return "fm" if coupling == "independent" else f"fm-{coupling}"


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
             clip_x0: float | None = None, grid=None, spacing: str | None = None,
             temperature: float = 1.0) -> np.ndarray:
    """x -> z = E(x) -> ``steps``-step sample with ``method`` (on ``grid`` / with ``spacing`` when
    given, from noise scaled by ``temperature``), batch by batch, fixed noise seed."""
    gen = torch.Generator(device=x_ref.device).manual_seed(seed)
    ddpm = model.cfg.objective == "ddpm"
    kw = dict(clip_x0=clip_x0, spacing=spacing) if ddpm else dict(grid=grid)
    outs = [model.reconstruct(x_ref[i:i + batch], None if grid is not None else steps, method, generator=gen,
                              temperature=temperature, **kw).float().cpu()
            for i in range(0, len(x_ref), batch)]
    return torch.cat(outs).numpy()


def sample_metrics(model, clf, x_ref_np: np.ndarray, f_ref: np.ndarray, method: str, steps: int, seed: int,
                   device, clip_x0: float | None = None, grid=None, spacing: str | None = None) -> dict:
    x_ref = torch.from_numpy(x_ref_np).to(device)
    if torch.device(device).type == "cuda":   # capture the sampler's CUDA graph off the clock
        generate(model, x_ref[:1], method, steps, seed, clip_x0=clip_x0, grid=grid, spacing=spacing)
    gen, seconds = _Clock(device)(lambda: generate(model, x_ref, method, steps, seed, clip_x0=clip_x0, grid=grid,
                                                   spacing=spacing))
    return {"method": method, "steps": steps, "nfe": steps * NFE_PER_STEP[method],
            "grid": "optimal" if grid is not None else (spacing or "uniform"), "seed": seed,
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


def first_nfe_reaching(rows: list[dict], target: float) -> dict | None:
    """The row of least NFE (then least FID) with sensor-FID <= ``target``, or None."""
    ok = [r for r in rows if r["fid"] <= target]
    return min(ok, key=lambda r: (r["nfe"], r["fid"])) if ok else None


def eval_steps(steps: int, evaluations: int) -> list[int]:
    """``evaluations`` training steps, evenly spaced, the last one ``steps``."""
    n = min(evaluations, steps)
    return sorted({max(1, round(steps * (i + 1) / n)) for i in range(n)})


def coupling_seconds(kind: str, batch: int, channels: int, length: int, z_dim: int, repeats: int = 20) -> float:
    """Median host time of one ``couple`` call on a batch of random pairs (the assignment's cost)."""
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(batch, channels, length, generator=g), torch.randn(batch, channels, length, generator=g)
    z = torch.randn(batch, z_dim, generator=g)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        couple(kind, x0, x1, z)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _fmt(v, spec=".3f"):
    if v is None:
        return "not reached"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan"
    return format(v, spec)


def _mean_sd(xs, spec=".3f"):
    xs = np.asarray(xs, dtype=np.float64)
    return (format(xs.mean(), spec) if len(xs) == 1
            else f"{format(xs.mean(), spec)} ± {format(xs.std(ddof=1), spec)} (n={len(xs)})")


def run_compare(out, data: str = "hapt", cfg: CompareConfig | None = None, device="cpu",
                progress: bool = True) -> Path:
    """Train every variant, measure, and write ``out/report.md``, ``results.json`` and PNG plots."""
    cfg = (cfg or CompareConfig()).validate()
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
    shape = dict(channels=tr.x.shape[1], length=tr.x.shape[2])

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

    variants = {variant_name(c): dict(objective="fm", coupling=c) for c in cfg.couplings}
    variants[DDPM] = dict(objective="ddpm", prediction=cfg.ddpm_prediction)
    _warm_up(cfg, bundle, device, variants)
    results: dict = {"config": dataclasses.asdict(cfg), "data": data, "machine": machine_description(device),
                     "feature_classifier": clf_info, "ddpm_clip_x0": clip, "variants": {}}
    models, runs = {}, {}
    at = eval_steps(cfg.steps, cfg.evaluations)
    for name, kw in variants.items():
        model_cfg = get_config(cfg.config, **kw, **shape)
        tc = TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, ema_decay=cfg.ema, seed=cfg.seed,
                         warmup_steps=max(1, min(100, cfg.steps // 10)), ckpt_every=cfg.steps,
                         max_minutes=cfg.max_minutes, augment=AugmentConfig(enabled=cfg.augment), log_every=max(1, min(25, cfg.steps)))
        method, k = cfg.standard_fm if kw["objective"] == "fm" else cfg.standard_ddpm
        curve: list[dict] = []

        def evaluate(step, seconds, model, method=method, k=k, curve=curve):
            model.eval()
            # One BLAS thread for the probe, so idle BLAS workers cannot spin on the cores the
            # next training steps need (on 2 cores the clock of whichever variant is evaluated
            # more often would pay for it).
            with threadpool_limits(1):
                f1 = probe_scores(model.encoder, tr, te, 1.0, (0,), device)[0]
            fid = sample_metrics(model, clf, x_ref, f_ref, method, k, cfg.seed, device, clip)["fid"]
            curve.append({"step": step, "seconds": seconds, "probe_f1": f1, "fid": fid})

        def callback(step, seconds, model, evaluate=evaluate):
            if step in at and step < cfg.steps:
                evaluate(step, seconds, model)

        runs[name] = out / f"train_{name}"
        res = train_flowfm(model_cfg, bundle.pretrain.x, tc, runs[name], bundle.standardizer, device=device,
                           progress=progress, callback=callback)
        model = res.eval_model.eval()
        evaluate(res.step, res.seconds, model)
        models[name] = model
        results["variants"][name] = {**kw, "steps": res.step, "train_seconds": res.seconds,
                                     "seconds_per_step": res.seconds / max(1, res.step), "curve": curve,
                                     "final_probe_f1": curve[-1]["probe_f1"], "final_fid": curve[-1]["fid"],
                                     "standard_sampler": f"{method} {k}"}
    fm_names = [n for n in variants if n != DDPM]

    # The share of a training step the host-side assignment takes.
    results["coupling_cost"] = {
        c: {"seconds_per_call": coupling_seconds(c, cfg.batch_size, shape["channels"], shape["length"],
                                                 models[variant_name(c)].cfg.encoder.z_dim),
            "seconds_per_step": results["variants"][variant_name(c)]["seconds_per_step"]}
        for c in cfg.couplings if c in ASSIGNED}

    # Reflow of the independent-coupling run.
    if cfg.reflow_steps:
        rname = "fm" + REFLOW
        rc = ReflowConfig(pairs=cfg.reflow_pairs, steps=cfg.reflow_steps, batch_size=cfg.batch_size,
                          ema_decay=cfg.ema, seed=cfg.seed, ckpt_every=cfg.reflow_steps)
        t0 = time.perf_counter()
        rres = run_reflow(runs["fm"], bundle.pretrain.x, rc, out / f"train_{rname}", device, progress=progress)
        models[rname], _, _ = load_trained(out / f"train_{rname}", device)
        results["reflow"] = {**rres, "wall_seconds": time.perf_counter() - t0, "config": dataclasses.asdict(rc)}
        fm_names.append(rname)

    # Optimal Euler grids for every FM model, calibrated on pretraining windows (not the test set).
    grids: dict = {}
    if cfg.grid_steps:
        cal = np.sort(rng.choice(len(bundle.pretrain), size=min(cfg.grid_calib, len(bundle.pretrain)), replace=False))
        x_cal = torch.from_numpy(np.ascontiguousarray(bundle.pretrain.x[cal])).to(device)

        def grid_job(name):
            m = models[name]
            gen = torch.Generator(device=device).manual_seed(cfg.seed)
            return m.optimal_grids(m.encode(x_cal), cfg.grid_steps, "euler", generator=gen,
                                   candidates=cfg.grid_candidates)
        per_model = run_jobs({n: (lambda n=n: grid_job(n)) for n in fm_names}, "optimal grids (BOSS)", progress)
        grids = {(n, K): rec for n, recs in per_model.items() for K, rec in recs.items()}
        results["grids"] = {f"{n} euler {K}": g for (n, K), g in grids.items()}

    # Quality and wall time versus NFE.
    jobs = {}
    for n in fm_names:
        ks = cfg.reflow_fm_steps if n.endswith(REFLOW) else cfg.fm_steps
        for m in cfg.fm_methods:
            for k in ks:
                jobs[(n, m, k, "uniform")] = (lambda n=n, m=m, k=k: sample_metrics(
                    models[n], clf, x_ref, f_ref, m, k, cfg.seed, device))
        for K in cfg.grid_steps:
            jobs[(n, "euler", K, "optimal")] = (lambda n=n, K=K: sample_metrics(
                models[n], clf, x_ref, f_ref, "euler", K, cfg.seed, device, grid=grids[(n, K)]["grid"]))
    jobs[(DDPM, "ddpm", cfg.ddpm_steps, "leading")] = lambda: sample_metrics(
        models[DDPM], clf, x_ref, f_ref, "ddpm", cfg.ddpm_steps, cfg.seed, device, clip, spacing="leading")
    for sp in cfg.ddim_spacings:
        for k in cfg.ddim_steps:
            jobs[(DDPM, "ddim", k, sp)] = (lambda k=k, sp=sp: sample_metrics(
                models[DDPM], clf, x_ref, f_ref, "ddim", k, cfg.seed, device, clip, spacing=sp))
    done = run_jobs(jobs, "sampling sweep (FID per variant, sampler and steps)", progress)
    sweep = {n: [r for key, r in done.items() if key[0] == n] for n in [*fm_names, DDPM]}
    results["sampling"] = sweep

    # The headline: DDPM-1000 and the first FM setting with NFE <= 8 that reaches it, over seeds.
    ref_rows = [r for r in sweep[DDPM] if r["method"] == "ddpm"]
    fm_rows = [dict(r, variant=n) for n in fm_names for r in sweep[n]]
    few = [r for r in fm_rows if r["nfe"] <= 8]
    cand = first_nfe_reaching(few, ref_rows[0]["fid"]) or min(few or fm_rows, key=lambda r: r["fid"])
    key = (cand["variant"], cand["method"], cand["steps"], "optimal" if cand["grid"] == "optimal" else "uniform")
    g_cand = grids[(key[0], key[2])]["grid"] if key[3] == "optimal" else None
    extra = {}
    for s in cfg.headline_seeds:
        if s == cfg.seed:                  # the sweep already sampled this seed
            continue
        extra[(DDPM, s)] = lambda s=s: sample_metrics(models[DDPM], clf, x_ref, f_ref, "ddpm", cfg.ddpm_steps, s,
                                                      device, clip, spacing="leading")
        extra[("fm", s)] = lambda s=s: sample_metrics(models[key[0]], clf, x_ref, f_ref, key[1], key[2], s,
                                                      device, grid=g_cand)
    more = run_jobs(extra, "headline seeds", progress)
    ref_seeds = [ref_rows[0] if s == cfg.seed else more[(DDPM, s)] for s in cfg.headline_seeds]
    fm_seeds = [cand if s == cfg.seed else more[("fm", s)] for s in cfg.headline_seeds]
    fm_mean, ref_mean = (float(np.mean([r["fid"] for r in rows])) for rows in (fm_seeds, ref_seeds))
    results["headline"] = {
        "variant": cand["variant"], "method": cand["method"], "steps": cand["steps"], "nfe": cand["nfe"],
        "grid": cand["grid"], "seeds": list(cfg.headline_seeds),
        # chosen on seed cfg.seed's FID; judged on the mean over every headline seed
        "reached": fm_mean <= ref_mean,
        "fm_fid": [r["fid"] for r in fm_seeds], "ddpm_fid": [r["fid"] for r in ref_seeds],
        "fm_ms": [r["ms_per_sample"] for r in fm_seeds], "ddpm_ms": [r["ms_per_sample"] for r in ref_seeds],
        "fm_recon_mse": [r["recon_mse"] for r in fm_seeds],
        "speedup": float(np.mean([r["ms_per_sample"] for r in ref_seeds]) /
                         np.mean([r["ms_per_sample"] for r in fm_seeds]))}
    best_ddim = min((r for r in sweep[DDPM] if r["method"] == "ddim"), key=lambda r: r["fid"], default=ref_rows[0])
    results["speedup"] = {"vs_ddpm": fm_speedup(fm_rows, ref_rows[0]), "vs_best_ddim": fm_speedup(fm_rows, best_ddim)}
    eight = [r for r in fm_rows if r["steps"] == 8 and r["method"] == "euler"]
    results["best_recon_8_steps"] = min(eight, key=lambda r: r["recon_mse"]) if eight else None
    # The same 8 Euler steps from x0 = 0: a deterministic reconstruction (near E[x | z]) per FM model.
    x_ref_t = torch.from_numpy(x_ref).to(device)
    results["recon_deterministic_8_steps"] = {
        n: float(np.mean((generate(models[n], x_ref_t, "euler", 8, cfg.seed, temperature=0.0) - x_ref) ** 2))
        for n in fm_names}

    # Training time to the same quality, every FM variant against DDPM.
    V = results["variants"]
    f1_target = min(V[n]["final_probe_f1"] for n in variants) - 0.01
    fid_target = max(V[n]["final_fid"] for n in variants)
    ttq = {}
    for qname, qkey, target, hib in (("probe_f1", "probe_f1", f1_target, True), ("fid", "fid", fid_target, False)):
        t = {n: time_to_reach(V[n]["curve"], qkey, target, hib) for n in variants}
        ratios = {n: (t[n] / t[DDPM] if t[n] is not None and t[DDPM] else None) for n in variants if n != DDPM}
        ttq[qname] = {"target": target, "seconds": t, "over_ddpm": ratios}
    results["time_to_quality"] = ttq

    # Representation: final probes and baselines.
    model_cfg = get_config(cfg.config, **shape)
    baselines = run_jobs({
        **{("rand", s): (lambda s=s: probe_scores(build_model(model_cfg, 1000 + s).encoder, tr, te, 1.0, (0,),
                                                  device)[0]) for s in cfg.baseline_seeds},
        **{("sup", s): (lambda s=s: finetune(build_model(model_cfg, 2000 + s).encoder, tr.x, tr.y, te.x, te.y,
                                             len(bundle.classes), bundle.standardizer.mean, bundle.standardizer.std,
                                             steps=cfg.supervised_steps, seed=s, device=device)["macro_f1"])
           for s in cfg.baseline_seeds}}, "baselines (random-init probes, supervised training)", progress)
    results["baselines"] = {"random_init_probe_f1": [baselines[("rand", s)] for s in cfg.baseline_seeds],
                            "supervised_f1": [baselines[("sup", s)] for s in cfg.baseline_seeds]}
    results["total_seconds"] = time.perf_counter() - t_start

    plots = _plots(out, results)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    report = out / "report.md"
    report.write_text(_report(results, cfg, data, bundle, plots))
    return report


def _warm_up(cfg: CompareConfig, bundle, device, variants: dict) -> None:
    """A few untimed steps of every variant first, so none pays the process's first-call costs
    (extension load, allocator growth, kernel selection, scipy's import) on its clock."""
    x = bundle.pretrain.x[: 4 * cfg.batch_size]
    for kw in variants.values():
        model_cfg = get_config(cfg.config, **kw, channels=x.shape[1], length=x.shape[2])
        tc = TrainConfig(steps=3, batch_size=cfg.batch_size, warmup_steps=1, ckpt_every=1000, seed=cfg.seed)
        with tempfile.TemporaryDirectory() as tmp:
            train_flowfm(model_cfg, x, tc, tmp, bundle.standardizer, device=device, progress=False)


def _label(name: str) -> str:
    if name == DDPM:
        return "DDPM counterpart"
    if name.startswith("fm-"):
        return "FM, " + name[3:]
    return "FM" + name[2:].replace("+", " + ")


def _plots(out: Path, results: dict) -> dict:
    import matplotlib   # lazy: only the report draws, and matplotlib costs start-up time
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = {}
    for key, ylabel, fname in (("probe_f1", "linear-probe macro-F1", "probe_f1_vs_time.png"),
                               ("fid", "sensor-FID (standard sampler)", "fid_vs_time.png")):
        fig, ax = plt.subplots(figsize=(5.8, 3.8))
        for n, rec in results["variants"].items():
            c = rec["curve"]
            ax.plot([r["seconds"] for r in c], [r[key] for r in c], "o-", ms=3, label=_label(n))
        if key == "probe_f1":
            ax.axhline(float(np.mean(results["baselines"]["random_init_probe_f1"])), color="gray", ls="--",
                       label="random-init encoder")
        ax.set_xlabel("training wall time [s]")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
        paths[key] = save_figure(fig, out / fname).name

    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    ref = [r for r in results["sampling"][DDPM] if r["method"] == "ddpm"][0]
    # one colour per model, one line style per sampler and grid
    styles = {("euler", "uniform"): "o-", ("midpoint", "uniform"): "^--", ("euler", "optimal"): "s:",
              ("ddim", "leading"): "o-", ("ddim", "trailing"): "^--"}
    for c, (n, rows) in enumerate(results["sampling"].items()):
        groups: dict[tuple, list] = {}
        for r in rows:
            if r["method"] == "ddpm":
                continue
            groups.setdefault((r["method"], r["grid"]), []).append(r)
        for (m, g), rs in groups.items():
            rs = sorted(rs, key=lambda r: r["nfe"])
            ax.plot([r["nfe"] for r in rs], [r["fid"] for r in rs], styles.get((m, g), "o-"), ms=3,
                    color=f"C{c % 10}", label=f"{_label(n)}: {m} ({g})")
    ax.axhline(ref["fid"], color="k", ls="--", label=f"DDPM-{ref['steps']} ancestral")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("network evaluations per sample (NFE, log)")
    ax.set_ylabel("sensor-FID")
    ax.legend(fontsize=6, ncol=2)
    paths["nfe"] = save_figure(fig, out / "fid_vs_nfe.png").name
    return paths


def _report(res: dict, cfg: CompareConfig, data: str, bundle, plots: dict) -> str:
    V, ttq, sp, hl = res["variants"], res["time_to_quality"], res["speedup"], res["headline"]
    ci = res["feature_classifier"]
    n_eval = min(cfg.n_eval, len(bundle.test))
    L = ["# FlowFM versus its diffusion counterpart, with couplings, optimal grids and reflow", "",
         f"Machine: {res['machine']}.", "",
         f"Data: {data}; {len(bundle.pretrain)} pretraining windows, {len(bundle.train)} labelled train / "
         f"{len(bundle.test)} held-out test windows. Config `{cfg.config}` for every variant; same encoder, "
         f"network, AdamW (lr {cfg.lr}, batch {cfg.batch_size}, EMA {cfg.ema}), "
         f"{'encoder-side augmentation' if cfg.augment else 'no augmentation (--no-augment)'} and "
         f"{cfg.steps} steps each (one training seed). Generation metrics on {n_eval} held-out windows "
         f"(x -> z -> K-step sample). Total {res['total_seconds'] / 60:.1f} min.", "",
         f"DDPM counterpart: {cfg.ddpm_prediction}-prediction (section 5 says why), cosine schedule, T = 1000; "
         + ("its samplers clip the predicted clean window x0_hat to +-" + f"{res['ddpm_clip_x0']:.2f} (the training "
            "windows' largest |x|), as the reference code's clip_denoised does."
            if res["ddpm_clip_x0"] is not None else "no x0_hat clipping (--no-ddpm-clip)."), "",
         *([f"**Warning:** EMA decay {cfg.ema} averages over ~{1 / (1 - cfg.ema):.0f} steps and the run "
            f"has {cfg.steps}: the evaluated (EMA) weights still weigh the initial ones "
            f"{cfg.ema ** cfg.steps:.0%}.", ""] if cfg.ema > 0 and cfg.ema ** cfg.steps > 0.05 else []),
         f"Sensor-FID features: a separately trained ResNet-1D activity classifier ({cfg.classifier_dim}-d "
         f"features, test macro-F1 {ci['test_macro_f1']:.3f}); real train vs real test windows give FID "
         f"{ci['real_train_vs_test_fid']:.3f} (the floor).", "",
         "## Against the paper", "",
         "| claim | paper | ours |", "|---|---|---|"]
    fid_ratios = [r for r in ttq["fid"]["over_ddpm"].values() if r is not None]
    f1_ratios = [r for r in ttq["probe_f1"]["over_ddpm"].values() if r is not None]
    pct = lambda rs: (f"{100 * (np.mean(rs) - 1):+.1f}%" + (f" (sd {100 * np.std(rs, ddof=1):.1f} points over "
                                                           f"{len(rs)} FM variants)" if len(rs) > 1 else "")
                      if rs else "not reached")
    L.append(f"| training time to the same probe F1 | -{100 * PAPER['training_time_reduction']:.1f}% | "
             f"{pct(f1_ratios)} |")
    L.append(f"| training time to the same sensor-FID | - | {pct(fid_ratios)} |")
    hl_txt = (f"{_label(hl['variant'])}, {hl['method']} {hl['steps']} ({hl['grid']} grid, NFE {hl['nfe']}): FID "
              f"{_mean_sd(hl['fm_fid'])} vs DDPM-{cfg.ddpm_steps} {_mean_sd(hl['ddpm_fid'])}; "
              f"{hl['speedup']:.1f}x faster per sample")
    L.append(f"| few-step FM at DDPM-{cfg.ddpm_steps}'s quality | up to {PAPER['max_inference_speedup']:.1f}x faster | "
             + ("reached: " if hl["reached"] else "not reached at NFE <= 8 (best shown): ") + hl_txt + " |")
    b8 = res.get("best_recon_8_steps")
    if b8 is not None:
        L.append(f"| reconstruction MSE, x -> z -> 8 Euler steps (bar <= 0.15) | - | {b8['recon_mse']:.3f} "
                 f"({_label(b8['variant'])}, {b8['grid']} grid) |")
    det = res.get("recon_deterministic_8_steps")
    if det:
        best = min(det, key=det.get)
        L.append(f"| the same, deterministic (x0 = 0, uniform grid) | - | {det[best]:.3f} ({_label(best)}) |")
    L += ["", f"Headline spread: sampling seeds {list(cfg.headline_seeds)} on the same trained weights (mean ± sd; "
          f"the setting is chosen on seed {cfg.seed} and judged on the mean); the training seed's spread is not "
          "measured (one run per variant).", "",
          "## 1. Training time to the same quality", "",
          "Targets: probe macro-F1 = lowest final F1 - 0.01; sensor-FID = the worst final FID (standard "
          f"samplers: FM {cfg.standard_fm[0]} {cfg.standard_fm[1]}, DDPM {cfg.standard_ddpm[0]} {cfg.standard_ddpm[1]}). "
          f"{cfg.evaluations} evaluations per variant.", "",
          "| variant | probe-F1 target s | ratio to DDPM | sensor-FID target s | ratio to DDPM |",
          "|---|---|---|---|---|"]
    ratio = lambda q, n: "1 (reference)" if n == DDPM else _fmt(ttq[q]["over_ddpm"].get(n))
    for n in V:
        L.append(f"| {_label(n)} | {_fmt(ttq['probe_f1']['seconds'][n], '.1f')} | {ratio('probe_f1', n)} | "
                 f"{_fmt(ttq['fid']['seconds'][n], '.1f')} | {ratio('fid', n)} |")
    L += ["", f"Targets: probe F1 {ttq['probe_f1']['target']:.3f}, sensor-FID {ttq['fid']['target']:.3f}.", "",
          "| variant | steps | train s | s / step | final probe F1 | final sensor-FID | evaluations |",
          "|---|---|---|---|---|---|---|"]
    for n, r in V.items():
        L.append(f"| {_label(n)} | {r['steps']} | {r['train_seconds']:.1f} | {r['seconds_per_step']:.3f} | "
                 f"{r['final_probe_f1']:.3f} | {r['final_fid']:.3f} | {len(r['curve'])} |")
    L += ["", f"![probe F1 vs time]({plots['probe_f1']})", "", f"![sensor-FID vs time]({plots['fid']})", "",
          "## 2. Sensor-FID, MMD and reconstruction versus network evaluations", "",
          "| variant | sampler | steps | grid / spacing | NFE | sensor-FID | MMD^2 | recon MSE | ms / sample |",
          "|---|---|---|---|---|---|---|---|---|"]
    for n, rows in res["sampling"].items():
        for r in sorted(rows, key=lambda r: (r["method"], r["grid"], r["nfe"])):
            L.append(f"| {_label(n)} | {r['method']} | {r['steps']} | {r['grid']} | {r['nfe']} | {r['fid']:.3f} | "
                     f"{r['mmd']:.4f} | {r['recon_mse']:.4f} | {r['ms_per_sample']:.3f} |")
    L += ["", f"![sensor-FID vs NFE]({plots['nfe']})", "", "## 3. FM speedup at matched sensor-FID", "",
          "| reference | ref FID | ref ms / sample | FM setting | FM FID | FM ms / sample | speedup | FID matched |",
          "|---|---|---|---|---|---|---|---|"]
    for key in ("vs_ddpm", "vs_best_ddim"):
        s = sp[key]
        ref_grid = f" ({s['ref']['grid']})" if s["ref"]["method"] == "ddim" else ""
        L.append(f"| {s['ref']['method']} {s['ref']['steps']}{ref_grid} | {s['ref']['fid']:.3f} | "
                 f"{s['ref']['ms_per_sample']:.3f} | {_label(s['fm']['variant'])} {s['fm']['method']} "
                 f"{s['fm']['steps']} ({s['fm']['grid']}) | {s['fm']['fid']:.3f} | {s['fm']['ms_per_sample']:.3f} | "
                 f"{s['speedup']:.1f}x | {'yes' if s['reached'] else 'no (best FM shown)'} |")
    L += ["", "## 4. Couplings, optimal grids and reflow", ""]
    if res.get("coupling_cost"):
        L += ["| coupling | assignment ms / step (batch " + f"{cfg.batch_size}) | training s / step | share |",
              "|---|---|---|---|"]
        for c, r in res["coupling_cost"].items():
            L.append(f"| {c} | {1000 * r['seconds_per_call']:.2f} | {r['seconds_per_step']:.3f} | "
                     f"{100 * r['seconds_per_call'] / r['seconds_per_step']:.1f}% |")
        L.append("")
    if res.get("grids"):
        L += ["| model, sampler | optimal grid | summed local error (optimal / uniform) |", "|---|---|---|"]
        for k, g in res["grids"].items():
            u = g.get("uniform_cost")
            L.append(f"| {k} | {', '.join(f'{v:.3f}' for v in g['grid'])} | {g['cost']:.4g} / "
                     f"{_fmt(u, '.4g') if u is not None else '-'} |")
        L.append("")
    if res.get("reflow"):
        r = res["reflow"]
        L.append(f"Reflow: {r['config']['pairs']} pairs from the independent-coupling run's {r['config']['gen_method']} "
                 f"{r['config']['gen_steps']}-step solves ({r['pair_seconds']:.0f} s), then {r['step']} fine-tuning "
                 f"steps of the velocity with the encoder frozen ({r['seconds']:.0f} s); rows `FM + reflow` above.")
        L.append("")
    ddim = [r for r in res["sampling"][DDPM] if r["method"] == "ddim"]
    L += ["## 5. The DDPM baseline", "",
          "An eps-predicting network's error near k = T is amplified by sqrt((1 - abar) / abar) (~2e4 at k = T) "
          "when x0_hat is formed; a deterministic DDIM step never washes it out, so more steps near k = T made "
          "eps-DDIM worse (benchmarks/results/ddim-diagnosis). v-prediction forms x0_hat without the division.", "",
          "| DDIM steps | " + " | ".join(f"FID ({s})" for s in cfg.ddim_spacings) + " |",
          "|---|" + "---|" * len(cfg.ddim_spacings)]
    for k in cfg.ddim_steps:
        cells = [next((f"{r['fid']:.3f}" for r in ddim if r["steps"] == k and r["grid"] == s), "-")
                 for s in cfg.ddim_spacings]
        L.append(f"| {k} | " + " | ".join(cells) + " |")
    b = res["baselines"]
    L += ["", "## 6. Representation: linear probe macro-F1 on held-out subjects", "",
          "| encoder | macro-F1 |", "|---|---|",
          *[f"| {_label(n)} | {V[n]['final_probe_f1']:.3f} |" for n in V],
          f"| random-init encoder (probe) | {_mean_sd(b['random_init_probe_f1'])} |",
          f"| supervised from scratch (fine-tuned, {cfg.supervised_steps} steps) | {_mean_sd(b['supervised_f1'])} |",
          "", "Wall times are single runs on the machine above; per-sample times divide one batched call by the "
          "number of windows.", ""]
    return "\n".join(L)
