"""The cost of one decision on several ranks: adacorr vs plain Inductor under context parallelism.

Run it under ``torchrun`` (one process per rank):

    # CPU, gloo, 2 ranks (what the numbers in benchmarks/results/distributed_flux.* come from)
    torchrun --standalone --nproc-per-node 2 benchmarks/distributed.py --threads 1
    # GPUs, NCCL, N ranks (benchmarks/gpu_run.sh --distributed N runs this on the device machine)
    torchrun --standalone --nproc-per-node 4 benchmarks/distributed.py --size gpu --steps 28

Every rank builds the same Flux transformer (``--size tiny``: the tests' tiny Flux; ``gpu``:
a wider one with a longer sequence), shards it with diffusers' context parallelism (Ulysses
over all ranks, ``enable_parallelism(ContextParallelConfig(ulysses_degree=N))``) and
compiles it twice: plain ``torch.compile`` (Inductor) and ``backend="adacorr"`` (defaults:
the decision group is found on the model). Whole generations (a flow-matching Euler loop) of
the two are timed interleaved, ``--rounds`` rounds, between barriers.

Reported, on rank 0 (the collective's counters of every rank gathered there):

* generation seconds of both and the ratio adacorr / inductor per round (median, min-max);
* the decision group's all-reduces per generation (one per step that measures) and their
  host time per generation and per step, against the step's time: the share of a step spent
  in the collective (it includes waiting for the slowest rank);
* the bare collective: one all-reduce of the packed vector alone (``--ping`` times, median):
  its latency with nothing else to wait for;
* the skipped share of block calls, and whether every rank took the same decisions (the
  reuse traces gathered from all ranks: they must be equal).

Results in ``<out>/distributed_<model>.{json,md}`` (``--name`` to change the stem).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import adacorr_compile

RESULTS = Path(__file__).resolve().parent / "results"

# Flux transformer configs: (tokens of the image, text tokens) and the model's sizes
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(grid=4, text=6, model=dict(patch_size=1, in_channels=8, num_layers=2, num_single_layers=3,
                                            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=12,
                                            pooled_projection_dim=10, axes_dims_rope=(2, 2, 4))),
    "cpu": dict(grid=16, text=32, model=dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4,
                                             attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64,
                                             pooled_projection_dim=32, axes_dims_rope=(8, 12, 12))),
    "gpu": dict(grid=64, text=256, model=dict(patch_size=1, in_channels=64, num_layers=4, num_single_layers=8,
                                              attention_head_dim=128, num_attention_heads=16, joint_attention_dim=1024,
                                              pooled_projection_dim=256, axes_dims_rope=(16, 56, 56))),
}


def build(size: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The Flux transformer of ``size`` (same weights on every rank) and its inputs (batch 1)."""
    from diffusers import FluxTransformer2DModel

    spec = SIZES[size]
    cfg = spec["model"]
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**cfg).eval().to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    grid, text = spec["grid"], spec["text"]
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(grid)), torch.arange(float(grid)), indexing="ij"), -1)
    inputs = dict(
        hidden_states=torch.randn(1, grid * grid, cfg["in_channels"], generator=g),
        encoder_hidden_states=torch.randn(1, text, cfg["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], generator=g),
        img_ids=ids.reshape(grid * grid, 3),
        txt_ids=torch.zeros(text, 3),
    )
    return model, {k: v.to(device) if k.endswith("_ids") else v.to(device=device, dtype=dtype) for k, v in inputs.items()}


def sample(compiled: Any, inputs: dict[str, Any], steps: int) -> torch.Tensor:
    """A flow-matching Euler loop of ``steps`` steps."""
    kw = dict(inputs)
    hidden = kw.pop("hidden_states")
    with torch.no_grad():
        for i in range(steps):
            t = torch.full((1,), 1.0 - i / steps, device=hidden.device, dtype=hidden.dtype)
            out = compiled(hidden_states=hidden, timestep=t, **kw, return_dict=False)[0]
            hidden = hidden - out / steps
    return hidden


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def timed(compiled: Any, inputs: dict[str, Any], steps: int, device: torch.device) -> tuple[float, torch.Tensor]:
    _sync(device)
    start = time.perf_counter()
    out = sample(compiled, inputs, steps)
    _sync(device)
    return time.perf_counter() - start, out


def ping(elements: int, count: int, device: torch.device) -> float:
    """Median seconds of one SUM all-reduce of ``elements`` float32 values, nothing else running."""
    vector = torch.zeros(elements, device=device)
    times = []
    for _ in range(count):
        _sync(device)
        start = time.perf_counter()
        dist.all_reduce(vector)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="cpu", help="the Flux transformer's size (default cpu)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds, one generation of each method per round")
    p.add_argument("--ping", type=int, default=200, help="bare all-reduces timed for the collective's latency")
    p.add_argument("--device", default="auto", help="auto (cuda when there is one), cuda, cpu")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on cuda, float32 on cpu), float32, bfloat16")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads per rank (0: leave)")
    p.add_argument("--options", type=json.loads, default={}, help="adacorr options as JSON (default: the defaults)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default=None, help="file stem (default distributed_flux, _<size> unless cpu)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("benchmarks.distributed")
    if "RANK" not in os.environ:
        p.error("run under torchrun: torchrun --standalone --nproc-per-node 2 benchmarks/distributed.py")

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    else:
        # diffusers' enable_parallelism picks ``rank % torch.accelerator.device_count()``: one CPU "device"
        torch.accelerator.device_count = lambda: 1  # type: ignore[assignment]
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=120))
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)

    from diffusers.models._modeling_parallel import ContextParallelConfig

    compiled: dict[str, Any] = {}
    for method in ("inductor", "adacorr"):
        model, inputs = build(args.size, device, dtype)
        model.set_attention_backend("native")
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        compiled[method] = torch.compile(model, backend="adacorr", options=args.options) if method == "adacorr" else torch.compile(model)
    log.info("distributed: %d ranks (%s, %s), Flux %s, %d steps: compiling both", world,
             dist.get_backend(), device.type, args.size, args.steps)
    compile_s = {}
    for method, fn in compiled.items():
        compile_s[method], _ = timed(fn, inputs, args.steps, device)
        timed(fn, inputs, args.steps, device)  # a second warm-up (adacorr's first generation calibrates nothing, but
        # the cached path's kernels compile on its first reuse)

    group_before = adacorr_compile.stats(compiled["adacorr"])["decision_group"] or {}
    rounds: list[dict[str, float]] = []
    outs: dict[str, torch.Tensor] = {}
    traces: list[list[float]] = []
    group_deltas = []
    for _ in range(args.rounds):
        row = {}
        for method, fn in compiled.items():
            if method == "adacorr":
                adacorr_compile.reset(fn, num_steps=args.steps)
                before = adacorr_compile.stats(fn)["decision_group"]
            row[method], outs[method] = timed(fn, inputs, args.steps, device)
            if method == "adacorr":
                st = adacorr_compile.stats(fn)
                after = st["decision_group"]
                group_deltas.append((after["all_reduces"] - before["all_reduces"],
                                     after["all_reduce_seconds"] - before["all_reduce_seconds"]))
                traces = [r["reuse_trace"] for r in st["regions"]]
                totals = st["totals"]
        rounds.append(row)

    elements = group_before.get("elements") or 5 * len(traces) + 8
    bare = ping(int(elements), args.ping, device)

    mine = {"traces": traces, "all_reduce_seconds": [d[1] for d in group_deltas],
            "all_reduces": [d[0] for d in group_deltas], "bare": bare}
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        same = all(g["traces"] == gathered[0]["traces"] for g in gathered)
        gen = {m: _spread([r[m] for r in rounds]) for m in compiled}
        ratio = _spread([r["adacorr"] / r["inductor"] for r in rounds])
        ar_s = [statistics.mean(g["all_reduce_seconds"][i] for g in gathered) for i in range(args.rounds)]
        share = _spread([ar_s[i] / rounds[i]["adacorr"] for i in range(args.rounds)])
        per_gen = group_deltas[-1][0]
        result = {
            "what": "Flux under diffusers context parallelism (Ulysses), adacorr vs plain Inductor, "
                    "generations timed interleaved; the decision group's all-reduce cost",
            "command": f"torchrun --standalone --nproc-per-node {world} benchmarks/distributed.py "
                       + " ".join(sys.argv[1:] if argv is None else argv),
            "world": world, "backend": dist.get_backend(), "device": str(device), "dtype": str(dtype),
            "options": args.options, "size": args.size, "tokens": SIZES[args.size]["grid"] ** 2, "steps": args.steps, "rounds": args.rounds,
            "torch": torch.__version__, "platform": platform.platform(), "threads": torch.get_num_threads(),
            "compile_seconds": compile_s,
            "generation_seconds": gen,
            "ratio_adacorr_over_inductor": ratio,
            "all_reduces_per_generation": per_gen,
            "all_reduce_seconds_per_generation": _spread(ar_s),
            "all_reduce_share_of_generation": share,
            "all_reduce_seconds_per_step": statistics.median(ar_s) / args.steps,
            "step_seconds_adacorr": gen["adacorr"]["median"] / args.steps,
            "bare_all_reduce_seconds": {"elements": int(elements), "median_over_ranks": statistics.median(g["bare"] for g in gathered)},
            "skipped_share": totals["reuse_fraction"],
            "ranks_agree": same,
            "max_abs_diff_adacorr_vs_inductor": float((outs["adacorr"] - outs["inductor"]).abs().max()),
        }
        stem = args.name or ("distributed_flux" + ("" if args.size == "cpu" else f"_{args.size}"))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / f"{stem}.md").write_text(markdown(result))
        log.info("%s", markdown(result))
        if not same:
            log.error("distributed: the ranks took different decisions")
    dist.barrier()
    dist.destroy_process_group()
    return 0


def markdown(r: dict[str, Any]) -> str:
    g, ratio, share = r["generation_seconds"], r["ratio_adacorr_over_inductor"], r["all_reduce_share_of_generation"]
    ar = r["all_reduce_seconds_per_generation"]
    rng = lambda d, f="{:.3f}": f"{f.format(d['median'])} ({f.format(d['min'])}-{f.format(d['max'])})"  # noqa: E731
    return "\n".join([
        f"# Flux ({r['size']}, {r['tokens']} image tokens) on {r['world']} ranks, context parallel (Ulysses), "
        f"{r['backend']} on {r['device']}",
        "",
        f"`{r['command']}` (torch {r['torch']}, {r['threads']} thread(s) per rank, {r['steps']} steps, "
        f"{r['rounds']} interleaved rounds; median (min-max)); adacorr options {r['options'] or 'defaults'}",
        "",
        "| | value |",
        "|---|---|",
        f"| generation, plain Inductor (s) | {rng(g['inductor'])} |",
        f"| generation, adacorr (s) | {rng(g['adacorr'])} |",
        f"| adacorr / Inductor per round | {rng(ratio)} |",
        f"| skipped share of block calls | {r['skipped_share']:.1%} |",
        f"| all-reduces per generation (decision group) | {r['all_reduces_per_generation']} |",
        f"| all-reduce host time per generation (s, mean of ranks) | {rng(ar, '{:.4f}')} |",
        f"| all-reduce share of an adacorr generation | {rng(share, '{:.1%}')} |",
        f"| all-reduce per step vs a step (s) | {r['all_reduce_seconds_per_step']:.5f} vs {r['step_seconds_adacorr']:.4f} |",
        f"| one bare all-reduce of {r['bare_all_reduce_seconds']['elements']} floats (s) | "
        f"{r['bare_all_reduce_seconds']['median_over_ranks']:.6f} |",
        f"| every rank took the same decisions | {r['ranks_agree']} |",
        "",
        "The all-reduce host time includes waiting for the slowest rank to reach the decision "
        "(the ranks' work is not perfectly balanced); the bare all-reduce is the collective alone. "
        "The model has random weights: its velocity does not settle as a trained model's does, so at "
        "the default threshold it reuses little or nothing (the ratio is then the cost of the guards and "
        "the collective); a higher reuse_threshold shows the skipping.",
        "",
    ])


if __name__ == "__main__":
    raise SystemExit(main())
