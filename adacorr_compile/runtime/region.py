"""GuardedRegion: one Transformer block behind AdaCorrection's cache guard.

Per call (one denoising step), with ``h`` the block's observed stream inputs:

1. OEM: the offset score ``S`` of ``h`` against the reference input (the previous
   step's, or the one at the last fresh compute), ACM: ``lambda = clip(gamma*S, 0, 1)``
   (fused into compiled kernels by :class:`~adacorr_compile.runtime.fused.RegionMath`).
2. Decision (:func:`adacorr_compile.policies.decide`, one host read): reuse or compute.
3. Reuse: ``output = h + cached residual`` (offset-corrected cache), the block does
   not run. Compute: ``y = Block(h)``, optionally blended with the corrected cache by
   lambda, and the cache is refreshed with the fresh residual.

With ``scope="step"`` the regions of a graph take one decision per step: the first
region (leader) always computes, the second (probe) runs step 1 on the leader's fresh
residual against its value when the probe last computed (or, with ``probe_forecast``, that
value extrapolated from the probe's last two computes), and the later regions
(followers) take the probe's verdict without measuring; the probe's cache-finiteness
check covers the followers' caches, so a step costs one host read. The leader keeps no
cache (its fresh residual is the probe's signal and, after it, the probe's reference), and
directly chained regions after it share one cache (:class:`Span`, found by
``passes/chain_regions.py``): on a reuse the first ones pass their input on and the last adds
the span's residual; on a compute the last stores ``output - (the span's input)``.

The call is the region's decider (:mod:`.decide`, one per role, chosen when the region is
built: the verdict), then :func:`_reuse` or :func:`_compute`.

Outside a graph runtime (shape propagation at compile time) the region is just its body.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .. import acm
from .. import step as rstep
from ..config import AdaCorrConfig
from ..policies import (
    ConfigHome, HomeConfig, Role, caches_residuals, probe_forecasts, read_to_host, relative_change_from_sums,
    relative_change_sums,
)
from .decide import Decider, Taken as _Step, decider_for
from .fused import RegionMath
from .distributed import DecisionGroup
from .state import GenerationState, StepSignals


@dataclass(frozen=True)
class RegionSpec:
    path: str  # module path of the block, e.g. "transformer_blocks.3"
    order: int  # position among the graph's regions
    stream_pairs: tuple[tuple[int, int], ...]  # (input position, output position)
    observed: tuple[int, ...]  # input positions the OEM watches
    num_outputs: int
    key: str  # structural key; equal keys share one compiled body


@dataclass(frozen=True)
class Span:
    """Regions that share one cache (``passes/chain_regions.py``): each takes the previous
    one's outputs as its stream inputs and nothing else reads them. On a reuse the first
    ones pass their input on and the last adds the span's residual; on a compute every block
    runs and the last stores ``output - (the first one's input)``. A lone region is a span
    of one."""

    key: str  # the first region's path: the cache's name
    size: int
    position: int  # 0: the first region, which decides for the span and checks its cache
    sources: tuple[int, ...]  # for each stream pair of the last region, the first region's input position it started at

    @property
    def last(self) -> bool:
        """The span's last region: it adds (reuse) or stores (compute) the span's residual."""
        return self.position == self.size - 1


@dataclass(frozen=True)
class Active:
    """What a region needs from the graph runtime during one step."""

    state: GenerationState
    graph_id: Any  # (owner token, graph id): the module instance and the graph it runs
    step: int
    generation_known: bool = True  # a timestep or the user marks where generations end
    group: DecisionGroup | None = None  # the ranks that decide together (runtime/distributed.py)
    joint_gates: bool = False  # regional blocks under scope="step": slope gates judged per chain (step.settle_joint_gates)


ACTIVE: contextvars.ContextVar[Active | None] = contextvars.ContextVar("adacorr_active_step", default=None)


class GuardedRegion(torch.nn.Module):
    """A cache-guarded block (see module docstring)."""

    def __init__(self, spec: RegionSpec, body: torch.fx.GraphModule, config: AdaCorrConfig | ConfigHome) -> None:
        super().__init__()
        self.spec = spec
        self.body = body  # the outlined FX graph (eager)
        self.body_fn: Callable[..., Sequence[torch.Tensor]] = body  # replaced by the lowered body
        # the config and its decision plan, shared with the graph's other regions, its RegionMath
        # and the model's state (ModelState.adopt): one home, never a copy
        self.home = config if isinstance(config, ConfigHome) else ConfigHome(config)
        self.math = RegionMath(self.home)  # per-step score/refresh kernels; lower() shares one per graph
        self.executions = 0  # times the body actually ran through this region
        self._span = Span(spec.path, 1, 0, tuple(i for i, _ in spec.stream_pairs))  # chain_regions may join it to others
        self.decider: Decider = decider_for(self)  # chosen again when chain_regions sets the span
        # lower() sets it when the compiled parts run as CUDA graphs: their outputs are static
        # buffers that the next replay overwrites, so the inputs a region keeps for a later
        # call are copied (the residuals are the math's own allocations: never graphed)
        self.copy_kept = False

    config = HomeConfig()  # the config the region decides with: its home's (the compiled model's)

    @property
    def span(self) -> Span:
        return self._span

    @span.setter
    def span(self, span: Span) -> None:
        """Set by ``passes/chain_regions.py``: a later region of a span takes its first region's
        verdict, so its decider is chosen again (at compile time, once)."""
        self._span = span
        self.decider = decider_for(self)

    def rehome(self, home: ConfigHome) -> None:
        """Read the config from ``home`` from now on (the model's: :meth:`ModelState.adopt`), the
        region's RegionMath too."""
        self.home = home
        self.math.home = home
        self.decider = decider_for(self)

    def extra_repr(self) -> str:
        return f"path={self.spec.path!r}, streams={list(self.spec.stream_pairs)}, key={self.spec.key}"

    def forward(self, *args: Any) -> tuple[torch.Tensor, ...]:
        active = ACTIVE.get()
        if active is None:
            return tuple(self.body_fn(*args))
        if not isinstance(active, Active):  # a batch of requests (runtime/requests.py): per request rows
            return active.run(self, args)
        return _guarded_call(self, args, active)


def _flags(mask: list[bool], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(mask, device=like.device)


def _guarded_call(region: GuardedRegion, args: Sequence[Any], active: Active) -> tuple[torch.Tensor, ...]:
    spec, span, state = region.spec, region.span, active.state
    cache = state.cache((active.graph_id[0], span.key))
    observed = [args[i] for i in spec.observed]
    if span.position == 0:  # the span's members share its cache: its first region checks it
        signature = (span.size, tuple((tuple(t.shape), t.dtype, t.device) for t in observed))
        cache.check_signature(signature)
    decider = region.decider
    shared = state.signals(active.graph_id)
    taken = decider.decide(region, observed, active, cache, shared)
    if taken.mask is not None and all(taken.mask):
        return _reuse(region, args, observed, active, cache, shared, taken, decider.role)
    return _compute(region, args, observed, active, cache, shared, taken, decider.role)


def _reuse_values(region: GuardedRegion, args: Sequence[Any], cache: Any, active: Active) -> list[torch.Tensor]:
    """What a reuse returns per stream pair (:func:`adacorr_compile.step.reuse`): the input
    plus the (forecast) cached residual, or a copy of the cached output (``correction=False``)."""
    step = active.step
    if cache.gate_sums is not None and active.group is not None:  # the group's gate, before the slope is used
        region.math.settle_gates(active.group, active.state.signals(active.graph_id))
    if cache.gate_joint:  # the chain's gate (regional), before the slope is used
        rstep.settle_joint_gates(active.state.signals(active.graph_id).take_pending_gates(), caches_residuals(region.config),
                                 region.config.forecast_max_change)
    residuals = caches_residuals(region.config)
    cached = list(cache.values(residuals))
    previous, k = cache.forecast(step, cached)
    return rstep.reuse([args[i] for i, _ in region.spec.stream_pairs], cached, previous, k, cache.prev_valid, residuals)


def _reuse(
    region: GuardedRegion, args: Sequence[Any], observed: list[torch.Tensor], active: Active, cache: Any,
    shared: StepSignals, taken: _Step, role: str,
) -> tuple[torch.Tensor, ...]:
    """The block does not run. A span's regions pass their input on, the last one adds the
    span's (forecast) residual: the span's output is its input plus the sum of the blocks'
    residuals."""
    cfg, spec, span, state = region.config, region.spec, region.span, active.state
    stats = state.region_stats(spec.path)
    if role == "probe":  # the leader's residual is read: the next reference ("previous" drift) or dropped
        leader_res = shared.take_leader_res()
        if cfg.drift_reference == "previous":
            shared.move_probe_ref(leader_res, active.step, probe_forecasts(cfg))
    stats.count_reuse(active.step, taken.lam, taken.score)
    if not span.last:
        return tuple(_order_outputs(spec, [args[i] for i, _ in spec.stream_pairs]))
    outs = _order_outputs(spec, _reuse_values(region, args, cache, active))
    batch = (observed[0].shape[0] if observed else 1) if cfg.decision == "sample" else None
    cache.reused(batch, _kept(region, observed) if role == "block" and cfg.drift_reference == "previous" else None)
    return tuple(outs)


def _compute(
    region: GuardedRegion, args: Sequence[Any], observed: list[torch.Tensor], active: Active, cache: Any,
    shared: StepSignals, taken: _Step, role: str, fresh: list[Any] | None = None,
) -> tuple[torch.Tensor, ...]:
    """The block runs (for all samples); a lambda blend or per-sample mask applies where the
    decision asks for one, and the cache is refreshed (a span's by its last region).
    ``fresh``: the block's outputs where the caller ran it (a batch of requests runs it
    once for the rows of all requests that compute)."""
    cfg, spec, span, state = region.config, region.spec, region.span, active.state
    stats = state.region_stats(spec.path)
    has_cache, mask, lam = taken.has_cache, taken.mask, taken.lam
    if fresh is None:
        region.executions += 1
        fresh = list(region.body_fn(*args))
    by_pair = [fresh[j] for _, j in spec.stream_pairs]
    outs_paired = by_pair
    blend = cfg.blend and taken.by_policy and lam is not None
    if has_cache and (blend or (mask is not None and any(mask))):
        cached = _reuse_values(region, args, cache, active)
        if blend:
            outs_paired = [acm.blend(c, f, lam) for c, f in zip(cached, by_pair)]
        if mask is not None and any(mask):
            outs_paired = acm.keep_samples(_flags(mask, by_pair[0]), cached, outs_paired)
            stats.partial += 1
    if role == "leader":
        # the leader computes at every step and keeps nothing: its fresh residual is the
        # probe's signal in this step, and the probe's reference after it
        shared.give_leader_res(region.math.refresh(by_pair, [args[i] for i, _ in spec.stream_pairs])[0])
    elif span.size == 1:
        # the inputs a region keeps are the ones its own OEM compares with: only a region that
        # decides for itself measures its input (under scope="step" the probe scores the
        # leader's residual and the others measure nothing)
        keeps = region.decider.keeps(region.home.plan)
        inputs = [args[i] for i, _ in spec.stream_pairs]
        kept = _kept(region, observed) if keeps is not None else observed
        _refresh(region.math, cfg, cache, inputs, kept, by_pair, mask if has_cache else None, active, keeps)
    elif span.position == 0:
        cache.hold_span_input([args[i] for i in span.sources])  # the span's input, until its last region
    elif span.last:
        inputs = cache.take_span_input()
        if inputs is None or not rstep.same_shapes(inputs, by_pair):  # its first region did not compute: no residual
            cache.clear()
        else:
            _refresh(region.math, cfg, cache, inputs, observed, by_pair, None, active, None)
    if role == "probe":
        shared.move_probe_ref(shared.take_leader_res(), active.step, probe_forecasts(cfg))
        shared.note_followers_valid(None, reset=True)  # the followers refresh after the probe in this step
    elif role == "follower" and span.last:
        shared.note_followers_valid(cache.valid)
    if cfg.policy == "first_block" and spec.order == 0:
        _first_block_update(cfg, shared, (shared.leader_res if role == "leader" else cache.ref_res)[0], active.group)
    stats.computes += 1
    batch = None
    if cfg.decision == "sample":
        batch = len(mask) if mask is not None else (observed[0].shape[0] if observed else 1)
    cache.computed(span.last, mask, batch)
    reused = 0.0 if mask is None else sum(mask) / len(mask)
    stats.record(active.step, lam, taken.score, reused)
    return tuple(_order_outputs(spec, outs_paired))


def _kept(region: GuardedRegion, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Tensors the region keeps for a later call: copies when they may be CUDA-graph buffers."""
    return [t.clone() for t in tensors] if region.copy_kept else list(tensors)


def _order_outputs(spec: RegionSpec, by_pair: list[torch.Tensor]) -> list[torch.Tensor]:
    return rstep.order_outputs(spec.stream_pairs, spec.num_outputs, by_pair)


def _refresh(
    math: RegionMath,
    cfg: AdaCorrConfig,
    cache: Any,
    inputs: Sequence[torch.Tensor],
    observed: list[torch.Tensor],
    fresh: list[torch.Tensor],
    keep_mask: list[bool] | None,
    active: Active,
    keeps: str | None = "ref",
) -> None:
    """Store the fresh residuals ``fresh - inputs`` (:func:`adacorr_compile.step.fresh_residuals`,
    fused by ``math``; or the outputs) and the inputs the region's OEM compares with
    (``keeps``: ``"ref"`` the input of this compute, ``"prev"`` the previous step's, None:
    none); samples in ``keep_mask`` keep theirs.
    With ``forecast="linear"`` the values being replaced are kept, with their step, as the
    second point of the extrapolation (not after a partial, per-sample refresh)."""
    partial = keep_mask is not None and any(keep_mask)
    residual_cache = caches_residuals(cfg)
    group = active.group
    if cfg.forecast != "none":
        cache.rotate(partial, residual_cache, active.step)
    residuals, valid = math.refresh(fresh, inputs)
    # correction=False caches the outputs: a copy, the caller may write into what it gets
    outputs = None if residual_cache else rstep.cached_outputs(fresh)
    values = residuals if outputs is None else outputs
    if active.joint_gates and group is None:
        if cache.defer_gate(values, cfg.forecast_max_change):  # judged with the step's other blocks at the next reuse
            active.state.signals(active.graph_id).pending_gates.append(cache)
    elif cache.gate_slope(values, cfg.forecast_max_change, deferred=group is not None):
        active.state.signals(active.graph_id).pending_gates.append(cache)  # the group adds the gate's sums in the step's next all-reduce
    new_in = list(observed) if keeps == "ref" else None
    if partial:
        keep = _flags(keep_mask, residuals[0])
        residuals = acm.keep_samples(keep, cache.ref_res, residuals)
        outputs = acm.keep_samples(keep, cache.ref_out, outputs) if outputs is not None else None
        new_in = acm.keep_samples(keep, cache.ref_in, new_in) if new_in is not None and cache.ref_in is not None else new_in
        valid = acm.all_finite(residuals)
    cache.store(residuals, outputs, new_in, list(observed) if keeps == "prev" else None, valid)


def _first_block_update(cfg: AdaCorrConfig, signals: StepSignals, residual: torch.Tensor,
                        group: DecisionGroup | None) -> None:
    """FBCache: compare the first block's residual with the one at the last full step (under a
    decision group, from the sums of every rank's shard)."""
    ref = signals.fb_ref
    similar = False
    if ref is not None and ref.shape == residual.shape:
        if group is None:
            change = rstep.first_block_change(residual, ref)
        else:
            change = relative_change_from_sums(group.all_reduce(relative_change_sums(residual, ref)))
        similar = read_to_host([change])[0] < cfg.first_block_threshold
    signals.first_block_update(residual, similar)


# ------------------------------------------------------------------ a span as one call
ARG, PREVIOUS, CONSTANT = 0, 1, 2  # where a region's argument comes from in a SpanCall


class SpanCall(torch.nn.Module):
    """The regions of one span called as one module (``passes/lower.py`` builds it from
    their pieces of the split graph): each region's arguments are, per position, one of the
    call's own arguments (``ARG``), an output of the previous region (``PREVIOUS``) or a
    constant. Called as its regions would be one after the other, except where the first
    one has reused for the whole span in this step: then the regions between it and the last
    do what a reuse makes them do (pass their stream inputs on, count the reuse, add to
    the trace) without a module call or a decision each, and the last adds the span's
    residual. On a reuse step that is most of the runtime's own cost per skipped block
    (benchmarks/region_overhead.py, third table).

    ``result`` gives what the call returns from the last region's outputs: ``None`` all of
    them (a tuple), an int one of them, a tuple of ints those."""

    def __init__(self, regions: Sequence[GuardedRegion], plans: Sequence[Sequence[tuple[int, Any]]],
                 result: int | tuple[int, ...] | None) -> None:
        super().__init__()
        self.regions = torch.nn.ModuleList(regions)
        self._regions = tuple(regions)  # iterated per call: a tuple, not the ModuleList's indexing
        self.plans = tuple(tuple(p) for p in plans)
        self.result = result
        # the fast path covers regions that take the step's verdict as it is: followers of a
        # span decided for the whole batch (chain_regions joins only those)
        skips = (len(regions) > 2 and not regions[0].home.plan.per_sample
                 and all(r.decider.role is Role.FOLLOWER for r in regions[1:]))
        self.skip_plan = _skip_plan(self._regions, self.plans) if skips else None

    def extra_repr(self) -> str:
        return f"span={self.regions[0].span.key!r}, regions={len(self.regions)}"

    def forward(self, *flat: Any) -> Any:
        regions, plans = self._regions, self.plans
        outs = regions[0](*_span_args(plans[0], flat, None))
        last = len(regions) - 1
        first = 1
        active = ACTIVE.get()
        if self.skip_plan is not None and isinstance(active, Active):  # not for a batch of requests
            pending = active.state.cache((active.graph_id[0], regions[0].span.key)).pending
            if pending is not None and pending.step == active.step and pending.reuses_all():
                # the span reuses: the regions between pass their stream inputs on (what
                # _reuse returns for them), so the last one's inputs are known from here
                for region in regions[1:last]:
                    active.state.region_stats(region.spec.path).count_reuse(active.step, pending.lam, None)
                outs = regions[last](*_span_args(self.skip_plan, flat, outs))
                first = last + 1
        for k in range(first, last + 1):
            outs = regions[k](*_span_args(plans[k], flat, outs))
        result = self.result
        if result is None:
            return outs
        if isinstance(result, int):
            return outs[result]
        return tuple(outs[j] for j in result)


def _skip_plan(regions: Sequence[GuardedRegion], plans: Sequence[Sequence[tuple[int, Any]]]) -> tuple[tuple[int, Any], ...] | None:
    """The last region's arguments when the regions between the first and the last pass
    their stream inputs on (a reuse of the span): each ``PREVIOUS`` argument followed back
    through them to a call argument, a constant or an output of the first region. None where
    an output of a region between is not one of its stream outputs (no fast path then)."""
    last = len(regions) - 1
    plan = []
    for kind, v in plans[last]:
        k = last - 1
        while kind == PREVIOUS and k > 0:
            # output v of region k is, on a reuse, its input i of the stream pair (i, v)
            i = next((i for i, j in regions[k].spec.stream_pairs if j == v), None)
            if i is None:
                return None
            kind, v = plans[k][i]
            k -= 1
        plan.append((kind, v))
    return tuple(plan)


def _span_args(plan: Sequence[tuple[int, Any]], flat: Sequence[Any], previous: Sequence[Any] | None) -> list[Any]:
    return [flat[v] if kind == ARG else previous[v] if kind == PREVIOUS else v for kind, v in plan]  # type: ignore[index]
