"""Porting a whole model: `from_torch`, `to_torch` and `match_layers` (see `bnjax.interop`)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, Literal

import jax.numpy as jnp
import numpy as np

from bnjax._interop import pairing as L
from bnjax._interop.pairing import Match, Matching, Rename

DtypeRule = Literal["template", "source"] | None

_MAX_LISTED = 20  # problems listed in an error before "and N more"
_MAX_PAIRS = 8  # pairs shown in an error (`match_layers` prints all)

_CALLS_FIX = (
    "pair by what the models compute: `matching = bnjax.interop.match_calls(torch_model, "
    "(x,), flax_model, (x_flax,), train=False)`, then `match=matching`"
)
_SIZES_FIX = (
    "Fix: these layers' sizes differ between the two models (the shapes below): build "
    "both with the same sizes."
)
_SORTED = (
    "These variables have sorted keys (`jax.jit`, `jax.eval_shape` and `jax.tree.map` sort "
    "dict keys): build the template with `bnjax.interop.flax_template(model, x)` (or pass "
    "`model.init`'s output as it comes), or pass `definition_order=template`."
)


def flax_template(model: Any, *args: Any, rng: Any = None, **kwargs: Any) -> Any:
    """A linen model's variables as shapes and dtypes, in definition (call) order.

    The template `from_torch` and `to_torch` need, without computing anything: like
    `jax.eval_shape(model.init, ...)`, but with every dict in the order the modules were
    first called (eval_shape, jit and tree maps sort keys), which is what pairs Flax's
    automatic names (`Conv_0`, `BatchNorm_0`, `BasicBlock_3`) with torch's modules.

    Args:
      model: a `flax.linen.Module`.
      *args: the inputs of `model.init` after the rng (e.g. a batch).
      rng: the init key (default `jax.random.key(0)`; only shapes are computed).
      **kwargs: keyword inputs of `model.init` (e.g. `train=False`, static).

    Returns:
      `{"params": ..., "batch_stats": ...}` with `jax.ShapeDtypeStruct` leaves.

    Example:
      >>> import flax.linen as nn
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         return nn.Dense(2)(nn.LayerNorm()(nn.Conv(3, (1,))(x)))
      >>> list(flax_template(Net(), jnp.ones((1, 4, 2)))["params"])
      ['Conv_0', 'LayerNorm_0', 'Dense_0']
    """
    import jax

    orders: list[list[tuple[Any, ...]]] = []

    def init(key: Any, *a: Any) -> Any:
        variables = model.init(key, *a, **kwargs)
        orders.append([path for path, _ in L.walk_template(variables)])
        return variables

    key = jax.random.key(0) if rng is None else rng
    abstract = jax.eval_shape(init, key, *args)
    return _reorder(abstract, orders[0])


def astype(variables: Any, dtype: Any) -> Any:
    """`variables` with every floating-point leaf in `dtype`, keeping the dicts' order.

    For a float64 (or bfloat16) port from a float32 template: `jax.tree.map` would
    sort the dicts' keys (losing the call order that pairs Flax's automatic names);
    this keeps them. Integer leaves (`num_batches_tracked`) and containers (linen
    dicts, `nnx.State`, nnx Variables, tuples) are kept. float64 needs
    `jax.config.update("jax_enable_x64", True)` (or `with jax.enable_x64(True):`).

    Args:
      variables: linen variables (arrays or `jax.ShapeDtypeStruct`s, e.g.
        `flax_template`'s output), an `nnx.State`, or a tuple of them.
      dtype: the floating-point dtype, e.g. `jnp.float64`.

    Returns:
      The same structure, in the same order, floating leaves in `dtype`.

    Example:
      >>> t = {"params": {"b": {"kernel": jnp.ones((2, 2))}, "a": {"bias": jnp.ones(2)}}}
      >>> w = astype(t, jnp.bfloat16)
      >>> list(w["params"]), w["params"]["b"]["kernel"].dtype
      (['b', 'a'], dtype(bfloat16))
    """
    import jax

    target = jnp.dtype(dtype)
    if not jnp.issubdtype(target, jnp.floating):
        raise ValueError(f"bnjax.interop.astype: dtype must be floating-point, got {target}.")
    new: dict[tuple[Any, ...], Any] = {}
    for key_path, leaf in L.walk_template(variables):
        value = L.leaf_value(leaf)
        if not jnp.issubdtype(getattr(value, "dtype", np.dtype(object)), jnp.floating):
            continue
        if isinstance(value, jax.ShapeDtypeStruct):
            new[key_path] = jax.ShapeDtypeStruct(value.shape, target)
        else:
            new[key_path] = jnp.asarray(value, target)
    return _rebuild(variables, new, ())


def reorder_like(tree: Any, like: Any) -> Any:
    """`tree` (a linen variables dict) with its dicts' keys in `like`'s order."""
    if not isinstance(tree, Mapping) or type(tree).__name__ == "State":
        return tree
    return _reorder(tree, [path for path, _ in L.walk_template(like)])


def _reorder(tree: Any, paths: list[tuple[Any, ...]]) -> Any:
    """`tree` with its dicts' keys in the order they first appear in `paths`."""
    rank: dict[tuple[Any, ...], int] = {}
    for path in paths:
        for i in range(1, len(path) + 1):
            rank.setdefault(path[:i], len(rank))

    def build(node: Any, prefix: tuple[Any, ...]) -> Any:
        if not isinstance(node, Mapping):
            return node
        keys = sorted(node, key=lambda k: rank.get((*prefix, k), len(rank)))
        return {k: build(node[k], (*prefix, k)) for k in keys}

    return build(tree, ())


def match_layers(
    state_dict: Any,
    variables: Any,
    *,
    rename: Rename = None,
    match: Match = "auto",
    conv_transpose: Collection[str] = (),
) -> Matching:
    """Pairs a torch model's modules with a Flax model's layers, without converting.

    The pairing `from_torch` and `to_torch` use; `print` it to see what goes where.

    Args:
      state_dict: a torch `state_dict` (tensors or arrays) or a torch module.
      variables: the Flax model's variables (see `from_torch`).
      rename: torch module paths (or prefixes) to Flax paths, a mapping or a function.
      match: `"auto"` (by path, then the rest by definition order), `"path"` or
        `"order"`.
      conv_transpose: module paths (torch's or Flax's) that are ConvTranspose layers.

    Returns:
      A `Matching`: `pairs` (torch path, Flax path, kind, `"path"` or `"order"`), and
      the torch and Flax module paths left unmatched.

    Raises:
      ValueError: a layer of an unknown kind, or a bad `match`.

    Example:
      >>> sd = {"fc.weight": np.zeros((2, 3), np.float32), "fc.bias": np.zeros(2, np.float32)}
      >>> variables = {"params": {"Dense_0": {"kernel": np.zeros((3, 2), np.float32),
      ...                                     "bias": np.zeros(2, np.float32)}}}
      >>> print(match_layers(sd, variables))
      torch  ->  flax  [kind, matched by]
      fc     ->  Dense_0  [dense, order]
    """
    tl = L.torch_layers(state_dict, conv_transpose)
    fl = L.flax_layers(variables, conv_transpose)
    return L.match(tl, fl, rename=rename, mode=match)


def from_torch(
    state_dict: Any,
    variables: Any,
    *,
    rename: Rename = None,
    match: Match | Matching = "auto",
    conv_transpose: Collection[str] = (),
    strict: bool = True,
    definition_order: Any = None,
    dtype: DtypeRule = None,
) -> Any:
    """Loads a PyTorch `state_dict` into a Flax model's variables, all layers at once.

    `variables` is the template: the Flax model's own initialized variables, whose
    structure, names, shapes and dtypes the result has. Each torch module is paired
    with a Flax layer (`match_layers`) and converted to Flax's layout:

    | torch | Flax |
    |---|---|
    | `Linear.weight (out, in)` | `Dense kernel (in, out)` |
    | `Conv{1,2,3}d.weight (O, I/groups, *K)` | `Conv kernel (*K, I/groups, O)` |
    | `ConvTranspose{1,2,3}d.weight (I, O, *K)` | `ConvTranspose kernel (*K, I, O)`, flipped |
    | `Embedding.weight` | `Embed embedding` |
    | `LayerNorm`/`GroupNorm` `weight` | `scale` |
    | `BatchNorm{1,2,3}d` | `bnjax.linen/nnx.BatchNorm`: the same names |
    | `bias`, running statistics | the same names; `num_batches_tracked` int64 -> int32 |

    Pairing: a torch module path maps to a Flax path by the default rule (`.` <-> `/`,
    `N` <-> `N`, `layers_N` (linen `nn.Sequential`) or `layers/N` (`nnx.Sequential`)),
    after `rename`; with `match="auto"` the layers left over (e.g. Flax's automatic
    names `Conv_0`, `BatchNorm_0`) are paired in order among layers of the same kind
    and shapes, only where that order is known: numbered siblings in number order
    (`Block_2` before `Block_10`, whatever the dict order), and each order pair must
    sit between the same neighbours on both sides (torch's registration order is not
    always Flax's call order); anything else is an error that says what to pass. A 1x1
    `Conv*d` loads into a `Dense` (and a `Linear` into a 1x1 `Conv`).
    `match=match_calls(...)` pairs by what the models compute instead.

    Args:
      state_dict: a torch `state_dict` (tensors, NumPy or JAX arrays; no torch import
        needed) or a torch module (whose module classes then mark ConvTranspose layers).
      variables: the template: linen variables (`{"params", "batch_stats"}`) from
        `flax_template(model, ...)` (shapes only) or `model.init(...)`, an `nnx.State`
        (`nnx.state(model)`), or a tuple of them (`nnx.split(model, nnx.Param, ...)[1:]`).
        Order matching uses its definition order: `jax.jit`/`eval_shape`/tree maps
        sort dict keys (an error says so), and `nnx.State` sorts names, so nnx models
        should match by path. Other linen collections and nnx RNG state are ignored.
      rename: `{torch module path or prefix: Flax path}` (`"a.b"` / `"a/b"`), or a
        function from a torch module path to a Flax path (`None` keeps the path).
      match: `"auto"` (by path, then the rest by order where the order is certain),
        `"path"`, `"order"`, or a `Matching` from `match_calls` (pairs by what the
        models compute; the reliable way for models whose names differ).
      conv_transpose: module paths (torch's or Flax's) that are ConvTranspose layers;
        Flax's `ConvTranspose_N` names and torch modules passed in are found alone.
      strict: every torch entry and every Flax variable must be paired (PyTorch's
        `load_state_dict(strict=True)`); `False` skips unpaired ones (they keep the
        template's values). Shape mismatches are errors either way.
      definition_order: variables in definition (call) order (`flax_template`'s
        output) whose order pairs the automatic names when `variables` had its keys
        sorted (`jax.jit`, `eval_shape`, tree maps).
      dtype: what a floating-point entry whose dtype differs from the template's
        becomes: `None` (default) takes the template's dtype when that holds every
        value exactly (float32 into float64) and raises, naming the entries, when it
        would round them (float64 into float32, float32 into bfloat16);
        `"template"` converts anyway; `"source"` keeps the state_dict's.
        `num_batches_tracked` is always the template's integer type.

    Returns:
      New variables of `variables`' type, structure and key order (JAX arrays),
      with the template's dtypes (or the source's with `dtype="source"`). For nnx,
      `nnx.update(model, result)`.
      ConvTranspose kernels are for Flax's default `transpose_kernel=False`.

    Raises:
      ValueError: one error, the fix first, listing the missing, unexpected and
        mis-shaped keys (torch and Flax names and shapes); layers that only an order
        could pair where the order is not known (sorted keys, registration order that
        is not the call order); a template dtype that would round the state_dict's
        values (with `dtype=None`); a layer of an unknown kind.
      TypeError: `state_dict` is not a mapping or a torch module, or holds non-arrays.

    Example:
      >>> sd = {"fc.weight": np.arange(6.0, dtype=np.float32).reshape(2, 3),
      ...       "fc.bias": np.zeros(2, np.float32)}
      >>> variables = {"params": {"fc": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}}
      >>> from_torch(sd, variables)["params"]["fc"]["kernel"]
      Array([[0., 3.],
             [1., 4.],
             [2., 5.]], dtype=float32)
    """
    ordered = variables if definition_order is None else reorder_like(variables, definition_order)
    tl = L.torch_layers(state_dict, conv_transpose)
    fl = L.flax_layers(ordered, conv_transpose)
    matching = L.match(tl, fl, rename=rename, mode=match)
    _raise_if_ambiguous("from_torch", matching, ordered)
    tby, fby = {t.path: t for t in tl}, {L.flax_str(f.path): f for f in fl}
    problems = _Problems(
        "bnjax.interop.from_torch: the state_dict does not fit the variables",
        "Fix: " + _CALLS_FIX + "; or name the Flax submodules after torch's (`layer1.0.conv1` "
        "<-> `layer1/0/conv1`) or pass `rename={torch_path: flax_path}`; or check the layer "
        "sizes. `print(bnjax.interop.match_layers(state_dict, variables))` shows the pairs.",
    )
    narrowed: list[str] = []
    new: dict[tuple[Any, ...], Any] = {}
    for pair in matching.pairs:
        t, f = tby[pair.torch], fby[pair.flax]
        for tleaf, fleaf in _leaf_pairs(t, f, pair.kind, problems, strict):
            key = L.torch_key(t.path, tleaf)
            key_path, template = f.leaves[fleaf]
            like = L.leaf_value(template)
            arr = L.to_numpy(t.leaves[tleaf], key)
            target = L.leaf_shape(like)
            if tleaf == "num_batches_tracked":
                arr = L.check_count(arr, key, like.dtype)
            elif tleaf == "weight":
                arr = L.weight_to_flax(arr, pair.kind)
                if pair.kind == "dense_conv1x1" and arr.size == int(np.prod(target)):
                    arr = arr.reshape(target)
            if arr.shape != target:
                problems.shape(
                    key, _shape_str(t.leaves[tleaf]), _path_str(key_path), arr.shape, target
                )
                continue
            out_dtype = np.dtype(like.dtype)
            if tleaf != "num_batches_tracked" and arr.dtype != out_dtype:
                if dtype == "source":
                    out_dtype = arr.dtype
                elif dtype is None and not np.can_cast(arr.dtype, out_dtype, "safe"):
                    narrowed.append(f"'{key}' {arr.dtype} -> {_path_str(key_path)} {out_dtype}")
            new[key_path] = jnp.asarray(np.array(arr, out_dtype, order="C"))
    if dtype not in (None, "template", "source"):
        raise ValueError(
            f"bnjax.interop.from_torch: dtype must be None, 'template' or 'source', got {dtype!r}."
        )
    if narrowed:
        raise ValueError(_dtype_error(narrowed))
    if strict:
        for path in matching.unmatched_torch:
            for leaf, v in tby[path].leaves.items():
                problems.unexpected(
                    f"'{L.torch_key(path, leaf)}' {_shape_str(v)}{_kind_note(leaf)}"
                )
        for path in matching.unmatched_flax:
            for key_path, v in fby[path].leaves.values():
                problems.missing(f"{_path_str(key_path)} {_shape_str(L.leaf_value(v))}")
    problems.raise_if_any(matching, variables)
    return _rebuild(variables, new, ())


def to_torch(
    variables: Any,
    reference: Any = None,
    *,
    rename: Rename = None,
    match: Match | Matching = "auto",
    conv_transpose: Collection[str] = (),
    definition_order: Any = None,
    return_tensors: bool = False,
    strict: bool = True,
    dtype: Literal["reference", "source"] | None = "reference",
) -> dict[str, Any]:
    """A Flax model's variables as a PyTorch `state_dict`, all layers at once.

    The inverse of `from_torch`: torch's names and layouts, `num_batches_tracked` as
    int64. With `reference` (the torch model's `state_dict()` or the module) layers are
    paired as in `from_torch` (so Flax's automatic names work), every value gets the
    reference's dtype and the keys come in the reference's order: the result loads
    with `load_state_dict(..., strict=True)` and `from_torch` -> `to_torch` gives the
    original back bit for bit. Without `reference` the torch names come from the Flax
    paths by the default rule (so the Flax modules must be named after torch's).

    Args:
      variables: the Flax model's variables (a linen dict, an `nnx.State`, a tuple).
      reference: a torch `state_dict` (tensors or arrays, only keys, shapes and dtypes
        are read) or a torch module.
      rename: as in `from_torch` (torch path -> Flax path); without `reference` only a
        mapping.
      match: as in `from_torch`; used with `reference`.
      conv_transpose: as in `from_torch`.
      definition_order: variables whose dicts are in definition order (the template
        from `flax_template` or `model.init`), to restore that order in `variables`
        when `jax.jit` or a tree map sorted its keys (which matters for Flax's
        automatic names: see `flax_template`).
      return_tensors: return `torch.Tensor`s (imports torch) instead of NumPy arrays.
      strict: with `reference`, every reference entry and every Flax layer must be
        paired; `False` exports what pairs (a part of a model, e.g. a backbone), in
        the reference's order, and skips the rest.
      dtype: with `reference`, what a floating-point value whose dtype differs from
        the reference's becomes: `"reference"` (default) converts to the reference's
        dtype (what `load_state_dict` does with it anyway); `"source"` keeps the
        variables'; `None` raises, naming the entries. `num_batches_tracked` is always
        int64.

    Returns:
      A flat `dict` from torch keys to fresh NumPy arrays (or tensors).

    Raises:
      ValueError: with `reference`, one error listing every missing, unexpected and
        mis-shaped key; without it, Flax's automatic names (`Conv_0`), which name no
        torch module (pass `reference=`); a layer of an unknown kind.

    Example:
      >>> variables = {"params": {"fc": {"kernel": jnp.zeros((3, 2)), "bias": jnp.ones(2)}}}
      >>> {k: v.shape for k, v in to_torch(variables).items()}
      {'fc.weight': (2, 3), 'fc.bias': (2,)}
    """
    if definition_order is not None:
        variables = reorder_like(variables, definition_order)
    fl = L.flax_layers(variables, conv_transpose)
    out: dict[str, np.ndarray] = {}
    if reference is None:
        auto = sorted({n for f in fl for n in L.auto_named(f.path)})
        if auto:
            raise ValueError(
                f"bnjax.interop.to_torch: Flax's automatic names {auto} name no torch "
                "module, so the torch keys cannot come from the Flax paths. Pass the torch "
                "model's `reference=model.state_dict()` (layers are then paired by order), "
                "or name the Flax submodules after torch's."
            )
        inverse = _inverse_rename(rename)
        for f in fl:
            tpath = inverse(L.norm_flax_path(f.path))
            for fleaf in _torch_order(f, f.kind):
                key_path, leaf = f.leaves[fleaf]
                key = L.torch_key(tpath, L.torch_leaf_name(fleaf, f.kind))
                out[key] = _leaf_to_torch(leaf, fleaf, f.kind, key, None)
        return _tensors(out) if return_tensors else out
    tl = L.torch_layers(reference, conv_transpose)
    matching = L.match(tl, fl, rename=rename, mode=match)
    _raise_if_ambiguous("to_torch", matching, variables)
    if dtype not in (None, "reference", "source"):
        raise ValueError(
            f"bnjax.interop.to_torch: dtype must be None, 'reference' or 'source', got {dtype!r}."
        )
    changed: list[str] = []
    problems = _Problems(
        "bnjax.interop.to_torch: the variables do not fit the reference",
        "Fix: " + _CALLS_FIX + "; or pass `rename={torch_path: flax_path}`; "
        "`strict=False` exports only the layers that pair (a part of a model).",
    )
    tby, fby = {t.path: t for t in tl}, {L.flax_str(f.path): f for f in fl}
    for pair in matching.pairs:
        t, f = tby[pair.torch], fby[pair.flax]
        for tleaf, fleaf in _leaf_pairs(t, f, pair.kind, problems, strict):
            key = L.torch_key(t.path, tleaf)
            key_path, leaf = f.leaves[fleaf]
            ref_dtype = L.np_dtype(t.leaves[tleaf])
            arr = _leaf_to_torch(leaf, fleaf, pair.kind, key, None, L.leaf_shape(t.leaves[tleaf]))
            if tleaf != "num_batches_tracked" and arr.dtype != ref_dtype:
                if dtype == "reference":
                    arr = arr.astype(ref_dtype)
                elif dtype is None:
                    changed.append(f"{_path_str(key_path)} {arr.dtype} -> '{key}' {ref_dtype}")
            if arr.shape != L.leaf_shape(t.leaves[tleaf]):
                problems.shape(
                    key,
                    _shape_str(t.leaves[tleaf]),
                    _path_str(key_path),
                    arr.shape,
                    L.leaf_shape(L.leaf_value(leaf)),
                    torch_side=True,
                )
                continue
            out[key] = arr
    if strict:
        for path in matching.unmatched_torch:
            for leaf, v in tby[path].leaves.items():
                problems.missing(f"'{L.torch_key(path, leaf)}' {_shape_str(v)}")
        for path in matching.unmatched_flax:
            for key_path, v in fby[path].leaves.values():
                problems.unexpected(f"{_path_str(key_path)} {_shape_str(L.leaf_value(v))}")
    problems.raise_if_any(matching, variables)
    if changed:
        raise ValueError(_dtype_error(changed, "to_torch"))
    order = [L.torch_key(t.path, leaf) for t in tl for leaf in t.leaves]
    out = {k: out[k] for k in order if k in out}
    return _tensors(out) if return_tensors else out


# --------------------------------------------------------------------------- helpers


class _Problems:
    """Collects every mismatch, then raises them as one `ValueError`, the fix first."""

    def __init__(self, title: str, fix: str) -> None:
        self.title, self.fix = title, fix
        self.lists: dict[str, list[str]] = {"missing": [], "unexpected": [], "shape": []}

    def missing(self, what: str) -> None:
        self.lists["missing"].append(what)

    def unexpected(self, what: str) -> None:
        self.lists["unexpected"].append(what)

    def shape(self, key, tshape, fpath, converted, fshape, *, torch_side=False) -> None:
        if torch_side:
            self.lists["shape"].append(
                f"{fpath} {fshape} -> '{key}': converted {converted} vs torch {tshape}"
            )
        else:
            self.lists["shape"].append(
                f"'{key}' {tshape} -> {fpath}: converted {converted} vs template {fshape}"
            )

    def raise_if_any(self, matching: Matching, variables: Any) -> None:
        n = sum(len(v) for v in self.lists.values())
        if not n:
            return
        head = {
            "missing": "missing (no value for these keys)",
            "unexpected": "unexpected (nothing to put these in)",
            "shape": "shape mismatches",
        }
        fix = self.fix
        if n == len(self.lists["shape"]) and all(p.by == "path" for p in matching.pairs):
            fix = _SIZES_FIX  # paired by name: the sizes are what differs
        elif n == len(self.lists["shape"]):
            fix = _SIZES_FIX + " If they are paired wrongly, " + _CALLS_FIX + "."
        lines = [f"{self.title} ({n} problem{'s' if n > 1 else ''}).", fix]
        if matching.sorted_keys or (
            any(p.by == "order" for p in matching.pairs) and L.looks_sorted(variables)
        ):
            lines.append(_SORTED)
        left = _MAX_LISTED
        for k in ("shape", "missing", "unexpected"):
            items = self.lists[k]
            if items and left > 0:
                lines.append(f"  {head[k]}:")
                lines += [f"    {i}" for i in items[:left]]
                left -= len(items[:left])
        if n > _MAX_LISTED:
            lines.append(f"  ... and {n - _MAX_LISTED} more")
        lines.append(_pairs_summary(matching))
        raise ValueError("\n".join(lines))


def _pairs_summary(matching: Matching) -> str:
    shown = str(matching._replace(problem="")).splitlines()
    extra = len(shown) - 1 - _MAX_PAIRS
    body = shown[: _MAX_PAIRS + 1]
    if extra > 0:
        body.append(f"... and {extra} more (`print(bnjax.interop.match_layers(...))`)")
    return "Pairs found:\n" + "\n".join("    " + s for s in body)


def _raise_if_ambiguous(who: str, matching: Matching, variables: Any) -> None:
    if not matching.problem:
        return
    lines = [
        f"bnjax.interop.{who}: some layers could only be paired by guessing from their "
        f"order, and here the order is not known: {matching.problem}.",
        "Fix: " + _CALLS_FIX + "; or name these layers with `rename={torch_path: flax_path}`.",
    ]
    if matching.sorted_keys or L.looks_sorted(variables):
        lines.append(_SORTED)
    lines.append(_pairs_summary(matching))
    raise ValueError("\n".join(lines))


def _dtype_error(narrowed: list[str], who: str = "from_torch") -> str:
    if who == "to_torch":
        lines = [
            f"bnjax.interop.to_torch: {len(narrowed)} values have another dtype than the "
            "reference's, and converting would change them.",
            "Fix: pass `dtype='reference'` to convert (what `load_state_dict` does), "
            "`dtype='source'` to keep the variables' dtypes, or give a reference in the "
            "variables' dtype (e.g. `torch_model.double()`).",
        ]
    else:
        lines = [
            f"bnjax.interop.from_torch: {len(narrowed)} entries would be rounded to the "
            "template's narrower dtype.",
            "Fix: build the template in the state_dict's dtype (e.g. "
            "`bnjax.interop.astype(template, jnp.float64)` with `jax.config.update("
            "'jax_enable_x64', True)`, and `param_dtype=jnp.float64` in the model), or pass "
            "`dtype='template'` to convert, or `dtype='source'` to keep the state_dict's.",
        ]
    lines += ["    " + s for s in narrowed[:_MAX_LISTED]]
    if len(narrowed) > _MAX_LISTED:
        lines.append(f"    ... and {len(narrowed) - _MAX_LISTED} more")
    return "\n".join(lines)


def _leaf_pairs(t: L.TorchLayer, f: L.FlaxLayer, kind: str, problems: _Problems, strict: bool):
    """(torch leaf, Flax leaf) pairs of two paired layers; the leftovers are reported."""
    pairs = []
    flax_names = set(f.leaves)
    for tleaf, v in t.leaves.items():
        fleaf = L.flax_leaf_name(tleaf, kind)
        if fleaf in flax_names:
            pairs.append((tleaf, fleaf))
            flax_names.discard(fleaf)
        elif strict:
            problems.unexpected(
                f"'{L.torch_key(t.path, tleaf)}' {_shape_str(v)} (Flax layer "
                f"{L.flax_str(f.path)} has {sorted(f.leaves)})"
            )
    if strict:
        for fleaf in sorted(flax_names):
            key_path, v = f.leaves[fleaf]
            problems.missing(
                f"{_path_str(key_path)} {_shape_str(L.leaf_value(v))} (torch module "
                f"'{t.path}' has {sorted(t.leaves)})"
            )
    return pairs


def _leaf_to_torch(
    leaf: Any, fleaf: str, kind: str, key: str, like: Any, torch_shape: Any = None
) -> np.ndarray:
    arr = L.to_numpy(L.leaf_value(leaf), key)
    tleaf = L.torch_leaf_name(fleaf, kind)
    if tleaf == "num_batches_tracked":
        return L.check_count(arr, key, np.int64)
    if tleaf == "weight":
        arr = L.weight_to_torch(arr, kind, torch_shape)
    if like is not None:
        arr = arr.astype(L.np_dtype(like))
    return np.array(arr, order="C")


def _torch_order(f: L.FlaxLayer, kind: str) -> list[str]:
    rank = {"weight": 0, "bias": 1, "running_mean": 2, "running_var": 3, "num_batches_tracked": 4}
    return sorted(f.leaves, key=lambda n: rank.get(L.torch_leaf_name(n, kind), 5))


def _inverse_rename(rename: Rename):
    if rename is None:
        return lambda p: p
    if not isinstance(rename, Mapping):
        raise TypeError(
            "bnjax.interop.to_torch: without `reference`, rename must be a mapping "
            "{torch path: Flax path} (a function cannot be inverted); pass `reference=`."
        )
    table = {L.norm_flax_path(str(v)): str(k) for k, v in rename.items()}

    def fn(p: str) -> str:
        for v in sorted(table, key=len, reverse=True):
            if p == v or p.startswith(v + "."):
                return table[v] + p[len(v) :]
        return p

    return fn


def _rebuild(
    node: Any, new: Mapping[tuple[Any, ...], Any], prefix: tuple[Any, ...], nested: bool = False
) -> Any:
    """A copy of `node` (same container types, same order) with `new` leaves swapped in.

    An `nnx.State` keeps its nested levels as plain dicts (and wraps them on access),
    so below one the copy is built from dicts too.
    """
    if isinstance(node, Mapping):
        state = type(node).__name__ == "State"
        items = {k: _rebuild(v, new, (*prefix, k), nested or state) for k, v in node.items()}
        if type(node) is dict or (nested and state):
            return items
        return type(node)(items)
    if isinstance(node, list | tuple) and not prefix:
        return type(node)(_rebuild(v, new, (i,)) for i, v in enumerate(node))
    if prefix not in new:
        return node
    value = new[prefix]
    if hasattr(node, "replace") and L.leaf_value(node) is not node:  # an nnx Variable
        return node.replace(value)
    return value


def _tensors(sd: dict[str, np.ndarray]) -> dict[str, Any]:
    import torch

    out = {}
    for k, v in sd.items():
        if v.dtype.name == "bfloat16":
            out[k] = torch.from_numpy(v.view(np.int16).copy()).view(torch.bfloat16)
        else:
            out[k] = torch.from_numpy(v)
    return out


def _kind_note(leaf: str) -> str:
    if leaf in L.BN_LEAVES:
        return ""
    return (
        " (an unknown layer kind: bnjax.interop ports Linear, Conv*d, ConvTranspose*d, "
        "Embedding, LayerNorm, GroupNorm and BatchNorm*d, whose entries are weight, bias "
        "and running statistics)"
    )


def _shape_str(v: Any) -> str:
    return str(L.leaf_shape(v))


def _path_str(key_path: tuple[Any, ...]) -> str:
    return "/".join(str(k) for k in key_path)
