"""The paper's algorithm, exactly (issue 14): ``options={"preset": "paper"}`` computes every
block at every step and returns ``(1 - lambda) * stored + lambda * fresh`` per block, with
the paper's offset score against the previous step's input; checked against a hand-written
loop over the blocks of a plain-torch DiT. ``"paper-skip"`` turns the same signal into a skip."""

import pytest
import torch

import adacorr_compile
from adacorr_compile import AdaCorrConfig, acm, oem
from adacorr_compile.lab.tiny import tiny_plain

STEPS = 6


def _paper_loop(model, inputs, gamma, spatial_weight=1.0):
    """AdaCorrection as DESIGN.md section 1 states the paper's algorithm, by hand."""
    prev_in, stored, outs, lams = {}, {}, [], []
    with torch.no_grad():
        for k in range(STEPS):
            kw = inputs(k, 900.0 - k * 900.0 / STEPS)
            hs, t = kw["hidden_states"], kw["timestep"]
            b, c, hh, ww = hs.shape
            x = model.embed(hs).flatten(2).transpose(1, 2)
            cond = model.t_embed(t.float()[:, None] / 1000.0)
            for l, block in enumerate(model.blocks):
                fresh = block(x, cond)
                out = fresh
                if l in stored:
                    score = oem.paper_offset_score(x, prev_in[l], spatial_weight)
                    lam = acm.correction_weight(score, gamma)
                    lams.append(float(lam))
                    out = acm.blend(stored[l], fresh, lam)
                prev_in[l], stored[l] = x, fresh
                x = out
            x = model.out(x).reshape(b, hh // model.patch, ww // model.patch, c, model.patch, model.patch)
            outs.append(x.permute(0, 3, 1, 4, 2, 5).reshape(b, c, hh, ww))
    return outs, lams


@pytest.mark.parametrize("gamma", [1.0, 0.02])
def test_preset_paper_is_the_papers_blend_at_every_step(gamma):
    model, inputs = tiny_plain(depth=3)
    want, lams = _paper_loop(model, inputs, gamma)
    torch._dynamo.reset()
    fast = torch.compile(model, backend="adacorr", options={"preset": "paper", "gamma": gamma, "lowering": "eager"})
    with torch.no_grad():
        got = [fast(**inputs(k, 900.0 - k * 900.0 / STEPS))[0] for k in range(STEPS)]
    for k, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {k}: {m}")
    s = adacorr_compile.stats(fast)
    assert s["totals"]["reuses"] == 0 and s["totals"]["computes"] == 3 * STEPS  # nothing skipped
    if gamma < 1:  # lambda strictly inside (0, 1): the blend is visible
        assert 0 < min(lams) and max(lams) < 1
    ours = [v for r in s["regions"] for v in r["lambda_trace"][1:]]
    assert sorted(ours) == pytest.approx(sorted(lams), rel=1e-4)


def test_presets_set_the_papers_options_and_can_be_overridden():
    paper = AdaCorrConfig.from_options({"preset": "paper"})
    assert (paper.score, paper.drift_reference, paper.policy, paper.blend, paper.correction) == (
        "paper", "previous", "paper", True, False)
    assert (paper.gamma, paper.spatial_weight) == (1.0, 1.0)
    skip = AdaCorrConfig.from_options({"preset": "paper-skip", "reuse_threshold": 0.2})
    assert (skip.policy, skip.score, skip.reuse_threshold, skip.blend) == ("adacorr", "paper", 0.2, True)
    with pytest.raises(ValueError, match="'preset' got 'papers'"):
        AdaCorrConfig.from_options({"preset": "papers"})
    with pytest.raises(ValueError, match="'policy'='paper' .* needs 'blend'=True"):
        AdaCorrConfig.from_options({"policy": "paper"})


def test_preset_paper_skip_reuses_the_stored_output():
    model, inputs = tiny_plain(depth=3)
    torch._dynamo.reset()
    fast = torch.compile(model, backend="adacorr", options={"preset": "paper-skip", "gamma": 0.02,
                                                            "reuse_threshold": 0.5, "lowering": "eager"})
    with torch.no_grad():
        for k in range(STEPS):
            fast(**inputs(k, 900.0 - k * 900.0 / STEPS))
    assert adacorr_compile.stats(fast)["totals"]["reuses"] > 0


@pytest.mark.slow  # 30 s: an export of its own
def test_preset_paper_exports_to_onnx_with_the_same_outputs(tmp_path):
    from adacorr_compile.export import to_onnx
    from adacorr_compile.export.runner import OnnxRunner

    model, inputs = tiny_plain(depth=3)
    options = {"preset": "paper", "gamma": 0.02}
    with torch.no_grad():
        to_onnx(model, inputs(0, 900.0), tmp_path / "paper.onnx", config=options)
    runner = OnnxRunner(str(tmp_path / "paper.onnx"))
    want, _ = _paper_loop(model, inputs, 0.02)
    with torch.no_grad():
        for k in range(STEPS):
            got = runner(**inputs(k, 900.0 - k * 900.0 / STEPS))[0]
            torch.testing.assert_close(got, want[k], rtol=1e-4, atol=2e-5, msg=lambda m: f"step {k}: {m}")
