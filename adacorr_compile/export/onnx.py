"""Export a Diffusion Transformer with AdaCorrection's guarded regions as one ONNX step graph.

The artifact is one denoising step: its inputs are the model's tensor inputs plus the
cache state, its outputs the model's outputs plus the new state (and per-region
statistics). The runner (:class:`adacorr_compile.export.runner.OnnxRunner`) threads the
state from one call to the next. Each guarded region is an ONNX ``If`` whose
``then`` branch reuses the offset-corrected cache and whose ``else`` branch runs the block
and refreshes the cache.

How it is built, from the same passes as the compile path:

1. ``torch.export`` traces the model (batch dimension dynamic, optionally token axes);
   the unlifted graph (parameters as ``get_attr``) keeps ``nn_module_stack`` with paths
   already in normalized form (``transformer_blocks.3``).
2. :func:`~adacorr_compile.passes.find_blocks` and
   :func:`~adacorr_compile.passes.outline_blocks` find and outline the repeated blocks,
   exactly as for ``torch.compile(backend="adacorr")``.
3. Each ``adacorr_body_<k>`` call is replaced by a :class:`CondRegion` whose predicate is
   computed in-graph by the OEM (:mod:`adacorr_compile.oem`), the ACM
   (:mod:`adacorr_compile.acm`) and :func:`adacorr_compile.policies.decide_tensor` (the
   tensor twin of the host decision), and whose two branches are ``torch.cond`` branches.
4. ``torch.export`` traces that step module (state dims follow the input dims) and
   ``torch.onnx.export(..., dynamo=True)`` converts it (``torch.cond`` -> ``If``), at an
   opset below 23 by default so that attention is decomposed (opset 23's ``Attention``
   op inside an ``If`` does not build with TensorRT's parser on some versions).

The state tensors and how their shapes follow the inputs are written into the model's
metadata (key ``adacorr``) so the runner can create them without PyTorch tracing.

State per region ``k`` (names as ONNX inputs; outputs carry the suffix ``_next``), as the
runtime keeps it: only what the decision needs. Under ``scope="step"`` the leader keeps
nothing (except under ``first_block``), no region keeps inputs, and a span of chained
regions (:mod:`adacorr_compile.passes.chain_regions`) keeps one cache, held by its last
region (the residual from the span's input to its output); its first region, if it is the
probe, keeps only ``adacorr_r<k>_consecutive``:

* ``adacorr_r<k>_ref_in_<i>`` (``drift_reference="cached"``) or ``adacorr_r<k>_prev_in_<i>``
  (``"previous"``), ``scope="block"`` only: the observed inputs the OEM compares with;
* ``adacorr_r<k>_ref_res_<j>`` (``correction=True`` or ``policy="first_block"``): the
  residual ``output - input`` at the last compute, or ``adacorr_r<k>_ref_out_<j>``
  (otherwise): the output itself;
* ``adacorr_r<k>_valid`` (bool): the last compute was finite;
* ``adacorr_r<k>_consecutive`` (int64): reuses in a row;
* ``forecast="linear"`` only: ``adacorr_r<k>_prev_res_<j>`` / ``adacorr_r<k>_prev_out_<j>``
  (the cached values of the compute before the last), ``adacorr_r<k>_prev_valid`` (bool:
  they were finite and the change since them steady, ``acm.steady``),
  ``adacorr_r<k>_ref_step`` and ``adacorr_r<k>_prev_step`` (int64: the steps of the last two
  computes; equal until the region has computed twice).

Shared: ``adacorr_step`` (int64, steps done in this generation; 0 means empty cache),
``adacorr_steps_left`` (int64 input only: steps after this one, as the host computes it
for the ``final_steps`` guard, :data:`~adacorr_compile.policies.STEPS_UNKNOWN` when
unknown), ``adacorr_fb_ref`` (``first_block`` only: the first
block's residual at the last step it was not similar), ``adacorr_probe_ref_<j>``
(``scope="step"`` only: the first block's residuals when the probe last computed), with
``probe_forecast`` also ``adacorr_probe_prev_<j>`` (the reference before it) and
``adacorr_probe_ref_step``, ``adacorr_probe_prev_step`` (int64: their steps). Statistics outputs (one entry per
region): ``adacorr_reused``, ``adacorr_nonfinite`` (bool), ``adacorr_lambda``,
``adacorr_score`` (float, NaN while the cache is empty).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import operator
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .. import acm, oem
from ..config import AdaCorrConfig
from ..passes import find_blocks, outline_blocks
from ..passes.chain_regions import _Wiring, find_spans, spans_apply
from ..passes.common import analysis, example_value
from ..policies import (
    STEPS_UNKNOWN,
    caches_residuals,
    cap_streaks,
    decide_tensor,
    first_region_computes_always,
    forecast_keeps_previous,
    guard_checks,
    next_streaks,
    probe_forecasts,
    relative_change,
    step_role,
)
from .dims import ExportError, _expr_ast, eval_dim  # eval_dim and ExportError also re-exported from here

logger = logging.getLogger("adacorr_compile")

METADATA_KEY = "adacorr"
DEFAULT_OPSET = 18  # < 23: no fused ``Attention`` op (see module docstring)
DYNAMIC_MODES = ("static", "batch", "tokens", "all")
STATS_OUTPUTS = ("adacorr_reused", "adacorr_nonfinite", "adacorr_lambda", "adacorr_score")


# --------------------------------------------------------------------------- plan


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
            plans.append(plan)  # computes at every step: its fresh residual goes to the probe
            continue
        if size > 1 and not plan.span_tail:
            if role == "probe":
                plan.states.append(streak)  # the span's reuse streak, for its guard
            plans.append(plan)
            continue
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
        plans.append(plan)
    return plans


# --------------------------------------------------------------------------- the guarded region


@dataclass
class RegionSignals:
    """What the other regions of a step pass a :class:`CondRegion` (its ``extra`` inputs)."""

    fb_ref: torch.Tensor | None = None  # first_block, the first region: the reference residual
    similar: torch.Tensor | None = None  # first_block, a later region: the first block's verdict
    # scope="step", the probe: the leader's fresh residuals, their reference, the followers' cache-valid flags
    leader_res: list[torch.Tensor] = field(default_factory=list)
    probe_ref: list[torch.Tensor] = field(default_factory=list)
    followers_valid: list[torch.Tensor] = field(default_factory=list)
    # probe_forecast: the reference before the last, and the steps of the two (0-d int64)
    probe_prev: list[torch.Tensor] = field(default_factory=list)
    probe_steps: tuple[torch.Tensor, torch.Tensor] | None = None
    # scope="step", a follower: the probe's verdict (batch: reuse; sample: consulted and the
    # per-sample proposal), its lambda, and for the last region of a span the span's input
    probe_reuse: torch.Tensor | None = None
    probe_consulted: torch.Tensor | None = None
    probe_proposed: torch.Tensor | None = None
    probe_lam: torch.Tensor | None = None
    span_in: list[torch.Tensor] = field(default_factory=list)


def _size_sources(nodes: Sequence[fx.Node]) -> dict[Any, tuple[fx.Node, int]]:
    """Symbol -> (tensor node, axis) for every dimension of ``nodes`` that is a bare symbol."""
    import sympy

    sources: dict[Any, tuple[fx.Node, int]] = {}
    for n in nodes:
        val = example_value(n)
        if isinstance(val, torch.Tensor):
            for axis, d in enumerate(val.shape):
                if isinstance(d, torch.SymInt) and isinstance(d.node.expr, sympy.Symbol):
                    sources.setdefault(d.node.expr, (n, axis))
    return sources


def _emit_size(graph: fx.Graph, expr: Any, sources: Mapping[Any, tuple[fx.Node, int]], what: str) -> Any:
    """FX nodes computing the symbolic size ``expr`` from ``sym_size`` of the source tensors
    (at the graph's insertion point); ``ExportError`` when a symbol has no source."""
    import sympy

    from torch.utils._sympy.functions import FloorDiv, Mod, PythonMod

    if isinstance(expr, (int, sympy.Integer)):
        return int(expr)
    if isinstance(expr, sympy.Symbol):
        if expr not in sources:
            raise ExportError(f"{what} is a size ({expr}) that no tensor it can see has")
        node, axis = sources[expr]
        out = graph.call_function(torch.ops.aten.sym_size.int, (node, axis))
        out.meta["val"] = example_value(node).shape[axis]
        return out
    fn = None
    for kind, f in ((sympy.Add, operator.add), (sympy.Mul, operator.mul), (FloorDiv, operator.floordiv), (Mod, operator.mod),
                    (PythonMod, operator.mod)):
        if isinstance(expr, kind):
            fn = f
    if fn is None:
        raise ExportError(f"{what} is a size ({expr}) the exporter cannot rebuild")
    args = [_emit_size(graph, a, sources, what) for a in expr.args]
    out = args[0]
    for arg in args[1:]:
        val = fn(out.meta["val"] if isinstance(out, fx.Node) else out, arg.meta["val"] if isinstance(arg, fx.Node) else arg)
        out = graph.call_function(fn, (out, arg))
        out.meta["val"] = val
    return out


def _hoist_sizes(gm: fx.GraphModule) -> int:
    """Recompute every size (SymInt) node of the traced graph from the model inputs'
    sizes, at the top of the graph, outside any module.

    With dynamic shapes ``torch.export`` records shape arithmetic where the model did it,
    often inside a block (Flux's first block computes the joint token count that later
    blocks use): a block with a size output cannot be guarded, and blocks would depend
    on each other through sizes. As glue, sizes are inputs of the blocks instead, the
    way they are in the backend's (static) Dynamo graphs.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not placeholders:
        return 0
    sources = _size_sources(placeholders)
    first_op = placeholders[-1].next  # after every placeholder (get_attr nodes may come first)
    hoisted = 0
    for node in list(gm.graph.nodes):
        val = node.meta.get("val")
        if node.op != "call_function" or not isinstance(val, torch.SymInt):
            continue
        if not val.node.expr.free_symbols <= set(sources):
            continue  # data-dependent or not from the inputs: leave it
        with gm.graph.inserting_before(first_op):
            size = _emit_size(gm.graph, val.node.expr, sources, node.name)
        if not isinstance(size, fx.Node):
            continue
        node.replace_all_uses_with(size)
        gm.graph.erase_node(node)
        hoisted += 1
    if hoisted:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return hoisted


def _sizes_from_tensors(body: fx.GraphModule, path: str) -> list[int]:
    """Make the body compute its size inputs (SymInt placeholders, e.g. the batch size or
    the joint token count a block's ``view`` needs) from its own tensor inputs' sizes.

    ``torch.cond`` takes tensor operands only, and a SymInt closed over by a branch
    fails to trace (Dynamo's subgraph tracing cannot lift it into a ``view``'s size
    list). The placeholders stay (the call signature is unchanged) but lose their users.
    A size that cannot be rebuilt from the block's tensors (SD3's latent width, when only
    the token count ``(H/2)*(W/2)`` reaches the block) is carried instead: the placeholder
    then takes an empty tensor of shape ``[size, 0]`` and the body reads dimension 0.
    Returns the positions of the carried placeholders.
    """
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    sources = _size_sources(placeholders)
    graph = body.graph
    first_op = placeholders[-1].next
    carried: list[int] = []
    for pos, ph in enumerate(placeholders):
        value = example_value(ph)
        if not isinstance(value, torch.SymInt) or not ph.users:
            continue
        users = list(ph.users)
        try:
            with graph.inserting_before(first_op):  # keeps the emitted nodes in order
                size = _emit_size(graph, value.node.expr, sources, f"{path}: block input {ph.name}")
        except ExportError:
            with graph.inserting_before(first_op):
                size = graph.call_function(torch.ops.aten.sym_size.int, (ph, 0))
            size.meta["val"] = value
            carried.append(pos)
        for user in users:
            user.replace_input_with(ph, size)
    graph.eliminate_dead_code()
    graph.lint()
    body.recompile()
    return carried


def _same_layout(values: Sequence[torch.Tensor], flat: bool = False) -> tuple[torch.Tensor, ...]:
    """Branch outputs must agree in layout (torch.cond checks strides): all contiguous,
    and with ``flat`` one-dimensional (scalars stay scalars)."""
    return tuple(v.reshape(-1) if flat and v.dim() else v.contiguous() for v in values)




# composite ops that may return their first argument itself (their schemas declare no alias)
_MAYBE_SELF = {"type_as", "contiguous", "reshape", "flatten", "expand_as", "view_as", "float", "to", "type"}


def _alias_base(node: Any) -> Any:
    """The node whose storage ``node``'s value may share: followed back through views and
    ops that may return their input (``x.float()`` of a float ``x``), item access of a split."""
    seen = 0
    while isinstance(node, fx.Node) and node.op == "call_function" and seen < 1000:
        seen += 1
        target = node.target
        if target is operator.getitem:
            node = node.args[0]
            continue
        schema = getattr(target, "_schema", None)
        packet = getattr(target, "_overloadpacket", None)
        aliases = schema is not None and any(r.alias_info is not None for r in schema.returns)
        if not (aliases or getattr(packet, "__name__", None) in _MAYBE_SELF) or not node.args:
            break
        node = node.args[0]
    return node


def _aliasing_outputs(body: fx.GraphModule) -> set[int]:
    """Positions of ``body``'s outputs that may alias one of its inputs or an earlier output."""
    out = next(n for n in body.graph.nodes if n.op == "output")
    values = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    aliasing, bases = set(), set()
    for j, v in enumerate(values):
        base = _alias_base(v)
        if isinstance(base, fx.Node) and (base.op == "placeholder" or base in bases):
            aliasing.add(j)
        bases.add(base)
    return aliasing


def _steps_ahead(step: torch.Tensor, ref_step: torch.Tensor, prev_step: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A first-order forecast's terms from the steps of its two points (int64 state): whether
    they are distinct (equal until two computes), ``k`` (how many gaps past the last point
    ``step`` lies) and the gap, as float32: the in-graph twin of the host's ``k``."""
    gap = (ref_step - prev_step).clamp(min=1).to(torch.float32)
    return ref_step > prev_step, (step - ref_step).to(torch.float32) / gap, gap


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
    :func:`adacorr_compile.runtime.region._guarded_call` with ``decision="batch"``.
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
        # torch.cond rejects outputs whose strides involve compound sizes (SD3's token count
        # (H/2)*(W/2) with dynamic H, W): the branches then return flat tensors, reshaped after
        self.flat = any(isinstance(d, list) for s in plan.states for d in s.dims)
        # torch.cond rejects a branch output that aliases an operand or another output
        # (Wan's block passes temb.float() through: a no-op view of its input); those are cloned
        self.aliasing = _aliasing_outputs(body)

    def extra_repr(self) -> str:
        return f"path={self.plan.path!r}"

    def _first_block_role(self) -> str | None:
        if self.config.policy != "first_block":
            return None
        return "first" if self.plan.index == 0 else "follower"

    def _extra_inputs(self, extra: list[torch.Tensor]) -> RegionSignals:
        """Name the ``extra`` inputs (see the class docstring)."""
        cfg, role = self.config, step_role(self.config, self.plan.index)
        if role == "follower" and cfg.decision == "sample":  # (no spans: every region has its own cache)
            consulted, proposed, lam = extra
            return RegionSignals(probe_consulted=consulted, probe_proposed=proposed, probe_lam=lam)
        if role == "follower":  # the last region of a span also gets the span's input
            return RegionSignals(probe_reuse=extra[0], probe_lam=extra[1], span_in=list(extra[2:]))
        signals = RegionSignals()
        if cfg.policy == "first_block" and self.plan.index == 0:
            signals.fb_ref = extra.pop(0)
        elif cfg.policy == "first_block":
            signals.similar = extra.pop(0)
        if role == "probe":
            n = self.leader_pairs
            signals.leader_res, signals.probe_ref = list(extra[:n]), list(extra[n : 2 * n])
            rest = extra[2 * n :]
            if probe_forecasts(cfg):
                signals.probe_prev, signals.probe_steps = list(rest[:n]), (rest[n], rest[n + 1])
                rest = rest[n + 2 :]
            signals.followers_valid = list(rest)
        return signals

    def forward(self, step: torch.Tensor, steps_left: torch.Tensor, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cfg, plan = self.config, self.plan
        n_in = plan.num_inputs
        args = list(flat[:n_in])
        state = list(flat[n_in : n_in + len(plan.states)])
        extra = list(flat[n_in + len(plan.states) :])
        by_kind: dict[str, list[torch.Tensor]] = {}
        for s, v in zip(plan.states, state):
            by_kind.setdefault(s.kind, []).append(v)
        reference = by_kind.get(_reference_kind(cfg), [])  # a region that decides for itself only
        res_kind = _residual_kind(cfg)
        cached_vals = by_kind.get(res_kind, [])  # none: the leader, or a span's region before its last
        true = torch.ones((), dtype=torch.bool, device=step.device)
        valid = by_kind["valid"][0] if "valid" in by_kind else true
        consecutive = by_kind["consecutive"][0] if "consecutive" in by_kind else torch.zeros_like(step)
        prev_vals = by_kind.get("prev_val", [])  # forecast="linear" only
        role = self._first_block_role()
        srole = step_role(cfg, plan.index)
        named = self._extra_inputs(extra)  # what the other regions of the step pass this one

        observed = [args[i] for i in plan.observed]
        has_cache = step > 0
        nan_lam = torch.full((), float("nan"), dtype=torch.float32, device=step.device)
        per_sample = cfg.decision == "sample"
        if srole == "follower" and per_sample:
            # scope="step", one decision per sample: the probe's flags (its verdict was the
            # policy's: no guard forced it, its and the followers' caches are finite; the
            # samples the policy would reuse), under this region's own guards and per-sample
            # cap, as on the host
            score, lam = nan_lam, named.probe_lam
            forced = torch.zeros_like(has_cache)
            for _, holds in guard_checks(cfg, step, steps_left, consecutive.amin(0), has_cache, False):
                forced = forced | holds
            follows = named.probe_consulted & ~forced
            reuse = cap_streaks(cfg, named.probe_proposed, consecutive, step, steps_left) & follows
            by_policy = follows & ~reuse.all()
            nonfinite = torch.zeros_like(has_cache)
            blend_lam = torch.where(by_policy, lam, nan_lam)
        elif srole == "follower":
            # scope="step": the probe's verdict (it covers every guard and every cache's
            # finiteness); the follower measures nothing (its statistics are NaN, as on the host).
            # The probe's lambda is NaN where its verdict was not the policy's: no blend then
            score, lam = nan_lam, named.probe_lam
            reuse, nonfinite = named.probe_reuse & has_cache, torch.zeros_like(has_cache)
            blend_lam = torch.where(has_cache, lam, nan_lam)
        else:
            if srole == "probe":  # the OEM on the leader's fresh residual (see runtime/region.py)
                score = oem.score(cfg.score, named.leader_res, self._probe_reference(step, named), cfg.spatial_weight,
                                  per_sample)
            elif srole == "leader":  # computes at every step, measures nothing
                score = nan_lam
            else:
                score = oem.score(cfg.score, observed, reference, cfg.spatial_weight, per_sample)
            lam = acm.correction_weight(score, cfg.gamma) if srole != "leader" else nan_lam
            valid_all = valid
            for v in named.followers_valid:
                valid_all = valid_all & v
            reuse, nonfinite, by_policy, proposed = decide_tensor(
                cfg, step, steps_left, consecutive, has_cache, valid_all, plan.index == 0, lam, named.similar, score
            )
            # blend=True blends a compute the policy chose, never a forced one (warm-up, final
            # steps, reuse cap, a non-finite cache): NaN marks "do not blend"
            blend_lam = torch.where(by_policy, lam, nan_lam)

        # decision="sample": ``reuse`` is the per-sample mask; the block is skipped only when
        # every sample reuses, otherwise it runs and the samples that reuse take their cache
        reuse_mask, reuse = (reuse, reuse.all()) if per_sample else (None, reuse)
        n_pairs = len(cached_vals)
        # "cached" drift: the reference input changes only on a compute, so it goes through
        # the branches; "previous": it is the observed input either way, set after them
        n_ref = len(reference) if cfg.drift_reference == "cached" else 0
        span_in = named.span_in  # the span's input, for its last region's residual
        passes_on = plan.span_size > 1 and not plan.span_tail  # a reuse hands its input on

        forecast = bool(prev_vals)
        fc: tuple[torch.Tensor, ...] = ()
        if forecast:  # extrapolate from the last two computes, as runtime/region.py's _forecast
            ref_step, prev_step, prev_valid = by_kind["ref_step"][0], by_kind["prev_step"][0], by_kind["prev_valid"][0]
            distinct, k, _ = _steps_ahead(step, ref_step, prev_step)
            fc = (distinct & prev_valid, k)

        def reuse_values(
            a: Sequence[torch.Tensor], cache: Sequence[torch.Tensor], prev: Sequence[torch.Tensor], fc_: Sequence[torch.Tensor]
        ) -> list[torch.Tensor]:
            ok, k = fc_ if fc_ else (None, 0.0)
            values = acm.reuse_values([a[i] for i, _ in plan.stream_pairs], list(cache), list(prev) if fc_ else None, k, ok,
                                      res_kind == "ref_res")
            return values if fc_ or res_kind == "ref_res" else [c.clone() for c in values]

        def ordered(by_pair: Sequence[torch.Tensor]) -> list[torch.Tensor]:
            outs: list[Any] = [None] * plan.num_outputs
            for (_, j), v in zip(plan.stream_pairs, by_pair):
                outs[j] = v
            return outs

        # Operands of torch.cond: the block's activations and the cache. Parameters are
        # closed over (torch.cond traces its branches with Dynamo, which gives parameters
        # passed as operands symbolic shapes); SymInt inputs are unused by the body (see
        # _sizes_from_tensors) and pass through as they are.
        for i in self.carried:  # sizes the body reads off an empty [size, 0] tensor
            args[i] = torch.empty((args[i], 0), dtype=torch.float32, device=step.device)
        tensor_pos = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and not isinstance(a, torch.nn.Parameter)]
        n_t = len(tensor_pos)
        flat = self.flat

        n_prev, n_span = len(prev_vals), len(span_in)

        def unpack(ops: Sequence[torch.Tensor]) -> tuple[list[Any], Sequence[torch.Tensor], ...]:
            """(block args, reference inputs, cache, previous cache, span input, forecast (ok, k) or ())"""
            a: list[Any] = list(args)
            for i, v in zip(tensor_pos, ops[:n_t]):
                a[i] = v
            at = n_t + n_ref + n_pairs
            span = ops[at + n_prev : at + n_prev + n_span]
            end = len(ops) - 2 - (1 if per_sample else 0)
            return a, ops[n_t : n_t + n_ref], ops[n_t + n_ref : at], ops[at : at + n_prev], span, ops[end - 2 : end] if forecast else ()

        def reuse_fn(*ops: torch.Tensor) -> tuple[torch.Tensor, ...]:
            a, ref, cache, prev, _, fc_ = unpack(ops)
            val = ops[-2]
            if passes_on:  # the span's last region adds the span's residual to this input
                outs = ordered([a[i].clone() for i, _ in plan.stream_pairs])
            else:
                outs = ordered(reuse_values(a, cache, prev, fc_))
            return _same_layout((*outs, *(r.clone() for r in ref), *(c.clone() for c in cache), val.clone()), flat)

        def compute_fn(*ops: torch.Tensor) -> tuple[torch.Tensor, ...]:
            a, ref, cache, prev, span, fc_ = unpack(ops)
            lam_ = ops[-1]
            fresh = [f.clone() if j in self.aliasing else f for j, f in enumerate(self.body(*a))]
            by_pair = [fresh[j] for _, j in plan.stream_pairs]
            outs_paired = by_pair
            cached = reuse_values(a, cache, prev, fc_) if n_pairs and (cfg.blend or per_sample) else []
            if cfg.blend and srole != "leader":  # the leader measures nothing: no lambda to blend by
                blends = acm.per_sample(torch.isfinite(lam_), by_pair[0])  # the policy chose this compute (see blend_lam)
                outs_paired = [torch.where(blends, acm.blend(c, f, lam_), f) for c, f in zip(cached, by_pair)]
            keep = ops[-3] if per_sample else None  # the samples that reuse
            if keep is not None and cached:  # they return their cache, as a reuse does
                outs_paired = acm.keep_samples(keep, cached, outs_paired)
            new_cache: list[torch.Tensor] = []
            new_valid = ops[-2].clone()
            if n_pairs:  # the residual from the region's (or the span's) input to its output
                inputs = list(span) if span else [a[i] for i, _ in plan.stream_pairs]
                residuals, new_valid = acm.fresh_residuals(by_pair, inputs)
                new_cache = residuals if res_kind == "ref_res" else [f.clone() for f in by_pair]
                if keep is not None:  # a partial refresh: the samples that reused keep their cache
                    new_cache = acm.keep_samples(keep, list(cache), new_cache)
                    new_valid = acm.all_finite(new_cache)
            new_ref = [a[i].clone() for i in plan.observed] if n_ref else []
            if keep is not None and new_ref:
                new_ref = acm.keep_samples(keep, list(ref), new_ref)
            return _same_layout((*ordered(outs_paired), *new_ref, *new_cache, new_valid), flat)

        mask_op = (reuse_mask,) if per_sample else ()
        operands = (*(args[i] for i in tensor_pos), *reference[:n_ref], *cached_vals, *prev_vals, *span_in, *fc, *mask_op, valid,
                    blend_lam)
        # shapes of the branch outputs: the paired stream inputs, the observed inputs, the cache
        shapes = [args[i].shape for i, _ in sorted(plan.stream_pairs, key=lambda p: p[1])]
        shapes += [o.shape for o in observed[:n_ref]] + [c.shape for c in cached_vals] + [valid.shape]
        if plan.index == 0 and first_region_computes_always(cfg):  # the first block always computes, no branch
            results = compute_fn(*operands)
        else:
            results = torch.cond(reuse, reuse_fn, compute_fn, operands)
        if flat:
            results = tuple(r.reshape(shape) for r, shape in zip(results, shapes))
        outs = list(results[: plan.num_outputs])
        new_ref = list(results[plan.num_outputs : plan.num_outputs + n_ref])
        new_cache = list(results[plan.num_outputs + n_ref : plan.num_outputs + n_ref + n_pairs])
        new_valid = results[-1]
        if not n_ref and reference:  # "previous": the input of this step, whatever the branch
            new_ref = [o.clone() for o in observed]
        new_consecutive = next_streaks(reuse_mask if per_sample else reuse, consecutive)
        scalars = {"valid": new_valid, "consecutive": new_consecutive}
        new_prev: list[torch.Tensor] = []
        if forecast:  # a compute rotates the cache into the previous values and records its step
            new_prev = [torch.where(reuse, p, c) for p, c in zip(prev_vals, cached_vals)]
            slope_from = valid
            if per_sample:
                # values some samples kept from an earlier step have no single step: no slope
                # from a partial refresh's cache, nor from the one before it (as on the host)
                partial, mixed = reuse_mask.any(), by_kind["mixed"][0]
                slope_from = valid & forecast_keeps_previous(partial, mixed)
                scalars["mixed"] = (reuse & mixed) | (~reuse & partial)
            if cfg.forecast_max_change != float("inf"):  # no slope from a fast change, as on the host
                since = (step - ref_step).clamp(min=1).to(torch.float32)
                slope_from = slope_from & acm.steady(new_cache, cached_vals, since, cfg.forecast_max_change)
            scalars["prev_valid"] = (reuse & prev_valid) | (~reuse & slope_from)  # onnxruntime has no bool Where
            scalars["ref_step"] = torch.where(reuse, ref_step, step)
            # the first compute of a generation has no earlier one: equal steps, no extrapolation
            scalars["prev_step"] = torch.where(reuse, prev_step, torch.where(has_cache, ref_step, step))
        nan = nan_lam.clone()
        # reused: the share of the samples that reused (1 or 0 with one decision for the batch)
        reused = reuse_mask.to(torch.float32).mean() if per_sample else reuse
        if srole in ("follower", "leader"):  # measured nothing (the host records NaN too)
            stats = (reused, nonfinite, nan.clone(), nan.clone())
        else:
            lam_mean, score_mean = lam.to(torch.float32).mean(), score.to(torch.float32).mean()
            stats = (reused, nonfinite, torch.where(has_cache, lam_mean, nan), torch.where(has_cache, score_mean, nan))
        new_state: list[torch.Tensor] = []
        it_ref, it_cache, it_prev = iter(new_ref), iter(new_cache), iter(new_prev)
        for s in plan.states:
            if s.kind in ("ref_in", "prev_in"):
                new_state.append(next(it_ref))
            elif s.kind in ("ref_res", "ref_out"):
                new_state.append(next(it_cache))
            elif s.kind == "prev_val":
                new_state.append(next(it_prev))
            else:
                new_state.append(scalars[s.kind])
        extra_out: list[torch.Tensor] = []
        if role == "first":
            fb_ref = named.fb_ref
            residual = new_cache[0]
            change = relative_change(residual, fb_ref)
            similar_now = has_cache & (change < cfg.first_block_threshold)
            extra_out = [similar_now, torch.where(similar_now, fb_ref, residual)]
        if srole == "leader":
            extra_out += [outs[j] - args[i] for i, j in plan.stream_pairs]
        elif srole == "probe":
            current, ref = named.leader_res, named.probe_ref
            # the reference moves when the probe computes ("cached"), or at every step ("previous")
            moves = ~reuse if cfg.drift_reference == "cached" else torch.ones_like(reuse)
            new_ref = [torch.where(moves, c, r) for r, c in zip(ref, current)]
            if named.probe_steps is not None:  # probe_forecast: the replaced reference and the steps, as on the host
                ref_step, prev_step = named.probe_steps
                new_ref += [torch.where(moves, r, p) for r, p in zip(ref, named.probe_prev)]
                new_ref += [torch.where(moves, step, ref_step),
                            torch.where(moves, torch.where(has_cache, ref_step, step), prev_step)]
            if per_sample:  # the followers decide per sample under their own guards and cap (see above)
                extra_out += [by_policy | reuse_mask.any(), proposed, lam.to(torch.float32), *new_ref]
            else:
                extra_out += [reuse, blend_lam.to(torch.float32).reshape(()), *new_ref]
        return (*outs, *new_state, *stats, *extra_out)

    def _probe_reference(self, step: torch.Tensor, named: RegionSignals) -> list[torch.Tensor]:
        """What the probe scores against: its reference, or under ``probe_forecast`` that
        reference extrapolated to ``step`` (as runtime/decide.py's ``probe_forecast``: from
        two references of distinct steps, under the ``forecast_max_change`` gate)."""
        if named.probe_steps is None:
            return named.probe_ref
        distinct, k, gap = _steps_ahead(step, *named.probe_steps)
        return acm.forecast_reference(named.probe_ref, named.probe_prev, k, gap, self.config.forecast_max_change,
                                      usable=distinct)


# --------------------------------------------------------------------------- step graph


@dataclass
class StepGraph:
    """The step module and what the exporter and the runner need to know about it."""

    module: fx.GraphModule
    input_names: list[str]  # model inputs, then state inputs
    output_names: list[str]
    model_inputs: list[str]
    model_outputs: list[str]
    states: list[StateSpec]
    regions: list[RegionPlan]
    bindings: dict[Any, tuple[str, int]]


def _is_export_guard(node: fx.Node) -> bool:
    """``torch.export``'s input-guard call in an unlifted module: the step module is
    exported again with its own guards, so it is dropped."""
    return node.op == "call_module" and str(node.target) == "_guards_fn"


def _user_placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    out = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            out.append(node)
        elif any(not _is_export_guard(u) for u in node.users):
            raise ExportError(f"model input {node.name!r} is not a tensor but the graph uses it; pass tensors only")
    return out


def _build_step_graph(
    gm: fx.GraphModule, plans: list[RegionPlan], config: AdaCorrConfig, bindings: dict[Any, tuple[str, int]]
) -> StepGraph:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    user = _user_placeholders(gm)
    model_inputs = [n.name for n in user]
    for n in user:
        env[n] = graph.placeholder(n.name)
        env[n].meta = dict(n.meta)
    step = graph.placeholder("adacorr_step")
    states: list[StateSpec] = [StateSpec("adacorr_step", "step", "int64", [])]
    state_nodes: dict[str, fx.Node] = {"adacorr_step": step}
    fb_ref = None
    span_inputs: dict[int, list[fx.Node]] = {}  # span's first region -> the span's input (for its last region)
    if config.policy == "first_block" and plans:
        first = plans[0]
        res = first.residuals[0]
        fb_spec = StateSpec("adacorr_fb_ref", "fb_ref", res.dtype, res.dims)
        states.append(fb_spec)
    probe_refs: list[StateSpec] = []
    probe_hist: list[StateSpec] = []
    if config.scope == "step" and len(plans) >= 2:
        leader = plans[0]
        cached = leader.residuals
        probe_refs = [StateSpec(f"adacorr_probe_ref_{j}", "probe_ref", c.dtype, c.dims) for j, c in enumerate(cached)]
        states.extend(probe_refs)
        if probe_forecasts(config):  # the reference before the last and the two steps (probe_forecast)
            probe_hist = [StateSpec(f"adacorr_probe_prev_{j}", "probe_prev", c.dtype, c.dims) for j, c in enumerate(cached)]
            probe_hist += [StateSpec("adacorr_probe_ref_step", "probe_ref_step", "int64", []),
                           StateSpec("adacorr_probe_prev_step", "probe_prev_step", "int64", [])]
            states.extend(probe_hist)
    for plan in plans:
        states.extend(plan.states)
    for s in states[1:]:
        state_nodes[s.name] = graph.placeholder(s.name)
    steps_left = graph.placeholder("adacorr_steps_left")  # last: see StepGraph.input_names
    if config.policy == "first_block" and plans:
        fb_ref = state_nodes["adacorr_fb_ref"]

    new_state: dict[str, fx.Node] = {}
    stats: dict[str, list[fx.Node]] = {k: [] for k in STATS_OUTPUTS}
    similar = None
    probe_out: list[fx.Node] = []
    leader_res: list[fx.Node] = []
    placeholders = {n for n in gm.graph.nodes if n.op == "placeholder"}
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    for node in gm.graph.nodes:
        if node.op == "placeholder" or node is output_node or _is_export_guard(node):
            continue
        if node.op == "call_module" and str(node.target).startswith("adacorr_body_"):
            k = int(str(node.target).rsplit("_", 1)[1])
            plan = plans[k]
            name = f"adacorr_cond_{k}"
            body = getattr(gm, str(node.target))
            carried = _sizes_from_tensors(body, plan.path)
            gm.add_submodule(name, CondRegion(body, plan, config, carried, len(probe_refs)))
            extra = []
            srole = step_role(config, k)
            if config.policy == "first_block" and srole != "follower":
                extra = [fb_ref] if k == 0 else [similar]
            if srole == "probe":
                extra += leader_res + [state_nodes[s.name] for s in probe_refs + probe_hist]
                extra += [state_nodes[s.name] for p in plans[2:] for s in p.states if s.kind == "valid"]
            elif srole == "follower":
                extra = list(probe_out)
                if plan.span_size > 1 and plan.span_tail:
                    extra += span_inputs[plan.span_head]
            if plan.span_size > 1 and plan.span_position == 0:
                span_inputs[k] = [env[node.args[i]] for i in plan.span_sources]
            args = (step, steps_left, *(env[a] for a in node.args), *(state_nodes[s.name] for s in plan.states), *extra)
            call = graph.call_module(name, args)
            env[node] = call
            base = plan.num_outputs
            for m, s in enumerate(plan.states):
                new_state[s.name] = graph.call_function(operator.getitem, (call, base + m))
            base += len(plan.states)
            for m, key in enumerate(STATS_OUTPUTS):
                stats[key].append(graph.call_function(operator.getitem, (call, base + m)))
            if config.policy == "first_block" and k == 0:
                similar = graph.call_function(operator.getitem, (call, base + len(STATS_OUTPUTS)))
                new_state["adacorr_fb_ref"] = graph.call_function(operator.getitem, (call, base + len(STATS_OUTPUTS) + 1))
            at = base + len(STATS_OUTPUTS) + (2 if config.policy == "first_block" and k == 0 else 0)
            if srole == "leader":
                leader_res = [graph.call_function(operator.getitem, (call, at + m)) for m in range(len(probe_refs))]
            elif srole == "probe":  # its verdict for the followers (see CondRegion), then its new references
                n_verdict = 3 if config.decision == "sample" else 2
                probe_out = [graph.call_function(operator.getitem, (call, at + m)) for m in range(n_verdict)]
                for m, spec in enumerate(probe_refs + probe_hist):
                    new_state[spec.name] = graph.call_function(operator.getitem, (call, at + n_verdict + m))
            continue
        if any(a in placeholders and a not in env for a in node.all_input_nodes):
            raise ExportError(f"node {node.name} reads a non-tensor model input")
        env[node] = graph.node_copy(node, lambda a: env[a])

    flat_out, _ = pytree.tree_flatten(output_node.args[0])
    model_outputs = []
    outs = []
    for i, o in enumerate(flat_out):
        if not isinstance(o, fx.Node) or not isinstance(example_value(o), torch.Tensor):
            raise ExportError(f"model output {i} is not a tensor")
        outs.append(env[o])
        model_outputs.append(f"output_{i}")
    new_state["adacorr_step"] = graph.call_function(operator.add, (step, 1))
    stat_nodes = [graph.call_function(torch.stack, (stats[k],)) for k in STATS_OUTPUTS]
    graph.output(tuple(outs + [new_state[s.name] for s in states] + stat_nodes))
    module = fx.GraphModule(gm, graph, class_name="AdaCorrStep")
    module.graph.lint()
    return StepGraph(
        module=module,
        input_names=model_inputs + [s.name for s in states] + ["adacorr_steps_left"],
        output_names=model_outputs + [s.output for s in states] + list(STATS_OUTPUTS),
        model_inputs=model_inputs,
        model_outputs=model_outputs,
        states=states,
        regions=plans,
        bindings=bindings,
    )


# --------------------------------------------------------------------------- dynamic shapes


def _batch_size(kwargs: Mapping[str, Any]) -> int | None:
    for v in kwargs.values():
        if isinstance(v, torch.Tensor) and v.dim() >= 3:
            return int(v.shape[0])
    return None


def model_dynamic_shapes(kwargs: Mapping[str, Any], dynamic: str | Mapping[str, Mapping[int, Any]]) -> dict[str, Any]:
    """``torch.export`` dynamic shapes for the model's keyword inputs.

    ``"static"``: none. ``"batch"``: axis 0 of every tensor whose leading size equals the
    batch (that of the first input with 3 or more dimensions), one shared dimension.
    ``"tokens"``: also the sequence axis (1) of 3-d inputs ``[B, N, C]`` and axis 0 of
    2-d inputs that are not batched (Flux's ``img_ids``/``txt_ids``). ``"all"``: also
    the spatial axes of 4-d latents ``[B, C, H, W]``. Only use ``"tokens"``/``"all"``
    where the model computes with the token count symbolically (see the README: DiT and
    PixArt compare the latent size with their configuration in Python, so their image
    token count is fixed at export). A mapping is taken as ``{input: {axis: Dim}}``.
    """
    from torch.export import Dim

    if not isinstance(dynamic, str):
        return {k: dict(dynamic.get(k, {})) or None for k in kwargs}
    if dynamic not in DYNAMIC_MODES:
        raise ValueError(f"dynamic={dynamic!r}; expected one of {', '.join(DYNAMIC_MODES)} or a mapping")
    batch = Dim("batch", min=1, max=1 << 20)
    bsz = _batch_size(kwargs)
    if dynamic != "static" and bsz is not None and bsz < 2:
        raise ValueError("export with example inputs of batch >= 2: torch.export fixes dimensions of size 1")
    shapes: dict[str, Any] = {}
    for name, v in kwargs.items():
        if not isinstance(v, torch.Tensor):
            shapes[name] = None
            continue
        spec: dict[int, Any] = {}
        if dynamic != "static":
            batched = v.dim() >= 1 and bsz is not None and int(v.shape[0]) == bsz
            if batched:
                spec[0] = batch
            if dynamic in ("tokens", "all"):
                if v.dim() == 3 and batched:
                    spec[1] = Dim.DYNAMIC
                elif v.dim() == 2 and not batched:
                    spec[0] = Dim.DYNAMIC
            if dynamic == "all" and v.dim() == 4 and batched:
                spec[2] = spec[3] = Dim.DYNAMIC
        shapes[name] = spec or None
    return shapes


def _bindings(gm: fx.GraphModule) -> dict[Any, tuple[str, int]]:
    """Symbol -> (model input, axis) for every input dimension that is a bare symbol."""
    import sympy

    out: dict[Any, tuple[str, int]] = {}
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        for axis, d in enumerate(val.shape):
            if isinstance(d, torch.SymInt) and isinstance(d.node.expr, sympy.Symbol):
                out.setdefault(d.node.expr, (node.name, axis))
    return out


def _state_dynamic_shapes(states: list[StateSpec], model_shapes: Mapping[str, Any]) -> list[Any]:
    """State dims that are a model-input dim with a named ``Dim`` reuse it; other symbolic
    dims are ``Dim.AUTO`` (tracing unifies them with the inputs' dims)."""
    from torch.export import Dim

    out = []
    for s in states:
        spec: dict[int, Any] = {}
        for axis, d in enumerate(s.dims):
            if isinstance(d, int):
                continue
            named = None
            if isinstance(d, dict):
                named = (model_shapes.get(d["input"]) or {}).get(d["axis"])
            spec[axis] = named if named is not None and not isinstance(named, type(Dim.AUTO)) else Dim.AUTO
        out.append(spec or None)
    return out


def initial_state(states: Sequence[StateSpec], shapes: Mapping[str, Sequence[int]], like: str = "numpy") -> dict[str, Any]:
    """Zero state (empty cache) for the given model-input shapes; distinct buffers per state."""
    import numpy as np

    out: dict[str, Any] = {}
    for s in states:
        dims = [eval_dim(d, shapes) for d in s.dims]
        if like == "torch":
            out[s.name] = torch.zeros(dims, dtype=getattr(torch, s.dtype))
        else:
            out[s.name] = np.zeros(dims, dtype=np.dtype(s.dtype))
    return out


# --------------------------------------------------------------------------- entry point


@dataclass
class ExportResult:
    """What :func:`to_onnx` wrote, and what it checked."""

    path: str
    regions: list[str]
    states: list[str]
    dynamic: dict[str, Any]
    checks: dict[str, Any]
    metadata: dict[str, Any]


def _with_return_dict(model: torch.nn.Module, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    kw = dict(kwargs)
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if "return_dict" in params and "return_dict" not in kw:
        kw["return_dict"] = False
    return kw


def _drop_noop_squeezes(gm: fx.GraphModule) -> int:
    """Remove ``aten.squeeze`` of dimensions whose size is known and not 1.

    In PyTorch such a squeeze is a no-op (PixArt's ``hidden_states.squeeze(1)`` on
    ``[B, tokens, C]``); the ONNX exporter emits an ONNX ``Squeeze`` for it, which is
    invalid (``onnx.checker`` and onnxruntime reject a squeeze of a dimension != 1).
    """
    removed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (torch.ops.aten.squeeze.dim, torch.ops.aten.squeeze.dims):
            continue
        x = node.args[0]
        val = example_value(x) if isinstance(x, fx.Node) else None
        if not isinstance(val, torch.Tensor):
            continue
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = [dims] if isinstance(dims, int) else list(dims)
        sizes = [val.shape[d] for d in dims]
        if all(isinstance(n, int) and n != 1 for n in sizes):
            node.replace_all_uses_with(x)
            gm.graph.erase_node(node)
            removed += 1
    if removed:
        gm.graph.lint()
        gm.recompile()
    return removed


def _export_model(model: torch.nn.Module, kwargs: dict[str, Any], dynamic: Any) -> tuple[Any, dict[str, Any]]:
    for name, value in kwargs.items():  # the step graph and its runner take flat tensor inputs
        if not isinstance(value, torch.Tensor) and any(isinstance(x, torch.Tensor) for x in pytree.tree_leaves(value)):
            raise ExportError(
                f"model input {name!r} is a {type(value).__name__} of tensors; the export takes tensors (and fixed "
                "non-tensor values) as keyword inputs: wrap the model to take its tensors as separate inputs"
            )
    shapes = model_dynamic_shapes(kwargs, dynamic)
    with torch.no_grad():
        ep = torch.export.export(model, (), kwargs, dynamic_shapes=shapes, strict=False)
    if _drop_noop_squeezes(ep.graph_module):
        logger.debug("adacorr export: removed no-op squeezes")
    return ep, shapes


def build_step_module(
    model: torch.nn.Module, example_inputs: Mapping[str, Any], config: Any = None, dynamic: Any = "batch"
) -> tuple[StepGraph, dict[str, Any], dict[str, Any]]:
    """Trace ``model``, find and outline its blocks, and build the step module.

    Returns ``(step_graph, model_kwargs, model_dynamic_shapes)``. Raises
    :class:`ExportError` when no block can be guarded (the reasons the passes logged).
    """
    cfg = AdaCorrConfig.from_options(config)
    model = model.eval()
    kwargs = _with_return_dict(model, example_inputs)
    ep, shapes = _export_model(model, kwargs, dynamic)
    gm = ep.module()
    bindings = _bindings(gm)
    _hoist_sizes(gm)
    gm = find_blocks(gm, cfg)
    info = analysis(gm)
    if not info.blocks:
        reasons = "; ".join(f"{w}: {r}" for w, r in info.skipped) or "no blocks found"
        raise ExportError(f"no guardable blocks in the exported graph: {reasons}")
    for where, reason in info.skipped:
        logger.info("adacorr export: left unguarded: %s: %s", where, reason)
    gm = outline_blocks(gm, cfg)
    plans = _plan_regions(gm, cfg, bindings)
    return _build_step_graph(gm, plans, cfg, bindings), kwargs, shapes


def _example_state(states: Sequence[StateSpec], kwargs: Mapping[str, Any]) -> list[torch.Tensor]:
    shapes = {k: tuple(v.shape) for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    init = initial_state(states, shapes, like="torch")
    return [init[s.name] for s in states]


def to_onnx(
    model: torch.nn.Module,
    example_inputs: Mapping[str, Any],
    path: str | os.PathLike[str],
    config: Any = None,
    *,
    dynamic: str | Mapping[str, Mapping[int, Any]] = "batch",
    opset: int = DEFAULT_OPSET,
    cache: bool = True,
    check: bool = True,
) -> ExportResult:
    """Export ``model`` (called as ``model(**example_inputs)``) as one ONNX step graph.

    ``config``: an :class:`~adacorr_compile.AdaCorrConfig` or an options dict, as for
    ``torch.compile(..., backend="adacorr", options=...)`` (``lowering`` and
    ``inductor_mode`` are irrelevant here; ``decision`` must be ``"batch"``).
    ``dynamic``: which input axes stay dynamic (:func:`model_dynamic_shapes`).
    ``opset``: ONNX opset; below 23 attention is decomposed (see module docstring).
    ``cache=False`` exports the plain model (no regions, no state): the uncached baseline.
    ``check``: run ``onnx.checker`` and the TensorRT-parser pattern checks
    (:func:`adacorr_compile.export.tensorrt.check_tensorrt_patterns`) and raise on failure.

    Non-tensor keyword inputs (``return_dict=False`` is added when the forward takes it)
    are fixed at export. The ONNX model's metadata (key ``adacorr``) describes the state.
    """
    import onnx

    from .tensorrt import check_tensorrt_patterns

    cfg = AdaCorrConfig.from_options(config)
    path = os.fspath(path)
    model = model.eval()
    if opset >= 23:
        logger.warning("adacorr export: opset %d may emit the fused Attention op, which TensorRT fails to build inside If", opset)
    if cache:
        step, kwargs, shapes = build_step_module(model, example_inputs, cfg, dynamic)
        state_examples = _example_state(step.states, kwargs)
        user = [kwargs[n] for n in step.model_inputs]
        args = (*user, *state_examples, torch.tensor(STEPS_UNKNOWN, dtype=torch.int64))
        ds = [shapes.get(n) for n in step.model_inputs] + _state_dynamic_shapes(step.states, shapes) + [None]
        # torch.cond traces its branches with Dynamo; without this, the parameters it gets
        # as operands turn dynamic after the first region (automatic dynamic shapes)
        with torch.no_grad(), torch._dynamo.config.patch(automatic_dynamic_shapes=False):
            ep = torch.export.export(step.module, tuple(args), dynamic_shapes=tuple(ds), strict=True)
        input_names, output_names = step.input_names, step.output_names
        regions = [p.path for p in step.regions]
        states = step.states
        model_inputs, model_outputs = step.model_inputs, step.model_outputs
    else:
        kwargs = _with_return_dict(model, example_inputs)
        ep, shapes = _export_model(model, kwargs, dynamic)
        model_inputs = [n.name for n in _user_placeholders(ep.module())]
        n_out = len(ep.graph_signature.user_outputs)
        model_outputs = [f"output_{i}" for i in range(n_out)]
        input_names, output_names = model_inputs, model_outputs
        regions, states = [], []
    with torch.no_grad():
        program = torch.onnx.export(
            ep, dynamo=True, opset_version=opset, input_names=input_names, output_names=output_names, verbose=False
        )
    program.save(path)
    proto = onnx.load(path, load_external_data=False)
    metadata = {
        "format": 1,
        "cached": bool(cache),
        "config": dataclasses.asdict(cfg),
        "regions": regions,
        "model_inputs": model_inputs,
        # non-tensor inputs, fixed at export: the runner accepts them with these values only
        "fixed_inputs": {k: v for k, v in kwargs.items()
                         if k not in model_inputs and k != "return_dict" and isinstance(v, (bool, int, float, str, type(None)))},
        "model_outputs": model_outputs,
        "states": [dataclasses.asdict(s) for s in states],
        "stats_outputs": list(STATS_OUTPUTS) if cache else [],
        "steps_left_input": "adacorr_steps_left" if cache else None,
        "timestep_arg": cfg.timestep_arg,
        "opset": opset,
        "dynamic": {k: sorted(v) if isinstance(v, dict) else None for k, v in shapes.items() if k in model_inputs},
    }
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    onnx.save(proto, path)
    checks: dict[str, Any] = {}
    if check:
        onnx.checker.check_model(path, full_check=True)
        checks = check_tensorrt_patterns(onnx.load(path, load_external_data=False), expect_if=expected_if_nodes(cfg, len(regions)) if cache else 0)
        if checks["problems"]:
            raise ExportError(f"{path}: exported graph has patterns TensorRT's ONNX parser rejects: {checks['problems']}")
    logger.info("adacorr export: wrote %s (%d regions, %d state tensors, opset %d)", path, len(regions), len(states), opset)
    return ExportResult(path, regions, [s.name for s in states], metadata["dynamic"], checks, metadata)


def expected_if_nodes(config: AdaCorrConfig, regions: int) -> int:
    """``If`` nodes an export has: one per region whose decision is not known statically.
    ``never`` always computes (its predicate is constant and folded away); under
    ``first_block`` or ``scope="step"`` the first region always computes, so it has no ``If``."""
    if config.policy == "never":
        return 0
    return regions - 1 if first_region_computes_always(config) else regions


def read_metadata(path_or_proto: Any) -> dict[str, Any]:
    """The ``adacorr`` metadata of an exported model (path or ``onnx.ModelProto``)."""
    import onnx

    proto = path_or_proto if isinstance(path_or_proto, onnx.ModelProto) else onnx.load(os.fspath(path_or_proto), load_external_data=False)
    for entry in proto.metadata_props:
        if entry.key == METADATA_KEY:
            return json.loads(entry.value)
    raise ValueError("not an adacorr export: no 'adacorr' metadata")
