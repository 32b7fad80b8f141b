"""A block guarded at its call: for blocks whose compiled code is several graphs.

A graph break inside a block (Mochi's ``nonzero`` over the text mask, HiDream's
data-dependent expert routing, an ``.item()``) splits the block's compiled code into parts:
no graph is the whole block, so no graph can be its guarded region (``passes/lone_block.py``).
When such a part of a numbered block of an owner compiles (regional compilation, or a
whole-model compile whose graph breaks at the block), the block and its siblings of the same
class get a :class:`CallGuard` as their ``forward``: the region is then the block's whole
call, parts, eager ops between them and all. The guard runs outside Dynamo (its frame is
skipped, the block's own frames below it still compile) and takes the block's place in its
owner's step exactly as a whole-block graph does (:class:`~.regional.LoneBlockRuntime`):
position in call order, leader / probe / follower, one cache per block.

The region's inputs are the tensors of the call's arguments and its outputs the tensors the
block returns, both flattened with ``torch.utils._pytree``; other leaves (``None``, flags,
ints) are part of the call's layout: a call with another layout is another region. Which
input stream each output updates is found by shape and dtype (:func:`~.regional.shape_pairs`)
on the first call of a layout, which runs plainly; a layout without such pairs stays plain,
with the reason in ``stats(owner)["fallbacks"]``.

A second model of the same class compiles nothing (Dynamo serves it the first one's compiled
parts): each part is a :class:`PartRuntime`, which gives the blocks of a model that runs it
their guards on its first call. The owner call in which a model's blocks get their guards is
already running, so that step computes every block plainly (a first step computes anyway:
the caches start one step later).
"""

from __future__ import annotations

import contextvars
import copy
import inspect
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch._dynamo.decorators import skip as _skip  # torch.compiler.disable(recursive=False) without its wrapper frame
from torch.utils import _pytree as pytree

from .region import RegionSpec
from torch.utils.weak import WeakIdKeyDictionary

from .owners import calling_wrapper, state_on
from .regional import (_CONTAINERS, CALL, IN_GUARDED_CALL, BlockSite, LoneBlockRuntime, OwnerCall, _innermost_module_with,
                       find_enclosing_site, regional_owner, shape_pairs)
from .state import ModelState

logger = logging.getLogger("adacorr_compile")

MAX_LAYOUTS = 8  # call layouts per block; more (a new object among the arguments at every call) and it runs plainly
_LEAVES: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar("adacorr_call_leaves", default=None)
_CALLBACK: contextvars.ContextVar[Any] = contextvars.ContextVar("adacorr_call_dynamo_callback", default=None)


def _set_eval_frame(callback: Any) -> Any:
    """Dynamo's frame callback set to ``callback``; returns the one before (``torch.compiler.disable``'s
    own mechanism; private to torch, there since 2.0)."""
    from torch._C._dynamo.eval_frame import set_eval_frame

    return set_eval_frame(callback)


@dataclass
class _Layout:
    """One call layout of a guarded block: where its tensors sit among the argument leaves,
    what it returns around its tensors, and the runtime of its region."""

    in_spec: Any
    tensor_at: tuple[int, ...]
    out_spec: Any
    out_leaves: list[Any]  # the output's leaves, None where a tensor goes
    out_tensor_at: tuple[int, ...]
    runtime: LoneBlockRuntime | None = None


def _hashable(leaf: Any) -> Any:
    try:
        hash(leaf)
        return leaf
    except TypeError:
        return ("id", id(leaf))


def _same_tensor(a: Any, b: Any) -> bool:
    """Token-shaped tensors of one shape and dtype (rank >= 3: a stream, not an embedding)."""
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() >= 3
            and a.shape == b.shape and a.dtype == b.dtype)


class CallGuard:
    """A block's ``forward`` guarded as one region of its owner's step (see module docstring)."""

    def __init__(self, inner: Callable[..., Any]) -> None:
        self.inner = inner  # the block's own forward (a bound method, or diffusers' hooked forward)
        self._layouts: dict[Any, _Layout | str] = {}
        self._exhausted: str | None = None  # more than MAX_LAYOUTS layouts: the block runs plainly from then on
        self._lock = threading.Lock()

    def __deepcopy__(self, memo: dict) -> "CallGuard":  # a copied model's block: its own forward, no layouts
        return CallGuard(copy.deepcopy(self.inner, memo))

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (CallGuard, (self.inner,))

    @property
    def block(self) -> torch.nn.Module | None:
        block = getattr(self.inner, "__self__", None)
        return block if isinstance(block, torch.nn.Module) else None

    def _plain(self, args: tuple, kwargs: dict) -> Any:
        """The block's own forward, its frames compiled by the Dynamo callback of the guard's caller."""
        token = IN_GUARDED_CALL.set(True)
        prior = _set_eval_frame(_CALLBACK.get())
        try:
            return self.inner(*args, **kwargs)
        finally:
            _set_eval_frame(prior)
            IN_GUARDED_CALL.reset(token)

    @_skip  # Dynamo never compiles this frame (a graph break where it is traced); frames it calls it may
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # the runtime below runs with Dynamo's callback off (as a compiled graph's runtime
        # does); the block's own forward runs with it on (_plain): its frames compile
        callback = _set_eval_frame(None)
        token = _CALLBACK.set(callback)
        try:
            return self._guarded(args, kwargs)
        finally:
            _CALLBACK.reset(token)
            _set_eval_frame(callback)

    def _guarded(self, args: tuple, kwargs: dict) -> Any:
        call = CALL.get()
        block = self.block
        if call is None or IN_GUARDED_CALL.get() or block is None or self._exhausted is not None:
            return self._plain(args, kwargs)
        first = next(block.parameters(), None)
        path = call.owner.path_of(first) if first is not None else None
        if path is None:
            return self._plain(args, kwargs)
        leaves, in_spec = pytree.tree_flatten((args, kwargs))
        tensor_at = tuple(i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor))
        key = (in_spec, tuple(None if isinstance(leaf, torch.Tensor) else _hashable(leaf) for leaf in leaves))
        layout = self._layouts.get(key)
        if layout is None or call.broken:
            out = self._plain(args, kwargs)
            if layout is None:
                self._learn(call, path, key, leaves, in_spec, tensor_at, out)
            call.state.cache((call.key[0], path)).clear()  # this step ran it without its region
            return out
        if isinstance(layout, str):
            return self._plain(args, kwargs)
        token = _LEAVES.set(leaves)
        try:
            tensors = layout.runtime(*(leaves[i] for i in layout.tensor_at))  # type: ignore[misc]
        finally:
            _LEAVES.reset(token)
        out_leaves = list(layout.out_leaves)
        for i, t in zip(layout.out_tensor_at, tensors):
            out_leaves[i] = t
        return pytree.tree_unflatten(out_leaves, layout.out_spec)

    def _learn(self, call: OwnerCall, path: str, key: Any, leaves: list[Any], in_spec: Any, tensor_at: tuple[int, ...],
               out: Any) -> None:
        """The layout of a call seen for the first time (it ran plainly): its region, or the
        reason it has none. The rest of this owner call computes plainly: its order of blocks
        is not the one the next calls will take positions in."""
        call.broken = True
        if len(self._layouts) >= MAX_LAYOUTS:  # not kept: a new object among the arguments at every call would grow them
            self._exhausted = reason = f"{path}: more than {MAX_LAYOUTS} layouts of its call's arguments"
            call.owner.model.note(reason)
            return
        out_leaves, out_spec = pytree.tree_flatten(out)
        out_tensor_at = tuple(i for i, leaf in enumerate(out_leaves) if isinstance(leaf, torch.Tensor))
        ins = [leaves[i] for i in tensor_at]
        names = self._leaf_names(leaves, in_spec)
        pairs = shape_pairs(ins, [out_leaves[i] for i in out_tensor_at], set(), _same_tensor, [names[i] for i in tensor_at]) \
            if out_tensor_at else "the block returns no tensor"
        if isinstance(pairs, str):
            self._layouts[key] = reason = f"{path}: its call cannot be guarded: {pairs}"
            call.owner.model.note(reason)
            return
        layout = _Layout(in_spec, tensor_at, out_spec, [None if i in out_tensor_at else leaf for i, leaf in enumerate(out_leaves)],
                         out_tensor_at)
        spec = RegionSpec(path, 0, tuple(pairs), tuple(sorted({i for i, _ in pairs})), len(out_tensor_at), f"call:{path}")
        layout.runtime = LoneBlockRuntime(self._body(layout, path), spec, None, path, None)
        with self._lock:
            self._layouts[key] = layout
        logger.info("adacorr: %s guarded at its call (its compiled code is several graphs)", path)

    def _leaf_names(self, leaves: list[Any], in_spec: Any) -> list[str | None]:
        """The name of the argument each leaf of ``(args, kwargs)`` belongs to (positional ones by
        the forward's signature; None where it has no name there)."""
        args, kwargs = pytree.tree_unflatten(leaves, in_spec)
        try:
            positional = [p.name for p in inspect.signature(self.inner).parameters.values()
                          if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):
            positional = []
        names: list[str | None] = []
        for i, value in enumerate(args):
            names += [positional[i] if i < len(positional) else None] * len(pytree.tree_leaves(value))
        for key, value in kwargs.items():
            names += [key] * len(pytree.tree_leaves(value))
        return names

    def _body(self, layout: _Layout, path: str) -> Callable[..., list[torch.Tensor]]:
        """The region's body: the block's call with the region's tensors put back among the
        running call's other arguments; its output tensors in order."""

        def body(*tensors: torch.Tensor) -> list[torch.Tensor]:
            leaves = list(_LEAVES.get() or ())
            for i, t in zip(layout.tensor_at, tensors):
                leaves[i] = t
            args, kwargs = pytree.tree_unflatten(leaves, layout.in_spec)
            out_leaves, out_spec = pytree.tree_flatten(self._plain(args, kwargs))
            if out_spec != layout.out_spec:
                raise RuntimeError(f"adacorr: block {path} returned a {out_spec} where its earlier calls with these "
                                   f"arguments returned a {layout.out_spec}; its cached outputs cannot stand for it")
            return [out_leaves[i] for i in layout.out_tensor_at]

        return body


def guarded_at_call(block: torch.nn.Module) -> bool:
    """``block``'s forward is a :class:`CallGuard`."""
    return isinstance(block.__dict__.get("forward"), CallGuard)


def guard_calls(site: BlockSite, block: torch.nn.Module) -> int:
    """Put a :class:`CallGuard` on ``block`` and on the blocks of its container of the same
    class (a ``torch.compile``d child: on its module); returns how many were put on now. The
    owner call now running computes its remaining blocks plainly (module docstring)."""
    container_path = site.path.rpartition(".")[0]
    container = site.owner.get_submodule(container_path) if container_path else site.owner
    added = 0
    if isinstance(container, _CONTAINERS):
        for child in container:
            module = getattr(child, "_orig_mod", child)
            if type(module) is type(block) and not guarded_at_call(module):
                module.forward = CallGuard(module.forward)
                added += 1
    call = CALL.get()
    if added and call is not None:
        call.broken = True
    return added


class PartRuntime:
    """A compiled part of a block that is guarded at its call (see module docstring): the part
    runs as compiled; the first time a block of another model runs it (told apart by a
    parameter input), that block and its siblings get their guards."""

    def __init__(self, body: Callable[..., Any], param_index: int | None, config: Any) -> None:
        self.body = body
        self.param_index = param_index
        self.config = config
        self._looked = WeakIdKeyDictionary()

    def __call__(self, *args: Any) -> Any:
        if self.param_index is not None and self._looked.get(args[self.param_index]) is None:
            self._looked[args[self.param_index]] = True
            self._adopt(args[self.param_index])
        return self.body(*args)

    def _adopt(self, param: Any) -> None:
        inner = _innermost_module_with(param)
        found = find_enclosing_site(inner) if inner is not None else None
        if found is None or found[2] is None or found[1].count < self.config.min_blocks or guarded_at_call(found[0]):
            return
        block, site, arguments = found
        wrapper = calling_wrapper() if site.hooked is not None else None  # a whole-model compile: its state
        regional_owner(site, arguments, lambda: ModelState(self.config) if wrapper is None
                       else state_on(wrapper, lambda: ModelState(self.config)))
        guard_calls(site, block)
