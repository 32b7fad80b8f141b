"""find_blocks: find the repeated Transformer blocks of a Dynamo graph.

Matches: nodes whose ``nn_module_stack`` places them under ``<container>.<i>``
(a child of a ModuleList/Sequential), grouped per block; a container with at
least ``config.min_blocks`` such children is a block family
(``transformer_blocks``, ``single_transformer_blocks``, ``blocks``, ...).

Emits (into ``gm.meta["adacorr"]``): one :class:`Block` per block that can be
isolated, with its external inputs, its outputs, which inputs are parameters,
which inputs are streams paired with an output of the same shape (the residual
``output - input`` is what the cache keeps), and which inputs the OEM watches.
The graph itself is unchanged.

Why: a block can be skipped only if it is a convex set of nodes (nothing outside
it both depends on it and feeds it) and each of its outputs has a stream input of
the same shape, so that ``input + cached residual`` stands in for the output.
Anything else is left unguarded with a logged reason; it is never guessed.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch
import torch.fx as fx

from ..config import AdaCorrConfig
from .common import Analysis, Block, analysis, example_value, module_stack

_INDEX = re.compile(r"^\d+$")


def _block_of(node: fx.Node) -> tuple[str, str] | None:
    """(block path, class name) of the outermost module on ``node``'s stack that is a
    numbered child (``<container>.<i>``). The block itself must be on the stack: code
    that only calls a submodule of a block (DiT's final layer calls
    ``transformer_blocks[0].norm1.emb``) is not part of the block."""
    for path, cls in module_stack(node):
        parts = path.split(".")
        if len(parts) >= 2 and _INDEX.match(parts[-1]):
            return path, cls
    return None


def _is_param(node: fx.Node, example: object) -> bool:
    if node.op == "get_attr":
        return True
    if node.op != "placeholder":
        return False
    if isinstance(example, torch.nn.Parameter):
        return True
    grapharg = node.meta.get("grapharg")
    source = grapharg.source.name if grapharg is not None and hasattr(grapharg, "source") else ""
    source = source() if callable(source) else source
    return "._parameters[" in source or "._buffers[" in source


def _is_module_attr(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A ``get_attr`` of a submodule (e.g. the subgraph of an ``invoke_subgraph`` call)."""
    if node.op != "get_attr":
        return False
    obj = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part, None)
    return isinstance(obj, torch.nn.Module)


def _is_convex(nodes: set[fx.Node], order: dict[fx.Node, int]) -> bool:
    """True when no path leaves ``nodes`` and comes back into them."""
    first = min(order[n] for n in nodes)
    last = max(order[n] for n in nodes)
    tainted: set[fx.Node] = set()
    for node in list(next(iter(nodes)).graph.nodes)[first : last + 1]:
        deps = node.all_input_nodes
        if node in nodes:
            if any(d in tainted for d in deps):
                return False
        elif any(d in nodes or d in tainted for d in deps):
            tainted.add(node)
    return True


def _same(a: object, b: object) -> bool:
    """Same shape and dtype, and token-shaped (``[B, tokens..., channels]``, rank >= 3):
    a Transformer block's stream, not a vector such as an embedding MLP's."""
    return (
        isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and a.dim() >= 3
        and tuple(a.shape) == tuple(b.shape)
        and a.dtype == b.dtype
    )


def _pair_streams(block: Block, nxt: Block | None, prev: Block | None) -> list[tuple[int, int]] | None:
    """Pair each output with the stream input it updates; None if one cannot be paired."""
    ins = [example_value(n) for n in block.inputs]
    outs = [example_value(n) for n in block.outputs]
    pairs: dict[int, int] = {}
    # 1. dataflow: output j feeds input position i of the next sibling -> (i, j)
    if nxt is not None and len(nxt.inputs) == len(block.inputs):
        for j, out in enumerate(block.outputs):
            for i, n in enumerate(nxt.inputs):
                if n is out and i not in block.param_inputs and _same(ins[i], outs[j]):
                    pairs[j] = i
    # 2. the pairing of the previous sibling, where its signature matches (the last block)
    if prev is not None and len(prev.inputs) == len(block.inputs) and len(prev.outputs) == len(block.outputs):
        for i, j in prev.stream_pairs:
            if j not in pairs and i not in pairs.values() and _same(ins[i], outs[j]):
                pairs[j] = i
    # 3. shape: the first non-parameter input with the output's shape and dtype
    taken = set(pairs.values())
    for j, out in enumerate(outs):
        if j in pairs:
            continue
        cands = [i for i, v in enumerate(ins) if i not in block.param_inputs and i not in taken and _same(v, out)]
        if not cands:
            return None
        pairs[j] = cands[0]  # ties go to the earliest input, the order in which the block reads them
        taken.add(cands[0])
    return sorted(((i, j) for j, i in pairs.items()), key=lambda p: p[1])


def find_blocks(gm: fx.GraphModule, config: AdaCorrConfig) -> fx.GraphModule:
    """Annotate ``gm`` with the isolable repeated blocks (see module docstring)."""
    info: Analysis = analysis(gm)
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    examples = dict(zip(placeholders, info.example_inputs)) if info.example_inputs else {}

    members: dict[str, list[fx.Node]] = defaultdict(list)
    classes: dict[str, str] = {}
    for node in graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        found = _block_of(node)
        if found is not None:
            members[found[0]].append(node)
            classes[found[0]] = found[1]

    families: dict[str, list[str]] = defaultdict(list)  # "<container>" or "<container>[<class>]"
    for path in members:
        container = path.rsplit(".", 1)[0]
        families[(container, classes[path])].append(path)
    # one class per container keeps the plain name; a mixed container is split per class
    per_container = defaultdict(int)
    for container, _ in families:
        per_container[container] += 1
    families = {
        (c if per_container[c] == 1 else f"{c}[{cls}]"): paths for (c, cls), paths in families.items()
    }

    blocks: list[Block] = []
    for family, paths in families.items():
        if len(paths) < config.min_blocks:
            for p in paths:
                info.skip(p, f"family {family!r} has {len(paths)} block(s), fewer than min_blocks={config.min_blocks}")
            continue
        fam_blocks = []
        for path in paths:
            nodes = members[path]
            node_set = set(nodes)
            if not _is_convex(node_set, order):
                info.skip(path, "its nodes interleave with code that both depends on the block and feeds it")
                continue
            inputs: list[fx.Node] = []
            seen: set[fx.Node] = set()
            for n in nodes:
                for d in n.all_input_nodes:
                    if _is_module_attr(gm, d):
                        continue  # a subgraph (nested_compile_region): copied into the body
                    if d not in node_set and d not in seen:
                        seen.add(d)
                        inputs.append(d)
            outputs = [n for n in nodes if any(u not in node_set for u in n.users)]
            if not outputs:
                info.skip(path, "no value of the block is used outside it")
                continue
            block = Block(
                family=family,
                index=int(path.rsplit(".", 1)[1]),
                path=path,
                cls_name=classes[path],
                nodes=nodes,
                inputs=inputs,
                outputs=outputs,
                param_inputs={i for i, n in enumerate(inputs) if _is_param(n, examples.get(n))},
                input_names=[n.name for n in inputs],
            )
            fam_blocks.append(block)
        fam_blocks.sort(key=lambda b: order[b.nodes[0]])
        for k, block in enumerate(fam_blocks):
            nxt = fam_blocks[k + 1] if k + 1 < len(fam_blocks) else None
            prev = fam_blocks[k - 1] if k > 0 and fam_blocks[k - 1].stream_pairs else None
            pairs = _pair_streams(block, nxt, prev)
            if pairs is None:
                shapes = [tuple(getattr(example_value(o), "shape", ())) for o in block.outputs]
                info.skip(block.path, f"an output (shapes {shapes}) has no token-shaped input (rank >= 3) of the same shape and dtype to be its residual stream")
                continue
            block.stream_pairs = pairs
            paired = {i for i, _ in pairs}
            extra = [
                i
                for i, n in enumerate(block.inputs)
                if i not in paired
                and i not in block.param_inputs
                and isinstance(example_value(n), torch.Tensor)
                and example_value(n).dim() >= 3
            ]
            block.observed = sorted(paired) + extra
            blocks.append(block)

    blocks.sort(key=lambda b: order[b.nodes[0]])
    info.blocks = blocks
    if not blocks and not info.skipped:
        info.skip("graph", "no repeated sibling modules (<container>.<i>) in the traced graph")
    return gm
