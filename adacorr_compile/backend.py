"""The ``adacorr`` Dynamo backend: ``torch.compile(model, backend="adacorr")``.

Runs the passes of :mod:`adacorr_compile.passes` in order and returns a
:class:`~adacorr_compile.runtime.graph.GraphRuntime`. Anything the passes cannot
prove safe falls back to plain compilation of the whole graph, with the reason
logged: never a wrong result.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable

import torch
import torch.fx as fx

from .config import AdaCorrConfig
from .passes import PASSES
from .passes.common import Analysis, analysis, dump, example_value
from .passes.find_blocks import _is_param
from .passes.lower import compile_graph
from .runtime.graph import GraphRuntime
from .runtime.state import ModelState

logger = logging.getLogger("adacorr_compile")

_STATE_ATTR = "_adacorr_model_state"


def _compile_wrapper_from_stack() -> Any | None:
    """The ``torch._TorchCompileWrapper`` of the ``torch.compile`` call compiling now.

    It is created once per ``torch.compile(...)`` call and reachable from the
    returned module, so state attached to it is per compiled model."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if type(candidate).__name__ == "_TorchCompileWrapper":
                return candidate
            frame = frame.f_back
        return None
    finally:
        del frame


def model_state_for(wrapper: Any | None, config: AdaCorrConfig) -> ModelState:
    if wrapper is None:
        return ModelState(config)
    state = wrapper.__dict__.get(_STATE_ATTR)
    if state is None:
        state = ModelState(config)
        wrapper.__dict__[_STATE_ATTR] = state
    return state


def _fallback(gm: fx.GraphModule, example_inputs: list[Any], config: AdaCorrConfig, model: ModelState, reason: str) -> Callable[..., Any]:
    logger.warning("adacorr: compiling without cache guards: %s", reason)
    model.fallbacks.append(reason)
    return compile_graph(gm, example_inputs, config.replace(lowering="inductor" if config.lowering == "tensorrt" else config.lowering), "whole graph")


def _timestep_index(gm: fx.GraphModule, name: str) -> int | None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, n in enumerate(placeholders):
        grapharg = n.meta.get("grapharg")
        source = getattr(getattr(grapharg, "source", None), "name", "")
        source = source() if callable(source) else source
        # a forward argument, possibly behind a decorator's **kwargs (SD3)
        if source in (f"L[{name!r}]", f"L['kwargs'][{name!r}]") or n.name in (f"l_{name}_", f"l_kwargs_{name}_"):
            return i
    return None


def run_passes(gm: fx.GraphModule, example_inputs: list[Any], config: AdaCorrConfig) -> fx.GraphModule:
    """Run the pass list; returns the lowered graph with ``meta["adacorr"]`` filled."""
    info = analysis(gm)
    info.example_inputs = list(example_inputs)
    for pass_fn in PASSES:
        dump(gm, f"before {pass_fn.__name__}", config.dump_graphs)
        gm = pass_fn(gm, config)
        dump(gm, f"after {pass_fn.__name__}", config.dump_graphs)
        if pass_fn.__name__ == "find_blocks" and not info.blocks:
            break
    return gm


def adacorr_backend(gm: fx.GraphModule, example_inputs: list[Any], options: Any = None, mode: str | None = None) -> Callable[..., Any]:
    """Dynamo backend entry point (registered as ``"adacorr"``)."""
    config = AdaCorrConfig.from_options(options)
    if mode is not None and mode != "default":
        config = config.replace(inductor_mode=mode)
    model = model_state_for(_compile_wrapper_from_stack(), config)
    model.config = config
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs):
        return _fallback(gm, example_inputs, config, model, "gradients are enabled; caching is for inference (call under torch.no_grad() or torch.inference_mode())")
    original = fx.GraphModule(gm, _copy_graph(gm.graph))  # pristine copy for a fallback
    try:
        lowered = run_passes(gm, example_inputs, config)
    except Exception as exc:  # noqa: BLE001 - any pass failure means "not proven safe"
        logger.debug("adacorr pass failure", exc_info=True)
        return _fallback(original, example_inputs, config, model, f"a pass failed: {type(exc).__name__}: {exc}")
    info: Analysis = analysis(lowered) if "adacorr" in lowered.meta else analysis(gm)
    if not info.regions:
        reasons = "; ".join(f"{w}: {r}" for w, r in info.skipped) or "no blocks found"
        return _fallback(original, example_inputs, config, model, reasons)
    input_indices = [
        i
        for i, (n, x) in enumerate(zip(placeholders, example_inputs))
        if isinstance(x, torch.Tensor) and not _is_param(n, x)
    ]
    runtime = GraphRuntime(
        model,
        lowered,
        info.regions,
        input_indices,
        _timestep_index(gm, config.timestep_arg),
        info.bodies_compiled,
    )
    logger.info(
        "adacorr: %d guarded regions (%s), %d distinct block bodies compiled (lowering=%s), %d left unguarded",
        len(info.regions),
        ", ".join(r.spec.path for r in info.regions[:4]) + (", ..." if len(info.regions) > 4 else ""),
        info.bodies_compiled,
        config.lowering,
        len(info.skipped),
    )
    runtime.analysis = info
    return runtime


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    new = fx.Graph()
    out = new.graph_copy(graph, {})
    new.output(out)
    return new


__all__ = ["adacorr_backend", "example_value"]
