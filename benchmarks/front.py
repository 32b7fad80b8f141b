"""The quality/speed front: our settings against the peers' stronger settings, every method compiled.

    python benchmarks/front.py --model flux --threads 1
    python benchmarks/front.py --model dit --threads 1
    python benchmarks/front.py --model sd3 --threads 1   # the held-out reference

The harness is ``benchmarks/peers.py``'s (:mod:`adacorr_compile.lab.rounds`): each method on its own
copy of the reference model, compiled and warmed up with a whole generation before any timing,
then timed round-robin in one process (A, B, C, C, B, A, ...), speed = plain Inductor's time /
the method's within each round (median and min-max over the rounds), PSNR (mean over the images
of all seeds, the worst image, the per-seed means) and SSIM against plain Inductor's images of the
same seeds. All methods compile under cache-dit's ``set_compile_configs()``.

Swept: ours (the front grid ``adacorr_compile.calibrate.FRONT_SETTINGS`` that ``adacorr calibrate
--target-speed`` picks from: ``reuse_threshold``, ``max_consecutive_reuses``, ``late_phase`` on /
None, ``late_extra_reuses``, ``final_steps``, and ``policy="first_block"``: FBCache's decision rule
with our forecast; and, as levers measured against one of its points,
``forecast`` none and ``probe_forecast``) and the peers at their stronger settings:
cache-dit DBCache (F1B0 and F1B1, ``residual_diff_threshold`` 0.12 to 0.4) plain and with its
TaylorSeer (orders 1 and 2) and FoCa calibrators, diffusers' FirstBlockCache at a larger
threshold (not on SD3: its last block drops the text stream). The reference models have 6 to 8
blocks, so F8B0-style settings (8 front blocks computed) would cache nothing. diffusers' MagCache
is not swept: it needs per-model ``mag_ratios`` from a calibration pass of its own.

A compiled peer's skipped share is its eager twin's (the same cache on a copy of the model, one
untimed generation with hooks on the blocks; compiled code runs no Python hooks).

Speed levels: from 1.5x in steps of 0.5x up to the highest median speed a peer reaches (and that
speed itself), our best mean PSNR among our settings at least that fast against the peers' best
(mean and worst image; where our best mean is behind on the worst image, the best of ours at
least as good as the peer in both, if one is; "within spread" where ours is below the peer's
mean but not below its worst per-seed mean).

LPIPS is not reported: both CPU implementations (the ``lpips`` package and torchmetrics' LPIPS)
need pretrained backbone weights (AlexNet / VGG from torchvision) downloaded at first use, which
this machine cannot do; PSNR and SSIM are what the table has.

Writes benchmarks/results/front_<model>.{json,md,png}; ``--render front_<model>.json`` rewrites them from
the saved rows (after a change of how the fronts are compared), running nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
from functools import partial
from pathlib import Path
from typing import Any

import torch

from adacorr_compile.calibrate import FRONT_SETTINGS
from adacorr_compile.lab import fronts, peer_caches, plots, rounds
from adacorr_compile.lab import methods as lab_methods
from adacorr_compile.lab.reference import load_reference
from adacorr_compile.lab.sampling import reference_sampler

RESULTS = Path(__file__).resolve().parent / "results"
OURS = "ours (adacorr)"
LPIPS_NOTE = ("LPIPS: not reported. The `lpips` package and torchmetrics' LPIPS both load pretrained AlexNet/VGG "
              "weights (torchvision downloads them at first use); this machine has no network and no such weights, "
              "and an LPIPS with untrained weights would not be LPIPS.")

# our settings: (label, options); the default first. The front grid that `adacorr calibrate
# --target-speed` sweeps (adacorr_compile.calibrate.FRONT_SETTINGS), then the levers measured
# against its "thr=0.25, cap=6" point: one threshold and cap throughout, no forecast, the probe's forecast.
OUR_SETTINGS: list[tuple[str, dict[str, Any]]] = [
    *FRONT_SETTINGS,
    ("thr=0.25, cap=6, late_phase=None", {"reuse_threshold": 0.25, "max_consecutive_reuses": 6, "late_phase": None}),
    ("thr=0.25, cap=6, forecast=none", {"reuse_threshold": 0.25, "max_consecutive_reuses": 6, "forecast": "none"}),
    ("thr=0.25, cap=6, probe_forecast", {"reuse_threshold": 0.25, "max_consecutive_reuses": 6, "probe_forecast": True}),
]

# the peers: (family, setting label, factory of the method given compiled=True/False)
F1B0 = {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "max_warmup_steps": 2}
F1B1 = {"Fn_compute_blocks": 1, "Bn_compute_blocks": 1, "max_warmup_steps": 2}


def _dbcache(fn_bn: dict[str, int], thr: float, calibrator: str | None = None, order: int = 1):
    """A cache-dit DBCache peer factory: ``compiled -> Method``."""
    fields = None if calibrator is None else ({"taylorseer_order": order} if calibrator == "TaylorSeer" else {})

    def make(name: str, compiled: bool) -> lab_methods.Method:
        return peer_caches.cache_dit_cache(name, {**fn_bn, "residual_diff_threshold": thr}, thr, taylorseer=fields,
                                           compiled=compiled, calibrator=calibrator or "TaylorSeer")
    return make


def _first_block_cache(thr: float):
    from diffusers import FirstBlockCacheConfig

    def make(name: str, compiled: bool) -> lab_methods.Method:
        return peer_caches.diffusers_cache(name, partial(FirstBlockCacheConfig, threshold=thr), thr, compiled=compiled)
    return make


def peer_settings() -> list[tuple[str, str, Any]]:
    ts = "cache-dit DBCache + TaylorSeer"
    return [
        ("cache-dit DBCache", "F1B0 thr=0.12", _dbcache(F1B0, 0.12)),
        ("cache-dit DBCache", "F1B0 thr=0.3", _dbcache(F1B0, 0.3)),
        (ts, "F1B0 thr=0.12 O1", _dbcache(F1B0, 0.12, "TaylorSeer", 1)),
        (ts, "F1B0 thr=0.24 O1", _dbcache(F1B0, 0.24, "TaylorSeer", 1)),
        (ts, "F1B0 thr=0.4 O1", _dbcache(F1B0, 0.4, "TaylorSeer", 1)),
        (ts, "F1B0 thr=0.24 O2", _dbcache(F1B0, 0.24, "TaylorSeer", 2)),
        (ts, "F1B1 thr=0.24 O1", _dbcache(F1B1, 0.24, "TaylorSeer", 1)),
        ("cache-dit DBCache + FoCa", "F1B0 thr=0.24", _dbcache(F1B0, 0.24, "FoCa")),
        ("diffusers FirstBlockCache", "thr=0.3", _first_block_cache(0.3)),
    ]


def _table(rows: list[dict[str, Any]], failed: list[dict[str, str]]) -> list[str]:
    lines = ["| method | setting | skipped | speed vs plain Inductor, median (min-max) | PSNR mean / worst image (dB) "
             "| per-seed mean PSNR (min-max) | SSIM |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in sorted(rows, key=lambda r: (r["family"] != OURS, r["family"], r["speedup"])):
        sk = "-" if row["skipped"] is None else f"{row['skipped']:.1%}"
        sm = row["psnr_seed_means"]
        lines.append(f"| {row['family']} | {row['setting']} | {sk} | {row['speedup']:.2f}x ({row['speedup_min']:.2f}-"
                     f"{row['speedup_max']:.2f}) | {row['psnr_mean']:.1f} / {row['psnr_worst']:.1f} | "
                     f"{min(sm):.1f}-{max(sm):.1f} | {row['ssim']:.3f} |")
    lines += [f"| {f['family']} | {f['setting']} | could not run: {f['reason']} | | | | |" for f in failed]
    return lines


def _levels_table(levels: list[dict[str, Any]]) -> list[str]:
    def side(x: dict[str, Any] | None) -> str:
        if x is None:
            return "-"
        return f"{x['psnr_mean']:.1f} / {x['psnr_worst']:.1f} ({x['method']}, {x['speedup']:.2f}x)"

    lines = ["| at least | ours: best PSNR mean / worst (setting, speed) | peers: best PSNR mean / worst (setting, speed) "
             "| ours vs peers |", "| ---: | --- | --- | --- |"]
    lines += [f"| {e['level']:g}x | {side(e['ours'])} | {side(e['peer'])} | {e['verdict']} |" for e in levels]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["dit", "flux", "sd3"], default="flux")
    # fewer images than peers.py's default (10): 30 methods on a CPU budget; 8 quality seeds (64 images), as the
    # verdicts at a level moved with the seeds at 4 (a quality seed costs one untimed generation per method)
    rounds.add_run_arguments(parser, images=8, steps=50, rounds=9, quality_seeds=8)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--render", type=Path, default=None, metavar="FRONT.json",
                        help="run nothing: recompute the fronts and levels of a saved run's rows, rewrite its .json/.md/.png")
    args = parser.parse_args()
    if args.render is not None:
        print(render(json.loads(args.render.read_text()), args.render.with_suffix("")))
        return 0
    rounds.setup_process(args.threads)
    model = load_reference(args.model)
    sampler = reference_sampler(args.model)
    labels = [i % 10 for i in range(args.images)]

    families: dict[str, tuple[str, str]] = {lab_methods.inductor_baseline().name: ("plain Inductor", "uncached")}
    chosen = [lab_methods.inductor_baseline()]
    for label, options in OUR_SETTINGS:
        chosen.append(lab_methods.ours(f"ours {label}", options, options.get("reuse_threshold")))
        families[chosen[-1].name] = (OURS, label)
    eager_twins = {}
    for family, label, make in peer_settings():
        name = f"{family} {label}, compiled"
        chosen.append(make(name, True))
        families[name] = (family, label)
        eager_twins[name] = make(f"{family} {label}, eager", False)
    run = rounds.build(model, chosen, sampler, labels, args.steps, args.seed)
    twins: dict[str, float | None] = {}
    for name, twin in eager_twins.items():
        if name in run.built:
            try:
                twins[name] = rounds.eager_skipped_share(twin, model, sampler, labels, args.steps, args.seed)
            except Exception as exc:  # noqa: BLE001 - the skipped share is then unknown, the row stays
                rounds.logger.info("%s: eager twin failed (%s): skipped share unknown", name, exc)
                twins[name] = None
    times, images, skipped, recompiles = rounds.timed_rounds(run, args.rounds, twins)
    base_name = lab_methods.inductor_baseline().name
    seeds = [args.seed + i for i in range(max(1, args.quality_seeds))]
    by_seed = rounds.quality_images(run, images, seeds)
    rows = []
    for name in run.built:
        if name == base_name:
            continue
        family, setting = families[name]
        rows.append({**rounds.score(name, by_seed, base_name, times), "family": family, "setting": setting,
                     "skipped": skipped.get(name), "options": run.built[name][0].options,
                     "recompiles_timed": recompiles[name]})
    device = f"CPU ({platform.machine()}), {torch.get_num_threads()} threads"
    failed = [{"method": name, "family": families[name][0], "setting": families[name][1], "reason": reason}
              for name, reason in run.failed.items()]
    result = {"model": args.model, "images": args.images, "steps": args.steps, "rounds": args.rounds, "seeds": seeds,
              "methods": len(run.built), "device": device, "torch": torch.__version__,
              "command": f"python benchmarks/{Path(__file__).name} {shlex.join(sys.argv[1:])}",
              "baseline_seconds": times[base_name], "rows": rows, "could_not_run": failed, "lpips": LPIPS_NOTE}
    args.out.mkdir(parents=True, exist_ok=True)
    print(render(result, args.out / f"front_{args.model}"))
    return 0


def render(result: dict[str, Any], stem: Path) -> str:
    """The fronts of a run's ``result`` (its rows): each family's Pareto front, the per-level
    comparison, written to ``stem``.json (with them), .md and .png; returns the markdown."""
    rows = result["rows"]
    ours = [r for r in rows if r["family"] == OURS]
    peers = [r for r in rows if r["family"] != OURS]
    top = max((r["speedup"] for r in peers), default=float("nan"))
    result["levels"] = levels = fronts.compare_levels(ours, peers, fronts.speed_levels(top))
    result["pareto_by_family"] = {f: [r["method"] for r in fronts.pareto([r for r in rows if r["family"] == f])]
                                  for f in dict.fromkeys(r["family"] for r in rows)}
    Path(f"{stem}.json").write_text(json.dumps(result, indent=1))
    n_seeds, device = len(result["seeds"]), result["device"]
    plots.front_plot(rows, f"{stem}.png", f"reference {result['model']}: {result['images']} images x {result['steps']} "
                                          f"steps, {n_seeds} seeds, {device}; lines: each family's Pareto front")
    sizes = (f"{result['images']} images x {result['steps']} steps, {result['rounds']} timed rounds, {n_seeds} quality "
             f"seeds ({n_seeds * result['images']} images)")
    lines = [f"### Quality/speed front, reference {result['model']}, {sizes}, {device}", "",
             f"Command: `{result['command']}` ({result['images']} images per generation, peers.py's 10, to fit a CPU budget). "
             f"{result['methods']} methods, all compiled (cache-dit's `set_compile_configs()`), timed round-robin in one "
             "process, every other round in reverse; speed = plain Inductor's time / the method's per round (median, "
             "min-max); PSNR and SSIM against plain Inductor's images of the same seeds. Skipped share of a compiled "
             "peer: its eager twin's (one untimed generation).", "", *_table(rows, result["could_not_run"]), "",
             f"Ours vs the peers' best at each speed level (1.5x up to the fastest peer, {top:.2f}x): the best mean PSNR "
             "among the settings whose median speed is at least the level (ours: where that one is behind on the "
             "worst image and another of ours at the level is at least as good as the peer in both, that one). The medians carry the load of a shared "
             "machine (see each row's min-max): a setting a few percent under a level is not slower in a way this "
             "run can tell.", "", *_levels_table(levels), "", result["lpips"], ""]
    Path(f"{stem}.md").write_text("\n".join(lines))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
