"""BatchNorm statistics by path, in any tree type: the one way every tool reads and writes them.

A model's statistics come as nested dicts, Flax `FrozenDict`s or `nnx.State`s (whose
`Variable` boxes hold the arrays). Every tool addresses one BatchNorm by its *path*,
a tuple of plain keys (`("layer1", 0, "bn1")`), the same path its
`bnjax.BatchNormReport` has:

- `plain_path` turns a JAX key path into that tuple (nnx `Variable` boxes looked
  through);
- `stats_at` / `reports_at` list every BatchNorm's statistics / report by path, in the
  tree's order;
- `get` reads a node by path; `replace` returns the tree with some BatchNorms'
  statistics replaced, of the caller's tree type;
- `TreeView` flattens any statistics tree to nested plain dicts and back to the
  caller's type (what the training step and its policies work on);
- `write_nnx` writes statistics into an nnx model's BatchNorms, by path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from bnjax._core.conventions import is_batch_stats
from bnjax._core.report import BatchNormReport

KeyPath = tuple[Any, ...]
PyTree = Any


def plain_path(path: Any) -> KeyPath:
    """A JAX key path as a tuple of plain keys (an nnx `Variable`'s box is looked through).

    Args:
      path: a key path from `jax.tree_util.tree_flatten_with_path` (or plain keys).

    Returns:
      The dict keys, attribute names and sequence indices, in order.

    Example:
      >>> leaves = jax.tree_util.tree_flatten_with_path({"a": [0, {"b": 1}]})[0]
      >>> plain_path(leaves[1][0])
      ('a', 1, 'b')
    """
    keys = []
    for entry in path:
        if isinstance(entry, jax.tree_util.GetAttrKey):
            if entry.name == "value":  # an nnx Variable's box
                continue
            keys.append(entry.name)
        elif isinstance(entry, jax.tree_util.SequenceKey):
            keys.append(entry.idx)
        elif isinstance(entry, (jax.tree_util.DictKey, jax.tree_util.FlattenedIndexKey)):
            keys.append(entry.key)
        else:
            keys.append(entry)
    return tuple(keys)


def path_name(path: KeyPath) -> str:
    """`"layer1/0/bn1"` for `("layer1", 0, "bn1")`; `"<root>"` for `()`."""
    return "/".join(str(p) for p in path) or "<root>"


def is_report(node: Any) -> bool:
    return isinstance(node, BatchNormReport)


def stats_at(tree: PyTree) -> dict[KeyPath, Any]:
    """Every BatchNorm's statistics (a mapping with `STAT_KEYS`) by path, in tree order.

    Example:
      >>> _, s = bnjax.init(2)
      >>> list(stats_at({"block": {"bn": s}, "head": {}}))
      [('block', 'bn')]
    """
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_batch_stats)[0]
    return {plain_path(path): leaf for path, leaf in leaves if is_batch_stats(leaf)}


def reports_at(tree: PyTree) -> dict[KeyPath, BatchNormReport]:
    """Every `BatchNormReport` of a tree by path, in tree order."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_report)[0]
    return {plain_path(path): leaf for path, leaf in leaves if is_report(leaf)}


def get(tree: PyTree, path: KeyPath, default: Any = None) -> Any:
    """The node at `path` (mapping keys, attributes or indices), or `default`."""
    node = tree
    for key in path:
        if isinstance(node, Mapping):
            if key not in node:
                return default
            node = node[key]
        elif isinstance(key, int) and isinstance(node, (list, tuple)) and key < len(node):
            node = node[key]
        elif isinstance(key, str) and hasattr(node, key):
            node = getattr(node, key)
        else:
            return default
    return node


def replace(tree: PyTree, new: Mapping[KeyPath, Any]) -> PyTree:
    """`tree` with the BatchNorm statistics at the paths of `new` replaced.

    The containers keep their types (dict, `FrozenDict`, ...); the caller's tree is
    not modified. Every path of `new` must be a BatchNorm's statistics in `tree`.

    Example:
      >>> _, s = bnjax.init(1)
      >>> out = replace({"bn": s}, {("bn",): dict(s, running_mean=jnp.ones(1))})
      >>> out["bn"]["running_mean"].tolist(), s["running_mean"].tolist()
      ([1.0], [0.0])
    """
    missing = set(new) - set(stats_at(tree))
    if missing:
        raise KeyError(f"no BatchNorm statistics at {sorted(map(path_name, missing))}.")
    return jax.tree_util.tree_map_with_path(
        lambda path, node: new.get(plain_path(path), node) if is_batch_stats(node) else node,
        tree,
        is_leaf=is_batch_stats,
    )


class TreeView:
    """A statistics tree as nested plain dicts, and back to the caller's tree type.

    Works for dicts, `FrozenDict`s and `nnx.State`s (whose `Variable` boxes are
    looked through), so that the tools see one convention.

    Example:
      >>> _, s = bnjax.init(1)
      >>> view = TreeView({"bn": s}, "example")
      >>> plain = view.plain(jax.tree.leaves({"bn": s}))
      >>> sorted(plain["bn"])
      ['num_batches_tracked', 'running_mean', 'running_var']
    """

    def __init__(self, tree: PyTree, who: str):
        with_paths, self.treedef = jax.tree_util.tree_flatten_with_path(tree)
        self.paths = [plain_path(path) for path, _ in with_paths]
        if len(set(self.paths)) != len(self.paths):
            raise ValueError(
                f"{who}: batch_stats must be nested mappings (dicts, FrozenDicts, "
                f"nnx.States) of arrays; got structure {self.treedef}."
            )

    def plain(self, leaves: list[Any]) -> PyTree:
        """Nested plain dicts holding `leaves` (in the tree's flatten order)."""
        if self.paths == [()]:
            return leaves[0]
        root: dict[Any, Any] = {}
        for path, leaf in zip(self.paths, leaves, strict=True):
            node = root
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = leaf
        return root

    def leaves(self, plain: PyTree) -> list[Any]:
        """The leaves of a plain tree, in the caller's tree's flatten order."""
        out = []
        for path in self.paths:
            node = plain
            for key in path:
                node = node[key]
            out.append(node)
        return out

    def user(self, plain: PyTree) -> PyTree:
        """A plain tree back in the caller's tree type."""
        return jax.tree.unflatten(self.treedef, self.leaves(plain))


def write_nnx(model: Any, new: Mapping[KeyPath, Mapping[str, Any]]) -> Any:
    """Writes statistics into an nnx model's BatchNorms (`path -> {key: array}`); returns it."""
    for path, stats in new.items():
        bn = model
        for key in path:
            bn = bn[key] if isinstance(key, int) else getattr(bn, key)
        for key, value in stats.items():
            getattr(bn, key)[...] = value
    return model
