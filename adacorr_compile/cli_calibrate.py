"""``adacorr calibrate``: the backend setting for a model and a quality target, in one command.

::

    adacorr calibrate --model reference-dit --target-psnr 30 --seeds 2 --out calib.json
    adacorr calibrate --model mypkg.models:make --steps 30 --thresholds 0.04 0.08 0.15 --rule worst
    adacorr calibrate --model reference-flux --target-speed 3 --reps 2      # picks from the front grid
    adacorr calibrate --model reference-flux --target-speed 2.5 --variant max_consecutive_reuses=6 --reps 2
    torch.compile(model, backend="adacorr", options=adacorr_compile.load_options("calib.json"))

``--model``: ``reference-dit`` / ``reference-flux`` / ``reference-sd3`` (the built-in reference models, sampled as
the benchmark samples them: ``--images`` images of classes 0..9, ``--steps`` steps, the
sampler's guidance), a tiny family (``dit``, ``flux``, ...; random weights) or
``package.module:factory`` returning ``(model, inputs)`` with ``inputs(step, t)`` giving one
step's forward keyword arguments: each generation is then a plain loop of ``--steps`` calls
with a timestep falling from 1000 (:func:`adacorr_compile.calibrate.factory_workload`). The reference
models, the tiny families, the scoring and the plot need the ``lab`` extra
(``pip install "adacorr_compile[lab]"``); without it the command says so and exits (code 2).
``--target-psnr`` (the setting that skips most at that PSNR) and ``--target-speed`` (the setting
with the highest PSNR among those whose measured speed reaches it: by default read from one cost
model fitted to all the timed interleaved (uncached, cached) pairs of the sweep, ``--speed-measure
median`` for each setting's own median) are exclusive. With ``--target-speed`` and neither
``--thresholds`` nor ``--variant`` (or with ``--front``) the sweep is the front grid
(:data:`adacorr_compile.calibrate.FRONT_SETTINGS`, two compiles): the settings of ours on the measured
quality/speed fronts, from the default to the most aggressive, so a speed target up to about 3.5x
has settings that reach it. Prints the table and the chosen options; writes the JSON and a Pareto plot beside it
(``calib.png``). Exit code 0 when a setting met the target, 1 when none did (the file then
holds caching off, ``policy="never"``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from .cli_common import load_factory, parse_option, positive_int, speed_factor

logger = logging.getLogger("adacorr_compile")


def add_parser(sub: Any) -> None:
    from .calibrate import DEFAULT_THRESHOLDS, RULES, SPEED_MEASURES
    from .lab.workloads import REFERENCE_MODELS  # the names only (torch): the lab's packages load when it runs

    p = sub.add_parser("calibrate", help="sweep thresholds on a model, pick the setting that skips most at a PSNR target, "
                                         "write it as JSON (load with adacorr_compile.load_options)")
    p.add_argument("--model", default="reference-dit",
                   help=f"{' | '.join(REFERENCE_MODELS)} | a tiny family (dit, flux, plain, ...) | package.module:factory "
                        "(returns (model, inputs) with inputs(step, t) -> forward kwargs) (default: %(default)s)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target-psnr", type=float, default=None, help="PSNR (dB) against the uncached outputs that the "
                        "setting must reach; the one that skips most is chosen (default: 30 unless --target-speed)")
    target.add_argument("--target-speed", type=speed_factor, default=None, metavar="X",
                        help="speed over the uncached model (> 1) that the setting must reach; the one with the highest "
                             "PSNR (by --rule) is chosen. The speed is measured, from the timed interleaved (uncached, "
                             "cached) pairs, as --speed-measure says")
    p.add_argument("--speed-measure", choices=SPEED_MEASURES, default="fitted",
                   help="with --target-speed: fitted: each setting's speed from one cost model (time linear in the share "
                        "of blocks computed) fitted to every pair of the sweep, robust to a pair that load slowed; "
                        "median: the median of the setting's own --seeds x --reps pairs (default: %(default)s)")
    p.add_argument("--rule", choices=RULES, default="mean",
                   help="mean: the mean over seeds must reach the target; worst: the worst seed must (default: %(default)s)")
    p.add_argument("--seeds", type=positive_int, default=2, help="seeds 0..N-1, one generation each per setting "
                   "(default: %(default)s)")
    p.add_argument("--thresholds", type=float, nargs="+", default=None,
                   help=f"reuse_threshold values to sweep (default: {' '.join(map(str, DEFAULT_THRESHOLDS))}; with "
                        "--target-speed alone: the front grid, see --front)")
    p.add_argument("--front", action="store_true",
                   help="sweep the front grid (adacorr_compile.calibrate.FRONT_SETTINGS: the settings of ours on the "
                        "measured quality/speed fronts, from the default to about 3.5x) instead of thresholds; the "
                        "default with --target-speed when neither --thresholds nor --variant is given")
    p.add_argument("--variant", action="append", default=[], type=parse_option, metavar="KEY=VALUE",
                   help="also sweep the thresholds with this option changed (repeatable: each is its own variant), "
                        "e.g. --variant forecast=none --variant scope=block")
    p.add_argument("--option", action="append", default=[], type=parse_option, metavar="KEY=VALUE",
                   help="a base option of every compile (repeatable), e.g. --option lowering=eager")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="denoising steps (default: 50 for the reference models, 20 for a factory)")
    p.add_argument("--images", type=positive_int, default=10, help="images per generation, reference models only "
                   "(default: %(default)s)")
    p.add_argument("--reps", type=positive_int, default=1, help="timed (uncached, cached) pairs per seed and setting "
                   "(default: %(default)s)")
    p.add_argument("--out", default="calib.json", help="the JSON file; the plot goes beside it as .png (default: %(default)s)")
    p.add_argument("--no-plot", action="store_true", help="do not write the Pareto plot")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.set_defaults(func=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    import torch

    from .calibrate import DEFAULT_THRESHOLDS, calibrate, factory_workload, front_variants
    from .config import AdaCorrConfig
    from .extras import require_lab
    from .lab.workloads import REFERENCE_MODELS, reference_workload

    if args.threads:
        torch.set_num_threads(args.threads)
    options = dict(args.option)
    AdaCorrConfig.from_options(options)  # a bad option fails here, named
    front = args.front or (args.target_speed is not None and args.thresholds is None and not args.variant)
    if front and (args.thresholds is not None or args.variant):
        print("adacorr calibrate: error: argument --front: it sweeps its own grid of settings; drop --thresholds and "
              "--variant (or --front)", file=sys.stderr)
        return 2
    thresholds = list(DEFAULT_THRESHOLDS) if args.thresholds is None else args.thresholds
    variants = front_variants() if front else [{}] + [{key: value} for key, value in args.variant]
    n_settings = len(variants) if front else len(thresholds) * len(variants)
    if args.model in REFERENCE_MODELS:
        require_lab(f"adacorr calibrate --model {args.model}")
        steps = args.steps or 50
        work = reference_workload(args.model, steps=steps, images=args.images)
        what = f"{args.model}: {args.images} images x {steps} steps per generation"
    else:
        steps = args.steps or 20
        model, inputs = load_factory(args.model)()
        work = factory_workload(model, inputs, steps=steps)
        what = f"{args.model}: {steps} calls per generation, timestep falling from 1000"
    target_psnr = 30.0 if args.target_psnr is None else args.target_psnr
    target = (f"target speed {args.target_speed:g}x ({args.speed_measure}; highest PSNR {args.rule})"
              if args.target_speed is not None
              else f"target PSNR {target_psnr:g} dB ({args.rule})")
    grid = "the front grid" if front else "thresholds x variants"
    print(f"calibrating {what}; {args.seeds} seeds, {n_settings} settings ({grid}), "
          f"{target}, {torch.get_num_threads()} threads", flush=True)
    result = calibrate(
        *work, target_psnr=target_psnr, target_speed=args.target_speed, speed_measure=args.speed_measure, rule=args.rule, seeds=range(args.seeds), thresholds=thresholds,
        variants=variants, options=options, reps=args.reps, out=args.out, plot=not args.no_plot,
        command=" ".join(["adacorr", *getattr(args, "argv", sys.argv[1:])]),
    )
    print(result.format_table())
    print(f"uncached reference: {result.uncached}; speedup: median (min-max) of per-pair ratios uncached/cached, timed "
          f"interleaved; {result.compiles_in_sweep} compiles during the sweep; {result.seconds:.0f} s in all")
    if result.met:
        print(f"chosen: {result.chosen['setting']} ({result.chosen['skipped']:.1%} skipped, PSNR "
              f"{result.chosen['psnr_mean']:.2f} dB mean, {result.chosen['psnr_worst_seed']:.2f} dB worst seed, "
              f"{result.chosen['speedup']:.2f}x median, {result.chosen['speed_fitted']:.2f}x fitted)")
    else:
        print(f"NO SETTING MET THE TARGET ({result.target}): the file holds caching off")
    print(f"options: {json.dumps(result.options)}")
    print(f"wrote {', '.join(result.paths.values())}; use: torch.compile(model, backend=\"adacorr\", "
          f"options=adacorr_compile.load_options({str(args.out)!r}))")
    return 0 if result.met else 1
