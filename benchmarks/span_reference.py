"""Span cache vs one cache per block on the reference models, default options, same process.

    python benchmarks/span_reference.py --threads 1

Samples the reference DiT and Flux (10 images x 50 steps, the benchmark's samplers) compiled
with the default options twice: with the span cache (chained blocks share one residual) and
with one cache per block (``chain_regions.spans_apply`` switched off at compile time, the
runtime before the span cache). Prints, per model, the skipped block calls of each, the
largest absolute image difference and the cache bytes held at the end, and writes
benchmarks/results/span_reference.md.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

from adacorr_compile.lab import bench, methods
from adacorr_compile.lab.reference import load_reference_dit, load_reference_flux
from adacorr_compile.lab.sampling import sample_dit, sample_flux

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    chain = importlib.import_module("adacorr_compile.passes.chain_regions")
    spans_apply = chain.spans_apply
    lines = ["# Span cache vs one cache per block (default options, 10 images x 50 steps)", "",
             f"`python benchmarks/span_reference.py {' '.join(sys.argv[1:])}`", "",
             "| model | skipped, span cache | skipped, per block | max abs image difference | cache bytes, span / per block |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, load, sampler in (("dit", load_reference_dit, sample_dit), ("flux", load_reference_flux, sample_flux)):
        model = load()
        labels = [i % 10 for i in range(10)]
        runs = {}
        for spans in (True, False):
            chain.spans_apply = spans_apply if spans else (lambda config: False)
            try:
                torch._dynamo.reset()
                fn = methods.ours("default", {}).build(model)
                images = sampler(fn, labels, num_steps=50)
            finally:
                chain.spans_apply = spans_apply
            s = bench._stats_of(fn)
            runs[spans] = (images, s["totals"]["reuses"], s["totals"]["calls"], s["cache_bytes"])
        diff = float((runs[True][0] - runs[False][0]).abs().max())
        lines.append(f"| {name} | {runs[True][1]} / {runs[True][2]} | {runs[False][1]} / {runs[False][2]} | {diff:.1e} | "
                     f"{runs[True][3]} / {runs[False][3]} |")
        print(lines[-1], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "span_reference.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
