"""Every DiT family without per-model code, and the serving lifecycle (issue 5)."""

import pytest
import torch

import adacorr_compile
from adacorr_compile.lab.tiny import ALL_FAMILIES, EXTRA_FAMILIES, FAMILIES


def loop(compiled, inputs, steps, start=900.0, batch=2, offset=0.0):
    outs = []
    with torch.no_grad():
        for k in range(steps):
            kw = inputs(k, start - k * (start / steps), batch)
            kw["hidden_states"] = kw["hidden_states"] + offset
            outs.append(compiled(**kw, return_dict=False)[0])
    return outs


@pytest.mark.parametrize("family", list(EXTRA_FAMILIES))
def test_family_regions_and_never_reuse_parity(family):
    make, paths = EXTRA_FAMILIES[family]
    model, inputs = make()
    plain = torch.compile(model)
    ours = torch.compile(model, backend="adacorr", options={"policy": "never"})
    for a, b in zip(loop(plain, inputs, 2), loop(ours, inputs, 2)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert [r.spec.path for r in adacorr_compile.regions(ours)] == paths


@pytest.mark.parametrize("family", list(ALL_FAMILIES))
def test_family_reuses_and_never_recompiles(family):
    make, paths = ALL_FAMILIES[family]
    model, inputs = make()
    # reuse wherever the guards allow: random tiny blocks drift more than any useful threshold
    fast = torch.compile(model, backend="adacorr", options={"lowering": "eager", "reuse_threshold": 1.0})
    loop(fast, inputs, 10)  # first generation (compiles)
    with torch.compiler.set_stance("fail_on_recompile"):
        loop(fast, inputs, 50)
    s = adacorr_compile.stats(fast)
    assert s["steps"] == 50 and s["generations"] == 1
    assert s["totals"]["reuses"] > 0
    assert len(s["regions"]) == len(paths)


def test_compile_repeated_blocks_then_adacorr():
    model, inputs = FAMILIES["flux"][0]()
    model.compile_repeated_blocks(backend="eager")
    fast = torch.compile(model, backend="adacorr", options={"lowering": "eager", "reuse_threshold": 1.0})
    loop(fast, inputs, 8)
    assert [r.spec.path for r in adacorr_compile.regions(fast)] == FAMILIES["flux"][1]
    assert adacorr_compile.stats(fast)["totals"]["reuses"] > 0


def test_per_sample_decisions_for_cfg_batch():
    model, inputs = FAMILIES["dit"][0]()
    lam = {"policy": "adacorr", "correction": True, "reuse_threshold": 0.05, "scope": "block"}  # lambda per region, per sample or batch
    per_sample = torch.compile(model, backend="adacorr", options={"lowering": "eager", "decision": "sample", **lam})
    batch = torch.compile(model, backend="adacorr", options={"lowering": "eager", **lam})
    with torch.no_grad():
        for k in range(12):
            kw = inputs(k, 900.0 - 75 * k, 4)
            # the second half of the batch (say, the unconditional half) drifts 10x faster
            kw["hidden_states"][2:] += 0.1 * k
            per_sample(**kw)
            batch(**kw)
    s = adacorr_compile.stats(per_sample)
    assert sum(r["partial"] for r in s["regions"]) > 0  # some steps reused half the batch
    trace = adacorr_compile.api._model_state(per_sample).current().stats["transformer_blocks.0"].lam_trace
    assert trace[-1].shape == (4,)
    assert adacorr_compile.stats(batch)["regions"][0]["partial"] == 0


def test_never_reuse_per_sample_equals_eager():
    model, inputs = FAMILIES["dit"][0]()
    ours = torch.compile(model, backend="adacorr", options={"lowering": "eager", "decision": "sample", "policy": "never"})
    with torch.no_grad():
        for k in range(3):
            kw = inputs(k, 900.0 - 100 * k, 4)
            assert torch.equal(ours(**kw).sample, model(**kw).sample)


def test_num_inference_steps_changes_between_generations():
    model, inputs = FAMILIES["dit"][0]()
    fast = torch.compile(model, backend="adacorr", options={"lowering": "eager", "reuse_threshold": 1.0, "final_steps": 1})
    for steps in (10, 6, 15):
        loop(fast, inputs, steps)
        s = adacorr_compile.stats(fast)
        assert s["steps"] == steps
        for r in s["regions"]:
            assert len(r["reuse_trace"]) == steps
            assert r["reuse_trace"][-1] == 0.0  # the last step computes, predicted from the timesteps


def test_explicit_num_steps_guards_the_final_steps():
    model, inputs = FAMILIES["dit"][0]()
    fast = torch.compile(model, backend="adacorr", options={"lowering": "eager", "reuse_threshold": 1.0, "final_steps": 3})
    with adacorr_compile.generation(fast, num_steps=10):
        loop(fast, inputs, 10)
        for r in adacorr_compile.stats(fast)["regions"]:
            assert r["reuse_trace"][-3:] == [0.0, 0.0, 0.0]


def test_new_resolution_and_batch_in_later_generations():
    model, inputs = FAMILIES["dit"][0]()
    fast = torch.compile(model, backend="adacorr", options={"policy": "never"})
    with torch.no_grad():
        for batch in (2, 3, 4, 2):
            kw = inputs(0, 900.0, batch)
            torch.testing.assert_close(fast(**kw).sample, model(**kw).sample, rtol=1e-5, atol=1e-5)
    assert adacorr_compile.stats(fast)["generations"] == 3
    assert len(adacorr_compile.api._model_state(fast).graphs) <= 2  # static, then one dynamic graph


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_keeps_dtype_through_cache(dtype):
    model, inputs = FAMILIES["dit"][0]()
    model = model.to(dtype)
    fast = torch.compile(model, backend="adacorr", options={"lowering": "eager", "reuse_threshold": 1.0})
    with torch.no_grad():
        for k in range(6):
            kw = inputs(k, 900.0 - 100 * k)
            kw["hidden_states"] = kw["hidden_states"].to(dtype)
            out = fast(**kw).sample
    assert out.dtype == dtype
    state = adacorr_compile.api._model_state(fast).current()
    held = [c.ref_res[0] for c in state.caches.values() if c.ref_res is not None]  # the leader keeps none
    assert held and {r.dtype for r in held} == {dtype}
    assert adacorr_compile.stats(fast)["totals"]["reuses"] > 0


def test_nonfinite_input_does_not_poison_the_cache():
    model, inputs = FAMILIES["dit"][0]()
    fast = torch.compile(model, backend="adacorr", options={"lowering": "eager", "reuse_threshold": 1.0, "max_consecutive_reuses": 10})
    clean = torch.compile(model, backend="adacorr", options={"lowering": "eager", "policy": "never"})
    with torch.no_grad():
        for k in range(10):
            kw = inputs(k, 900.0 - 90 * k)
            if k == 4:
                kw["hidden_states"][0, 0, 0, 0] = float("nan")
            out = fast(**kw).sample
            if k > 5:
                assert torch.isfinite(out).all(), k
                ref = clean(**kw).sample
                assert ((out - ref).norm() / ref.norm()) < 0.2
    s = adacorr_compile.stats(fast)
    assert sum(r["nonfinite"] for r in s["regions"]) > 0
    assert all(r["reuse_trace"][4] == 0.0 for r in s["regions"])  # the NaN step computed


def test_wrong_input_shape_raises_clear_error():
    model, inputs = FAMILIES["dit"][0]()
    fast = torch.compile(model, backend="adacorr", options={"lowering": "eager"})
    kw = inputs(0, 900.0)
    kw["hidden_states"] = torch.randn(2, 3, 8, 8)  # 3 channels, the model wants 4
    with torch.no_grad(), pytest.raises(Exception, match="channels|size|shape"):
        fast(**kw)
