"""``adacorr demo``: the reference DiT sampled with and without the adacorr backend.

A subcommand of :mod:`adacorr_compile.cli` that lives in the lab: it needs the ``lab`` extra
(``pip install "adacorr_compile[lab]"``), checked before it loads anything.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path
from typing import Any

from ..cli_common import parse_option
from ..extras import require_lab

logger = logging.getLogger("adacorr_compile")


def _guidance(text: str) -> float:
    require_lab("adacorr demo")
    from .sampling import check_guidance_scale

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0 (1 = no guidance), got {text!r}") from None
    try:
        return check_guidance_scale(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def default_out() -> Path:
    """Where the demo writes by default: ``$XDG_CACHE_HOME/adacorr/demo`` (else
    ``~/.cache/adacorr/demo``), outside any checkout."""
    import os

    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "adacorr" / "demo"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="sample the built-in reference DiT with and without caching; print a table, save grids")
    p.add_argument("--out", default=None,
                   help="folder for the PNG grids, heatmap and JSON (default: ~/.cache/adacorr/demo, or under $XDG_CACHE_HOME)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default: %(default)s)")
    p.add_argument("--images", type=int, default=10, help="images, one class after another (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=_guidance, default=None,
                   help="classifier-free guidance scale (default: the DiT sampler's, 1.5)")
    p.add_argument("--option", action="append", default=[], type=parse_option, metavar="KEY=VALUE",
                   help="an adacorr option for the cached run (repeatable), e.g. --option reuse_threshold=0.1")
    p.add_argument("--lowering", default="inductor", choices=["inductor", "eager"],
                   help="inductor: plain torch.compile vs the adacorr backend; eager: the eager model vs the "
                        "backend with eager lowering (default: %(default)s)")
    p.add_argument("--reps", type=int, default=5,
                   help="timed pairs (uncached, then cached: interleaved in this process); the median of the per-pair "
                        "speed ratios is reported, with its min-max spread (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    require_lab("adacorr demo")  # before anything loads: the reference models, samplers and plots are the lab's
    from functools import partial

    import torch

    from . import bench, methods, metrics, plots
    from ..config import AdaCorrConfig
    from .reference import load_reference_classifier, load_reference_dit
    from .sampling import DIT_GUIDANCE_SCALE, sample_dit, save_grid

    if args.reps < 1:
        raise ValueError(f"--reps got {args.reps}; expected an int >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    options = {"lowering": args.lowering, **dict(args.option)}
    cfg = AdaCorrConfig.from_options(options)  # bad options fail here, with the option named
    out = Path(args.out) if args.out is not None else default_out()
    out.mkdir(parents=True, exist_ok=True)
    model = load_reference_dit()
    classifier = load_reference_classifier()
    labels = [i % 10 for i in range(args.images)]
    guidance = DIT_GUIDANCE_SCALE if args.guidance is None else args.guidance
    sampler = partial(sample_dit, guidance_scale=guidance)

    # "without the backend": plain torch.compile (Inductor), or the eager model for --lowering eager;
    # timed interleaved with the cached run: uncached, cached, uncached, cached, ... in this process
    base_method = methods.inductor_baseline() if args.lowering == "inductor" else methods.eager_baseline()
    logger.info("sampling %d images, %d steps: %s and adacorr, %d interleaved pairs", len(labels), args.steps,
                base_method.name, args.reps)
    cached = bench.run_method(methods.ours("adacorr", options), model, sampler, labels, args.steps, args.seed,
                              reps=args.reps, progress=True, baseline=base_method)
    base_images = cached.baseline_images
    q = metrics.quality(cached.images, base_images, labels, classifier)
    q_base = metrics.quality(base_images, base_images, labels, classifier)
    save_grid(base_images, out / "uncached.png", nrow=min(10, len(labels)), scale=4)
    save_grid(cached.images, out / "adacorr.png", nrow=min(10, len(labels)), scale=4)
    diff = (cached.images - base_images).abs().clamp(0, 1) * 2 - 1
    save_grid(diff, out / "difference.png", nrow=min(10, len(labels)), scale=4)
    setting = (f"policy={cfg.policy}, scope={cfg.scope}, correction={cfg.correction}, forecast={cfg.forecast}, "
               f"reuse_threshold={cfg.reuse_threshold}")
    plots.lambda_heatmap(cached.stats, str(out / "lambda_heatmap.png"), f"reference DiT, {args.steps} steps, {setting}")

    base_seconds = statistics.median(cached.baseline_seconds)
    speedup = cached.speedup
    low, high = cached.speedup_spread
    rows = [
        (base_method.name, base_seconds, "1.00x", 0.0, float("inf"), 1.0, q_base["class_accuracy"]),
        ("adacorr", cached.median_seconds, f"{speedup:.2f}x ({low:.2f}-{high:.2f})", cached.skipped_fraction,
         q["psnr_mean"], q["ssim_mean"], q["class_accuracy"]),
    ]
    header = (f"{'run':<17} {'time (s)':>9} {'speedup (min-max)':>18} {'blocks skipped':>15} {'PSNR (dB)':>10} "
              f"{'SSIM':>6} {'class acc':>9}")
    lines = [header, "-" * len(header)]
    for name, sec, sp, skip, psnr, ssim, acc in rows:
        lines.append(f"{name:<17} {sec:>9.2f} {sp:>18} {skip:>14.1%} {psnr:>10.2f} {ssim:>6.3f} {acc:>9.2f}")
    print("\n".join(lines))
    print(f"speedup: median of {len(cached.ratios)} per-pair ratios (uncached / cached, timed interleaved), "
          f"min-max {low:.2f}-{high:.2f}; times: medians; {torch.get_num_threads()} threads")
    print(f"worst-image PSNR {q['psnr_min']:.2f} dB; compile {cached.compile_seconds:.1f} s (not in the times)")
    print(f"wrote {out}/uncached.png, adacorr.png, difference.png, lambda_heatmap.png, demo.json")
    (out / "demo.json").write_text(json.dumps({
        "options": options, "steps": args.steps, "labels": labels, "guidance": guidance,
        "uncached_seconds": base_seconds, "adacorr_seconds": cached.median_seconds, "speedup": speedup,
        "speedup_min": low, "speedup_max": high, "speedup_pairs": cached.ratios,
        "uncached_seconds_all": cached.baseline_seconds, "adacorr_seconds_all": cached.seconds,
        "threads": torch.get_num_threads(),
        "blocks_skipped": cached.skipped_fraction, "quality": q, "uncached_class_accuracy": q_base["class_accuracy"],
    }, indent=2))
    return 0
