"""A griffe extension for the docs site: bnjax's `Example:` sections are examples.

bnjax's docstrings head their doctest with `Example:` (singular). Griffe's Google
parser knows only `Examples:`, and renders any other `Word:` heading as an admonition
whose text is Markdown, where `x["running_mean"]` reads as a link. Renaming the heading
when griffe loads a docstring makes mkdocstrings render the doctest as code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_HEADING = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rename `Example:` to `Examples:` in every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        del kwargs
        if obj.docstring is not None:
            obj.docstring.value = _HEADING.sub(r"\1Examples:", obj.docstring.value)
