"""Turn a pytest-benchmark JSON into a markdown table: per group, each implementation's median
time and its speedup against eager PyTorch and torch.compile measured in the same run.

    python benchmarks/report.py benchmarks/results/cpu.json > table.md
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict


def table(data: dict) -> str:
    mi = data.get("machine_info", {})
    ci = data.get("commit_info", {})
    head = (f"Machine: {mi.get('cpu', {}).get('brand_raw', mi.get('processor', '?'))}, "
            f"{mi.get('torch_threads', '?')} threads{', GPU ' + mi['gpu'] if mi.get('gpu') else ''}; "
            f"torch {mi.get('torch', '?')}, triton {mi.get('triton', '-')}; commit {str(ci.get('id', '?'))[:10]}"
            f"{' (dirty)' if ci.get('dirty') else ''}; {data.get('datetime', '')[:10]}")
    groups = defaultdict(dict)
    copy_gbps = None
    for b in data["benchmarks"]:
        impl = b.get("extra_info", {}).get("impl", b["name"])
        med = b["stats"]["median"]
        if impl == "copy":
            copy_gbps = b["extra_info"]["bytes"] / med / 1e9
            continue
        groups[b["group"]][impl] = med
    lines = [head, "", "| case | impl | median ms | vs eager | vs compile |", "|---|---|---|---|---|"]
    for g, impls in groups.items():
        eager, comp = impls.get("eager"), impls.get("compile")
        for impl, med in sorted(impls.items(), key=lambda kv: -kv[1]):
            r_e = f"{eager / med:.2f}x" if eager else "-"
            r_c = f"{comp / med:.2f}x" if comp else "-"
            lines.append(f"| {g} | {impl} | {med * 1e3:.2f} | {r_e} | {r_c} |")
    if copy_gbps is not None:
        lines += ["", f"Copy bandwidth (roofline) in the same run: {copy_gbps:.1f} GB/s."]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/report.py RESULTS.json")
    with open(sys.argv[1]) as f:
        print(table(json.load(f)))
