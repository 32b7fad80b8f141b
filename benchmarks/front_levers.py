"""The levers tried to lift our high-speed front (issue 32), measured for quality alone.

    python benchmarks/front_levers.py --model flux --threads 1
    python benchmarks/front_levers.py --model sd3 --threads 1

Speed on these models follows the share of block evaluations skipped (``benchmarks/front.py``
times it; ``adacorr calibrate`` fits time as linear in the share computed), so a lever is judged
here by PSNR at a skipped share, without timing: every setting runs with ``lowering="eager"``
(the same decisions and outputs as Inductor up to float round-off; a compiled front run of the
same settings on the same 4 seeds matched these to 0.1 dB), 8 images x 50 steps, 4 seeds, PSNR (mean over the
32 images, worst image) against the uncached model's images of the same seeds, skipped share
from the runtime's counts. The peers' rows are their eager runs (hooks count the blocks they run).

Levers (each a group of rows, against the same baseline settings):

* **reuse cap and threshold**: the caps past the default (8, 12, 16) and no forced last
  compute (``final_steps=0``): which settings extend the front past 70% skipped;
* **one threshold throughout**: ``late_phase=None`` with ``final_steps=0`` at thr 0.2-0.22;
* **the forecast gate** (``forecast_max_change`` 0.05 / 0.1 / inf);
* **what the probe scores**: the spatial term's weight (``spatial_weight`` 0, the temporal drift
  alone, as FBCache's relative change; 1, the default; 3);
* **a second-order forecast of the span residual** (``--second-order``, not an option of the
  backend: this script patches the runtime's reuse with the Taylor term of order two from the
  last three computes, as TaylorSeer order 2 takes it, ``v + d1 k + d2 k^2 / 2`` with divided
  differences in the step index, under the same slope gate as the first-order term).

Writes benchmarks/results/front_levers_<model>.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import shlex
import statistics
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import torch

from adacorr_compile.lab import bench, metrics, rounds
from adacorr_compile.lab import methods as lab_methods
from adacorr_compile.lab.reference import load_reference
from adacorr_compile.lab.sampling import reference_sampler

RESULTS = Path(__file__).resolve().parent / "results"
logger = logging.getLogger("adacorr_compile.bench")

CAP6 = {"reuse_threshold": 0.25, "max_consecutive_reuses": 6}
CAP8 = {"reuse_threshold": 0.25, "max_consecutive_reuses": 8}
LEVERS: list[tuple[str, str, dict[str, Any]]] = [
    ("baseline", "default (thr=0.08, cap=3)", {}),
    ("baseline", "thr=0.25, cap=6", CAP6),
    ("cap and threshold", "thr=0.25, cap=8", CAP8),
    ("cap and threshold", "thr=0.25, cap=10", {**CAP6, "max_consecutive_reuses": 10}),
    ("cap and threshold", "thr=0.25, cap=6, final_steps=0", {**CAP6, "final_steps": 0}),
    ("cap and threshold", "thr=0.4, cap=8, final_steps=0", {"reuse_threshold": 0.4, "max_consecutive_reuses": 8, "final_steps": 0}),
    ("cap and threshold", "thr=0.4, cap=12, final_steps=0", {"reuse_threshold": 0.4, "max_consecutive_reuses": 12, "final_steps": 0}),
    ("cap and threshold", "thr=0.25, cap=16, final_steps=0", {**CAP6, "max_consecutive_reuses": 16, "final_steps": 0}),
    ("one threshold throughout", "thr=0.2, cap=6, late_phase=None, final_steps=0",
     {"reuse_threshold": 0.2, "max_consecutive_reuses": 6, "late_phase": None, "final_steps": 0}),
    ("one threshold throughout", "thr=0.22, cap=6, late_phase=None, final_steps=0",
     {"reuse_threshold": 0.22, "max_consecutive_reuses": 6, "late_phase": None, "final_steps": 0}),
    ("forecast gate", "thr=0.25, cap=8, forecast_max_change=0.05", {**CAP8, "forecast_max_change": 0.05}),
    ("forecast gate", "thr=0.25, cap=8, forecast_max_change=inf", {**CAP8, "forecast_max_change": float("inf")}),
    ("forecast gate", "thr=0.25, cap=6, forecast_max_change=inf", {**CAP6, "forecast_max_change": float("inf")}),
    ("probe score", "spatial_weight=0, thr=0.04, cap=6, late_phase=None, final_steps=0",
     {"spatial_weight": 0.0, "reuse_threshold": 0.04, "max_consecutive_reuses": 6, "late_phase": None, "final_steps": 0}),
    ("probe score", "spatial_weight=3, thr=0.3, cap=6, late_phase=None, final_steps=0",
     {"spatial_weight": 3.0, "reuse_threshold": 0.3, "max_consecutive_reuses": 6, "late_phase": None, "final_steps": 0}),
]
SECOND_ORDER: list[tuple[str, str, dict[str, Any]]] = [
    ("second-order forecast", "default + order 2", {}),
    ("second-order forecast", "thr=0.25, cap=6 + order 2", CAP6),
    ("second-order forecast", "thr=0.25, cap=8 + order 2", CAP8),
]


@contextmanager
def second_order_forecast() -> Iterator[None]:
    """The runtime's reuse with a second-order Taylor term (an experiment, not an option): the
    span cache keeps the values of its last three computes, and a reuse adds
    ``d2 * k^2 / 2`` to the first-order forecast, ``d2`` the second divided difference
    (``(d1 - d0) / ((s2 - s0) / 2)``, ``d1``, ``d0`` the slopes of the last two gaps), where the
    first-order slope is usable (the slope gate) and the older gap's values were of one step."""
    from adacorr_compile import step as rstep
    from adacorr_compile.runtime import region

    cache_cls, rotate, reuse_values = rstep.RegionCache, rstep.RegionCache.rotate, region._reuse_values

    def rotate2(self: Any, partial: bool, residuals: bool, step: int) -> None:
        older, older_step, older_valid = self.prev_val, self.prev_step, self.prev_valid
        rotate(self, partial, residuals, step)
        keep = self.prev_val is not None and older is not None
        self.__dict__.update(prev2_val=older if keep else None, prev2_step=older_step, prev2_valid=older_valid)

    def reuse2(reg: Any, args: Any, cache: Any, active: Any) -> list[torch.Tensor]:
        out = reuse_values(reg, args, cache, active)
        older = cache.__dict__.get("prev2_val")
        cached = list(cache.values(region.caches_residuals(reg.config)))
        previous, _ = cache.forecast(active.step, cached)
        if older is None or previous is None or not rstep.same_shapes(cached, older) or \
                not cache.prev2_step < cache.prev_step:
            return out
        s2, s1, s0, s = cache.ref_step, cache.prev_step, cache.prev2_step, active.step
        usable = cache.prev_valid & (cache.prev2_valid if cache.prev2_valid is not None else True)
        result = []
        for o, v2, v1, v0 in zip(out, cached, previous, older):
            d2 = ((v2 - v1) / (s2 - s1) - (v1 - v0) / (s1 - s0)) / ((s2 - s0) / 2)
            result.append(torch.where(usable, o + d2 * ((s - s2) ** 2 / 2), o))
        return result

    cache_cls.rotate, region._reuse_values = rotate2, reuse2
    try:
        yield
    finally:
        cache_cls.rotate, region._reuse_values = rotate, reuse_values


def _score_seeds(generate: Any, skipped_share: Any, seeds: list[int], reference: list[torch.Tensor]) -> dict[str, Any]:
    """PSNR (mean over all images, worst image, per-seed means) of ``generate(seed)`` against the
    uncached ``reference`` of each seed, and the mean of ``skipped_share()`` read after each."""
    psnr, skipped, seed_means = [], [], []
    for seed, ref in zip(seeds, reference):
        p, _ = metrics.psnr_ssim(generate(seed).float(), ref)
        psnr += p
        seed_means.append(statistics.mean(p))
        skipped.append(skipped_share())
    return {"skipped": statistics.mean(skipped), "psnr_mean": statistics.mean(psnr), "psnr_worst": min(psnr),
            "psnr_seed_means": seed_means}


def measure(model: Any, sampler: Any, options: dict[str, Any], labels: list[int], steps: int, seeds: list[int],
            reference: list[torch.Tensor]) -> dict[str, Any]:
    """Ours with ``options`` (eager lowering): the skipped share from the runtime's counts."""
    own = copy.deepcopy(model)
    lab_methods.own_forward(lab_methods.transformer_of(own))
    compiled = torch.compile(lab_methods.transformer_of(own), backend="adacorr", options={**options, "lowering": "eager"})
    fn = lab_methods.with_transformer(own, compiled)

    def generate(seed: int) -> torch.Tensor:
        bench._reset(fn)
        return sampler(fn, labels, num_steps=steps, seed=seed)

    def skipped_share() -> float:
        totals = bench._stats_of(fn)["totals"]
        return totals["reuses"] / max(1, totals["calls"])

    return _score_seeds(generate, skipped_share, seeds, reference)


def measure_peer(make: Any, model: Any, sampler: Any, labels: list[int], steps: int, seeds: list[int],
                 reference: list[torch.Tensor]) -> dict[str, Any]:
    """An eager peer: the skipped share from hooks counting the blocks it runs."""
    own = copy.deepcopy(model)
    fn = make("peer", False).build(own)
    counter = lab_methods.BlockCounter(lab_methods.transformer_of(own))

    def generate(seed: int) -> torch.Tensor:
        counter.count = 0
        return sampler(fn, labels, num_steps=steps, seed=seed)

    try:
        return _score_seeds(generate, lambda: 1.0 - counter.count / (len(counter.handles) * steps), seeds, reference)
    finally:
        counter.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["dit", "flux", "sd3"], default="flux")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import front  # the peers' settings, as the front sweeps them

    rounds.setup_process(args.threads)
    model, sampler = load_reference(args.model), reference_sampler(args.model)
    labels, seeds = [i % 10 for i in range(args.images)], list(range(args.seeds))
    with torch.no_grad():
        reference = [sampler(model, labels, num_steps=args.steps, seed=s).float() for s in seeds]
    rows = []
    for group, label, options in LEVERS + SECOND_ORDER:
        with (second_order_forecast() if group == "second-order forecast" else nullcontext()):
            row = measure(model, sampler, options, labels, args.steps, seeds, reference)
        rows.append({"group": group, "setting": label, "options": options, **row})
        logger.info("%s | %s: %.1f%% skipped, %.2f / %.2f dB", group, label, 100 * row["skipped"], row["psnr_mean"],
                    row["psnr_worst"])
    for family, label, make in front.peer_settings():
        try:
            row = measure_peer(make, model, sampler, labels, args.steps, seeds, reference)
        except Exception as exc:  # noqa: BLE001 - a peer that cannot run this model: its row says why
            rows.append({"group": "peer", "setting": f"{family} {label}", "error": f"{type(exc).__name__}: {exc}"[:160]})
            continue
        rows.append({"group": "peer", "setting": f"{family} {label}", **row})
        logger.info("peer | %s %s: %.1f%% skipped, %.2f / %.2f dB", family, label, 100 * row["skipped"],
                    row["psnr_mean"], row["psnr_worst"])
    command = f"python benchmarks/{Path(__file__).name} {shlex.join(sys.argv[1:])}"
    result = {"model": args.model, "images": args.images, "steps": args.steps, "seeds": seeds, "command": command,
              "device": f"CPU ({platform.machine()}), {torch.get_num_threads()} threads", "torch": torch.__version__,
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"front_levers_{args.model}"
    Path(f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
    lines = [f"### Levers of the high-speed front, reference {args.model}: quality at a skipped share", "",
             f"Command: `{command}`. {args.images} images x {args.steps} steps, {len(seeds)} seeds, eager lowering, "
             "no timing (speed follows the skipped share: see `front_{model}.md`); PSNR against the uncached images.", "",
             "| lever | setting | skipped | PSNR mean / worst image (dB) | per-seed means |",
             "| --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['group']} | {r['setting']} | could not run: {r['error']} | | |")
            continue
        sm = r["psnr_seed_means"]
        lines.append(f"| {r['group']} | {r['setting']} | {r['skipped']:.1%} | {r['psnr_mean']:.2f} / "
                     f"{r['psnr_worst']:.2f} | {min(sm):.1f}-{max(sm):.1f} |")
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
