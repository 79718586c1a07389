"""Every Python block in README.md and docs/ runs as written.

The convention (docs/contributing.md says it for authors):

- Each page runs top to bottom in one fresh namespace, like a notebook: a block may
  use names from an earlier block of the same page, never from another page.
- Blocks run in a fresh temporary directory (files they write vanish after the page),
  with `BNJAX_REPO` set to the checkout for pages that read its files (fixtures).
- A block fenced as ```python runs. Listings that are not code to run (a signature,
  a shell session) use another fence: ```text, ```bash, ```pycon.
- The line just above a block (blank lines aside) may be an HTML comment that tells the
  runner about it:
    <!-- docs-test: requires torch -->   runs in test_page_runs_with_torch, marked `torch`
                                          (`pytest -m torch`; .ci/run runs it with
                                          torch==2.13.0), skipped where torch is absent
    <!-- docs-test: skip REASON -->      never runs (say why: e.g. "needs 2 processes").
- The README's links are absolute URLs (it is also rendered outside the repository).
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])

_FENCE = re.compile(r"^```(\S*)\s*$")
_MARK = re.compile(r"^<!--\s*docs-test:\s*(requires\s+\w+|skip\b[^>]*)\s*-->\s*$")


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """`(first line number, source, marker)` of each ```python block, in order."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        lang, start = fence.group(1), i + 1
        j = start
        while j < len(lines) and lines[j].rstrip() != "```":
            j += 1
        if lang == "python":
            k = i - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            mark = _MARK.match(lines[k].strip()) if k >= 0 else None
            blocks.append((start + 1, "\n".join(lines[start:j]) + "\n", mark and mark.group(1)))
        i = j + 1
    return blocks


def _has(module: str) -> bool:
    """`module` imports here (found, and importing it does not fail)."""
    if importlib.util.find_spec(module) is None:
        return False
    try:
        importlib.import_module(module)
    except Exception:  # a broken install counts as absent
        return False
    return True


def _needs_torch(mark: str | None) -> bool:
    return bool(mark) and mark.split()[:2] == ["requires", "torch"]


def _run_page(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, torch: bool) -> None:
    """Runs a page's blocks top to bottom. With `torch`, every block up to the last that
    needs torch (torch present); without, every block but those that need torch."""
    blocks = python_blocks(page.read_text())
    if torch:
        last = max(i for i, (_, _, mark) in enumerate(blocks) if _needs_torch(mark))
        blocks = blocks[: last + 1]
    if not blocks:
        pytest.skip("no python blocks")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BNJAX_REPO", str(ROOT))  # pages that read the repo's files
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    ran = skipped = 0
    for line, source, mark in blocks:
        if mark and mark.startswith("skip"):
            skipped += 1
            continue
        if _needs_torch(mark) and not torch:
            skipped += 1  # test_page_runs_with_torch runs it
            continue
        if mark and mark.startswith("requires") and not _has(mark.split()[1]):
            skipped += 1
            continue
        code = compile(source, f"{page.relative_to(ROOT)}:{line}", "exec", dont_inherit=True)
        exec(code, namespace)  # noqa: S102 - running the docs is the point
        ran += 1
    assert ran or skipped, f"{page}: nothing ran"
    if not ran:
        pytest.skip(f"all {skipped} blocks need something absent here")


_IDS = {"ids": lambda p: str(p.relative_to(ROOT))}
TORCH_PAGES = [
    p for p in PAGES if any(_needs_torch(mark) for _, _, mark in python_blocks(p.read_text()))
]


# Pages over ~20 s on 2 loaded cores (pytest --durations): marked slow.
SLOW_PAGES = {"deployment.md", "accumulation.md"}


@pytest.mark.parametrize(
    "page",
    [pytest.param(p, marks=[pytest.mark.slow] if p.name in SLOW_PAGES else []) for p in PAGES],
    **_IDS,
)
def test_page_runs(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every block that needs no torch (torch or not)."""
    _run_page(page, tmp_path, monkeypatch, torch=False)


@pytest.mark.torch
@pytest.mark.parametrize("page", TORCH_PAGES, **_IDS)
def test_page_runs_with_torch(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The blocks marked `requires torch`, with the page's blocks before them: collected by
    `pytest -m torch` (`.ci/run` installs torch==2.13.0 for it), skipped without torch."""
    if not _has("torch"):
        pytest.skip("needs torch (pip install torch==2.13.0)")
    _run_page(page, tmp_path, monkeypatch, torch=True)


def test_torch_blocks_are_collected_under_the_torch_marker() -> None:
    """Every page with a `requires torch` block is a case of the torch-marked test (the one
    `pytest -m torch` collects), so CI's torch stage runs every torch block."""
    marked = {
        p for p in PAGES if "<!-- docs-test: requires torch -->" in p.read_text().splitlines()
    }
    assert marked == set(TORCH_PAGES)
    assert "torch" in {m.name for m in test_page_runs_with_torch.pytestmark}


def test_markers_are_known() -> None:
    """A misspelled marker would silently run (or skip) a block."""
    bad = []
    for page in PAGES:
        for n, line in enumerate(page.read_text().splitlines(), 1):
            if "docs-test" in line and not _MARK.match(line.strip()):
                bad.append(f"{page.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not bad, "unknown docs-test markers:\n" + "\n".join(bad)


_LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_readme_links_are_absolute() -> None:
    """The README is also shown outside the repository (a package index page), where a
    relative link (`docs/spec.md`) leads nowhere: every link is a full URL."""
    text = (ROOT / "README.md").read_text()
    relative = [t for t in _LINK.findall(text) if not t.startswith(("https://", "http://", "#"))]
    assert not relative, f"README.md has relative links: {relative}"


if os.environ.get("BNJAX_DOCS_LIST"):  # `BNJAX_DOCS_LIST=1 python tests/test_docs.py`
    for p in PAGES:
        print(p, len(python_blocks(p.read_text())))
