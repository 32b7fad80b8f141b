"""The head-to-head harness of ``benchmarks/peers.py`` and ``benchmarks/front.py``: every method
on its own copy of the reference model, compiled and warmed up before any timing, then timed
round-robin in one process (A, B, C, C, B, A, ...: every other round reversed, so that load
rising or falling over a round favours no method), speed as the per-round ratio of plain
Inductor's time to the method's, and PSNR / SSIM against plain Inductor's images of the same
seed over several seeds (see ``benchmarks/peers.py``'s docstring for why each step is so).
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from . import bench, metrics, peer_caches
from . import methods as lab_methods

logger = logging.getLogger("adacorr_compile.bench")

Sampler = Callable[..., torch.Tensor]


def per_round(reference: Sequence[float], own: Sequence[float]) -> tuple[float, float, float]:
    """Median, min and max over the rounds of ``reference``'s time / ``own``'s in the same round."""
    ratios = [r / t for r, t in zip(reference, own)]
    return statistics.median(ratios), min(ratios), max(ratios)


@dataclass
class Field:
    """The methods of one head-to-head run, built on ``model`` (each on a copy of its own)."""

    sampler: Sampler
    labels: list[int]
    steps: int
    seed: int
    blocks: int
    built: dict[str, tuple[lab_methods.Method, Any]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    counters: dict[str, lab_methods.BlockCounter] = field(default_factory=dict)

    def generate(self, fn: Any, seed: int | None = None) -> torch.Tensor:
        return self.sampler(fn, self.labels, num_steps=self.steps, seed=self.seed if seed is None else seed)


def build(model: Any, chosen: Sequence[lab_methods.Method], sampler: Sampler, labels: list[int], steps: int,
          seed: int) -> Field:
    """Build (compile, warm up with one whole generation) each method on a deep copy of ``model``.
    A method that cannot run is recorded with its reason in ``Field.failed``; a tool that failed
    eagerly is not compiled (a compile that raises inside the model's forward makes Dynamo skip
    that code object for every instance of the class, ours included)."""
    run = Field(sampler, labels, steps, seed, len(lab_methods.block_modules(lab_methods.transformer_of(model))))
    failed_tools: dict[str, str] = {}
    for method in chosen:
        if method.lowering != "eager" and method.policy in failed_tools:
            run.failed[method.name] = f"as eager: {failed_tools[method.policy]}"
            continue
        own = copy.deepcopy(model)
        if method.kind in ("baseline", "ours"):
            lab_methods.own_forward(lab_methods.transformer_of(own))  # see peers.py's docstring
        try:
            fn = method.build(own)
            # a whole generation: compiled peers whose hooks keep Python state (step counters)
            # recompile as that state changes; they do it here
            run.generate(fn)
        except Exception as exc:  # noqa: BLE001 - a peer that cannot run this model: say why
            run.failed[method.name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            if not isinstance(exc, peer_caches.PeerUnsupported):  # refused before anything ran: the tool's other rows may run
                failed_tools.setdefault(method.policy, run.failed[method.name])
            logger.info("%s: cannot run: %s", method.name, run.failed[method.name])
            continue
        run.built[method.name] = (method, fn)
        if method.kind == "peer" and method.lowering == "eager":
            run.counters[method.name] = lab_methods.BlockCounter(lab_methods.transformer_of(own))
        logger.info("ready: %s", method.name)
    return run


def _skipped(run: Field, name: str, method: lab_methods.Method, fn: Any, twin: float | None) -> float | None:
    """The share of block evaluations the method's last generation skipped: ours from its
    runtime's counts, an eager peer from its block counter, a compiled peer: ``twin`` (its eager
    twin's share, None where there is none)."""
    if method.kind == "ours":
        totals = bench._stats_of(fn)["totals"]
        return totals["reuses"] / max(1, totals["calls"])
    if name in run.counters:
        return 1.0 - run.counters[name].count / (run.blocks * run.steps)
    if method.kind == "peer":
        return twin
    return 0.0


def timed_rounds(run: Field, rounds: int, twins: dict[str, float | None] | None = None
                 ) -> tuple[dict[str, list[float]], dict[str, torch.Tensor], dict[str, float | None], dict[str, int]]:
    """``rounds`` timed generations per method, round-robin, every other round reversed.
    Returns (seconds per method, the first round's images, skipped shares, graphs compiled while
    timed). A compiled peer's skipped share is taken from ``twins`` (by its name) or else from its
    eager twin in this run (the name with ", eager"), None where there is neither."""
    twins = dict(twins or {})
    times: dict[str, list[float]] = {name: [] for name in run.built}
    images: dict[str, torch.Tensor] = {}
    skipped: dict[str, float | None] = {}
    graphs = torch._dynamo.utils.counters["stats"]
    recompiles = {name: 0 for name in run.built}
    order = list(run.built.items())
    for r in range(rounds):
        for name, (method, fn) in (order if r % 2 == 0 else order[::-1]):
            if method.kind == "ours":
                bench._reset(fn)
            if name in run.counters:
                run.counters[name].count = 0
            before = graphs["unique_graphs"]
            t0 = time.perf_counter()
            out = run.generate(fn)
            times[name].append(time.perf_counter() - t0)
            recompiles[name] += graphs["unique_graphs"] - before
            if r == 0:
                images[name] = out.detach().float().cpu()
                twin = twins.get(name, skipped.get(name.replace(", compiled", ", eager")))
                skipped[name] = _skipped(run, name, method, fn, twin)
        logger.info("round %d of %d done", r + 1, rounds)
    return times, images, skipped, recompiles


def quality_images(run: Field, first: dict[str, torch.Tensor], seeds: Sequence[int]) -> dict[str, list[torch.Tensor]]:
    """Per method, the images of each seed: ``first`` (the timed rounds' seed), then one untimed
    generation per further seed."""
    by_seed = {name: [first[name]] for name in run.built}
    for seed in seeds[1:]:
        for name, (method, fn) in run.built.items():
            if method.kind == "ours":
                bench._reset(fn)
            by_seed[name].append(run.generate(fn, seed).detach().float().cpu())
        logger.info("quality seed %d done", seed)
    return by_seed


def score(name: str, by_seed: dict[str, list[torch.Tensor]], base_name: str, times: dict[str, list[float]]) -> dict[str, Any]:
    """One method's row: PSNR (mean over the images, worst image, per-seed means) and SSIM against
    the baseline's images of the same seeds, and speed (per-round ratio to the baseline's time)."""
    psnr, ssim, seed_means = [], [], []
    for got, reference in zip(by_seed[name], by_seed[base_name]):
        p, s_ = metrics.psnr_ssim(got, reference)
        psnr, ssim = psnr + p, ssim + s_
        finite_seed = [x for x in p if x != float("inf")]
        seed_means.append(statistics.mean(finite_seed) if finite_seed else float("inf"))
    finite = [p for p in psnr if p != float("inf")]
    return {"method": name, "psnr_mean": statistics.mean(finite) if finite else float("inf"), "psnr_worst": min(psnr),
            "psnr_seed_means": seed_means, "ssim": statistics.mean(ssim),
            **dict(zip(("speedup", "speedup_min", "speedup_max"), per_round(times[base_name], times[name]))),
            "seconds": times[name]}


def eager_skipped_share(method: lab_methods.Method, model: Any, sampler: Sampler, labels: list[int], steps: int,
                        seed: int) -> float:
    """The share of block evaluations an eager peer skips in one (untimed) generation on a copy
    of ``model``: the skipped share of its compiled twin, whose block hooks are not traced."""
    own = copy.deepcopy(model)
    fn = method.build(own)
    counter = lab_methods.BlockCounter(lab_methods.transformer_of(own))
    try:
        sampler(fn, labels, num_steps=steps, seed=seed)
    finally:
        counter.close()
        if method.cleanup is not None:
            method.cleanup(own)
    return 1.0 - counter.count / (len(counter.handles) * steps)


def add_run_arguments(parser: Any, images: int, steps: int, rounds: int, quality_seeds: int) -> None:
    """The arguments every head-to-head script takes (sizes of the run, threads), with its defaults."""
    parser.add_argument("--images", type=int, default=images, help="images per generation (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=steps, help="denoising steps (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=rounds, help="timed rounds (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quality-seeds", type=int, default=quality_seeds,
                        help="seeds (from --seed on) whose images score PSNR: the first is the timed rounds' own, each "
                             "further one is one more untimed generation per method (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")


def setup_process(threads: int) -> None:
    """Logging, torch threads, and cache-dit's recommended compile settings
    (``cache_dit.set_compile_configs()``: process-wide, every compiled method of the run compiles
    under them), and a recompile limit that the compiled peers' hooks do not reach."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("torch", "diffusers", "cache_dit"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if threads:
        torch.set_num_threads(threads)
    cache_dit = peer_caches._import_cache_dit()
    cache_dit.set_compile_configs()
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
