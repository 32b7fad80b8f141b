"""GuardedRegion driven directly: reuse and blend outputs against their formulas."""

import pytest
import torch
import torch.fx as fx

from adacorr_compile import AdaCorrConfig, acm, oem
from adacorr_compile.runtime.region import ACTIVE, Active, GuardedRegion, RegionSpec
from adacorr_compile.runtime.state import GenerationState


class Body(torch.nn.Module):
    def forward(self, h, cond):
        return (torch.tanh(h) * 2 + cond,)


def make_region(**options):
    # the paper's policy (lambda decides per block, offset-corrected reuse as stored), not the
    # benchmark-chosen default (one decision per step, forecast reuse)
    cfg = AdaCorrConfig.from_options({"policy": "adacorr", "correction": True, "scope": "block", "forecast": "none",
                                      "warmup_steps": 1,
                                      "max_consecutive_reuses": 5, **options})
    body = fx.symbolic_trace(Body())
    spec = RegionSpec(path="blocks.0", order=0, stream_pairs=((0, 0),), observed=(0,), num_outputs=1, key="k")
    region = GuardedRegion(spec, body, cfg)
    return region, cfg, GenerationState()


def call(region, state, step, *args):
    token = ACTIVE.set(Active(state, (0, 0), step))
    try:
        return region(*args)[0]
    finally:
        ACTIVE.reset(token)


def test_reuse_step_is_input_plus_cached_residual_exactly():
    region, cfg, state = make_region(reuse_threshold=1.0)
    h0, cond = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    y0 = call(region, state, 0, h0, cond)
    residual = y0 - h0
    h1 = h0 + 0.01
    y1 = call(region, state, 1, h1, cond)
    assert region.executions == 1  # second call skipped the body
    assert torch.equal(y1, h1 + residual)
    assert state.stats["blocks.0"].reuses == 1 and state.stats["blocks.0"].computes == 1


def test_compute_step_blends_by_lambda():
    region, cfg, state = make_region(reuse_threshold=0.0, blend=True, gamma=1.0)
    h0, cond = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    y0 = call(region, state, 0, h0, cond)
    h1 = h0 + 0.3 * torch.randn(2, 4, 8)
    y1 = call(region, state, 1, h1, cond)
    assert region.executions == 2
    lam = acm.correction_weight(oem.relative_offset_score(h1, h0), 1.0)
    assert 0 < lam.item() < 1
    fresh = Body()(h1, cond)[0]
    expected = (1 - lam) * (h1 + (y0 - h0)) + lam * fresh
    assert torch.allclose(y1, expected, atol=1e-6)


def test_no_correction_reuses_stale_output():
    region, cfg, state = make_region(policy="interval", interval=2, correction=False)
    h0, cond = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    y0 = call(region, state, 0, h0, cond)
    y1 = call(region, state, 1, h0 + 1.0, cond)  # step 1: (1-1)%2==0 -> compute
    y2 = call(region, state, 2, h0 + 2.0, cond)  # reuse: the cached output as it was
    assert region.executions == 2 and torch.equal(y2, y1)
    assert not torch.equal(y0, y1)


def test_per_sample_decisions_mix_reuse_and_compute():
    region, cfg, state = make_region(reuse_threshold=0.02, decision="sample")
    h0, cond = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    y0 = call(region, state, 0, h0, cond)
    h1 = h0.clone()
    h1[1] += 0.5 * torch.randn(4, 8)  # sample 1 drifts, sample 0 does not
    y1 = call(region, state, 1, h1, cond)
    fresh = Body()(h1, cond)[0]
    assert torch.equal(y1[0], (h1 + (y0 - h0))[0])  # reused
    assert torch.allclose(y1[1], fresh[1])  # computed
    assert state.stats["blocks.0"].partial == 1


def test_nonfinite_output_forces_recompute():
    region, cfg, state = make_region(reuse_threshold=1.0)
    h0, cond = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    bad = cond.clone()
    bad[0, 0, 0] = float("nan")
    call(region, state, 0, h0, bad)  # residual poisoned with NaN
    y = call(region, state, 1, h0, cond)
    assert region.executions == 2 and torch.isfinite(y).all()
    assert state.stats["blocks.0"].nonfinite == 1


def _streams(seed):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(4, 8, 6, generator=g) * 3.0
    txt = torch.randn(4, 6, 3, generator=g).transpose(1, 2)  # [4, 3, 6], not contiguous
    return [img, txt]


def test_region_math_compiled_by_inductor_matches_the_formulas():
    from adacorr_compile.runtime.fused import RegionMath

    for options in ({}, {"score": "paper", "gamma": 0.5}, {"decision": "sample", "spatial_weight": 0.3}):
        cfg = AdaCorrConfig.from_options(options)
        fused, eager = RegionMath(cfg), RegionMath(cfg.replace(lowering="eager"))
        h, ref = _streams(0), _streams(1)
        valid = torch.tensor(True)
        with torch.no_grad():
            s_c, l_c, host_c = fused.measure(h, ref, valid)
            s_e, l_e, host_e = eager.measure(h, ref, valid)
            s_c2, _, _ = fused.measure(_streams(2), ref, valid)  # same signature: no new kernel
        expected = oem.score(cfg.score, h, ref, cfg.spatial_weight, cfg.decision == "sample")
        assert fused.compiled_kernels == 1 and eager.compiled_kernels == 0
        torch.testing.assert_close(s_c, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s_e, expected, rtol=0, atol=0)
        torch.testing.assert_close(l_c, acm.correction_weight(expected, cfg.gamma), rtol=1e-5, atol=1e-6)
        assert host_c.tolist()[-2:] == [1.0, 1.0]
        torch.testing.assert_close(host_c, host_e, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s_c2, oem.score(cfg.score, _streams(2), ref, cfg.spatial_weight,
                                                   cfg.decision == "sample"), rtol=1e-5, atol=1e-6)
        # the host vector reports a non-finite cache and a non-finite score
        bad = _streams(3)
        bad[0][1, 2, 3] = float("nan")
        with torch.no_grad():
            host = fused.measure(bad, ref, torch.tensor(False))[2].tolist()
        assert host[-2:] == [0.0, 0.0]


def test_region_math_refresh_residuals_and_finiteness():
    from adacorr_compile.runtime.fused import RegionMath

    math = RegionMath(AdaCorrConfig())
    x, f = _streams(4), _streams(5)
    with torch.no_grad():
        res, valid = math.refresh(f, x)
        assert bool(valid) and len(res) == 2
        for r, a, b in zip(res, f, x):
            torch.testing.assert_close(r, a - b, rtol=0, atol=1e-6)
        f[1][0, 0, 0] = float("inf")
        assert not bool(math.refresh(f, x)[1])
    assert math.compiled_kernels == 1


def test_guarded_region_under_inductor_lowering_uses_compiled_math():
    region, cfg, state = make_region(reuse_threshold=1.0, lowering="inductor")
    h0, cond = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    with torch.no_grad():
        y0 = call(region, state, 0, h0, cond)
        y1 = call(region, state, 1, h0 + 0.01, cond)
    assert region.executions == 1 and region.math.compiled_kernels == 2  # measure + refresh
    torch.testing.assert_close(y1, h0 + 0.01 + (y0 - h0), rtol=0, atol=1e-6)
    stats = state.region_stats("blocks.0").summary()
    expected = acm.correction_weight(oem.score(cfg.score, [h0 + 0.01], [h0], cfg.spatial_weight), cfg.gamma)
    assert stats["mean_lambda"] == pytest.approx(float(expected), rel=1e-4)


# ------------------------------------------------------------ issue 14: region-step bugs
def test_blend_never_blends_a_nonfinite_cache():
    """blend=True: a cache that is not finite forces a compute, which returns the fresh
    block alone (it used to blend with the NaN cache: NaN output)."""
    region, cfg, state = make_region(reuse_threshold=0.0, blend=True)
    h0, cond = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    bad = cond.clone()
    bad[0, 0, 0] = float("nan")
    call(region, state, 0, h0, bad)  # the cached residual is NaN
    h1 = h0 + 0.3
    y1 = call(region, state, 1, h1, cond)
    assert torch.isfinite(y1).all()
    torch.testing.assert_close(y1, Body()(h1, cond)[0], rtol=0, atol=0)


def test_blend_only_on_computes_the_policy_chose():
    """A compute forced by a guard (here the final step) is the fresh block exactly; one
    the policy chose is blended."""
    region, cfg, state = make_region(reuse_threshold=0.0, blend=True, final_steps=1)
    state.num_steps = 3
    h0, cond = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    call(region, state, 0, h0, cond)
    h1, h2 = h0 + 0.3, h0 + 0.6
    y1 = call(region, state, 1, h1, cond)  # the policy computes (lambda > 0): blended
    y2 = call(region, state, 2, h2, cond)  # the final step: forced, fresh
    assert not torch.equal(y1, Body()(h1, cond)[0])
    torch.testing.assert_close(y2, Body()(h2, cond)[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="'blend'=True and 'policy'='never'"):
        AdaCorrConfig(policy="never", blend=True)


def test_per_sample_reuse_cap_holds_for_each_sample():
    """decision="sample": a sample that keeps reusing computes once it reaches
    max_consecutive_reuses, even while another sample's computes keep the region busy."""
    region, cfg, state = make_region(reuse_threshold=0.02, decision="sample", max_consecutive_reuses=2)
    h0, cond = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    call(region, state, 0, h0, cond)
    g = torch.Generator().manual_seed(0)
    h = h0.clone()
    for step in range(1, 7):
        h = h.clone()
        h[1] += 0.5 * torch.randn(4, 8, generator=g)  # sample 1 drifts every step, sample 0 never
        call(region, state, step, h, cond)
    trace = state.stats["blocks.0"].reuse_trace[1:]  # fraction of samples reused per call
    # sample 0 reuses twice, then must compute (with sample 1): 0.5, 0.5, 0.0, 0.5, 0.5, 0.0
    assert trace == [0.5, 0.5, 0.0, 0.5, 0.5, 0.0]


def region_cache(state):
    return state.cache((0, "blocks.0"))


def test_forecast_never_extrapolates_from_a_partial_refresh():
    """decision="sample" + forecast="linear": values some samples kept from an earlier
    step are not extrapolated as if they came from the latest compute."""
    region, cfg, state = make_region(reuse_threshold=0.05, decision="sample", forecast="linear",
                                     max_consecutive_reuses=10)
    h0, cond = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    call(region, state, 0, h0, cond)
    h1 = h0.clone()
    h1[1] += 1.0  # step 1: sample 0 reuses, sample 1 computes (a partial refresh)
    call(region, state, 1, h1, cond)
    assert state.stats["blocks.0"].partial == 1
    h2 = h1 + 1.0  # step 2: both compute
    call(region, state, 2, h2, cond)
    stored = [r.clone() for r in region_cache(state).ref_res]
    h3 = h2 + 1e-4  # step 3: both reuse
    y3 = call(region, state, 3, h3, cond)
    assert state.stats["blocks.0"].reuse_trace[-1] == 1.0
    torch.testing.assert_close(y3, h3 + stored[0], rtol=0, atol=0)  # as stored: no slope from mixed steps


def test_uncorrected_reuse_hands_out_a_copy_of_the_cache():
    """correction=False: an in-place write into a returned output (fresh or reused)
    leaves the cache as it was."""
    region, cfg, state = make_region(policy="interval", interval=2, correction=False, warmup_steps=0,
                                     max_consecutive_reuses=10)
    h0, cond = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    y0 = call(region, state, 0, h0, cond)
    want = y0.clone()
    y0.add_(100.0)  # the caller writes into the fresh output
    y1 = call(region, state, 1, h0, cond)  # reuse
    torch.testing.assert_close(y1, want, rtol=0, atol=0)
    y1.mul_(0.0)
    y2 = call(region, state, 2, h0, cond)  # (2 - 0) % 2 == 0: compute
    y3 = call(region, state, 3, h0, cond)  # reuse again
    torch.testing.assert_close(y3, y2, rtol=0, atol=0)
    assert not torch.equal(y3, torch.zeros_like(y3))
