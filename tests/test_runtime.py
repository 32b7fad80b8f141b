"""End to end: numbers against plain torch.compile/eager, real skipping, no recompiles, generations."""

import contextlib
import threading

import pytest
import torch

import adacorr_compile
from adacorr_compile.lab.tiny import FAMILIES, tiny_dit


def run_loop(compiled, inputs, steps=10, start=900.0, batch=2):
    outs = []
    with torch.no_grad():
        for k in range(steps):
            t = start - k * (start / steps)
            outs.append(compiled(**inputs(k, t, batch), return_dict=False)[0])
    return outs


@contextlib.contextmanager
def poisoned(region, call):
    """The region's ``call``-th compute (1-based) returns NaN in its first output; only
    this region is patched (structurally equal blocks share one lowered body)."""
    body = region.body_fn

    class Poisoned(torch.nn.Module):  # body_fn is a submodule
        calls = 0

        def forward(self, *args):
            self.calls += 1
            out = list(body(*args))
            if self.calls == call:
                out[0] = out[0] * float("nan")
            return out

    region.body_fn = Poisoned()
    try:
        yield
    finally:
        region.body_fn = body


# PixArt and Flux in the slow set: their never-equality runs in CI in the pipeline tests
# (test_pipelines.py) and, for Flux, in test_differential.py
@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f in ("pixart", "flux") else f for f in FAMILIES])
def test_never_reuse_equals_plain_torch_compile(family):
    model, inputs = FAMILIES[family][0]()
    plain = torch.compile(model)  # Inductor
    ours = torch.compile(model, backend="adacorr", options={"policy": "never"})
    a = run_loop(plain, inputs, steps=3)
    b = run_loop(ours, inputs, steps=3)
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)
    s = adacorr_compile.stats(ours)
    assert s["totals"]["reuses"] == 0 and s["totals"]["computes"] == 3 * len(FAMILIES[family][1])


@pytest.mark.parametrize("family", ["dit", "flux"])
def test_never_reuse_eager_lowering_is_exact(family):
    model, inputs = FAMILIES[family][0]()
    ours = torch.compile(model, backend="adacorr", options={"policy": "never", "lowering": "eager"})
    with torch.no_grad():
        for k in range(3):
            kw = inputs(k, 900.0 - 100 * k)
            assert torch.equal(ours(**kw, return_dict=False)[0], model(**kw, return_dict=False)[0])


def test_skipping_is_real_and_counted():
    model, inputs = FAMILIES["dit"][0]()
    # every region decides for itself (and measures lambda), every third step computes
    fast = torch.compile(model, backend="adacorr", options={"lowering": "eager", "policy": "interval", "scope": "block",
                                                            "correction": False})
    run_loop(fast, inputs, steps=1)  # compile
    adacorr_compile.reset(fast)
    regions = adacorr_compile.regions(fast)
    executed = []
    hooks = [r.body.register_forward_hook(lambda m, a, o: executed.append(1)) for r in regions]
    try:
        run_loop(fast, inputs, steps=20)
    finally:
        for h in hooks:
            h.remove()
    s = adacorr_compile.stats(fast)
    totals = s["totals"]
    assert totals["calls"] == 20 * 4
    assert totals["reuses"] > 0
    assert len(executed) == totals["computes"] == 20 * 4 - totals["reuses"]
    for r in s["regions"]:
        assert len(r["lambda_trace"]) == 20 and r["mean_lambda"] is not None
        assert r["reuse_trace"][:2] == [0.0, 0.0]  # warm-up steps computed


def test_reused_output_stays_close_to_eager():
    model, inputs = FAMILIES["dit"][0]()
    fast = torch.compile(model, backend="adacorr")
    ours = run_loop(fast, inputs, steps=20)
    with torch.no_grad():
        ref = [model(**inputs(k, 900.0 - k * 45.0), return_dict=False)[0] for k in range(20)]
    assert adacorr_compile.stats(fast)["totals"]["reuses"] > 0
    rel = max(((a - b).norm() / b.norm()).item() for a, b in zip(ours, ref))
    assert rel < 0.1


def test_no_recompile_over_sampling_loop():
    model, inputs = FAMILIES["flux"][0]()
    fast = torch.compile(model, backend="adacorr", options={"reuse_threshold": 1.0})  # reuse wherever the guards allow
    run_loop(fast, inputs, steps=1)
    with torch.compiler.set_stance("fail_on_recompile"):
        run_loop(fast, inputs, steps=30)  # raises on any recompile
        run_loop(fast, inputs, steps=5)  # a second generation too
    assert adacorr_compile.stats(fast)["totals"]["reuses"] > 0


def test_generations_timestep_reset_and_shape_change():
    model, inputs = FAMILIES["dit"][0]()
    fast = torch.compile(model, backend="adacorr", options={"lowering": "eager"})
    run_loop(fast, inputs, steps=6)
    s = adacorr_compile.stats(fast)
    assert s["steps"] == 6 and s["generations"] == 0
    run_loop(fast, inputs, steps=4)  # timestep goes back up: new generation
    s = adacorr_compile.stats(fast)
    assert s["steps"] == 4 and s["generations"] == 1
    assert s["regions"][0]["reuse_trace"][0] == 0.0  # first step of a generation computes
    run_loop(fast, inputs, steps=2, start=100.0, batch=3)  # new batch size: new generation
    s = adacorr_compile.stats(fast)
    assert s["steps"] == 2 and s["generations"] == 2
    adacorr_compile.reset(fast)
    s = adacorr_compile.stats(fast)
    assert s["steps"] == 0 and s["totals"]["calls"] == 0


def test_generation_context_is_private_and_exception_safe():
    model, inputs = FAMILIES["dit"][0]()
    fast = torch.compile(model, backend="adacorr", options={"lowering": "eager"})
    run_loop(fast, inputs, steps=3)
    outside = adacorr_compile.stats(fast)["totals"]["calls"]
    with pytest.raises(RuntimeError):
        with adacorr_compile.generation(fast, num_steps=5):
            run_loop(fast, inputs, steps=5)
            inside = adacorr_compile.stats(fast)
            assert inside["totals"]["calls"] == 5 * 4 and inside["steps"] == 5
            raise RuntimeError("boom")
    assert adacorr_compile.stats(fast)["totals"]["calls"] == outside


def test_two_compiled_models_do_not_share_state():
    model, inputs = FAMILIES["dit"][0]()
    a = torch.compile(model, backend="adacorr", options={"lowering": "eager"})
    b = torch.compile(model, backend="adacorr", options={"lowering": "eager", "policy": "never"})
    run_loop(a, inputs, steps=8)
    run_loop(b, inputs, steps=3)
    assert adacorr_compile.stats(a)["totals"]["calls"] == 8 * 4
    assert adacorr_compile.stats(b)["totals"]["calls"] == 3 * 4
    assert adacorr_compile.stats(b)["totals"]["reuses"] == 0


def test_threads_in_separate_generations_do_not_mix():
    model, inputs = FAMILIES["dit"][0]()
    fast = torch.compile(model, backend="adacorr", options={"lowering": "eager"})
    run_loop(fast, inputs, steps=1)
    results = {}
    barrier = threading.Barrier(2)

    def worker(name, offset):
        with adacorr_compile.generation(fast):
            outs = []
            with torch.no_grad():
                for k in range(8):
                    barrier.wait()  # interleave the steps of the two threads
                    kw = inputs(k, 900.0 - 100 * k)
                    kw["hidden_states"] = kw["hidden_states"] + offset
                    outs.append(fast(**kw, return_dict=False)[0])
            results[name] = (outs, adacorr_compile.stats(fast))

    threads = [threading.Thread(target=worker, args=(n, o)) for n, o in (("a", 0.0), ("b", 5.0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # each thread alone, for reference
    solo = {}
    for name, offset in (("a", 0.0), ("b", 5.0)):
        with adacorr_compile.generation(fast):
            with torch.no_grad():
                outs = []
                for k in range(8):
                    kw = inputs(k, 900.0 - 100 * k)
                    kw["hidden_states"] = kw["hidden_states"] + offset
                    outs.append(fast(**kw, return_dict=False)[0])
            solo[name] = outs
    for name in ("a", "b"):
        assert results[name][1]["steps"] == 8 and results[name][1]["totals"]["calls"] == 32
        for x, y in zip(results[name][0], solo[name]):
            assert torch.equal(x, y)


@pytest.mark.parametrize("policy", ["interval", "first_block"])
@pytest.mark.parametrize("correction", [True, False])
def test_policies_reuse_in_a_loop(policy, correction):
    model, inputs = FAMILIES["dit"][0]()
    fast = torch.compile(
        model, backend="adacorr",
        options={"lowering": "eager", "policy": policy, "correction": correction, "reuse_threshold": 1.0,
                 "first_block_threshold": 1.0},
    )
    run_loop(fast, inputs, steps=12)
    s = adacorr_compile.stats(fast)
    assert s["totals"]["reuses"] > 0
    if policy == "first_block":
        assert s["regions"][0]["reuses"] == 0  # the first block always computes


def _count_measures(monkeypatch):
    from adacorr_compile.runtime.fused import RegionMath

    calls = []
    original = RegionMath.measure

    def counting(self, observed, reference, valid):
        calls.append(tuple(observed[0].shape))
        return original(self, observed, reference, valid)

    monkeypatch.setattr(RegionMath, "measure", counting)
    return calls


@pytest.mark.parametrize("family, threshold", [("dit", 0.15), ("flux", 0.2)])
def test_step_scope_one_decision_per_step(family, threshold, monkeypatch):
    """scope="step": the first block always computes, the second measures (the OEM on the
    first block's residual) and decides, the others follow it without measuring: one OEM
    measurement (one host read) per step."""
    model, inputs = FAMILIES[family][0]()
    # one threshold and cap throughout (late_phase=None): the loop below re-derives each verdict
    options = {"policy": "adacorr", "correction": True, "scope": "step", "reuse_threshold": threshold, "lowering": "eager",
               "late_phase": None}
    fast = torch.compile(model, backend="adacorr", options=options)
    measures = _count_measures(monkeypatch)
    steps = 12
    outs = run_loop(fast, inputs, steps=steps)
    s = adacorr_compile.stats(fast)
    regions = s["regions"]
    assert len(regions) == len(FAMILIES[family][1]) >= 3
    assert regions[0]["reuses"] == 0 and regions[0]["computes"] == steps  # the leader
    probe = regions[1]["reuse_trace"]
    assert 0 < sum(probe) < steps - 3, probe  # both verdicts over the loop
    for r in regions[2:]:
        assert r["reuse_trace"] == probe, (r["path"], r["reuse_trace"], probe)
        assert all(x != x for x in r["lambda_trace"])  # followers measure nothing
    lam = regions[1]["lambda_trace"]
    assert lam[0] != lam[0] and all(0 <= x <= 1 for x in lam[1:])
    assert len(measures) == steps - 1  # the probe, every step after the first
    # the probe reuses exactly when lambda <= threshold, outside warm-up / final step / cap
    run = 0
    for k in range(steps):
        want = 2 <= k < steps - 1 and run < 3 and lam[k] <= threshold
        assert probe[k] == float(want), (k, lam[k], probe)
        run = run + 1 if want else 0
    # a step that recomputes recomputes every block from fresh inputs: the uncached output
    plain = run_loop(model, inputs, steps=steps)
    for k in range(steps):
        if probe[k] == 0.0:
            assert torch.equal(outs[k], plain[k]), k
        else:
            assert not torch.equal(outs[k], plain[k]), k


def test_step_scope_nonfinite_follower_cache_forces_the_step_to_compute():
    model, inputs = FAMILIES["dit"][0]()
    options = {"policy": "adacorr", "correction": True, "scope": "step", "reuse_threshold": 1.0, "lowering": "eager",
               "max_consecutive_reuses": 100, "final_steps": 0}
    fast = torch.compile(model, backend="adacorr", options=options)
    run_loop(fast, inputs, steps=4)
    s = adacorr_compile.stats(fast)
    assert s["regions"][1]["reuse_trace"] == [0.0, 0.0, 1.0, 1.0]  # threshold 1: reuse after warm-up
    adacorr_compile.reset(fast)
    with poisoned(adacorr_compile.regions(fast)[-1], call=2):  # the last follower's compute at step 1 (warm-up)
        outs = run_loop(fast, inputs, steps=4)
    s = adacorr_compile.stats(fast)
    probe = s["regions"][1]
    assert probe["reuse_trace"] == [0.0, 0.0, 0.0, 1.0]  # step 2 recomputes everything: the follower's cache was NaN
    assert probe["nonfinite"] == 1
    assert torch.isfinite(outs[2]).all() and torch.isfinite(outs[3]).all()


class _LinearInTimeBlock(torch.nn.Module):
    """A block whose residual is an affine function of the timestep embedding (and
    ignores the stream): its output is linear in t, so a first-order forecast is exact."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(dim, dim)
        self.mix = torch.nn.Linear(dim, dim)

    def forward(self, x, c):
        return x + self.lin(c).unsqueeze(1) + 0.0 * self.mix(x)


class _LinearInTime(torch.nn.Module):
    def __init__(self, dim: int = 16, depth: int = 4) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(4, dim)
        self.t = torch.nn.Linear(1, dim)
        self.blocks = torch.nn.ModuleList([_LinearInTimeBlock(dim) for _ in range(depth)])
        self.out = torch.nn.Linear(dim, 4)

    def forward(self, hidden_states, timestep, return_dict=True):
        x = self.inp(hidden_states)
        c = self.t(timestep.float()[:, None] / 1000.0)
        for block in self.blocks:
            x = block(x, c)
        return (self.out(x),)


@pytest.mark.parametrize("correction", [False, True])
@pytest.mark.parametrize("lowering", ["eager", "inductor"])
def test_linear_forecast_is_exact_where_blocks_are_linear_in_time(correction, lowering):
    """forecast='linear' extrapolates the cached value from the last two computes: on
    blocks whose output moves linearly with the (evenly spaced) timestep it reproduces
    the uncached output on reused steps, where plain reuse does not. With
    ``forecast_max_change=0`` no change is slow enough to extrapolate from: the outputs are
    plain reuse's, bit for bit."""
    torch.manual_seed(0)
    model = _LinearInTime().eval()
    x = torch.randn(2, 8, 4)
    errors, outputs = {}, {}
    for forecast, max_change in (("none", 0.1), ("linear", float("inf")), ("linear", 0.0)):
        torch._dynamo.reset()
        fast = torch.compile(model, backend="adacorr", options={
            "policy": "interval", "interval": 3, "correction": correction, "reuse_threshold": 1.0, "scope": "block",
            "forecast": forecast, "forecast_max_change": max_change, "lowering": lowering})
        err, outs = [], []
        with torch.no_grad():
            for k in range(12):
                t = torch.full((2,), 900.0 - 60.0 * k)
                outs.append(fast(hidden_states=x, timestep=t)[0])
                err.append(float((outs[-1] - model(hidden_states=x, timestep=t)[0]).abs().max()))
        totals = adacorr_compile.stats(fast)["totals"]
        assert totals["regions"] == 4 and totals["reuses"] == 4 * 6  # steps 3, 4, 6, 7, 9, 10 reused
        errors[forecast, max_change], outputs[forecast, max_change] = err, outs
    assert max(errors["none", 0.1]) > 1e-2  # plain reuse lags behind the moving output
    assert max(errors["linear", float("inf")]) < 1e-4
    for a, b in zip(outputs["linear", 0.0], outputs["none", 0.1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_forecast_max_change_gates_each_slope_by_its_own_change():
    """The gate looks at each pair of computes a reuse would extrapolate from: a slope across a
    jump of the residual is not used (the reuse takes the residual as it was), a slow, steady
    change is. The block's residual is ``timestep / 1000 * v`` (v fixed), so the change per
    step between two computes is known in closed form."""

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.v = torch.nn.Parameter(torch.randn(1, 1, 8))

        def forward(self, x, c):
            return x + c[:, None, None] * self.v

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block() for _ in range(2)])

        def forward(self, hidden_states, timestep, return_dict=True):
            x = hidden_states
            for block in self.blocks:
                x = block(x, timestep.float() / 1000.0)
            return (x,)

    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 4, 8)
    # t: 1000, 500 (a 50% drop, per step), then 490, 480, ... (about 2% of the residual per step)
    ts = [1000.0, 500.0] + [490.0 - 10.0 * k for k in range(10)]
    torch._dynamo.reset()
    fast = torch.compile(model, backend="adacorr", options={
        "policy": "interval", "interval": 3, "warmup_steps": 2, "reuse_threshold": 1.0, "scope": "block",
        "forecast": "linear", "forecast_max_change": 0.1, "lowering": "eager", "final_steps": 0})
    err = []
    with torch.no_grad():
        for t in ts:
            tt = torch.full((2,), t)
            err.append(float((fast(hidden_states=x, timestep=tt)[0] - model(hidden_states=x, timestep=tt)[0]).abs().max()))
    # computes at steps 0, 1, 2, 5, 8, 11; reuses at 3, 4 (slope 1 -> 2: r changes by 2% of itself, steady),
    # 6, 7, 9, 10: every reuse is extrapolated, and exactly (the residual is linear in t from step 1 on)
    assert adacorr_compile.stats(fast)["totals"]["reuses"] == 2 * 6
    assert max(err) < 1e-5
    # the same with t jumping between the last two computes before a reuse (steps 1 -> 2): no slope from it
    ts2 = [1000.0, 990.0, 500.0] + [490.0 - 10.0 * k for k in range(9)]
    adacorr_compile.reset(fast)
    err2 = []
    with torch.no_grad():
        for t in ts2:
            tt = torch.full((2,), t)
            err2.append(float((fast(hidden_states=x, timestep=tt)[0] - model(hidden_states=x, timestep=tt)[0]).abs().max()))
    v = torch.stack([b.v for b in model.blocks]).sum(0).abs().max().item()
    # step 3 reuses the residual of step 2 as it was (t 500 -> 490: off by 10/1000 * v); extrapolating
    # the 990 -> 500 slope would have been off by 480/1000 * v
    assert err2[3] == pytest.approx(10.0 / 1000.0 * v, rel=1e-4)
    assert max(err2[6:]) < 1e-5  # the slope 2 -> 5 is steady again: exact


@pytest.mark.parametrize("lowering", ["eager", "inductor"])
def test_probe_forecast_scores_the_drift_the_reuse_carries(lowering):
    """probe_forecast: the probe scores the first block's residual against its forecast from
    the probe's last two computes, as the reuse extrapolates the caches. On blocks linear in
    time that forecast is exact: the step scores 0 and reuses up to the cap, and the outputs
    equal the uncached ones. Scored against the stored reference (probe_forecast=False) the
    same drift is above a small threshold at every step: nothing is reused."""
    torch.manual_seed(0)
    model = _LinearInTime().eval()
    x = torch.randn(2, 8, 4)
    base = {"reuse_threshold": 1e-4, "max_consecutive_reuses": 3, "final_steps": 0, "lowering": lowering}
    for probe_forecast in (True, False):
        torch._dynamo.reset()
        fast = torch.compile(model, backend="adacorr", options={**base, "probe_forecast": probe_forecast})
        err = []
        with torch.no_grad():
            for k in range(10):
                t = torch.full((2,), 900.0 - 20.0 * k)
                err.append(float((fast(hidden_states=x, timestep=t)[0] - model(hidden_states=x, timestep=t)[0]).abs().max()))
        s = adacorr_compile.stats(fast)
        probe = s["regions"][1]
        if probe_forecast:
            # warm-up computes 0, 1; then three reuses and a compute (the cap), twice
            assert probe["reuse_trace"] == [0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0]
            assert max(err) < 1e-4
            assert max(v for v in probe["score_trace"][2:] if v == v) < 1e-5  # float32 rounding
        else:
            assert probe["reuse_trace"] == [0.0] * 10
            assert min(v for v in probe["score_trace"][2:] if v == v) > 1e-3


def test_linear_forecast_does_not_extrapolate_from_a_nonfinite_compute():
    """A region whose compute gave NaN recomputes at the next step; the reuses after that
    must return the (finite) cache as it is, not an extrapolation through the NaN values."""
    torch.manual_seed(0)
    model = _LinearInTime().eval()
    x = torch.randn(2, 8, 4)
    fast = torch.compile(model, backend="adacorr", options={
        "policy": "interval", "interval": 3, "correction": True, "reuse_threshold": 1.0, "forecast": "linear",
        "scope": "block", "lowering": "eager"})
    with torch.no_grad():
        fast(hidden_states=x, timestep=torch.full((2,), 900.0))  # compile and find the regions
    adacorr_compile.reset(fast)
    outs, want = [], []
    with poisoned(adacorr_compile.regions(fast)[-1], call=2), torch.no_grad():  # the last region's compute at step 1
        for k in range(8):
            t = torch.full((2,), 900.0 - 60.0 * k)
            outs.append(fast(hidden_states=x, timestep=t)[0])
            want.append(model(hidden_states=x, timestep=t)[0])
    s = adacorr_compile.stats(fast)["regions"][-1]
    assert s["reuse_trace"] == [0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0] and s["nonfinite"] == 1
    assert not torch.isfinite(outs[1]).all()
    for k in (3, 4):  # the previous compute (step 1) was NaN: the step-2 cache, as stored
        assert torch.isfinite(outs[k]).all(), k
        assert (outs[k] - want[k]).abs().max() > 1e-3, k
    for k in (6, 7):  # computes at 2 and 5 are finite: extrapolated again, exact on this model
        assert (outs[k] - want[k]).abs().max() < 1e-4, k


@pytest.mark.parametrize("options, held", [({}, 3), ({"forecast": "none"}, 2), ({"scope": "block", "forecast": "none"}, 8),
                                           ({"probe_forecast": True}, 4), ({"probe_forecast": True, "forecast": "none"}, 2)])
def test_cache_bytes_hold_only_what_the_decision_needs(options, held):
    """``stats()["cache_bytes"]``, in block inputs: under scope="step" the leader keeps
    nothing, the probe its reference residual (and the one before it under probe_forecast,
    which has no effect without the linear forecast) and the span of the later (chained)
    blocks one residual (two with the linear forecast); a region that decides for itself
    keeps the input its OEM compares with and its residual: two per region (issue 13)."""
    model, inputs = tiny_dit()
    fast = torch.compile(model, backend="adacorr", options={"lowering": "eager", **options})
    with torch.no_grad():
        for k in range(8):
            kw = inputs(k, 900.0 - k * 900.0 / 8)
            fast(**kw)
    s = adacorr_compile.stats(fast)
    assert s["totals"]["regions"] == 4
    block_input = 2 * 16 * 16 * 4  # [B=2, 16 tokens, 16 channels] float32: the tiny DiT stream
    want = held * block_input
    assert want <= s["cache_bytes"] < want + 64  # plus a few 0-d scalars (the step's lambda, flags)


def _reuse_trace(options, steps, num_steps=None, spacing=20.0):
    """The probe's per-step reuse flags over one generation of the linear-in-time model."""
    torch.manual_seed(0)
    model = _LinearInTime().eval()
    x = torch.randn(2, 8, 4)
    torch._dynamo.reset()
    fast = torch.compile(model, backend="adacorr", options={"final_steps": 0, "lowering": "eager", **options})
    with torch.no_grad():
        fast(hidden_states=x, timestep=torch.full((2,), 900.0))  # compile and find the regions
        adacorr_compile.reset(fast, num_steps=num_steps)
        for k in range(steps):
            fast(hidden_states=x, timestep=torch.full((2,), 900.0 - spacing * k))
    probe = adacorr_compile.stats(fast)["regions"][1]
    return [int(v) for v in probe["reuse_trace"]], probe


def test_late_phase_adds_a_reuse_to_the_cap_from_its_end():
    """late_phase: from its end (a share of the generation's steps) a region may reuse
    ``late_extra_reuses`` more times in a row; before it, ``max_consecutive_reuses``. The
    generation's length comes from num_steps; where it comes from the timestep's fall, a run
    the timesteps say is ~45 steps long is still early after 12."""
    always = {"reuse_threshold": 1.0, "max_consecutive_reuses": 2, "forecast": "none"}
    late = {**always, "late_phase": (0.0, 0.5), "late_extra_reuses": 1}
    # 12 steps: step 6 is the first at or past half way (6/11); the streak may then reach 3
    assert _reuse_trace(late, 12, num_steps=12)[0] == [0, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1]
    assert _reuse_trace({**late, "late_phase": None}, 12, num_steps=12)[0] == [0, 0, 1, 1, 0, 1, 1, 0, 1, 1, 0, 1]
    assert _reuse_trace({**late, "late_extra_reuses": 0}, 12, num_steps=12)[0] == [0, 0, 1, 1, 0, 1, 1, 0, 1, 1, 0, 1]
    # no num_steps: 900 falling by 20 per step has ~45 steps; the first 12 are before its middle
    assert _reuse_trace(late, 12)[0] == [0, 0, 1, 1, 0, 1, 1, 0, 1, 1, 0, 1]
    # falling by 100 per step from 900 it ends after 9 (at t=100): half way at step 4 (4/8)
    assert _reuse_trace(late, 9, spacing=100.0)[0] == [0, 0, 1, 1, 1, 0, 1, 1, 1]


def test_late_phase_raises_the_threshold_along_the_generation():
    """On the linear-in-time model each step drifts by the same amount, so the probe's lambda
    after one step is the same at every step. With the threshold just under it nothing is
    reused early; from where the threshold has risen past it (late_phase, factor 2) the
    step reuses. A factor below 1 makes the late steps stricter."""
    options = {"max_consecutive_reuses": 1, "late_phase": None, "reuse_threshold": 0.0}
    trace, probe = _reuse_trace(options, 12, num_steps=12)
    lams = probe["lambda_trace"][2:]
    lam = max(lams)
    assert trace == [0] * 12 and lam > 0 and min(lams) > 0.9 * lam  # every step computes; lambda steady
    early = {**options, "reuse_threshold": lam / 1.5}
    assert _reuse_trace(early, 12, num_steps=12)[0] == [0] * 12
    ramp = {**early, "late_phase": (0.2, 0.5), "late_threshold_factor": 2.0}
    trace = _reuse_trace(ramp, 12, num_steps=12)[0]
    # the threshold passes lam/1.5 * (1 + share) >= lam at share 0.5: at 35% of the way (step 4 of 0..11)
    assert trace[:4] == [0, 0, 0, 0] and 1 in trace[4:6]
    assert trace[6:] == [1, 0, 1, 0, 1, 0]  # from the end of the phase every other step (cap 1)
    # a factor below 1 lowers it late: nothing reused even at a threshold that reuses early
    lower = {**options, "reuse_threshold": lam * 1.2, "late_phase": (0.2, 0.5), "late_threshold_factor": 0.5}
    trace = _reuse_trace(lower, 12, num_steps=12)[0]
    assert 1 in trace[2:4] and trace[6:] == [0] * 6
