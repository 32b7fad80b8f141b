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
In-place writes count as dependencies (``mutation_analysis``): a block must be
convex over them too, and a block whose caching would skip or corrupt a write is
left out (``_mutation_hazard``). A block must run under one autocast state
(``autocast.context_change``): its body enters that state itself (``outline_blocks``).
Anything else is left unguarded with a logged reason; it is never guessed.
"""

from __future__ import annotations

import operator
import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..config import AdaCorrConfig
from . import autocast
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


def _is_convex(nodes: set[fx.Node], order: dict[fx.Node, int], after: dict[fx.Node, set[fx.Node]] | None = None) -> bool:
    """True when no path leaves ``nodes`` and comes back into them. ``after`` adds
    ordering edges (``after[n]``: nodes that must run before ``n``, e.g. around an
    in-place write) to the data edges."""
    first = min(order[n] for n in nodes)
    last = max(order[n] for n in nodes)
    tainted: set[fx.Node] = set()
    for node in list(next(iter(nodes)).graph.nodes)[first : last + 1]:
        deps = node.all_input_nodes
        if after and node in after:
            deps = [*deps, *after[node]]
        if node in nodes:
            if any(d in tainted for d in deps):
                return False
        elif any(d in nodes or d in tainted for d in deps):
            tainted.add(node)
    return True


# --- in-place writes -------------------------------------------------------------
#
# Dynamo graphs keep the program's in-place writes: ``x[:, a:b] = y`` is an
# ``operator.setitem`` node, ``x[:, a:b].copy_(y)`` a ``copy_`` call on a view,
# ``x += y`` an ``operator.iadd``. Such a node has no users, and the nodes that read
# the written tensor do not depend on it by a data edge, so a pass that re-sorts the
# graph (or moves a block) may run a read before the write. ``mutation_analysis``
# gives every write its ordering edges: each node that touches the written tensor (or
# a view of it, found by storage) stays on its side of the write.

_INPLACE_OPERATORS = {
    operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor,
    operator.ilshift, operator.irshift,
}
_INPLACE_DUNDERS = {
    "__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__",
    "__imatmul__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__",
}
GLOBAL_EFFECT = "global"  # pseudo-tensor written by impure nodes that write no tensor (grad mode, autocast, asserts, RNG)


def _nodes_in(a: object) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(a, found.append)
    return found


def written_inputs(node: fx.Node) -> list[fx.Node]:
    """The nodes whose tensors ``node`` writes in place: ``operator.setitem`` and the
    in-place operators (``+=``), ``Tensor.*_`` methods and functions (``copy_``,
    ``index_put_``, ``torch.relu_``, ``torch._foreach_add_``), ``inplace=True``,
    ``out=``, ATen overloads whose schema marks an argument written, and modules with
    ``inplace=True``. ``[]`` for a node that writes nothing."""
    if node.op not in ("call_function", "call_method", "call_module"):
        return []

    def first() -> list[fx.Node]:
        a = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
        return _nodes_in(a)

    written: list[fx.Node] = []
    target = node.target
    if node.op == "call_module":
        try:
            mod = node.graph.owning_module.get_submodule(target)
        except Exception:  # noqa: BLE001 - no owning module: nothing known about it
            mod = None
        if getattr(mod, "inplace", False) is True:
            written += first()
    elif node.op == "call_method":
        if isinstance(target, str) and (target in _INPLACE_DUNDERS or (target.endswith("_") and not target.startswith("_"))):
            written += first()
    elif target in _INPLACE_OPERATORS:
        written += first()
    elif isinstance(target, torch._ops.OpOverload):
        for i, arg in enumerate(target._schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                written += _nodes_in(node.args[i] if i < len(node.args) else node.kwargs.get(arg.name))
    else:
        name = getattr(target, "__name__", "")
        pure_operator = getattr(target, "__module__", None) in ("operator", "_operator")  # and_, or_, not_, is_
        if isinstance(name, str) and not pure_operator and (name in _INPLACE_DUNDERS or (name.endswith("_") and not name.endswith("__"))):
            written += first()
    if node.kwargs.get("inplace") is True:
        written += first()
    if "out" in node.kwargs and not isinstance(target, torch._ops.OpOverload):
        written += _nodes_in(node.kwargs["out"])
    return list(dict.fromkeys(written))


@dataclass
class Mutations:
    """The in-place writes of a graph and the order they impose.

    Tensors are grouped by storage (from the example values: a view shares its base's
    storage); a value without an example value is taken to alias its inputs."""

    writes: dict[fx.Node, set[object]] = field(default_factory=dict)  # writing node -> storages it writes
    keys: dict[fx.Node, set[object]] = field(default_factory=dict)  # node -> storages of its value
    after: dict[fx.Node, set[fx.Node]] = field(default_factory=dict)  # node -> nodes that must run before it
    first_member: dict[object, int] = field(default_factory=dict)  # storage -> position of its first value
    rooted: set[object] = field(default_factory=set)  # storages of graph inputs (placeholders, get_attr)

    def touched(self, node: fx.Node) -> set[object]:
        """Storages ``node`` reads, writes or returns."""
        out = set(self.keys.get(node, ()))
        for d in node.all_input_nodes:
            out |= self.keys.get(d, set())
        return out


def _is_impure(node: fx.Node) -> bool:
    try:
        return node.is_impure()
    except Exception:  # noqa: BLE001 - e.g. a call_module without an owning module
        return True


def _storage_keys(node: fx.Node) -> set[object] | None:
    if "example_value" not in node.meta and "val" not in node.meta:
        return None
    keys: set[object] = set()
    for leaf in pytree.tree_leaves(example_value(node)):
        if isinstance(leaf, torch.Tensor):
            try:
                keys.add(("storage", leaf.untyped_storage()._cdata))
            except Exception:  # noqa: BLE001 - a tensor without a plain storage: alias unknown
                return None
    return keys


def mutation_analysis(graph: fx.Graph) -> Mutations:
    """Storages, in-place writes and the ordering edges that keep every write between
    the nodes that touch its tensor before it and those that touch it after it (and
    every two writes of one tensor, and every two global side effects, in order)."""
    mut = Mutations()
    nodes = list(graph.nodes)
    for i, node in enumerate(nodes):
        written = written_inputs(node)
        written_keys = set().union(*(mut.keys.get(w, set()) for w in written)) if written else set()
        keys = _storage_keys(node) if node.op != "output" else set()
        if keys is None and written:  # setitem returns None, an in-place op its target
            keys = set() if node.target in (operator.setitem, "__setitem__") else set(written_keys)
        elif keys is None:  # unknown: conservatively an alias of everything it reads
            keys = {("node", node.name)}
            for d in node.all_input_nodes:
                keys |= mut.keys.get(d, set())
        mut.keys[node] = keys
        for k in keys:
            mut.first_member.setdefault(k, i)
        if node.op in ("placeholder", "get_attr"):
            mut.rooted |= keys
        if written:
            mut.writes[node] = written_keys | keys
        elif node.op in ("call_function", "call_module") and _is_impure(node):
            mut.writes[node] = {GLOBAL_EFFECT}
    all_written = set().union(*mut.writes.values()) if mut.writes else set()
    last_write: dict[object, fx.Node] = {}
    since: dict[object, list[fx.Node]] = defaultdict(list)  # touched since the last write
    for node in nodes:
        if node.op == "output":
            continue
        touched = (mut.touched(node) & all_written) | (mut.writes.get(node, set()) & {GLOBAL_EFFECT})
        for k in touched:
            if k in last_write:
                mut.after.setdefault(node, set()).add(last_write[k])
            if k in mut.writes.get(node, ()):
                mut.after.setdefault(node, set()).update(since.pop(k, []))
                last_write[k] = node
            else:
                since[k].append(node)
        if node in mut.after:
            mut.after[node].discard(node)
    return mut


def _mutation_hazard(nodes: list[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node], mut: Mutations, order: dict[fx.Node, int]) -> str | None:
    """Why a block cannot be cached because of an in-place write, or None.

    - it writes into a tensor that exists before it (an input, or a view of one): a
      reused block would skip the write;
    - a tensor it reads or returns is written after it: the cache keeps references to
      its inputs and outputs;
    - it reads a graph input (or a view of one) that the graph writes: the tensor is
      the same object every step, so the cached reference would change with it."""
    node_set = set(nodes)
    first = order[nodes[0]]
    last = max(order[n] for n in nodes)
    for n in nodes:
        for k in mut.writes.get(n, ()):
            if k != GLOBAL_EFFECT and mut.first_member.get(k, first) < first:
                return f"{n.name} writes in place into a tensor created outside the block (a reused block would skip the write)"
    seen = set().union(*(mut.keys.get(d, set()) for d in [*inputs, *outputs])) if inputs or outputs else set()
    for m, keys in mut.writes.items():
        if m in node_set or not (keys & seen):
            continue
        if order[m] > last:
            return f"{m.name} writes in place, after the block, into a tensor the block reads or returns (its cache keeps references to them)"
        if keys & seen & mut.rooted:
            return f"{m.name} writes in place into a graph input the block reads (the cached reference would change with it)"
    return None


# --- sizes and scalars shared across blocks ------------------------------------------
#
# Dynamo reuses one proxy for a value it has already computed: under dynamic shapes a
# size such as ``(s0//2)**2`` computed inside block 0 is read again by later blocks and
# the glue, and a float attribute's ``.item()`` (tensorified scalars) inside block 0 is
# read by glue calling a submodule of block 0 (DiT's final layer). Such a scalar output
# would leave block 0 without a residual stream for it. When it depends only on values
# outside the block, it is moved out: size arithmetic is hoisted out of the block (every
# block then takes the size as an input, so the blocks stay structurally equal), and a
# float read off a tensor is copied for the readers outside (a SymFloat crossing from
# one compiled piece to another cannot be turned back into a tensor by Inductor, which
# would make Dynamo specialize the float).

_SCALARS = (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)


def _is_scalar(v: object) -> bool:
    return isinstance(v, _SCALARS) or (isinstance(v, (tuple, list)) and all(isinstance(x, _SCALARS) for x in v))


def _is_float_scalar(n: fx.Node) -> bool:
    v = example_value(n)
    return isinstance(v, (torch.SymFloat, float)) or n.target == "item"


def _outside_stack(node: fx.Node, path: str) -> dict:
    """``node``'s ``nn_module_stack`` without the block ``path`` and what it called."""
    stack = node.meta.get("nn_module_stack") or {}
    kept = {}
    for key, (entry_path, _) in zip(stack.keys(), module_stack(node)):
        if entry_path == path:
            break
        kept[key] = stack[key]
    return kept


def unshare_scalars(graph: fx.Graph) -> int:
    """Move out of each block the scalars (sizes, SymInts, SymFloats) it computes from
    values outside it and that code outside it reads (see above); returns the number of
    nodes moved or copied. Semantics are unchanged: each value is computed from the same
    inputs, only its block membership changes (or a reader outside gets a copy)."""
    owner = {n: _block_of(n) for n in graph.nodes if n.op not in ("placeholder", "output", "get_attr")}
    moved = 0

    def chain(n: fx.Node, path: str, acc: list[fx.Node]) -> bool:
        """Collect ``n`` and its in-block ancestors into ``acc`` (inputs first); False if
        one of them is not a pure scalar."""
        if n in acc:
            return True
        if not _is_scalar(example_value(n)) or n.op == "call_module" or (n.op == "call_function" and _is_impure(n)):
            return False
        for d in n.all_input_nodes:
            if owner.get(d) is not None and owner[d][0] == path and not chain(d, path, acc):
                return False
        acc.append(n)
        return True

    for n in list(graph.nodes):
        block = owner.get(n)
        if block is None or not _is_scalar(example_value(n)):
            continue
        outside = [u for u in n.users if owner.get(u) is None or owner[u][0] != block[0]]
        members: list[fx.Node] = []
        if not outside or not chain(n, block[0], members):
            continue
        if any(_is_float_scalar(m) for m in members):  # copy: the block keeps its own
            env: dict[fx.Node, fx.Node] = {}
            for m in members:
                with graph.inserting_after(m):
                    env[m] = graph.node_copy(m, lambda x: env.get(x, x))
                env[m].meta = dict(m.meta)
                env[m].meta["nn_module_stack"] = _outside_stack(m, block[0])
                owner[env[m]] = None
            for u in outside:
                u.replace_input_with(n, env[n])
        else:  # hoist: the value leaves the block
            for m in members:
                m.meta["nn_module_stack"] = _outside_stack(m, block[0])
                owner[m] = None
        moved += len(members)
    return moved


def _same(a: object, b: object) -> bool:
    """Same shape and dtype, and token-shaped (``[B, tokens..., channels]``, rank >= 3):
    a Transformer block's stream, not a vector such as an embedding MLP's. Symbolic
    sizes are equal only when provably so: the comparison adds no guard to the graph
    (``(s0//2)*(s1//2) == s2`` is not asked of the shape environment)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return (
        isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and a.dim() >= 3
        and a.dim() == b.dim()
        and all(statically_known_true(x == y) for x, y in zip(a.shape, b.shape))
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


def _members(graph: fx.Graph) -> tuple[dict[str, list[fx.Node]], dict[str, list[str]], dict[str, str]]:
    """The nodes of each block path, the block paths of each family, and each block's class.

    A family is a container (``transformer_blocks``) with one block class; a container
    holding several classes is split per class (``blocks[FluxBlock]``)."""
    members: dict[str, list[fx.Node]] = defaultdict(list)
    classes: dict[str, str] = {}
    for node in graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        found = _block_of(node)
        if found is not None:
            members[found[0]].append(node)
            classes[found[0]] = found[1]
    grouped: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in members:
        grouped[(path.rsplit(".", 1)[0], classes[path])].append(path)
    per_container: dict[str, int] = defaultdict(int)
    for container, _ in grouped:
        per_container[container] += 1
    families = {(c if per_container[c] == 1 else f"{c}[{cls}]"): paths for (c, cls), paths in grouped.items()}
    return members, families, classes


@dataclass
class _Scope:
    """What deciding one block needs of the whole graph (computed once per graph)."""

    gm: fx.GraphModule
    order: dict[fx.Node, int]
    mut: Mutations
    active: dict[fx.Node, tuple[fx.Node, ...]]  # autocast state per node
    examples: dict[fx.Node, object]


def _isolate(scope: _Scope, family: str, path: str, cls_name: str, nodes: list[fx.Node]) -> Block | str:
    """The block at ``path`` with its inputs and outputs, or why it cannot be isolated."""
    node_set = set(nodes)
    if not _is_convex(node_set, scope.order):
        return "its nodes interleave with code that both depends on the block and feeds it"
    if not _is_convex(node_set, scope.order, scope.mut.after):
        return "its nodes interleave with an in-place write that must run between them"
    change = autocast.context_change(nodes, scope.active)
    if change is not None:
        return change
    inputs: list[fx.Node] = []
    seen: set[fx.Node] = set()
    for n in nodes:
        for d in n.all_input_nodes:
            if _is_module_attr(scope.gm, d):
                continue  # a subgraph (nested_compile_region): copied into the body
            if d not in node_set and d not in seen:
                seen.add(d)
                inputs.append(d)
    outputs = [n for n in nodes if any(u not in node_set for u in n.users)]
    if not outputs:
        return "no value of the block is used outside it"
    hazard = _mutation_hazard(nodes, inputs, outputs, scope.mut, scope.order)
    if hazard is not None:
        return hazard
    return Block(
        family=family,
        index=int(path.rsplit(".", 1)[1]),
        path=path,
        cls_name=cls_name,
        nodes=nodes,
        inputs=inputs,
        outputs=outputs,
        param_inputs={i for i, n in enumerate(inputs) if _is_param(n, scope.examples.get(n))},
        input_names=[n.name for n in inputs],
    )


def _pair_family(fam_blocks: list[Block], info: Analysis) -> list[Block]:
    """The blocks of one family (in graph order) whose outputs pair with stream inputs."""
    paired: list[Block] = []
    for k, block in enumerate(fam_blocks):
        nxt = fam_blocks[k + 1] if k + 1 < len(fam_blocks) else None
        prev = fam_blocks[k - 1] if k > 0 and fam_blocks[k - 1].stream_pairs else None
        pairs = _pair_streams(block, nxt, prev)
        if pairs is None:
            shapes = [tuple(getattr(example_value(o), "shape", ())) for o in block.outputs]
            info.skip(block.path, f"an output (shapes {shapes}) has no token-shaped input (rank >= 3) of the same shape and dtype to be its residual stream")
            continue
        block.stream_pairs = pairs
        # the OEM watches the streams the block transforms, nothing else: side inputs
        # (attention-mask biases, timestep projections, rotary tables, constant text
        # states) do not say how far the block's input drifted, and a padded mask's
        # -10000 entries would swamp the spatial term
        block.observed = sorted({i for i, _ in pairs})
        paired.append(block)
    return paired


def find_blocks(gm: fx.GraphModule, config: AdaCorrConfig) -> fx.GraphModule:
    """Annotate ``gm`` with the isolable repeated blocks (see module docstring)."""
    info: Analysis = analysis(gm)
    graph = gm.graph
    if unshare_scalars(graph):  # dynamic shapes: sizes and scalars read by several blocks
        gm.recompile()
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    scope = _Scope(
        gm=gm,
        order={n: i for i, n in enumerate(graph.nodes)},
        mut=mutation_analysis(graph),  # in-place writes: their order is kept (outline_blocks) and checked here
        active=autocast.contexts(graph),
        examples=dict(zip(placeholders, info.example_inputs)) if info.example_inputs else {},
    )
    members, families, classes = _members(graph)
    blocks: list[Block] = []
    for family, paths in families.items():
        if len(paths) < config.min_blocks:
            for p in paths:
                info.skip(p, f"family {family!r} has {len(paths)} block(s), fewer than min_blocks={config.min_blocks}")
            continue
        fam_blocks = []
        for path in paths:
            found = _isolate(scope, family, path, classes[path], members[path])
            if isinstance(found, str):
                info.skip(path, found)
            else:
                fam_blocks.append(found)
        fam_blocks.sort(key=lambda b: scope.order[b.nodes[0]])
        blocks += _pair_family(fam_blocks, info)

    blocks.sort(key=lambda b: scope.order[b.nodes[0]])
    info.blocks = blocks
    if not blocks and not info.skipped:
        info.skip("graph", "no repeated sibling modules (<container>.<i>) in the traced graph")
    if not blocks:
        info.stop()  # nothing to outline: the skips recorded say why
    return gm
