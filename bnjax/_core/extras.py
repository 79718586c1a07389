"""Optional dependencies: one message for every missing extra.

`import bnjax` needs only jax and numpy. The submodules that need more import it
through `require` (or inside `needs`), so that a missing package says which bnjax
feature wanted it and the one command that installs it:

    bnjax.linen needs flax: pip install "bnjax[flax]"

The extras are declared in `pyproject.toml` (`[project.optional-dependencies]`);
`EXTRAS` below names, for each optional package, the extra that provides it.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from types import MappingProxyType, ModuleType

#: The extra that installs each optional top-level package (one spelling everywhere).
EXTRAS = MappingProxyType(
    {"flax": "flax", "optax": "training", "tqdm": "deploy", "orbax": "deploy"}
)


def missing_extra_message(by: str, package: str, extra: str | None = None) -> str:
    """The one message for a missing optional dependency.

    Args:
      by: the bnjax feature that needs it, e.g. `"bnjax.linen"`.
      package: the top-level package that is missing, e.g. `"flax"`.
      extra: the bnjax extra that installs it; defaults to `EXTRAS[package]`.

    Returns:
      `'<by> needs <package>: pip install "bnjax[<extra>]"'`.

    Example:
      >>> from bnjax._core.extras import missing_extra_message
      >>> print(missing_extra_message("bnjax.training", "optax"))
      bnjax.training needs optax: pip install "bnjax[training]"
    """
    extra = extra or EXTRAS[package]
    return f'{by} needs {package}: pip install "bnjax[{extra}]"'


def _is_missing(error: ModuleNotFoundError, package: str) -> bool:
    """True if `error` says that `package` itself (not something it imports) is absent."""
    name = error.name or ""
    return name == package or name.startswith(package + ".")


@contextlib.contextmanager
def needs(by: str, package: str, extra: str | None = None) -> Iterator[None]:
    """Turn a missing `package` inside the block into the one missing-extra message.

    Wrap a module's optional imports, keeping them ordinary import statements:

        with needs("bnjax.linen", "flax"):
            import flax.linen as nn

    Args:
      by: the bnjax feature that needs the package (named in the message).
      package: the optional top-level package imported in the block.
      extra: the bnjax extra that installs it; defaults to `EXTRAS[package]`.

    Raises:
      ModuleNotFoundError: `package` is not installed; the message names `by`, the
        package and `pip install "bnjax[extra]"`. A missing module that `package`
        itself imports is re-raised unchanged (that is a broken install, not a
        missing extra).

    Example:
      >>> from bnjax._core.extras import needs
      >>> with needs("bnjax.linen", "flax"):
      ...     import flax.linen as nn
      >>> nn.__name__
      'flax.linen'
    """
    try:
        yield
    except ModuleNotFoundError as error:
        if not _is_missing(error, package):
            raise
        raise ModuleNotFoundError(
            missing_extra_message(by, package, extra), name=error.name
        ) from error


def require(module: str, *, by: str, extra: str | None = None) -> ModuleType:
    """Import `module` (e.g. `"flax.serialization"`), or raise the missing-extra message.

    For imports made inside a function (a feature that needs an extra only when used).

    Args:
      module: the dotted module to import; its top-level package is the one named.
      by: the bnjax feature that needs it (named in the message).
      extra: the bnjax extra that installs it; defaults to the package's entry in `EXTRAS`.

    Returns:
      The imported module.

    Raises:
      ModuleNotFoundError: as `needs`.

    Example:
      >>> from bnjax._core.extras import require
      >>> require("flax.serialization", by="bnjax.deploy.save_checkpoint").__name__
      'flax.serialization'
    """
    with needs(by, module.partition(".")[0], extra):
        return importlib.import_module(module)
