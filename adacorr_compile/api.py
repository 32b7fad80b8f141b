"""The small public API on compiled models: stats, reset, generation, regions."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from .config import AdaCorrConfig
from .runtime.graph import GraphRuntime
from .runtime.state import GenerationState, ModelState, summarize


def _model_state(compiled: Any) -> ModelState:
    """The ModelState behind ``torch.compile(model, backend="adacorr")``'s result."""
    from .backend import _STATE_ATTR

    if isinstance(compiled, ModelState):
        return compiled
    if isinstance(compiled, GraphRuntime):
        return compiled.model
    ctx = getattr(compiled, "dynamo_ctx", None) or getattr(getattr(compiled, "forward", None), "dynamo_ctx", None)
    node = getattr(ctx, "callback", None)
    for _ in range(16):
        if node is None:
            break
        if type(node).__name__ == "_TorchCompileWrapper":
            if getattr(node, "compiler_name", None) != "adacorr" and _STATE_ATTR not in node.__dict__:
                raise TypeError(
                    f"model was compiled with backend={node.compiler_name!r}, not 'adacorr'"
                )
            state = node.__dict__.get(_STATE_ATTR)
            if state is None:  # not called yet: create it so generation()/reset() work up front
                state = ModelState(AdaCorrConfig.from_options(node.kwargs.get("options")))
                node.__dict__[_STATE_ATTR] = state
            return state
        node = getattr(node, "_torchdynamo_orig_backend", None)
    raise TypeError(
        f"{type(compiled).__name__} is not a model compiled with torch.compile(..., backend='adacorr')"
    )


def stats(compiled: Any) -> dict[str, Any]:
    """Per-region statistics of the current generation context.

    Returns ``{"regions": [...], "totals": {...}, "steps": n, "generations": k,
    "fallbacks": [...]}``; each region has ``path, calls, reuses, computes, partial,
    nonfinite, last_lambda, mean_lambda, last_score, mean_score`` and per-step traces
    (``lambda_trace``, ``score_trace``, ``reuse_trace``) of the current generation.
    Counters run since the last :func:`reset`; traces since the generation began.
    """
    model = _model_state(compiled)
    state = model.current()
    report = summarize(state, [r.spec.path for r in model.regions()])
    report["totals"]["bodies_compiled"] = sum(g.bodies_compiled for g in model.graphs)
    return {
        **report,
        "steps": max(state.steps.values(), default=0),
        "generations": state.generations,
        "fallbacks": list(model.fallbacks),
    }


def regions(compiled: Any) -> list[Any]:
    """The GuardedRegion modules of a compiled model, in execution order (after its first call)."""
    return _model_state(compiled).regions()


def reset(compiled: Any, num_steps: int | None = None) -> None:
    """Start a new generation and clear statistics; ``num_steps`` (optional) lets the
    ``final_steps`` guard know where the generation ends."""
    _model_state(compiled).current().reset(num_steps)


@contextlib.contextmanager
def generation(compiled: Any, num_steps: int | None = None) -> Iterator[GenerationState]:
    """A private generation for the block: its own cache, counters and statistics,
    invisible to other threads and to code outside the block. Exception-safe."""
    model = _model_state(compiled)
    state = GenerationState(num_steps=num_steps)
    token = model.active.set(state)
    try:
        yield state
    finally:
        model.active.reset(token)
