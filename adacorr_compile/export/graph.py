"""The step graph: the outlined model with each block call replaced by a :class:`CondRegion`
and the cache state as explicit inputs and outputs (names in :mod:`adacorr_compile.export.onnx`)."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..config import AdaCorrConfig
from ..passes.common import example_value
from ..policies import probe_forecasts, step_role
from .cond import CondRegion
from .dims import ExportError
from .plan import STATS_OUTPUTS, RegionPlan, StateSpec
from .sizes import _sizes_from_tensors


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


def _shared_states(plans: list[RegionPlan], config: AdaCorrConfig) -> tuple[list[StateSpec], list[StateSpec]]:
    """The state the regions share: the step, the first block's reference (``first_block``),
    the probe's references and their forecast points (``scope="step"``); and the probe's
    part of it (what it gets and returns after its verdict)."""
    states = [StateSpec("adacorr_step", "step", "int64", [])]
    if config.policy == "first_block" and plans:
        res = plans[0].residuals[0]
        states.append(StateSpec("adacorr_fb_ref", "fb_ref", res.dtype, res.dims))
    probe: list[StateSpec] = []
    if config.scope == "step" and len(plans) >= 2:
        cached = plans[0].residuals
        probe = [StateSpec(f"adacorr_probe_ref_{j}", "probe_ref", c.dtype, c.dims) for j, c in enumerate(cached)]
        if probe_forecasts(config):  # the reference before the last and the two steps (probe_forecast)
            probe += [StateSpec(f"adacorr_probe_prev_{j}", "probe_prev", c.dtype, c.dims) for j, c in enumerate(cached)]
            probe += [StateSpec("adacorr_probe_ref_step", "probe_ref_step", "int64", []),
                      StateSpec("adacorr_probe_prev_step", "probe_prev_step", "int64", [])]
        states.extend(probe)
    return states, probe


@dataclass
class _Builder:
    """The step graph being built: its nodes for the state, and what the regions pass on."""

    gm: fx.GraphModule
    plans: list[RegionPlan]
    config: AdaCorrConfig
    graph: fx.Graph
    probe: list[StateSpec]
    state_nodes: dict[str, fx.Node]
    step: fx.Node
    steps_left: fx.Node
    env: dict[fx.Node, fx.Node] = field(default_factory=dict)
    new_state: dict[str, fx.Node] = field(default_factory=dict)
    stats: dict[str, list[fx.Node]] = field(default_factory=lambda: {k: [] for k in STATS_OUTPUTS})
    similar: fx.Node | None = None
    probe_out: list[fx.Node] = field(default_factory=list)
    leader_res: list[fx.Node] = field(default_factory=list)
    span_inputs: dict[int, list[fx.Node]] = field(default_factory=dict)  # span's first region -> the span's input

    @property
    def leader_pairs(self) -> int:
        """The leader's residuals the probe scores (``scope="step"``; else none)."""
        return sum(s.kind == "probe_ref" for s in self.probe)

    def _extra(self, k: int, plan: RegionPlan) -> list[fx.Node]:
        """The ``extra`` inputs of region ``k`` (see :class:`CondRegion`)."""
        config, role = self.config, step_role(self.config, k)
        extra: list[Any] = []
        if config.policy == "first_block" and role != "follower":
            extra = [self.state_nodes["adacorr_fb_ref"]] if k == 0 else [self.similar]
        if role == "probe":
            extra += self.leader_res + [self.state_nodes[s.name] for s in self.probe]
            extra += [self.state_nodes[s.name] for p in self.plans[2:] for s in p.states if s.kind == "valid"]
        elif role == "follower":
            extra = list(self.probe_out)
            if plan.span_size > 1 and plan.span_tail:
                extra += self.span_inputs[plan.span_head]
        return extra

    def region(self, node: fx.Node) -> None:
        """Replace the block call ``node`` by a :class:`CondRegion` call and take its outputs apart."""
        graph, config = self.graph, self.config
        k = int(str(node.target).rsplit("_", 1)[1])
        plan = self.plans[k]
        name = f"adacorr_cond_{k}"
        body = getattr(self.gm, str(node.target))
        carried = _sizes_from_tensors(body, plan.path)
        self.gm.add_submodule(name, CondRegion(body, plan, config, carried, self.leader_pairs))
        extra = self._extra(k, plan)
        if plan.span_size > 1 and plan.span_position == 0:
            self.span_inputs[k] = [self.env[node.args[i]] for i in plan.span_sources]
        args = (self.step, self.steps_left, *(self.env[a] for a in node.args), *(self.state_nodes[s.name] for s in plan.states), *extra)
        call = graph.call_module(name, args)
        self.env[node] = call

        def item(m: int) -> fx.Node:
            return graph.call_function(operator.getitem, (call, m))

        base = plan.num_outputs
        for m, s in enumerate(plan.states):
            self.new_state[s.name] = item(base + m)
        base += len(plan.states)
        for m, key in enumerate(STATS_OUTPUTS):
            self.stats[key].append(item(base + m))
        at = base + len(STATS_OUTPUTS)
        if config.policy == "first_block" and k == 0:
            self.similar, self.new_state["adacorr_fb_ref"] = item(at), item(at + 1)
            at += 2
        role = step_role(config, k)
        if role == "leader":
            self.leader_res = [item(at + m) for m in range(self.leader_pairs)]
        elif role == "probe":  # its verdict for the followers (see CondRegion), then its new references
            n_verdict = 3 if config.decision == "sample" else 2
            self.probe_out = [item(at + m) for m in range(n_verdict)]
            for m, spec in enumerate(self.probe):
                self.new_state[spec.name] = item(at + n_verdict + m)


def _build_step_graph(
    gm: fx.GraphModule, plans: list[RegionPlan], config: AdaCorrConfig, bindings: dict[Any, tuple[str, int]]
) -> StepGraph:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    user = _user_placeholders(gm)
    for n in user:
        env[n] = graph.placeholder(n.name)
        env[n].meta = dict(n.meta)
    states, probe = _shared_states(plans, config)
    step = graph.placeholder("adacorr_step")
    for plan in plans:
        states.extend(plan.states)
    state_nodes = {"adacorr_step": step, **{s.name: graph.placeholder(s.name) for s in states[1:]}}
    steps_left = graph.placeholder("adacorr_steps_left")  # last: see StepGraph.input_names
    build = _Builder(gm, plans, config, graph, probe, state_nodes, step, steps_left, env)
    placeholders = {n for n in gm.graph.nodes if n.op == "placeholder"}
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    for node in gm.graph.nodes:
        if node.op == "placeholder" or node is output_node or _is_export_guard(node):
            continue
        if node.op == "call_module" and str(node.target).startswith("adacorr_body_"):
            build.region(node)
            continue
        if any(a in placeholders and a not in env for a in node.all_input_nodes):
            raise ExportError(f"node {node.name} reads a non-tensor model input")
        env[node] = graph.node_copy(node, lambda a: env[a])
    flat_out, _ = pytree.tree_flatten(output_node.args[0])
    for i, o in enumerate(flat_out):
        if not isinstance(o, fx.Node) or not isinstance(example_value(o), torch.Tensor):
            raise ExportError(f"model output {i} is not a tensor")
    outs = [env[o] for o in flat_out]
    model_outputs = [f"output_{i}" for i in range(len(flat_out))]
    build.new_state["adacorr_step"] = graph.call_function(operator.add, (step, 1))
    stat_nodes = [graph.call_function(torch.stack, (build.stats[k],)) for k in STATS_OUTPUTS]
    graph.output(tuple(outs + [build.new_state[s.name] for s in states] + stat_nodes))
    module = fx.GraphModule(gm, graph, class_name="AdaCorrStep")
    module.graph.lint()
    model_inputs = [n.name for n in user]
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
