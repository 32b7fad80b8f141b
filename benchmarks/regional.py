"""Regional vs whole-model compilation with ``backend="adacorr"`` on the reference models.

    python benchmarks/regional.py --model dit --threads 1 --images 2 --steps 10 --reps 3
    python benchmarks/regional.py --model flux --threads 1 --images 2 --steps 10 --reps 3
    python benchmarks/regional.py --model sd3 --threads 1 --images 2 --steps 10 --reps 3

Four variants of one reference model, adacorr with the same options (defaults) and plain Inductor:

* ``whole``: ``torch.compile(model, backend="adacorr")``: the blocks are found in one graph;
* ``regional``: each block compiled alone (``block.compile(backend="adacorr")`` for the
  transformer's block lists, what ``compile_repeated_blocks`` does): one graph per block
  class, all blocks of the transformer sharing its step (``runtime/regional.py``);
* ``whole inductor`` and ``regional inductor``: the same two with ``backend="inductor"``.

Compile time: the wall time of the first (2-step) sampling call of each, Inductor's FX graph
cache off so that nothing compiled before is reused. Speed: whole generations timed
interleaved (``--reps`` rounds, one generation of each per round, every other round in reverse
order, no recompiles allowed), ratios per round: median and min-max. Also the reuse counts of
both adacorr variants (they must be equal), the largest difference of their images and the
PSNR of each against plain whole-model Inductor's images. Results in
``benchmarks/results/regional_<model>.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

import adacorr_compile
from adacorr_compile.lab import methods, metrics
from adacorr_compile.lab.reference import load_reference
from adacorr_compile.lab.sampling import reference_sampler

RESULTS = Path(__file__).resolve().parent / "results"
logger = logging.getLogger("adacorr_compile.benchmarks")


VARIANTS = ("whole", "regional", "whole inductor", "regional inductor")


def build(model: torch.nn.Module, variant: str, options: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
    """(the callable to sample with, what ``adacorr_compile.stats`` takes) of one variant:
    adacorr or plain Inductor (``... inductor``), the whole model or block by block."""
    backend = "inductor" if variant.endswith("inductor") else "adacorr"
    kwargs: dict[str, Any] = {"backend": backend, "options": options} if backend == "adacorr" else {"backend": backend}
    copied = copy.deepcopy(model)
    methods.own_forward(methods.transformer_of(copied))  # Dynamo compiles each variant's code apart
    if variant.startswith("whole"):
        compiled = torch.compile(copied, **kwargs)
        return compiled, compiled
    transformer = methods.transformer_of(copied)
    for block in methods.block_modules(transformer):
        block.compile(**kwargs)
    return copied, transformer


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _per_round(numerator: list[float], denominator: list[float]) -> dict[str, float]:
    ratios = [a / b for a, b in zip(numerator, denominator)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def measure(kind: str, images: int, steps: int, reps: int, options: dict[str, Any]) -> dict[str, Any]:
    """Compile times, interleaved generation times, reuse counts and image quality (against
    plain whole-model Inductor's images) of the four variants."""
    torch._inductor.config.fx_graph_cache = False
    model = load_reference(kind)
    sampler = reference_sampler(kind)
    labels = [i % 10 for i in range(images)]
    runs, compile_s = {}, {}
    for variant in VARIANTS:
        fn, handle = build(model, variant, options)
        compile_s[variant], _ = timed(lambda: sampler(fn, labels, num_steps=2))
        runs[variant] = (fn, handle)
    times: dict[str, list[float]] = {v: [] for v in runs}
    outs: dict[str, torch.Tensor] = {}
    with torch.no_grad(), torch.compiler.set_stance("fail_on_recompile"):
        for rep in range(reps):  # interleaved, every other round reversed: a drift of the machine hits all
            for variant in (VARIANTS if rep % 2 == 0 else VARIANTS[::-1]):
                t, outs[variant] = timed(lambda: sampler(runs[variant][0], labels, num_steps=steps))
                times[variant].append(t)
    ours = ("whole", "regional")
    reuses = {v: [(r["path"], r["reuses"]) for r in adacorr_compile.stats(runs[v][1])["regions"]] for v in ours}
    plain = outs["whole inductor"]
    return {
        "model": kind, "images": images, "steps": steps, "reps": reps, "options": options,
        "blocks": len(methods.block_modules(methods.transformer_of(model))),
        "compile_s": compile_s,
        "generation_s": {v: statistics.median(t) for v, t in times.items()},
        "regional_over_whole": _per_round(times["regional"], times["whole"]),
        "plain_regional_over_whole": _per_round(times["regional inductor"], times["whole inductor"]),
        "speedup": {v: _per_round(times[f"{v} inductor"], times[v]) for v in ours},  # over its own plain Inductor
        # the whole model's paths start at the compiled wrapper ("transformer.transformer_blocks.0"),
        # the regional ones at the transformer that owns the blocks
        "same_reuses": len(reuses["whole"]) == len(reuses["regional"]) and all(
            pw.endswith(pr) and nw == nr for (pw, nw), (pr, nr) in zip(reuses["whole"], reuses["regional"])),
        "reuses": {v: sum(n for _, n in r) for v, r in reuses.items()},
        "block_calls": {v: sum(r["calls"] for r in adacorr_compile.stats(runs[v][1])["regions"]) for v in ours},
        "max_image_diff": float((outs["whole"] - outs["regional"]).abs().max()),
        "quality": {v: metrics.quality(outs[v], plain, labels) for v in ours},
    }


def markdown(result: dict[str, Any]) -> str:
    r, c, g, q = result["regional_over_whole"], result["compile_s"], result["generation_s"], result["quality"]
    p, sp = result["plain_regional_over_whole"], result["speedup"]

    def span(x: dict[str, float]) -> str:
        return f"{x['median']:.3f} ({x['min']:.3f}-{x['max']:.3f})"

    rows = []
    for v in VARIANTS:
        ours = v in q
        rows.append(f"| {v} | {c[v]:.1f} | {g[v]:.3f} | " + (
            f"{span(sp[v])} | {result['reuses'][v]} / {result['block_calls'][v]} | "
            f"{q[v]['psnr_mean']:.2f} / {q[v]['psnr_min']:.2f} |" if ours else "| | |"))
    return "\n".join([
        f"### Regional vs whole-model compilation, reference {result['model']} ({result['blocks']} blocks), "
        f"{result['images']} images (CFG batch {2 * result['images']}), {result['steps']} steps, {result['device']}",
        "", f"Command: `{result['command']}`", "",
        "| variant | compile (first 2-step call) s | generation s (median) | speed over its plain Inductor, per round | "
        "blocks skipped / block calls | PSNR mean / worst image vs whole Inductor, dB |",
        "| --- | ---: | ---: | ---: | ---: | ---: |", *rows,
        "",
        f"Per round ({result['reps']} rounds, interleaved, every other one reversed): adacorr regional / whole "
        f"generation time {span(r)}; plain Inductor regional / whole {span(p)}. Compile time regional / whole: "
        f"adacorr {c['regional'] / c['whole']:.2f}, plain Inductor {c['regional inductor'] / c['whole inductor']:.2f}. "
        f"Same per-region reuse counts: {result['same_reuses']}; largest image difference, adacorr regional vs "
        f"whole: {result['max_image_diff']:.2e}.",
        "",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["dit", "flux", "sd3"], default="dit")
    parser.add_argument("--images", type=int, default=2, help="images (the CFG batch is twice this)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args.model, args.images, args.steps, args.reps, {})
    result["device"] = f"CPU ({platform.machine()}), {torch.get_num_threads()} threads"
    result["torch"] = torch.__version__
    result["command"] = "python " + " ".join(sys.argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"regional_{args.model}.json").write_text(json.dumps(result, indent=2))
    text = markdown(result)
    (RESULTS / f"regional_{args.model}.md").write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
