"""step.py: the region step's functions against their formulas, the cache's transitions, and
one definition for both sides (the runtime and the export's CondRegion call the same functions)."""

import pytest
import torch
import torch.fx as fx

from adacorr_compile import AdaCorrConfig
from adacorr_compile import step as rstep
from adacorr_compile.export.cond import CondRegion
from adacorr_compile.export.plan import RegionPlan, StateSpec
from adacorr_compile.runtime.region import ACTIVE, Active, GuardedRegion, RegionSpec
from adacorr_compile.runtime.state import GenerationState


def test_reuse_is_input_plus_residual_exactly():
    h, r = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    (out,) = rstep.reuse([h], [r], None, 0.0, None, residuals=True)
    assert torch.equal(out, h + r)


def test_reuse_of_outputs_returns_a_copy():
    cached = torch.randn(2, 3)
    (out,) = rstep.reuse([torch.zeros(2, 3)], [cached], None, 0.0, None, residuals=False)
    assert torch.equal(out, cached) and out is not cached
    out.add_(1.0)  # writing into the result leaves the cache as it was
    assert not torch.equal(out, cached)


def test_reuse_forecast_extrapolates_linearly_where_usable():
    h, r, prev = torch.randn(4), torch.randn(4), torch.randn(4)
    k = 0.5
    (out,) = rstep.reuse([h], [r], [prev], k, torch.tensor(True), residuals=True)
    assert torch.allclose(out, h + r + (r - prev) * k, atol=1e-6)
    (kept,) = rstep.reuse([h], [r], [prev], k, torch.tensor(False), residuals=True)
    assert torch.equal(kept, h + r)


def test_fresh_residuals_store_output_minus_input_and_finiteness():
    y, x = torch.randn(3, 4), torch.randn(3, 4)
    (res,), valid = rstep.fresh_residuals([y], [x])
    assert torch.equal(res, y - x) and bool(valid)
    y[0, 0] = float("inf")
    _, valid = rstep.fresh_residuals([y], [x])
    assert not bool(valid)


def test_steps_ahead_host_and_tensor_forms_agree():
    distinct, k, gap = rstep.steps_ahead(7, 5, 3)
    assert distinct and k == 1.0 and gap == 2.0
    t = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    distinct_t, k_t, gap_t = rstep.steps_ahead(t(7), t(5), t(3))
    assert bool(distinct_t) and k_t.item() == k and gap_t.item() == gap
    same, k0, _ = rstep.steps_ahead(t(7), t(5), t(5))  # one compute so far: no slope
    assert not bool(same) and torch.isfinite(k0)
    assert rstep.steps_ahead(7, 5, 5)[:2] == (False, 0.0)


def test_slope_usable_gates_fast_changes_only_when_bounded():
    usable = torch.tensor(True)
    new, old = [torch.ones(4) * 2], [torch.ones(4)]
    assert rstep.slope_usable(usable, new, old, 1.0, float("inf")) is usable
    assert not bool(rstep.slope_usable(usable, new, old, 1.0, 0.1))  # ||new - old|| = 2 > 0.1 * 4
    assert bool(rstep.slope_usable(usable, new, old, 1.0, 1.0))


def test_order_outputs_places_values_by_their_output_position():
    assert rstep.order_outputs(((0, 1), (2, 0)), 2, ["a", "b"]) == ["b", "a"]


def test_region_cache_state_round_trip_and_clear():
    kinds = ["ref_in", "ref_res", "ref_res", "valid", "consecutive"]
    values = [torch.randn(2), torch.randn(3), torch.randn(4), torch.tensor(True), torch.tensor(2)]
    cache = rstep.RegionCache.from_state(kinds, values)
    assert len(cache.ref_res) == 2 and cache.valid is values[3]
    assert all(a is b for a, b in zip(cache.to_state(kinds), values))
    cache.signature = ("sig",)
    cache.clear()
    assert cache == rstep.RegionCache()


def test_region_cache_transitions():
    cache = rstep.RegionCache()
    cache.check_signature(("a",))
    cache.reused(batch=2, prev_in=None)
    cache.reused(batch=2, prev_in=None)
    assert cache.consecutive == 2 and cache.streaks == [2, 2]
    cache.computed(last=True, mask=[True, False], batch=2)
    assert cache.consecutive == 0 and cache.streaks == [3, 0]
    cache.check_signature(("b",))  # other shapes: empty
    assert cache.consecutive == 0 and cache.streaks is None and cache.signature == ("b",)
    # forecast="linear": two computes give the earlier point and the steps
    r1, r2 = [torch.ones(3)], [torch.full((3,), 2.0)]
    cache.rotate(False, True, step=1)
    cache.store(r1, None, None, None, torch.tensor(True))
    cache.rotate(False, True, step=3)
    cache.store(r2, None, None, None, torch.tensor(True))
    prev, k = cache.forecast(4, r2)
    assert prev is r1 and k == 0.5 and (cache.prev_step, cache.ref_step) == (1, 3)


def test_step_signals_probe_reference_and_forecast():
    signals = rstep.StepSignals()
    a, b = [torch.ones(2)], [torch.zeros(2)]
    signals.move_probe_ref(a, 2, keep_previous=True)
    assert signals.probe_forecast(3) is None  # one reference: nothing to extrapolate from
    signals.move_probe_ref(b, 4, keep_previous=True)
    assert signals.probe_prev is a and signals.probe_forecast(5) == (0.5, 2.0)
    signals.move_probe_ref(a, 6, keep_previous=False)
    assert signals.probe_prev is None and signals.probe_forecast(7) is None


# --------------------------------------------------------------------------- one definition


class _Body(torch.nn.Module):
    def forward(self, h):
        return (torch.tanh(h) * 2,)


def _runtime_refresh(cfg: AdaCorrConfig, h: torch.Tensor) -> torch.Tensor:
    """The runtime's cached residual after one compute of a lone block."""
    spec = RegionSpec(path="blocks.0", order=0, stream_pairs=((0, 0),), observed=(0,), num_outputs=1, key="k")
    region, state = GuardedRegion(spec, fx.symbolic_trace(_Body()), cfg), GenerationState()
    token = ACTIVE.set(Active(state, (0, 0), 0))
    try:
        region(h)
    finally:
        ACTIVE.reset(token)
    return state.cache((0, "blocks.0")).ref_res[0]


def _export_refresh(cfg: AdaCorrConfig, h: torch.Tensor) -> torch.Tensor:
    """The export's new cached residual after one step (step 0: a compute) of a lone block."""
    plan = RegionPlan(index=0, path="blocks.0", key="k", num_inputs=1, num_outputs=1, stream_pairs=[(0, 0)], observed=[0])
    kinds = [("ref_in_0", "ref_in"), ("ref_res_0", "ref_res"), ("valid", "valid"), ("consecutive", "consecutive")]
    plan.states = [StateSpec(f"adacorr_r0_{name}", kind, "float32", [], 0) for name, kind in kinds]
    region = CondRegion(fx.symbolic_trace(_Body()), plan, cfg)
    state = [torch.zeros_like(h), torch.zeros_like(h), torch.tensor(True), torch.tensor(0)]
    out = region(torch.tensor(0), torch.tensor(100), h, *state)
    return out[1 + 1]  # outputs, then the new state: ref_in, ref_res


def test_runtime_and_export_refresh_through_the_same_step_function(monkeypatch):
    cfg = AdaCorrConfig.from_options({"policy": "adacorr", "scope": "block", "forecast": "none", "correction": True,
                                      "lowering": "eager"})
    h = torch.randn(2, 3, 4)
    expected = torch.tanh(h) * 2 - h
    assert torch.equal(_runtime_refresh(cfg, h), expected)
    assert torch.equal(_export_refresh(cfg, h), expected)

    def marked(fresh, inputs):  # another refresh: both sides must take it
        residuals = [f - x + 7.0 for f, x in zip(fresh, inputs)]
        return residuals, torch.stack([torch.isfinite(r).all() for r in residuals]).all()

    monkeypatch.setattr(rstep, "fresh_residuals", marked)
    assert torch.equal(_runtime_refresh(cfg, h), expected + 7.0)
    assert torch.equal(_export_refresh(cfg, h), expected + 7.0)


@pytest.mark.parametrize("name", ["reuse", "fresh_residuals", "measure", "order_outputs"])
def test_both_sides_look_the_step_functions_up_in_step_py(name):
    """Neither side keeps its own copy: each calls ``step.<name>`` through the module."""
    import inspect

    from adacorr_compile.export import cond
    from adacorr_compile.runtime import fused, region

    sources = {m.__name__: inspect.getsource(m) for m in (cond, region, fused)}
    callers = [m for m, src in sources.items() if f"rstep.{name}(" in src]
    assert "adacorr_compile.export.cond" in callers and any(m.startswith("adacorr_compile.runtime") for m in callers)
