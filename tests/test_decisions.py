"""Typed decisions (issue 31): roles, reasons and verdicts as types, one decider per role
chosen when a region is built, the decision plan built once per compile, one record per
graph in a generation, and one home for a compiled model's config."""

import dataclasses
import json

import pytest
import torch
import torch.fx as fx

import adacorr_compile
from adacorr_compile import AdaCorrConfig
from adacorr_compile.api import _model_state
from adacorr_compile.policies import ConfigHome, DecisionPlan, Guards, Keeps, Reason, Role, Verdict, decide
from adacorr_compile.report import format_report
from adacorr_compile.runtime.decide import (
    BlockDecider, Decider, FollowerDecider, LeaderDecider, ProbeDecider, SpanMemberDecider,
)
from adacorr_compile.runtime.region import ACTIVE, Active, GuardedRegion, RegionSpec
from adacorr_compile.runtime.state import GenerationState, GraphProgress, ModelState
from adacorr_compile.lab.tiny import tiny_dit

# guards that show in eight steps: warm-up (steps 0-1), the reuse cap (2), the final step
GUARDS = {"lowering": "eager", "reuse_threshold": 0.5, "warmup_steps": 2, "max_consecutive_reuses": 2, "final_steps": 1}
STEPS = 8

E, W, M, F = Reason.EMPTY_CACHE, Reason.WARM_UP, Reason.MAX_REUSES, Reason.FINAL_STEPS


def _run(options, monkeypatch=None, steps=STEPS, batch=2):
    """Compile tiny_dit afresh and sample ``steps`` steps; with ``monkeypatch``, also record
    every decider call as (step, region index, decider class, reason or reuse flags)."""
    seen = []
    if monkeypatch is not None:
        original = Decider.decide

        def spy(self, region, observed, active, cache, shared):
            taken = original(self, region, observed, active, cache, shared)
            v = taken.verdict
            flags = None if v.mask is None else "".join("R" if m else "C" for m in v.mask)
            seen.append((active.step, region.spec.order, type(self).__name__, v.reason if flags is None else flags))
            return taken

        monkeypatch.setattr(Decider, "decide", spy)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, inputs = tiny_dit()
    fast = torch.compile(model, backend="adacorr", options=options)
    with torch.no_grad():
        for k in range(steps):
            fast(**inputs(k, 1000.0 - k * 125.0, batch))
    return fast, seen


def _by_step(seen):
    out = {}
    for step, order, kind, what in seen:
        out.setdefault(step, []).append((order, kind, what))
    return out


def test_each_role_decides_as_before_on_a_scripted_run(monkeypatch):
    """scope="step": the leader always computes (its cache stays empty), the probe decides, the
    span after it (regions 1-3, one cache) takes the probe's verdict; on a reuse step the span's
    middle region is not called at all. The verdicts, step by step, are the ones the string
    verdicts of the code before issue 31 gave on this run (recorded from it)."""
    fast, seen = _run(GUARDS, monkeypatch)
    kinds = [type(r.decider) for r in adacorr_compile.regions(fast)]
    assert kinds == [LeaderDecider, ProbeDecider, SpanMemberDecider, SpanMemberDecider]
    assert [r.decider.role for r in adacorr_compile.regions(fast)] == [Role.LEADER, Role.PROBE, Role.FOLLOWER, Role.FOLLOWER]
    L, P, S = LeaderDecider.__name__, ProbeDecider.__name__, SpanMemberDecider.__name__

    def forced(reason):
        return [(0, L, E), (1, P, reason), (2, S, reason), (3, S, reason)]

    reuse = [(0, L, E), (1, P, "R"), (3, S, "R")]
    expected = {0: forced(E), 1: forced(W), 2: reuse, 3: reuse, 4: reuse, 5: forced(M), 6: reuse, 7: forced(F)}
    assert _by_step(seen) == expected


def test_followers_without_a_span_take_the_probes_verdict(monkeypatch):
    """blend=True: no spans (each follower keeps its own cache and decides with a
    FollowerDecider), the same verdicts as the probe's at every step."""
    fast, seen = _run({**GUARDS, "blend": True}, monkeypatch)
    assert [r.span.size for r in adacorr_compile.regions(fast)] == [1, 1, 1, 1]
    L, P, Fo = LeaderDecider.__name__, ProbeDecider.__name__, FollowerDecider.__name__
    steps = _by_step(seen)
    for step, reason in {0: E, 1: W, 2: "R", 3: "R", 4: "R", 5: M, 6: "R", 7: F}.items():
        probe = E if step == 0 else reason
        assert steps[step] == [(0, L, E), (1, P, probe), (2, Fo, probe), (3, Fo, probe)], step


def test_block_scope_decides_per_region_as_before(monkeypatch):
    fast, seen = _run({**GUARDS, "scope": "block", "forecast": "none"}, monkeypatch)
    assert all(type(r.decider) is BlockDecider and r.decider.role is Role.BLOCK for r in adacorr_compile.regions(fast))
    steps = _by_step(seen)
    for step, what in {0: E, 1: W, 2: "R", 3: "R", 4: "R", 5: M, 6: "R", 7: F}.items():
        assert steps[step] == [(k, BlockDecider.__name__, what) for k in range(4)], step


def _region(config):
    class Body(torch.nn.Module):
        def forward(self, h, cond):
            return (torch.tanh(h) * 2 + cond,)

    spec = RegionSpec(path="blocks.0", order=0, stream_pairs=((0, 0),), observed=(0,), num_outputs=1, key="k")
    return GuardedRegion(spec, fx.symbolic_trace(Body()), config)


def test_block_decider_gives_the_policys_verdict_per_sample(monkeypatch):
    """A region driven directly, one decision per sample: the decider's verdict is the
    policy's (:func:`decide` on the lambda it read), a sample that drifted computes alone
    (the compute is the policy's: ``by_policy``), and a reason is a :class:`Reason`."""
    config = AdaCorrConfig.from_options({"scope": "block", "forecast": "none", "decision": "sample", "warmup_steps": 2,
                                         "reuse_threshold": 0.02})
    region, state = _region(config), GenerationState()
    taken = []
    original = BlockDecider.decide
    monkeypatch.setattr(BlockDecider, "decide", lambda self, *a: taken.append(original(self, *a)) or taken[-1])
    h0, cond = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    h1 = h0.clone()
    h1[1] += 0.5 * torch.randn(4, 8)  # sample 1 drifts, sample 0 does not
    for step, h in enumerate([h0, h0, h0, h1, h1 + 1.0]):
        token = ACTIVE.set(Active(state, (0, 0), step))
        try:
            region(h, cond)
        finally:
            ACTIVE.reset(token)
    reasons = [t.verdict.reason for t in taken]
    assert reasons[:2] == [Reason.EMPTY_CACHE, Reason.WARM_UP] and all(isinstance(r, Reason) for r in reasons[:2])
    assert taken[2].verdict.mask == (True, True) and not taken[2].by_policy  # unchanged input: both reuse
    partial = taken[3]
    assert partial.verdict.reason is None and partial.verdict.mask == (True, False) and partial.mask == [True, False]
    assert partial.by_policy and partial.lam is not None and partial.verdict.step == 3
    lam = partial.lam.reshape(-1).tolist()
    guards = Guards(step=3, steps_left=None, consecutive_reuses=1, has_cache=True, is_first_region=True)
    assert decide(config, guards, lam, None) == list(partial.verdict.mask)
    assert taken[4].mask == [False, False] and taken[4].by_policy  # both drift: the policy computes all
    assert region.executions == 4 and state.stats["blocks.0"].partial == 1


def test_plan_is_built_once_per_compile_not_per_call(monkeypatch):
    builds = []
    original = DecisionPlan.build.__func__
    monkeypatch.setattr(DecisionPlan, "build", classmethod(lambda cls, config: builds.append(config) or original(cls, config)))
    torch._dynamo.reset()
    model, inputs = tiny_dit()
    fast = torch.compile(model, backend="adacorr", options=GUARDS)
    with torch.no_grad():
        fast(**inputs(0, 1000.0))
        compiled = len(builds)  # the model state's and the graph's (which the model's replaces)
        for k in range(1, 16):
            fast(**inputs(k, 1000.0 - k * 60.0))
    assert 1 <= compiled <= 2 and len(builds) == compiled  # none per call
    assert adacorr_compile.stats(fast)["totals"]["reuses"] > 0
    state = _model_state(fast)
    plan = state.home.plan
    assert plan.config is state.config and plan.residuals and not plan.per_sample and plan.step_scope
    assert plan.keeps is Keeps.REFERENCE and [plan.role(k) for k in range(3)] == [Role.LEADER, Role.PROBE, Role.FOLLOWER]
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.residuals = False  # type: ignore[misc]


def test_one_home_for_the_config_and_a_recompile_keeps_a_swapped_config():
    """The model's state, every region and their RegionMath share one ConfigHome: a config set
    on the model reaches them all (one plan rebuilt), and a recompile of the model (new input
    shapes) joins that home instead of putting the compile's config back over it."""
    fast, _ = _run(GUARDS, steps=3)
    state = _model_state(fast)
    regions = adacorr_compile.regions(fast)
    assert all(r.home is state.home and r.math.home is state.home for r in regions)
    original = state.config
    try:
        state.config = original.replace(reuse_threshold=0.0)
        assert all(r.config.reuse_threshold == 0.0 and r.math.config.reuse_threshold == 0.0 for r in regions)
        assert state.home.plan.config is state.config and state.home.compiled is original
        model, inputs = tiny_dit()
        with torch.no_grad():
            fast(**inputs(0, 1000.0, 3))  # batch 3: Dynamo compiles another graph for this model
        assert len(state.graphs) == 2
        assert state.config.reuse_threshold == 0.0  # not overwritten by the recompile
        assert all(r.home is state.home for g in state.graphs for r in g.regions)
    finally:
        state.config = original
    assert all(r.config is original for g in state.graphs for r in g.regions)


def test_regions_compiled_with_other_options_keep_their_own_config():
    state = ModelState(AdaCorrConfig())
    other = _region(AdaCorrConfig().replace(reuse_threshold=0.3))
    state.adopt([other])
    assert other.home is not state.home and other.config.reuse_threshold == 0.3
    assert state.config == AdaCorrConfig()
    same = _region(ConfigHome(AdaCorrConfig()))
    state.adopt([same])
    assert same.home is state.home and same.math.home is state.home


def test_reasons_and_roles_print_as_the_strings_they_replace():
    assert str(Reason.WARM_UP) == "warm-up" and f"{Reason.EMPTY_CACHE}" == "empty cache" and Reason.POLICY == "policy"
    assert json.dumps([Role.LEADER, Reason.MAX_REUSES]) == '["leader", "max consecutive reuses"]'
    config = AdaCorrConfig.from_options({"warmup_steps": 2})
    early = Guards(step=1, steps_left=10, consecutive_reuses=0, has_cache=True, is_first_region=False)
    assert decide(config, early, [0.0], None) is Reason.WARM_UP
    forced = Verdict.of(3, Reason.FINAL_STEPS, None)
    assert forced.mask is None and forced.reason is Reason.FINAL_STEPS and not forced.reuses_all()
    flags = Verdict.of(3, [True, True], None)
    assert flags.mask == (True, True) and flags.reason is None and flags.reuses_all()
    with pytest.raises(dataclasses.FrozenInstanceError):
        flags.step = 4  # type: ignore[misc]
    fast, _ = _run(GUARDS, steps=3)
    rep = adacorr_compile.report(fast)
    roles = [r["role"] for r in rep["graphs"][0]["regions"]]
    assert roles == ["leader", "probe", "follower", "follower"] and json.dumps(roles[0]) == '"leader"'
    text = format_report(rep)
    assert "[step leader]" in text and "[step probe]" in text and text.count("[step follower]") == 2
    assert adacorr_compile.stats(fast)["regions"][1]["reuse_trace"] == [0.0, 0.0, 1.0]


def test_generation_state_keeps_one_record_per_graph():
    state, key = GenerationState(), ("owner", 0)
    for k, t in enumerate([900.0, 800.0, 700.0]):
        assert state.begin_step(key, ("sig",), t) == k
        state.graph(key).steps += 1
    g = state.graphs[key]
    assert isinstance(g, GraphProgress) and g.steps == 3 and g.t_first == [900.0, 800.0, 700.0]
    assert g.t_direction == -1 and g.last_t == 700.0 and g.t_spacing == pytest.approx(100.0) and g.t_fit is not None
    assert dict(state.steps) == {key: 3} and state.steps_left(key, 3) == 6  # t=700 falls by 100: 6 steps after step 3
    state.steps[key] += 1  # the mapping view writes the record
    assert g.steps == 4
    state.signals(key).similar = True
    assert state.begin_step(key, ("sig",), 950.0) == 0  # the timestep turned back: a new generation
    assert state.graphs[key] is not g and state.signals(key).similar is None and state.generations == 1
    assert state.learned_steps == 4
