"""The small public API on compiled models: stats, reset, generation, regions."""

from __future__ import annotations

import contextlib
import operator
from typing import Any, Hashable, Iterator, Mapping, Sequence

import torch

from .config import AdaCorrConfig
from .runtime import contexts
from .runtime import requests as _requests
from .runtime.graph import GraphRuntime
from .runtime.regional import owner_from_blocks, owner_state
from .runtime.owners import STATE_ATTR, compile_wrapper_of, state_on
from .runtime.state import GenerationState, ModelState, summarize


def _model_state(compiled: Any) -> ModelState:
    """The ModelState behind ``torch.compile(model, backend="adacorr")``'s result."""
    if isinstance(compiled, ModelState):
        return compiled
    if isinstance(compiled, GraphRuntime):
        return compiled.model
    regional = owner_state(compiled) or owner_state(getattr(compiled, "_orig_mod", None))  # blocks compiled alone in it
    if regional is not None:
        return regional
    ctx = getattr(compiled, "dynamo_ctx", None) or getattr(getattr(compiled, "forward", None), "dynamo_ctx", None)
    wrapper = compile_wrapper_of(getattr(ctx, "callback", None))
    for cell in getattr(compiled, "__closure__", None) or ():  # a compiled function: its Dynamo callback
        if wrapper is None:
            wrapper = compile_wrapper_of(cell.cell_contents)
    if wrapper is None and isinstance(compiled, torch.nn.Module):  # blocks compiled alone, none of them here
        regional = owner_from_blocks(compiled, _config_or_none)
        if regional is not None:
            return regional
    if wrapper is None:
        raise TypeError(
            f"{type(compiled).__name__} is not a model compiled with torch.compile(..., backend='adacorr')"
        )
    if getattr(wrapper, "compiler_name", None) != "adacorr" and STATE_ATTR not in wrapper.__dict__:
        raise TypeError(f"model was compiled with backend={wrapper.compiler_name!r}, not 'adacorr'")
    # not called yet: create it so generation()/reset() work up front
    return state_on(wrapper, lambda: ModelState(AdaCorrConfig.from_options(wrapper.kwargs.get("options"))))


def _config_or_none(compiled: Any) -> AdaCorrConfig | None:
    """The config of a callable compiled with ``backend="adacorr"``, or None."""
    try:
        return _model_state(compiled).config
    except TypeError:
        return None


def stats(compiled: Any) -> dict[str, Any]:
    """Per-region statistics of the current generation context.

    Returns ``{"regions": [...], "totals": {...}, "steps": n, "cache_bytes": b,
    "generations": k, "fallbacks": [...], "decision_group": {...} | None}`` (``cache_bytes``: bytes the caches hold now,
    each storage once); each region has ``path, calls, reuses, computes, partial,
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
        "cache_bytes": state.cache_bytes(),
        "generations": state.generations,
        "fallbacks": list(model.fallbacks),
        # the ranks that decide together: size, where it came from, all-reduces so far and their
        # host time; None where each rank (or the one process) decides alone
        "decision_group": None if model.group is None else model.group.summary(),
        **_requests_report(model),
    }


def _requests_report(model: ModelState) -> dict[str, Any]:
    slots = _requests.slots_of(model, create=False)
    return {} if slots is None else {"requests": slots.summary()}


def regions(compiled: Any) -> list[Any]:
    """The GuardedRegion modules of a compiled model, in execution order (after its first call)."""
    return _model_state(compiled).regions()


def check_num_steps(num_steps: Any) -> int | None:
    """``num_steps`` as :func:`generation`, :func:`reset` and the ONNX runner take it:
    None (unknown) or an int >= 1; anything else is a ValueError naming it."""
    if num_steps is None:
        return None
    if not isinstance(num_steps, bool):
        try:
            steps = operator.index(num_steps)
        except TypeError:
            steps = 0
        if steps >= 1:
            return steps
    raise ValueError(f"num_steps got {num_steps!r}: expected None (unknown) or an int >= 1 (the generation's number of steps)")


def reset(compiled: Any, num_steps: int | None = None) -> None:
    """Start a new generation and clear statistics; ``num_steps`` (optional) lets the
    ``final_steps`` guard know where the generation ends."""
    num_steps = check_num_steps(num_steps)
    _model_state(compiled).current().reset(num_steps)


def generation(compiled: Any, num_steps: int | None = None) -> contextlib.AbstractContextManager[GenerationState]:
    """A private generation for the block: its own cache, counters and statistics,
    invisible to other threads and to code outside the block. Exception-safe.
    ``num_steps`` (None or an int >= 1) is checked here, at the call."""
    return _generation(compiled, check_num_steps(num_steps))


@contextlib.contextmanager
def _generation(compiled: Any, num_steps: int | None) -> Iterator[GenerationState]:
    model = _model_state(compiled)
    state = GenerationState(num_steps=num_steps, private=True)
    token = model.active.set(state)
    try:
        yield state
    finally:
        model.active.reset(token)


def cache_context(
    model: Any,
    name: str,
    *,
    step_index: int | None = None,
    num_inference_steps: int | None = None,
    timestep: float | None = None,
) -> contextlib.AbstractContextManager[None]:
    """What diffusers' ``model.cache_context(name, step_index=..., ...)`` tells the backend,
    for models that lack it (plain ``nn.Module``s, diffusers models without ``CacheMixin``)
    and hand-written sampling loops: calls of ``model`` in the block belong to the context
    ``name`` (each name keeps its own caches and counters, e.g. ``"cond"`` and
    ``"uncond"`` when CFG is two calls per step); ``step_index`` and
    ``num_inference_steps`` (optional) replace the step counting and the step count
    guessed from the timestep. ``model`` is the compiled model or the module inside it."""
    module = getattr(model, "_orig_mod", model)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"cache_context: model must be an nn.Module or a compiled one, got {type(model).__name__}")
    if not isinstance(name, str):
        raise TypeError(f"cache_context: name must be a str such as 'cond' or 'uncond', got {name!r}")
    if step_index is not None and (isinstance(step_index, bool) or operator.index(step_index) < 0):
        raise ValueError(f"cache_context: step_index got {step_index!r}: expected None or an int >= 0")
    try:
        total = check_num_steps(num_inference_steps)
    except ValueError:
        raise ValueError(
            f"cache_context: num_inference_steps got {num_inference_steps!r}: expected None or an int >= 1"
        ) from None
    info = contexts.CallContext(name, step_index, total, None if timestep is None else float(timestep))
    return contexts.scoped(module, info)


# ------------------------------------------------------------------ many requests in one call
def requests(
    compiled: Any, ids: Sequence[Hashable], num_steps: int | Sequence[int | None] | Mapping[Hashable, int | None] | None = None,
) -> contextlib.AbstractContextManager[_requests.RequestBatch]:
    """Rows of the next call(s) in the block belong to requests: ``ids`` gives each row's
    request id (rows with one id are one request: a CFG pair is ``ids=[a, b, a, b]`` for
    ``[cond; uncond]``). Each request keeps its own clock, caches and statistics in a slot
    of the compiled model, decides on its own rows, and only the rows of requests that must
    compute run the block; its output equals its run alone (:func:`generation` with the
    same ``num_steps``) up to float round-off, whatever shares its batches.

    ``num_steps``: one int for all, one per row (equal within a request) or a mapping id ->
    int; None: unknown (the request then ends only on :func:`release`). A request joins at its
    first call, leaves its slot when its ``num_steps`` are done (the id may then start a new
    request) or on :func:`release`; a live id given again with another ``num_steps`` or row
    count, or by a call running at the same time, is an error naming it. A call that raises
    ends all its requests. Not for ONNX runners nor regional compilation (an error says so)."""
    model = _requests_model(compiled)
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise ValueError(f"requests(): ids must be a list with one request id per row of the batch, got {ids!r}")
    rows = list(ids)
    steps = _steps_by_id(rows, num_steps)
    return _requests_call(model, rows, steps)


def release(compiled: Any, *ids: Hashable) -> list[Hashable]:
    """Cancel live requests of a compiled model (:func:`requests`): their slots, caches and
    clocks are freed and each id starts a new request next time. Returns the ids that were
    live (an unknown or finished id is ignored)."""
    slots = _requests.slots_of(_model_state(compiled))
    return [rid for rid in ids if slots.release(rid)]  # type: ignore[union-attr]


def request_stats(compiled: Any, request_id: Hashable) -> dict[str, Any] | None:
    """One live request's per-region statistics (``stats()``'s ``regions`` and ``totals``,
    and its ``steps``), or None where the id is not live."""
    return _requests.request_stats(_model_state(compiled), request_id)


def _requests_model(compiled: Any) -> ModelState:
    if type(compiled).__module__.startswith("adacorr_compile.export"):
        raise NotImplementedError("requests(): per-request state is not exported to ONNX yet: an exported step graph "
                                  "holds one generation's cache; run many requests through the compiled model")
    if owner_state(compiled) is not None or owner_state(getattr(compiled, "_orig_mod", None)) is not None:
        raise NotImplementedError("requests(): not supported under regional compilation (compile_repeated_blocks, "
                                  "blocks compiled alone) yet; compile the whole transformer with backend='adacorr'")
    return _model_state(compiled)


def _steps_by_id(ids: list[Hashable], num_steps: Any) -> dict[Hashable, int | None]:
    """``num_steps`` per request id, checked (one value per request)."""
    if not ids:
        raise ValueError("requests(): ids is empty: give one request id per row of the batch")
    for rid in ids:
        if rid is None or not isinstance(rid, Hashable):
            raise ValueError(f"requests(): request id {rid!r} is not a usable id (a str or int per row)")
    if num_steps is None or isinstance(num_steps, int):
        value = check_num_steps(num_steps)
        return {rid: value for rid in ids}
    if isinstance(num_steps, Mapping):
        return {rid: check_num_steps(num_steps.get(rid)) for rid in ids}
    values = list(num_steps)
    if len(values) != len(ids):
        raise ValueError(f"requests(): num_steps has {len(values)} entries for {len(ids)} rows: give one per row, "
                         "one int, or a mapping id -> steps")
    steps: dict[Hashable, int | None] = {}
    for rid, value in zip(ids, values):
        value = check_num_steps(value)
        if rid in steps and steps[rid] != value:
            raise ValueError(f"requests(): request id {rid!r} got num_steps {steps[rid]} and {value} on two of its rows")
        steps[rid] = value
    return steps


@contextlib.contextmanager
def _requests_call(model: ModelState, ids: list[Hashable], steps: dict[Hashable, int | None]) -> Iterator[_requests.RequestBatch]:
    slots = _requests.slots_of(model)
    rows: dict[Hashable, int] = {}
    for rid in ids:
        rows[rid] = rows.get(rid, 0) + 1
    order = list(rows)
    taken = slots.take(order, steps, rows, model.config.max_requests)  # type: ignore[union-attr]
    groups, inverse = _requests.row_groups(ids, dict(zip(order, taken)))
    batch = _requests.RequestBatch(model, slots, groups, len(ids), inverse)  # type: ignore[arg-type]
    token = _requests.BATCH.set((*_requests.BATCH.get(), batch))
    failed = True
    try:
        yield batch
        failed = False
    finally:
        _requests.BATCH.reset(token)
        batch.left = slots.give_back(taken, failed)  # type: ignore[union-attr]
