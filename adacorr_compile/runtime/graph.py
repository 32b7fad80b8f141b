"""GraphRuntime: the callable the backend hands back to Dynamo for one graph.

It runs the lowered graph (glue compiled by Inductor, guarded regions in
between) once per denoising step. Before each step it finds whose state the step
runs on (the calling compiled model and module instance: :mod:`.owners`; Dynamo
may hand one graph to several) and whether a new generation has begun
(:meth:`GenerationState.begin_step`: the timestep turned back, the shapes or dtypes
of the inputs changed, or the step count the user gave is done). Step counting
happens here, on the host, outside any traced code, so Dynamo never guards on it
and a sampling loop never recompiles. A graph with no timestep input has no
generation signal: it never reuses a cache unless the user marks generations
(``generation()``, or a step count), and says so in ``stats()["fallbacks"]``.

Inside a diffusers ``cache_context`` (:mod:`.contexts`), each context name (``"cond"``,
``"uncond"``, ...) keeps its own caches and counters within the generation, and the
pipeline's step index, step count and timestep replace the ones guessed here.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Sequence

import torch

from . import contexts, requests
from .owners import calling_wrapper, state_on
from .region import ACTIVE, Active, GuardedRegion
from .state import GenerationState, ModelState

logger = logging.getLogger("adacorr_compile")

_IDS = itertools.count()


class GraphRuntime:
    """Runs one lowered graph with its guarded regions (see module docstring)."""

    def __init__(
        self,
        model: ModelState,
        runner: torch.nn.Module,
        regions: Sequence[GuardedRegion],
        input_indices: Sequence[int],
        timestep_index: int | None,
        bodies_compiled: int,
        owner_index: int | None = None,
        context_index: int | None = None,
    ) -> None:
        self.model = model  # the state of the compile that built this graph
        self.id = next(_IDS)
        self.runner = runner
        self.regions = list(regions)
        self.input_indices = list(input_indices)  # non-parameter tensor inputs
        self.timestep_index = timestep_index
        self.owner_index = owner_index  # the first parameter input: tells module instances apart
        self.context_index = owner_index if context_index is None else context_index  # a parameter of the first block
        self.bodies_compiled = bodies_compiled
        self.paths = {r.spec.path for r in self.regions}
        # a recompilation of the same blocks (new shapes, a guard that failed) takes the
        # place of the graph it replaces: one step counter, so a recompile for a reason
        # other than the inputs (diffusers sets an attribute on the first cache_context)
        # continues the generation, and changed inputs end it (GenerationState.begin_step)
        self.slot = next((g.slot for g in model.graphs if g.paths & self.paths), self.id)
        model.attach(self)
        model.adopt(self.regions)  # its regions read the model's config home
        if timestep_index is None:
            model.note(
                f"graph {self.id}: no timestep input (option timestep_arg={model.config.timestep_arg!r}, no per-sample "
                "float input): caches are reused only inside generation(model, num_steps=...) or after "
                "reset(model, num_steps=...)"
            )

    def _model_for_call(self) -> ModelState:
        wrapper = calling_wrapper()
        if wrapper is None:
            return self.model
        model = state_on(wrapper, lambda: ModelState(self.model.config))
        if model is not self.model:
            model.attach(self)
        return model

    def __call__(self, *args: Any) -> Any:
        model = self._model_for_call()
        owner: Any = model.owner_token(args[self.owner_index]) if self.owner_index is not None else 0
        found = contexts.context_for(args[self.context_index] if self.context_index is not None else None)
        context = None
        if found is not None:
            context = found[0]
            owner = (owner, context.name)  # cond and uncond: their own caches and counters
        key = (owner, self.slot)
        batch = requests.active_batch(model)
        if batch is not None:  # rows of several requests, each with its own state (runtime/requests.py)
            return requests.run_graph(self, batch, key, context, args)
        state = model.current()
        with state.lock:
            step = self._begin_step(model, state, key, args, context)
            known = self.timestep_index is not None or state.has_boundaries() or (
                context is not None and context.step_index is not None
            )
            token = ACTIVE.set(Active(state, key, step, known, model.group))
            try:
                out = self.runner(*args)
            finally:
                ACTIVE.reset(token)
            state.graph(key).steps += 1
        return out

    def _begin_step(
        self, model: ModelState, state: GenerationState, key: Any, args: Sequence[Any], context: contexts.CallContext | None
    ) -> int:
        signature = tuple((tuple(args[i].shape), args[i].dtype) for i in self.input_indices)
        timestep = None
        if context is not None and context.timestep is not None:
            timestep = context.timestep
        elif self.timestep_index is not None:
            t = args[self.timestep_index]
            timestep = float(t.detach().float().max()) if isinstance(t, torch.Tensor) else float(t)
        step_index, total = (context.step_index, context.num_steps) if context is not None else (None, None)
        return state.begin_step(key, signature, timestep, step_index, total)
