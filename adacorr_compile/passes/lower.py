"""lower: compile the glue with Inductor and each distinct block body once.

Matches: the graph after ``guard_blocks`` (region calls between glue code).
Emits: a split GraphModule whose children are, in order, glue pieces (compiled
by Inductor, or left as FX graphs for ``lowering="eager"``) and region pieces (a
region call and the ``getitem`` of its outputs, run by Python so that the region
can decide per step). Each region's ``body_fn`` is its lowered body; bodies with
equal structural keys share one compiled function (parameters are inputs). The
regions share one :class:`RegionMath`, which compiles their per-step score and
refresh math on first use, once per input signature. Shapes
for compilation come from Dynamo's fake tensors (symbolic when the graph is
dynamic), so nothing runs on real data at compile time.
"""

from __future__ import annotations

import inspect
import logging
import operator
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.fx.passes.split_module import split_module

from ..config import AdaCorrConfig
from ..runtime.fused import RegionMath
from ..runtime.region import GuardedRegion
from .common import analysis

logger = logging.getLogger("adacorr_compile")


class CompiledPart(torch.nn.Module):
    """A compiled piece of graph behind a module call (boxed calling convention handled)."""

    def __init__(self, fn: Callable[..., Any], boxed: bool, name: str) -> None:
        super().__init__()
        self.fn = fn
        self.boxed = boxed
        self.part_name = name
        self.activations: list[int] | None = None  # argument positions that may be non-contiguous

    def forward(self, *args: Any) -> Any:
        # compiled for contiguous inputs (see compile_graph); parameters always are, so
        # only the other tensor positions (found on the first call) are checked
        if self.activations is None:
            self.activations = [i for i, a in enumerate(args)
                                if isinstance(a, torch.Tensor) and not isinstance(a, torch.nn.Parameter)]
        if any(not args[i].is_contiguous() for i in self.activations):
            args = tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)
        return self.fn(list(args)) if self.boxed else self.fn(*args)

    def extra_repr(self) -> str:
        return self.part_name


def compile_graph(gm: fx.GraphModule, example_inputs: list[Any], config: AdaCorrConfig, name: str) -> torch.nn.Module:
    """Lower one FX graph the way ``config.lowering`` says; the one place that picks a compiler."""
    if config.lowering == "eager":
        return gm
    if config.lowering == "tensorrt":
        from ..export.tensorrt import compile_with_torch_tensorrt

        return compile_with_torch_tensorrt(gm, example_inputs, name)
    from torch._inductor.compile_fx import compile_fx

    patches = torch._inductor.list_mode_options(config.inductor_mode) if config.inductor_mode != "default" else {}
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from torch._guards import TracingContext, tracing

    fake_mode = next((x.fake_mode for x in example_inputs if hasattr(x, "fake_mode")), None)
    # Compiled pieces exchange tensors whose layout Inductor chose, which need not be
    # the layout eager propagation predicted: compile for contiguous inputs and let
    # CompiledPart make its inputs contiguous.
    if fake_mode is not None:
        with fake_mode:
            example_inputs = [x.contiguous() if isinstance(x, torch.Tensor) else x for x in example_inputs]
    # compile under a tracing context of the inputs' own fake mode
    with unset_fake_temporarily(), tracing(TracingContext(fake_mode) if fake_mode is not None else None):
        fn = compile_fx(gm, example_inputs, config_patches=patches)
    return CompiledPart(fn, _is_boxed(fn), name)


def _is_boxed(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` takes its inputs as one list. ``_boxed_call`` alone is not
    trustworthy: AOTAutograd's unboxed wrapper copies it from the boxed function it wraps."""
    code = getattr(fn, "__code__", None)
    if code is not None:
        return code.co_argcount == 1 and not code.co_flags & inspect.CO_VARARGS
    return bool(getattr(fn, "_boxed_call", False))


def _partition(gm: fx.GraphModule) -> dict[fx.Node, int]:
    part: dict[fx.Node, int] = {}
    current = 0
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "call_module" and str(node.target).startswith("adacorr_region_"):
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


class _PartCompiler(fx.Interpreter):
    """Walks the split graph on fake inputs and lowers each piece it meets."""

    def __init__(self, split: fx.GraphModule, config: AdaCorrConfig, math: RegionMath) -> None:
        super().__init__(split)
        self.config = config
        self.math = math
        self.bodies: dict[str, Callable[..., Any]] = {}

    def call_module(self, target: str, args: Any, kwargs: Any) -> Any:
        sub = self.fetch_attr(target)
        if isinstance(sub, GuardedRegion):
            key = sub.spec.key
            if key not in self.bodies:
                self.bodies[key] = compile_graph(sub.body, list(args), self.config, f"body {sub.spec.path}")
            sub.body_fn = self.bodies[key]
            sub.math = self.math
            return tuple(sub.body(*args))
        if any(isinstance(m, GuardedRegion) for m in sub.children()):
            return _PartCompiler(sub, self.config, self.math).run_with_bodies(self.bodies, *args)
        out = sub(*args)
        if any(n.op == "call_function" or n.op == "call_method" or n.op == "call_module" for n in sub.graph.nodes):
            # TensorRT is for block bodies; the glue between them goes through Inductor
            glue_config = self.config.replace(lowering="inductor") if self.config.lowering == "tensorrt" else self.config
            compiled = compile_graph(sub, list(args), glue_config, f"glue {target}")
            setattr(self.module, target, compiled)
        return out

    def run_with_bodies(self, bodies: dict[str, Callable[..., Any]], *args: Any) -> Any:
        self.bodies = bodies
        return self.run(*args)


def _fake_inputs(gm: fx.GraphModule, example_inputs: list[Any]) -> tuple[list[Any], Any]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fakes = [n.meta.get("example_value") for n in placeholders]
    # Dynamo's example values carry the graph's (possibly symbolic) shapes; their
    # fake mode is not always the tracing context's, so take it from the tensors.
    modes = {id(f.fake_mode): f.fake_mode for f in fakes if isinstance(f, torch.Tensor) and hasattr(f, "fake_mode")}
    fake_mode = next(iter(modes.values())) if len(modes) == 1 else None
    if fake_mode is None or any(f is None for f in fakes):
        from torch._subclasses.fake_tensor import FakeTensorMode

        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        fakes = [fake_mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
    return fakes, fake_mode


def lower(gm: fx.GraphModule, config: AdaCorrConfig) -> fx.GraphModule:
    """Split at the regions and lower every piece (see module docstring)."""
    info = analysis(gm)
    part = _partition(gm)
    split = split_module(gm, gm, lambda n: part[n], keep_original_order=True)
    fakes, fake_mode = _fake_inputs(gm, info.example_inputs)
    # one RegionMath for the graph: regions of equal shapes share its compiled kernels
    compiler = _PartCompiler(split, config, RegionMath(config))
    with fake_mode:
        compiler.run(*fakes)
    info.bodies_compiled = len(compiler.bodies)
    split.meta["adacorr"] = info
    split.recompile()
    return split
