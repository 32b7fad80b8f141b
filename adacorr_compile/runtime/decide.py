"""The decision side of a guarded region's step: one decider per role, built once per region.

A region's part in the step's decision (:class:`~adacorr_compile.policies.Role`) and its
place in a span are fixed when the passes build it, so the branch on them is taken once,
then: :func:`decider_for` picks the region's :class:`Decider` (``GuardedRegion`` calls it
again when ``chain_regions`` puts the region in a span), and at every call the region only
dispatches to it. What a decider reads of the config comes from the region's
:class:`~adacorr_compile.policies.DecisionPlan` (built once per compile), apart from the
numbers the guards and the policy compare with.

* :class:`BlockDecider` (``scope="block"``): the OEM on its own input against the one it
  kept, then the guards and the policy (one host read).
* :class:`LeaderDecider` (``scope="step"``, the first region): always computes.
* :class:`ProbeDecider` (the second): the OEM on the leader's fresh residual against its
  value when the probe last computed (or its forecast), then the guards and the policy;
  hands its :class:`~adacorr_compile.policies.Verdict` to the followers.
* :class:`FollowerDecider`: the probe's verdict of this step, unless a guard forces a compute.
* :class:`SpanMemberDecider`: a later region of a span does what the span's first region
  did in this step (they share one cache).

Every decider returns a :class:`Taken`: the verdict, expanded to a per-sample mask and
capped per sample, plus what the compute or reuse after it needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..step import same_shapes
from ..policies import DecisionPlan, Guards, Keeps, Reason, Role, Verdict, cap_streaks, policy_verdict

if TYPE_CHECKING:  # pragma: no cover - types only: region.py imports this module
    from .region import Active, GuardedRegion
    from .state import StepSignals


@dataclass
class Taken:
    """What one region call decided and measured (host values and device scalars)."""

    verdict: Verdict
    score: torch.Tensor | None = None
    mask: list[bool] | None = None  # per-sample reuse flags (None: compute all)
    by_policy: bool = False  # the policy itself chose to compute: only then does blend=True blend
    has_cache: bool = False  # the (span's) cache held values when the step began

    @property
    def lam(self) -> torch.Tensor | None:
        """The step's lambda: measured here, or the probe's (a follower) or the span's first region's."""
        return self.verdict.lam


def probe_forecast(plan: DecisionPlan, shared: StepSignals, step: int) -> tuple[float, float] | None:
    """``probe_forecast``: ``(k, gap)`` for extrapolating the probe's reference to ``step``
    from its previous value (:meth:`RegionMath.measure_forecast`), or None where the probe
    scores against the reference as stored (the option is off, ``scope="block"``,
    ``forecast="none"``, fewer than two references of these shapes)."""
    return shared.probe_forecast(step) if plan.probe_forecast else None


class Decider:
    """One region's decision (see module docstring); subclasses give :meth:`verdict`."""

    def __init__(self, role: Role) -> None:
        self.role = role

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.role.value})"

    def keeps(self, plan: DecisionPlan) -> Keeps | None:
        """The observed inputs a compute keeps for this region's own OEM: only a region that
        decides for itself measures its input (the probe scores the leader's residual)."""
        return plan.keeps if self.role is Role.BLOCK else None

    def needs_guards(self, streaks: list[int] | None) -> bool:
        return True

    def verdict(
        self, region: GuardedRegion, observed: list[torch.Tensor], active: Active, cache: Any, shared: StepSignals,
        guards: Guards | None, has_cache: bool,
    ) -> tuple[Verdict, torch.Tensor | None]:
        raise NotImplementedError

    def decide(
        self, region: GuardedRegion, observed: list[torch.Tensor], active: Active, cache: Any, shared: StepSignals,
    ) -> Taken:
        """The verdict for this step, as a :class:`Taken` (mask per sample, capped)."""
        plan = region.home.plan
        has_cache = (cache.ref_res if plan.residuals else cache.ref_out) is not None
        streaks = cache.streaks if plan.per_sample and cache.streaks is not None else None
        guards = None if not self.needs_guards(streaks) else Guards(
            step=active.step,
            steps_left=active.state.steps_left(active.graph_id, active.step),
            # per-sample decisions: the cap forces a compute of all samples only when all are
            # at it; a sample at the cap computes alone (below)
            consecutive_reuses=min(streaks) if streaks else cache.consecutive,
            has_cache=has_cache,
            is_first_region=region.spec.order == 0,
            generation_known=active.generation_known,
        )
        verdict, score = self.verdict(region, observed, active, cache, shared, guards, has_cache)
        span = region.span
        if span.size > 1 and span.position == 0:
            cache.pending = verdict  # the span's later regions take it (SpanMemberDecider)
        batch = observed[0].shape[0] if observed else 1
        flags = verdict.mask
        mask = None if flags is None else (list(flags) * batch if len(flags) == 1 else list(flags))
        if mask is not None and streaks is not None and len(streaks) == len(mask) and guards is not None:
            mask = cap_streaks(plan.config, mask, streaks, active.step, guards.steps_left)
        # the policy itself chose to compute (some samples): only then does blend=True blend; a
        # compute forced by a guard (warm-up, final steps, reuse cap, policy "never", a cache or
        # input that is not finite, an empty cache) returns the fresh block alone
        by_policy = verdict.reason is Reason.POLICY or (mask is not None and not all(mask))
        return Taken(verdict, score, mask, by_policy, has_cache)


def _settle(
    region: GuardedRegion, active: Active, shared: StepSignals, guards: Guards, forced: Reason | None,
    packed: torch.Tensor | None, lam: torch.Tensor | None,
) -> Verdict:
    """A guard's forced compute, else the policy's verdict on what was measured: one host
    read of lambda, the cache is finite, the score is finite."""
    if forced is not None:
        return Verdict.of(active.step, forced, lam)
    plan = region.home.plan
    host = packed.tolist()  # type: ignore[union-attr] - measured wherever no guard forced a compute
    result = policy_verdict(plan.config, active.step, guards.steps_left, host[:-2] if plan.needs_lambda else None,
                            shared.similar, valid=host[-2] >= 0.5, score_finite=host[-1] >= 0.5)
    if isinstance(result, Reason) and result in (Reason.NONFINITE_CACHE, Reason.NONFINITE_INPUT):
        active.state.region_stats(region.spec.path).nonfinite += 1
    return Verdict.of(active.step, result, lam)


class BlockDecider(Decider):
    """``scope="block"``: the region measures its own input and decides for itself."""

    def verdict(self, region, observed, active, cache, shared, guards, has_cache):  # type: ignore[no-untyped-def]
        forced = guards.forced(region.home.config)
        score = lam = packed = None
        if has_cache:
            reference = cache.prev_in if region.home.plan.keeps is Keeps.PREVIOUS else cache.ref_in
            if active.group is not None:
                score, lam, packed = region.math.measure_group(observed, reference, cache.valid, active.group, shared)
            else:
                score, lam, packed = region.math.measure(observed, reference, cache.valid)
        return _settle(region, active, shared, guards, forced, packed, lam), score


class LeaderDecider(Decider):
    """``scope="step"``, the first region: computes at every step (the "step leader" guard),
    measures nothing; its fresh residual is the probe's signal."""

    def verdict(self, region, observed, active, cache, shared, guards, has_cache):  # type: ignore[no-untyped-def]
        return Verdict.of(active.step, guards.forced(region.home.config) or Reason.STEP_LEADER, None), None


class ProbeDecider(Decider):
    """``scope="step"``, the second region: decides for the step on the leader's fresh residual
    against its value when the probe last computed (or that value's forecast: what the network
    does with this step's input and timestep, not the input alone, which the noisy latent
    dominates); the followers take its verdict."""

    def verdict(self, region, observed, active, cache, shared, guards, has_cache):  # type: ignore[no-untyped-def]
        plan = region.home.plan
        forced = guards.forced(plan.config)
        score = lam = packed = None
        current, reference = shared.leader_res, shared.probe_ref
        if has_cache and current is not None and reference is not None and same_shapes(current, reference):
            valid = cache.valid
            if shared.followers_valid is not None:
                valid = valid & shared.followers_valid  # a follower's cache is not finite: compute all
            forecast = probe_forecast(plan, shared, active.step)
            if active.group is not None:  # one decision on every rank of the group
                previous = None if forecast is None else shared.probe_prev
                score, lam, packed = region.math.measure_group(current, reference, valid, active.group, shared,
                                                               previous, *(forecast or ()))
            elif forecast is None:
                score, lam, packed = region.math.measure(current, reference, valid)
            else:
                score, lam, packed = region.math.measure_forecast(current, reference, shared.probe_prev, valid, *forecast)
        elif forced is None:
            forced = Reason.EMPTY_CACHE
        verdict = _settle(region, active, shared, guards, forced, packed, lam)
        shared.verdict = verdict
        return verdict, score


class FollowerDecider(Decider):
    """``scope="step"``, a later region: the probe's verdict of this step, nothing to measure
    or read; its lambda too (a compute blends by it, as the probe's does, forced or not)."""

    def verdict(self, region, observed, active, cache, shared, guards, has_cache):  # type: ignore[no-untyped-def]
        forced = guards.forced(region.home.config)
        probe = shared.verdict
        current = probe is not None and probe.step == active.step
        lam = probe.lam if current else None  # type: ignore[union-attr]
        if forced is not None:
            return Verdict(active.step, None, forced, lam), None
        if not current:
            return Verdict(active.step, None, Reason.NO_STEP_VERDICT, None), None
        return probe, None  # type: ignore[return-value]


class SpanMemberDecider(Decider):
    """A later region of a span: what the span's first region did in this step (they share
    its cache: its input is the span's input on a reuse, whatever the guards say now). No
    guards (the hot path of a reuse step, once per skipped block), unless per-sample streaks
    need the steps left."""

    def needs_guards(self, streaks: list[int] | None) -> bool:
        return streaks is not None

    def verdict(self, region, observed, active, cache, shared, guards, has_cache):  # type: ignore[no-untyped-def]
        pending = cache.pending
        if pending is None or pending.step != active.step:
            return Verdict(active.step, None, Reason.NO_SPAN_VERDICT, None), None
        return pending, None


_BY_ROLE: dict[Role, type[Decider]] = {
    Role.BLOCK: BlockDecider, Role.LEADER: LeaderDecider, Role.PROBE: ProbeDecider, Role.FOLLOWER: FollowerDecider,
}


def decider_for(region: GuardedRegion) -> Decider:
    """The decider of ``region``: by its role in the step (its plan's :meth:`DecisionPlan.role`)
    and its place in its span."""
    role = region.home.plan.role(region.spec.order)
    if region.span.position > 0:
        return SpanMemberDecider(role)
    return _BY_ROLE[role](role)
