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
from typing import NamedTuple, Sequence

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


class _Wiring(NamedTuple):
    """What chaining needs of one block call: its node, stream pairs and output count."""

    node: fx.Node
    stream_pairs: Sequence[tuple[int, int]]
    num_outputs: int


def _feeds(before: _Wiring, after: _Wiring) -> dict[int, int] | None:
    """``{input position of after: output index of before}`` when every output of ``before``
    is read by ``after`` alone and every stream input of ``after`` is an output of
    ``before``; else None. An output may also feed a side input of ``after`` (the text stream
    of SD3's and Flux's last blocks, which return the image stream only): on a reuse no block
    of the span runs, so only the stream values matter."""
    if len(before.stream_pairs) != before.num_outputs:
        return None
    outputs: dict[fx.Node, int] = {}
    for user in before.node.users:
        if user.op != "call_function" or user.target is not operator.getitem or set(user.users) != {after.node}:
            return None
        outputs[user] = int(user.args[1])
    streams = {i for i, _ in after.stream_pairs}
    feeds = {pos: outputs[a] for pos, a in enumerate(after.node.args) if isinstance(a, fx.Node) and a in outputs}
    if not streams <= set(feeds) or set(feeds.values()) != set(range(before.num_outputs)):
        return None
    return feeds


def find_spans(calls: Sequence[_Wiring]) -> list[tuple[list[int], tuple[int, ...]]]:
    """Spans over ``calls`` (block calls in graph order, the first one the leader, which
    computes at every step and joins no span): ``(member indices, sources)``, where
    ``sources[m]`` is the first member's input position that the last member's stream pair
    ``m`` started at. Shared by this pass and the ONNX export."""
    spans: list[list[int]] = []
    links: dict[int, dict[int, int]] = {}  # k -> feeds from call k-1
    for k in range(len(calls)):
        feeds = _feeds(calls[k - 1], calls[k]) if k >= 2 else None
        if feeds is None:
            spans.append([k])
        else:
            links[k] = feeds
            spans[-1].append(k)
    result = []
    for members in spans:
        sources = []
        for i, _ in calls[members[-1]].stream_pairs:  # walk each stream back to the first member
            pos = i
            for k in reversed(members[1:]):
                out = links[k][pos]
                pos = next(a for a, b in calls[k - 1].stream_pairs if b == out)
            sources.append(pos)
        result.append((members, tuple(sources)))
    return result


def chain_regions(gm: fx.GraphModule, config: AdaCorrConfig) -> fx.GraphModule:
    """Set ``region.span`` on every region (see module docstring)."""
    info = analysis(gm)
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith("adacorr_region_")]
    regions: list[GuardedRegion] = [gm.get_submodule(str(n.target)) for n in calls]
    if [r.spec.order for r in regions] != list(range(len(regions))) or not spans_apply(config):
        spans = [([k], tuple(i for i, _ in r.spec.stream_pairs)) for k, r in enumerate(regions)]
    else:
        spans = find_spans([_Wiring(n, r.spec.stream_pairs, r.spec.num_outputs) for n, r in zip(calls, regions)])
    for members, sources in spans:
        head = regions[members[0]]
        for position, k in enumerate(members):
            regions[k].span = Span(head.spec.path, len(members), position, sources)
        if len(members) > 1:
            logger.debug("adacorr: span of %d chained regions %s .. %s: one cache", len(members), head.spec.path,
                         regions[members[-1]].spec.path)
    info.spans = [[regions[k].spec.path for k in members] for members, _ in spans]
    return gm
