"""GraphRuntime: the callable the backend hands back to Dynamo for one graph.

It runs the lowered graph (glue compiled by Inductor, guarded regions in
between) once per denoising step. Before each step it decides whether a new
generation has begun: the timestep argument went up, or the shapes or dtypes of
the model's inputs changed. Step counting happens here, on the host, outside any
traced code, so Dynamo never guards on it and a sampling loop never recompiles.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from .region import ACTIVE, Active, GuardedRegion
from .state import GenerationState, ModelState

logger = logging.getLogger("adacorr_compile")


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
    ) -> None:
        self.model = model
        self.id = len(model.graphs)
        self.runner = runner
        self.regions = list(regions)
        self.input_indices = list(input_indices)  # non-parameter tensor inputs
        self.timestep_index = timestep_index
        self.bodies_compiled = bodies_compiled
        self.paths = {r.spec.path for r in self.regions}
        model.graphs.append(self)

    def __call__(self, *args: Any) -> Any:
        state = self.model.current()
        with state.lock:
            self._begin_step(state, args)
            step = state.steps[self.id]
            token = ACTIVE.set(Active(state, self.id, step))
            try:
                out = self.runner(*args)
            finally:
                ACTIVE.reset(token)
            state.steps[self.id] = step + 1
        return out

    def _begin_step(self, state: GenerationState, args: Sequence[Any]) -> None:
        if self.id not in state.steps and any(
            g is not self and state.steps.get(g.id, 0) > 0 and g.paths & self.paths for g in self.model.graphs
        ):
            # Dynamo recompiled the same blocks for new input shapes or dtypes
            logger.info("adacorr: graph %d replaces graph(s) with the same blocks (new shapes or dtypes): new generation", self.id)
            state.new_generation("recompiled for new input shapes")
        signature = tuple((tuple(args[i].shape), args[i].dtype) for i in self.input_indices)
        previous = state.signature.get(self.id)
        if previous is not None and previous != signature:
            logger.info("adacorr: input shapes or dtypes changed (%s -> %s): new generation", previous, signature)
            state.new_generation("input shapes changed")
        state.signature[self.id] = signature
        if self.timestep_index is not None:
            t = args[self.timestep_index]
            value = float(t.detach().float().max()) if isinstance(t, torch.Tensor) else float(t)
            last = state.last_t.get(self.id)
            if last is not None and value > last + 1e-6 * max(1.0, abs(last)):
                state.new_generation(f"timestep went up ({last:g} -> {value:g})")
                state.signature[self.id] = signature
            elif last is not None and value < last:
                state.t_spacing[self.id] = last - value
            state.last_t[self.id] = value
        state.steps.setdefault(self.id, 0)
