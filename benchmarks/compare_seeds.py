"""The training-seed spread of ``flowfm-fast compare``'s headline (issue 16).

``compare`` reports its headline over sampling seeds of one trained pair of models. This script
reads the ``results.json`` of several ``compare`` runs that differ only in ``--seed`` (so in the
weights' initialisation, data order and training noise) and tabulates, per run and as mean ± sd
over runs, the settings that carry the headline at fixed NFE, so every run is read at the same
setting rather than at the one its own sweep happened to pick:

    flowfm-fast compare --steps 3000 --evaluations 10 --n-eval 256 --couplings independent --seed 1 --out runs/cmp1
    python benchmarks/compare_seeds.py runs/compare-full/results.json runs/cmp1/results.json ... --out table.md

Time to quality is recomputed from each run's curves with the FM and DDPM runs alone (the
comparison's own target also counts the other couplings, which a single-coupling run lacks):
probe-F1 target = the lower final F1 minus 0.01, FID target = the higher final FID.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from flowfm_fast.compare import first_nfe_reaching, time_to_reach

# (label, variant, method, steps, grid): sensor-FID columns, from the run's sweep (its sampling seed is --seed)
SETTINGS = (
    ("DDPM-1000 (NFE 1000)", "ddpm", "ddpm", 1000, "leading"),
    ("FM Euler 8, optimal grid", "fm", "euler", 8, "optimal"),
    ("FM midpoint 4 (NFE 8)", "fm", "midpoint", 4, "uniform"),
    ("FM + reflow Euler 4, optimal grid", "fm+reflow", "euler", 4, "optimal"),
    ("FM + reflow midpoint 2 (NFE 4)", "fm+reflow", "midpoint", 2, "uniform"),
)


def _row(res: dict, variant: str, method: str, steps: int, grid: str) -> dict | None:
    seed = res["config"].get("seed", 0)
    for r in res["sampling"].get(variant, []):
        if r["method"] == method and r["steps"] == steps and r["grid"] == grid and r.get("seed", 0) == seed:
            return r
    return None


def time_ratios(res: dict) -> dict:
    """FM's training time over DDPM's to the same probe F1 and the same FID (None where not reached)."""
    fm, ddpm = res["variants"]["fm"], res["variants"]["ddpm"]
    out = {}
    for key, target, hib in (("probe_f1", min(fm["final_probe_f1"], ddpm["final_probe_f1"]) - 0.01, True),
                             ("fid", max(fm["final_fid"], ddpm["final_fid"]), False)):
        t_fm, t_ddpm = (time_to_reach(v["curve"], key, target, hib) for v in (fm, ddpm))
        out[key] = t_fm / t_ddpm if t_fm is not None and t_ddpm else None
    return out


def summarise(res: dict) -> dict:
    """One run's numbers: FIDs at the fixed settings, whether FM at NFE <= 8 reaches DDPM-1000, probes."""
    fid = {}
    for label, *key in SETTINGS:
        r = _row(res, *key)
        fid[label] = None if r is None else r["fid"]
    ref = _row(res, *SETTINGS[0][1:])
    few = [dict(r, variant=v) for v in ("fm", "fm+reflow") for r in res["sampling"].get(v, [])
           if r["nfe"] <= 8 and r.get("seed", 0) == res["config"].get("seed", 0)]
    best = min(few, key=lambda r: r["fid"]) if few else None
    first = first_nfe_reaching(few, ref["fid"]) if ref is not None else None
    hl = res.get("headline", {})
    return {
        "seed": res["config"].get("seed"),
        "fid": fid,
        "best_few": None if best is None else best["fid"],
        "first_reaching": None if first is None else
        f"{first['variant']} {first['method']} {first['steps']} ({first['grid']}), NFE {first['nfe']}",
        "speedup": None if first is None else ref["ms_per_sample"] / first["ms_per_sample"],
        "headline": None if not hl.get("fm_fid") else
        f"{hl['variant']} {hl['method']} {hl['steps']} ({hl['grid']}), NFE {hl['nfe']}",
        "headline_speedup": hl.get("speedup"),
        "headline_fm_fid": float(np.mean(hl["fm_fid"])) if hl.get("fm_fid") else None,
        "headline_ddpm_fid": float(np.mean(hl["ddpm_fid"])) if hl.get("ddpm_fid") else None,
        "probe_fm": res["variants"]["fm"]["final_probe_f1"],
        "probe_ddpm": res["variants"]["ddpm"]["final_probe_f1"],
        "recon_8": (res.get("best_recon_8_steps") or {}).get("recon_mse"),
        # absent in runs made before compare measured it
        "recon_8_deterministic": (res.get("recon_deterministic_8_steps") or {}).get("fm"),
        "time": time_ratios(res),
    }


def _f(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def _ms(xs, spec=".1f"):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    if len(xs) == 1:
        return format(xs[0], spec)
    return f"{np.mean(xs):{spec}} ± {np.std(xs, ddof=1):{spec}}"


def table(runs: list[dict]) -> str:
    """Markdown: one row per training seed and a mean ± sd row (sd over training seeds)."""
    cols = [label for label, *_ in SETTINGS]
    head = (["training seed"] + [f"FID, {c}" for c in cols]
            + ["best FID at NFE <= 8", "FM probe F1", "DDPM probe F1", "recon MSE, 8 steps",
               "recon MSE, 8 steps from x0 = 0 (FM)", "time to probe F1, FM / DDPM", "time to FID, FM / DDPM"])
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]

    def cells(get, spec):
        return [get(r) for r in runs], spec

    columns = ([cells(lambda r, c=c: r["fid"][c], ".1f") for c in cols]
               + [cells(lambda r: r["best_few"], ".1f"), cells(lambda r: r["probe_fm"], ".3f"),
                  cells(lambda r: r["probe_ddpm"], ".3f"), cells(lambda r: r["recon_8"], ".3f"),
                  cells(lambda r: r["recon_8_deterministic"], ".3f"),
                  cells(lambda r: r["time"]["probe_f1"], ".2f"), cells(lambda r: r["time"]["fid"], ".2f")])
    for i, r in enumerate(runs):
        lines.append(f"| {r['seed']} | " + " | ".join(_f(vals[i], spec) for vals, spec in columns) + " |")
    n = f"{len(runs)} run{'s' if len(runs) != 1 else ''}"
    lines.append(f"| mean ± sd ({n}) | " + " | ".join(_ms(vals, spec) for vals, spec in columns) + " |")
    lines += ["", "| training seed | first FM setting at NFE <= 8 reaching DDPM-1000 (sweep) | speedup per sample "
              "| compare's headline setting | its FID, mean of the sampling seeds | DDPM-1000's | speedup |",
              "|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['seed']} | {r['first_reaching'] or 'none'} | {_f(r['speedup'], '.0f')} "
                     f"| {r['headline'] or '-'} | {_f(r['headline_fm_fid'])} | {_f(r['headline_ddpm_fid'])} "
                     f"| {_f(r['headline_speedup'], '.0f')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", type=Path, help="results.json of compare runs (one per training seed)")
    p.add_argument("--out", type=Path, help="also write the markdown table here")
    a = p.parse_args(argv)
    runs = [summarise(json.loads(f.read_text())) for f in a.results]
    md = table(runs)
    print(md)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
