"""The pass manager (passes/manager.py): declared preconditions, the literal order, a
recorded stop, ``until``, and the input analysis as a pass (issue 31)."""

from __future__ import annotations

import logging

import pytest
import torch

import adacorr_compile
from adacorr_compile import backend
from adacorr_compile.api import _model_state
from adacorr_compile.config import AdaCorrConfig
from adacorr_compile.passes import PASSES, Pass, PassPreconditionError, check_order, run_passes
from adacorr_compile.passes.common import analysis
from adacorr_compile.lab.tiny import FAMILIES

ORDER = ["find_blocks", "analyze_inputs", "outline_blocks", "guard_blocks", "chain_regions", "lower"]


def traced(family: str = "dit", **kwargs):
    """(gm, example_inputs) of the tiny model's Dynamo graph, before any pass."""
    model, inputs = FAMILIES[family][0](**kwargs)
    captured = []

    def capture(gm, example_inputs):
        captured.append((gm, list(example_inputs)))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=capture)(**inputs(0, 500.0))
    assert len(captured) == 1
    return captured[0]


def by_name(name: str) -> Pass:
    return next(p for p in PASSES if p.__name__ == name)


# ------------------------------------------------------------------ preconditions
def test_missing_precondition_names_the_pass_and_the_field():
    gm, example_inputs = traced(num_layers=2)
    ran = []

    def needs_regions(gm, config):
        ran.append(True)
        return gm

    steps = [by_name("find_blocks"), Pass(needs_regions, requires=["blocks", "regions"])]
    with pytest.raises(PassPreconditionError, match=r"pass 'needs_regions' requires 'regions', which no pass before it provides"):
        run_passes(gm, example_inputs, AdaCorrConfig(lowering="eager"), steps)
    assert ran == []  # checked before the pass runs
    assert analysis(gm).passes_run == ["find_blocks"]


def test_check_order_rejects_a_list_out_of_order():
    swapped = [by_name("find_blocks"), by_name("guard_blocks"), by_name("outline_blocks")]
    with pytest.raises(PassPreconditionError, match=r"pass 'guard_blocks' requires 'bodies'"):
        check_order(swapped)
    with pytest.raises(PassPreconditionError, match=r"pass 'lower' requires 'regions', 'spans'"):
        check_order([by_name("lower")])
    check_order(PASSES)  # the real list is in order


# ------------------------------------------------------------------ the order
def test_pass_list_is_the_literal_order():
    assert [p.__name__ for p in PASSES] == ORDER


def test_passes_run_in_list_order(adacorr_log):
    adacorr_log.set_level(logging.DEBUG, logger="adacorr_compile")
    model, inputs = FAMILIES["dit"][0](num_layers=2)
    compiled = torch.compile(model, backend="adacorr", options={"lowering": "eager"})
    with torch.no_grad():
        compiled(**inputs(0, 500.0))
    (graph,) = _model_state(compiled).graphs
    assert graph.analysis.passes_run == ORDER
    logged = [name for name in ORDER if f"adacorr: pass {name} took" in adacorr_log.text]
    assert logged == ORDER
    positions = [adacorr_log.text.index(f"adacorr: pass {name} took") for name in ORDER]
    assert positions == sorted(positions)


def test_plain_functions_run_in_the_given_order():
    gm, example_inputs = traced(num_layers=2)
    seen = []

    def first(gm, config):
        seen.append("first")
        return gm

    def second(gm, config):
        seen.append("second")
        return gm

    _, info = run_passes(gm, example_inputs, AdaCorrConfig(lowering="eager"), [second, first, second])
    assert seen == ["second", "first", "second"] == info.passes_run


# ------------------------------------------------------------------ a recorded stop
def test_a_recorded_stop_ends_the_list_and_falls_back_with_the_reason(monkeypatch, adacorr_log):
    ran = []

    def stop_here(gm, config):
        analysis(gm).stop("graph", "forced stop for the test")
        return gm

    def after(gm, config):
        ran.append(True)
        return gm

    steps = [*PASSES[:4], Pass(stop_here), Pass(after), *PASSES[4:]]
    monkeypatch.setattr(backend, "PASSES", steps)
    model, inputs = FAMILIES["dit"][0](num_layers=2)
    compiled = torch.compile(model, backend="adacorr", options={"lowering": "eager"})
    with torch.no_grad():
        got = compiled(**inputs(0, 500.0))
        want = model(**inputs(0, 500.0))
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # the fallback is the graph itself
    assert ran == []
    assert "adacorr: pass list stopped after stop_here: graph: forced stop for the test" in adacorr_log.text
    assert adacorr_compile.stats(compiled)["fallbacks"] == ["graph: forced stop for the test"]
    assert adacorr_compile.regions(compiled) == []


def test_no_blocks_stops_after_find_blocks():
    class NoBlocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(8, 8)

        def forward(self, x):
            return torch.relu(self.a(x))

    captured = []

    def capture(gm, example_inputs):
        captured.append((gm, list(example_inputs)))
        return gm.forward

    with torch.no_grad():
        torch.compile(NoBlocks().eval(), backend=capture)(torch.randn(2, 8))
    gm, example_inputs = captured[0]
    _, info = run_passes(gm, example_inputs, AdaCorrConfig(lowering="eager"), PASSES)
    assert info.stopped and info.passes_run == ["find_blocks"]
    assert "no repeated sibling modules" in info.skipped[0][1]


# ------------------------------------------------------------------ until, and the input analysis
def test_until_stops_once_the_name_is_provided():
    gm, example_inputs = traced(num_layers=2)
    out, info = run_passes(gm, example_inputs, AdaCorrConfig(lowering="eager"), PASSES, until="regions")
    assert info.passes_run == ORDER[:4]  # not chained, not lowered
    assert [r.spec.path for r in info.regions] == ["transformer_blocks.0", "transformer_blocks.1"]
    assert out is gm and info.bodies_compiled == 0
    with pytest.raises(ValueError, match=r"until='nothing' is provided by no pass"):
        run_passes(gm, example_inputs, AdaCorrConfig(), PASSES, until="nothing")


def test_analyze_inputs_records_the_input_positions():
    gm, example_inputs = traced(num_layers=2)
    _, info = run_passes(gm, example_inputs, AdaCorrConfig(lowering="eager"), PASSES, until="input_indices")
    assert info.passes_run == ["find_blocks", "analyze_inputs"]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert "timestep" in placeholders[info.timestep_index].name
    assert isinstance(example_inputs[info.owner_index], torch.nn.Parameter)
    first = info.blocks[0]
    assert placeholders[info.context_index] in [first.inputs[i] for i in first.param_inputs]
    data = [i for i, x in enumerate(example_inputs) if isinstance(x, torch.Tensor) and not isinstance(x, torch.nn.Parameter)]
    assert info.input_indices and set(info.input_indices) <= set(data)
    assert info.timestep_index in info.input_indices


def test_dump_graphs_covers_every_pass_of_the_list(adacorr_log):
    gm, example_inputs = traced(num_layers=2)
    run_passes(gm, example_inputs, AdaCorrConfig(lowering="eager", dump_graphs=True), PASSES, until="regions")
    for name in ORDER[:4]:
        assert f"adacorr graph before {name}" in adacorr_log.text
        assert f"adacorr graph after {name}" in adacorr_log.text
    assert "adacorr graph before chain_regions" not in adacorr_log.text
