import math

import pytest
import torch

from adacorr_compile import acm, oem


def _loops(h, prev):
    """Direct computation of the paper's formulas with Python loops."""
    B, P, D = h.shape
    temp = spat = 0.0
    for b in range(B):
        for i in range(P):
            temp += math.sqrt(sum((h[b, i, d].item() - prev[b, i, d].item()) ** 2 for d in range(D)))
            mean = sum(h[b, i, d].item() for d in range(D)) / D
            var = sum((h[b, i, d].item() - mean) ** 2 for d in range(D)) / D
            spat += math.sqrt(var)
    return temp / (B * P), spat / (B * P)


def test_paper_equations_match_direct_formula():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    prev = h + 0.1 * torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    d_temp, d_spat = _loops(h, prev)
    assert oem.temporal_deviation(h, prev).item() == pytest.approx(d_temp, rel=1e-10)
    assert oem.spatial_variation(h).item() == pytest.approx(d_spat, rel=1e-10)
    s = oem.paper_offset_score(h, prev, spatial_weight=0.7)
    assert s.item() == pytest.approx(d_temp**2 + 0.7 * d_spat, rel=1e-10)


def test_per_sample_values_average_to_batch_value():
    h, prev = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    per = oem.temporal_deviation(h, prev, per_sample=True)
    assert per.shape == (3,)
    assert per.mean().item() == pytest.approx(oem.temporal_deviation(h, prev).item(), rel=1e-6)
    assert oem.relative_offset_score(h, prev, per_sample=True).shape == (3,)


def test_streams_pool_tokens():
    a, b = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    pa, pb = a + 1, b - 2
    joint = oem.temporal_deviation([a, b], [pa, pb])
    cat = oem.temporal_deviation(torch.cat([a, b], 1), torch.cat([pa, pb], 1))
    assert joint.item() == pytest.approx(cat.item(), rel=1e-6)


def test_relative_score_is_scale_free_and_zero_without_drift():
    h = torch.randn(2, 7, 16)
    prev = h + 0.05 * torch.randn(2, 7, 16)
    s = oem.relative_offset_score(h, prev)
    for c in (1e-3, 3.0, 250.0):
        assert oem.relative_offset_score(c * h, c * prev).item() == pytest.approx(s.item(), rel=1e-4)
    assert oem.relative_offset_score(h, h).item() == 0.0
    # the paper's score is not scale-free, and is nonzero without drift
    assert oem.paper_offset_score(10 * h, 10 * prev).item() != pytest.approx(oem.paper_offset_score(h, prev).item(), rel=1e-2)
    assert oem.paper_offset_score(h, h).item() > 0


def test_relative_score_grows_with_drift():
    h = torch.randn(2, 7, 16)
    noise = torch.randn(2, 7, 16)
    scores = [oem.relative_offset_score(h + e * noise, h).item() for e in (0.01, 0.05, 0.2)]
    assert scores == sorted(scores) and scores[0] > 0


def test_lambda_is_clipped_and_nan_safe():
    s = torch.tensor([-1.0, 0.2, 0.5, 3.0, float("nan")])
    lam = acm.correction_weight(s, gamma=2.0)
    assert lam.tolist() == pytest.approx([0.0, 0.4, 1.0, 1.0, 1.0])


def test_blend_matches_formula_scalar_and_per_sample():
    cached, fresh = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    lam = torch.tensor(0.3)
    assert torch.allclose(acm.blend(cached, fresh, lam), 0.7 * cached + 0.3 * fresh, atol=1e-6)
    lam2 = torch.tensor([0.0, 1.0])
    out = acm.blend(cached, fresh, lam2)
    assert torch.equal(out[0], cached[0]) and torch.allclose(out[1], fresh[1])


def test_corrected_cache_and_bound():
    h, r = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    assert torch.equal(acm.corrected_cache(h, r), h + r)
    assert acm.error_bound(torch.tensor(0.25), 2.0, 3.0, torch.tensor(0.5)).item() == pytest.approx(0.75 * 2 * 3 * 0.5)


def test_steady_bounds_the_change_per_step_over_all_streams():
    """acm.steady: ||new - old|| <= max_change * gap * ||new||, the streams pooled."""
    old = [torch.ones(2, 3, 4), torch.ones(2, 5, 4)]
    new = [o * 1.2 for o in old]  # ||new - old|| / ||new|| = 0.2 / 1.2 = 1/6 in both streams
    assert not acm.steady(new, old, 1.0, 0.16).item()
    assert acm.steady(new, old, 1.0, 0.17).item()
    assert acm.steady(new, old, 2.0, 0.09).item()  # the same change over two steps: half as fast
    assert not acm.steady(new, old, torch.tensor(2.0), 0.08).item()  # gap as a 0-d tensor (the ONNX graph)
    # pooled: a stream that did not move dilutes the change (0.2 * 4 / sqrt(1.44 * 4 + 4))
    mixed = [new[0], old[1][:, :3]]
    ratio = 0.2 * math.sqrt(24) / math.sqrt(1.44 * 24 + 24)
    assert acm.steady(mixed, [old[0], old[1][:, :3]], 1.0, ratio + 1e-4).item()
    assert not acm.steady(mixed, [old[0], old[1][:, :3]], 1.0, ratio - 1e-4).item()
    # a non-finite value is never steady; an infinite bound always is (even for an all-zero cache)
    assert not acm.steady([torch.full((2, 3), float("nan"))], [torch.zeros(2, 3)], 1.0, 10.0).item()
    assert acm.steady([torch.zeros(2, 3)], [torch.ones(2, 3)], 1.0, float("inf")).item()
    # max_change as a 0-d tensor (a compiled kernel's input): the same verdicts, inf included
    for bound in (0.16, 0.17, float("inf")):
        assert acm.steady(new, old, 1.0, torch.tensor(bound)).item() == acm.steady(new, old, 1.0, bound).item()
    assert acm.steady([torch.zeros(2, 3)], [torch.ones(2, 3)], 1.0, torch.tensor(float("inf"))).item()


def test_forecast_reference_extrapolates_only_a_steady_usable_change():
    """acm.forecast_reference (probe_forecast): ``ref + (ref - prev) * k`` where the change from
    ``prev`` was steady and ``usable``; the reference as it is otherwise."""
    prev, ref = [torch.ones(2, 3, 4)], [torch.full((2, 3, 4), 1.1)]  # 0.1 / 1.1 = 9.1% of the size per step
    k, gap = torch.tensor(0.5), torch.tensor(1.0)
    (fc,) = acm.forecast_reference(ref, prev, k, gap, 0.1)
    torch.testing.assert_close(fc, torch.full((2, 3, 4), 1.15))
    (same,) = acm.forecast_reference(ref, prev, k, gap, 0.09)  # not steady: no slope
    assert torch.equal(same, ref[0])
    (same,) = acm.forecast_reference(ref, prev, k, gap, 0.1, usable=torch.tensor(False))  # equal steps (ONNX state)
    assert torch.equal(same, ref[0])
    (fc2,) = acm.forecast_reference(ref, prev, torch.tensor(2.0), torch.tensor(2.0), torch.tensor(0.05))
    torch.testing.assert_close(fc2, torch.full((2, 3, 4), 1.3))  # 2 gaps of 2 steps: 4.5% per step, steady at 5%


def test_score_dispatch_rejects_unknown():
    with pytest.raises(ValueError, match="score variant"):
        oem.score("other", torch.zeros(1, 1, 2), torch.zeros(1, 1, 2))
