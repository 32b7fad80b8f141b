"""guard_blocks: turn each outlined block call into a cache-guarded region.

Matches: the ``adacorr_body_<k>`` submodules that ``outline_blocks`` made.
Emits: ``adacorr_region_<k>``, a :class:`~adacorr_compile.runtime.region.GuardedRegion`
holding the body, the block's stream pairing and the inputs its Offset Estimation
Module watches; the call nodes now call the region. The graph's regions share one
:class:`~adacorr_compile.policies.ConfigHome` (the config and its decision plan, built
once here), which the model's state takes over when the graph runs for it. The region's runtime state
(cache tensors, counters) is not in the module: it is looked up per generation
from the model's :class:`~adacorr_compile.runtime.state.ModelState`, which the
backend attaches after lowering.
"""

from __future__ import annotations

import torch.fx as fx

from ..config import AdaCorrConfig
from ..policies import ConfigHome
from ..runtime.region import GuardedRegion, RegionSpec
from .common import analysis


def guard_blocks(gm: fx.GraphModule, config: AdaCorrConfig) -> fx.GraphModule:
    """Replace each outlined body call by a GuardedRegion call (see module docstring)."""
    info = analysis(gm)
    home = ConfigHome(config)  # one per graph: its regions and their RegionMath (lower) share it
    for k, block in enumerate(info.blocks):
        body = getattr(gm, f"adacorr_body_{k}")
        spec = RegionSpec(
            path=block.path,
            order=k,
            stream_pairs=tuple(block.stream_pairs),
            observed=tuple(block.observed),
            num_outputs=len(block.outputs),
            key=block.key,
        )
        region = GuardedRegion(spec, body, home)
        name = f"adacorr_region_{k}"
        gm.add_submodule(name, region)
        for node in gm.graph.nodes:
            if node.op == "call_module" and node.target == f"adacorr_body_{k}":
                node.target = name
        gm.delete_submodule(f"adacorr_body_{k}")
        info.regions.append(region)
    gm.recompile()
    return gm
