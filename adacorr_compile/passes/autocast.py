"""Autocast regions around blocks: where a block runs under ``torch.autocast``.

Dynamo writes ``with torch.autocast(...)`` as an ``_enter_autocast(*args)`` node and an
``_exit_autocast(enter)`` node; the nodes between them run under that autocast state.
These nodes carry no ``nn_module_stack`` (even when the ``with`` is inside a block's
``forward``), so ``find_blocks`` leaves them in the glue around the blocks. Two things
then go wrong unless the passes handle them:

- a block body compiled on its own (Inductor traces it outside any autocast) would run
  every op at full precision, not as in eager: the body must enter the block's autocast
  state itself (:func:`wrap_body`, from :func:`block_context`);
- ``split_module`` copies an autocast region into every piece it spans, region pieces
  included, so the region's own cache math would run under the user's autocast: the
  parent graph leaves the autocast state around each region call and enters it again
  after it (:func:`isolate_regions`), so autocast regions stay inside the glue pieces.

A block whose nodes do not all run under one autocast state (an autocast switched inside
the block) is not guarded (:func:`context_change`): its body could not say which ops run
under which state without re-deriving the ``with`` from node order.
"""

from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.fx as fx

_ENTER = torch.amp._enter_autocast
_EXIT = torch.amp._exit_autocast


def _is_enter(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is _ENTER


def _is_exit(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is _EXIT


def contexts(graph: fx.Graph) -> dict[fx.Node, tuple[fx.Node, ...]]:
    """For each node other than the autocast markers, the ``_enter_autocast`` nodes active
    where it runs, outermost first (``()`` outside any autocast)."""
    stack: list[fx.Node] = []
    found: dict[fx.Node, tuple[fx.Node, ...]] = {}
    for node in graph.nodes:
        if _is_enter(node):
            stack.append(node)
        elif _is_exit(node):
            entered = node.args[0]
            if entered in stack:
                stack.remove(entered)
        else:
            found[node] = tuple(stack)
    return found


def context_change(nodes: list[fx.Node], active: dict[fx.Node, tuple[fx.Node, ...]]) -> str | None:
    """Why a block's nodes cannot share one autocast state, or None when they do."""
    states = {active.get(n, ()) for n in nodes}
    if len(states) <= 1:
        return None
    return "the autocast state changes inside the block (a `with torch.autocast` around part of it)"


def block_context(nodes: list[fx.Node], active: dict[fx.Node, tuple[fx.Node, ...]]) -> tuple[tuple[object, ...], ...]:
    """The arguments of the ``_enter_autocast`` calls a block runs under, outermost first."""
    return tuple(tuple(e.args) for e in active.get(nodes[0], ())) if nodes else ()


def wrap_body(graph: fx.Graph, context: tuple[tuple[object, ...], ...]) -> None:
    """Make a body graph enter ``context`` after its placeholders and leave it before its
    output, so that compiled on its own it casts as the block did in the traced graph."""
    if not context:
        return
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    entered: list[fx.Node] = []
    first = placeholders[-1].next if placeholders else next(iter(graph.nodes))
    for args in context:
        with graph.inserting_before(first):
            entered.append(graph.call_function(_ENTER, args))
    for node in reversed(entered):
        with graph.inserting_before(output):
            graph.call_function(_EXIT, (node,))


def isolate_regions(gm: fx.GraphModule, is_region: Callable[[fx.Node], bool]) -> bool:
    """Leave every autocast state around each region call (and its ``getitem`` nodes) and
    enter it again after them; the bodies carry their own state (:func:`wrap_body`).
    Rewrites the autocast markers of the whole graph: each stretch of glue enters and
    leaves exactly the states it ran under, in the same nesting. Returns False (the graph
    untouched) when no region runs under an autocast."""
    graph = gm.graph
    active = contexts(graph)
    regions = [n for n in graph.nodes if is_region(n)]
    if not any(active.get(n) for n in regions):
        return False
    cleared = set(regions) | {u for r in regions for u in r.users if u.target is operator.getitem}
    markers = [n for n in graph.nodes if _is_enter(n) or _is_exit(n)]
    current: list[tuple[fx.Node, fx.Node]] = []  # (traced enter node, the enter node now in the graph)
    for node in list(graph.nodes):
        if node in markers or node.op == "placeholder":
            continue
        wanted = () if node in cleared or node.op == "output" else active.get(node, ())
        _switch(graph, node, current, wanted)
    for node in reversed(markers):
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return True


def _switch(graph: fx.Graph, before: fx.Node, current: list[tuple[fx.Node, fx.Node]], wanted: tuple[fx.Node, ...]) -> None:
    """Insert before ``before`` the exits and enters that take ``current`` to ``wanted``."""
    keep = 0
    while keep < min(len(current), len(wanted)) and current[keep][0] is wanted[keep]:
        keep += 1
    while len(current) > keep:
        _, live = current.pop()
        with graph.inserting_before(before):
            graph.call_function(_EXIT, (live,))
    for traced in wanted[keep:]:
        with graph.inserting_before(before):
            live = graph.call_function(_ENTER, tuple(traced.args))
        live.meta = dict(traced.meta)
        current.append((traced, live))
