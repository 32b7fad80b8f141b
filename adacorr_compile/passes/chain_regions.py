"""chain_regions: group directly chained regions into spans that share one cache.

Matches: consecutive guarded regions (``adacorr_region_<k>`` calls) where the second
reads every output of the first (as its stream inputs, or side inputs) and takes all its
stream inputs from them, and nothing else reads those outputs (no side computation, skip connection or ControlNet residual between
them). Only where one decision covers a whole step for every region after the leader
(:func:`spans_apply`: ``scope="step"``, one decision per batch, no blend, residual
caches).

Emits: ``region.span`` (:class:`~adacorr_compile.runtime.region.Span`) on each region;
a region that is not chained is a span of one.

Why: with ``scope="step"`` the regions after the leader all reuse at the same steps,
so reusing each block as ``input + r_i`` is reusing the span as ``input + sum_i r_i``,
and the linear forecast of the sum is the sum of the forecasts. One span residual (and
its previous value) replaces one per block, whatever the depth, and a reuse step costs
one add (plus one extrapolation) per stream instead of one per block.
"""

from __future__ import annotations

import logging
import operator

import torch.fx as fx

from ..config import AdaCorrConfig
from ..policies import caches_residuals
from ..runtime.region import GuardedRegion, Span
from .common import analysis

logger = logging.getLogger("adacorr_compile")


def spans_apply(config: AdaCorrConfig) -> bool:
    """Regions after the leader share the step's verdict for the whole batch and a reuse adds
    a residual: only then is a span's reuse the same as its blocks' reuses (a blend needs
    each block's own cached value, a per-sample mask each block's own refresh)."""
    return config.scope == "step" and config.decision == "batch" and not config.blend and caches_residuals(config)


def _feeds(gm: fx.GraphModule, prev: fx.Node, nxt: fx.Node) -> dict[int, int] | None:
    """``{input position of nxt: output index of prev}`` when every output of ``prev`` is read
    by ``nxt`` alone and every stream input of ``nxt`` is an output of ``prev``; else None.
    An output may also feed a side input of ``nxt`` (the text stream of SD3's and Flux's last
    blocks, which return the image stream only): on a reuse no block of the span runs, so
    only the stream values matter."""
    before: GuardedRegion = gm.get_submodule(str(prev.target))
    after: GuardedRegion = gm.get_submodule(str(nxt.target))
    if len(before.spec.stream_pairs) != before.spec.num_outputs:
        return None
    outputs: dict[fx.Node, int] = {}
    for user in prev.users:
        if user.op != "call_function" or user.target is not operator.getitem or set(user.users) != {nxt}:
            return None
        outputs[user] = int(user.args[1])
    streams = {i for i, _ in after.spec.stream_pairs}
    feeds = {pos: outputs[a] for pos, a in enumerate(nxt.args) if isinstance(a, fx.Node) and a in outputs}
    if not streams <= set(feeds) or set(feeds.values()) != set(range(before.spec.num_outputs)):
        return None
    return feeds


def chain_regions(gm: fx.GraphModule, config: AdaCorrConfig) -> fx.GraphModule:
    """Set ``region.span`` on every region (see module docstring)."""
    info = analysis(gm)
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith("adacorr_region_")]
    regions: list[GuardedRegion] = [gm.get_submodule(str(n.target)) for n in calls]
    spans: list[list[int]] = []
    links: dict[int, dict[int, int]] = {}  # k -> feeds from region k-1
    for k, region in enumerate(regions):
        feeds = None
        # the leader (order 0) computes at every step: it starts no span and joins none
        if spans_apply(config) and k >= 1 and region.spec.order >= 2 and regions[k - 1].spec.order >= 1 and spans:
            feeds = _feeds(gm, calls[k - 1], calls[k])
        if feeds is None:
            spans.append([k])
        else:
            links[k] = feeds
            spans[-1].append(k)
    for members in spans:
        head, tail = regions[members[0]], regions[members[-1]]
        # walk each of the tail's stream pairs back to the head's input it entered by
        sources = []
        for i, _ in tail.spec.stream_pairs:
            pos = i
            for k in reversed(members[1:]):
                out = links[k][pos]
                pos = next(a for a, b in regions[k - 1].spec.stream_pairs if b == out)
            sources.append(pos)
        for position, k in enumerate(members):
            regions[k].span = Span(head.spec.path, len(members), position, tuple(sources))
        if len(members) > 1:
            logger.debug("adacorr: span of %d chained regions %s .. %s: one cache", len(members), head.spec.path, tail.spec.path)
    info.spans = [[regions[k].spec.path for k in members] for members in spans]
    return gm
