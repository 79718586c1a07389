"""PyTorch `state_dict` <-> Flax variables and bnjax trees, in NumPy, without torch.

Whole models (the usual way): a torch `state_dict` into a Flax model's variables and
back, each in one call, driven by the Flax model's own variables as a template:

    template = bnjax.interop.flax_template(model, x, train=False)   # shapes, call order
    variables = bnjax.interop.from_torch(torch_model.state_dict(), template)
    state_dict = bnjax.interop.to_torch(variables, reference=torch_model.state_dict())

`from_torch` pairs torch modules with Flax layers (by path, then Flax's automatic
names by definition order; `match_layers` shows the pairing) and converts each to
Flax's names and layouts (`kernel`, `scale`, `embedding`; bnjax's BatchNorm names);
`to_torch` is its bit-exact inverse. Both raise one error listing every missing,
unexpected and mis-shaped key. See `docs/pytorch_interop.md`.

Per-BatchNorm trees (for code that calls `bnjax.apply` directly):
`from_torch_state_dict` / `to_torch_state_dict`, described below.

A whole model's `state_dict` (flat, dotted keys such as `layer1.0.bn1.running_mean`)
becomes two nested dicts keyed by module path, `{"layer1": {"0": {"bn1": {...}}}}`:

- `batch_stats` holds the running statistics, `running_mean`, `running_var` and
  `num_batches_tracked`, of every module that has them (BatchNorm, InstanceNorm with
  `track_running_stats=True`). `batch_stats["bn1"]` is what `bnjax.apply` takes.
- `params` holds every other entry (`weight`, `bias`, and any other parameter or
  buffer) under its torch name, so `params["bn1"]` is `{"weight", "bias"}` for
  `bnjax.apply` and `params["conv1"]["weight"]` is the convolution kernel.

Layouts. By default weights land in JAX's layouts: a `weight` with 3 or more dimensions
is a convolution kernel, torch's `(O, I, *K)` becomes `(*K, I, O)` (`OIHW` -> `HWIO`, the
layout of `jax.lax.conv_general_dilated(..., ("NHWC", "HWIO", "NHWC"))` and of Flax's
`Conv`); a 2-D `weight` is a Linear's `(out, in)` and becomes `(in, out)` (so `y = x @ w`,
Flax's `Dense` kernel). Everything else keeps its shape. `conv_layout="OIHW"` /
`linear_layout="out_in"` keep torch's layouts, and `keep_torch_layout` lists module
paths whose weights are not convolutions or Linears (an `nn.Embedding`, a
`ConvTranspose`, whose torch layout is `(I, O, *K)`) and must be left alone.

dtypes. Arrays keep their dtype, except `num_batches_tracked`: torch's int64 becomes
bnjax's int32 (a value above 2**31 - 1 is an error) and back to int64. bfloat16 torch
tensors arrive as `ml_dtypes.bfloat16` arrays, bit for bit.

Inputs are never mutated: every array returned is a fresh copy. The round trip
`to_torch_state_dict(*from_torch_state_dict(sd))` gives back `sd`'s keys, shapes,
dtypes and values bit for bit.
"""

from bnjax._interop.by_calls import match_calls as match_calls
from bnjax._interop.pairing import LayerMatch as LayerMatch
from bnjax._interop.pairing import Matching as Matching
from bnjax._interop.port import astype as astype
from bnjax._interop.port import flax_template as flax_template
from bnjax._interop.port import from_torch as from_torch
from bnjax._interop.port import match_layers as match_layers
from bnjax._interop.port import to_torch as to_torch
from bnjax._interop.state_dict import deprecated_names as __getattr__  # noqa: F401 (old names, warned)
from bnjax._interop.state_dict import from_torch_state_dict as from_torch_state_dict
from bnjax._interop.state_dict import to_torch_state_dict as to_torch_state_dict

__all__ = [
    "LayerMatch",
    "Matching",
    "astype",
    "flax_template",
    "from_torch",
    "from_torch_state_dict",
    "match_calls",
    "match_layers",
    "to_torch",
    "to_torch_state_dict",
]
