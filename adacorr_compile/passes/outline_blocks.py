"""outline_blocks: move each found block into a submodule of its own.

Matches: the blocks ``find_blocks`` recorded.
Emits: for block ``k`` a GraphModule ``adacorr_body_<k>`` whose placeholders are the
block's external inputs (parameters included: they stay inputs, so structurally
identical blocks have identical bodies and compile once) and whose output is the
tuple of the block's outputs; the block's nodes in the parent graph become one
``call_module`` node plus a ``getitem`` per output, and the graph is re-sorted
topologically. Each block gets a structural key (ops, wiring, input shapes,
strides and dtypes): equal keys share one compiled body. A block traced under
``torch.autocast`` gets a body that enters the same autocast state itself
(``autocast.wrap_body``): its key then differs from the same block without it.

Order: the re-sort is stable (a node moves only when a dependency forces it; the
call takes the place of the block's first node) and counts, besides data edges,
the ordering edges of every in-place write (``find_blocks.mutation_analysis``): a
write such as ``seq[:, T:] = x`` has no users, so a plain topological sort may
move it after a block that reads ``seq``. If the edges cannot be kept (a cycle),
the pass raises and the backend compiles the graph unguarded.
"""

from __future__ import annotations

import hashlib
import heapq
import operator

import torch.fx as fx
from torch.fx.node import _get_qualified_name

from ..config import AdaCorrConfig
from . import autocast
from .common import Block, analysis, example_value, tensor_shape_key
from .find_blocks import mutation_analysis


def _target_name(node: fx.Node) -> str:
    if node.op == "call_function" and callable(node.target):
        try:
            return _get_qualified_name(node.target)
        except Exception:  # noqa: BLE001 - some builtins have no qualified name
            return repr(node.target)
    return str(node.target)


def _structural_key(body: fx.GraphModule) -> str:
    index = {n: i for i, n in enumerate(body.graph.nodes)}

    def arg(a: object) -> str:
        if isinstance(a, fx.Node):
            return f"%{index[a]}"
        if isinstance(a, (tuple, list)):
            return "(" + ",".join(arg(x) for x in a) + ")"
        if isinstance(a, dict):
            return "{" + ",".join(f"{k}:{arg(v)}" for k, v in sorted(a.items())) + "}"
        return repr(a)

    lines = []
    for n in body.graph.nodes:
        if n.op == "placeholder":  # names differ per block; shapes, strides and dtypes matter
            lines.append(f"placeholder|{tensor_shape_key(example_value(n))!r}")
        else:
            lines.append(f"{n.op}|{_target_name(n)}|{arg(n.args)}|{arg(n.kwargs)}")
    return hashlib.sha1("\n".join(lines).encode()).hexdigest()[:16]


def _outline(gm: fx.GraphModule, block: Block, context: tuple[tuple[object, ...], ...] = ()) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, inp in enumerate(block.inputs):
        ph = graph.placeholder(f"in{i}_{inp.name}")
        ph.meta = dict(inp.meta)
        env[inp] = ph
    def arg(a: fx.Node) -> fx.Node:
        if a not in env:  # a module-valued get_attr shared by several blocks: copy it
            env[a] = graph.node_copy(a)
        return env[a]

    for n in block.nodes:
        env[n] = graph.node_copy(n, arg)
    graph.output(tuple(env[o] for o in block.outputs))
    autocast.wrap_body(graph, context)  # the body casts as the block did (it runs outside autocast)
    body = fx.GraphModule(gm, graph, class_name="AdaCorrBlockBody")
    body.graph.lint()
    return body


def _stable_sort(graph: fx.Graph, after: dict[fx.Node, set[fx.Node]], position: dict[fx.Node, tuple[int, int]]) -> None:
    """Reorder ``graph`` in place topologically over data edges plus ``after`` (node ->
    nodes that must run before it), taking among the ready nodes the one of smallest
    ``position``: a node moves only when a dependency forces it."""
    nodes = list(graph.nodes)
    preds: dict[fx.Node, set[fx.Node]] = {}
    for n in nodes:
        preds[n] = set(n.all_input_nodes) | after.get(n, set())
    output = next((n for n in nodes if n.op == "output"), None)
    if output is not None:  # the output stays last, after writes nobody reads
        preds[output] = set(nodes) - {output}
    succs: dict[fx.Node, list[fx.Node]] = {n: [] for n in nodes}
    for n, ps in preds.items():
        for p in ps:
            succs[p].append(n)
    indeg = {n: len(ps) for n, ps in preds.items()}
    ready = [(position[n], k, n) for k, n in enumerate(nodes) if indeg[n] == 0]
    heapq.heapify(ready)
    index = {n: k for k, n in enumerate(nodes)}
    ordered: list[fx.Node] = []
    while ready:
        _, _, n = heapq.heappop(ready)
        ordered.append(n)
        for s in succs[n]:
            indeg[s] -= 1
            if indeg[s] == 0:
                heapq.heappush(ready, (position[s], index[s], s))
    if len(ordered) != len(nodes):
        stuck = [n.name for n in nodes if indeg[n] > 0][:5]
        raise RuntimeError(f"outline_blocks: the order of in-place writes cannot be kept around the blocks (cycle through {stuck})")
    if ordered[0] is not nodes[0]:
        nodes[0].prepend(ordered[0])
    for prev, n in zip(ordered, ordered[1:]):
        if prev.next is not n:
            prev.append(n)


def outline_blocks(gm: fx.GraphModule, config: AdaCorrConfig) -> fx.GraphModule:
    """Outline every recorded block (see module docstring)."""
    info = analysis(gm)
    graph = gm.graph
    mut = mutation_analysis(graph)  # on the graph as traced, before any node moves
    active = autocast.contexts(graph)
    position = {n: (i, 0) for i, n in enumerate(graph.nodes)}
    owner: dict[fx.Node, fx.Node] = {}  # block node -> the call that replaces it
    output_node = next(n for n in graph.nodes if n.op == "output")
    replaced: dict[fx.Node, fx.Node] = {}  # outputs of outlined blocks -> their getitem
    for k, block in enumerate(info.blocks):
        block.inputs = [replaced.get(n, n) for n in block.inputs]
        body = _outline(gm, block, autocast.block_context(block.nodes, active))
        block.key = _structural_key(body)
        name = f"adacorr_body_{k}"
        gm.add_submodule(name, body)
        at = position[block.nodes[0]][0]
        with graph.inserting_before(output_node):
            call = graph.call_module(name, tuple(block.inputs))
            call.meta["adacorr_block"] = block.path
            call.meta["example_value"] = tuple(example_value(o) for o in block.outputs)
            position[call] = (at, 0)
            for j, out in enumerate(block.outputs):
                item = graph.call_function(operator.getitem, (call, j))
                item.meta = dict(out.meta)
                position[item] = (at, 1 + j)
                replaced[out] = item
                node_set = set(block.nodes)
                for user in list(out.users):
                    if user not in node_set:
                        user.replace_input_with(out, item)
        for n in block.nodes:
            owner[n] = call
        for n in reversed(block.nodes):
            graph.erase_node(n)
    for node in list(graph.nodes):  # shared subgraph attributes now copied into the bodies
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    live = set(graph.nodes)
    after: dict[fx.Node, set[fx.Node]] = {}
    for node, preds in mut.after.items():
        node = owner.get(node, node)
        for p in preds:
            p = owner.get(p, p)
            if p is not node and p in live and node in live:
                after.setdefault(node, set()).add(p)
    _stable_sort(graph, after, position)
    gm.graph.lint()
    gm.recompile()
    return gm
