"""What each rank runs in tests/test_distributed.py (spawned by tests/distributed_harness.py).

A worker builds a tiny diffusers model, shards it as users do (diffusers' context
parallelism, DTensor tensor parallelism, or CFG branches on different ranks), compiles it
with ``backend="adacorr"`` and samples with it; rank 0 also samples the same thing in one
process (nothing sharded) for the comparison. It returns plain data: the final latents,
every region's reuse trace, the decision group's counters, the recompiles.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

import adacorr_compile
from adacorr_compile.lab.tiny import tiny_flux, tiny_wan

def _flux_four_heads():
    """tiny_flux with 4 attention heads: Ulysses over 4 ranks splits the heads 4 ways."""
    from diffusers import FluxTransformer2DModel

    _, make = tiny_flux()
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=2, num_single_layers=3, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=12, pooled_projection_dim=10, axes_dims_rope=(2, 2, 4),
    ).eval()
    return model, make


BUILDERS = {"flux": tiny_flux, "wan": tiny_wan, "flux4": _flux_four_heads}


def perturb_second_half(model: str, hidden: torch.Tensor, amount: float) -> torch.Tensor:
    """The input moved by ``amount`` on the tokens of the sequence's second half only (rank
    1's shard under 2-way context parallelism): its local score jumps, rank 0's does not."""
    hidden = hidden.clone()
    if model.startswith("flux"):  # [B, tokens, C]
        hidden[:, hidden.shape[1] // 2:] += amount
    else:  # wan [B, C, frames, H, W]: tokens run frame by frame, the second latent frame is the second half
        hidden[:, :, hidden.shape[2] // 2:] += amount
    return hidden


def sample(compiled: Any, model: str, steps: int, perturb: float | None, branch: str = "cond",
           perturb_at: int = 1) -> torch.Tensor:
    """A flow-matching Euler loop of ``steps`` steps over the tiny model's inputs (batch 1);
    ``perturb``: the input of the second half of the tokens jumps by it after step ``perturb_at``.
    ``branch="uncond"``: other text embeddings (the CFG branch a second rank runs)."""
    _, make = BUILDERS[model]()
    kw = make(0, 1000.0, batch=1)
    if branch == "uncond":
        kw["encoder_hidden_states"] = -kw["encoder_hidden_states"]
    hidden = kw.pop("hidden_states")
    scale = 1000.0 if model == "wan" else 1.0
    with torch.no_grad():
        for i in range(steps):
            t = 1.0 - i / steps
            out = compiled(hidden_states=hidden, **{**kw, "timestep": torch.full((1,), t * scale)}, return_dict=False)[0]
            hidden = hidden - out / steps
            if perturb is not None and i == perturb_at:
                hidden = perturb_second_half(model, hidden, perturb)
    return hidden


def traces(compiled: Any) -> list[list[float]]:
    return [r["reuse_trace"] for r in adacorr_compile.stats(compiled)["regions"]]


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _context_parallel(model: torch.nn.Module) -> None:
    from diffusers.models._modeling_parallel import ContextParallelConfig

    model.set_attention_backend("native")  # the backend with context parallelism that runs on the CPU
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=dist.get_world_size()))


def _tensor_parallel(model: torch.nn.Module) -> None:
    """Megatron-style DTensor sharding of the feed-forwards of Flux's dual-stream blocks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    plan = {"ff.net.0.proj": ColwiseParallel(), "ff.net.2": RowwiseParallel(),
            "ff_context.net.0.proj": ColwiseParallel(), "ff_context.net.2": RowwiseParallel()}
    for block in model.transformer_blocks:
        parallelize_module(block, mesh, plan)


def run_sharded(rank: int, world: int, model: str = "flux", layout: str = "context", options: dict | None = None,
                steps: int = 8, perturb: float | None = None, backend: str = "adacorr", reference: bool = True,
                generations: int = 2, plain: bool = False) -> dict[str, Any]:
    """``model`` sharded by ``layout`` (``"context"``, ``"tensor"``, or ``"cfg"``: unsharded,
    rank 0 the cond branch and rank 1 the uncond one), compiled with ``backend``, sampled
    ``generations`` times; rank 0 adds the unsharded run of the same options when ``reference``;
    ``plain``: the same sharded model compiled with plain Inductor too (``"plain"``)."""
    options = dict(options or {})
    net, _ = BUILDERS[model]()
    if layout == "context":
        _context_parallel(net)
    elif layout == "tensor":
        _tensor_parallel(net)
    compiled = torch.compile(net, backend=backend, **({"options": options} if backend == "adacorr" else {}))
    branch = "uncond" if layout == "cfg" and rank == 1 else "cond"
    outs, graphs = [], []
    for _ in range(generations):
        outs.append(sample(compiled, model, steps, perturb, branch))
        graphs.append(_unique_graphs())
    result: dict[str, Any] = {"out": outs[-1], "first": outs[0], "graphs": graphs}
    if backend == "adacorr":
        stats = adacorr_compile.stats(compiled)
        result.update(traces=traces(compiled), group=stats["decision_group"], fallbacks=stats["fallbacks"])
    if plain:
        torch._dynamo.reset()
        result["plain"] = sample(torch.compile(net), model, steps, perturb, branch)
    if rank == 0 and reference:
        torch._dynamo.reset()
        single, _ = BUILDERS[model]()
        alone = torch.compile(single, backend=backend, **({"options": options} if backend == "adacorr" else {}))
        result["single"] = sample(alone, model, steps, perturb, branch)
        if backend == "adacorr":
            result["single_traces"] = traces(alone)
            result["single_group"] = adacorr_compile.stats(alone)["decision_group"]
    return result


def _sample_requests(compiled: Any, steps: int, perturb: float) -> tuple[torch.Tensor, dict[str, list[list[float]]]]:
    """Two requests in one batched call (rows ``a`` and ``b``) for ``steps`` steps; ``b``'s
    second half of the tokens jumps by ``perturb`` after step 1. Returns the final latents and
    each request's reuse traces."""
    _, make = BUILDERS["flux"]()
    kw = make(0, 1000.0, batch=2)
    hidden = kw.pop("hidden_states")
    with torch.no_grad():
        for i in range(steps):
            t = torch.full((2,), 1.0 - i / steps)
            with adacorr_compile.requests(compiled, ["a", "b"]):
                out = compiled(hidden_states=hidden, **{**kw, "timestep": t}, return_dict=False)[0]
            hidden = hidden - out / steps
            if i == 1:
                hidden[1:] = perturb_second_half("flux", hidden[1:], perturb)
    found = {rid: [r["reuse_trace"] for r in adacorr_compile.request_stats(compiled, rid)["regions"]] for rid in "ab"}
    adacorr_compile.release(compiled, "a", "b")
    return hidden, found


def run_requests(rank: int, world: int, options: dict, steps: int, perturb: float) -> dict[str, Any]:
    """Tiny Flux under context parallelism serving two requests per call (``requests()``);
    rank 0 also runs them in one process."""
    net, _ = BUILDERS["flux"]()
    _context_parallel(net)
    out, found = _sample_requests(torch.compile(net, backend="adacorr", options=options), steps, perturb)
    result: dict[str, Any] = {"out": out, "traces": found}
    if rank == 0:
        torch._dynamo.reset()
        single, _ = BUILDERS["flux"]()
        result["single"], result["single_traces"] = _sample_requests(
            torch.compile(single, backend="adacorr", options=options), steps, perturb)
    return result
