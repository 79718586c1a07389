"""The examples in the public docstrings run and print what they say."""

from __future__ import annotations

import doctest
import importlib

import jax.numpy as jnp
import pytest

import bnjax

MODULES = [
    "bnjax._core",
    "bnjax._renorm",
    "bnjax._conventions",
    "bnjax._fold",
    "bnjax._fold_model",
    "bnjax._precise_bn",
    "bnjax._eval_check",
    "bnjax._checkpoint",
    "bnjax._sharded_checkpoint",
    "bnjax.linen",
    "bnjax.nnx",
    "bnjax.flax_interop",
    "bnjax.training",
    "bnjax.interop",
    "bnjax._port",
    "bnjax.testing",
    "bnjax._fixture",
    "bnjax._compare",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(
        module,
        extraglobs={"bnjax": bnjax, "jnp": jnp},
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
        verbose=False,
    )
    assert result.attempted > 0, f"{name} has no docstring example"
    assert result.failed == 0
