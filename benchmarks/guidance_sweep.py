"""Classifier-free guidance scale vs sample quality and trajectory stability of the reference models.

Chooses the samplers' default guidance (``DIT_GUIDANCE_SCALE`` / ``FLUX_GUIDANCE_SCALE``
in ``adacorr_compile.lab.sampling``). For each model and scale, uncached eager sampling
(50 steps by default):

* quality: class accuracy of 10 samples per class under the project's classifier and
  the FID proxy (classifier features) against 2000 held-out images;
* stability: the 10 benchmark images (one per class, seed 0) sampled again with the
  sample nudged by Gaussian noise of std 1e-4 after the first step; PSNR between the
  two runs (mean and worst image). A trajectory that float32 round-off can move this
  far makes "PSNR of the cached output vs the uncached one" measure chaos, not caching.

    python benchmarks/guidance_sweep.py --model both --threads 2

Writes ``guidance_sweep.{json,md}`` under ``--out`` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch

from adacorr_compile.lab.metrics import psnr_ssim
from adacorr_compile.lab.reference import HELDOUT_SEED, load_reference_classifier, load_reference_dit, load_reference_flux, make_dataset
from adacorr_compile.lab.reference.classifier import class_accuracy, fid_proxy
from adacorr_compile.lab.sampling import DEFAULT_GUIDANCE, sample_dit, sample_flux

logger = logging.getLogger("guidance_sweep")
RESULTS = Path(__file__).resolve().parent / "results"
NUDGE = 1e-4


def nudged_after_first_step(seed: int):
    """A sampler callback adding N(0, NUDGE^2) noise to the sample after step 0."""
    gen = torch.Generator().manual_seed(seed)

    def callback(i, t, x):
        if i == 0:
            x.add_(NUDGE * torch.randn(x.shape, generator=gen).to(x))
    return callback


def sweep(name: str, args: argparse.Namespace, held) -> list[dict]:
    model = (load_reference_dit(args.weights) if name == "dit" else load_reference_flux(args.weights)).eval()
    sampler = sample_dit if name == "dit" else sample_flux
    classifier = load_reference_classifier()
    labels = torch.arange(10).repeat(args.per_class)
    rows = []
    for scale in args.scales:
        t0 = time.perf_counter()
        chunks = [sampler(model, labels[i:i + 50], num_steps=args.steps, guidance_scale=scale, seed=i // 50)
                  for i in range(0, labels.shape[0], 50)]
        images = torch.cat(chunks)
        # the first 10 images of chunk 0 are the benchmark's images (classes 0-9, seed 0)
        nudged = sampler(model, labels[:10], num_steps=args.steps, guidance_scale=scale, seed=0,
                         callback=nudged_after_first_step(args.seed))
        stab = torch.tensor(psnr_ssim(nudged, images[:10])[0])
        row = {"model": name, "guidance": scale, "class_accuracy": class_accuracy(classifier, images, labels),
               "fid_proxy": fid_proxy(classifier, images, held), "nudge_psnr_mean": float(stab.mean()),
               "nudge_psnr_min": float(stab.min()), "seconds": time.perf_counter() - t0}
        logger.warning("%s guidance %.1f: %s", name, scale, {k: round(v, 3) for k, v in row.items() if isinstance(v, float)})
        rows.append(row)
    return rows


def markdown(result: dict) -> str:
    lines = ["# Guidance scale vs sample quality and trajectory stability", "",
             f"Command: `{result['command']}`", "",
             f"{result['device']}, torch {result['torch']}; uncached eager, {result['steps']} steps, "
             f"{result['per_class']} samples per class (class accuracy, FID proxy vs 2000 held-out), "
             f"stability: the 10 benchmark images re-sampled with a N(0, {NUDGE:g}^2) nudge after the first step. "
             f"Defaults: DiT {DEFAULT_GUIDANCE['dit']:g}, Flux {DEFAULT_GUIDANCE['flux']:g}.", "",
             "| model | guidance | class accuracy | FID proxy | nudged vs not: PSNR mean (dB) | worst (dB) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        mark = " (default)" if r["guidance"] == DEFAULT_GUIDANCE[r["model"]] else ""
        lines.append(f"| {r['model']} | {r['guidance']:g}{mark} | {r['class_accuracy']:.2f} | {r['fid_proxy']:.2f} | "
                     f"{r['nudge_psnr_mean']:.1f} | {r['nudge_psnr_min']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["dit", "flux", "both"], default="both")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.5, 2.0, 3.0, 4.0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--seed", type=int, default=5, help="seed of the nudge")
    parser.add_argument("--weights", type=Path, default=None, help="checkpoint folder (default: the packaged one)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if any(s < 1.0 for s in args.scales):
        parser.error(f"--scales: expected values >= 1.0 (1 = no guidance), got {args.scales}")
    held, _ = make_dataset(2000, seed=HELDOUT_SEED)
    rows = []
    for name in (["dit", "flux"] if args.model == "both" else [args.model]):
        rows += sweep(name, args, held)
    result = {"command": " ".join(["python", "benchmarks/guidance_sweep.py", *sys.argv[1:]]), "steps": args.steps,
              "per_class": args.per_class, "torch": torch.__version__,
              "device": f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads",
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "guidance_sweep.json").write_text(json.dumps(result, indent=2))
    md = markdown(result)
    (args.out / "guidance_sweep.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
