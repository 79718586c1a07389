"""`bnjax.deploy.fold`: one entry point that folds a model of any kind.

linen and nnx models are folded by `fold_flax` (imported only for them, since it needs
Flax), functional models by `fold_model.fold_functional`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bnjax._deploy.fold import Path
from bnjax._deploy.fold_model import fold_functional
from bnjax._model.run import model_kind


def fold(
    model: Any,
    *args: Any,
    pairs: Sequence[tuple[Path, Path]] | None = None,
    check: bool = True,
    rtol: float = 1e-4,
    **kwargs: Any,
) -> Any:
    """Folds every BatchNorm of a whole model into the Conv or Dense that feeds it.

    Three kinds of model, told apart by `model`:

    - linen: `fold(module, variables, *sample_args, **sample_kwargs)` with the
      eval-mode call (e.g. `train=False`); returns a `FoldedLinen`: run
      `folded.apply(folded.variables, x, train=False)`.
    - nnx: `fold(model, *sample_args, **sample_kwargs)`; returns a folded copy of the
      module in eval mode (`model` is not changed): run `folded(x)`.
    - functional: `fold(apply_fn, params, batch_stats, *sample_args, pairs=[...])`
      where `apply_fn(params, batch_stats, *args, bn) -> (outputs, new_batch_stats)`
      is the eval-mode forward calling `bn` (`bnjax.apply`'s signature, passed last)
      for every BatchNorm (a model of `bnjax.batch_norm` layers may instead return
      each layer's `layer.report(None)` at its place, and pass a BatchNorm whose
      entry is a `FoldedBatchNorm()` through); returns a `FoldedFunctional`: run
      `folded.apply(folded.params, folded.batch_stats, x)`.

    For linen and nnx the pairs are found on the sample call: a bnjax BatchNorm whose
    input is exactly the output of a `Conv` or `Dense` (`nnx.Linear`), normalizing its
    last (output-channel) axis, in eval mode with running statistics. Each
    BatchNorm's `eps` is its own (`epsilon`). Blocks under `nn.scan` fold too (their
    stacked kernels and statistics are folded slice by slice).

    Args:
      model: a `flax.linen.Module`, a `flax.nnx.Module`, or a functional `apply_fn`.
      *args: linen: `variables`, then the sample call's positional arguments; nnx:
        the sample call's arguments; functional: `params`, `batch_stats`, then the
        sample arguments.
      pairs: `(layer_path, bn_path)` to fold only these (paths as tuples of keys or
        `"a/b"` strings); each must be a pair the model makes (linen, nnx). Required
        for a functional model, whose layers cannot be watched.
      check: run the folded model on the sample and raise if its outputs differ from
        the original's by more than `rtol` (relative to the largest output).
      rtol: the tolerance of that check.
      **kwargs: the sample call's keyword arguments (linen, nnx), e.g. `train=False`.

    Returns:
      `FoldedLinen`, a folded nnx module, or `FoldedFunctional` (see above).

    Raises:
      ValueError: a listed pair the model does not make, a BatchNorm that runs in
        training mode or without running statistics, a functional model without
        `pairs` or whose `bn` does not return each BatchNorm's entry, or (with
        `check`) folded outputs that differ from the original's.

    Example:
      >>> import flax.linen as nn, bnjax.linen
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, train):
      ...         x = nn.Conv(4, (3, 3), use_bias=False)(x)
      ...         return bnjax.linen.BatchNorm(epsilon=1e-3)(x, train=train)
      >>> x = jnp.ones((2, 5, 5, 3))
      >>> variables = Net().init(jax.random.key(0), x, train=False)
      >>> folded = fold(Net(), variables, x, train=False)
      >>> folded.pairs[0].eps, sorted(folded.variables["params"]["Conv_0"])
      (0.001, ['bias', 'kernel'])
      >>> folded.apply(folded.variables, x, train=False).shape
      (2, 5, 5, 4)
    """
    kind = model_kind(model, "bnjax.deploy.fold")
    if kind == "linen":
        if not args:
            raise ValueError(
                "bnjax.deploy.fold: a linen model needs its variables: "
                "fold(module, variables, *sample_args, **sample_kwargs)."
            )
        from bnjax._deploy import fold_flax

        return fold_flax.fold_linen(model, args[0], args[1:], kwargs, pairs, check, rtol)
    if kind == "nnx":
        from bnjax._deploy import fold_flax

        return fold_flax.fold_nnx(model, args, kwargs, pairs, check, rtol)
    if len(args) < 2:
        raise ValueError(
            "bnjax.deploy.fold: a functional model is folded as "
            "fold(apply_fn, params, batch_stats, *sample_args, pairs=[...])."
        )
    return fold_functional(model, args[0], args[1], args[2:], kwargs, pairs, check, rtol)
