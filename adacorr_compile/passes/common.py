"""What the passes share: the analysis record kept in ``gm.meta`` and graph helpers."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

logger = logging.getLogger("adacorr_compile")

META_KEY = "adacorr"


@dataclass
class Block:
    """One repeated Transformer block found in the graph."""

    family: str  # container path, e.g. "transformer_blocks"
    index: int  # position in the container
    path: str  # module path, e.g. "transformer_blocks.3"
    cls_name: str
    nodes: list[fx.Node]
    inputs: list[fx.Node] = field(default_factory=list)  # external values the block reads, order of first use
    outputs: list[fx.Node] = field(default_factory=list)  # block values read outside, graph order
    param_inputs: set[int] = field(default_factory=set)  # input positions that are parameters/buffers
    stream_pairs: list[tuple[int, int]] = field(default_factory=list)  # (input pos, output pos), same shape
    observed: list[int] = field(default_factory=list)  # input positions the OEM watches
    key: str = ""  # structural key: equal keys share one compiled body
    input_names: list[str] = field(default_factory=list)  # names in the traced graph, before outlining

    def describe(self) -> dict[str, Any]:
        def shape(n: fx.Node) -> list[int] | None:
            v = example_value(n)
            return list(v.shape) if isinstance(v, torch.Tensor) else None

        side = [i for i in range(len(self.inputs)) if i not in self.param_inputs and i not in {p for p, _ in self.stream_pairs}]
        return {
            "path": self.path,
            "class": self.cls_name,
            "streams": [
                {"input": self.input_names[i], "output_index": o, "shape": shape(self.inputs[i])} for i, o in self.stream_pairs
            ],
            "side_inputs": [{"name": self.input_names[i], "shape": shape(self.inputs[i])} for i in side],
            "parameters": len(self.param_inputs),
            "nodes": len(self.nodes),
        }


@dataclass
class Analysis:
    """What the passes learned about one Dynamo graph (``gm.meta["adacorr"]``)."""

    blocks: list[Block] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (module path or "graph", reason)
    example_inputs: list[Any] = field(default_factory=list)
    # the graph's inputs (analyze_inputs), placeholder positions
    timestep_index: int | None = None  # the timestep argument
    owner_index: int | None = None  # the first parameter: tells module instances apart
    context_index: int | None = None  # a parameter of the first block: finds the diffusers cache_context
    input_indices: list[int] = field(default_factory=list)  # non-parameter tensor inputs
    bodies_compiled: int = 0
    regions: list[Any] = field(default_factory=list)  # GuardedRegion objects, execution order
    spans: list[list[str]] = field(default_factory=list)  # region paths sharing one cache (chain_regions)
    passes_run: list[str] = field(default_factory=list)  # names of the passes run, in order (passes.manager)
    stopped: bool = False  # a pass found nothing left to guard: the pass list ends after it

    def skip(self, where: str, reason: str) -> None:
        self.skipped.append((where, reason))
        logger.info("adacorr: left unguarded: %s: %s", where, reason)

    def stop(self, where: str | None = None, reason: str | None = None) -> None:
        """End the pass list after the running pass: nothing is left to guard, so the
        graph compiles without guards. ``where`` and ``reason``, when given, are recorded
        as a skip (:meth:`skip`); without them the skips already recorded say why. The
        skips are the fallback's reason (log and ``stats()["fallbacks"]``)."""
        if where is not None:
            self.skip(where, reason or "stopped")
        self.stopped = True


def analysis(gm: fx.GraphModule) -> Analysis:
    if META_KEY not in gm.meta:
        gm.meta[META_KEY] = Analysis()
    return gm.meta[META_KEY]


def example_value(node: fx.Node) -> Any:
    return node.meta.get("example_value", node.meta.get("val"))


_PATH_SUBS = [
    (re.compile(r"\.__dict__\['_modules'\]\['([^']*)'\]"), r".\1"),
    (re.compile(r"\._modules\['([^']*)'\]"), r".\1"),
    (re.compile(r"\['([^']*)'\]"), r".\1"),
    (re.compile(r"\[(\d+)\]"), r".\1"),
]


def normalize_module_path(raw: str) -> str:
    """``L['self'].__dict__['_modules']['blocks'].0.attn`` -> ``blocks.0.attn``."""
    path = raw
    for prefix in ("L['self']", "L['mod']", "L['fn']", "self"):
        if path.startswith(prefix):
            path = path[len(prefix):]
            break
    for pattern, repl in _PATH_SUBS:
        path = pattern.sub(repl, path)
    return path.strip(".")


def module_stack(node: fx.Node) -> list[tuple[str, str]]:
    """The node's ``nn_module_stack`` as (normalized path, class name), outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for value in stack.values():
        raw, cls = value[0], value[1]
        name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
        out.append((normalize_module_path(str(raw)), name.rsplit(".", 1)[-1]))
    return out


def tensor_shape_key(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        # no strides: compiled pieces take contiguous inputs (passes/lower.py)
        return (tuple(str(s) for s in v.shape), str(v.dtype), str(v.device))
    return type(v).__name__


def dump(gm: fx.GraphModule, title: str, enabled: bool) -> None:
    if enabled:
        logger.info("adacorr graph %s:\n%s", title, gm.graph)
