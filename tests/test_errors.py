"""Errors that teach: a PyTorch user's first mistakes get a message that names the fix.

Each case is a mistake a new user makes in the first hour (issue 17): NCHW input with
the default channels-last `axis`, a per-example `vmap` without `axis_name`, a concrete
`train` array, and a missing optional dependency. The hint functions are tested
directly, and through `bnjax.apply` where the core already calls them.
"""

from __future__ import annotations

import doctest
import importlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from bnjax._core import extras as _extras
from bnjax._core import validate as _validate
from bnjax._core.validate import feature_mismatch_hint

# --- "did you mean axis=1?" ------------------------------------------------------


@pytest.mark.parametrize(
    ("x_shape", "axes", "features", "expected"),
    [
        # NCHW input, default axis=-1: the channels sit on axis 1.
        ((8, 16, 10, 10), (3,), (16,), "`axis=1`"),
        # (N, C, L) input.
        ((8, 16, 32), (2,), (16,), "`axis=1`"),
        # NHWC input given axis=1 by a user who read PyTorch docs: points back to -1.
        ((4, 8, 8, 16), (1,), (16,), "`axis=-1`"),
        # Two axes have the size: both are named, the first is the one to pass.
        ((4, 16, 16, 3), (3,), (16,), "`axis=1` or `axis=2`"),
        # Tuple features (a per-(C, H) norm): the axes whose sizes match.
        ((4, 3, 5, 7), (3,), (3, 5), "`axis=(1, 2)`"),
    ],
)
def test_feature_mismatch_hint_names_the_axis(x_shape, axes, features, expected):
    hint = feature_mismatch_hint(x_shape, axes, features)
    assert hint.startswith(" Did you mean ")
    assert expected in hint
    assert "explicitly" in hint


def test_feature_mismatch_hint_mentions_nchw_only_for_axis_1():
    assert "NCHW" in feature_mismatch_hint((8, 16, 10, 10), (3,), (16,))
    assert "NCHW" not in feature_mismatch_hint((4, 8, 8, 16), (1,), (16,))


@pytest.mark.parametrize(
    ("x_shape", "axes", "features"),
    [
        ((8, 10, 10, 10), (3,), (16,)),  # no axis has 16 entries: no guess
        ((16, 10), (1,), (16,)),  # only the batch axis matches: never suggested
        ((8, 16), (1,), (16,)),  # the used axis itself matches (not a mismatch)
        ((8, 16), (1,), (4, 4)),  # more feature dims than axes to choose from
    ],
)
def test_feature_mismatch_hint_stays_silent_without_a_candidate(x_shape, axes, features):
    assert feature_mismatch_hint(x_shape, axes, features) == ""


def test_apply_with_nchw_input_suggests_axis_1():
    params, stats = bnjax.init(16)
    x = jnp.ones((8, 16, 10, 10))
    with pytest.raises(ValueError, match=r"Did you mean `axis=1`\?"):
        bnjax.apply(params, stats, x, train=True)


def test_nchw_with_c_equal_w_is_the_trap_a_shape_check_cannot_catch():
    """(N, C, H, W) with C == W and the default axis=-1 runs, over the wrong axis.

    Documented in the README ("The one trap a shape check cannot catch"); the guard is
    to pass `axis` explicitly. This test pins the documented behaviour: both calls run,
    and only `axis=1` normalizes each channel.
    """
    params, stats = bnjax.init(16)
    x = jax.random.normal(jax.random.key(0), (8, 16, 10, 16)) * 3.0 + 5.0
    y_wrong, _ = bnjax.apply(params, stats, x, train=True)  # axis=-1: W, silently
    y_right, _ = bnjax.apply(params, stats, x, train=True, axis=1)
    per_channel = np.asarray(y_right).mean(axis=(0, 2, 3))
    np.testing.assert_allclose(per_channel, 0.0, atol=1e-5)
    assert not np.allclose(np.asarray(y_wrong), np.asarray(y_right), atol=1e-3)


# --- per-example vmap without axis_name --------------------------------------------


def test_per_example_vmap_without_axis_name_points_to_axis_name():
    params, stats = bnjax.init(4)
    x = jnp.ones((8, 4))

    def one_example(xi):
        return bnjax.apply(params, stats, xi, train=True)[0]

    with pytest.raises(ValueError, match="at least 2 dimensions") as info:
        jax.vmap(one_example)(x)
    assert "axis_name='batch'" in str(info.value)
    assert "jax.vmap(f, axis_name='batch')" in str(info.value)


def test_the_hinted_fix_runs():
    """The fix the vmap message gives works: the same numbers as the batched call."""
    params, stats = bnjax.init(4)
    x = jax.random.normal(jax.random.key(1), (8, 4))

    def one_example(xi):
        return bnjax.apply(params, stats, xi, train=True, axis_name="batch")[0]

    y = jax.vmap(one_example, axis_name="batch")(x)
    y_ref, _ = bnjax.apply(params, stats, x, train=True)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-5)


# --- a concrete train array ---------------------------------------------------------


@pytest.mark.parametrize("train", [jnp.array(True), np.array(False)])
def test_concrete_train_array_says_pass_a_bool(train):
    params, stats = bnjax.init(3)
    before = jax.tree.map(np.asarray, stats)
    with pytest.raises(TypeError, match="concrete array") as info:
        bnjax.apply(params, stats, jnp.ones((4, 3)), train=train)
    message = str(info.value)
    assert "train=True" in message and "static_argnames='train'" in message
    # The caller's tree is untouched.
    jax.tree.map(np.testing.assert_array_equal, stats, before)


def test_traced_train_still_says_mark_it_static():
    params, stats = bnjax.init(3)
    step = jax.jit(lambda t: bnjax.apply(params, stats, jnp.ones((4, 3)), train=t)[0])
    with pytest.raises(TypeError, match="static_argnames='train'"):
        step(True)


def test_other_train_types_keep_the_plain_message():
    params, stats = bnjax.init(3)
    with pytest.raises(TypeError, match="must be a Python bool, got int 1"):
        bnjax.apply(params, stats, jnp.ones((4, 3)), train=1)


# --- one message for every missing extra ---------------------------------------------


def _hide(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Make `import <name>` fail as if the package were not installed."""
    for name in list(sys.modules):
        if any(name == n or name.startswith(n + ".") for n in names):
            monkeypatch.delitem(sys.modules, name)
    for n in names:
        monkeypatch.setitem(sys.modules, n, None)


def _forget_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unload every bnjax module but the core, so the next import runs its imports again."""
    for name in list(sys.modules):
        if name.startswith("bnjax.") and not name.startswith("bnjax._core"):
            monkeypatch.delitem(sys.modules, name)


def test_missing_extra_message_is_the_one_spelling():
    assert (
        _extras.missing_extra_message("bnjax.linen", "flax")
        == 'bnjax.linen needs flax: pip install "bnjax[flax]"'
    )
    assert _extras.missing_extra_message("bnjax.training", "optax").endswith(
        'pip install "bnjax[training]"'
    )


def test_require_raises_the_message(monkeypatch):
    _hide(monkeypatch, "flax")
    with pytest.raises(ModuleNotFoundError) as info:
        _extras.require("flax.serialization", by="bnjax.deploy.save_checkpoint")
    assert str(info.value) == 'bnjax.deploy.save_checkpoint needs flax: pip install "bnjax[flax]"'
    assert isinstance(info.value, ImportError)  # `except ImportError` still catches it


def test_needs_raises_the_message(monkeypatch):
    _hide(monkeypatch, "optax")
    with pytest.raises(ModuleNotFoundError, match=r'pip install "bnjax\[training\]"'):
        with _extras.needs("bnjax.training", "optax"):
            import optax  # noqa: F401


def test_a_broken_install_is_not_reported_as_a_missing_extra(monkeypatch):
    """flax present but one of its own dependencies missing: the real error surfaces."""
    _hide(monkeypatch, "msgpack_not_a_real_dependency")
    with pytest.raises(ModuleNotFoundError) as info:
        with _extras.needs("bnjax.linen", "flax"):
            import msgpack_not_a_real_dependency  # noqa: F401
    assert "bnjax" not in str(info.value)


@pytest.mark.parametrize(
    ("module", "hidden", "message"),
    [
        ("bnjax.linen", "flax", 'bnjax.linen needs flax: pip install "bnjax[flax]"'),
        ("bnjax.nnx", "flax", 'bnjax.nnx needs flax: pip install "bnjax[flax]"'),
        ("bnjax.training", "optax", 'bnjax.training needs optax: pip install "bnjax[training]"'),
    ],
)
def test_optional_submodules_say_which_extra(monkeypatch, module, hidden, message):
    _hide(monkeypatch, hidden)
    _forget_tools(monkeypatch)
    with pytest.raises(ModuleNotFoundError) as info:
        importlib.import_module(module)
    assert str(info.value) == message


def test_core_and_flax_free_submodules_import_without_flax_or_optax(monkeypatch):
    """`import bnjax`, interop, flax_interop and deploy need neither flax nor optax."""
    _hide(monkeypatch, "flax", "optax")
    for module in ("bnjax.interop", "bnjax.flax_interop", "bnjax.deploy"):
        _forget_tools(monkeypatch)
        importlib.import_module(module)


def test_checkpoints_without_flax_say_which_extra(monkeypatch, tmp_path):
    from bnjax import deploy

    _hide(monkeypatch, "flax")
    with pytest.raises(ModuleNotFoundError) as info:
        deploy.save_checkpoint(tmp_path / "ckpt", {"step": 0})
    assert str(info.value) == ('bnjax.deploy.save_checkpoint needs flax: pip install "bnjax[flax]"')


# --- the examples in the new docstrings run --------------------------------------------


@pytest.mark.parametrize(
    "function",
    [
        _validate.feature_mismatch_hint,
        _extras.missing_extra_message,
        _extras.needs,
        _extras.require,
    ],
    ids=lambda f: f.__name__,
)
def test_docstring_example(function):
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder().find(function, globs={}):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0 and result.failed == 0
