"""diffusers cache contexts: what a pipeline tells the model about each call.

diffusers pipelines wrap each transformer call in
``with transformer.cache_context(name, step_index=..., num_inference_steps=...,
timestep=..., sigma=...)`` (``CacheMixin.cache_context``, diffusers >= 0.35; the step
fields since 0.40). ``name`` tells the calls of one step apart: ``"cond"`` and
``"uncond"`` when classifier-free guidance runs as two calls per step (Wan, Flux
with ``true_cfg_scale``, QwenImage, CogView4, HunyuanVideo, ...). diffusers hands
the context to its own stateful hooks only; this module also records it, per thread
or task (a ``contextvars.ContextVar``) and per module, by wrapping the function
``cache_context`` calls to set it (:func:`install`, done once by the backend when
diffusers is loaded). The graph runtime asks :func:`context_for` at each call:
each context name then keeps its own caches and step counters, and the step index,
step count and timestep come from the pipeline instead of being guessed.

Nothing here runs inside traced code: the lookup happens on the host, in the graph
runtime, so a context never causes a recompilation.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.abc
import importlib.util
import itertools
import logging
import sys
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Iterator

import torch

logger = logging.getLogger("adacorr_compile")

@dataclass(frozen=True)
class CallContext:
    """One ``cache_context`` of one module, as the pipeline set it."""

    name: str
    step_index: int | None = None
    num_steps: int | None = None
    timestep: float | None = None
    sigma: float | None = None


class _Entry:
    """A module with a context set (held weakly)."""

    __slots__ = ("module", "context")

    def __init__(self, module: torch.nn.Module, context: CallContext) -> None:
        self.module = weakref.ref(module)
        self.context = context


_ACTIVE: contextvars.ContextVar[tuple[_Entry, ...]] = contextvars.ContextVar("adacorr_cache_contexts", default=())
_PARAMS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[Any, frozenset[int]]]" = weakref.WeakKeyDictionary()
_INSTALL_LOCK = threading.Lock()
_WRAPPED = "_adacorr_wrapped"


def _param_ids(module: torch.nn.Module) -> tuple[Any, frozenset[int]]:
    """(first parameter, ids of all parameters) of ``module``, cached while its first
    parameter stays the same object (``load_state_dict(assign=True)`` replaces them)."""
    first = next(iter(module.parameters()), None)
    cached = _PARAMS.get(module)
    if cached is not None and cached[0] is first:
        return cached
    # a graph's first tensor attribute may be a buffer (Wan's rotary table)
    ids = frozenset(id(p) for p in itertools.chain(module.parameters(), module.buffers()))
    _PARAMS[module] = (first, ids)
    return first, ids


def _number(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().reshape(-1)[0]) if value.numel() else None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _int(value: Any) -> int | None:
    number = _number(value)
    return None if number is None else int(number)


def from_diffusers(context: Any) -> CallContext:
    """Our record of a diffusers ``CacheContext`` (or, before 0.40, a bare name)."""
    if isinstance(context, str):
        return CallContext(context)
    return CallContext(
        name=str(getattr(context, "name", "")),
        step_index=_int(getattr(context, "step_index", None)),
        num_steps=_int(getattr(context, "num_inference_steps", None)),
        timestep=_number(getattr(context, "timestep", None)),
        sigma=_number(getattr(context, "sigma", None)),
    )


def set_context(module: torch.nn.Module, context: CallContext | None) -> contextvars.Token:
    """Record (or, with None, clear) ``module``'s context for the calling thread or task;
    returns the token that restores the previous contexts (``_ACTIVE.reset``)."""
    entries = tuple(e for e in _ACTIVE.get() if e.module() is not module and e.module() is not None)
    if context is not None:
        entries += (_Entry(module, context),)
    return _ACTIVE.set(entries)


@contextlib.contextmanager
def scoped(module: torch.nn.Module, context: CallContext) -> Iterator[None]:
    """``module``'s context for the block; the previous contexts afterwards."""
    token = set_context(module, context)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def context_for(param: Any) -> tuple[CallContext, torch.nn.Module] | None:
    """The context, and its module, of the module that owns ``param`` (a graph's first
    parameter input), or None. Without a parameter (a graph that has none), the one
    context set in this thread, if there is exactly one."""
    entries = _ACTIVE.get()
    if not entries:
        return None
    found = []
    for e in entries:
        module = e.module()
        if module is None:
            continue
        if param is None:
            found.append((e.context, module))
            continue
        if id(param) in _param_ids(module)[1]:
            found.append((e.context, module))
    if param is None and len(found) != 1:
        return None
    # nested contexts on a module and its submodule: the innermost (set last) wins
    return found[-1] if found else None


def diffusers_cache_hooks(module: torch.nn.Module) -> list[str]:
    """What of diffusers' own caching runs on ``module``: the config of
    ``enable_cache(...)`` (``FirstBlockCacheConfig``, ...) and the stateful hooks on it
    or its submodules (caches applied with ``apply_*`` directly); [] if none."""
    names: list[str] = []
    if getattr(module, "is_cache_enabled", False):
        names.append(type(getattr(module, "_cache_config", None)).__name__)
    for sub in module.modules():
        hooks = getattr(getattr(sub, "_diffusers_hook", None), "hooks", None)
        if isinstance(hooks, dict):
            names += [n for n, h in hooks.items() if getattr(h, "_is_stateful", False) and n not in names]
    return names


def install() -> bool:
    """Record diffusers' cache contexts from now on: wrap the function
    ``CacheMixin.cache_context`` calls (looked up at each call, so the wrapper is
    used everywhere). Does nothing unless diffusers is already imported (a model that
    is not a diffusers model has no contexts), or when this diffusers has no such
    function. Returns whether contexts are recorded. Idempotent, thread-safe."""
    if "diffusers" not in sys.modules:
        return False
    try:
        from diffusers.hooks import hooks as dh
    except Exception:  # noqa: BLE001 - any import problem: no contexts, detection as before
        return False
    original = getattr(dh, "_set_cache_context", None)
    if original is None:
        logger.info("adacorr: this diffusers has no cache contexts to read (diffusers.hooks.hooks._set_cache_context)")
        return False
    if getattr(original, _WRAPPED, False):
        return True
    with _INSTALL_LOCK:
        original = dh._set_cache_context
        if getattr(original, _WRAPPED, False):
            return True

        @functools.wraps(original)
        def recording(module: torch.nn.Module, context: Any, *args: Any, **kwargs: Any) -> Any:
            set_context(module, None if context is None else from_diffusers(context))
            return original(module, context, *args, **kwargs)

        setattr(recording, _WRAPPED, True)
        dh._set_cache_context = recording
    return True


_HOOKS_MODULE = "diffusers.hooks.hooks"


class _InstallOnImport(importlib.abc.MetaPathFinder):
    """Calls :func:`install` right after diffusers' hooks module is first imported, so
    that contexts are recorded from a pipeline's first call whatever the import order."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != _HOOKS_MODULE:
            return None
        _remove_finder()
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_install(module: Any) -> None:
            exec_module(module)
            try:
                install()
            except Exception:  # noqa: BLE001 - never break the user's import of diffusers
                logger.debug("adacorr: could not record diffusers cache contexts", exc_info=True)

        spec.loader.exec_module = exec_then_install
        return spec


def _remove_finder() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _InstallOnImport)]


def install_when_loaded() -> None:
    """:func:`install` now if diffusers' hooks are loaded, else as soon as they are (no
    import of diffusers here: it costs seconds and a model may not need it)."""
    if _HOOKS_MODULE in sys.modules:
        install()
    elif importlib.util.find_spec("diffusers") is not None and not any(
        isinstance(f, _InstallOnImport) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _InstallOnImport())
