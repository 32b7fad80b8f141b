"""lower: compile the glue with Inductor and each distinct block body once.

Matches: the graph after ``guard_blocks`` (region calls between glue code).
Emits: a split GraphModule whose children are, in order, glue pieces (compiled
by Inductor, or left as FX graphs for ``lowering="eager"``) and region pieces (a
region call and the ``getitem`` of its outputs, run by Python so that the region
can decide per step). Each region's ``body_fn`` is its lowered body; bodies with
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
from ..runtime.region import GuardedRegion
from .common import analysis, example_value

logger = logging.getLogger("adacorr_compile")


def _partition(gm: fx.GraphModule) -> dict[fx.Node, int]:
    part: dict[fx.Node, int] = {}
    current = 0
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if _is_region(node):
            current += 1
            part[node] = current
            current += 1
        elif node.op == "call_function" and node.target is operator.getitem and node.args[0] in part:
            # keep tuple-valued nodes and their getitems together: pieces exchange tensors only
            part[node] = part[node.args[0]]
        else:
            part[node] = current
    return part


def _is_region(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_module" and str(node.target).startswith("adacorr_region_")


# ------------------------------------------------------------------ symbolic sizes
def _symbol_of(value: Any) -> Any:
    """The sympy symbol a SymInt/SymFloat stands for, if it is a plain symbol."""
    import sympy

    if isinstance(value, (torch.SymInt, torch.SymFloat)) and isinstance(value.node.expr, sympy.Symbol):
        return value.node.expr
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
    part = _partition(gm)
    split = split_module(gm, gm, lambda n: part[n], keep_original_order=True)
    # one RegionMath for the graph: regions of equal shapes share its compiled kernels
    bodies = _compile_pieces(split, config, RegionMath(config))
    info.bodies_compiled = len(bodies)
    split.meta["adacorr"] = info
    split.recompile()
    return split
