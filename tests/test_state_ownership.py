"""State belongs to the compiled model and the module instance, never to whatever
Dynamo shares; generations are detected from the timestep in either direction, and
without a signal nothing is reused across a possible boundary; threads, copies and
pickles (issue 11, items 1, 3, 4, 7, 8)."""

import copy
import pickle
import pytest
import torch

import adacorr_compile
from adacorr_compile.lab.tiny import tiny_dit
from threads import run_together

REUSE = {"lowering": "eager", "reuse_threshold": 1.0}  # reuse wherever the guards allow


def _perturbed_dit(seed):
    model, inputs = tiny_dit()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model, inputs


def _steps(fn, inputs, n, start=900.0, batch=2, shift=0.0):
    outs = []
    with torch.no_grad():
        for k in range(n):
            kw = inputs(k, start - k * start / n, batch)
            kw["hidden_states"] = kw["hidden_states"] + shift
            outs.append(fn(**kw).sample)
    return outs


def _alone(model, inputs, n, options, **kw):
    torch._dynamo.reset()
    fast = torch.compile(model, backend="adacorr", options=options)
    return _steps(fast, inputs, n, **kw)


def _assert_as_alone(outs, model, inputs, n=8):
    """``outs`` equal ``model`` compiled and sampled alone, exactly."""
    for got, want in zip(outs, _alone(model, inputs, n, REUSE)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_two_models_of_one_class_alternating_keep_their_own_caches():
    a, inputs = _perturbed_dit(1)
    b, _ = _perturbed_dit(2)
    fa = torch.compile(a, backend="adacorr", options=REUSE)
    fb = torch.compile(b, backend="adacorr", options=REUSE)  # equal options: Dynamo shares fa's graph
    outs_a, outs_b = [], []
    with torch.no_grad():
        for k in range(8):
            kw = inputs(k, 900.0 - k * 900.0 / 8)
            outs_a.append(fa(**kw).sample)
            outs_b.append(fb(**kw).sample)
    sa, sb = adacorr_compile.stats(fa), adacorr_compile.stats(fb)
    assert sa["steps"] == sb["steps"] == 8
    assert sa["totals"]["reuses"] > 0 and sb["totals"]["reuses"] > 0
    _assert_as_alone(outs_a, a, inputs)
    _assert_as_alone(outs_b, b, inputs)


def test_same_module_compiled_twice_has_two_states():
    model, inputs = tiny_dit()
    first = torch.compile(model, backend="adacorr", options=REUSE)
    second = torch.compile(model, backend="adacorr", options=REUSE)
    _steps(first, inputs, 6)
    with adacorr_compile.generation(second, num_steps=3) as gen:
        _steps(second, inputs, 3)
    assert max(gen.steps.values()) == 3  # the second compile ran in its own generation()
    assert adacorr_compile.stats(first)["steps"] == 6
    assert adacorr_compile.stats(second)["steps"] == 0  # its default state was never used
    assert adacorr_compile.api._model_state(first) is not adacorr_compile.api._model_state(second)


def test_one_compiled_function_over_two_instances_keeps_caches_apart():
    a, inputs = _perturbed_dit(3)
    b, _ = _perturbed_dit(4)

    def run(model, kw):
        return model(**kw).sample

    fast = torch.compile(run, backend="adacorr", options=REUSE)
    got_a, got_b = [], []
    with torch.no_grad():
        for k in range(8):
            kw = inputs(k, 900.0 - k * 900.0 / 8)
            got_a.append(fast(a, kw))
            got_b.append(fast(b, kw))
    assert adacorr_compile.stats(fast)["totals"]["reuses"] > 0
    _assert_as_alone(got_a, a, inputs)
    _assert_as_alone(got_b, b, inputs)


def test_rising_timesteps_are_one_generation_each():
    model, inputs = tiny_dit()
    fast = torch.compile(model, backend="adacorr", options=REUSE)
    outs = []
    with torch.no_grad():
        for gen in range(2):
            for k in range(8):  # flow matching passed as t rising from 0 to 1
                outs.append(fast(**inputs(k, k / 8)).sample)
    s = adacorr_compile.stats(fast)
    assert s["generations"] == 1 and s["steps"] == 8  # the second run is a new generation
    assert s["totals"]["reuses"] > 0
    for r in s["regions"]:
        assert r["reuse_trace"][:2] == [0.0, 0.0]  # its warm-up computed
        assert r["reuse_trace"][-1] == 0.0  # the final step, predicted from a rising t in [0, 1]
    # the second generation's first steps equal eager: nothing carried over
    for k in range(2):
        with torch.no_grad():
            torch.testing.assert_close(outs[8 + k], model(**inputs(k, k / 8)).sample, rtol=1e-5, atol=1e-5)


def test_falling_then_rising_generations_never_share_a_cache():
    model, inputs = tiny_dit()
    fast = torch.compile(model, backend="adacorr", options={**REUSE, "policy": "interval", "correction": False, "warmup_steps": 1})
    with torch.no_grad():
        _steps(fast, inputs, 6)
        first = fast(**inputs(0, 900.0)).sample  # a new falling run starts: t went back up
    torch.testing.assert_close(first, model(**inputs(0, 900.0)).sample, rtol=1e-5, atol=1e-5)
    assert adacorr_compile.stats(fast)["generations"] == 1


class _NoTimestep(torch.nn.Module):
    """A DiT-like stack whose forward takes no timestep."""

    def __init__(self, depth=4, dim=16):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.LayerNorm(dim), torch.nn.Linear(dim, dim)) for _ in range(depth))

    def forward(self, x):
        for blk in self.blocks:
            x = x + blk(x)
        return x


def test_no_generation_signal_never_reuses_and_says_why():
    torch.manual_seed(0)
    model = _NoTimestep().eval()
    fast = torch.compile(model, backend="adacorr", options=REUSE)
    x = torch.randn(2, 8, 16)
    with torch.no_grad():
        for k in range(8):
            torch.testing.assert_close(fast(x + 0.001 * k), model(x + 0.001 * k), rtol=1e-5, atol=1e-5)
    s = adacorr_compile.stats(fast)
    assert s["totals"]["reuses"] == 0
    assert any("no timestep input" in f for f in s["fallbacks"])
    # the user marks generations: caching works, and num_steps ends each one
    with torch.no_grad(), adacorr_compile.generation(fast, num_steps=6) as gen:
        for _ in range(2):
            for k in range(6):
                fast(x + 0.001 * k)
    assert gen.generations == 1 and max(gen.steps.values()) == 6
    assert sum(st.reuses for st in gen.stats.values()) > 0


def test_timestep_arg_naming_no_argument_is_an_error():
    model, inputs = tiny_dit()
    fast = torch.compile(model, backend="adacorr", options={"lowering": "eager", "timestep_arg": "t"})
    with torch.no_grad(), pytest.raises(ValueError, match="'timestep_arg' got 't', which names no argument of forward"):
        fast(**inputs(0, 900.0))


def test_threads_without_generation_each_get_their_own_state():
    model, inputs = tiny_dit()
    fast = torch.compile(model, backend="adacorr", options=REUSE)
    shifts = [0.0, 0.3, -0.2, 0.5]
    _steps(fast, inputs, 2)  # compile before the threads start
    adacorr_compile.reset(fast)
    reference = {s: _steps(fast, inputs, 8, shift=s) for s in shifts}  # one thread, one after another
    results = run_together([lambda s=s: _steps(fast, inputs, 8, shift=s) for s in shifts])
    for s, outs in zip(shifts, results):
        for got, want in zip(outs, reference[s]):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("lowering", ["inductor", pytest.param("eager", marks=pytest.mark.slow)])
def test_cold_first_call_from_four_threads(lowering):
    model, inputs = tiny_dit()
    fast = torch.compile(model, backend="adacorr", options={"lowering": lowering, "policy": "never"})
    with torch.no_grad():
        want = model(**inputs(0, 900.0)).sample
    def two_calls():
        with torch.no_grad():
            return [fast(**inputs(0, 900.0)).sample for _ in range(2)]

    results = [out for outs in run_together([two_calls] * 4) for out in outs]
    assert len(results) == 8
    for out in results:
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # and the model still works afterwards
        torch.testing.assert_close(fast(**inputs(1, 800.0)).sample, model(**inputs(1, 800.0)).sample, rtol=1e-5, atol=1e-5)


def test_deepcopy_and_pickle_give_a_new_compiled_model():
    model, inputs = tiny_dit()
    fast = torch.compile(model, backend="adacorr", options=REUSE)
    first = _steps(fast, inputs, 6)
    twin = copy.deepcopy(fast)
    thawed = pickle.loads(pickle.dumps(fast))
    for other in (twin, thawed):
        assert adacorr_compile.stats(other)["steps"] == 0  # a fresh state, same options
        for got, want in zip(_steps(other, inputs, 6), first):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert adacorr_compile.stats(other)["steps"] == 6
    assert adacorr_compile.stats(fast)["steps"] == 6
