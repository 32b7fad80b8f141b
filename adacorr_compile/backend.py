"""The ``adacorr`` Dynamo backend: ``torch.compile(model, backend="adacorr")``.

Three steps, each one function: parse the options (:func:`parse_options`), run the
pass list :data:`~adacorr_compile.passes.PASSES` with the pass manager
(:func:`~adacorr_compile.passes.manager.run_passes`), and build the
:class:`~adacorr_compile.runtime.graph.GraphRuntime` (:func:`build_runtime`). What the
passes learn, including what the runtime needs to know about the graph's inputs
(``passes/analyze_inputs.py``), is in the graph's
:class:`~adacorr_compile.passes.common.Analysis`. Anything the passes cannot prove safe
falls back to plain compilation of the whole graph, with the reason logged: never a
wrong result.
"""

from __future__ import annotations

import inspect
import logging
import sys
from typing import Any, Callable

import torch
import torch.fx as fx

from .config import AdaCorrConfig, option_error
from .passes import PASSES
from .passes.common import Analysis, example_value
from .passes.manager import run_passes
from .runtime import contexts
from .runtime.graph import GraphRuntime
from .runtime.owners import compiling_wrapper, state_on
from .passes.lone_block import lone_block
from .runtime.state import ModelState

logger = logging.getLogger("adacorr_compile")

# diffusers' cache_context (cond / uncond, step index) is recorded from the moment this
# module is imported (torch.compile(..., backend="adacorr") imports it), or from when
# diffusers' hooks are: before the first call of a model either way
contexts.install_when_loaded()


def model_state_for(wrapper: Any | None, config: AdaCorrConfig) -> ModelState:
    """The state of the compiled model being compiled (a fresh one outside ``torch.compile``)."""
    if wrapper is None:
        return ModelState(config)
    return state_on(wrapper, lambda: ModelState(config))


def _fallback(gm: fx.GraphModule, example_inputs: list[Any], config: AdaCorrConfig, model: ModelState, reason: str) -> Callable[..., Any]:
    """Compile ``gm`` exactly as the ``"inductor"`` backend would: the original graph, the
    example inputs Dynamo gave (real strides, SymInt hints), under Dynamo's own tracing
    context, with ``inductor_mode`` as ``torch.compile(mode=...)`` patches it (for
    ``lowering="eager"``, the graph itself). A restart Dynamo asked for while the passes
    ran (e.g. to specialize a float it could not tensorify) is passed on, not a fallback."""
    from torch._dynamo.exc import RestartAnalysis

    pending = sys.exc_info()[1]  # set when called from the backend's ``except`` clause
    if isinstance(pending, RestartAnalysis):
        raise pending
    if reason not in model.fallbacks:  # once per model and reason (Dynamo may compile many such graphs)
        logger.warning("adacorr: compiling without cache guards: %s", reason)
    model.note(reason)
    return _plain_compile(gm, example_inputs, config)


def _plain_compile(gm: fx.GraphModule, example_inputs: list[Any], config: AdaCorrConfig) -> Callable[..., Any]:
    """``gm`` compiled as the ``"inductor"`` backend would (the graph itself for ``lowering="eager"``),
    with the meta of the module it was copied from (``_copy_graph``)."""
    source_meta = getattr(gm.graph, "_adacorr_source_meta", None)  # see _copy_graph
    if source_meta:
        for key, value in source_meta.items():
            gm.meta.setdefault(key, value)
    if config.lowering == "eager":
        return gm
    from torch._inductor.compile_fx import compile_fx

    from .compilers import inductor_patches

    return compile_fx(gm, example_inputs, config_patches=inductor_patches(config))


def _current_tx() -> Any | None:
    """Dynamo's instruction translator of the frame being compiled, or None."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        return InstructionTranslator.current_tx()
    except Exception:  # noqa: BLE001 - not inside Dynamo (a direct backend call) or another torch
        return None


def _frame_arguments() -> tuple[tuple[str, ...], bool, str] | None:
    """(argument names, takes ``**kwargs``, function name) of the frame Dynamo is compiling."""
    tx = _current_tx()
    if tx is None:
        return None
    code = tx.f_code
    count = code.co_argcount + code.co_kwonlyargcount
    return code.co_varnames[:count], bool(code.co_flags & inspect.CO_VARKEYWORDS), code.co_name


def _compiled_module() -> torch.nn.Module | None:
    """The module of the ``torch.compile``d model being called (the innermost
    ``OptimizedModule`` on the stack), else the module whose frame Dynamo compiles
    (``self``, or a diffusers hook's ``module``), else None."""
    frame = sys._getframe(1)
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, torch._dynamo.eval_frame.OptimizedModule):
                return owner._orig_mod
            frame = frame.f_back
    finally:
        del frame
    tx = _current_tx()
    for name in ("module", "self"):
        value = getattr(tx, "f_locals", {}).get(name) if tx is not None else None
        if isinstance(value, torch.nn.Module):
            return value
    return None


def _diffusers_cache_conflict() -> str | None:
    """Why not to guard this graph: diffusers' own cache hooks run on the module, or None."""
    module = _compiled_module()
    hooks = contexts.diffusers_cache_hooks(module) if module is not None else []
    if not hooks:
        return None
    return (
        f"diffusers cache hooks are enabled on this {type(module).__name__} ({', '.join(hooks[:3])}"
        f"{', ...' if len(hooks) > 3 else ''}: enable_cache): they decide which blocks run, so adacorr adds no "
        "cache guards; call model.disable_cache() to use adacorr's"
    )


def check_timestep_arg(config: AdaCorrConfig) -> None:
    """A ``timestep_arg`` the user set must name an argument of the compiled ``forward``."""
    if config.timestep_arg == AdaCorrConfig.timestep_arg:
        return
    frame = _frame_arguments()
    if frame is None:
        return
    names, varkw, func = frame
    if func.startswith("torch_dynamo_resume") or varkw or config.timestep_arg in names:
        return
    raise ValueError(
        f"adacorr option 'timestep_arg' got {config.timestep_arg!r}, which names no argument of "
        f"{func}({', '.join(n for n in names if n != 'self')}); expected the argument that carries the timestep"
    )


def parse_options(options: Any, mode: str | None) -> AdaCorrConfig:
    """The validated config of ``options`` (a ``ValueError`` naming a bad option), with
    ``torch.compile(mode=...)`` as ``inductor_mode``."""
    config = AdaCorrConfig.from_options(options)
    check_timestep_arg(config)
    if mode is not None and mode != "default":
        config = config.replace(inductor_mode=mode)
    return config


def _attach_model_state(config: AdaCorrConfig) -> ModelState:
    """The compiled model's state; diffusers' cache_context is read from now on. The model's
    config lives in that state (``ModelState.home``): a recompile does not overwrite it; the
    regions this compile builds join it there (``GraphRuntime`` -> ``ModelState.adopt``)."""
    model = model_state_for(compiling_wrapper(), config)
    contexts.install()  # read diffusers' cache_context (cond / uncond, step index) from now on
    return model


def _not_guarded_because(example_inputs: list[Any]) -> str | None:
    """Why this graph gets no cache guards whatever its blocks, or None."""
    conflict = _diffusers_cache_conflict()
    if conflict is not None:
        return conflict
    if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs):
        return "gradients are enabled; caching is for inference (call under torch.no_grad() or torch.inference_mode())"
    return None


def build_runtime(model: ModelState, lowered: fx.GraphModule, info: Analysis, config: AdaCorrConfig) -> GraphRuntime:
    """The runtime of the lowered graph, from what the passes recorded; logs what is guarded."""
    runtime = GraphRuntime(
        model,
        lowered,
        info.regions,
        info.input_indices,
        info.timestep_index,
        info.bodies_compiled,
        info.owner_index,
        info.context_index,
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


def adacorr_backend(gm: fx.GraphModule, example_inputs: list[Any], options: Any = None, mode: str | None = None) -> Callable[..., Any]:
    """Dynamo backend entry point (registered as ``"adacorr"``): parse the options, run the
    pass list, build the runtime; or the logged fallback (see module docstring)."""
    try:
        config = parse_options(options, mode)
    except ValueError as exc:  # the user reads this ValueError, not Dynamo's BackendCompilerFailed
        raise option_error(exc, inspect.currentframe()) from None
    model = _attach_model_state(config)
    try:
        model.resolve_group(_compiled_module())
    except ValueError as exc:  # a decision_group that cannot be used: the user's option
        raise option_error(exc, inspect.currentframe()) from None
    reason = _not_guarded_because(example_inputs)
    if reason is not None:
        return _fallback(gm, example_inputs, config, model, reason)
    original = fx.GraphModule(gm, _copy_graph(gm.graph))  # pristine copy for a fallback
    try:
        lowered, info = run_passes(gm, example_inputs, config, PASSES)
    except Exception as exc:  # noqa: BLE001 - any pass failure means "not proven safe"
        logger.debug("adacorr pass failure", exc_info=True)
        return _fallback(original, example_inputs, config, model, f"a pass failed: {type(exc).__name__}: {exc}")
    if info.stopped or not info.regions:
        reasons = "; ".join(f"{w}: {r}" for w, r in info.skipped) or "no blocks found"
        lone = lone_block(original, example_inputs, config, model, _current_tx(), _plain_compile)
        if callable(lone):  # a whole block's region, or a plain part of a block guarded at its call
            return lone
        return _fallback(original, example_inputs, config, model, lone if lone is not None else reasons)
    return build_runtime(model, lowered, info, config)


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    """A pristine copy of ``graph`` for a fallback, untouched by what the passes then do
    to ``graph``: new nodes in the same order with the same names, each with its own
    ``meta`` dict (and its own copies of the dicts and lists in it, e.g.
    ``nn_module_stack``), sharing only Dynamo's immutable values (fake tensors, SymInts,
    sources); the output node's meta; the graph's codegen. The owning module's meta
    (compile id, parameter names) rides along for ``_fallback`` to put on the new module."""
    import copy

    new = fx.Graph(tracer_cls=graph._tracer_cls, tracer_extras=graph._tracer_extras)
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        env[node] = new.node_copy(node, lambda n: env[n])
        env[node].meta = {k: (copy.copy(v) if isinstance(v, (dict, list, set)) else v) for k, v in node.meta.items()}
    new._codegen = copy.deepcopy(graph._codegen)
    owner = graph.owning_module
    new._adacorr_source_meta = dict(owner.meta) if owner is not None else {}  # type: ignore[attr-defined]
    return new


__all__ = ["adacorr_backend", "example_value"]
