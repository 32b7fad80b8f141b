"""lower: compile the glue with Inductor and each distinct block body once.

Matches: the graph after ``guard_blocks`` (region calls between glue code).
Emits: a split GraphModule whose children are, in order, glue pieces (compiled
by Inductor, or left as FX graphs for ``lowering="eager"``) and region pieces (a
region call and the ``getitem`` of its outputs, run by Python so that the region
can decide per step). The pieces of the regions of one span (``chain_regions``) then
become one :class:`~adacorr_compile.runtime.region.SpanCall` (:func:`fuse_spans`), so
that a step that reuses the span costs one module call, not one per block. Each region's ``body_fn`` is its lowered body; bodies with
equal structural keys share one compiled function (parameters are inputs). The
regions share one :class:`RegionMath`, which compiles their per-step score and
refresh math on first use, once per input signature.

Shapes for compilation come from Dynamo's fake tensors in the nodes' metadata
(symbolic when the graph is dynamic), so nothing runs at compile time, not even on
fake tensors. Symbolic sizes are inputs of the compiled parts: a region call gets,
after its own arguments, the SymInt nodes binding the free symbols of its inputs'
shapes (``(s0//2)*(s1//2)`` tokens need ``s0`` and ``s1``), its body gets matching
placeholders, and ``split_module`` passes the symbols on to every piece that uses
them.

Autocast: ``split_module`` needs piece numbers that never decrease along the graph
once it holds an autocast (or grad-mode) switch, so a tensor slice belongs to the piece
where it stands and a tuple's ``getitem`` nodes are moved next to it; the autocast
state is left around each region call (``autocast.isolate_regions``: the bodies enter
it themselves), so autocast regions stay inside the glue pieces.
"""

from __future__ import annotations

import logging
import operator
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.fx.passes.split_module import split_module

from ..compilers import CompiledPart, compile_graph, cuda_graphed, inductor_patches  # noqa: F401 - re-exported: lower.compile_graph, lower.inductor_patches
from ..config import AdaCorrConfig
from ..runtime.fused import RegionMath
from ..runtime.region import ARG, CONSTANT, PREVIOUS, GuardedRegion, SpanCall
from . import autocast
from .common import analysis, example_value

logger = logging.getLogger("adacorr_compile")


def _partition(gm: fx.GraphModule) -> dict[fx.Node, int]:
    """Piece of each node: glue stretches and region calls alternate, in graph order. The
    numbers never decrease along the graph (``split_module`` requires it once the graph
    holds an autocast or grad-mode switch): the ``getitem`` nodes of a tuple sit right
    after it (:func:`_gather_getitems`)."""
    part: dict[fx.Node, int] = {}
    current = 0
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if _is_region(node):
            current += 1
            part[node] = current
            current += 1
        elif _is_tuple_item(node) and node.args[0] in part:
            # keep tuple-valued nodes and their getitems together: pieces exchange tensors only
            part[node] = part[node.args[0]]
        else:  # a slice of a tensor (``t[:, -n:]``) is computed where it stands
            part[node] = current
    return part


def _is_tuple_item(node: fx.Node) -> bool:
    """A ``getitem`` of a tuple or list (a region's outputs, ``chunk``), not of a tensor."""
    if node.op != "call_function" or node.target is not operator.getitem or not isinstance(node.args[0], fx.Node):
        return False
    source = node.args[0]
    return _is_region(source) or not isinstance(example_value(source), torch.Tensor)


def _gather_getitems(graph: fx.Graph) -> None:
    """Move each ``getitem`` of a tuple right after the tuple (or its previous ``getitem``).
    Reading an item of an immutable tuple earlier changes nothing, and keeps a tuple and
    its items in one piece even where the code reads an item after a later block."""
    last: dict[fx.Node, fx.Node] = {}
    for node in list(graph.nodes):
        if _is_tuple_item(node):
            source = node.args[0]
            anchor = last.get(source, source)
            if anchor.next is not node:
                anchor.append(node)
            last[source] = node


def _is_region(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_module" and str(node.target).startswith("adacorr_region_")


# ------------------------------------------------------------------ symbolic sizes
def _symbol_of(value: Any) -> Any:
    """The sympy symbol a SymInt/SymFloat stands for, if it is a plain symbol that a
    compiled part taking it as an input binds. A size Dynamo found equal to another
    (``s39`` replaced by ``s1``: a text length read twice) reads as ``s1`` but binds
    ``s39`` in the part that takes it, leaving ``s1`` unbound there: it binds nothing."""
    import sympy

    if not isinstance(value, (torch.SymInt, torch.SymFloat)):
        return None
    expr = value.node.expr
    if isinstance(expr, sympy.Symbol) and getattr(value.node, "_expr", expr) == expr:
        return expr
    return None


def _free_symbols(value: Any) -> list[Any]:
    from torch.fx.experimental.symbolic_shapes import free_symbols

    try:
        return sorted(free_symbols(value), key=str)
    except Exception:  # noqa: BLE001 - a value free_symbols does not walk holds no sizes
        return []


def bind_symbols(gm: fx.GraphModule) -> int:
    """Make the symbols of each region's input shapes inputs of the region and its body.

    A compiled body must be able to read every symbol its input shapes use: a tensor of
    ``(s0//2)*(s1//2)`` tokens does not give ``s0`` and ``s1`` back. For each region
    call, the nodes binding the free symbols of its inputs (Dynamo's SymInt placeholders,
    or ``sym_size`` nodes of a graph input added here) are appended to the call's
    arguments, in symbol order, and the body gets a placeholder per symbol. The region's
    stream and observed positions index its first arguments, so they are unchanged.
    Returns the number of symbols bound. Raises ``ValueError`` for a symbol with no
    binding before the call (an unbacked size): the backend then compiles the graph
    without guards."""
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    binding: dict[Any, fx.Node] = {}
    for node in graph.nodes:  # SymInt-valued nodes first: placeholders come first
        s = _symbol_of(example_value(node))
        if s is not None and s not in binding:
            binding[s] = node
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    bound = 0
    for node in list(graph.nodes):
        if not _is_region(node):
            continue
        region = gm.get_submodule(str(node.target))
        have = {_symbol_of(example_value(a)) for a in node.args if isinstance(a, fx.Node)} - {None}
        needed: list[Any] = []
        for a in node.args:
            if isinstance(a, fx.Node):
                for s in _free_symbols(example_value(a)):
                    if s not in have and s not in needed:
                        needed.append(s)
        if not needed:
            continue
        needed.sort(key=str)
        extra: list[fx.Node] = []
        for s in needed:
            src = binding.get(s)
            if src is None:
                src = _size_node(graph, placeholders, s)
                if src is None:
                    raise ValueError(f"{region.spec.path}: no graph input binds the size symbol {s} of its inputs")
                binding[s] = src
                order = {n: i for i, n in enumerate(graph.nodes)}
            if order[src] > order[node]:
                raise ValueError(f"{region.spec.path}: the size symbol {s} is bound only after the block")
            extra.append(src)
        node.args = (*node.args, *extra)
        body = region.body
        last = [n for n in body.graph.nodes if n.op == "placeholder"][-1]
        for src in reversed(extra):  # inserted right after the last input: keeps the order
            with body.graph.inserting_after(last):
                ph = body.graph.placeholder(f"sym_{src.name}")
            ph.meta = dict(src.meta)
        body.recompile()
        bound += len(extra)
    if bound:
        gm.recompile()
    return bound


def _size_node(graph: fx.Graph, placeholders: list[fx.Node], symbol: Any) -> fx.Node | None:
    """A ``sym_size`` node reading ``symbol`` off a graph input whose dimension it is."""
    for ph in placeholders:
        v = example_value(ph)
        if not isinstance(v, torch.Tensor):
            continue
        for dim, size in enumerate(v.shape):
            if _symbol_of(size) == symbol:
                with graph.inserting_after(placeholders[-1]):
                    node = graph.call_function(torch.ops.aten.sym_size.int, (ph, dim))
                node.meta["example_value"] = size
                node.meta["val"] = size
                return node
    return None


# ------------------------------------------------------------------ compiling the pieces
def _fakes(gm: fx.GraphModule) -> list[Any] | None:
    """The example values of ``gm``'s placeholders (Dynamo's fake tensors and SymInts)."""
    values = [example_value(n) for n in gm.graph.nodes if n.op == "placeholder"]
    return None if any(v is None for v in values) else values


class _DropTrailing(torch.nn.Module):
    """Calls ``fn`` without the trailing size arguments (bodies that take tensors only)."""

    def __init__(self, fn: Callable[..., Any], keep: int) -> None:
        super().__init__()
        self.fn, self.keep = fn, keep

    def forward(self, *args: Any) -> Any:
        return self.fn(*args[: self.keep])


def _compile_body(region: GuardedRegion, config: AdaCorrConfig) -> Callable[..., Any]:
    body = region.body
    fakes = _fakes(body)
    if fakes is None:
        raise ValueError(f"body {region.spec.path}: its inputs carry no example values")
    if config.lowering == "tensorrt":
        sizes = sum(1 for v in fakes if not isinstance(v, torch.Tensor))
        if sizes:  # torch-tensorrt takes tensors only; it reads symbolic sizes off the tensors
            trimmed = fx.GraphModule(body, _without_size_inputs(body.graph))
            fn = compile_graph(trimmed, [v for v in fakes if isinstance(v, torch.Tensor)], config, f"body {region.spec.path}")
            return _DropTrailing(fn, len(fakes) - sizes)
    return compile_graph(body, fakes, config, f"body {region.spec.path}")


def _without_size_inputs(graph: fx.Graph) -> fx.Graph:
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in graph.nodes:
        if n.op == "placeholder" and not isinstance(example_value(n), torch.Tensor) and not n.users:
            continue
        env[n] = new.node_copy(n, lambda x: env[x])
    return new


def _compile_pieces(split: fx.GraphModule, config: AdaCorrConfig, math: RegionMath) -> dict[str, Any]:
    bodies: dict[str, Any] = {}
    # TensorRT is for block bodies; the glue between them goes through Inductor
    glue_config = config.replace(lowering="inductor") if config.lowering == "tensorrt" else config
    for node in split.graph.nodes:
        if node.op != "call_module":
            continue
        sub = split.get_submodule(str(node.target))
        regions = [sub] if isinstance(sub, GuardedRegion) else [m for m in sub.modules() if isinstance(m, GuardedRegion)]
        if regions:
            for region in regions:
                key = region.spec.key
                if key not in bodies:
                    bodies[key] = region.body if config.lowering == "eager" else _compile_body(region, config)
                region.body_fn = bodies[key]
                region.math = math
                region.copy_kept = cuda_graphed(config)
            continue
        if config.lowering == "eager":
            continue
        if any(n.op in ("call_function", "call_method", "call_module") for n in sub.graph.nodes):
            fakes = _fakes(sub)
            if fakes is None:
                raise ValueError(f"glue {node.target}: its inputs carry no example values")
            setattr(split, str(node.target), compile_graph(sub, fakes, glue_config, f"glue {node.target}"))
    return bodies


def lower(gm: fx.GraphModule, config: AdaCorrConfig) -> fx.GraphModule:
    """Split at the regions and lower every piece (see module docstring)."""
    info = analysis(gm)
    bind_symbols(gm)
    _gather_getitems(gm.graph)
    autocast.isolate_regions(gm, _is_region)  # region pieces run outside autocast; bodies enter it
    part = _partition(gm)
    split = split_module(gm, gm, lambda n: part[n], keep_original_order=True)
    # one RegionMath for the graph: regions of equal shapes share its compiled kernels (and
    # the regions' config home: one config for both)
    bodies = _compile_pieces(split, config, RegionMath(info.regions[0].home if info.regions else config))
    fuse_spans(split)
    info.bodies_compiled = len(bodies)
    split.meta["adacorr"] = info
    split.recompile()
    return split


# ------------------------------------------------------------------ one call per span
def _piece_region(split: fx.GraphModule, node: fx.Node) -> tuple[GuardedRegion, fx.Node] | None:
    """The region of a region piece (a call of one region and the ``getitem`` of its
    outputs) and its call node in the piece's graph; None for any other node."""
    if node.op != "call_module":
        return None
    sub = split.get_submodule(str(node.target))
    if not isinstance(sub, fx.GraphModule):
        return None
    calls = [n for n in sub.graph.nodes if _is_region(n)]
    if len(calls) != 1:
        return None
    region = sub.get_submodule(str(calls[0].target))
    return (region, calls[0]) if isinstance(region, GuardedRegion) else None


def _piece_outputs(piece: fx.GraphModule, call: fx.Node) -> int | tuple[int, ...] | None | str:
    """What a piece returns, as region output indices: None the region's whole tuple, an
    int one output, a tuple of ints several; ``"?"`` for anything else."""

    def index(value: Any) -> int | None | str:
        if value is call:
            return None
        if isinstance(value, fx.Node) and _getitem_of(value, call):
            return value.args[1]
        return "?"

    out = next(n for n in piece.graph.nodes if n.op == "output").args[0]
    if isinstance(out, (tuple, list)):
        indices = [index(v) for v in out]
        return tuple(indices) if all(isinstance(i, int) for i in indices) else "?"  # type: ignore[return-value]
    return index(out)


def _getitem_of(node: fx.Node, source: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is operator.getitem and node.args[0] is source
            and isinstance(node.args[1], int))


def _span_groups(split: fx.GraphModule) -> list[list[tuple[fx.Node, GuardedRegion, fx.Node]]]:
    """Consecutive region pieces that hold one span each, in order (spans of two or more)."""
    found = []
    for node in split.graph.nodes:
        hit = _piece_region(split, node)
        if hit is not None:
            found.append((node, *hit))
    groups = []
    i = 0
    while i < len(found):
        span = found[i][1].span
        group = found[i:i + span.size]
        if (span.size > 1 and span.position == 0 and len(group) == span.size
                and all(r.span.key == span.key and r.span.position == k for k, (_, r, _) in enumerate(group))):
            groups.append(group)
            i += span.size
        else:
            i += 1
    return groups


def _fuse_group(split: fx.GraphModule, group: list[tuple[fx.Node, GuardedRegion, fx.Node]]) -> str | None:
    """Replace one span's pieces in ``split``'s graph by a :class:`SpanCall`; returns why not
    (the graph unchanged) or None when done."""
    graph = split.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    start = order[group[0][0]]
    flat: list[fx.Node] = []
    plans: list[list[tuple[int, Any]]] = []
    outputs: list[Any] = []
    consumed: set[fx.Node] = set()  # the pieces and the getitems between them: replaced
    for k, (node, region, call) in enumerate(group):
        piece = split.get_submodule(str(node.target))
        placeholders = [n for n in piece.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(node.args) or node.kwargs or call.kwargs:
            return f"{region.spec.path}: its piece is not called by position"
        outs = _piece_outputs(piece, call)
        if outs == "?":
            return f"{region.spec.path}: its piece returns more than the region's outputs"
        outputs.append(outs)
        plan: list[tuple[int, Any]] = []
        for a in call.args:
            if not isinstance(a, fx.Node):
                plan.append((CONSTANT, a))
                continue
            if a.op != "placeholder":
                return f"{region.spec.path}: its region takes a value computed in its piece"
            v = node.args[placeholders.index(a)]
            before = group[k - 1][0] if k else None
            if before is not None and isinstance(v, fx.Node) and (v is before or _getitem_of(v, before)):
                # an output of the previous piece: which output of the previous region it is
                prev = outputs[k - 1]
                if v is before:  # the piece's whole return: one output of its region
                    picked = prev if isinstance(prev, int) else None
                else:
                    i = v.args[1]
                    picked = prev[i] if isinstance(prev, tuple) else i if prev is None else None
                if not isinstance(picked, int):
                    return f"{region.spec.path}: an input is not one output of the previous block"
                plan.append((PREVIOUS, picked))
                consumed.add(v)
            elif isinstance(v, fx.Node):
                if order[v] >= start:
                    return f"{region.spec.path}: an input is computed inside the span"
                if v not in flat:
                    flat.append(v)
                plan.append((ARG, flat.index(v)))
            else:
                plan.append((CONSTANT, v))
        plans.append(plan)
        consumed.add(node)
        if k < len(group) - 1:
            # nothing but the next piece reads this one's outputs, and nothing runs between them
            nxt = group[k + 1][0]
            for user in node.users:
                if user is nxt:
                    continue
                if not (user.op == "call_function" and user.target is operator.getitem and set(user.users) <= {nxt}):
                    return f"{region.spec.path}: its outputs are read outside the span"
            between = [n for n in graph.nodes if order[node] < order[n] < order[nxt]]
            if any(not _getitem_of(n, node) for n in between):
                return f"{region.spec.path}: the graph computes something between two blocks of the span"
            consumed.update(u for u in node.users if u is not nxt)
    regions = [r for _, r, _ in group]
    last_node = group[-1][0]
    name = f"adacorr_span_{regions[0].spec.order}"
    split.add_submodule(name, SpanCall(regions, plans, outputs[-1]))
    with graph.inserting_before(group[0][0]):
        fused = graph.call_module(name, tuple(flat))
    fused.meta = dict(last_node.meta)
    last_node.replace_all_uses_with(fused)
    for n in sorted(consumed, key=order.__getitem__, reverse=True):
        graph.erase_node(n)
    for node, _, _ in group:
        split.delete_submodule(str(node.target))
    return None


def fuse_spans(split: fx.GraphModule) -> int:
    """Call the regions of each span as one :class:`SpanCall` (see module docstring); a span
    whose pieces do not chain plainly keeps one call per region (logged). Returns the number
    of spans fused."""
    fused = 0
    for group in _span_groups(split):
        why = _fuse_group(split, group)
        if why is None:
            fused += 1
        else:
            logger.info("adacorr: span %s keeps a call per block (%s)", group[0][1].span.key, why)
    if fused:
        split.graph.lint()
        split.recompile()
    return fused
