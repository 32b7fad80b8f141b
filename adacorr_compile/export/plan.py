"""The export's plan: per guarded block, its wiring, its place in a span and the state
tensors it keeps (:class:`StateSpec`, named ``adacorr_r<k>_<kind>``; the kinds are the field
names of :class:`adacorr_compile.step.RegionCache`). See :mod:`adacorr_compile.export.onnx`
for the state layout."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.fx as fx

from ..config import AdaCorrConfig
from ..passes.chain_regions import _Wiring, find_spans, spans_apply
from ..passes.common import analysis, example_value
from ..policies import caches_residuals, step_role
from .dims import ExportError, _expr_ast

STATS_OUTPUTS = ("adacorr_reused", "adacorr_nonfinite", "adacorr_lambda", "adacorr_score")



@dataclass(frozen=True)
class StateSpec:
    """One state tensor: its ONNX input name, dtype and shape (see :func:`eval_dim`)."""

    name: str
    kind: str  # step | fb_ref | probe_ref | ref_in | prev_in | ref_res | ref_out | valid | consecutive
    #            | prev_val | prev_valid | ref_step | prev_step (forecast="linear") | mixed (and decision="sample")
    #            | probe_prev | probe_ref_step | probe_prev_step (probe_forecast)
    dtype: str  # torch dtype name without "torch."
    dims: list[Any]
    region: int | None = None

    @property
    def output(self) -> str:
        return f"{self.name}_next"


@dataclass
class RegionPlan:
    """What a :class:`CondRegion` needs: the block's wiring and its state layout."""

    index: int
    path: str
    key: str
    num_inputs: int
    num_outputs: int
    stream_pairs: list[tuple[int, int]]
    observed: list[int]
    states: list[StateSpec] = field(default_factory=list)
    # a span of chained regions (passes/chain_regions.py): its first region's index, this
    # region's place in it, its size, and (last region) the first region's inputs its stream
    # pairs started at; the span's cache is the last region's state
    span_head: int = 0
    span_position: int = 0
    span_size: int = 1
    span_sources: tuple[int, ...] = ()
    residuals: list[StateSpec] = field(default_factory=list)  # dtype and dims of its residuals (not state)

    @property
    def span_tail(self) -> bool:
        return self.span_position == self.span_size - 1

    def of(self, kind: str) -> list[StateSpec]:
        return [s for s in self.states if s.kind == kind]


def _reference_kind(config: AdaCorrConfig) -> str:
    return "prev_in" if config.drift_reference == "previous" else "ref_in"


def _residual_kind(config: AdaCorrConfig) -> str:
    return "ref_res" if caches_residuals(config) else "ref_out"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _plan_regions(gm: fx.GraphModule, config: AdaCorrConfig, bindings: Mapping[Any, tuple[str, int]]) -> list[RegionPlan]:
    """One plan per block: its wiring, its place in a span, and the state it keeps.

    State follows what the decision needs, as in the runtime: a region that decides for
    itself (``scope="block"``) keeps its drift reference input; under ``scope="step"`` no
    region keeps inputs, the leader keeps nothing (unless ``first_block`` needs its residual),
    the probe its reuse streak, and each span of chained regions one cache, held by its last
    region (the residual from the span's input to its output, its forecast values)."""
    info = analysis(gm)
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith("adacorr_body_")]
    order = [int(str(n.target).rsplit("_", 1)[1]) for n in calls]
    spans = [([k], ()) for k in range(len(info.blocks))]
    if spans_apply(config) and order == list(range(len(info.blocks))):
        spans = find_spans([_Wiring(n, b.stream_pairs, len(b.outputs)) for n, b in zip(calls, info.blocks)])
    place = {k: (members[0], position, len(members), sources) for members, sources in spans for position, k in enumerate(members)}
    plans = []
    for k, block in enumerate(info.blocks):
        body = getattr(gm, f"adacorr_body_{k}")
        ins = [example_value(n) for n in body.graph.nodes if n.op == "placeholder"]
        out_node = next(n for n in body.graph.nodes if n.op == "output")
        outs = [example_value(n) for n in out_node.args[0]]
        head, position, size, sources = place[k]
        plan = RegionPlan(
            index=k,
            path=block.path,
            key=block.key,
            num_inputs=len(ins),
            num_outputs=len(outs),
            stream_pairs=[tuple(p) for p in block.stream_pairs],
            observed=list(block.observed),
            span_head=head,
            span_position=position,
            span_size=size,
            span_sources=tuple(sources),
        )
        if sorted(j for _, j in plan.stream_pairs) != list(range(plan.num_outputs)):
            raise ExportError(f"{block.path}: not every output of the block is paired with a stream input")
        _add_states(plan, config, ins, outs, bindings)
        plans.append(plan)
    return plans


def _add_states(plan: RegionPlan, config: AdaCorrConfig, ins: list[Any], outs: list[Any],
                bindings: Mapping[Any, tuple[str, int]]) -> None:
    """The plan's residual layout and the state tensors it keeps (see :func:`_plan_regions`)."""
    k = plan.index

    def spec(name: str, kind: str, value: Any) -> StateSpec:
        return StateSpec(f"adacorr_r{k}_{name}", kind, _dtype_name(value.dtype), [_expr_ast(d, bindings) for d in value.shape], k)

    plan.residuals = [spec(f"res_{m}", "residual", outs[j]) for m, (_, j) in enumerate(plan.stream_pairs)]
    role = step_role(config, k)
    scalar = lambda kind, dtype: StateSpec(f"adacorr_r{k}_{kind}", kind, dtype, [], k)  # noqa: E731
    # the reuse streak: one per sample under decision="sample" (the per-sample cap)
    per_sample = config.decision == "sample"
    batch_dims = [_expr_ast(outs[plan.stream_pairs[0][1]].shape[0], bindings)] if per_sample else []
    streak = StateSpec(f"adacorr_r{k}_consecutive", "consecutive", "int64", batch_dims, k)
    if role == "leader" and config.policy != "first_block":
        return  # computes at every step: its fresh residual goes to the probe
    if plan.span_size > 1 and not plan.span_tail:
        if role == "probe":
            plan.states.append(streak)  # the span's reuse streak, for its guard
        return
    if role == "block":
        ref = _reference_kind(config)
        for m, i in enumerate(plan.observed):
            plan.states.append(spec(f"{ref}_{m}", ref, ins[i]))
    res = _residual_kind(config)
    for m, (_, j) in enumerate(plan.stream_pairs):
        plan.states.append(spec(f"{res}_{m}", res, outs[j]))
    plan.states.append(scalar("valid", "bool"))
    plan.states.append(streak)
    if config.forecast != "none":
        prev = "prev_res" if res == "ref_res" else "prev_out"
        for m, (_, j) in enumerate(plan.stream_pairs):
            plan.states.append(spec(f"{prev}_{m}", "prev_val", outs[j]))
        plan.states.append(scalar("prev_valid", "bool"))
        if per_sample:  # the cache holds values of several steps (a partial refresh): no slope from it
            plan.states.append(scalar("mixed", "bool"))
        for kind in ("ref_step", "prev_step"):
            plan.states.append(scalar(kind, "int64"))

