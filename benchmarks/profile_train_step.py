"""Where does a training step's time go? torch.profiler over joint FlowFM training steps, split
into what the fused kernels replace and what they do not.

    python benchmarks/profile_train_step.py                      # small/dit, B=64, 2 threads, torch vs default
    python benchmarks/profile_train_step.py --velocity resnet --backends torch cpp --top 30

For each dispatch (``torch`` = every op forced onto the reference, ``default`` = the registry's
own choice, e.g. the cpp kernels; or any backend name) it prints the wall time of a step without
the profiler, the top ops by self CPU time, and the self CPU time per category:

- ``fused ops fwd`` / ``fused ops bwd``: everything inside a call of a ``flowfm_fast.ops`` op
  (norm_modulate, gated_residual(_norm_modulate), fm_interpolate, fm_loss, timestep_embedding)
  and the backward nodes those calls created (matched by autograd sequence number): the time the
  fused kernels can remove;
- ``matmul``, ``conv``, ``attention``, ``batchnorm`` (encoder), ``elementwise/other``: by the
  outermost aten op (forward) or autograd node (backward) an event belongs to;
- ``optimizer``: AdamW's step and zero_grad; ``rng``: the noise and t sampling.

Not collected by pytest (no ``bench_`` prefix).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from flowfm_fast import ops
from flowfm_fast.models import FlowFM, get_config
from flowfm_fast.train.loop import make_optimizer

WRAPPED = ("norm_modulate", "gated_residual", "gated_residual_norm_modulate", "fm_interpolate", "fm_loss",
           "linear_act", "attention", "batch_norm_act", "timestep_embedding", "euler_step_", "rk_combine")
SCOPE = "fused::"
NODE = "autograd::engine::evaluate_function: "
CATEGORIES = (
    ("matmul", ("addmm", "aten::mm", "bmm", "linear", "matmul", "MmBackward", "AddmmBackward", "BmmBackward")),
    ("attention", ("scaled_dot_product", "ScaledDotProduct", "softmax", "Softmax")),
    ("conv", ("conv", "Convolution")),
    ("batchnorm", ("batch_norm", "BatchNorm")),
    ("rng", ("randn", "rand", "normal_", "uniform_")),
)


@contextlib.contextmanager
def scoped_ops():
    """Wrap every public op in a ``record_function("fused::<op>")`` scope (models call them as
    ``ops.<name>``, so patching the package attribute reaches every call site)."""
    originals = {name: getattr(ops, name) for name in WRAPPED}

    def wrap(name, fn):
        @functools.wraps(fn)
        def scoped(*args, **kwargs):
            with record_function(SCOPE + name):
                return fn(*args, **kwargs)
        return scoped

    for name, fn in originals.items():
        setattr(ops, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(ops, name, fn)


def dispatch(backend: str):
    return contextlib.nullcontext() if backend == "default" else ops.use_backend(backend)


def build(args):
    torch.manual_seed(0)
    model = FlowFM(get_config(args.config, velocity=args.velocity))
    with torch.no_grad():  # as bench_e2e: perturb the zero-initialised layers
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    opt = make_optimizer(model, lr=1e-4, weight_decay=0.01)  # the trainer's (fused) AdamW
    x1 = torch.randn(args.batch, model.cfg.channels, model.cfg.length)

    def step():
        loss = model.loss(x1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _ancestors(e):
    while e is not None:
        yield e
        e = e.cpu_parent


def categorise(events) -> dict[tuple[str, str], float]:
    """Self CPU time (us) per (category, detail); see the module docstring. ``detail`` is the op
    name for the fused ops and the outermost aten op / autograd node otherwise."""
    # A backward node carries the sequence number of the forward op that created it. Forward ops that
    # create no node record the *next* number too, so the creator of node N is the forward event with
    # number N that started last; the node is a fused op's when that event ran inside a fused:: scope.
    owner: dict[int, tuple[float, bool]] = {}
    for e in events:
        if e.sequence_nr < 0:
            continue
        chain = list(_ancestors(e))
        if any(a.name.startswith(NODE) for a in chain):
            continue
        start = e.time_range.start
        if e.sequence_nr not in owner or start >= owner[e.sequence_nr][0]:
            owner[e.sequence_nr] = (start, any(a.name.startswith(SCOPE) for a in chain))
    fused_seq = {seq for seq, (_, in_scope) in owner.items() if in_scope}
    out = defaultdict(float)
    for e in events:
        chain = list(_ancestors(e))
        names = [a.name for a in chain]
        scope = next((n for n in names if n.startswith(SCOPE)), None)
        node = next((a for a in reversed(chain) if a.name.startswith(NODE)), None)
        if scope:
            key = ("fused ops fwd", scope[len(SCOPE):])
        elif node is not None and node.sequence_nr in fused_seq:
            key = ("fused ops bwd", node.name[len(NODE):])
        elif any(n.startswith("Optimizer.") for n in names):
            key = ("optimizer", next(n for n in names if n.startswith("Optimizer.")))
        else:
            if node is not None:
                root = node.name[len(NODE):]
            else:  # forward: the outermost aten op decides
                root = next((n for n in reversed(names) if n.startswith("aten::")), names[-1])
            cat = next((c for c, keys in CATEGORIES if any(k in root for k in keys)), "elementwise/other")
            key = (cat + (" (bwd)" if node is not None else ""), root)
        out[key] += e.self_cpu_time_total
    return out


def _by_category(fine: dict) -> dict[str, float]:
    out = defaultdict(float)
    for (cat, _), us in fine.items():
        out[cat] += us
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="small")
    ap.add_argument("--velocity", default="dit", choices=("dit", "resnet"))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="profiled steps, one profile each (after 3 warm-up steps)")
    ap.add_argument("--timed", type=int, default=10, help="steps timed without the profiler")
    ap.add_argument("--backends", nargs="+", default=["torch", "default"])
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.config}/{args.velocity} B={args.batch}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(ops.describe())
    steps = {}
    for backend in args.backends:
        steps[backend] = build(args)
        with dispatch(backend):
            for _ in range(3):
                steps[backend]()
    times = defaultdict(list)
    for _ in range(args.timed):  # interleaved, so a noisy neighbour hits every dispatch alike
        for backend in args.backends:
            with dispatch(backend):
                t0 = time.perf_counter()
                steps[backend]()
                times[backend].append(time.perf_counter() - t0)
    summary = {}
    for backend in args.backends:
        wall = sorted(times[backend])[len(times[backend]) // 2]
        profiled = []  # one profile per step; per item the median over steps (a preempted step is an outlier)
        for _ in range(args.steps):
            with dispatch(backend), scoped_ops(), profile(activities=[ProfilerActivity.CPU]) as prof:
                steps[backend]()
            profiled.append((prof, categorise(prof.events())))
        profiled.sort(key=lambda pf: sum(pf[1].values()))
        prof = profiled[len(profiled) // 2][0]
        keys = set().union(*(f for _, f in profiled))
        fine = {k: sorted(f.get(k, 0.0) for _, f in profiled)[len(profiled) // 2] for k in keys}
        cats = _by_category(fine)
        total = sum(cats.values())
        summary[backend] = (wall, cats, total)
        per_step = 1e3
        print(f"\n=== dispatch {backend}: median step {wall * 1e3:.1f} ms without profiler "
              f"({args.timed} steps); profiled self CPU {total / per_step:.1f} ms/step "
              f"(per item the median of {args.steps} profiled steps; top ops of the median step)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=60))
        print("| category | ms/step | % of step |\n|---|---|---|")
        for cat, us in sorted(cats.items(), key=lambda kv: -kv[1]):
            print(f"| {cat} | {us / per_step:.2f} | {100 * us / total:.1f}% |")
        fused = sum(us for c, us in cats.items() if c.startswith("fused ops"))
        print(f"fused-op share: {100 * fused / total:.1f}% of self CPU time")
        print("\nlargest items of the fused ops and of elementwise/other:")
        print("| category | op / node | ms/step | % |\n|---|---|---|---|")
        rows = [(k, us) for k, us in fine.items() if k[0].startswith(("fused ops", "elementwise/other"))]
        for (cat, detail), us in sorted(rows, key=lambda kv: -kv[1])[:args.top]:
            print(f"| {cat} | {detail} | {us / per_step:.2f} | {100 * us / total:.1f}% |")
    if len(summary) > 1:
        base = summary[args.backends[0]]
        for backend in args.backends[1:]:
            wall, cats, total = summary[backend]
            print(f"\n{backend} vs {args.backends[0]}: step {base[0] * 1e3:.1f} -> {wall * 1e3:.1f} ms "
                  f"({base[0] / wall:.2f}x); profiled self CPU {base[2] / per_step:.1f} -> {total / per_step:.1f} ms")
        wall0, cats0, total0 = base
        fused0 = sum(us for c, us in cats0.items() if c.startswith("fused ops")) / total0
        print(f"Amdahl: with the fused ops' {100 * fused0:.1f}% of the {args.backends[0]} step made free, "
              f"the step can be at most {1 / (1 - fused0):.2f}x faster.")

if __name__ == "__main__":
    main()
