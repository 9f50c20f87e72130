"""The docs stay where users read them: a short README, links that resolve, and a test command
that is the one CI runs. (The MkDocs build itself runs in .ci/run: `mkdocs build --strict`.)"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
CI = ROOT / ".ci" / "run"
MKDOCS = ROOT / "mkdocs.yml"

README_MAX_LINES = 220

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
# [text](target) and ![alt](target), with an optional "title".
_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _prose(text: str) -> str:
    """Markdown without fenced blocks and code spans: what a renderer turns into links."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def relative_links(text: str) -> list[str]:
    """Link targets that point into the repository (no scheme, not a bare #anchor), anchor removed."""
    out = []
    for target in _LINK.findall(_prose(text)):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
            continue
        out.append(target.split("#", 1)[0])
    return out


def missing_targets(md: Path) -> list[str]:
    return [t for t in relative_links(md.read_text(encoding="utf-8")) if not (md.parent / t).exists()]


def doc_files() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def test_link_checker_finds_links_and_misses():
    text = ("See [the API](docs/api.md#ops) and ![plot](img/x.png), [web](https://example.org), "
            "[here](#top), `[not a link](nowhere.md)`.\n\n```\n[nor this](gone.md)\n```\n")
    assert relative_links(text) == ["docs/api.md", "img/x.png"]


def test_docs_exist():
    names = {p.name for p in doc_files()}
    assert {"index.md", "installation.md", "api.md", "cli.md", "kernels.md", "backends.md", "benchmarks.md",
            "profiling.md", "distributed.md", "data.md"} <= names


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; move detail into docs/ (limit {README_MAX_LINES})"


@pytest.mark.parametrize("md", [README, *doc_files()], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(md):
    assert missing_targets(md) == [], f"{md.relative_to(ROOT)} links to files that do not exist"


@pytest.mark.parametrize("md", doc_files(), ids=lambda p: p.name)
def test_docs_links_stay_inside_docs(md):
    """mkdocs --strict rejects links to files outside docs/: name those paths in backticks instead."""
    outside = [t for t in relative_links(md.read_text(encoding="utf-8"))
               if DOCS.resolve() not in (md.parent / t).resolve().parents]
    assert outside == [], f"{md.name} links outside docs/: {outside}"


def test_readme_links_into_docs():
    targets = {Path(t).as_posix() for t in relative_links(README.read_text(encoding="utf-8"))}
    assert {"docs/installation.md", "docs/api.md", "docs/cli.md", "docs/kernels.md", "docs/backends.md",
            "docs/benchmarks.md"} <= targets


def fenced_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(info string, lines) of every fenced code block, in order."""
    blocks, current, info = [], None, ""
    for line in text.splitlines():
        if current is None and line.startswith("```"):
            current, info = [], line[3:].strip()
        elif current is not None and line.strip() == "```":
            blocks.append((info, current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def _readme_commands() -> list[str]:
    return [ln.strip() for info, lines in fenced_blocks(README.read_text(encoding="utf-8"))
            if info in ("", "bash", "sh") for ln in lines if ln.strip()]


def test_fenced_blocks_keep_languages_apart():
    text = "```python\nx = 1\n```\n\nprose\n\n```bash\npython -m pytest -q\n```\n"
    assert fenced_blocks(text) == [("python", ["x = 1"]), ("bash", ["python -m pytest -q"])]


def test_readme_test_command_is_what_ci_runs():
    readme = [c for c in _readme_commands() if "pytest" in c]
    assert len(readme) == 1, f"expected one test command in README.md, found {readme}"
    ci = [ln.strip() for ln in CI.read_text(encoding="utf-8").splitlines()
          if "pytest" in ln and not ln.lstrip().startswith("#")]
    assert ci == readme, f".ci/run runs {ci}, README.md says {readme}"


def test_readme_has_both_setup_commands():
    setup = [c for c in _readme_commands() if c.startswith("python3 -m venv .venv")]
    assert len(setup) == 2, f"expected the demo and the test set-up commands, found {setup}"
    assert any(c.endswith("&& flowfm-fast demo") for c in setup)


def test_ci_builds_the_docs_strictly():
    lines = [ln.strip() for ln in CI.read_text(encoding="utf-8").splitlines() if not ln.lstrip().startswith("#")]
    assert any("mkdocs build --strict" in ln for ln in lines), ".ci/run does not build the docs"


def test_mkdocs_nav_lists_every_page():
    nav = re.findall(r"^\s*-\s*[^:\n]+:\s*(\S+\.md)\s*$", MKDOCS.read_text(encoding="utf-8"), re.M)
    assert nav, "mkdocs.yml has no nav"
    assert sorted(nav) == sorted(p.name for p in doc_files()), "mkdocs.yml nav and docs/*.md differ"
