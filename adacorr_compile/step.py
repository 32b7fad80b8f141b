"""The region step, written once: typed cache state and the tensor functions of a reuse,
a refresh and a forecast, for the runtime and the ONNX export alike.

The runtime (:mod:`adacorr_compile.runtime.region`) calls these functions with the
branches it knows on the host (a reuse or a compute, a forecast or none: Python values);
the ONNX export (:mod:`adacorr_compile.export.cond`) calls the same functions with 0-d
tensors for those values and traces them under ``torch.cond``. Nothing of the method is
written a second time for the export.

:class:`RegionCache` is one region's (or one span's) cache. Its field names are the
export's state kinds (``adacorr_r<k>_<kind>``: ``ref_in``, ``prev_in``, ``ref_res``,
``ref_out``, ``valid``, ``consecutive``, ``prev_val``, ``prev_valid``, ``ref_step``,
``prev_step``, ``mixed``); the host keeps a few more (``signature``, ``streaks``,
``pending``, ``span_in``). Its transitions are its methods: nothing outside writes its
fields. :class:`StepSignals` is what the regions of one graph pass each other within a
step (the probe's reference and its forecast points, the first block's reference).

Nothing here imports the runtime or the export (arrows point down only).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Sequence

import torch

from . import acm, oem
from .policies import Verdict, forecast_keeps_previous, next_streaks, relative_change

Tensors = list[torch.Tensor]


# --------------------------------------------------------------------------- the math


def measure(
    kind: str, observed: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], spatial_weight: float, gamma: float,
    per_sample: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(score, lambda)``: the OEM offset score of ``observed`` against ``reference`` and
    the ACM's correction weight ``clip(gamma * S, 0, 1)`` (paper, eqs. 4-6)."""
    score = oem.score(kind, list(observed), list(reference), spatial_weight, per_sample)
    return score, acm.correction_weight(score, gamma)


def measure_partials(observed: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> torch.Tensor:
    """:func:`measure`'s score as partial sums (``[B, oem.PARTIALS]``,
    :func:`adacorr_compile.oem.score_partials`): what a rank of a decision group measures on
    its shard, for the group's all-reduce."""
    return oem.score_partials(list(observed), list(reference))


def measure_from_partials(
    kind: str, partials: torch.Tensor, spatial_weight: float, gamma: float, per_sample: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`measure` from partial sums added over the group's ranks."""
    score = oem.score_from_partials(kind, partials, spatial_weight, per_sample)
    return score, acm.correction_weight(score, gamma)


def fresh_residuals(fresh: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> tuple[Tensors, torch.Tensor]:
    """A refresh's math: ``fresh - inputs`` per stream and whether all of it is finite
    (0-d bool). The runtime compiles it into its refresh kernel, the export traces it."""
    return acm.fresh_residuals(list(fresh), list(inputs))


def cached_outputs(fresh: Sequence[torch.Tensor]) -> Tensors:
    """What ``correction=False`` caches: the outputs, copied (the caller may write into
    what it returns)."""
    return [f.clone() for f in fresh]


def steps_ahead(step: Any, ref_step: Any, prev_step: Any) -> tuple[Any, Any, Any]:
    """A first-order forecast's terms from the steps of its two points: whether they are
    distinct, ``k`` (gaps past the last point at ``step``) and the gap. Host ints give
    Python values (``k`` a float); 0-d int64 tensors (the export's state, equal until two
    computes) give float32 tensors, the gap clamped to 1."""
    if isinstance(ref_step, torch.Tensor):
        gap = (ref_step - prev_step).clamp(min=1).to(torch.float32)
        return ref_step > prev_step, (step - ref_step).to(torch.float32) / gap, gap
    distinct = ref_step > prev_step
    k = (step - ref_step) / (ref_step - prev_step) if distinct else 0.0
    return distinct, k, float(ref_step - prev_step)


def reuse(
    inputs: Sequence[torch.Tensor], cached: Sequence[torch.Tensor], previous: Sequence[torch.Tensor] | None,
    k: float | torch.Tensor, usable: torch.Tensor | None, residuals: bool,
) -> Tensors:
    """What a reuse returns per stream: ``input + cached residual`` (``residuals``), or the
    cached output, each forecast from ``previous`` by ``k`` where given
    (:func:`adacorr_compile.acm.reuse_values`). Cached outputs returned as they are (no
    forecast) are copies, so that an in-place op on the result cannot change the cache."""
    values = acm.reuse_values(list(inputs), list(cached), None if previous is None else list(previous), k, usable, residuals)
    if residuals or previous is not None:  # new tensors (a forecast is a torch.where)
        return values
    return [v.clone() for v in values]


def probe_reference(
    reference: Sequence[torch.Tensor], previous: Sequence[torch.Tensor], k: torch.Tensor, gap: torch.Tensor,
    max_change: float | torch.Tensor, usable: torch.Tensor | None = None,
) -> Tensors:
    """``probe_forecast``: the probe's reference extrapolated to this step
    (:func:`adacorr_compile.acm.forecast_reference`)."""
    return acm.forecast_reference(list(reference), list(previous), k, gap, max_change, usable=usable)


def slope_usable(usable: torch.Tensor, new: Sequence[torch.Tensor], old: Sequence[torch.Tensor], gap: Any,
                 max_change: float) -> torch.Tensor:
    """Whether the values being replaced still give a slope: ``usable`` and, unless
    ``max_change`` is infinite, the change to ``new`` over ``gap`` steps steady
    (:func:`adacorr_compile.acm.steady`; a device flag, no host read)."""
    if max_change == float("inf"):
        return usable
    return usable & acm.steady(list(new), list(old), gap, max_change)


def first_block_change(residual: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """FBCache: the first block's residual's relative change since its reference."""
    return relative_change(residual, reference)


def order_outputs(stream_pairs: Sequence[tuple[int, int]], num_outputs: int, by_pair: Sequence[Any]) -> list[Any]:
    """A block's outputs in their order from the values per stream pair ``(input, output)``."""
    outs: list[Any] = [None] * num_outputs
    for (_, j), v in zip(stream_pairs, by_pair):
        outs[j] = v
    return outs


def same_shapes(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and x.dtype == y.dtype for x, y in zip(a, b))


# --------------------------------------------------------------------------- typed state

_LISTS = ("prev_in", "ref_in", "ref_res", "ref_out", "prev_val", "span_in")


@dataclass
class RegionCache:
    """One guarded region's cache, or one span's (see the module docstring for the names)."""

    prev_in: Tensors | None = None  # observed inputs at the previous call
    ref_in: Tensors | None = None  # observed inputs at the last fresh compute
    ref_res: Tensors | None = None  # per output: output - stream input, at the last compute
    ref_out: Tensors | None = None  # per output: the output itself (correction=False)
    valid: torch.Tensor | None = None  # 0-d bool tensor: the last compute was finite
    consecutive: Any = 0  # reuses in a row (the export: an int64 tensor, [B] per sample)
    signature: tuple | None = None
    ref_step: Any = None  # step of the last compute (forecast="linear")
    prev_val: Tensors | None = None  # the cached values of the compute before it
    prev_step: Any = None
    prev_valid: torch.Tensor | None = None  # 0-d bool: prev_val is finite and the change since it steady
    streaks: list[int] | None = None  # decision="sample": consecutive reuses per sample
    mixed: Any = False  # the cached values come from a partial (per-sample) refresh: not one step
    # a span of chained regions (one cache): the first region's verdict in this step
    # (a policies.Verdict) and, on a compute, its input until the last region stores the residual
    pending: Verdict | None = None
    span_in: Tensors | None = None
    # under a decision group: the slope gate's sums of squares on this rank's shard, until the
    # group has added them (settle_gate), and the gap between the two computes
    gate_sums: torch.Tensor | None = None
    gate_gap: float = 0.0
    # regional compilation: the slope gate waits to be judged on the sum of the step's chain of
    # block caches, as one span's cache would be (settle_joint_gates)
    gate_joint: bool = False

    # ------------------------------------------------------------ as export state
    @classmethod
    def from_state(cls, kinds: Sequence[str], values: Sequence[torch.Tensor], **empty: Any) -> "RegionCache":
        """The cache from the export's state tensors, named by their kinds; ``empty``: the
        values of fields the state does not hold (e.g. ``valid`` of a cache kept elsewhere)."""
        cache = cls(**empty)
        for kind, value in zip(kinds, values):
            if kind in _LISTS:
                setattr(cache, kind, [*(getattr(cache, kind) or []), value])
            else:
                setattr(cache, kind, value)
        return cache

    def to_state(self, kinds: Sequence[str]) -> Tensors:
        """The export's state tensors, in the order of ``kinds`` (inverse of :meth:`from_state`)."""
        taken = {name: iter(getattr(self, name) or ()) for name in _LISTS}
        return [next(taken[kind]) if kind in taken else getattr(self, kind) for kind in kinds]

    # ------------------------------------------------------------ host transitions
    def clear(self) -> None:
        for f in fields(self):
            setattr(self, f.name, f.default)

    def check_signature(self, signature: tuple) -> None:
        """A cache of other shapes, dtypes or devices (or span size) starts empty."""
        if self.signature != signature:
            self.clear()
            self.signature = signature

    def values(self, residuals: bool) -> Tensors | None:
        """What a reuse adds (residuals) or returns (outputs)."""
        return self.ref_res if residuals else self.ref_out

    def forecast(self, step: int, values: Sequence[torch.Tensor]) -> tuple[Tensors | None, float]:
        """``(previous values, k)`` to extrapolate ``values`` to ``step`` from the compute
        before the last one (``forecast="linear"``), or ``(None, 0.0)``: fewer than two
        computes, other shapes."""
        prev = self.prev_val
        if prev is None or self.ref_step <= self.prev_step or not same_shapes(values, prev):
            return None, 0.0
        return prev, steps_ahead(step, self.ref_step, self.prev_step)[1]

    def reused(self, batch: int | None, prev_in: Tensors | None) -> None:
        """After a reuse by the cache's last region: one more in a row (per sample too),
        and under ``drift_reference="previous"`` this step's input as the next reference."""
        self.consecutive += 1
        if batch is not None:
            self.streaks = next_streaks([True] * batch, self.streaks or [0] * batch)
        if prev_in is not None:
            self.prev_in = prev_in

    def computed(self, last: bool, mask: list[bool] | None, batch: int | None) -> None:
        """After a compute: the run of reuses ends (at the span's last region); per sample,
        a sample that reused keeps its streak, one that computed starts afresh."""
        if last:
            self.consecutive = 0
        if batch is not None:
            old = self.streaks if self.streaks is not None and len(self.streaks) == batch else [0] * batch
            self.streaks = next_streaks(mask if mask is not None else [False] * batch, old)

    def hold_span_input(self, inputs: Tensors) -> None:
        """A span's first region computed: its input, until the last region stores the residual."""
        self.span_in = inputs

    def take_span_input(self) -> Tensors | None:
        inputs, self.span_in = self.span_in, None
        return inputs

    def rotate(self, partial: bool, residuals: bool, step: int) -> None:
        """``forecast="linear"``, before a refresh at ``step``: the values being replaced
        become the forecast's earlier point, with their step and finiteness (not values
        some samples kept from an earlier step: they have no single step)."""
        old = self.values(residuals)
        mixed, self.mixed = self.mixed, partial
        self.prev_val = old if old is not None and forecast_keeps_previous(partial, mixed) else None
        self.prev_step = None if self.prev_val is None else self.ref_step
        self.prev_valid = None if self.prev_val is None else self.valid
        self.ref_step = step

    def gate_slope(self, new: Tensors, max_change: float, deferred: bool = False) -> bool:
        """No slope from a fast change (:func:`slope_usable`) to the values just computed.
        ``deferred`` (a decision group): keep this shard's sums of squares for the group to
        add (:meth:`settle_gate`) before the slope is used. Returns whether a gate waits."""
        self.gate_sums = None
        if self.prev_val is not None and max_change != float("inf"):
            if same_shapes(new, self.prev_val) and self.ref_step > self.prev_step:
                gap = float(self.ref_step - self.prev_step)
                if deferred:
                    self.gate_sums, self.gate_gap = acm.steady_sums(list(new), list(self.prev_val)), gap
                    return True
                self.prev_valid = slope_usable(self.prev_valid, new, self.prev_val, gap, max_change)
        return False

    def defer_gate(self, new: Tensors, max_change: float) -> bool:
        """:meth:`gate_slope` left for :func:`settle_joint_gates` (regional compilation): the
        gap kept, the gate waiting. Returns whether it waits."""
        self.gate_sums, self.gate_joint = None, False
        if self.prev_val is not None and max_change != float("inf"):
            if same_shapes(new, self.prev_val) and self.ref_step > self.prev_step:
                self.gate_gap, self.gate_joint = float(self.ref_step - self.prev_step), True
        return self.gate_joint

    def settle_gate(self, sums: torch.Tensor, max_change: float) -> None:
        """The slope gate from the sums of squares the group added (:meth:`gate_slope`)."""
        self.gate_sums = None
        self.prev_valid = self.prev_valid & acm.steady_from_sums(sums, self.gate_gap, max_change)

    def store(self, residuals: Tensors, outputs: Tensors | None, ref_in: Tensors | None, prev_in: Tensors | None,
              valid: torch.Tensor) -> None:
        """The refresh itself: the new cache values, reference inputs and finiteness flag."""
        self.ref_res, self.ref_out, self.ref_in, self.prev_in, self.valid = residuals, outputs, ref_in, prev_in, valid


@dataclass
class StepSignals:
    """What the regions of one graph pass each other within a step (one per graph key)."""

    # policy="first_block": the first block's verdict (its residual barely moved since the last
    # full step) and that residual
    similar: bool | None = None
    fb_ref: torch.Tensor | None = None
    # scope="step": the leader's fresh residuals of this step, the probe's reference residuals
    # (with the step they are of, and the reference before them and its step: the probe's
    # forecast, probe_forecast), whether the followers' caches are finite, and the probe's
    # verdict of its last step (a policies.Verdict)
    leader_res: Tensors | None = None
    probe_ref: Tensors | None = None
    probe_ref_step: int | None = None
    probe_prev: Tensors | None = None
    probe_prev_step: int | None = None
    followers_valid: torch.Tensor | None = None
    verdict: Verdict | None = None
    # under a decision group: the caches whose slope gate waits for the group's sums
    # (RegionCache.gate_slope), settled by the next all-reduce of the graph's step
    pending_gates: list[RegionCache] = field(default_factory=list)

    def take_pending_gates(self) -> list[RegionCache]:
        """The caches whose gate still waits (each once), and none left."""
        gates, self.pending_gates = self.pending_gates, []
        unique = {id(c): c for c in gates if c.gate_sums is not None or c.gate_joint}
        return list(unique.values())


    def move_probe_ref(self, value: Tensors | None, step: int, keep_previous: bool) -> None:
        """The probe's reference becomes ``value`` (the leader's residual of ``step``); with
        ``keep_previous`` (``probe_forecast``) the one it replaces is the forecast's earlier point."""
        self.probe_prev = self.probe_ref if keep_previous else None
        self.probe_prev_step = self.probe_ref_step if keep_previous else None
        self.probe_ref, self.probe_ref_step = value, None if value is None else step

    def probe_forecast(self, step: int) -> tuple[float, float] | None:
        """``(k, gap)`` to extrapolate the probe's reference to ``step``, or None (fewer than
        two references of these shapes)."""
        ref, prev, s1, s0 = self.probe_ref, self.probe_prev, self.probe_ref_step, self.probe_prev_step
        if ref is None or prev is None or s1 is None or s0 is None or s1 <= s0 or not same_shapes(ref, prev):
            return None
        _, k, gap = steps_ahead(step, s1, s0)
        return k, gap

    def give_leader_res(self, residuals: Tensors) -> None:
        """The leader computed: its fresh residuals, the probe's signal in this step."""
        self.leader_res = residuals

    def take_leader_res(self) -> Tensors | None:
        leader, self.leader_res = self.leader_res, None
        return leader

    def note_followers_valid(self, valid: torch.Tensor | None, reset: bool = False) -> None:
        """The followers' caches' finiteness for the probe's next check (``reset``: the probe
        computed; the followers refresh after it)."""
        if reset:
            self.followers_valid = None
        elif valid is not None:
            fv = self.followers_valid
            self.followers_valid = valid if fv is None else fv & valid

    def first_block_update(self, residual: torch.Tensor, similar: bool) -> None:
        """FBCache: whether the first block's residual barely moved since the reference
        (:func:`first_block_change` under the threshold); the reference moves when it did."""
        self.similar = similar
        if not similar:
            self.fb_ref = residual


def settle_joint_gates(gates: Sequence[RegionCache], residuals: bool, max_change: float) -> None:
    """The slope gates of block caches that one span's cache would hold (regional compilation:
    each block graph keeps its own cache, but a whole-model graph chains the blocks after its
    leader into one span and gates its forecast on their summed values). Consecutive caches
    with the same gap whose streams (by shape) are among the previous one's are one chain (SD3's
    last block keeps only the image stream of the joint blocks before it; Flux's single-stream
    blocks start a chain of their own), judged on its last cache's streams summed over the
    chain: ``||sum new - sum old|| <= max_change * gap * ||sum new||``; each cache keeps its
    slope only where its chain's is steady. With ``forecast_max_change=inf`` nothing waits here."""

    def shapes(cache: RegionCache) -> list[tuple]:
        return [tuple(v.shape) for v in cache.values(residuals) or ()]

    chains: list[list[RegionCache]] = []
    for cache in gates:
        last = chains[-1][-1] if chains else None
        if (last is not None and last.gate_gap == cache.gate_gap and shapes(cache)
                and set(shapes(cache)) <= set(shapes(last))):
            chains[-1].append(cache)
        else:
            chains.append([cache])
    for chain in chains:
        new, old = [], []
        for shape in shapes(chain[-1]):  # each stream of the chain's end, summed over the chain's caches
            at = [shapes(c).index(shape) for c in chain]
            new.append(torch.stack([c.values(residuals)[i] for c, i in zip(chain, at)]).sum(0))  # type: ignore[index]
            old.append(torch.stack([c.prev_val[i] for c, i in zip(chain, at)]).sum(0))  # type: ignore[index]
        steady = acm.steady(new, old, chain[0].gate_gap, max_change)
        for cache in chain:
            cache.gate_joint = False
            cache.prev_valid = cache.prev_valid & steady
