"""Figures in the docs that a command prints, checked against a run of that command.

A figure (an error, a difference, an accuracy) in `README.md` or `docs/*.md` sits in a
marked region that names the command printing it and the tolerance:

    <!-- figures: python examples/port_resnet.py --fixture; rtol=0.1; lines=largest -->
    eval logits 4.8e-07, train-mode logits 1.4e-05, ...
    <!-- /figures -->

- The figures are the numbers written in scientific notation (`4.8e-07`, `3.7e-5`) or
  as percentages (`98%`) in the region, outside backticks, in reading order (table
  rows left to right, top to bottom).
- The command's output gives the same kind of numbers, in printed order, from the lines
  that match the optional `lines=` regular expression (all lines without it; if it has
  groups, from what they capture); a
  fraction printed as `0.9812` matches a figure written `98%` only when the region
  says `percent`.
- The two lists must have the same length and agree pairwise within
  `|doc - printed| <= rtol * |printed| + atol` (`atol` defaults to 0). Order counts:
  two swapped rows fail unless their numbers agree within the tolerance anyway.

Commands too slow for the suite (benchmark timings) write a results file instead, and
the page quotes it:

    <!-- figures: quoted from benchmarks/models_batch_sweep.md, benchmarks/models_results.md -->

Every number of such a region appears in one of those files (the run's figures, not
rounded); with `; rows` after the files, every table row's numbers also appear
together on one line of them, so rows cannot be swapped either.

`tests/test_doc_figures.py` runs the commands that no other test runs; a test that
already runs a documented command checks its figures with `check(command, output)`.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])

_OPEN = re.compile(r"^<!--\s*figures:\s*(.*?)\s*-->\s*$")
_CLOSE = re.compile(r"^<!--\s*/figures\s*-->\s*$")
_QUOTED = re.compile(r"^quoted from ([^;]+?)\s*(;\s*rows)?$")
# 4.8e-07, 3.7e-5, 1e-4; and 98%, 98.4 %
_SCI = r"(?<![\w.])\d+(?:\.\d+)?e[-+]?\d+(?![\w.])"
_PCT = r"(?<![\w.])\d+(?:\.\d+)?(?=\s?%)"
_CODE = re.compile(r"`[^`]*`")
# a number, or a ratio written 0.72x
_NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?(?=x?(?![\w.]))")


@dataclass(frozen=True)
class Region:
    """One marked region: where it is, what prints its figures, and the figures."""

    page: Path
    line: int  # 1-based line of the opening marker
    command: str | None  # None for a quoted region
    source: str | None  # the results file a quoted region quotes
    rtol: float
    atol: float
    lines: str | None
    percent: bool
    rows: bool  # a quoted region: each table row's numbers on one line of the file
    text: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    def figures(self) -> list[float]:
        return numbers(_CODE.sub(" ", self.text), self.percent)


def numbers(text: str, percent: bool = False) -> list[float]:
    """The figures of `text` in order: scientific notation, and percentages if asked."""
    pattern = f"{_SCI}|{_PCT}" if percent else _SCI
    return [float(m.group()) for m in re.finditer(pattern, text)]


def _parse_marker(spec: str, where: str) -> dict:
    quoted = _QUOTED.match(spec)
    if quoted:
        return {"command": None, "source": quoted.group(1), "rtol": 0.0, "atol": 0.0,
                "lines": None, "percent": False, "rows": bool(quoted.group(2))}  # fmt: skip
    command, *options = (part.strip() for part in spec.split(";"))
    out = {"command": command, "source": None, "rtol": None, "atol": 0.0, "lines": None,
           "percent": False, "rows": False}  # fmt: skip
    for option in options:
        key, _, value = option.partition("=")
        if key in ("rtol", "atol") and value:
            out[key] = float(value)
        elif key == "lines" and value:
            re.compile(value)
            out["lines"] = value
        elif key == "percent" and not value:
            out["percent"] = True
        else:
            raise ValueError(f"{where}: unknown figures option {option!r}")
    if not command or out["rtol"] is None:
        raise ValueError(f"{where}: a figures marker needs a command and rtol=: {spec!r}")
    return out


def regions(pages: list[Path] = PAGES) -> list[Region]:
    """Every figures region of the pages, in page order."""
    found = []
    for page in pages:
        # Markers inside a fenced block are an example of the syntax, not a region.
        lines, fenced = [], False
        for line in page.read_text().splitlines():
            if line.strip().startswith("```"):
                fenced = not fenced
            lines.append("" if fenced else line)
        i = 0
        while i < len(lines):
            m = _OPEN.match(lines[i].strip())
            if not m:
                if _CLOSE.match(lines[i].strip()):
                    raise ValueError(f"{page.relative_to(ROOT)}:{i + 1}: /figures without figures")
                i += 1
                continue
            where = f"{page.relative_to(ROOT)}:{i + 1}"
            j = i + 1
            while j < len(lines) and not _CLOSE.match(lines[j].strip()):
                if _OPEN.match(lines[j].strip()):
                    raise ValueError(f"{where}: figures region not closed before line {j + 1}")
                j += 1
            if j == len(lines):
                raise ValueError(f"{where}: figures region never closed (<!-- /figures -->)")
            spec = _parse_marker(m.group(1), where)
            found.append(Region(page, i + 1, text="\n".join(lines[i + 1 : j]), **spec))
            i = j + 1
    return found


def commands() -> list[str]:
    """The distinct commands the docs name, in order of first appearance."""
    return list(dict.fromkeys(r.command for r in regions() if r.command))


def printed(region: Region, output: str) -> list[float]:
    """The figures a region takes from a command's output."""
    keep = []
    for line in output.splitlines():
        m = re.search(region.lines, line) if region.lines else None
        if region.lines is None:
            keep.append(line)
        elif m:  # with groups in `lines=`, only what they capture
            keep.append(" ".join(g for g in m.groups() if g) if m.groups() else line)
    found = numbers("\n".join(keep))
    if region.percent:  # a printed fraction (0.9812) is a percentage in the docs
        found = [
            100 * float(m.group())
            for line in keep
            for m in re.finditer(r"(?<![\w.])0\.\d+(?![\w.])|(?<![\w.])1\.0+(?![\w.])", line)
        ] or found
    return found


def mismatches(region: Region, output: str) -> list[str]:
    """What is wrong with a region's figures given its command's output ([] if nothing)."""
    doc, run = region.figures(), printed(region, output)
    if not doc:
        return [f"{region.where}: a figures region without figures"]
    if len(doc) != len(run):
        return [
            f"{region.where}: the page has {len(doc)} figures {doc}, "
            f"`{region.command}` printed {len(run)} {run}"
        ]
    return [
        f"{region.where}: figure {k + 1} is {d:g} on the page, {r:g} printed by "
        f"`{region.command}` (rtol {region.rtol:g}, atol {region.atol:g})"
        for k, (d, r) in enumerate(zip(doc, run, strict=True))
        if not abs(d - r) <= region.rtol * abs(r) + region.atol
    ]


def check(command: str, output: str) -> None:
    """Asserts that every region naming `command` agrees with `output` (its stdout)."""
    mine = [r for r in regions() if r.command == command]
    assert mine, f"no figures region in the docs names `{command}`"
    bad = [problem for r in mine for problem in mismatches(r, output)]
    assert not bad, (
        "figures in the docs disagree with a run:\n"
        + "\n".join(bad)
        + ("\n\n--- output ---\n" + output[-3000:])
    )


def argv(command: str) -> tuple[dict[str, str], list[str]]:
    """`VAR=value python script.py args` -> ({VAR: value}, [script.py, args])."""
    words = shlex.split(command)
    env = {}
    while words and "=" in words[0] and not words[0].startswith("-"):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    if not words or words[0] != "python":
        raise ValueError(f"a figures command runs `python ...`: {command!r}")
    return env, words[1:]


def _holds(number: str, pool: set[str]) -> bool:
    """`number` is in `pool`, as written or as a pool number rounded to its decimals."""
    if number in pool:
        return True
    decimals = len(number.partition(".")[2]) if "." in number and "e" not in number else None
    if decimals is None:
        return False
    want = float(number.replace(",", ""))
    return any(
        "." in x and "e" not in x and len(x.partition(".")[2]) > decimals
        and round(float(x.replace(",", "")), decimals) == want
        for x in pool
    )  # fmt: skip


def quoted_mismatches(region: Region) -> list[str]:
    """A quoted region's numbers that its results files do not hold (with `rows`: a
    table row's numbers not together on one line of them)."""
    lines = []
    for name in region.source.split(","):
        source = ROOT / name.strip()
        if not source.exists():
            return [f"{region.where}: quotes {name.strip()}, which does not exist"]
        lines += [set(_NUMBER.findall(_CODE.sub(" ", t))) for t in source.read_text().splitlines()]
    every = set().union(*lines)
    bad = []
    for k, line in enumerate(region.text.splitlines()):
        text = _CODE.sub(" ", line)
        if text.strip().startswith("|"):
            if set(text.replace("|", "").strip()) <= set("-: "):
                continue  # a table's rule
            text = "|".join(text.strip().strip("|").split("|")[1:])  # the label cell aside
        nums = [n for n in _NUMBER.findall(text) if n not in {"0", "1"}]
        missing = [n for n in nums if not _holds(n, every)]
        if missing:
            bad.append(f"{region.where}+{k + 1}: {missing} not in {region.source}")
        elif (
            region.rows
            and line.strip().startswith("|")
            and not any(all(_holds(n, t) for n in nums) for t in lines)
        ):
            bad.append(f"{region.where}+{k + 1}: no line of {region.source} has all of {nums}")
    if not region.text.strip():
        bad.append(f"{region.where}: an empty figures region")
    return bad
