"""Real diffusers pipelines, built offline from tiny random components (``pipelines.py``),
with the transformer compiled the one-line way: ``pipe.transformer = torch.compile(
pipe.transformer, backend="adacorr")`` (issue 12).

For each pipeline: with ``policy="never"`` four consecutive calls (another step count,
number of images, resolution) give exactly the uncached pipeline's images, each call
starts a new generation, and a repeat of an identical call compiles nothing; with
caching, blocks are reused, the statistics count the pipeline's steps (not twice as
many where CFG is two calls per step), the separately-called CFG pipelines reuse at a
rate comparable to the same pipeline without CFG, and a call repeated after others
gives the same images (no state leaks from one call to the next)."""

import pytest
import torch

import adacorr_compile
from pipelines import build_dit, build_flux, build_pixart, build_sd3, build_wan

BUILDERS = {"dit": build_dit, "pixart": build_pixart, "sd3": build_sd3, "flux": build_flux, "wan": build_wan}
NEVER = {"policy": "never", "lowering": "eager"}
CACHING = {"lowering": "eager", "reuse_threshold": 0.5}  # the default policy; tiny random weights drift more than trained ones
STEPS = 10


def _images(pipe, kwargs):
    with torch.no_grad():
        return pipe(**kwargs)[0]


def _calls(tp, steps=4):
    """Four consecutive calls (the arguments of each: a call consumes its generator): a base
    call, then another step count, number of images and resolution."""
    return [
        dict(steps=steps),
        dict(steps=steps + 2),
        dict(steps=steps, images=2),
        dict(steps=steps, size=tp.other_size),
    ]


# Wan, SD3 and DiT (15 s each) in the slow set: Wan's CFG pipeline runs in CI in the caching test
# below, the DiT's never-equality in test_differential.py
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("wan", "sd3", "dit") else n for n in BUILDERS])
def test_never_gives_the_uncached_images_call_after_call(name):
    torch._dynamo.reset()
    tp = BUILDERS[name]()
    calls = _calls(tp)
    want = [_images(tp.pipe, tp.kwargs(**kw)) for kw in calls]
    tp.pipe.transformer = torch.compile(tp.pipe.transformer, backend="adacorr", options=NEVER)
    for k, kw in enumerate(calls):
        got = _images(tp.pipe, tp.kwargs(**kw))
        torch.testing.assert_close(got, want[k], rtol=0, atol=0, msg=lambda m: f"{name}, call {k}: {m}")
    s = adacorr_compile.stats(tp.pipe.transformer)
    assert s["fallbacks"] == [] and s["totals"]["regions"] >= 2
    assert s["generations"] == len(calls) - 1  # each call after the first began a new one
    assert s["steps"] == 4  # the last call's steps, counted once per step (cond and uncond apart)
    with torch.compiler.set_stance("fail_on_recompile"):
        again = _images(tp.pipe, tp.kwargs(**calls[-1]))
    torch.testing.assert_close(again, want[-1], rtol=0, atol=0)


def _reuse_fraction(pipe):
    totals = adacorr_compile.stats(pipe.transformer)["totals"]
    return totals["reuses"] / totals["calls"]


# the batched-CFG pipelines' caching runs in the slow set; Flux and Wan (two calls per step) in CI,
# and Wan with the probe scoring against its forecast (its history kept per CFG context)
@pytest.mark.parametrize("name, extra", [(n, {}) if n in ("flux", "wan") else pytest.param(n, {}, marks=pytest.mark.slow)
                                         for n in BUILDERS] + [("wan", {"probe_forecast": True})],
                         ids=[*BUILDERS, "wan-probe-forecast"])
def test_caching_reuses_counts_pipeline_steps_and_starts_each_call_afresh(name, extra):
    torch._dynamo.reset()
    tp = BUILDERS[name]()
    uncached = _images(tp.pipe, tp.kwargs(steps=STEPS))
    tp.pipe.transformer = torch.compile(tp.pipe.transformer, backend="adacorr", options={**CACHING, **extra})
    first = _images(tp.pipe, tp.kwargs(steps=STEPS))
    s = adacorr_compile.stats(tp.pipe.transformer)
    assert s["steps"] == STEPS
    assert s["totals"]["calls"] == STEPS * tp.cfg_calls * s["totals"]["regions"]
    assert s["totals"]["reuses"] > 0
    mse = torch.mean((first - uncached) ** 2)
    assert 10 * torch.log10(1.0 / mse) > 20  # caching approximates, not breaks, the images
    for kw in _calls(tp, STEPS)[1:]:
        generations = adacorr_compile.stats(tp.pipe.transformer)["generations"]
        _images(tp.pipe, tp.kwargs(**kw))
        assert adacorr_compile.stats(tp.pipe.transformer)["generations"] == generations + 1
    torch.testing.assert_close(_images(tp.pipe, tp.kwargs(steps=STEPS)), first, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["flux", "wan"])
def test_cfg_as_two_calls_reuses_like_one_call(name):
    """CFG as two calls per step (cond and uncond in their own cache_context) reuses at a
    rate comparable to the same pipeline without CFG (one call per step)."""
    torch._dynamo.reset()
    tp = BUILDERS[name]()
    tp.pipe.transformer = torch.compile(tp.pipe.transformer, backend="adacorr", options=CACHING)
    no_cfg = {"true_cfg_scale": 1.0} if name == "flux" else {"guidance_scale": 1.0}
    _images(tp.pipe, tp.kwargs(steps=STEPS, **no_cfg))
    single = _reuse_fraction(tp.pipe)
    adacorr_compile.reset(tp.pipe.transformer)
    _images(tp.pipe, tp.kwargs(steps=STEPS))
    s = adacorr_compile.stats(tp.pipe.transformer)
    assert s["steps"] == STEPS
    assert s["totals"]["calls"] == 2 * STEPS * s["totals"]["regions"]
    double = _reuse_fraction(tp.pipe)
    assert single > 0 and double >= 0.75 * single, (single, double)


def test_wan22_two_compiled_transformers_split_the_steps():
    """Wan 2.2: ``transformer`` runs the high-noise steps and ``transformer_2`` the rest
    (``boundary_ratio``), both compiled, each called in the pipeline's cond/uncond
    contexts: with caching off the images equal the uncached pipeline's, with caching each
    model counts its own steps and reuses, and a second call gives the same images."""
    from diffusers import WanPipeline

    from adacorr_compile.lab.tiny import tiny_wan

    torch._dynamo.reset()
    tp = build_wan()
    second, _ = tiny_wan()
    with torch.no_grad():
        for p in second.parameters():
            p.mul_(0.9)  # another model
    parts = {k: v for k, v in tp.pipe.components.items() if k not in ("transformer_2",)}
    pipe = WanPipeline(**parts, transformer_2=second, boundary_ratio=0.5)
    pipe.set_progress_bar_config(disable=True)
    tp.pipe = pipe
    want = _images(pipe, tp.kwargs(steps=STEPS))
    for options in (NEVER, CACHING):
        torch._dynamo.reset()
        pipe.transformer = torch.compile(getattr(pipe.transformer, "_orig_mod", pipe.transformer), backend="adacorr", options=options)
        pipe.transformer_2 = torch.compile(getattr(pipe.transformer_2, "_orig_mod", pipe.transformer_2), backend="adacorr",
                                           options=options)
        first = _images(pipe, tp.kwargs(steps=STEPS))
        high, low = adacorr_compile.stats(pipe.transformer), adacorr_compile.stats(pipe.transformer_2)
        assert high["steps"] + low["steps"] == STEPS and high["steps"] > 0 and low["steps"] > 0
        if options is NEVER:
            torch.testing.assert_close(first, want, rtol=0, atol=0)
        else:
            assert high["totals"]["reuses"] + low["totals"]["reuses"] > 0
            torch.testing.assert_close(_images(pipe, tp.kwargs(steps=STEPS)), first, rtol=0, atol=0)
            assert adacorr_compile.stats(pipe.transformer_2)["generations"] == 1


def test_late_phase_follows_each_calls_step_count():
    """late_phase in a real pipeline: diffusers' Flux pipeline gives no step count in its cache
    context, so the length is extrapolated from its shifted timesteps (``fit_shift``); the cap's
    late rise begins half way through each call's own steps, 10 then 20 then 10 again, and the
    last step is known as the last."""
    torch._dynamo.reset()
    tp = BUILDERS["flux"]()
    options = {"lowering": "eager", "reuse_threshold": 1.0, "max_consecutive_reuses": 2, "final_steps": 0,
               "late_phase": (0.0, 0.5), "late_extra_reuses": 2}
    tp.pipe.transformer = torch.compile(tp.pipe.transformer, backend="adacorr", options=options)
    # warm-up 0-1; reuses capped at 2 in a row until half way ((N-1)/2), at 4 from there on
    want = {10: [0, 0, 1, 1, 0, 1, 1, 1, 1, 0],
            20: [0, 0, 1, 1, 0, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1]}
    for steps in (10, 20, 10):
        _images(tp.pipe, tp.kwargs(steps=steps, true_cfg_scale=1.0))
        s = adacorr_compile.stats(tp.pipe.transformer)
        assert s["steps"] == steps
        assert s["regions"][1]["reuse_trace"] == want[steps], (steps, str(s["regions"][1]["reuse_trace"]))
    # final_steps=1: the last step computes (its steps left are known to be 0)
    tp.pipe.transformer = torch.compile(tp.pipe.transformer._orig_mod, backend="adacorr",
                                        options={**options, "final_steps": 1})
    _images(tp.pipe, tp.kwargs(steps=20, true_cfg_scale=1.0))
    assert adacorr_compile.stats(tp.pipe.transformer)["regions"][1]["reuse_trace"] == want[20][:-1] + [0]
