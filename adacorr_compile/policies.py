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

The types of a decision: a region's :class:`Role`, the :class:`Reason` it computes for, its
:class:`Verdict` (flags or reason, lambda, step) and what it keeps for its OEM
(:class:`Keeps`). A :class:`DecisionPlan` is the config's part in the decision worked out once
per compile; a :class:`ConfigHome` holds a compiled model's config and its plan, shared by the
model's state, its regions and their math (the deciders per role: ``runtime/decide.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, NamedTuple, Sequence

import torch

from .config import AdaCorrConfig


class StrEnum(str, Enum):
    """``enum.StrEnum`` (Python >= 3.11) for Python 3.10 too: a member is its value as a
    string (``str()``, f-strings, ``==``, JSON)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class Role(StrEnum):
    """A region's part in the decision (:func:`step_role`). A ``StrEnum``: a role prints, is
    written to JSON and compares as its name (``"leader"``), as the strings it replaces did."""

    BLOCK = "block"  # scope="block": decides for itself
    LEADER = "leader"  # scope="step", the first region: always computes, measures nothing
    PROBE = "probe"  # scope="step", the second region: decides for the step
    FOLLOWER = "follower"  # scope="step", every later region: takes the probe's verdict


class Reason(StrEnum):
    """Why a region computes: a guard (:func:`guard_checks`, in its order), a cache or score
    that is not finite, the policy itself, or a region that takes another's verdict and found
    none for this step. Prints as the reason's text (``"warm-up"``)."""

    EMPTY_CACHE = "empty cache"
    POLICY_NEVER = "policy never"
    NO_GENERATION_SIGNAL = "no generation signal"
    WARM_UP = "warm-up"
    FINAL_STEPS = "final steps"
    MAX_REUSES = "max consecutive reuses"
    FIRST_BLOCK = "first block"
    STEP_LEADER = "step leader"
    NONFINITE_CACHE = "non-finite cache"
    NONFINITE_INPUT = "non-finite input"
    POLICY = "policy"  # the policy chose to compute: only this compute is blended (blend=True)
    NO_STEP_VERDICT = "no step verdict"  # a follower, and the probe gave none in this step
    NO_SPAN_VERDICT = "no span verdict"  # a later region of a span, and its first gave none in this step


class Keeps(StrEnum):
    """Which observed inputs a region keeps for its own OEM (``drift_reference``); a region that
    does not measure its input keeps none (``None``)."""

    REFERENCE = "ref"  # the input of the last fresh compute
    PREVIOUS = "prev"  # the input of the previous step


@dataclass(frozen=True)
class Verdict:
    """One region's decision for one step: the per-unit reuse flags (one entry for the batch
    under ``decision="batch"``, one per sample under ``"sample"``), or None and the
    :class:`Reason` it computes for; the step's lambda where it was measured (a follower's
    compute blends by the probe's). The probe hands its verdict to the followers, the first
    region of a span to the span's later regions."""

    step: int
    mask: tuple[bool, ...] | None  # None: compute all units
    reason: Reason | None  # set exactly when ``mask`` is None
    lam: torch.Tensor | None = None

    @classmethod
    def of(cls, step: int, result: Sequence[bool] | Reason, lam: torch.Tensor | None) -> Verdict:
        """From :func:`policy_verdict`'s (or a guard's) result: flags or a reason."""
        if isinstance(result, str):
            return cls(step, None, Reason(result), lam)
        return cls(step, tuple(result), None, lam)

    def reuses_all(self) -> bool:
        """Every unit reuses (the span's fast path: nothing of it runs)."""
        return self.mask is not None and all(self.mask)


def _not(x: Any) -> Any:
    """Logical not of a host bool or a bool tensor (``~True`` is -2 in Python)."""
    return ~x if isinstance(x, torch.Tensor) else not x


def guard_checks(
    config: AdaCorrConfig, step: Any, steps_left: Any, consecutive: Any, has_cache: Any, is_first_region: bool,
    generation_known: Any = True,
) -> tuple[tuple[Reason, Any], ...]:
    """Every guard, in order, as ``(reason, condition)``: the region must compute when a
    condition holds, whatever the policy says. The one definition of the guards: the values
    are host numbers (:meth:`Guards.forced` takes the first that holds) or 0-d tensors
    (:func:`decide_tensor` ors them inside a traced graph). ``steps_left`` is
    :data:`STEPS_UNKNOWN` where the generation's end is not known."""
    return (
        (Reason.EMPTY_CACHE, _not(has_cache)),
        (Reason.POLICY_NEVER, config.policy == "never"),
        (Reason.NO_GENERATION_SIGNAL, _not(generation_known)),
        (Reason.WARM_UP, step < config.warmup_steps),
        (Reason.FINAL_STEPS, steps_left < config.final_steps),
        (Reason.MAX_REUSES, consecutive >= reuse_cap(config, step, steps_left)),
        (Reason.FIRST_BLOCK, config.policy == "first_block" and is_first_region),
        (Reason.STEP_LEADER, config.scope == "step" and is_first_region),
    )


def progress(step: Any, steps_left: Any) -> Any:
    """How far the generation is, ``step / (steps - 1)`` in [0, 1]: host numbers or 0-d
    tensors. ``steps_left`` None (host) or :data:`STEPS_UNKNOWN` (tensor): about 0, every step
    counts as early."""
    if isinstance(step, torch.Tensor) or isinstance(steps_left, torch.Tensor):
        step = torch.as_tensor(step).to(torch.float32)
        total = step + torch.as_tensor(steps_left).to(torch.float32)
        return torch.clamp(step / torch.clamp(total, min=1.0), 0.0, 1.0)
    if steps_left is None or steps_left >= STEPS_UNKNOWN:
        return 0.0
    return min(max(step / max(step + steps_left, 1), 0.0), 1.0)


def _late(config: AdaCorrConfig, step: Any, steps_left: Any) -> tuple[Any, Any] | None:
    """``late_phase``: the share of the threshold's rise done at this step (0 before
    ``start``, 1 from ``end``) and whether the late cap holds; None where it is off."""
    if config.late_phase is None:
        return None
    start, end = config.late_phase
    p = progress(step, steps_left)
    if isinstance(p, torch.Tensor):
        rise = torch.clamp((p - start) / (end - start), 0.0, 1.0) if end > start else (p >= end).to(torch.float32)
        return rise, p >= end
    rise = min(max((p - start) / (end - start), 0.0), 1.0) if end > start else float(p >= end)
    return rise, p >= end


def reuse_threshold_at(config: AdaCorrConfig, step: Any, steps_left: Any) -> Any:
    """The lambda threshold at this step: ``reuse_threshold``, rising under ``late_phase`` to
    ``reuse_threshold * late_threshold_factor``. The one definition, for host numbers and
    0-d tensors (:func:`decide_tensor`)."""
    late = _late(config, step, steps_left)
    if late is None:
        return config.reuse_threshold
    return config.reuse_threshold * (1.0 + (config.late_threshold_factor - 1.0) * late[0])


def reuse_cap(config: AdaCorrConfig, step: Any, steps_left: Any) -> Any:
    """Reuses in a row allowed at this step: ``max_consecutive_reuses``, plus
    ``late_extra_reuses`` from the end of ``late_phase`` on (host int or 0-d int64 tensor)."""
    late = _late(config, step, steps_left)
    if late is None:
        return config.max_consecutive_reuses
    if isinstance(late[1], torch.Tensor):
        return config.max_consecutive_reuses + config.late_extra_reuses * late[1].to(torch.int64)
    return config.max_consecutive_reuses + (config.late_extra_reuses if late[1] else 0)


def scheduled(config: AdaCorrConfig, step: Any, first_block_similar: Any) -> Any:
    """The policy's own proposal to reuse, before lambda gates it (:func:`lambda_gates`): the
    one definition of the policies, for host values and 0-d tensors alike. ``adacorr``
    leaves it to lambda; ``paper`` and ``never`` never reuse; ``interval`` reuses between
    its computes (FORA); ``first_block`` when the first block's residual barely moved (FBCache)."""
    if config.policy == "adacorr":
        return True
    if config.policy in ("paper", "never"):
        return False
    if config.policy == "interval":
        return (step - config.warmup_steps) % config.interval != 0
    if config.policy == "first_block":
        if first_block_similar is None:  # the first region itself (always computes), or no verdict yet
            return False
        return first_block_similar.to(torch.bool) if isinstance(first_block_similar, torch.Tensor) else bool(first_block_similar)
    raise ValueError(f"unknown policy {config.policy!r}")  # pragma: no cover - validated by AdaCorrConfig


def lambda_gates(config: AdaCorrConfig) -> bool:
    """A proposed reuse needs ``lambda <= reuse_threshold`` too: AdaCorrection's own policy,
    and "X + AdaCorrection" (``correction=True``) for ``interval`` and ``first_block``."""
    return config.policy == "adacorr" or (config.correction and config.policy in ("interval", "first_block"))


@dataclass(frozen=True)
class Guards:
    """The host values the guards look at (:func:`guard_checks`)."""

    step: int  # 0-based step within the generation
    steps_left: int | None  # steps after this one in the generation, if known or predictable
    consecutive_reuses: int
    has_cache: bool
    is_first_region: bool
    generation_known: bool = True  # False: any call may start a new generation (no timestep, no user marks)

    def forced(self, config: AdaCorrConfig) -> Reason | None:
        """The first guard that forces a compute (its reason), or None."""
        left = STEPS_UNKNOWN if self.steps_left is None else self.steps_left
        checks = guard_checks(config, self.step, left, self.consecutive_reuses, self.has_cache, self.is_first_region,
                              self.generation_known)
        return next((reason for reason, holds in checks if holds), None)


def step_role(config: AdaCorrConfig, order: int) -> Role:
    """A region's part in the decision: :attr:`Role.BLOCK` (decides for itself, ``scope="block"``),
    or with ``scope="step"`` :attr:`Role.LEADER` (the first region: always computes),
    :attr:`Role.PROBE` (the second: decides for the step) or :attr:`Role.FOLLOWER` (takes the
    probe's verdict)."""
    if config.scope != "step":
        return Role.BLOCK
    return (Role.LEADER, Role.PROBE)[order] if order < 2 else Role.FOLLOWER


def first_region_computes_always(config: AdaCorrConfig) -> bool:
    """The first region computes at every step: FBCache's first block (``first_block``)
    or the leader under ``scope="step"``; the others decide from what it computed."""
    return config.policy == "first_block" or config.scope == "step"


def caches_residuals(config: AdaCorrConfig) -> bool:
    """A reuse adds the cached residual to the current input (AdaCorrection's correction,
    FBCache); otherwise it returns the cached block output as it was."""
    return config.correction or config.policy == "first_block"


def probe_forecasts(config: AdaCorrConfig) -> bool:
    """``probe_forecast`` applies: the probe (``scope="step"``) scores against its reference's
    forecast (``forecast="linear"``), and keeps the reference before the last for it."""
    return config.probe_forecast and config.scope == "step" and config.forecast == "linear"


def needs_lambda(config: AdaCorrConfig) -> bool:
    """Whether the decision reads lambda on the host."""
    return config.policy in ("adacorr", "paper") or config.correction


def relative_change(current: torch.Tensor, reference: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """FBCache's similarity: ``mean|current - reference| / mean|reference|``."""
    return (current.float() - reference.float()).abs().mean() / (reference.float().abs().mean() + eps)


def relative_change_sums(current: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """:func:`relative_change` as sums a decision group adds over its ranks:
    ``[sum|current - reference|, sum|reference|, count]`` (float32)."""
    diff = (current.float() - reference.float()).abs().sum()
    return torch.stack([diff, reference.float().abs().sum(), torch.full_like(diff, float(reference.numel()))])


def relative_change_from_sums(sums: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """:func:`relative_change` from (summed) :func:`relative_change_sums`."""
    return (sums[0] / sums[2]) / (sums[1] / sums[2] + eps)


def read_to_host(values: Sequence[torch.Tensor]) -> list[float]:
    """The one device-to-host synchronisation of a decision: all values in one read."""
    flat = torch.cat([v.detach().reshape(-1).float() for v in values])
    return flat.tolist()


def decide(
    config: AdaCorrConfig,
    guards: Guards,
    lam: Sequence[float] | None,
    first_block_similar: bool | None,
    valid: bool = True,
    score_finite: bool = True,
) -> list[bool] | Reason:
    """The host's verdict: per-unit reuse flags (one entry when ``decision="batch"``), or
    why the region computes (a :class:`Reason`: a guard's, ``"non-finite cache"``, ``"non-finite
    input"`` or ``"policy"``; the runtime wraps either in a :class:`Verdict`). ``lam`` holds lambda per decision unit (None when the policy
    does not need it); ``valid``: the cache is finite; ``score_finite``: the OEM score is.
    :func:`decide_tensor` is the same decision on tensors (both are built from
    :func:`guard_checks`, :func:`scheduled` and :func:`lambda_gates`)."""
    forced = guards.forced(config)
    if forced is not None:
        return forced
    return policy_verdict(config, guards.step, guards.steps_left, lam, first_block_similar, valid, score_finite)


def policy_verdict(
    config: AdaCorrConfig, step: int, steps_left: int | None, lam: Sequence[float] | None,
    first_block_similar: bool | None, valid: bool = True, score_finite: bool = True,
) -> list[bool] | Reason:
    """:func:`decide` once no guard forced a compute (a caller that has evaluated the guards
    already calls this, not :func:`decide`, so they are evaluated once)."""
    if not valid:
        return Reason.NONFINITE_CACHE
    if not score_finite:
        return Reason.NONFINITE_INPUT
    if not scheduled(config, step, first_block_similar):
        return Reason.POLICY
    if lambda_gates(config):
        if lam is None:
            raise ValueError(f"policy {config.policy!r} with correction={config.correction} needs lambda")
        threshold = reuse_threshold_at(config, step, steps_left)
        return [x <= threshold for x in lam]
    return [True] * (len(lam) if lam is not None else 1)


def cap_streaks(config: AdaCorrConfig, reuse: Any, streaks: Any, step: Any, steps_left: Any) -> Any:
    """``decision="sample"``: a sample that has reused :func:`reuse_cap` times in a row
    computes, whatever its flag says (the others may still reuse; the guard forces a compute
    of all only when all are at the cap). ``reuse`` and ``streaks`` are host lists or ``[B]``
    tensors: the one definition of the per-sample cap."""
    cap = reuse_cap(config, step, steps_left)
    if isinstance(reuse, torch.Tensor):
        return reuse & (streaks < cap)
    return [m and k < cap for m, k in zip(reuse, streaks)]


def next_streaks(reused: Any, streaks: Any) -> Any:
    """The reuse streaks after a call: one more where the unit (the batch, or a sample)
    reused, 0 where it computed. Host lists or tensors: the one definition, for the runtime
    and the ONNX step graph."""
    if isinstance(reused, torch.Tensor):
        return torch.where(reused, streaks + 1, torch.zeros_like(streaks))
    return [k + 1 if m else 0 for m, k in zip(reused, streaks)]


def forecast_keeps_previous(partial: Any, mixed: Any) -> Any:
    """``forecast="linear"``: whether a compute's replaced cache may be the extrapolation's
    earlier point. Not when this refresh is partial (the samples that reused keep older
    values) nor when the replaced cache was itself mixed: values of several steps have no
    single step to measure a slope from. Host bools or 0-d bool tensors."""
    return _not(partial) & _not(mixed)


STEPS_UNKNOWN = 1 << 62  # ``steps_left`` as a tensor when the host's value is None


class TensorVerdict(NamedTuple):
    """:func:`decide_tensor`'s result: bool tensors, 0-d except ``reuse`` and ``proposed``
    under ``decision="sample"`` (``[B]``)."""

    reuse: torch.Tensor  # the region reuses its cache (per sample: the mask, after the cap)
    nonfinite: torch.Tensor  # no guard forced a compute, but the cache or the score is not finite
    by_policy: torch.Tensor  # the policy itself chose to compute (some samples): only then does blend=True blend
    proposed: torch.Tensor  # the verdict before the per-sample cap: what scope="step"'s followers take


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
    """:func:`decide` on tensors: a :class:`TensorVerdict` (the same guards, policy, lambda
    gate and per-sample cap: :func:`guard_checks`, :func:`scheduled`, :func:`lambda_gates`,
    :func:`cap_streaks`; no reasons, only flags).

    Used where the decision must live inside a traced graph (ONNX ``If``, ``torch.cond``):
    ``step``, ``steps_left`` are 0-d int64 (``steps_left`` is :data:`STEPS_UNKNOWN` where
    the host's is None), ``consecutive`` the reuse streak (0-d int64; ``[B]`` per sample
    under ``decision="sample"``, the guard then looks at the smallest); ``has_cache``,
    ``valid`` (the cache is finite) are 0-d bool; ``lam`` lambda (0-d, or ``[B]`` per
    sample; ignored where :func:`needs_lambda` is False); ``first_block_similar`` a 0-d bool
    for ``first_block``; ``score`` the OEM score, whose non-finiteness forces a compute as
    on the host ("non-finite input"). The config is static: its branches are resolved in
    Python, only values are tensors. ``nonfinite`` is True where no guard forced a compute
    but the cache or the score is not finite (the host's ``stats.nonfinite``).
    """
    per_sample = config.decision == "sample"
    has_cache = has_cache.to(torch.bool)
    forced = torch.zeros_like(has_cache)
    least = consecutive.amin(0) if consecutive.dim() else consecutive  # per sample: the smallest streak
    for _, holds in guard_checks(config, step, steps_left, least, has_cache, is_first_region):
        forced = forced | holds
    finite = valid.to(torch.bool)
    if score is not None:
        finite = finite & torch.isfinite(score).all()
    nonfinite = ~forced & ~finite
    proposed = scheduled(config, step, first_block_similar)
    if isinstance(proposed, bool):  # the policy's schedule does not depend on the step's values
        proposed = forced.new_full((), proposed)
    if lambda_gates(config):
        if lam is None:
            raise ValueError(f"policy {config.policy!r} with correction={config.correction} needs lambda")
        proposed = proposed & (lam <= reuse_threshold_at(config, step, steps_left))
    consulted = ~forced & finite
    if not per_sample:
        return TensorVerdict(consulted & proposed, nonfinite, consulted & ~proposed, consulted & proposed)
    proposed = proposed & torch.ones_like(consecutive, dtype=torch.bool)  # one flag per sample
    mask = cap_streaks(config, proposed, consecutive, step, steps_left)
    return TensorVerdict(consulted & mask, nonfinite, consulted & ~mask.all(), consulted & proposed)


@dataclass(frozen=True)
class DecisionPlan:
    """What the decision needs of the config, worked out once per config (per compile, and per
    :func:`calibrate.swapped_config <adacorr_compile.calibrate.swapped_config>` swap), not at
    every region call: the predicates above, evaluated. ``config`` is kept for the values that
    are read as numbers (thresholds, steps) by :func:`guard_checks` and :func:`policy_verdict`."""

    config: AdaCorrConfig
    residuals: bool  # caches_residuals: a reuse adds the cached residual, else returns the cached output
    needs_lambda: bool  # the verdict reads lambda on the host
    probe_forecast: bool  # probe_forecasts: the probe scores against its reference's forecast
    per_sample: bool  # decision="sample": one verdict per sample
    step_scope: bool  # scope="step": leader, probe, followers
    keeps: Keeps  # what a region deciding for itself (Role.BLOCK) keeps for its OEM

    @classmethod
    def build(cls, config: AdaCorrConfig) -> DecisionPlan:
        return cls(
            config=config,
            residuals=caches_residuals(config),
            needs_lambda=needs_lambda(config),
            probe_forecast=probe_forecasts(config),
            per_sample=config.decision == "sample",
            step_scope=config.scope == "step",
            keeps=Keeps.PREVIOUS if config.drift_reference == "previous" else Keeps.REFERENCE,
        )

    def role(self, order: int) -> Role:
        """:func:`step_role` of the region at ``order``."""
        return step_role(self.config, order)


class HomeConfig:
    """The ``config`` attribute of an object with a ``home`` (:class:`ConfigHome`): read and
    written through the home, so the model state, its regions and their math hold one config."""

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        return self if obj is None else obj.home.config

    def __set__(self, obj: Any, config: AdaCorrConfig) -> None:
        obj.home.config = config


class ConfigHome:
    """The one home of a compiled model's config at run time, and its :class:`DecisionPlan`.

    The model's state, its guarded regions and their :class:`~adacorr_compile.runtime.fused.RegionMath`
    hold this object, not copies of the config: a config swapped in for calibration (only
    options read at run time) is seen by all of them at the next call, and the plan is rebuilt
    once per swap. ``compiled`` is the config the model was compiled with (the swap leaves it
    as it is): a later compile of the model with the same options joins this home, one with
    other options gets a home of its own (:meth:`ModelState.adopt
    <adacorr_compile.runtime.state.ModelState.adopt>`)."""

    def __init__(self, config: AdaCorrConfig) -> None:
        self.compiled = config
        self._config = config
        self.plan = DecisionPlan.build(config)

    @property
    def config(self) -> AdaCorrConfig:
        return self._config

    @config.setter
    def config(self, config: AdaCorrConfig) -> None:
        if config is not self._config and config != self._config:  # an equal config changes nothing
            self._config = config
            self.plan = DecisionPlan.build(config)

    def __repr__(self) -> str:
        return f"ConfigHome({self._config!r})"
