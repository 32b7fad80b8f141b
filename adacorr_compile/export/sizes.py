"""Graph surgery the export needs around the blocks: sizes recomputed from tensors (so
that ``torch.cond`` gets tensor operands only), block outputs that alias their inputs,
no-op squeezes that ONNX rejects, the symbols of the model inputs' dimensions."""

from __future__ import annotations

import operator
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx

from ..passes.common import example_value
from .dims import ExportError

def _size_sources(nodes: Sequence[fx.Node]) -> dict[Any, tuple[fx.Node, int]]:
    """Symbol -> (tensor node, axis) for every dimension of ``nodes`` that is a bare symbol."""
    import sympy

    sources: dict[Any, tuple[fx.Node, int]] = {}
    for n in nodes:
        val = example_value(n)
        if isinstance(val, torch.Tensor):
            for axis, d in enumerate(val.shape):
                if isinstance(d, torch.SymInt) and isinstance(d.node.expr, sympy.Symbol):
                    sources.setdefault(d.node.expr, (n, axis))
    return sources


def _emit_size(graph: fx.Graph, expr: Any, sources: Mapping[Any, tuple[fx.Node, int]], what: str) -> Any:
    """FX nodes computing the symbolic size ``expr`` from ``sym_size`` of the source tensors
    (at the graph's insertion point); ``ExportError`` when a symbol has no source."""
    import sympy

    from torch.utils._sympy.functions import FloorDiv, Mod, PythonMod

    if isinstance(expr, (int, sympy.Integer)):
        return int(expr)
    if isinstance(expr, sympy.Symbol):
        if expr not in sources:
            raise ExportError(f"{what} is a size ({expr}) that no tensor it can see has")
        node, axis = sources[expr]
        out = graph.call_function(torch.ops.aten.sym_size.int, (node, axis))
        out.meta["val"] = example_value(node).shape[axis]
        return out
    fn = None
    for kind, f in ((sympy.Add, operator.add), (sympy.Mul, operator.mul), (FloorDiv, operator.floordiv), (Mod, operator.mod),
                    (PythonMod, operator.mod)):
        if isinstance(expr, kind):
            fn = f
    if fn is None:
        raise ExportError(f"{what} is a size ({expr}) the exporter cannot rebuild")
    args = [_emit_size(graph, a, sources, what) for a in expr.args]
    out = args[0]
    for arg in args[1:]:
        val = fn(out.meta["val"] if isinstance(out, fx.Node) else out, arg.meta["val"] if isinstance(arg, fx.Node) else arg)
        out = graph.call_function(fn, (out, arg))
        out.meta["val"] = val
    return out


def _hoist_sizes(gm: fx.GraphModule) -> int:
    """Recompute every size (SymInt) node of the traced graph from the model inputs'
    sizes, at the top of the graph, outside any module.

    With dynamic shapes ``torch.export`` records shape arithmetic where the model did it,
    often inside a block (Flux's first block computes the joint token count that later
    blocks use): a block with a size output cannot be guarded, and blocks would depend
    on each other through sizes. As glue, sizes are inputs of the blocks instead, the
    way they are in the backend's (static) Dynamo graphs.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not placeholders:
        return 0
    sources = _size_sources(placeholders)
    first_op = placeholders[-1].next  # after every placeholder (get_attr nodes may come first)
    hoisted = 0
    for node in list(gm.graph.nodes):
        val = node.meta.get("val")
        if node.op != "call_function" or not isinstance(val, torch.SymInt):
            continue
        if not val.node.expr.free_symbols <= set(sources):
            continue  # data-dependent or not from the inputs: leave it
        with gm.graph.inserting_before(first_op):
            size = _emit_size(gm.graph, val.node.expr, sources, node.name)
        if not isinstance(size, fx.Node):
            continue
        node.replace_all_uses_with(size)
        gm.graph.erase_node(node)
        hoisted += 1
    if hoisted:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return hoisted


def _sizes_from_tensors(body: fx.GraphModule, path: str) -> list[int]:
    """Make the body compute its size inputs (SymInt placeholders, e.g. the batch size or
    the joint token count a block's ``view`` needs) from its own tensor inputs' sizes.

    ``torch.cond`` takes tensor operands only, and a SymInt closed over by a branch
    fails to trace (Dynamo's subgraph tracing cannot lift it into a ``view``'s size
    list). The placeholders stay (the call signature is unchanged) but lose their users.
    A size that cannot be rebuilt from the block's tensors (SD3's latent width, when only
    the token count ``(H/2)*(W/2)`` reaches the block) is carried instead: the placeholder
    then takes an empty tensor of shape ``[size, 0]`` and the body reads dimension 0.
    Returns the positions of the carried placeholders.
    """
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    sources = _size_sources(placeholders)
    graph = body.graph
    first_op = placeholders[-1].next
    carried: list[int] = []
    for pos, ph in enumerate(placeholders):
        value = example_value(ph)
        if not isinstance(value, torch.SymInt) or not ph.users:
            continue
        users = list(ph.users)
        try:
            with graph.inserting_before(first_op):  # keeps the emitted nodes in order
                size = _emit_size(graph, value.node.expr, sources, f"{path}: block input {ph.name}")
        except ExportError:
            with graph.inserting_before(first_op):
                size = graph.call_function(torch.ops.aten.sym_size.int, (ph, 0))
            size.meta["val"] = value
            carried.append(pos)
        for user in users:
            user.replace_input_with(ph, size)
    graph.eliminate_dead_code()
    graph.lint()
    body.recompile()
    return carried


def _same_layout(values: Sequence[torch.Tensor], flat: bool = False) -> tuple[torch.Tensor, ...]:
    """Branch outputs must agree in layout (torch.cond checks strides): all contiguous,
    and with ``flat`` one-dimensional (scalars stay scalars)."""
    return tuple(v.reshape(-1) if flat and v.dim() else v.contiguous() for v in values)




# composite ops that may return their first argument itself (their schemas declare no alias)
_MAYBE_SELF = {"type_as", "contiguous", "reshape", "flatten", "expand_as", "view_as", "float", "to", "type"}


def _alias_base(node: Any) -> Any:
    """The node whose storage ``node``'s value may share: followed back through views and
    ops that may return their input (``x.float()`` of a float ``x``), item access of a split."""
    seen = 0
    while isinstance(node, fx.Node) and node.op == "call_function" and seen < 1000:
        seen += 1
        target = node.target
        if target is operator.getitem:
            node = node.args[0]
            continue
        schema = getattr(target, "_schema", None)
        packet = getattr(target, "_overloadpacket", None)
        aliases = schema is not None and any(r.alias_info is not None for r in schema.returns)
        if not (aliases or getattr(packet, "__name__", None) in _MAYBE_SELF) or not node.args:
            break
        node = node.args[0]
    return node


def _aliasing_outputs(body: fx.GraphModule) -> set[int]:
    """Positions of ``body``'s outputs that may alias one of its inputs or an earlier output."""
    out = next(n for n in body.graph.nodes if n.op == "output")
    values = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    aliasing, bases = set(), set()
    for j, v in enumerate(values):
        base = _alias_base(v)
        if isinstance(base, fx.Node) and (base.op == "placeholder" or base in bases):
            aliasing.add(j)
        bases.add(base)
    return aliasing



def _drop_noop_squeezes(gm: fx.GraphModule) -> int:
    """Remove ``aten.squeeze`` of dimensions whose size is known and not 1.

    In PyTorch such a squeeze is a no-op (PixArt's ``hidden_states.squeeze(1)`` on
    ``[B, tokens, C]``); the ONNX exporter emits an ONNX ``Squeeze`` for it, which is
    invalid (``onnx.checker`` and onnxruntime reject a squeeze of a dimension != 1).
    """
    removed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (torch.ops.aten.squeeze.dim, torch.ops.aten.squeeze.dims):
            continue
        x = node.args[0]
        val = example_value(x) if isinstance(x, fx.Node) else None
        if not isinstance(val, torch.Tensor):
            continue
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = [dims] if isinstance(dims, int) else list(dims)
        sizes = [val.shape[d] for d in dims]
        if all(isinstance(n, int) and n != 1 for n in sizes):
            node.replace_all_uses_with(x)
            gm.graph.erase_node(node)
            removed += 1
    if removed:
        gm.graph.lint()
        gm.recompile()
    return removed



def _bindings(gm: fx.GraphModule) -> dict[Any, tuple[str, int]]:
    """Symbol -> (model input, axis) for every input dimension that is a bare symbol."""
    import sympy

    out: dict[Any, tuple[str, int]] = {}
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        for axis, d in enumerate(val.shape):
            if isinstance(d, torch.SymInt) and isinstance(d.node.expr, sympy.Symbol):
                out.setdefault(d.node.expr, (node.name, axis))
    return out

