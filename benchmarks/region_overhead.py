"""Cost of the guarded regions themselves: the reference model with caching kept off.

    python benchmarks/region_overhead.py --model dit --threads 2
    python benchmarks/region_overhead.py --model flux --threads 2
    python benchmarks/region_overhead.py --model sd3 --threads 2

Every variant computes every block at every step (nothing is skipped), so its time over
plain ``torch.compile`` (Inductor) is what the runtime adds: the per-region Python, the OEM
measurement and its host read, the cache refresh, and the fusion lost at block
boundaries. Variants (10 images, CFG batch of 20, the benchmark's sampler), compiled first,
then timed interleaved in one process (no recompiles allowed), median of ``--reps``:

* ``plain inductor``: ``torch.compile(model)``;
* ``adacorr never``: ``policy="never"``: regions measure (lambda traces) and refresh, no decision;
* ``adacorr block``: the paper's per-block decision with a threshold of 0 (lambda is never 0
  on a changing input): every region measures and reads lambda on the host every step;
* ``adacorr step``: the same with ``scope="step"``: one measurement and one host read per step.

A ``torch.profiler`` table of one ``adacorr block`` generation is saved with the figures in
``benchmarks/results/region_overhead_<model>.{json,md}``.

Second table, the cost of a reuse step: the default options with every step after warm-up
reused (threshold 1, no reuse cap), each model call timed, with the span cache (chained
blocks share one residual: one add per stream on a reuse) and with one cache per block (the
layout before the span cache: one add and one extrapolation per block), interleaved.

Third table (``--span-call``), what one call per span saves on a reuse step: a DiT of tiny width
(diffusers' ``DiTTransformer2DModel``, 16 channels, so the blocks cost little and the runtime's
own Python shows) at 8 and at 28 blocks (DiT-XL's depth), every step after warm-up reused, with
the span's regions called as one ``SpanCall`` and with one call per region (``fuse_spans`` off),
interleaved in one process: the median time of a reuse step, and the runtime's own time in it
(the graph runtime's, less its compiled parts). Its slope from 8 to 28 blocks is the cost per
skipped block.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from adacorr_compile.lab import bench, methods
from adacorr_compile.api import _model_state
from adacorr_compile.lab.reference import load_reference
from adacorr_compile.lab.sampling import reference_sampler

RESULTS = Path(__file__).resolve().parent / "results"
NO_REUSE = {"policy": "adacorr", "correction": True, "reuse_threshold": 0.0, "warmup_steps": 0, "final_steps": 0,
            "scope": "block", "forecast": "none"}
VARIANTS: dict[str, dict | None] = {
    "plain inductor": None,
    "adacorr never": {"policy": "never"},
    "adacorr block": NO_REUSE,
    "adacorr step": {**NO_REUSE, "scope": "step"},
}


ALWAYS_REUSE = {"reuse_threshold": 1.0, "max_consecutive_reuses": 1000, "final_steps": 0}


class _Timed:
    """Calls ``fn`` and records the wall time of each call."""

    def __init__(self, fn) -> None:
        self.fn, self.times = fn, []

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.times.append(time.perf_counter() - t0)
        return out


def reuse_step_rows(model, sampler, labels, steps: int, reps: int) -> list[dict]:
    """Median time of a compute step and of a reuse step, span cache vs one cache per block."""
    chain = importlib.import_module("adacorr_compile.passes.chain_regions")
    spans_apply = chain.spans_apply
    runs = {}
    for name, spans in (("span cache", True), ("one cache per block", False)):
        # "one cache per block" is the runtime before the span cache: spans switched off at compile time
        chain.spans_apply = spans_apply if spans else (lambda config: False)
        own = copy.deepcopy(model)
        methods.own_forward(methods.transformer_of(own))  # a compile of its own, not the other variant's cached one
        try:
            fn = methods.ours(name, ALWAYS_REUSE).build(own)
            sampler(fn, labels, num_steps=2)
        finally:
            chain.spans_apply = spans_apply
        sizes = {r.span.size for g in _model_state(methods.transformer_of(fn)).graphs for r in g.regions}
        assert (max(sizes) > 1) == spans, (name, sizes)
        runs[name] = fn
    per_step: dict[str, dict[str, list[float]]] = {n: {"compute": [], "reuse": []} for n in runs}
    with torch.compiler.set_stance("fail_on_recompile"):
        for _ in range(reps):
            for name, fn in runs.items():
                timed = _Timed(fn)
                sampler(timed, labels, num_steps=steps)
                trace = bench._stats_of(fn)["regions"][1]["reuse_trace"][-steps:]
                for t, reused in zip(timed.times, trace):
                    per_step[name]["reuse" if reused == 1.0 else "compute"].append(t)
    rows = []
    for name, t in per_step.items():
        compute, reuse = statistics.median(t["compute"]), statistics.median(t["reuse"])
        rows.append({"variant": name, "compute_ms": 1e3 * compute, "reuse_ms": 1e3 * reuse, "reuse_over_compute": reuse / compute,
                     "reuse_spread_ms": [1e3 * min(t["reuse"]), 1e3 * max(t["reuse"])], "reuse_steps": len(t["reuse"])})
    return rows


def span_call_rows(reps: int, steps: int = 30) -> list[dict]:
    """Reuse step time and the runtime's own time per reuse step, one call per span vs one per
    region, at 8 and 28 blocks of a tiny-width DiT (see the module docstring)."""
    from adacorr_compile import compilers, tiny
    from adacorr_compile.runtime import graph as graph_runtime
    from adacorr_compile.runtime.region import SpanCall

    lower = importlib.import_module("adacorr_compile.passes.lower")
    fuse_spans = lower.fuse_spans
    compiled_s, runtime_s = [0.0], [0.0]
    part_forward, runtime_call = compilers.CompiledPart.forward, graph_runtime.GraphRuntime.__call__

    def adding_time(fn, total):
        def timed(self, *args):
            t0 = time.perf_counter()
            try:
                return fn(self, *args)
            finally:
                total[0] += time.perf_counter() - t0
        return timed

    timed_part, timed_runtime = adding_time(part_forward, compiled_s), adding_time(runtime_call, runtime_s)

    runs = {}
    for depth in (8, 28):
        model, inputs = tiny.tiny_dit(depth)
        calls = [inputs(k, 1000.0 - k * 1000.0 / steps) for k in range(steps)]
        for name, fused in (("one call per span", True), ("one call per region", False)):
            lower.fuse_spans = fuse_spans if fused else (lambda split: 0)
            own = copy.deepcopy(model)
            methods.own_forward(own)  # a compile of its own, not the other variant's cached one
            try:
                fn = torch.compile(own, backend="adacorr", options=ALWAYS_REUSE)
                with torch.no_grad():
                    for kw in calls:
                        fn(**kw)
            finally:
                lower.fuse_spans = fuse_spans
            spans = [m for g in _model_state(fn).graphs for m in g.runner.children() if isinstance(m, SpanCall)]
            assert bool(spans) == fused, (name, spans)  # each variant is what it says (its own compile)
            runs[(depth, name)] = (fn, calls)
    per: dict[tuple[int, str], dict[str, list[float]]] = {k: {"step": [], "runtime": []} for k in runs}
    compilers.CompiledPart.forward, graph_runtime.GraphRuntime.__call__ = timed_part, timed_runtime
    try:
        with torch.no_grad(), torch.compiler.set_stance("fail_on_recompile"):
            for _ in range(reps):
                for key, (fn, calls) in runs.items():
                    times = []
                    for kw in calls:
                        compiled_s[0] = runtime_s[0] = 0.0
                        t0 = time.perf_counter()
                        fn(**kw)
                        times.append((time.perf_counter() - t0, runtime_s[0] - compiled_s[0]))
                    trace = bench._stats_of(fn)["regions"][1]["reuse_trace"][-len(calls):]  # this generation's
                    for (step_s, own_s), reused in zip(times, trace):
                        if reused == 1.0:
                            per[key]["step"].append(step_s)
                            per[key]["runtime"].append(own_s)
    finally:
        compilers.CompiledPart.forward, graph_runtime.GraphRuntime.__call__ = part_forward, runtime_call
    rows = []
    for (depth, name), t in per.items():
        rows.append({"blocks": depth, "variant": name, "reuse_step_ms": 1e3 * statistics.median(t["step"]),
                     "runtime_ms": 1e3 * statistics.median(t["runtime"]), "reuse_steps": len(t["step"])})
    for name in ("one call per span", "one call per region"):
        a, b = (next(r for r in rows if r["blocks"] == d and r["variant"] == name) for d in (8, 28))
        b["runtime_us_per_skipped_block"] = 1e3 * (b["runtime_ms"] - a["runtime_ms"]) / 20
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["dit", "flux", "sd3"], default="dit")
    parser.add_argument("--images", type=int, default=10, help="images (the CFG batch is twice this)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--span-call", action="store_true",
                        help="only the third table (one call per span), written to region_overhead_span_call.{json,md}")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.span_call:
        return span_call_main(args)
    model = load_reference(args.model)
    sampler = reference_sampler(args.model)
    labels = [i % 10 for i in range(args.images)]
    runs = {}
    for name, options in VARIANTS.items():
        method = methods.inductor_baseline() if options is None else methods.ours(name, options)
        fn = method.build(model)
        sampler(fn, labels, num_steps=2)  # compile
        runs[name] = fn

    def generation(fn) -> float:
        t0 = time.perf_counter()
        sampler(fn, labels, num_steps=args.steps)
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.compiler.set_stance("fail_on_recompile"):
        for _ in range(args.reps):  # interleaved: a drift of the machine hits every variant
            for name, fn in runs.items():
                times[name].append(generation(fn) / args.steps)
    for name, fn in runs.items():
        if name != "plain inductor":
            totals = bench._stats_of(fn)["totals"]
            assert totals["regions"] and totals["reuses"] == 0, (name, totals)
    base = statistics.median(times["plain inductor"])
    blocks = len(methods.block_modules(methods.transformer_of(model)))
    rows = []
    for name, t in times.items():
        med = statistics.median(t)
        rows.append({"variant": name, "ms_per_step": 1e3 * med, "relative_speed": base / med,
                     "added_ms_per_block_call": 1e3 * (med - base) / blocks})

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        generation(runs["adacorr block"])
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)

    reuse_rows = reuse_step_rows(model, sampler, labels, args.steps, args.reps)

    device = f"CPU ({platform.machine()}), {torch.get_num_threads()} threads"
    result = {"model": args.model, "batch": 2 * len(labels), "steps": args.steps, "reps": args.reps, "blocks": blocks,
              "device": device, "torch": torch.__version__, "command": " ".join(sys.argv), "rows": rows,
              "reuse_step": reuse_rows}
    stem = f"region_overhead_{args.model}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2))
    lines = [f"### Region overhead, reference {args.model}, CFG batch {2 * len(labels)}, {device}, median of {args.reps}", "",
             f"Command: `{result['command']}`", "",
             "| variant (every block computed) | ms per step | speed vs plain Inductor | added ms per block call |",
             "| --- | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['ms_per_step']:.2f} | {r['relative_speed']:.2f}x | {r['added_ms_per_block_call']:.3f} |")
    reuse_lines = ["", f"Reuse step vs compute step, default options reusing every step after warm-up ({blocks} blocks; "
                   "median per model call over all reps; min-max of the reuse steps):", "",
                   "| cache layout | compute step ms | reuse step ms (min-max) | reuse / compute |", "| --- | ---: | ---: | ---: |"]
    for r in reuse_rows:
        lo, hi = r["reuse_spread_ms"]
        reuse_lines.append(f"| {r['variant']} | {r['compute_ms']:.2f} | {r['reuse_ms']:.2f} ({lo:.2f}-{hi:.2f}) | "
                           f"{r['reuse_over_compute']:.3f} |")
    lines += reuse_lines
    lines += ["", "torch.profiler, one `adacorr block` generation (self CPU time):", "", "```", table, "```", ""]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines[:6 + len(rows)] + reuse_lines))
    return 0


def span_call_main(args: argparse.Namespace) -> int:
    rows = span_call_rows(args.reps)
    device = f"CPU ({platform.machine()}), {torch.get_num_threads()} threads"
    result = {"device": device, "torch": torch.__version__, "reps": args.reps, "command": " ".join(sys.argv), "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "region_overhead_span_call.json").write_text(json.dumps(result, indent=2))
    lines = [f"### One call per span: a reuse step of a tiny-width DiT, {device}, {args.reps} interleaved reps", "",
             f"Command: `{result['command']}`. Every step after warm-up reused; medians over the reuse steps. "
             "Runtime: the graph runtime's time less its compiled parts (Python, eager adds, the host read).", "",
             "| blocks | variant | reuse step ms | runtime ms | runtime per skipped block (8 to 28 blocks) |",
             "| ---: | --- | ---: | ---: | ---: |"]
    for r in rows:
        per_block = r.get("runtime_us_per_skipped_block")
        lines.append(f"| {r['blocks']} | {r['variant']} | {r['reuse_step_ms']:.2f} | {r['runtime_ms']:.2f} | "
                     + (f"{per_block:.1f} us |" if per_block is not None else " |"))
    (RESULTS / "region_overhead_span_call.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
