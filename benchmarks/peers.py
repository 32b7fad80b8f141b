"""Ours against the peers as their users run them: eager and under torch.compile, interleaved.

    python benchmarks/peers.py --model flux --threads 2
    python benchmarks/peers.py --model dit --threads 2
    python benchmarks/peers.py --model sd3 --threads 2   # the held-out reference

Every method gets its own copy of the reference model and is compiled (and warmed up) before
any timing; then the methods are timed round-robin in one process (A, B, C, C, B, A, ...,
``--rounds`` rounds, every other one reversed), so load that comes and goes on the machine hits
every method and a rise or fall of it within a round favours none. Speed is the ratio of plain
Inductor's time to the method's within each round: the table gives the median over the rounds
and its min-max. ``--versus NAME`` adds a head-to-head column: each method's speed against the
named one, as the ratio of their timings in the same round (two ratios to a noisy baseline
carry the baseline's noise twice; this one does not carry it at all). PSNR (mean over the images, and the worst image) is
against plain Inductor's images of the same seed, over ``--quality-seeds`` seeds (the timed rounds'
seed, then one untimed generation per method and further seed): one seed's images share most of
their cache decisions, so the per-seed means (their min-max is in the table) show how much of a
PSNR gap between two methods is the seed's. Peers:

* cache-dit (https://github.com/vipshop/cache-dit) DBCache F1B0, warm-up 2, with and without
  its TaylorSeer calibrator (orders 1 and 2), eager and compiled the way its guide says
  (``cache_dit.enable_cache`` on the transformer, ``cache_dit.set_compile_configs()``, then
  ``torch.compile`` of the transformer). ``set_compile_configs`` changes process-wide Dynamo and
  Inductor settings, so with compiled cache-dit rows every compiled method of the run (ours and
  plain Inductor included) compiles under them: the table says so.
* diffusers' FirstBlockCache and TaylorSeer hooks, eager and compiled (``enable_cache`` then
  ``torch.compile``; the DiT and SD3 have no ``enable_cache``: the same hooks applied directly, see
  ``peer_caches.enable_diffusers_cache``), where the model supports them (a row that cannot run says why:
  FirstBlockCache on SD3, whose last joint block returns no text stream).

On SD3, cache-dit runs its registered SD3 layout (the joint blocks as Pattern_1) and its TaylorSeer
calibrator without the encoder (text-stream) calibrator, which has nothing to calibrate there
(``peer_caches.cache_dit_cache``).

Compiling a peer's cached Flux transformer makes Dynamo give up on the code object of
``FluxTransformer2DModel.forward`` for every instance of the class in the process: a model
compiled earlier (ours, plain Inductor) then recompiles block by block (ours falls back to plain
compilation, logged "no repeated sibling modules"). A user runs one of these tools per process;
here the copies of plain Inductor and ours get a forward with code objects of their own
(``adacorr_compile.lab.methods.own_forward``), so that all methods share one process and are timed round-robin
(the harness: :mod:`adacorr_compile.lab.rounds`, shared with ``benchmarks/front.py``).
``--group eager|compiled`` runs a part of the table.

Skipped blocks of a compiled peer are those of its eager twin (same decisions; the block hooks
that count them are not traced). Writes benchmarks/results/peers_<model>_<group>[_<--only words>][_versus].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import sys
from functools import partial
from pathlib import Path

import torch

from adacorr_compile.lab import peer_caches, rounds
from adacorr_compile.lab import methods as lab_methods
from adacorr_compile.lab.reference import load_reference
from adacorr_compile.lab.sampling import reference_sampler

RESULTS = Path(__file__).resolve().parent / "results"
logger = logging.getLogger("adacorr_compile.bench")
F1B0 = {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "max_warmup_steps": 2}


def methods(group: str) -> list[lab_methods.Method]:
    """``group="eager"``: plain Inductor, ours and the peers eager; ``"compiled"``: plain Inductor
    and the peers under ``torch.compile`` (a process of its own, see the module docstring)."""
    from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

    m = [lab_methods.inductor_baseline()]
    if group != "compiled":
        m += [lab_methods.ours("ours default", {}), lab_methods.ours("ours late_phase=None", {"late_phase": None}),
              lab_methods.ours("ours thr=0.1", {"reuse_threshold": 0.1}, 0.1),
              lab_methods.ours("ours thr=0.12", {"reuse_threshold": 0.12}, 0.12),
              lab_methods.ours("ours probe_forecast thr=0.06 cap=4",
                         {"probe_forecast": True, "reuse_threshold": 0.06, "max_consecutive_reuses": 4}, 0.06)]
    for compiled in {"eager": (False,), "compiled": (True,), "all": (False, True)}[group]:
        how = "compiled" if compiled else "eager"
        m.append(peer_caches.cache_dit_cache(f"cache-dit F1B0 thr=0.12, {how}", {**F1B0, "residual_diff_threshold": 0.12}, 0.12,
                                       compiled=compiled))
        for order in ((1, 2) if compiled else (1,)):
            m.append(peer_caches.cache_dit_cache(f"cache-dit F1B0 thr=0.12 + TaylorSeer O{order}, {how}",
                                           {**F1B0, "residual_diff_threshold": 0.12}, 0.12,
                                           taylorseer={"taylorseer_order": order}, compiled=compiled))
        m.append(peer_caches.diffusers_cache(f"diffusers FirstBlockCache thr=0.1, {how}", partial(FirstBlockCacheConfig, threshold=0.1),
                                       0.1, compiled=compiled))
        m.append(peer_caches.diffusers_cache(f"diffusers TaylorSeer interval=3, {how}",
                                       partial(TaylorSeerCacheConfig, cache_interval=3, disable_cache_before_step=2), 3,
                                       compiled=compiled))
    return m


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["dit", "flux", "sd3"], default="flux")
    parser.add_argument("--group", choices=["all", "eager", "compiled"], default="all",
                        help="all methods (default), or plain Inductor with ours and the peers eager, or with the peers compiled")
    parser.add_argument("--only", nargs="*", default=None,
                        help="run only the methods whose name contains one of these (plain Inductor always runs): one "
                             "compiled peer per process keeps the baseline clean (see the module docstring)")
    rounds.add_run_arguments(parser, images=10, steps=50, rounds=3, quality_seeds=5)
    parser.add_argument("--versus", default=None,
                        help="a method (the first whose name contains this): every row also gets its speed against that "
                             "method's, as the per-round ratio of their two adjacent timings (median, min-max)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rounds.setup_process(args.threads)  # cache-dit's compile settings, process-wide (see the docstring)
    model = load_reference(args.model)
    labels = [i % 10 for i in range(args.images)]
    chosen = [m for m in methods(args.group)
              if m.kind == "baseline" or args.only is None or any(word in m.name for word in args.only)]
    run = rounds.build(model, chosen, reference_sampler(args.model), labels, args.steps, args.seed)
    built, failed = run.built, run.failed
    # graphs compiled during the timed rounds are counted per method (a column), not forbidden:
    # a compiled peer that recompiles as its hooks' state changes is what its users get
    times, images, skipped, recompiles = rounds.timed_rounds(run, args.rounds)
    base_name = lab_methods.inductor_baseline().name
    seeds = [args.seed + i for i in range(max(1, args.quality_seeds))]
    by_seed = rounds.quality_images(run, images, seeds)  # quality only, untimed: the PSNR's spread over seeds
    versus = None if args.versus is None else next((n for n in built if args.versus in n), None)
    if args.versus is not None and versus is None:
        logger.info("--versus %r: no method of this run has it in its name; no head-to-head column", args.versus)
    rows = []
    for name in built:
        row = rounds.score(name, by_seed, base_name, times)
        rows.append({"method": name, "skipped": skipped.get(name), **{k: v for k, v in row.items() if k != "method"},
                     "recompiles_timed": recompiles[name]})
        if versus is not None:
            rows[-1].update(versus=versus, **dict(zip(("speed_vs", "speed_vs_min", "speed_vs_max"),
                                                      rounds.per_round(times[versus], times[name]))))
    device = f"CPU ({platform.machine()}), {torch.get_num_threads()} threads"
    result = {"model": args.model, "images": args.images, "steps": args.steps, "rounds": args.rounds, "seeds": seeds, "device": device,
              "torch": torch.__version__, "command": shlex.join(sys.argv), "rows": rows, "could_not_run": failed}
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "" if args.only is None else "_" + "_".join("".join(c if c.isalnum() else "-" for c in w) for w in args.only)
    stem = args.out / f"peers_{args.model}_{args.group}{tag}{'_versus' if versus else ''}"
    Path(f"{stem}.json").write_text(json.dumps(result, indent=1))
    lines = [f"### Ours and the peers, reference {args.model}, {args.images} images x {args.steps} steps, {device}", "",
             f"Command: `python benchmarks/{Path(__file__).name} {shlex.join(sys.argv[1:])}`. Methods timed round-robin in one "
             f"process, {args.rounds} rounds, every other one in reverse order; speed = plain Inductor's time / the method's, per round (median, min-max); "
             f"PSNR against plain Inductor's images of the same seed, over {len(seeds)} seeds ({len(seeds) * args.images} "
             "images): mean and worst image, and the per-seed means (min-max). Compiled methods use cache-dit's "
             "`set_compile_configs()` (all of them).", "",
             "| method | skipped | PSNR mean / worst (dB) | per-seed mean PSNR (min-max) | SSIM | speed vs plain Inductor (min-max) "
             "| graphs compiled while timed |" + (f" speed vs {versus} (min-max) |" if versus else ""),
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if versus else "")]
    for row in rows:
        sk = "-" if row["skipped"] is None else f"{row['skipped']:.1%}"
        sm = row["psnr_seed_means"]
        lines.append(f"| {row['method']} | {sk} | {row['psnr_mean']:.1f} / {row['psnr_worst']:.1f} | {min(sm):.1f}-{max(sm):.1f} | "
                     f"{row['ssim']:.3f} | {row['speedup']:.2f}x ({row['speedup_min']:.2f}-{row['speedup_max']:.2f}) | "
                     f"{row['recompiles_timed']} |" + (f" {row['speed_vs']:.2f}x ({row['speed_vs_min']:.2f}-{row['speed_vs_max']:.2f}) |"
                                                       if versus else ""))
    for name, reason in failed.items():
        lines.append(f"| {name} | could not run: {reason} | | | | | |" + (" |" if versus else ""))
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
