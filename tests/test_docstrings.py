"""Every docstring example in the package runs and prints what it says.

The modules are found by walking the package (no hand-kept list), and each is tested
where its objects are defined, so an example behind a re-export runs too.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
import bnjax.deploy
import bnjax.flax_interop
import bnjax.interop
import bnjax.linen
import bnjax.nnx
import bnjax.testing
import bnjax.training

MODULES = sorted(m.name for m in pkgutil.walk_packages(bnjax.__path__, "bnjax.") if not m.ispkg) + [
    "bnjax"
]
# Modules whose docstrings carry no example: the public faces (their objects are
# tested where they are defined) and plumbing without public callables.
NO_EXAMPLES = {
    "bnjax",
    "bnjax.deploy",
    "bnjax.interop",
    "bnjax.flax_interop",
    "bnjax.testing",
    "bnjax.linen",
    "bnjax.nnx",
    "bnjax.training",
}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(
        module,
        extraglobs={"bnjax": bnjax, "jax": jax, "jnp": jnp, "np": np},
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
        verbose=False,
    )
    assert result.failed == 0
    if name in NO_EXAMPLES:
        assert result.attempted == 0, f"{name} is a face; its examples belong where defined"


_LIVE_TORCH = ("export_fixture", "match_calls", "locate_divergence")


def test_every_public_function_has_an_example():
    """Each function a face exports has a docstring example (run above where defined).

    `export_fixture`, `match_calls` and `locate_divergence` are the exceptions: they run
    a live torch model (their examples are in docs/porting.md, run with torch).
    """
    faces = ["bnjax", *sorted(NO_EXAMPLES - {"bnjax"})]
    missing = []
    for face in faces:
        module = importlib.import_module(face)
        for name in module.__all__:
            obj = getattr(module, name)
            if not inspect.isfunction(obj) or name in _LIVE_TORCH:
                continue
            doc = getattr(obj, "__doc__", "") or ""
            if ">>>" not in doc:
                missing.append(f"{face}.{name}")
    assert not missing, f"public callables without a docstring example: {missing}"
