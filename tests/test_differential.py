"""Differential suite: wherever plain ``torch.compile`` works, ``backend="adacorr"`` works,
and with ``policy="never"`` gives its output (float32 round-off); with caching on, the
first two steps of every generation equal eager and generations never share a cache
(issue 11).

Every family of :mod:`adacorr_compile.lab.tiny` runs every scenario. The CI set is the
reference families' fast cases; the rest is marked ``slow`` and runs in
``benchmarks/validate_trust.py`` (``ADACORR_SLOW=1 python -m pytest -m slow tests``).
"""

import pytest
import torch

import adacorr_compile
from adacorr_compile.lab.tiny import ALL_FAMILIES, TRUST_FAMILIES
from threads import run_together

FAMILIES = {**ALL_FAMILIES, **TRUST_FAMILIES}
NEVER = {"policy": "never"}
SCENARIOS = ("never", "batch", "dynamic", "channels_last", "float_timestep", "two_models", "threads", "caching")
# dit x dynamic (50 s) runs in the slow set; tests/test_dynamic.py covers dynamic shapes in CI
# dit x threads and flux x never also run in the slow set: test_state_ownership.py and
# test_contexts.py cover threads in CI, test_pipelines.py Flux's never-equality
CI_CASES = {("dit", s) for s in SCENARIOS if s not in ("dynamic", "threads")} | {("plain_inplace", "never"),
                                                                               ("plain_inplace", "caching")}


def _cases():
    for family in FAMILIES:
        for scenario in SCENARIOS:
            marks = () if (family, scenario) in CI_CASES else (pytest.mark.slow,)
            yield pytest.param(family, scenario, marks=marks, id=f"{family}-{scenario}")


def _call(fn, kw):
    with torch.no_grad():
        return fn(**kw, return_dict=False)[0]


def _schedule(inputs, steps=3, batch=2, start=900.0):
    return [inputs(k, start - k * start / steps, batch) for k in range(steps)]


def _channels_last(kw):
    x = kw["hidden_states"]
    if x.dim() != 4:
        pytest.skip("hidden_states is not an image batch")
    return {**kw, "hidden_states": x.contiguous(memory_format=torch.channels_last)}


def _float_timestep(kw):
    t = kw["timestep"]
    return {**kw, "timestep": float(t.reshape(-1)[0])}


def _plain_outputs(model, calls, dynamic=None):
    plain = torch.compile(model, dynamic=dynamic)
    try:
        return [_call(plain, kw) for kw in calls]
    except Exception as exc:  # noqa: BLE001 - the promise holds only where plain compile works
        pytest.skip(f"plain torch.compile fails here too: {type(exc).__name__}")


def _assert_all_close(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,scenario", list(_cases()))
def test_never_worse_than_plain_compile(family, scenario):
    make, paths = FAMILIES[family]
    model, inputs = make()
    calls = _schedule(inputs)
    if scenario == "never":
        want = _plain_outputs(model, calls)
        ours = torch.compile(model, backend="adacorr", options=NEVER)
        _assert_all_close([_call(ours, kw) for kw in calls], want)
        assert [r.spec.path for r in adacorr_compile.regions(ours)] == paths
    elif scenario == "batch":
        calls = calls[:2] + _schedule(inputs, 2, batch=3) + calls[:1]
        want = _plain_outputs(model, calls)
        torch._dynamo.reset()
        ours = torch.compile(model, backend="adacorr", options=NEVER)
        _assert_all_close([_call(ours, kw) for kw in calls], want)
    elif scenario == "dynamic":
        calls = calls[:2] + _schedule(inputs, 2, batch=3)
        want = _plain_outputs(model, calls, dynamic=True)
        torch._dynamo.reset()
        ours = torch.compile(model, backend="adacorr", options=NEVER, dynamic=True)
        _assert_all_close([_call(ours, kw) for kw in calls], want)
    elif scenario in ("channels_last", "float_timestep"):
        change = _channels_last if scenario == "channels_last" else _float_timestep
        calls = [change(kw) for kw in calls]
        want = _plain_outputs(model, calls)
        torch._dynamo.reset()
        ours = torch.compile(model, backend="adacorr", options=NEVER)
        _assert_all_close([_call(ours, kw) for kw in calls], want)
    elif scenario == "two_models":
        other, _ = make()
        with torch.no_grad():
            for p in other.parameters():
                p.mul_(1.5)
        # against plain torch.compile of each model (the promise): plain Inductor itself differs
        # from eager by ~1.5e-5 on the 1.5x-scaled model, more than the round-off allowed here
        want_a = _plain_outputs(model, calls)
        want_b = _plain_outputs(other, calls)
        torch._dynamo.reset()
        fa = torch.compile(model, backend="adacorr", options=NEVER)
        fb = torch.compile(other, backend="adacorr", options=NEVER)
        got_a, got_b = [], []
        for kw in calls:
            got_a.append(_call(fa, kw))
            got_b.append(_call(fb, kw))
        _assert_all_close(got_a, want_a)
        _assert_all_close(got_b, want_b)
    elif scenario == "threads":
        want = [_call(model, calls[0])]
        ours = torch.compile(model, backend="adacorr", options=NEVER)
        _assert_all_close(run_together([lambda: _call(ours, calls[0])] * 4), want * 4)
    elif scenario == "caching":
        ours = torch.compile(model, backend="adacorr", options={"reuse_threshold": 1.0, "lowering": "eager"})
        steps = _schedule(inputs, 6)
        for generation in range(2):
            outs = [_call(ours, kw) for kw in steps]
            _assert_all_close(outs[:2], [_call(model, kw) for kw in steps[:2]])  # warm-up: nothing carried over
        s = adacorr_compile.stats(ours)
        if paths and not any("no timestep input" in f for f in s["fallbacks"]):
            assert s["generations"] == 1 and s["steps"] == 6
            assert s["totals"]["reuses"] > 0
        else:  # no regions, or no generation signal: never reuses
            assert s["totals"]["reuses"] == 0
