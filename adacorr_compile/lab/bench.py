"""Measurement harness for the reference models: used by ``adacorr demo`` and
``benchmarks/run_benchmark.py``.

A :class:`~adacorr_compile.lab.methods.Method` (:mod:`~adacorr_compile.lab.methods`,
:mod:`~adacorr_compile.lab.peer_caches`) turns the reference model into the callable a sampler runs
(uncached eager, uncached Inductor, our backend with some options, or a peer:
diffusers' own cache hooks, cache-dit's DBCache). :func:`run_method` samples a fixed batch
with it, counts the block evaluations that really ran, and times repeated
generations; :func:`adacorr_compile.lab.metrics.quality` compares images with the uncached output of the
same seeds (PSNR, SSIM) and with held-out real data (Frechet distance in the
reference classifier's feature space, class accuracy).
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..api import reset as reset_model, stats as model_stats
from .methods import BlockCounter, Method, OnnxDiT, block_modules, transformer_of

logger = logging.getLogger("adacorr_compile.bench")


@dataclass
class Run:
    method: Method
    images: torch.Tensor
    seconds: list[float]
    block_calls: int
    block_evals: int
    stats: dict[str, Any] | None
    compile_seconds: float
    # with a baseline (run_method(..., baseline=...)): its times and images, timed interleaved
    # with the method's (baseline, method, baseline, method, ...), and the per-pair ratios
    # baseline seconds / method seconds
    baseline_seconds: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    baseline_images: torch.Tensor | None = None

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds)

    @property
    def skipped_fraction(self) -> float:
        return 1.0 - self.block_evals / self.block_calls if self.block_calls else 0.0

    @property
    def speedup(self) -> float | None:
        """Median of the per-pair ratios baseline / method (None: not timed against a baseline)."""
        return statistics.median(self.ratios) if self.ratios else None

    @property
    def speedup_spread(self) -> tuple[float, float] | None:
        """(min, max) of the per-pair ratios."""
        return (min(self.ratios), max(self.ratios)) if self.ratios else None


def _stats_of(fn: Any) -> dict[str, Any] | None:
    if isinstance(fn, OnnxDiT):
        return fn.stats()
    target = transformer_of(fn)
    try:
        return model_stats(target)
    except TypeError:
        return None


def _reset(fn: Any) -> None:
    if isinstance(fn, OnnxDiT):
        fn.reset()
    else:
        reset_model(transformer_of(fn))


class _Generations:
    """The generations of one :func:`run_method`: the method's callable ``fn``, the baseline's
    ``base_fn`` (None: no baseline), and what the timed generations collected."""

    def __init__(self, method: Method, fn: Any, baseline: Method | None, base_fn: Any,
                 sampler: Callable[..., torch.Tensor], labels: list[int], steps: int, seed: int) -> None:
        self.method, self.fn, self.baseline, self.base_fn = method, fn, baseline, base_fn
        self.sampler, self.labels, self.steps, self.seed = sampler, labels, steps, seed
        self.seconds: list[float] = []
        self.base_seconds: list[float] = []
        self.base_images: torch.Tensor | None = None

    def compile(self) -> float:
        """Compile the method (and a compiled baseline) outside the timed runs, for the batch size
        the timed runs use; check that our backend guarded the blocks, then reset its caches.
        Returns the method's compile seconds."""
        method, baseline = self.method, self.baseline
        t0 = time.perf_counter()
        if method.kind == "ours" or method.lowering != "eager":
            self.sampler(self.fn, self.labels, num_steps=2, seed=self.seed, **method.sampler_kwargs)
        compile_seconds = time.perf_counter() - t0
        if self.base_fn is not None and baseline.lowering != "eager":
            self.sampler(self.base_fn, self.labels, num_steps=2, seed=self.seed, **baseline.sampler_kwargs)
        stats_target = _stats_of(self.fn)
        if stats_target is not None:
            if method.kind == "ours" and (stats_target["fallbacks"] or not stats_target["totals"]["regions"]):
                raise RuntimeError(f"{method.name}: compiled without guards: {stats_target['fallbacks']}")
            _reset(self.fn)
        return compile_seconds

    def timed_baseline(self) -> None:
        """One baseline generation, timed (the first one's images are kept)."""
        if self.base_fn is None:
            return
        t0 = time.perf_counter()
        out = self.sampler(self.base_fn, self.labels, num_steps=self.steps, seed=self.seed,
                           **self.baseline.sampler_kwargs)
        self.base_seconds.append(time.perf_counter() - t0)
        if self.base_images is None:
            self.base_images = out.detach().float().cpu()

    def timed(self, **extra: Any) -> torch.Tensor:
        """A baseline generation, then one of the method, timed; returns the method's output."""
        self.timed_baseline()
        t0 = time.perf_counter()
        out = self.sampler(self.fn, self.labels, num_steps=self.steps, seed=self.seed, **extra,
                           **self.method.sampler_kwargs)
        self.seconds.append(time.perf_counter() - t0)
        return out


def _block_work(method: Method, model: Any, steps: int, stats: dict[str, Any] | None,
                eager_evals: int | None) -> tuple[int, int]:
    """(block calls, block evaluations that ran) of one generation."""
    n_blocks = len(block_modules(transformer_of(model)))
    calls = n_blocks * steps * method.sampler_kwargs.get("cfg_calls", 1)
    if stats is not None and stats["totals"]["calls"]:
        # compiled code runs no Python hooks: count from the runtime; the
        # calls must add up to one per block per step
        totals = stats["totals"]
        evals = totals["computes"]
        assert totals["calls"] == calls, (totals["calls"], calls)
    else:
        evals = eager_evals if eager_evals is not None else calls
    return calls, evals


def run_method(
    method: Method,
    model: Any,
    sampler: Callable[..., torch.Tensor],
    labels: list[int],
    steps: int,
    seed: int,
    reps: int = 1,
    progress: bool = False,
    baseline: Method | None = None,
) -> Run:
    """Sample ``labels`` once for quality and work counts, then ``reps - 1`` more
    times for timing (the first generation after a compile is timed only if it is
    not the one that compiled).

    With ``baseline`` (the uncached run of the same lowering), the method is timed against it
    **interleaved**: ``reps`` pairs, each a baseline generation then a method generation of the
    same batch in this process (the first pair's method generation is the quality one), so
    that machine load lands on both sides; ``Run.ratios`` holds the per-pair ratios baseline /
    method, ``Run.speedup`` their median. The baseline runs on a deep copy of the model (made
    before the method is built: a peer's cache hooks change the model itself)."""
    # every method compiles the same forward anew: without a reset Dynamo would hit
    # its recompile limit after a few methods and silently run the rest eagerly
    torch._dynamo.reset()
    base_fn = baseline.build(copy.deepcopy(model)) if baseline is not None else None
    fn = method.build(model)
    # hooks only on uncompiled runs (eager baseline, diffusers' hooks): Dynamo would trace
    # them and guard on their counter, recompiling every step; compiled runs are counted
    # by the adacorr runtime
    counter = BlockCounter(transformer_of(model)) if method.lowering == "eager" and method.kind != "ours" else None
    gens = _Generations(method, fn, baseline, base_fn, sampler, labels, steps, seed)
    try:
        compile_seconds = gens.compile()
        if counter is not None:
            counter.count = 0
        images = gens.timed(progress=progress)
        eager_evals = counter.count if counter is not None else None
        stats = _stats_of(fn)
        for _ in range(reps - 1):
            gens.timed()
    finally:
        if counter is not None:
            counter.close()
        if method.cleanup is not None:
            method.cleanup(model)
    calls, evals = _block_work(method, model, steps, stats, eager_evals)
    ratios = [b / m for b, m in zip(gens.base_seconds, gens.seconds)]
    return Run(method, images.detach().float().cpu(), gens.seconds, calls, evals, stats, compile_seconds,
               gens.base_seconds, ratios, gens.base_images)
