"""outline_blocks: move each found block into a submodule of its own.

Matches: the blocks ``find_blocks`` recorded.
Emits: for block ``k`` a GraphModule ``adacorr_body_<k>`` whose placeholders are the
block's external inputs (parameters included: they stay inputs, so structurally
identical blocks have identical bodies and compile once) and whose output is the
tuple of the block's outputs; the block's nodes in the parent graph become one
``call_module`` node plus a ``getitem`` per output, and the graph is re-sorted
topologically. Each block gets a structural key (ops, wiring, input shapes,
strides and dtypes): equal keys share one compiled body.
"""

from __future__ import annotations

import hashlib
import operator

import torch.fx as fx
from torch.fx.node import _get_qualified_name
from torch.fx.passes.tools_common import legalize_graph

from ..config import AdaCorrConfig
from .common import Block, analysis, example_value, tensor_shape_key


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


def _outline(gm: fx.GraphModule, block: Block) -> fx.GraphModule:
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
    body = fx.GraphModule(gm, graph, class_name="AdaCorrBlockBody")
    body.graph.lint()
    return body


def outline_blocks(gm: fx.GraphModule, config: AdaCorrConfig) -> fx.GraphModule:
    """Outline every recorded block (see module docstring)."""
    info = analysis(gm)
    graph = gm.graph
    output_node = next(n for n in graph.nodes if n.op == "output")
    replaced: dict[fx.Node, fx.Node] = {}  # outputs of outlined blocks -> their getitem
    for k, block in enumerate(info.blocks):
        block.inputs = [replaced.get(n, n) for n in block.inputs]
        body = _outline(gm, block)
        block.key = _structural_key(body)
        name = f"adacorr_body_{k}"
        gm.add_submodule(name, body)
        with graph.inserting_before(output_node):
            call = graph.call_module(name, tuple(block.inputs))
            call.meta["adacorr_block"] = block.path
            call.meta["example_value"] = tuple(example_value(o) for o in block.outputs)
            for j, out in enumerate(block.outputs):
                item = graph.call_function(operator.getitem, (call, j))
                item.meta = dict(out.meta)
                replaced[out] = item
                node_set = set(block.nodes)
                for user in list(out.users):
                    if user not in node_set:
                        user.replace_input_with(out, item)
        for n in reversed(block.nodes):
            graph.erase_node(n)
    for node in list(graph.nodes):  # shared subgraph attributes now copied into the bodies
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    gm = legalize_graph(gm)  # installs a new, topologically sorted graph
    gm.graph.lint()
    gm.recompile()
    return gm
