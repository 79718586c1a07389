"""Every figure in the docs agrees with the command named beside it (`tests/doc_figures.py`).

The commands that another test already runs are checked there, from that run's output
(`CHECKED_ELSEWHERE` says where); the others run here. Benchmark timings are quoted
from the results file their script writes, and checked against it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import doc_figures as F
import pytest

# Commands whose figures a test that runs them anyway checks (one run, two uses).
CHECKED_ELSEWHERE = {
    "python examples/train_digits.py": "test_examples.py",
    "python examples/port_resnet.py --fixture": "test_examples.py",
    "python examples/data_parallel.py --processes 2 --epochs 1 --batch-size 128 --no-local-bn": (
        "test_examples.py"
    ),
    "python examples/data_parallel.py": "test_distributed.py",
    "XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/_distributed_checks.py": (
        "test_distributed.py"
    ),
    "python tests/test_multiprocess.py": "test_multiprocess.py",
}
# Commands run here: command -> (timeout in seconds, slow: over ~20 s on 2 cores).
RUN_HERE = {
    "python scripts/perf_numerics.py": (300, False),
    "python scripts/measure_deploy.py": (600, True),
    # no other test sees every scenario in one process (pytest-xdist splits the module)
    'python -m pytest tests/test_torch_equivalence.py -s -q -k "not reproducible"': (900, True),
}


def test_every_region_is_well_formed_and_checked() -> None:
    regions = F.regions()  # raises on a malformed marker or an unclosed region
    assert regions, "no figures regions found"
    for region in regions:
        if region.command is None:
            continue
        assert region.figures(), f"{region.where}: no figures in the region"
        assert region.command in CHECKED_ELSEWHERE or region.command in RUN_HERE, (
            f"{region.where}: nothing runs `{region.command}`; add it to RUN_HERE "
            "(or check it in the test that runs it, and list it in CHECKED_ELSEWHERE)"
        )
    for command, test_file in CHECKED_ELSEWHERE.items():
        source = (Path(__file__).parent / test_file).read_text()
        assert repr(command) in source or f'"{command}"' in source, (
            f"{test_file} does not name `{command}`: it cannot be checking its figures"
        )
        assert "doc_figures.check(" in source or "F.check(" in source, test_file
        assert command in F.commands(), f"no page names `{command}` any more"


def test_quoted_figures_equal_the_results_file() -> None:
    bad = [problem for r in F.regions() if r.source for problem in F.quoted_mismatches(r)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(c, marks=[pytest.mark.slow] if slow else [])
        for c, (_, slow) in RUN_HERE.items()
    ],
)
def test_figures_agree_with_a_run(command: str) -> None:
    """The commands no other test runs."""
    env, args = F.argv(command)
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=F.ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
        capture_output=True,
        text=True,
        timeout=RUN_HERE[command][0],
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    F.check(command, proc.stdout)


# The mechanism itself: a swapped row fails, a row within tolerance passes.
PAGE = """\
text before 9.9e-9
<!-- figures: python x.py; rtol=0.1; lines=shard_map|jit -->
| run | params | stats |
|---|---|---|
| shard_map | 2.2e-7 | 6.0e-7 |
| jit | 3.7e-5 | 1.6e-5 |
<!-- /figures -->
"""
OUTPUT = """\
1 device params 0.00e+00
  shard_map  params 2.24e-07  batch_stats 5.96e-07
  jit        params 3.67e-05  batch_stats 1.56e-05
"""


def _region(tmp_path: Path, text: str) -> F.Region:
    page = tmp_path / "page.md"
    page.write_text(text)
    (region,) = F.regions([page])
    return region


def test_a_swapped_row_fails(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(F, "ROOT", tmp_path)
    good = _region(tmp_path, PAGE)
    assert good.figures() == [2.2e-7, 6.0e-7, 3.7e-5, 1.6e-5]  # 9.9e-9 is outside
    assert F.mismatches(good, OUTPUT) == []
    swapped = PAGE.replace("2.2e-7 | 6.0e-7", "@").replace("3.7e-5 | 1.6e-5", "2.2e-7 | 6.0e-7")
    bad = _region(tmp_path, swapped.replace("@", "3.7e-5 | 1.6e-5"))  # the mistake
    assert len(F.mismatches(bad, OUTPUT)) == 4
    off = _region(tmp_path, PAGE.replace("6.0e-7", "7.0e-7"))  # 17% off, rtol 10%
    assert len(F.mismatches(off, OUTPUT)) == 1
    fewer = _region(tmp_path, PAGE.replace("| 6.0e-7 |", "| |"))
    assert "3 figures" in F.mismatches(fewer, OUTPUT)[0]


def test_a_marker_in_a_code_block_is_an_example(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(F, "ROOT", tmp_path)
    page = tmp_path / "page.md"
    page.write_text("```text\n<!-- figures: python x.py; rtol=0.1 -->\n1e-3\n```\n")
    assert F.regions([page]) == []


def test_malformed_markers_are_errors(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(F, "ROOT", tmp_path)
    with pytest.raises(ValueError, match="never closed"):
        _region(tmp_path, "<!-- figures: python x.py; rtol=0.1 -->\n1e-3\n")
    with pytest.raises(ValueError, match="needs a command and rtol"):
        _region(tmp_path, "<!-- figures: python x.py -->\n1e-3\n<!-- /figures -->\n")
    with pytest.raises(ValueError, match="unknown figures option"):
        _region(tmp_path, "<!-- figures: python x.py; rtol=0.1; tol=2 -->\n<!-- /figures -->\n")


def test_a_quoted_row_must_be_one_line_of_the_results_file(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(F, "ROOT", tmp_path)
    (tmp_path / "results.md").write_text("| a | 0.997 | 1.037 |\n| b | 0.981 | 1.014 |\n")
    page = "<!-- figures: quoted from results.md; rows -->\n| a | {} | {} |\n<!-- /figures -->\n"
    assert F.quoted_mismatches(_region(tmp_path, page.format("0.997", "1.037"))) == []
    assert F.quoted_mismatches(_region(tmp_path, page.format("0.997", "1.014")))  # mixed rows
    assert F.quoted_mismatches(_region(tmp_path, page.format("0.998", "1.037")))  # not there
    loose = _region(tmp_path, page.replace("; rows", "").format("0.997", "1.014"))
    assert F.quoted_mismatches(loose) == []  # without `rows`, each number on its own
