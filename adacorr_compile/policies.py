"""Decision sources: when may a guarded region reuse its cache?

Each policy is a pure function of host values (the step, guards, lambda as read
from the device, the first block's verdict). The device-to-host read is kept in
one function, :func:`read_to_host`, so that it can be replaced (an in-graph
``torch.cond``, one decision per step, a CUDA-graph conditional) without touching
the rest.

* ``adacorr``: reuse when ``lambda <= reuse_threshold`` (AdaCorrection's ACM weight).
* ``interval``: recompute every ``interval`` steps after warm-up (FORA).
* ``first_block``: the first region always computes; the others reuse when the
  relative change of its residual is below ``first_block_threshold`` (FBCache).
* ``never``: never reuse.

With ``correction=True``, a reuse proposed by ``interval`` or ``first_block`` is
vetoed when lambda exceeds ``reuse_threshold``: "X + AdaCorrection".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .config import AdaCorrConfig


@dataclass(frozen=True)
class Guards:
    """Why a region must compute regardless of the policy (host values)."""

    step: int  # 0-based step within the generation
    steps_left: int | None  # steps after this one in the generation, if known or predictable
    consecutive_reuses: int
    has_cache: bool
    is_first_region: bool

    def forced(self, config: AdaCorrConfig) -> str | None:
        if not self.has_cache:
            return "empty cache"
        if config.policy == "never":
            return "policy never"
        if self.step < config.warmup_steps:
            return "warm-up"
        if self.steps_left is not None and self.steps_left < config.final_steps:
            return "final steps"
        if self.consecutive_reuses >= config.max_consecutive_reuses:
            return "max consecutive reuses"
        if config.policy == "first_block" and self.is_first_region:
            return "first block"
        return None


def needs_lambda(config: AdaCorrConfig) -> bool:
    """Whether the decision reads lambda on the host."""
    return config.policy == "adacorr" or config.correction


def relative_change(current: torch.Tensor, reference: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """FBCache's similarity: ``mean|current - reference| / mean|reference|``."""
    return (current.float() - reference.float()).abs().mean() / (reference.float().abs().mean() + eps)


def read_to_host(values: Sequence[torch.Tensor]) -> list[float]:
    """The one device-to-host synchronisation of a decision: all values in one read."""
    flat = torch.cat([v.detach().reshape(-1).float() for v in values])
    return flat.tolist()


def decide(
    config: AdaCorrConfig,
    guards: Guards,
    lam: Sequence[float] | None,
    first_block_similar: bool | None,
) -> list[bool] | str:
    """Per-sample reuse verdicts (one entry when ``decision="batch"``), or the reason
    the region must compute. ``lam`` holds lambda per decision unit (or None when
    the policy does not need it)."""
    forced = guards.forced(config)
    if forced is not None:
        return forced
    units = len(lam) if lam is not None else 1
    if config.policy == "adacorr":
        assert lam is not None
        return [x <= config.reuse_threshold for x in lam]
    if config.policy == "interval":
        proposed = (guards.step - config.warmup_steps) % config.interval != 0
    elif config.policy == "first_block":
        proposed = bool(first_block_similar)
    else:  # pragma: no cover - validated by AdaCorrConfig
        raise ValueError(f"unknown policy {config.policy!r}")
    if not proposed:
        return "policy"
    if config.correction:
        assert lam is not None
        return [x <= config.reuse_threshold for x in lam]
    return [True] * units
