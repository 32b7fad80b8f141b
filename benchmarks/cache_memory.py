"""Cache memory of the guarded regions: how many block inputs the caches hold, by depth.

    python benchmarks/cache_memory.py            # tiny DiT, SD3, Flux, Wan at 4 and 16 blocks

For each tiny family (``adacorr_compile.lab.tiny``), depth and option set, samples a 20-step
generation (eager bodies: the memory does not depend on the lowering) and reads
``stats(fast)["cache_bytes"]`` at its end, as a multiple of one block input (the bytes of
the stream inputs of one guarded block, the largest over the blocks) and of the parameter
bytes; diffusers' FirstBlockCache on the same tiny Flux, for comparison (the tensors its
hooks hold). Then the default's multiple (it does not grow with depth: one cache per span of
chained blocks) applied to two real shapes (bf16): Flux.1-dev at
1024x1024 (57 blocks, 4096 + 512 tokens x 3072) and Wan2.1-14B at 720p, 81 frames (40 blocks,
75,600 tokens x 5120, CFG batch 2). Writes benchmarks/results/cache_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

import adacorr_compile
from adacorr_compile.lab import tiny
from adacorr_compile.runtime.state import storage_bytes

logger = logging.getLogger("adacorr_compile.bench")
RESULTS = Path(__file__).resolve().parent / "results"
STEPS = 20

FAMILIES = {
    "dit": lambda depth: tiny.tiny_dit(num_layers=depth),
    "sd3": lambda depth: tiny.tiny_sd3(num_layers=depth),
    "flux": lambda depth: tiny.tiny_flux(num_layers=depth // 2, num_single_layers=depth - depth // 2),
    "wan": lambda depth: tiny.tiny_wan(num_layers=depth),
}
OPTION_SETS = {
    "default": {},
    "step, no forecast": {"forecast": "none"},
    "block scope": {"scope": "block", "forecast": "none"},
}
# block input bytes (bf16, all streams) and block count of two real models
REAL = {
    "Flux.1-dev 1024x1024": {"blocks": 57, "block_input": (4096 + 512) * 3072 * 2},
    "Wan2.1-14B 720p 81 frames, CFG batch 2": {"blocks": 40, "block_input": 2 * 75_600 * 5120 * 2},
}


def _timesteps(steps: int) -> list[float]:
    return [1000.0 - k * 1000.0 / steps for k in range(steps)]


def measure(family: str, depth: int, options: dict) -> dict:
    torch._dynamo.reset()
    model, inputs = FAMILIES[family](depth)
    fast = torch.compile(model, backend="adacorr", options={"lowering": "eager", **options})
    largest = [0]
    hooks = []
    with torch.no_grad():
        for k, t in enumerate(_timesteps(STEPS)):
            kw = inputs(k, t)
            fast(**kw)
            if k == 0:  # the regions exist after the first call
                for region in adacorr_compile.regions(fast):
                    def hook(mod, args, _pairs=region.spec.stream_pairs):
                        nbytes = sum(args[i].numel() * args[i].element_size() for i, _ in _pairs)
                        largest[0] = max(largest[0], nbytes)
                    hooks.append(region.register_forward_pre_hook(hook))
    for h in hooks:
        h.remove()
    s = adacorr_compile.stats(fast)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "family": family, "depth": depth, "options": options, "regions": s["totals"]["regions"],
        "cache_bytes": s["cache_bytes"], "block_input_bytes": largest[0],
        "block_inputs": s["cache_bytes"] / largest[0], "per_region": s["cache_bytes"] / largest[0] / s["totals"]["regions"],
        "of_params": s["cache_bytes"] / params, "skipped": s["totals"]["reuses"] / max(1, s["totals"]["calls"]),
    }


def _hook_tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of the tensors held by diffusers' hook states under ``module`` (the attributes of
    each state object of each ``StateManager``), each storage once."""
    held = []
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        for hook in getattr(registry, "hooks", {}).values():
            for attr in vars(hook).values():
                if type(attr).__name__ == "StateManager":
                    held += [vars(state) for state in attr._state_cache.values()]
    return storage_bytes(held)


def first_block_cache(depth: int, block_input: int) -> dict:
    from diffusers import FirstBlockCacheConfig

    model, inputs = FAMILIES["flux"](depth)
    model.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    held = 0
    with torch.no_grad():
        for k, t in enumerate(_timesteps(STEPS)):
            with model.cache_context("cond", step_index=k, num_inference_steps=STEPS):
                model(**inputs(k, t))
            held = _hook_tensor_bytes(model)
    return {"family": "flux", "depth": depth, "options": "diffusers FirstBlockCache 0.1", "cache_bytes": held,
            "block_input_bytes": block_input, "block_inputs": held / block_input}


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--out", type=Path, default=RESULTS / "cache_memory")
    args = parser.parse_args()
    rows = []
    for family in FAMILIES:
        for depth in args.depths:
            for name, options in OPTION_SETS.items():
                row = measure(family, depth, options)
                row["option_set"] = name
                rows.append(row)
                print(f"{family:5s} depth {depth:2d} {name:18s} regions {row['regions']:2d}  cache "
                      f"{row['block_inputs']:6.2f} block inputs ({row['per_region']:.2f} per region, "
                      f"{row['of_params']:.3f} x params), skipped {row['skipped']:.0%}")
    fbc = []
    for depth in args.depths:
        block_input = next(r["block_input_bytes"] for r in rows if r["family"] == "flux" and r["depth"] == depth)
        fbc.append(first_block_cache(depth, block_input))
        print(f"flux  depth {depth:2d} FirstBlockCache    cache {fbc[-1]['block_inputs']:6.2f} block inputs")
    real = []
    deepest = max(args.depths)
    for name, shape in REAL.items():
        # the default cache is a number of block inputs that does not grow with depth (spans):
        # the largest total multiple of the tiny Flux and Wan at the deepest depth measured
        total = max(r["block_inputs"] for r in rows
                    if r["option_set"] == "default" and r["family"] in ("flux", "wan") and r["depth"] == deepest)
        gb = total * shape["block_input"] / 1e9
        real.append({"model": name, "blocks": shape["blocks"], "block_input_gb": shape["block_input"] / 1e9,
                     "block_inputs": total, "default_cache_gb": gb})
        print(f"{name}: {total:.2f} block inputs x {shape['block_input'] / 1e9:.3f} GB = {gb:.2f} GB of cache "
              f"with the default options ({shape['blocks']} blocks)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps({"steps": STEPS, "rows": rows, "first_block_cache": fbc, "real": real}, indent=1))
    lines = ["# Cache memory", "", f"`python benchmarks/cache_memory.py` ({STEPS}-step generation, eager bodies; "
             "cache bytes at its end)", "",
             "| family | blocks | options | regions | cache / one block input | per region | cache / parameters | skipped |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['family']} | {r['depth']} | {r['option_set']} | {r['regions']} | {r['block_inputs']:.2f} | "
              f"{r['per_region']:.2f} | {r['of_params']:.3f} | {r['skipped']:.0%} |" for r in rows]
    lines += [f"| flux | {r['depth']} | {r['options']} | - | {r['block_inputs']:.2f} | - | - | - |" for r in fbc]
    lines += ["", f"Real shapes, bf16 (the largest default multiple of the tiny Flux and Wan at {deepest} blocks; it does "
              "not grow with depth):", "",
              "| model | blocks | one block input | block inputs held | default cache |", "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['model']} | {r['blocks']} | {r['block_input_gb']:.3f} GB | {r['block_inputs']:.2f} | "
              f"{r['default_cache_gb']:.2f} GB |" for r in real]
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
