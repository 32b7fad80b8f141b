"""analyze_inputs: what the runtime needs to know about the graph's inputs.

Matches: the graph's placeholders with the example inputs Dynamo gave, and the first
block ``find_blocks`` recorded.
Emits (in :class:`~adacorr_compile.passes.common.Analysis`, as placeholder positions):

- ``timestep_index``: the forward argument named by the ``timestep_arg`` option
  (possibly behind a decorator's ``**kwargs``, as in SD3); for the default name, one of
  the usual names, else the first per-sample float input (a scalar or ``[B]`` float
  tensor that is not a parameter). None where the graph has none: the runtime then
  needs explicit generation boundaries.
- ``owner_index``: the first parameter input; its identity tells module instances apart.
- ``context_index``: a parameter of the first block, where diffusers' ``cache_context``
  is looked up: the context is set on the module that holds the blocks (the
  transformer), which may be a part of the compiled model (a wrapper that embeds class
  labels around a diffusers model). The owner's index where the block reads none.
- ``input_indices``: the non-parameter tensor inputs, whose shapes and dtypes tell one
  generation's calls from the next one's.

Keeps: the graph unchanged. Runs before ``outline_blocks``, on the graph as traced.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from ..config import AdaCorrConfig
from .common import Analysis, analysis, example_value
from .find_blocks import _is_param

# forward argument names that carry a diffusion timestep (or noise level), tried after
# ``timestep_arg`` while it has its default value
TIMESTEP_NAMES = ("timestep", "timesteps", "t", "time", "sigma", "sigmas", "noise_level")


def _source_name(node: fx.Node) -> str:
    """Dynamo's source of a placeholder, e.g. ``L['timestep']`` (empty where it has none)."""
    grapharg = node.meta.get("grapharg")
    source = getattr(getattr(grapharg, "source", None), "name", "")
    return source() if callable(source) else source


def _is_scalar_per_sample(value: Any, batch: set[int]) -> bool:
    """A float scalar, or a float tensor of rank <= 1 with one value per sample (or one)."""
    if isinstance(value, (float, torch.SymFloat)):
        return True
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() > 1:
        return False
    return value.dim() == 0 or any(value.shape[0] == b for b in batch | {1})


def timestep_index(placeholders: list[fx.Node], name: str) -> int | None:
    """The placeholder position of the timestep (see module docstring)."""
    names = (name,) if name != AdaCorrConfig.timestep_arg else TIMESTEP_NAMES
    for candidate in names:
        for i, n in enumerate(placeholders):
            source = _source_name(n)
            if source in (f"L[{candidate!r}]", f"L['kwargs'][{candidate!r}]") or n.name in (f"l_{candidate}_", f"l_kwargs_{candidate}_"):
                return i
    if name != AdaCorrConfig.timestep_arg:
        return None
    values = [example_value(n) for n in placeholders]
    batch = {int(v.shape[0]) for v in values if isinstance(v, torch.Tensor) and v.dim() >= 3 and isinstance(v.shape[0], int)}
    for i, (n, v) in enumerate(zip(placeholders, values)):
        if not _is_param(n, v) and _source_name(n).startswith("L[") and _is_scalar_per_sample(v, batch):
            return i
    return None


def _context_index(info: Analysis, placeholders: list[fx.Node], owner_index: int | None) -> int | None:
    """A parameter input of the first block, else ``owner_index`` (see module docstring)."""
    return next(
        (
            placeholders.index(b.inputs[i])
            for b in info.blocks[:1]
            for i in sorted(b.param_inputs)
            if b.inputs[i] in placeholders
        ),
        owner_index,
    )


def analyze_inputs(gm: fx.GraphModule, config: AdaCorrConfig) -> fx.GraphModule:
    """Record the positions of the timestep, owner, context and data inputs (see module docstring)."""
    info = analysis(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    pairs = list(zip(placeholders, info.example_inputs))
    info.owner_index = next((i for i, (n, x) in enumerate(pairs) if _is_param(n, x)), None)
    info.context_index = _context_index(info, placeholders, info.owner_index)
    info.input_indices = [i for i, (n, x) in enumerate(pairs) if isinstance(x, torch.Tensor) and not _is_param(n, x)]
    info.timestep_index = timestep_index(placeholders, config.timestep_arg)
    return gm
