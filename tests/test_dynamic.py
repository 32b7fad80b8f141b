"""Wherever plain torch.compile works, ours works, and with policy="never" gives the same
output (issue 11, items 5 and 6): a new resolution on a later call, ``dynamic=True``,
non-contiguous inputs (channels_last, expanded timesteps), float timesteps, and a
fallback that is exactly plain Inductor. Regions must be found (not a fallback) in all
of these: they take symbolic sizes as inputs."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.fx as fx

import adacorr_compile
from adacorr_compile.lab import tiny
from adacorr_compile import backend
from adacorr_compile.passes import PASSES

NEVER = {"policy": "never"}
TOL = dict(rtol=1e-5, atol=1e-5)
FAMILIES = {
    "dit": lambda: tiny.tiny_dit(num_layers=2),
    "pixart": lambda: tiny.tiny_pixart(num_layers=2),
    "sd3": lambda: tiny.tiny_sd3(num_layers=2),
    "wan": lambda: tiny.tiny_wan(num_layers=2),
}
SLOW = ["pixart", "sd3", "wan"]  # dit runs every time; the others are marked slow


def families(fast=("dit",)):
    return [f if f in fast else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES]


def resized(kwargs: dict, size: int) -> dict:
    """The same call at another height and width (new latents, same text and timestep)."""
    x = kwargs["hidden_states"]
    shape = [*x.shape[:-2], size, size]
    return {**kwargs, "hidden_states": torch.randn(*shape, generator=torch.Generator().manual_seed(3))}


def channels_last(kwargs: dict) -> dict:
    x = kwargs["hidden_states"]
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    y = x.contiguous(memory_format=fmt)
    assert not y.is_contiguous()
    return {**kwargs, "hidden_states": y}


def transposed(kwargs: dict) -> dict:
    x = kwargs["hidden_states"]
    y = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, strides of a transpose
    assert not y.is_contiguous() and torch.equal(x, y)
    return {**kwargs, "hidden_states": y}


def sample(out):
    if isinstance(out, torch.Tensor):
        return out
    return out.sample if hasattr(out, "sample") else out[0]


def run_both(model, calls, dynamic=None, options=NEVER):
    """Outputs of ours (run first, on a fresh Dynamo) and of plain torch.compile (after a
    reset, so that Dynamo's automatic-dynamic state of one does not leak into the other)."""
    torch._dynamo.reset()
    ours = torch.compile(model, backend="adacorr", options=options, dynamic=dynamic)
    with torch.no_grad():
        got = [sample(ours(**kw)).clone() for kw in calls]
    torch._dynamo.reset()
    plain = torch.compile(model, dynamic=dynamic)
    with torch.no_grad():
        want = [sample(plain(**kw)).clone() for kw in calls]
    return ours, got, want


def assert_guarded(compiled, family):
    regions = adacorr_compile.regions(compiled)
    assert len(regions) == 2, [r.spec.path for r in regions]
    assert adacorr_compile.stats(compiled)["fallbacks"] == []


def assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, **TOL)


# --------------------------------------------------------------- (a) a new resolution
@pytest.mark.parametrize("family", families())
def test_new_resolution_on_second_call(family):
    model, inputs = FAMILIES[family]()
    calls = [inputs(0, 900.0), resized(inputs(1, 800.0), 12)]
    compiled, got, want = run_both(model, calls)
    assert got[1].shape[-1] == 12
    assert_same(got, want)
    assert_guarded(compiled, family)


@pytest.mark.slow
def test_resolutions_back_and_forth():
    model, inputs = FAMILIES["dit"]()
    calls = [inputs(0, 900.0), resized(inputs(1, 800.0), 12), resized(inputs(2, 700.0), 16), inputs(3, 600.0)]
    compiled, got, want = run_both(model, calls)
    assert_same(got, want)
    assert_guarded(compiled, "dit")


# --------------------------------------------------------------- (b) dynamic=True
@pytest.mark.parametrize("family", families(fast=()))
def test_dynamic_true(family):
    model, inputs = FAMILIES[family]()
    calls = [inputs(0, 900.0), inputs(1, 800.0), resized(inputs(2, 700.0), 12)]
    compiled, got, want = run_both(model, calls, dynamic=True)
    assert_same(got, want)
    assert_guarded(compiled, family)


# --------------------------------------------------------------- (c) channels_last
@pytest.mark.parametrize("family", families())
def test_channels_last_input_on_guarded_path(family):
    model, inputs = FAMILIES[family]()
    calls = [channels_last(inputs(i, 900.0 - 100 * i)) for i in range(2)]
    compiled, got, want = run_both(model, calls)
    assert_same(got, want)
    assert_guarded(compiled, family)


# --------------------------------------------------------------- (d) float timesteps
class FloatTimestep(torch.nn.Module):
    """A model called with a Python float timestep (made a [B] tensor inside forward)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, hidden_states, timestep, **kwargs):
        t = torch.full((hidden_states.shape[0],), timestep)
        return self.model(hidden_states=hidden_states, timestep=t, **kwargs)


@pytest.mark.parametrize("family", families())
def test_expanded_float_timestep(family):
    """A fractional 0-d timestep expanded to the batch, as pipelines pass it
    (``t.expand(batch)``: a stride-0 input)."""
    model, inputs = FAMILIES[family]()

    def expanded(i):
        kw = inputs(i, 0.0)
        return {**kw, "timestep": torch.tensor(900.5 - 97.25 * i).expand(kw["hidden_states"].shape[0])}

    compiled, got, want = run_both(model, [expanded(i) for i in range(3)])
    assert_same(got, want)
    assert_guarded(compiled, family)


@pytest.mark.slow
@pytest.mark.parametrize("family", families(fast=()))
def test_python_float_timestep(family):
    """A Python float timestep: Dynamo specializes it, then (a new value) makes it
    dynamic, or specializes it again; ours compiles as plain torch.compile does."""
    model, inputs = FAMILIES[family]()
    calls = [{**inputs(i, 0.0), "timestep": 900.5 - 97.25 * i} for i in range(3)]
    compiled, got, want = run_both(FloatTimestep(model).eval(), calls)
    assert_same(got, want)
    assert len(adacorr_compile.regions(compiled)) == 2


@pytest.mark.slow
def test_float_timestep_dynamic_true():
    model, inputs = FAMILIES["pixart"]()
    calls = [{**inputs(i, 0.0), "timestep": 900.5 - 97.25 * i} for i in range(3)]
    compiled, got, want = run_both(FloatTimestep(model).eval(), calls, dynamic=True)
    assert_same(got, want)
    assert len(adacorr_compile.regions(compiled)) == 2


# --------------------------------------------------------------- default options
def test_default_options_new_resolution_runs_and_computes_first_step():
    """With caching on, a new resolution starts a new generation: its first step computes
    (equal to plain torch.compile) and later steps reuse at the new size without error."""
    model, inputs = FAMILIES["dit"]()
    calls = [inputs(i, 900.0 - 100 * i) for i in range(4)]
    calls += [resized(inputs(i, 900.0 - 100 * i), 12) for i in range(5)]
    compiled, got, want = run_both(model, calls, options={"reuse_threshold": 1.0})
    assert_same(got[:2], want[:2])  # warm-up steps
    assert_same(got[4:6], want[4:6])  # warm-up steps of the new generation
    assert all(g.shape == w.shape and torch.isfinite(g).all() for g, w in zip(got, want))
    stats = adacorr_compile.stats(compiled)
    assert stats["fallbacks"] == [] and stats["totals"]["reuses"] > 0


# --------------------------------------------------------------- (6) fallback = plain Inductor
def _boom(gm, config):
    raise RuntimeError("forced for the test")


def force_fallback(monkeypatch, pass_name):
    """Make the pass ``pass_name`` raise, so that the backend falls back."""
    monkeypatch.setattr(backend, "PASSES", [_boom if p.__name__ == pass_name else p for p in PASSES])


@pytest.mark.parametrize("layout", [channels_last, transposed])
@pytest.mark.parametrize("family", families())
def test_forced_fallback_with_noncontiguous_input_equals_plain(family, layout, monkeypatch):
    force_fallback(monkeypatch, "lower")  # after outline/guard have rewritten the graph
    model, inputs = FAMILIES[family]()
    calls = [layout(inputs(i, 900.0 - 100 * i)) for i in range(2)]
    compiled, got, want = run_both(model, calls)
    assert_same(got, want)
    fallbacks = adacorr_compile.stats(compiled)["fallbacks"]
    assert fallbacks and all("forced for the test" in f for f in fallbacks)


@pytest.mark.slow
def test_forced_fallback_new_resolution_and_dynamic(monkeypatch):
    force_fallback(monkeypatch, "outline_blocks")
    model, inputs = FAMILIES["pixart"]()
    calls = [inputs(0, 900.0), channels_last(resized(inputs(1, 800.0), 12))]
    compiled, got, want = run_both(model, calls)
    assert_same(got, want)
    compiled, got, want = run_both(model, calls, dynamic=True)
    assert_same(got, want)
    assert adacorr_compile.stats(compiled)["fallbacks"]


# --------------------------------------------------------------- the pristine copy
def test_copy_graph_keeps_meta_and_is_independent():
    from adacorr_compile.backend import _copy_graph

    checked = []

    def backend(gm, example_inputs):
        copy = _copy_graph(gm.graph)
        pairs = list(zip(gm.graph.nodes, copy.nodes))
        assert len(pairs) == len(gm.graph.nodes) == len(copy.nodes)
        for a, b in pairs:
            assert (a.name, a.op, a.target) == (b.name, b.op, b.target)
            assert a.meta.keys() == b.meta.keys() and a.meta is not b.meta
            if "example_value" in a.meta:
                assert b.meta["example_value"] is a.meta["example_value"]
            if "nn_module_stack" in a.meta:
                assert b.meta["nn_module_stack"] == a.meta["nn_module_stack"]
                assert b.meta["nn_module_stack"] is not a.meta["nn_module_stack"]
        # a pass rewriting the traced graph's metadata leaves the copy alone
        a, b = next((a, b) for a, b in pairs if a.meta.get("nn_module_stack"))
        saved = dict(a.meta["nn_module_stack"])
        a.meta["nn_module_stack"].clear()
        assert b.meta["nn_module_stack"] == saved
        a.meta["nn_module_stack"].update(saved)
        assert fx.GraphModule(gm, copy).meta == {}  # the module's meta rides on the graph
        assert copy._adacorr_source_meta == gm.meta
        checked.append(gm)
        return gm.forward

    model, inputs = FAMILIES["dit"]()
    with torch.no_grad():
        torch.compile(model, backend=backend, dynamic=True)(**inputs(0, 900.0))
    assert checked


def test_regions_take_symbol_inputs_under_dynamic_shapes():
    """Under dynamic=True each region call gets the size symbols of its inputs (tokens
    (s0//2)*(s1//2) need s0 and s1), and the block bodies stay one compiled body."""
    model, inputs = FAMILIES["dit"]()
    compiled = torch.compile(model, backend="adacorr", options={**NEVER, "lowering": "eager"}, dynamic=True)
    with torch.no_grad():
        compiled(**inputs(0, 900.0))
    regions = adacorr_compile.regions(compiled)
    assert len(regions) == 2 and len({r.spec.key for r in regions}) == 1
    for r in regions:
        inputs_ = [n for n in r.body.graph.nodes if n.op == "placeholder"]
        assert any(isinstance(n.meta.get("example_value"), torch.SymInt) for n in inputs_)


def test_unshare_scalars_moves_sizes_out_of_blocks():
    fb = importlib.import_module("adacorr_compile.passes.find_blocks")
    graph = fx.Graph()
    x = graph.placeholder("x")
    size = graph.call_function(torch.ops.aten.sym_size.int, (x, 0))
    inner = graph.call_function(torch.mul, (x, 2))
    inner.meta["nn_module_stack"] = {"b0": ("blocks.0", torch.nn.Module)}
    size.meta["nn_module_stack"] = {"b0": ("blocks.0", torch.nn.Module)}
    graph.output((inner, size))
    # no example values: nothing is known to be a scalar, nothing moves
    assert fb.unshare_scalars(graph) == 0
    size.meta["example_value"] = 4
    assert fb.unshare_scalars(graph) == 1
    assert fb._block_of(size) is None and fb._block_of(inner) == ("blocks.0", "Module")


# --------------------------------------------------------------- region math, changing shapes
def test_region_math_follows_changing_shapes():
    """The per-step region math compiles once per shape, then once for any size: later
    shapes of the same ranks reuse that kernel where its guards hold (a size of 1,
    specialized when traced, gets its own), and every result equals the eager math."""
    from adacorr_compile.config import AdaCorrConfig
    from adacorr_compile.runtime.fused import RegionMath

    cfg = AdaCorrConfig()
    fused, eager = RegionMath(cfg), RegionMath(cfg.replace(lowering="eager"))
    g = torch.Generator().manual_seed(0)
    kernels = []
    with torch.no_grad():
        for shape in [(2, 16, 8), (2, 36, 8), (3, 64, 8), (2, 1, 8), (2, 36, 8)]:
            h, r = [torch.randn(*shape, generator=g)], [torch.randn(*shape, generator=g)]
            valid = torch.tensor(True)
            for a, b in zip(fused.measure(h, r, valid), eager.measure(h, r, valid)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            kernels.append(fused.compiled_kernels)
    # one for the exact shape, one for any size, none more until the size-1 shape
    assert kernels == [1, 2, 2, 3, 3]
