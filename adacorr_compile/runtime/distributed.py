"""Decision groups: one decision on every rank under context, tensor and CFG parallelism.

Under context (sequence) parallelism each rank holds a shard of the tokens, so a score
measured on the local shard differs from rank to rank. If one rank reused a block and
another computed it, the computing rank would wait forever in the block's all-to-all (or,
with no collective in the block, the ranks would sample different images). So wherever a
region measures, its rank does not decide alone: it measures partial sums (token sums and
counts, :func:`adacorr_compile.oem.score_partials`; the forecast gates' sums of squares,
:func:`adacorr_compile.acm.steady_sums`), all of them for the step packed in one vector and
added across the ranks of a *decision group* by one SUM all-reduce, and every rank computes
the score, lambda and the flags from the same totals: the same decision on every rank, by
construction, and the exact score of the whole sequence (not a mean of per-rank means).

Which ranks vote together (the ``decision_group`` option):

* ``"auto"`` (default): the ranks the model is sharded over, where that can be seen on the
  model: diffusers' context parallelism (``enable_parallelism(ContextParallelConfig(...))``:
  its ring x Ulysses mesh), tensor parallelism (diffusers' ``TensorParallelConfig``, or
  blocks whose parameters are DTensors: the mesh dimensions they are sharded over). None
  where the model is not sharded (one process, data parallelism, CFG parallelism): each
  rank then decides for the batch it runs, as one process would.
* ``"world"``: every rank (e.g. the two CFG ranks voting jointly: one decision from the
  cond and uncond inputs together).
* ``"none"``: each rank alone (only safe where ranks never meet inside a block).
* a ``ProcessGroup``, or a one-dimensional ``DeviceMesh``: those ranks.

The collective is issued by every rank of the group at the same point of every step (the
regions' control flow before it depends only on host values that are identical on every
rank: the step, the guards, earlier verdicts), so none waits for another that skipped it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger("adacorr_compile")

def _is_process_group(value: Any) -> bool:
    try:
        from torch.distributed import ProcessGroup
    except ImportError:  # pragma: no cover - a torch without distributed
        return False
    return isinstance(value, ProcessGroup)


def _is_mesh(value: Any) -> bool:
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # pragma: no cover
        return False
    return isinstance(value, DeviceMesh)


@dataclass
class DecisionGroup:
    """The ranks that take one decision, and what their collectives cost (``stats()``)."""

    group: Any  # a torch.distributed ProcessGroup
    size: int
    source: str  # where it came from, for stats() and the log
    all_reduces: int = 0
    seconds: float = 0.0  # host time spent in the all-reduces (waits for the slowest rank too)
    elements: int = 0  # the last packed vector's length
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def all_reduce(self, vector: torch.Tensor) -> torch.Tensor:
        """The SUM of ``vector`` over the group's ranks (a float32 vector, in place)."""
        import torch.distributed as dist

        start = time.perf_counter()
        dist.all_reduce(vector, op=dist.ReduceOp.SUM, group=self.group)
        with self._lock:
            self.all_reduces += 1
            self.seconds += time.perf_counter() - start
            self.elements = vector.numel()
        return vector

    def summary(self) -> dict[str, Any]:
        return {"size": self.size, "source": self.source, "all_reduces": self.all_reduces,
                "all_reduce_seconds": self.seconds, "elements": self.elements}


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _mesh_group(mesh: Any, dims: tuple[int, ...] | None = None) -> Any:
    """The process group of ``mesh`` over ``dims`` (all of them by default)."""
    dims = tuple(range(mesh.ndim)) if dims is None else dims
    if len(dims) == 1:
        return mesh.get_group(dims[0])
    names = getattr(mesh, "mesh_dim_names", None)
    if names is None:
        raise ValueError("adacorr option 'decision_group': a DeviceMesh of several dimensions needs dimension names "
                         "(or pass the ProcessGroup to vote over)")
    return mesh[tuple(names[d] for d in dims)]._flatten().get_group()


def _diffusers_group(module: torch.nn.Module) -> tuple[Any, str] | None:
    """The group of diffusers' parallel config on ``module`` or a submodule, or None."""
    for sub in module.modules():
        # on the transformer; on its attention processors too (a block compiled alone)
        config = getattr(sub, "_parallel_config", None) or getattr(getattr(sub, "processor", None), "_parallel_config", None)
        if config is None:
            continue
        cp = getattr(config, "context_parallel_config", None)
        if cp is not None and getattr(cp, "_flattened_mesh", None) is not None:
            mesh = cp._flattened_mesh
            return mesh.get_group(), f"diffusers context parallelism (ring x ulysses, {mesh.size()} ranks)"
        tp = getattr(config, "tensor_parallel_config", None)
        if tp is not None and getattr(tp, "_mesh", None) is not None:
            return _mesh_group(tp._mesh), f"diffusers tensor parallelism ({tp._mesh.size()} ranks)"
    return None


def _dtensor_group(module: torch.nn.Module) -> tuple[Any, str] | None:
    """The mesh dimensions the first DTensor parameter is sharded over, or None."""
    for param in module.parameters():
        mesh = getattr(param, "device_mesh", None)
        placements = getattr(param, "placements", None)
        if mesh is None or placements is None:
            continue
        dims = tuple(d for d, p in enumerate(placements) if p.is_shard())
        if not dims:
            continue
        return _mesh_group(mesh, dims), f"DTensor parameters sharded over {mesh.size()} ranks"
    return None


def resolve(option: Any, module: torch.nn.Module | None) -> DecisionGroup | None:
    """The decision group for the ``decision_group`` option (see module docstring); None:
    each rank decides alone (one process, or nothing sharded)."""
    if isinstance(option, str) and option == "none":
        return None
    if not _initialized():
        if not isinstance(option, str) or option == "world":
            raise ValueError(f"adacorr option 'decision_group'={option!r} needs torch.distributed to be initialised "
                             f"(init_process_group) before the model's first call")
        return None
    import torch.distributed as dist

    found: tuple[Any, str] | None
    if _is_process_group(option):
        found = option, "the ProcessGroup given"
    elif _is_mesh(option):
        found = _mesh_group(option), "the DeviceMesh given"
    elif option == "world":
        found = dist.group.WORLD, "every rank (decision_group='world')"
    else:
        found = None if module is None else (_diffusers_group(module) or _dtensor_group(module))
        if found is None:
            if dist.get_world_size() > 1:
                logger.info("adacorr: torch.distributed has %d ranks but the model is not sharded over them "
                            "(no context or tensor parallelism found): each rank decides for its own batch; "
                            "options={'decision_group': ...} makes ranks vote together", dist.get_world_size())
            return None
    group, source = found
    size = dist.get_world_size(group)
    if size <= 1:
        return None
    logger.info("adacorr: one decision on %d ranks (%s): one all-reduce of the scores' partial sums per step",
                size, source)
    return DecisionGroup(group, size, source)
