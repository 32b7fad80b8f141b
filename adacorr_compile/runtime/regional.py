"""Regional compilation: a compiled graph that is one whole block of a model.

``transformer.compile_repeated_blocks(backend="adacorr")`` (diffusers), or ``torch.compile``
applied to each block by hand, compiles every block on its own: each graph holds one block
and no sibling, so the in-graph passes find no family. Such a graph is still a guarded
region when it is the whole forward of a module that is the ``i``-th child of a container
(``ModuleList``/``Sequential``) of an owner module (the transformer) whose forward is on
the stack while the block compiles (:func:`find_site`).

All block graphs of one owner instance share one step, kept by the owner's
:class:`RegionalOwner` (one :class:`~.state.ModelState` per owner instance, found by
``adacorr_compile.stats(transformer)``):

- a forward pre-hook on the owner (registered once) starts the step exactly as
  :class:`~.graph.GraphRuntime` does for a whole-model graph: the timestep argument (or
  diffusers' ``cache_context``), the shapes and dtypes of the tensor arguments, then
  :meth:`GenerationState.begin_step`; a forward hook ends it (the step counter);
- within one owner call the block calls take positions in call order: the first is the
  step's leader, the second its probe, later ones its followers (``scope="step"``), so one
  host read per step as in a whole-model graph. The order of the first call is learned;
  a block called twice in one owner call, or not at the position it had before, makes the
  rest of that call compute plainly (its caches dropped), logged once: never a wrong result;
- each block keeps its own cache (a span of one): nothing proves that no other code runs
  between two block graphs, so no cache is shared across graphs (memory: one residual per
  block, as ``chain_regions`` would keep without spans). Under ``scope="step"`` the
  forecast's slope gate of the blocks after the leader waits until the step's next reuse and
  is judged on their summed values (:func:`adacorr_compile.step.settle_joint_gates`), as the
  whole-model graph's span cache over the same blocks is: the same decisions and outputs.

A block graph called outside its owner's forward runs plainly.

The same mechanism guards a block whose frame Dynamo compiles alone inside a whole-model
``torch.compile(owner)`` (graph breaks between blocks): the hooks then go on the
``OptimizedModule`` and the region joins the model's state, next to the in-graph regions of
the graphs that hold two or more blocks (each such graph keeps its own leader and probe, as
before). A block graph that is only a part of its block (a graph break inside the block, or
in a module the block calls) is never a region: the block's whole call is, guarded at its call
(:mod:`.call_guard`).

A block is found as the numbered child of a container of its owner (:func:`find_site`), or,
for a frame that runs inside a block (a wrapper's inner block, an MoE inside it), as the module
on the stack that is such a child of an owner that takes a timestep
(:func:`find_enclosing_site`). Each output pairs with the input of its shape and dtype; where
several are alike, with the one argument named as a main stream (:func:`shape_pairs`).
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import sys
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from . import contexts
from .fused import RegionMath
from .region import ACTIVE, Active, GuardedRegion, RegionSpec
from torch.utils.weak import WeakIdKeyDictionary

from .state import GenerationState, ModelState

logger = logging.getLogger("adacorr_compile")

_CONTAINERS = (torch.nn.ModuleList, torch.nn.Sequential)
TIMESTEP_NAMES = ("timestep", "timesteps", "t", "time", "sigma", "sigmas", "noise_level")  # as analyze_inputs


@dataclass(frozen=True)
class BlockSite:
    """Where a block module sits: its owner, its path in the owner, its container's length."""

    owner: torch.nn.Module
    path: str
    count: int
    hooked: torch.nn.Module | None = None  # what the step hooks go on: the owner, or its compiled wrapper

    @property
    def target(self) -> torch.nn.Module:
        return self.owner if self.hooked is None else self.hooked


def _site_in(owner: torch.nn.Module, block: torch.nn.Module) -> BlockSite | None:
    """``block``'s site as a numbered child of a container of ``owner`` (a ``torch.compile``d
    child counts as its module), or None."""
    return _numbered_children(owner).get(id(block))


def _numbered_children(owner: torch.nn.Module) -> dict[int, BlockSite]:
    """id(module) -> its site, for the numbered children of ``owner``'s containers (a
    ``torch.compile``d child under its module's id too), the first where several hold it."""
    found: dict[int, BlockSite] = {}
    for name, container in owner.named_modules():
        if isinstance(container, _CONTAINERS):
            for i, child in enumerate(container):
                site = BlockSite(owner, f"{name}.{i}" if name else str(i), len(container))
                for module in (child, getattr(child, "_orig_mod", None)):
                    if isinstance(module, torch.nn.Module):
                        found.setdefault(id(module), site)
    return found


def _dynamo_runs(frame: Any) -> bool:
    """The frame runs code that Dynamo compiled (the owner is itself inside a compiled
    model: then its blocks are the whole model's business, not regional ones)."""
    from torch._dynamo.utils import orig_code_map

    return frame.f_code in orig_code_map


def _call_arguments(frame: Any, owner: torch.nn.Module) -> tuple[tuple, dict] | None:
    """The arguments of the owner's running call: the locals of its ``Module._call_impl``
    frame, ``frame`` itself or a few frames above its ``forward`` (diffusers' hooks wrap
    ``forward``); None where there is none or Dynamo runs one of these frames."""
    for _ in range(6):
        if frame is None or _dynamo_runs(frame):
            return None
        if frame.f_code.co_name == "_call_impl" and frame.f_locals.get("self") is owner:
            args, kwargs = frame.f_locals.get("args"), frame.f_locals.get("kwargs")
            return (tuple(args), dict(kwargs)) if isinstance(args, tuple) and isinstance(kwargs, dict) else None
        frame = frame.f_back
    return None


def find_site(block: torch.nn.Module) -> tuple[BlockSite, tuple[tuple, dict] | None] | None:
    """The site of ``block`` in the innermost module on the call stack whose forward calls it
    (the owner's frame runs while the block's graph compiles), with the arguments of that
    owner call (None where they cannot be found), or None."""
    frame = sys._getframe(1)
    seen: set[int] = set()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, torch.nn.Module) and owner is not block and id(owner) not in seen:
                seen.add(id(owner))
                if not isinstance(owner, _CONTAINERS):
                    site = _site_in(owner, block)
                    if site is not None:
                        return _outside_dynamo(site, frame)
            frame = frame.f_back
        return None
    finally:
        del frame


def find_enclosing_site(module: torch.nn.Module) -> tuple[torch.nn.Module, BlockSite, tuple[tuple, dict] | None] | None:
    """The block a part of whose code is compiling: among the modules on the call stack,
    ``module`` and those whose forward encloses it, the numbered children of a container of a
    module further out, the innermost whose owner's forward takes a timestep (else the
    outermost): a wrapper such as HiDream's ``HiDreamBlock`` around its block, not the MoE
    experts (numbered children too) inside it. With its site and the arguments of its owner's
    call; or None."""
    frame = sys._getframe(1)
    inner: list[torch.nn.Module] = []  # modules on the stack so far, innermost first
    found: tuple[torch.nn.Module, BlockSite, Any] | None = None
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, torch._dynamo.eval_frame.OptimizedModule):
                owner = owner._orig_mod  # torch.compile(block) by hand: the block itself
            if isinstance(owner, torch.nn.Module) and not isinstance(owner, _CONTAINERS) and all(owner is not m for m in inner):
                if not inner and owner is not module:
                    frame = frame.f_back
                    continue  # frames of the runtime and Dynamo below the compiling module's
                numbered = _numbered_children(owner) if inner else {}
                for m in reversed(inner):  # the outermost first: a block, not the experts inside it
                    site = numbered.get(id(m))
                    if site is not None:
                        found = (m, site, frame)
                        break
                if found is not None and found[1].owner is owner and _takes_timestep(owner):
                    break
                inner.append(owner)
            frame = frame.f_back
        if found is None:
            return None
        block, site, owner_frame = found
        site, arguments = _outside_dynamo(site, owner_frame)
        return block, site, arguments
    finally:
        del frame


def _takes_timestep(owner: torch.nn.Module) -> bool:
    try:
        names = inspect.signature(owner.forward).parameters
    except (TypeError, ValueError):
        return False
    return any(n in names for n in TIMESTEP_NAMES)


def _outside_dynamo(site: BlockSite, frame: Any) -> tuple[BlockSite, tuple[tuple, dict] | None]:
    """The site with the arguments of the owner's call. Where Dynamo runs the owner's forward
    (``torch.compile(owner)`` whose graphs break between blocks, so that a block's frame
    compiles alone), the step hooks go on the ``OptimizedModule`` that wraps the owner (its
    own call runs outside Dynamo; hooks on the owner would be traced into its graphs)."""
    arguments = _call_arguments(frame, site.owner)
    if arguments is not None:
        return site, arguments
    outer = frame.f_back
    while outer is not None:
        wrapper = outer.f_locals.get("self")
        if isinstance(wrapper, torch._dynamo.eval_frame.OptimizedModule) and wrapper._orig_mod is site.owner:
            hooked = BlockSite(site.owner, site.path, site.count, wrapper)
            return hooked, _call_arguments(outer, wrapper)
        outer = outer.f_back
    return site, None


@dataclass
class OwnerCall:
    """One call of the owner's forward: the step it runs and the block calls so far."""

    owner: "RegionalOwner"
    state: GenerationState
    key: Any
    step: int
    known: bool
    paths: list[str] = field(default_factory=list)
    broken: bool = False


CALL: contextvars.ContextVar[OwnerCall | None] = contextvars.ContextVar("adacorr_owner_call", default=None)
# set while a block guarded at its call runs its own forward (CallGuard): nothing in it is a region of its own
IN_GUARDED_CALL: contextvars.ContextVar[bool] = contextvars.ContextVar("adacorr_in_guarded_call", default=False)
_OWNERS: "weakref.WeakKeyDictionary[torch.nn.Module, RegionalOwner]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def owner_state(module: Any) -> ModelState | None:
    """The state of the blocks compiled regionally in ``module`` (the owner), or None."""
    found = _OWNERS.get(module) if isinstance(module, torch.nn.Module) else None
    return None if found is None else found.model


class _Hook:
    """A step hook of a :class:`RegionalOwner` on its module. A copy of the module
    (``copy.deepcopy``, ``pickle``) gets a hook that does nothing: the copy is another model,
    whose blocks find their own owner when they run (``LoneBlockRuntime._adopt``)."""

    def __init__(self, fn: Callable[..., Any] | None) -> None:
        self.fn = fn

    @torch.compiler.disable  # runs where Dynamo may trace the module's call (an OptimizedModule's hooks): never traced
    def __call__(self, *args: Any) -> None:
        if self.fn is not None:
            self.fn(*args)

    def __deepcopy__(self, memo: dict) -> "_Hook":
        return _Hook(None)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (_Hook, (None,))


class RegionalOwner:
    """The shared step of an owner's block graphs (see module docstring). It stands in
    :attr:`ModelState.graphs` for them: ``regions`` are the blocks' regions so far."""

    bodies_compiled = 0

    def __init__(self, site: BlockSite, model: ModelState) -> None:
        owner = site.owner
        self.model = model
        self.regions: list[GuardedRegion] = []
        # no paths for GraphRuntime's slot lookup: a whole-model graph never shares this step's record
        self.paths: frozenset[str] = frozenset()
        self.slot = ("regional", id(self))
        self.math = RegionMath(model.home)  # one set of per-step kernels for the owner's regions
        self.order: list[str] = []  # block paths by position, as first seen
        self._by_param = self._param_paths(owner)
        self._params = inspect.signature(owner.forward).parameters
        self._tokens = threading.local()
        self._pending = False  # the first owner call's step, started at compile time, is still open
        self._first = next((p for p, _ in self._by_param.values()), None)
        self.name = type(owner).__name__
        site.target.register_forward_pre_hook(_Hook(self._pre), with_kwargs=True)
        site.target.register_forward_hook(_Hook(self._post), always_call=True)
        model.attach(self)

    @staticmethod
    def _param_paths(owner: torch.nn.Module) -> dict[int, tuple[torch.Tensor, str]]:
        """id(parameter) -> (parameter, block path) for the numbered children of the owner's
        containers, the outermost where they nest (a block's ``adaLN_modulation`` Sequential);
        a parameter of several blocks (tied weights) names none."""
        found: dict[int, tuple[torch.Tensor, str]] = {}
        shared: set[int] = set()
        for name, container in owner.named_modules():  # outer containers come first
            if not isinstance(container, _CONTAINERS):
                continue
            for i, child in enumerate(container):
                path = f"{name}.{i}" if name else str(i)
                for p in child.parameters():
                    known = found.get(id(p))
                    if known is not None and path.startswith(known[1] + "."):
                        continue  # inside a block already named
                    if known is not None and known[1] != path:
                        shared.add(id(p))
                    found[id(p)] = (p, path)
        return {k: v for k, v in found.items() if k not in shared}

    def path_of(self, param: Any) -> str | None:
        """The block path of a block parameter, or None."""
        entry = self._by_param.get(id(param))
        return entry[1] if entry is not None and entry[0] is param else None

    def _timestep(self, args: tuple, kwargs: dict) -> float | None:
        """The timestep of one owner call: the ``timestep_arg`` argument (the usual names while
        it has its default), as ``GraphRuntime`` reads it (the largest value)."""
        name = self.model.config.timestep_arg
        names = (name,) if name != "timestep" else TIMESTEP_NAMES
        positional = [p for p in self._params if self._params[p].kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        for candidate in names:
            value = kwargs.get(candidate)
            if value is None and candidate in positional and positional.index(candidate) < len(args):
                value = args[positional.index(candidate)]
            if isinstance(value, torch.Tensor) and value.numel() > 0:
                return float(value.detach().float().max())
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        return None

    def _pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Start one step (see module docstring)."""
        if self._pending:
            self._pending = False
            self._finish()
        model = self.model
        found = contexts.context_for(self._first)
        context = found[0] if found is not None else None
        owner: Any = model.owner_token(self._first) if self._first is not None else 0
        if context is not None:
            owner = (owner, context.name)
        key = (owner, self.slot)
        tensors = [*args, *kwargs.values()]
        signature = tuple((tuple(t.shape), t.dtype) for t in tensors if isinstance(t, torch.Tensor))
        timestep = context.timestep if context is not None and context.timestep is not None else self._timestep(args, kwargs)
        step_index, total = (context.step_index, context.num_steps) if context is not None else (None, None)
        state = model.current()
        with state.lock:
            step = state.begin_step(key, signature, timestep, step_index, total)
        known = timestep is not None or state.has_boundaries() or (context is not None and context.step_index is not None)
        if timestep is None:
            model.note(f"{type(module).__name__}: no timestep argument (option timestep_arg={model.config.timestep_arg!r}): "
                       "caches are reused only inside generation(model, num_steps=...) or after reset(model, num_steps=...)")
        stack = self._stack()
        stack.append(CALL.set(OwnerCall(self, state, key, step, known)))

    def _post(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        """End the step (see :meth:`_finish`)."""
        self._finish()

    def _finish(self) -> None:
        """End the step of the innermost owner call: its key's step counter."""
        stack = self._stack()
        if not stack:
            return
        call = CALL.get()
        token = stack.pop()
        try:
            CALL.reset(token)
        except ValueError:  # set in another context (the compile-time start, then asyncio): no call is running
            CALL.set(None)
        if call is not None and call.owner is self:
            with call.state.lock:
                call.state.graph(call.key).steps += 1

    def begin_running_call(self, module: torch.nn.Module, arguments: tuple[tuple, dict]) -> None:
        """Start the step of the owner call that is running while its first block compiles (its
        pre-hook came too late for it, and ``Module._call_impl`` took the path without hooks, so
        no forward hook ends it): the next owner call ends it before it starts its own."""
        self._pre(module, *arguments)
        self._pending = True

    def _stack(self) -> list[Any]:
        stack = getattr(self._tokens, "stack", None)
        if stack is None:
            stack = self._tokens.stack = []
        return stack

    def position(self, call: OwnerCall, path: str) -> int | None:
        """The position of ``path``'s call in this owner call, or None where the order is not
        the one learned (a repeat, another block at this place): the rest of the call then
        computes plainly."""
        if call.broken:
            return None
        n = len(call.paths)
        with _LOCK:
            if n == len(self.order) and path not in self.order:
                self.order.append(path)
        if path in call.paths or n >= len(self.order) or self.order[n] != path:
            call.broken = True
            self.model.note(f"the blocks of {self.name} ran out of their learned order ({path} at position {n}): "
                            "that step computed its remaining blocks without caching")
            return None
        call.paths.append(path)
        return n

    def region(self, path: str, position: int, graph: "LoneBlockRuntime") -> GuardedRegion:
        """The guarded region of block ``path`` at ``position`` in ``graph`` (made on first use:
        a recompiled graph, e.g. for dynamic shapes, lays its inputs out anew)."""
        key = (id(self), path, position)
        region = graph.made.get(key)
        if region is not None:
            return region
        template = graph.template
        spec = RegionSpec(path, position, template.stream_pairs, template.observed, template.num_outputs, template.key)
        region = GuardedRegion(spec, graph.body, self.model.home)  # type: ignore[arg-type]
        region.math = self.math
        with _LOCK:
            graph.made[key] = region
            self.regions.append(region)
        return region


def regional_owner(site: BlockSite, arguments: tuple[tuple, dict], make: Callable[[], ModelState]) -> RegionalOwner:
    """The owner's :class:`RegionalOwner`, made on first use with its hooks (on
    ``site.target``); then the step of the owner call now running (``arguments``) starts."""
    with _LOCK:
        found = _OWNERS.get(site.target)
        if found is not None:
            return found
        created = _OWNERS[site.target] = RegionalOwner(site, make())
    created.begin_running_call(site.target, arguments)
    return created


def owner_from_blocks(module: torch.nn.Module, config_of: Callable[[Any], Any]) -> ModelState | None:
    """The state of ``module``'s regionally compiled blocks where none of them compiled inside
    it (Dynamo served them graphs compiled for another model of the class): its
    :class:`RegionalOwner` made now, hooked before its next call, with the config of its first
    block compiled for adacorr (``config_of(compiled callable)``, None where it is not); or None."""
    for name, container in module.named_modules():
        if not isinstance(container, _CONTAINERS):
            continue
        for child in container:
            compiled = child if isinstance(child, torch._dynamo.eval_frame.OptimizedModule) else child.__dict__.get("_compiled_call_impl")
            config = config_of(compiled) if compiled is not None else None
            if config is not None:
                site = BlockSite(module, f"{name}.0" if name else "0", len(container))
                with _LOCK:
                    found = _OWNERS.get(module)
                    if found is None:
                        found = _OWNERS[module] = RegionalOwner(site, ModelState(config))
                return found.model
    return None


class LoneBlockRuntime:
    """The callable Dynamo runs for a graph that is one whole block (see module docstring):
    the block's compiled body, guarded where an owner call is running."""

    def __init__(self, body: Callable[..., Any], template: RegionSpec, param_index: int | None, fixed_path: str | None,
                 config: Any) -> None:
        self.body = body
        self.template = template
        self.param_index = param_index  # a parameter input of the block: which block this call is
        self.fixed_path = fixed_path  # where parameters are not inputs, the one block it was compiled for
        self.config = config  # for the owner of a block that runs this graph without having compiled it
        self.made: dict[tuple[int, str, int], GuardedRegion] = {}  # (owner, path, position) -> region
        self._looked = WeakIdKeyDictionary()  # block parameters whose owner was looked for on the stack

    def _path(self, owner: RegionalOwner, args: Sequence[Any]) -> str | None:
        return owner.path_of(args[self.param_index]) if self.param_index is not None else self.fixed_path

    def _adopt(self, args: Sequence[Any]) -> OwnerCall | None:
        """The owner call of a block that runs this graph although its owner compiled none
        (Dynamo serves one graph to every block of a class: a second model of the same class),
        found once per block from the call stack as at compile time; or None."""
        if self.param_index is None or self._looked.get(args[self.param_index]) is not None:
            return None
        param = args[self.param_index]
        self._looked[param] = True
        block = _innermost_module_with(param)
        found = find_site(block) if block is not None else None
        if found is None or found[1] is None or found[0].count < self.config.min_blocks:
            return None
        owner = regional_owner(found[0], found[1], lambda: ModelState(self.config))
        call = CALL.get()
        return call if call is not None and call.owner is owner else None

    def __call__(self, *args: Any) -> Any:
        call = CALL.get()
        if call is not None and IN_GUARDED_CALL.get():  # inside a block guarded at its call (CallGuard): that is the region
            return self.body(*args)
        path = None if call is None else self._path(call.owner, args)
        if path is None:
            call = self._adopt(args)
            path = None if call is None else self._path(call.owner, args)
        if call is None or path is None:
            return self.body(*args)
        position = call.owner.position(call, path)
        if position is None:
            call.state.cache((call.key[0], path)).clear()
            return self.body(*args)
        region = call.owner.region(path, position, self)
        model = call.owner.model
        token = ACTIVE.set(Active(call.state, call.key, call.step, call.known, model.group,
                                  joint_gates=model.config.scope == "step"))
        try:
            with call.state.lock:
                return tuple(region(*args))
        finally:
            ACTIVE.reset(token)


def _innermost_module_with(param: Any) -> torch.nn.Module | None:
    """The innermost module on the call stack that holds ``param`` (the block whose compiled
    frame is running), or None."""
    frame = sys._getframe(2)
    try:
        for _ in range(64):
            if frame is None:
                return None
            module = frame.f_locals.get("self")
            if isinstance(module, torch.nn.Module) and any(p is param for p in module.parameters()):
                return module
            frame = frame.f_back
        return None
    finally:
        del frame


STREAM_NAMES = ("hidden_states", "x", "hidden", "h")  # an argument of one of these names is a block's main stream


def shape_pairs(ins: Sequence[Any], outs: Sequence[Any], params: set[int], same: Callable[[Any, Any], bool],
                names: Sequence[str | None] | None = None) -> list[tuple[int, int]] | str:
    """(input, output) stream pairs of a whole-block graph by shape and dtype: each output
    pairs with the one non-parameter token-shaped input like it, or the reason there is none
    or several (then which input it updates is not known: no guard). Where several are alike
    and exactly one of them is the block's argument named as a main stream (``names``: each
    input's argument name; :data:`STREAM_NAMES`), that one: HunyuanDiT's ``skip`` beside its
    ``hidden_states``, a text stream as long as the image's. Two outputs still never pair
    with one input."""
    pairs = []
    for j, out in enumerate(outs):
        cands = [i for i, v in enumerate(ins) if i not in params and same(v, out)]
        if len(cands) > 1 and names is not None:
            named = [i for i in cands if names[i] in STREAM_NAMES]
            cands = named if len(named) == 1 else cands
        if len(cands) != 1:
            shape = tuple(getattr(out, "shape", ()))
            return (f"output {j} (shape {shape}) has {len(cands)} inputs of its shape and dtype to be its residual stream "
                    "(one needed)")
        pairs.append((cands[0], j))
    if len({i for i, _ in pairs}) != len(pairs):
        return "two outputs pair with one input"
    return pairs


def argument_name(placeholder: str) -> str:
    """The block argument a Dynamo placeholder stands for: ``L_hidden_states_`` and
    ``L_kwargs_hidden_states_`` -> ``hidden_states``, ``L_args_0_`` -> ``args_0``."""
    name = placeholder[2:] if placeholder.startswith(("L_", "l_")) else placeholder
    name = name[len("kwargs_"):] if name.startswith("kwargs_") else name
    return name[:-1] if name.endswith("_") else name
