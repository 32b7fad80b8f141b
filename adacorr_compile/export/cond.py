"""CondRegion: one guarded block of the ONNX step graph, as ``torch.cond``.

It is the runtime's region step (:mod:`adacorr_compile.runtime.region`) with the host's
branches as tensors: the cache is a :class:`adacorr_compile.step.RegionCache` of state
tensors, a reuse and a refresh are the functions of :mod:`adacorr_compile.step`, and the
decision is :func:`adacorr_compile.policies.decide_tensor`, the tensor twin of the host
decision. ``torch.onnx.export`` turns the ``torch.cond`` into an ONNX ``If``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import torch
import torch.fx as fx

from .. import acm
from .. import step as rstep
from ..config import AdaCorrConfig
from ..policies import (
    cap_streaks, decide_tensor, first_region_computes_always, forecast_keeps_previous, guard_checks, next_streaks,
    probe_forecasts, Role, step_role,
)
from .plan import RegionPlan, _reference_kind, _residual_kind
from .sizes import _aliasing_outputs, _same_layout

Tensors = list[torch.Tensor]

# the operands of the torch.cond, in this order: the block's tensor inputs, the reference
# inputs ("cached" drift), the cache, its forecast point, the span's input, the forecast's
# (usable, k), the per-sample reuse mask, the cache-valid flag and the blend weight
_SEGMENTS = ("args", "ref", "cache", "prev", "span", "fc", "mask", "valid", "lam")


def _pack(parts: dict[str, Sequence[torch.Tensor]]) -> tuple[tuple[torch.Tensor, ...], tuple[int, ...]]:
    """The ``torch.cond`` operands (flat tensors) and the segment sizes to unpack them by."""
    return tuple(t for name in _SEGMENTS for t in parts[name]), tuple(len(parts[name]) for name in _SEGMENTS)


def _unpack(ops: Sequence[torch.Tensor], sizes: Sequence[int]) -> dict[str, tuple[torch.Tensor, ...]]:
    out, at = {}, 0
    for name, n in zip(_SEGMENTS, sizes):
        out[name] = tuple(ops[at : at + n])
        at += n
    return out


@dataclass
class RegionSignals:
    """What the other regions of a step pass a :class:`CondRegion` (its ``extra`` inputs)."""

    fb_ref: torch.Tensor | None = None  # first_block, the first region: the reference residual
    similar: torch.Tensor | None = None  # first_block, a later region: the first block's verdict
    # scope="step", the probe: the leader's fresh residuals, their reference, the followers' cache-valid flags
    leader_res: Tensors = field(default_factory=list)
    probe_ref: Tensors = field(default_factory=list)
    followers_valid: Tensors = field(default_factory=list)
    # probe_forecast: the reference before the last, and the steps of the two (0-d int64)
    probe_prev: Tensors = field(default_factory=list)
    probe_steps: tuple[torch.Tensor, torch.Tensor] | None = None
    # scope="step", a follower: the probe's verdict (batch: reuse; sample: consulted and the
    # per-sample proposal), its lambda, and for the last region of a span the span's input
    probe_reuse: torch.Tensor | None = None
    probe_consulted: torch.Tensor | None = None
    probe_proposed: torch.Tensor | None = None
    probe_lam: torch.Tensor | None = None
    span_in: Tensors = field(default_factory=list)


class TensorVerdict(NamedTuple):
    """A CondRegion's decision in tensors. ``reuse``: 0-d bool, or the ``[B]`` mask under
    ``decision="sample"``; ``blend_lam``: lambda where the policy chose a compute, NaN
    where a compute is forced (no blend); ``by_policy``/``proposed``: the probe's, for the
    followers' per-sample decisions."""

    reuse: torch.Tensor
    nonfinite: torch.Tensor
    score: torch.Tensor
    lam: torch.Tensor
    blend_lam: torch.Tensor
    by_policy: torch.Tensor | None = None
    proposed: torch.Tensor | None = None


class CondRegion(torch.nn.Module):
    """One guarded block as ``torch.cond(reuse, reuse_fn, compute_fn, operands)``.

    ``forward(step, steps_left, *block_inputs, *state, *extra)`` returns
    ``(*outputs, *new_state, reused, nonfinite, lambda, score, *extra_out)``. ``extra``:
    the first block's reference residual (``first_block``, the first region), its verdict
    (``first_block``, the region that decides after it); with ``scope="step"``, for the
    probe: the leader's fresh residuals, their reference (state ``adacorr_probe_ref_<j>``)
    and the followers' cache-valid flags, for the followers: the probe's ``(reuse,
    lambda)`` and, for the last region of a span, the span's input (the first region's
    stream inputs). In a span, a reuse of any region before the last passes its stream inputs
    on; the last adds the span's residual. ``extra_out``: the first block's verdict and new reference residual
    (``first_block``, the first region); the leader's fresh residuals; the probe's
    ``(reuse, lambda, *new reference residuals)``.
    The decision and the per-branch semantics match
    :func:`adacorr_compile.runtime.region._guarded_call`.
    """

    def __init__(
        self, body: fx.GraphModule, plan: RegionPlan, config: AdaCorrConfig, carried: Sequence[int] = (), leader_pairs: int = 0
    ) -> None:
        super().__init__()
        self.leader_pairs = leader_pairs  # scope="step": stream pairs of the leader (the probe's signal)
        self.body = body
        self.plan = plan
        self.config = config
        self.carried = list(carried)  # size inputs passed as empty [size, 0] tensors
        self.kinds = [s.kind for s in plan.states]
        self.role = step_role(config, plan.index)
        self.residuals = _residual_kind(config) == "ref_res"
        # torch.cond rejects outputs whose strides involve compound sizes (SD3's token count
        # (H/2)*(W/2) with dynamic H, W): the branches then return flat tensors, reshaped after
        self.flat = any(isinstance(d, list) for s in plan.states for d in s.dims)
        # torch.cond rejects a branch output that aliases an operand or another output
        # (Wan's block passes temb.float() through: a no-op view of its input); those are cloned
        self.aliasing = _aliasing_outputs(body)

    def extra_repr(self) -> str:
        return f"path={self.plan.path!r}"

    def forward(self, step: torch.Tensor, steps_left: torch.Tensor, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n_in, n_state = self.plan.num_inputs, len(self.kinds)
        args = list(flat[:n_in])
        cache = self._cache(step, flat[n_in : n_in + n_state])
        named = self._extra_inputs(list(flat[n_in + n_state :]))
        observed = [args[i] for i in self.plan.observed]
        verdict = self._decide(step, steps_left, observed, cache, named)
        reuse = verdict.reuse.all() if self.config.decision == "sample" else verdict.reuse
        outs, refreshed = self._run(step, reuse, verdict, args, observed, cache, named)
        new = rstep.RegionCache(**refreshed, **self._advance(step, reuse, verdict, cache, refreshed[_residual_kind(self.config)]))
        return (*outs, *new.to_state(self.kinds), *self._stats(step, reuse, verdict),
                *self._signals_out(step, reuse, verdict, args, outs, new, named))

    # ---------------------------------------------------------------- inputs
    def _cache(self, step: torch.Tensor, state: Sequence[torch.Tensor]) -> rstep.RegionCache:
        """The region's state tensors as a cache; what it does not keep reads as empty
        (finite, no streak)."""
        return rstep.RegionCache.from_state(self.kinds, state, valid=torch.ones((), dtype=torch.bool, device=step.device),
                                            consecutive=torch.zeros_like(step))

    def _extra_inputs(self, extra: Tensors) -> RegionSignals:
        """Name the ``extra`` inputs (see the class docstring)."""
        cfg, role = self.config, self.role
        if role == Role.FOLLOWER and cfg.decision == "sample":  # (no spans: every region has its own cache)
            consulted, proposed, lam = extra
            return RegionSignals(probe_consulted=consulted, probe_proposed=proposed, probe_lam=lam)
        if role == Role.FOLLOWER:  # the last region of a span also gets the span's input
            return RegionSignals(probe_reuse=extra[0], probe_lam=extra[1], span_in=list(extra[2:]))
        signals = RegionSignals()
        if cfg.policy == "first_block" and self.plan.index == 0:
            signals.fb_ref = extra.pop(0)
        elif cfg.policy == "first_block":
            signals.similar = extra.pop(0)
        if role == Role.PROBE:
            n = self.leader_pairs
            signals.leader_res, signals.probe_ref = list(extra[:n]), list(extra[n : 2 * n])
            rest = extra[2 * n :]
            if probe_forecasts(cfg):
                signals.probe_prev, signals.probe_steps = list(rest[:n]), (rest[n], rest[n + 1])
                rest = rest[n + 2 :]
            signals.followers_valid = list(rest)
        return signals

    # ---------------------------------------------------------------- decide
    def _decide(self, step: torch.Tensor, steps_left: torch.Tensor, observed: Tensors, cache: rstep.RegionCache,
                named: RegionSignals) -> TensorVerdict:
        """The verdict, as the host's ``_decide``: a follower takes the probe's (under its own
        guards and per-sample cap with ``decision="sample"``); the others measure and decide."""
        cfg, role = self.config, self.role
        has_cache = step > 0
        nan_lam = torch.full((), float("nan"), dtype=torch.float32, device=step.device)
        if role == Role.FOLLOWER and cfg.decision == "sample":
            forced = torch.zeros_like(has_cache)
            for _, holds in guard_checks(cfg, step, steps_left, cache.consecutive.amin(0), has_cache, False):
                forced = forced | holds
            follows = named.probe_consulted & ~forced
            reuse = cap_streaks(cfg, named.probe_proposed, cache.consecutive, step, steps_left) & follows
            by_policy = follows & ~reuse.all()
            return TensorVerdict(reuse, torch.zeros_like(has_cache), nan_lam, named.probe_lam,
                           torch.where(by_policy, named.probe_lam, nan_lam))
        if role == Role.FOLLOWER:  # the probe's verdict covers every guard and every cache's finiteness
            return TensorVerdict(named.probe_reuse & has_cache, torch.zeros_like(has_cache), nan_lam, named.probe_lam,
                           torch.where(has_cache, named.probe_lam, nan_lam))
        if role == Role.LEADER:  # computes at every step, measures nothing
            score, lam = nan_lam, nan_lam
        else:
            current, reference = ((named.leader_res, self._probe_reference(step, named)) if role == Role.PROBE
                                  else (observed, getattr(cache, _reference_kind(cfg)) or []))
            score, lam = rstep.measure(cfg.score, current, reference, cfg.spatial_weight, cfg.gamma, cfg.decision == "sample")
        valid_all = cache.valid
        for v in named.followers_valid:
            valid_all = valid_all & v
        reuse, nonfinite, by_policy, proposed = decide_tensor(
            cfg, step, steps_left, cache.consecutive, has_cache, valid_all, self.plan.index == 0, lam, named.similar, score
        )
        # blend=True blends a compute the policy chose, never a forced one: NaN marks "do not blend"
        return TensorVerdict(reuse, nonfinite, score, lam, torch.where(by_policy, lam, nan_lam), by_policy, proposed)

    def _probe_reference(self, step: torch.Tensor, named: RegionSignals) -> Tensors:
        """What the probe scores against: its reference, or under ``probe_forecast`` that
        reference extrapolated to ``step`` (:func:`adacorr_compile.step.probe_reference`)."""
        if named.probe_steps is None:
            return named.probe_ref
        distinct, k, gap = rstep.steps_ahead(step, *named.probe_steps)
        return rstep.probe_reference(named.probe_ref, named.probe_prev, k, gap, self.config.forecast_max_change,
                                     usable=distinct)

    # ---------------------------------------------------------------- reuse | compute
    def _run(self, step: torch.Tensor, reuse: torch.Tensor, verdict: TensorVerdict, args: list[Any], observed: Tensors,
             cache: rstep.RegionCache, named: RegionSignals) -> tuple[Tensors, dict[str, Any]]:
        """The block's outputs and the refreshed cache's fields: ``torch.cond`` over
        :meth:`_reuse_branch` and :meth:`_compute_branch` (the first block alone when it
        always computes). Parameters are closed over (``torch.cond`` traces its branches
        with Dynamo, which gives parameters passed as operands symbolic shapes); SymInt
        inputs are unused by the body (see ``sizes._sizes_from_tensors``)."""
        cfg, plan = self.config, self.plan
        for i in self.carried:  # sizes the body reads off an empty [size, 0] tensor
            args[i] = torch.empty((args[i], 0), dtype=torch.float32, device=step.device)
        tensor_pos = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and not isinstance(a, torch.nn.Parameter)]
        # "cached" drift: the reference input changes only on a compute, so it goes through
        # the branches; "previous": it is the observed input either way, set after them
        reference = getattr(cache, _reference_kind(cfg)) or []
        cached = cache.values(self.residuals) or []
        fc: tuple[torch.Tensor, ...] = ()
        if cache.prev_val:  # forecast="linear": extrapolate from the last two computes
            distinct, k, _ = rstep.steps_ahead(step, cache.ref_step, cache.prev_step)
            fc = (distinct & cache.prev_valid, k)
        operands, sizes = _pack({
            "args": [args[i] for i in tensor_pos], "ref": reference if cfg.drift_reference == "cached" else [],
            "cache": cached, "prev": cache.prev_val or [], "span": named.span_in, "fc": fc,
            "mask": [verdict.reuse] if cfg.decision == "sample" else [], "valid": [cache.valid], "lam": [verdict.blend_lam],
        })

        def reuse_fn(*ops: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return self._reuse_branch(args, tensor_pos, _unpack(ops, sizes))

        def compute_fn(*ops: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return self._compute_branch(args, tensor_pos, _unpack(ops, sizes))

        if plan.index == 0 and first_region_computes_always(cfg):  # the first block always computes, no branch
            results = compute_fn(*operands)
        else:
            results = torch.cond(reuse, reuse_fn, compute_fn, operands)
        n_ref, n_out = sizes[1], plan.num_outputs
        shapes = [args[i].shape for i, _ in sorted(plan.stream_pairs, key=lambda p: p[1])]
        shapes += [o.shape for o in observed[:n_ref]] + [c.shape for c in cached] + [cache.valid.shape]
        if self.flat:
            results = tuple(r.reshape(shape) for r, shape in zip(results, shapes))
        new_ref = list(results[n_out : n_out + n_ref])
        if not n_ref and reference:  # "previous": the input of this step, whatever the branch
            new_ref = [o.clone() for o in observed]
        return list(results[:n_out]), {"valid": results[-1], _reference_kind(cfg): new_ref,
                                       _residual_kind(cfg): list(results[n_out + n_ref : n_out + n_ref + len(cached)])}

    def _block_args(self, args: list[Any], tensor_pos: Sequence[int], tensors: Sequence[torch.Tensor]) -> list[Any]:
        a = list(args)
        for i, v in zip(tensor_pos, tensors):
            a[i] = v
        return a

    def _reuse_values(self, a: list[Any], p: dict[str, tuple[torch.Tensor, ...]]) -> Tensors:
        """:func:`adacorr_compile.step.reuse` on the branch's operands."""
        usable, k = p["fc"] if p["fc"] else (None, 0.0)
        return rstep.reuse([a[i] for i, _ in self.plan.stream_pairs], p["cache"], p["prev"] if p["fc"] else None, k,
                           usable, self.residuals)

    def _ordered(self, by_pair: Sequence[torch.Tensor]) -> list[Any]:
        return rstep.order_outputs(self.plan.stream_pairs, self.plan.num_outputs, by_pair)

    def _reuse_branch(self, args: list[Any], tensor_pos: Sequence[int], p: dict[str, tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        """The block does not run: the corrected cache; a span's region before its last
        passes its input on (the last adds the span's residual). The state is unchanged."""
        a = self._block_args(args, tensor_pos, p["args"])
        plan = self.plan
        if plan.span_size > 1 and not plan.span_tail:
            outs = self._ordered([a[i].clone() for i, _ in plan.stream_pairs])
        else:
            outs = self._ordered(self._reuse_values(a, p))
        return _same_layout((*outs, *(r.clone() for r in p["ref"]), *(c.clone() for c in p["cache"]), p["valid"][0].clone()),
                            self.flat)

    def _compute_branch(self, args: list[Any], tensor_pos: Sequence[int], p: dict[str, tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        """The block runs; a blend by lambda or the reused samples' cache where the decision
        asks for them, and the refresh: :func:`adacorr_compile.step.fresh_residuals` from
        the region's (or the span's) input, the samples that reused keeping theirs."""
        cfg, plan = self.config, self.plan
        a = self._block_args(args, tensor_pos, p["args"])
        lam = p["lam"][0]
        fresh = [f.clone() if j in self.aliasing else f for j, f in enumerate(self.body(*a))]
        by_pair = [fresh[j] for _, j in plan.stream_pairs]
        outs_paired = by_pair
        cached = self._reuse_values(a, p) if p["cache"] and (cfg.blend or cfg.decision == "sample") else []
        if cfg.blend and self.role != "leader":  # the leader measures nothing: no lambda to blend by
            blends = acm.per_sample(torch.isfinite(lam), by_pair[0])  # the policy chose this compute (see TensorVerdict)
            outs_paired = [torch.where(blends, acm.blend(c, f, lam), f) for c, f in zip(cached, by_pair)]
        keep = p["mask"][0] if p["mask"] else None  # the samples that reuse
        if keep is not None and cached:  # they return their cache, as a reuse does
            outs_paired = acm.keep_samples(keep, cached, outs_paired)
        new_cache: Tensors = []
        new_valid = p["valid"][0].clone()
        if p["cache"]:
            inputs = list(p["span"]) if p["span"] else [a[i] for i, _ in plan.stream_pairs]
            residuals, new_valid = rstep.fresh_residuals(by_pair, inputs)
            new_cache = residuals if self.residuals else rstep.cached_outputs(by_pair)
            if keep is not None:  # a partial refresh: the samples that reused keep their cache
                new_cache = acm.keep_samples(keep, list(p["cache"]), new_cache)
                new_valid = acm.all_finite(new_cache)
        new_ref = [a[i].clone() for i in plan.observed] if p["ref"] else []
        if keep is not None and new_ref:
            new_ref = acm.keep_samples(keep, list(p["ref"]), new_ref)
        return _same_layout((*self._ordered(outs_paired), *new_ref, *new_cache, new_valid), self.flat)

    # ---------------------------------------------------------------- after the branch
    def _advance(self, step: torch.Tensor, reuse: torch.Tensor, verdict: TensorVerdict, cache: rstep.RegionCache,
                 new_values: Tensors) -> dict[str, Any]:
        """The new cache's other fields: the streak, and under ``forecast="linear"`` the
        forecast's points (``new_values``: the refreshed cache values): a compute
        rotates the cache into the previous values and records its step (the host's
        :meth:`RegionCache.rotate` and :meth:`RegionCache.gate_slope`)."""
        cfg = self.config
        per_sample = cfg.decision == "sample"
        new: dict[str, Any] = {"consecutive": next_streaks(verdict.reuse if per_sample else reuse, cache.consecutive)}
        if not cache.prev_val:
            return new
        cached, has_cache = cache.values(self.residuals), step > 0
        new["prev_val"] = [torch.where(reuse, p, c) for p, c in zip(cache.prev_val, cached)]
        slope_from = cache.valid
        if per_sample:
            # values some samples kept from an earlier step have no single step: no slope
            # from a partial refresh's cache, nor from the one before it
            partial = verdict.reuse.any()
            slope_from = cache.valid & forecast_keeps_previous(partial, cache.mixed)
            new["mixed"] = (reuse & cache.mixed) | (~reuse & partial)
        if cfg.forecast_max_change != float("inf"):  # no slope from a fast change
            since = (step - cache.ref_step).clamp(min=1).to(torch.float32)
            slope_from = rstep.slope_usable(slope_from, new_values, cached, since, cfg.forecast_max_change)
        new["prev_valid"] = (reuse & cache.prev_valid) | (~reuse & slope_from)  # onnxruntime has no bool Where
        new["ref_step"] = torch.where(reuse, cache.ref_step, step)
        # the first compute of a generation has no earlier one: equal steps, no extrapolation
        new["prev_step"] = torch.where(reuse, cache.prev_step, torch.where(has_cache, cache.ref_step, step))
        return new

    def _stats(self, step: torch.Tensor, reuse: torch.Tensor, verdict: TensorVerdict) -> tuple[torch.Tensor, ...]:
        """``(reused, nonfinite, lambda, score)``: the share of the samples that reused (1 or 0
        with one decision for the batch); NaN where nothing was measured, as on the host."""
        nan = torch.full((), float("nan"), dtype=torch.float32, device=step.device)
        reused = verdict.reuse.to(torch.float32).mean() if self.config.decision == "sample" else reuse
        if self.role in (Role.FOLLOWER, Role.LEADER):
            return reused, verdict.nonfinite, nan.clone(), nan.clone()
        has_cache = step > 0
        lam_mean, score_mean = verdict.lam.to(torch.float32).mean(), verdict.score.to(torch.float32).mean()
        return reused, verdict.nonfinite, torch.where(has_cache, lam_mean, nan), torch.where(has_cache, score_mean, nan)

    def _signals_out(self, step: torch.Tensor, reuse: torch.Tensor, verdict: TensorVerdict, args: list[Any], outs: Tensors,
                     new: rstep.RegionCache, named: RegionSignals) -> Tensors:
        """What this region passes the others: the first block's verdict and reference, the
        leader's fresh residuals, the probe's verdict and its moved reference."""
        cfg, plan = self.config, self.plan
        extra: Tensors = []
        has_cache = step > 0
        if cfg.policy == "first_block" and plan.index == 0:
            residual = new.values(self.residuals)[0]
            similar = has_cache & (rstep.first_block_change(residual, named.fb_ref) < cfg.first_block_threshold)
            extra = [similar, torch.where(similar, named.fb_ref, residual)]
        if self.role == Role.LEADER:
            extra += rstep.fresh_residuals([outs[j] for _, j in plan.stream_pairs], [args[i] for i, _ in plan.stream_pairs])[0]
        elif self.role == Role.PROBE:
            moved = self._move_probe_ref(step, reuse, named)
            if cfg.decision == "sample":  # the followers decide per sample under their own guards and cap
                extra += [verdict.by_policy | verdict.reuse.any(), verdict.proposed, verdict.lam.to(torch.float32), *moved]
            else:
                extra += [reuse, verdict.blend_lam.to(torch.float32).reshape(()), *moved]
        return extra

    def _move_probe_ref(self, step: torch.Tensor, reuse: torch.Tensor, named: RegionSignals) -> Tensors:
        """The probe's new reference (the host's :meth:`StepSignals.move_probe_ref`): the
        leader's residual when the probe computes ("cached" drift) or at every step
        ("previous"); under ``probe_forecast`` also the replaced reference and the two steps."""
        moves = ~reuse if self.config.drift_reference == "cached" else torch.ones_like(reuse)
        moved = [torch.where(moves, c, r) for r, c in zip(named.probe_ref, named.leader_res)]
        if named.probe_steps is not None:
            ref_step, prev_step = named.probe_steps
            has_cache = step > 0
            moved += [torch.where(moves, r, p) for r, p in zip(named.probe_ref, named.probe_prev)]
            moved += [torch.where(moves, step, ref_step), torch.where(moves, torch.where(has_cache, ref_step, step), prev_step)]
        return moved
