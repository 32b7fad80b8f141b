"""Behaviour fingerprint: do two versions of the package give the same images and decisions?

    python benchmarks/fingerprint.py save before.pt          # on the old version
    python benchmarks/fingerprint.py save after.pt           # on the new one
    python benchmarks/fingerprint.py compare before.pt after.pt

``save`` samples the three reference models (DiT, Flux, SD3) with the backend's default
options, 4 images x 50 steps, seeds 0 and 1, one thread, and stores the images and
``stats()["totals"]``; ``compare`` reports, per model and seed, whether the images are equal
bit for bit (``torch.equal``) and the totals equal, and exits 1 otherwise. A refactor that
claims "behaviour unchanged" shows it with this (issue 31).
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys

import torch

from adacorr_compile.api import reset, stats

try:
    from adacorr_compile.lab.methods import own_forward, transformer_of, with_transformer
    from adacorr_compile.lab.reference import load_reference
    from adacorr_compile.lab.sampling import reference_sampler
except ImportError:  # a version from before the lab moved out (issue 31), to compare against
    from adacorr_compile.bench import own_forward, transformer_of, with_transformer
    from adacorr_compile.reference import load_reference
    from adacorr_compile.sampling import reference_sampler

logger = logging.getLogger("adacorr_compile.bench")
MODELS = ("dit", "flux", "sd3")


def save(path: str) -> None:
    torch.set_num_threads(1)
    out: dict[str, dict[int, dict]] = {}
    for name in MODELS:
        model = copy.deepcopy(load_reference(name))
        own_forward(transformer_of(model))  # a forward of its own, as the benchmarks compile it
        fast = torch.compile(transformer_of(model), backend="adacorr")
        fn, sampler = with_transformer(model, fast), reference_sampler(name)
        out[name] = {}
        for seed in (0, 1):
            reset(fast)
            images = sampler(fn, [i % 10 for i in range(4)], num_steps=50, seed=seed).detach().float().cpu()
            out[name][seed] = {"images": images, "totals": stats(fast)["totals"]}
            logger.info("%s seed %d: %s", name, seed, out[name][seed]["totals"])
    torch.save(out, path)


def compare(a_path: str, b_path: str) -> bool:
    a, b = torch.load(a_path), torch.load(b_path)
    same = True
    for name in a:
        for seed in a[name]:
            images = torch.equal(a[name][seed]["images"], b[name][seed]["images"])
            totals = a[name][seed]["totals"] == b[name][seed]["totals"]
            logger.info("%s seed %d: images equal bit for bit: %s, totals equal: %s (%s)", name, seed, images, totals,
                        b[name][seed]["totals"])
            same &= images and totals
    return same


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("save").add_argument("path")
    cmp = sub.add_parser("compare")
    cmp.add_argument("before")
    cmp.add_argument("after")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("torch", "diffusers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.cmd == "save":
        save(args.path)
        return 0
    return 0 if compare(args.before, args.after) else 1


if __name__ == "__main__":
    sys.exit(main())
