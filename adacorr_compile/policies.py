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
* ``paper``: never reuse, and every compute is the policy's choice (so ``blend=True``
  blends it by lambda): the paper's algorithm as written.

With ``correction=True``, a reuse proposed by ``interval`` or ``first_block`` is
vetoed when lambda exceeds ``reuse_threshold``: "X + AdaCorrection".

With ``scope="step"`` the decision is taken once per step (:func:`step_role`): the first
region (the leader) always computes, the second (the probe) decides as above and the
others follow its verdict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

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
    generation_known: bool = True  # False: any call may start a new generation (no timestep, no user marks)

    def forced(self, config: AdaCorrConfig) -> str | None:
        if not self.has_cache:
            return "empty cache"
        if config.policy == "never":
            return "policy never"
        if not self.generation_known:
            return "no generation signal"
        if self.step < config.warmup_steps:
            return "warm-up"
        if self.steps_left is not None and self.steps_left < config.final_steps:
            return "final steps"
        if self.consecutive_reuses >= config.max_consecutive_reuses:
            return "max consecutive reuses"
        if config.policy == "first_block" and self.is_first_region:
            return "first block"
        if config.scope == "step" and self.is_first_region:
            return "step leader"
        return None


def step_role(config: AdaCorrConfig, order: int) -> str:
    """A region's part in the decision: ``"block"`` (decides for itself, ``scope="block"``),
    or with ``scope="step"`` ``"leader"`` (the first region: always computes),
    ``"probe"`` (the second: decides for the step) or ``"follower"`` (takes the probe's
    verdict)."""
    if config.scope != "step":
        return "block"
    return ("leader", "probe")[order] if order < 2 else "follower"


def first_region_computes_always(config: AdaCorrConfig) -> bool:
    """The first region computes at every step: FBCache's first block (``first_block``)
    or the leader under ``scope="step"``; the others decide from what it computed."""
    return config.policy == "first_block" or config.scope == "step"


def caches_residuals(config: AdaCorrConfig) -> bool:
    """A reuse adds the cached residual to the current input (AdaCorrection's correction,
    FBCache); otherwise it returns the cached block output as it was."""
    return config.correction or config.policy == "first_block"


def needs_lambda(config: AdaCorrConfig) -> bool:
    """Whether the decision reads lambda on the host."""
    return config.policy in ("adacorr", "paper") or config.correction


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
    if config.policy == "paper":
        return "policy"
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


STEPS_UNKNOWN = 1 << 62  # ``steps_left`` as a tensor when the host's value is None


class TensorVerdict(NamedTuple):
    """:func:`decide_tensor`'s result, three 0-d bool tensors."""

    reuse: torch.Tensor  # the region reuses its cache
    nonfinite: torch.Tensor  # no guard forced a compute, but the cache or the score is not finite
    by_policy: torch.Tensor  # the policy itself chose to compute: only then does blend=True blend


def decide_tensor(
    config: AdaCorrConfig,
    step: torch.Tensor,
    steps_left: torch.Tensor,
    consecutive: torch.Tensor,
    has_cache: torch.Tensor,
    valid: torch.Tensor,
    is_first_region: bool,
    lam: torch.Tensor | None,
    first_block_similar: torch.Tensor | None,
    score: torch.Tensor | None = None,
) -> TensorVerdict:
    """In-graph twin of :meth:`Guards.forced` + :func:`decide` + the region's non-finite
    checks, for ``decision="batch"``: a :class:`TensorVerdict`.

    Used where the decision must live inside a traced graph (ONNX ``If``, ``torch.cond``):
    ``step``, ``steps_left``, ``consecutive`` are 0-d int64 (``steps_left`` is
    :data:`STEPS_UNKNOWN` where the host's is None); ``has_cache``, ``valid`` (the cache
    is finite) are 0-d bool; ``lam`` a 0-d float (ignored where :func:`needs_lambda` is
    False); ``first_block_similar`` a 0-d bool for ``first_block``; ``score`` the OEM
    score, whose non-finiteness forces a compute as on the host ("non-finite input").
    The config is static: its branches are resolved in Python, only values are tensors.
    ``nonfinite`` is True where no guard forced a compute but the cache or the score is
    not finite (the host's ``stats.nonfinite``).
    """
    if config.decision != "batch":
        raise NotImplementedError("decide_tensor supports decision='batch' only")
    has_cache = has_cache.to(torch.bool)
    false = torch.zeros_like(has_cache)
    forced = ~has_cache
    if config.policy == "never":
        forced = ~false
    forced = forced | (step < config.warmup_steps)
    forced = forced | (steps_left < config.final_steps)
    forced = forced | (consecutive >= config.max_consecutive_reuses)
    leads = first_region_computes_always(config) and is_first_region
    if leads:
        forced = ~false
    finite = valid.to(torch.bool)
    if score is not None:
        finite = finite & torch.isfinite(score).all()
    nonfinite = ~forced & ~finite
    if config.policy == "never" or leads:
        return TensorVerdict(false, nonfinite, false)  # always forced: the policy is not consulted
    lam_ok = None
    if needs_lambda(config):
        assert lam is not None, "lambda is needed by this policy"
        lam_ok = lam <= config.reuse_threshold
    if config.policy == "adacorr":
        proposed = lam_ok
    elif config.policy == "paper":
        proposed = false
    else:
        if config.policy == "interval":
            proposed = torch.remainder(step - config.warmup_steps, config.interval) != 0
        elif config.policy == "first_block":
            assert first_block_similar is not None, "first_block needs the first block's verdict"
            proposed = first_block_similar.to(torch.bool)
        else:  # pragma: no cover - validated by AdaCorrConfig
            raise ValueError(f"unknown policy {config.policy!r}")
        if config.correction:
            proposed = proposed & lam_ok
    consulted = ~forced & finite
    return TensorVerdict(consulted & proposed, nonfinite, consulted & ~proposed)
