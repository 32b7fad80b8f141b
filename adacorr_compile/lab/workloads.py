"""The reference models as calibration workloads: ``adacorr calibrate --model reference-dit``
(``reference-flux``, ``reference-sd3``) samples them as the benchmark does. A workload is what
:func:`adacorr_compile.calibrate.calibrate` takes (:class:`~adacorr_compile.calibrate.Workload`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..calibrate import Workload

REFERENCE_MODELS = ("reference-dit", "reference-flux", "reference-sd3")


def reference_workload(name: str, steps: int = 50, images: int = 10, guidance: float | None = None) -> Workload:
    """A built-in reference model sampled as the benchmark samples it
    (``benchmarks/run_benchmark.py``): ``images`` class-conditional images with classes
    ``0, 1, ..., 9, 0, ...``, ``steps`` steps, the sampler's default guidance (DiT: DDIM, CFG
    1.5; Flux and the held-out SD3: Euler, CFG 4.0), CFG batched into one call per step; the seed
    draws the initial noise. Outputs are images in [-1, 1]. The compiled module is the diffusers
    transformer (the DiT itself; the ``transformer`` inside the Flux or SD3 wrapper)."""
    from functools import partial

    from .methods import transformer_of, with_transformer
    from .reference import load_reference
    from .sampling import reference_sampler

    if name not in REFERENCE_MODELS:
        raise ValueError(f"unknown reference model {name!r}; expected one of {', '.join(REFERENCE_MODELS)}")
    kind = name.split("-", 1)[1]
    wrapper = load_reference(kind)
    sampler = reference_sampler(kind)
    if guidance is not None:
        sampler = partial(sampler, guidance_scale=guidance)
    labels = [i % 10 for i in range(images)]

    def run(compiled: Any, seed: int) -> torch.Tensor:
        return sampler(with_transformer(wrapper, compiled), labels, num_steps=steps, seed=int(seed))

    return Workload(run, transformer_of(wrapper), (-1.0, 1.0))
