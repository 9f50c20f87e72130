"""Progress bars for the long phases of the applications (demo, compare): every phase longer than
a few seconds shows what it does and its ETA, so nobody waits in silence."""
from __future__ import annotations

from typing import Callable, Mapping, TypeVar

K = TypeVar("K")


def run_jobs(jobs: Mapping[K, Callable[[], object]], desc: str, progress: bool = True) -> dict[K, object]:
    """Each job's result under its key, run in order, with one progress bar (tqdm: count and ETA)."""
    from tqdm.auto import tqdm   # lazy, as the trainer's bar
    results = {}
    with tqdm(total=len(jobs), desc=desc, unit="run", disable=not progress, dynamic_ncols=True) as bar:
        for key, job in jobs.items():
            results[key] = job()
            bar.update(1)
    return results
