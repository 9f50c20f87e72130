"""Every ```python block of the README and of docs/ runs as pasted: a page's blocks in order, in one
fresh namespace (as a reader pastes them into one session), in an empty working directory. The
only edits are for time: training runs take 2 steps instead of their thousands."""
from __future__ import annotations

import pathlib
import re

import pytest
import torch

from flowfm_fast.ops import backends_for

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
FOR_TIME = [(re.compile(r"TrainConfig\(steps=\d+"), "TrainConfig(steps=2")]


def blocks(page: pathlib.Path) -> list[str]:
    return BLOCK.findall(page.read_text())


def test_blocks_are_found():
    assert len(blocks(ROOT / "README.md")) >= 3
    assert sum(len(blocks(p)) for p in PAGES) >= 8
    assert blocks(ROOT / "README.md")[0].startswith("import torch")


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p)], ids=lambda p: p.name)
def test_page_runs_as_pasted(page, tmp_path, monkeypatch):
    source = "\n".join(blocks(page))
    if "use_backend(\"cpp\")" in source and "cpp" not in backends_for("norm_modulate"):
        pytest.skip("the page forces the cpp backend; this build has no C++ extension")
    for pattern, replacement in FOR_TIME:
        source = pattern.sub(replacement, source)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {"__name__": "__docs__"}
    exec(compile(source, str(page), "exec"), namespace)
    assert len(namespace) > 1
