import math
import pytest

from adacorr_compile import AdaCorrConfig
from adacorr_compile.policies import Guards, decide, step_role


def g(step=5, num_steps=None, consecutive=0, has_cache=True, first=False):
    left = None if num_steps is None else num_steps - 1 - step
    return Guards(step=step, steps_left=left, consecutive_reuses=consecutive, has_cache=has_cache, is_first_region=first)


def test_guards_force_compute():
    cfg = AdaCorrConfig(warmup_steps=2, final_steps=2, max_consecutive_reuses=3)
    assert decide(cfg, g(has_cache=False), [0.0], None) == "empty cache"
    assert decide(cfg, g(step=1), [0.0], None) == "warm-up"
    assert decide(cfg, g(step=8, num_steps=10), [0.0], None) == "final steps"
    assert decide(cfg, g(step=7, num_steps=10), [0.0], None) == [True]
    assert decide(cfg, g(consecutive=3), [0.0], None) == "max consecutive reuses"
    assert decide(cfg.replace(policy="never"), g(), [0.0], None) == "policy never"


def test_adacorr_threshold_per_sample():
    cfg = AdaCorrConfig(policy="adacorr", reuse_threshold=0.1)
    assert decide(cfg, g(), [0.05, 0.1, 0.2], None) == [True, True, False]


def test_interval_pattern_and_correction_veto():
    cfg = AdaCorrConfig(policy="interval", interval=3, warmup_steps=2, correction=False, max_consecutive_reuses=10)
    verdicts = [decide(cfg, g(step=s), None, None) for s in range(2, 9)]
    assert verdicts == ["policy", [True], [True], "policy", [True], [True], "policy"]
    vetoing = cfg.replace(correction=True, reuse_threshold=0.1)
    assert decide(vetoing, g(step=3), [0.5], None) == [False]
    assert decide(vetoing, g(step=3), [0.05], None) == [True]


def test_first_block_policy():
    cfg = AdaCorrConfig(policy="first_block", correction=False)
    assert decide(cfg, g(first=True), None, True) == "first block"
    assert decide(cfg, g(), None, True) == [True]
    assert decide(cfg, g(), None, False) == "policy"


def test_step_scope_roles_and_leader_always_computes():
    block = AdaCorrConfig(policy="adacorr", reuse_threshold=0.1, scope="block")
    step = block.replace(scope="step")
    assert [step_role(block, k) for k in range(4)] == ["block"] * 4
    assert [step_role(step, k) for k in range(4)] == ["leader", "probe", "follower", "follower"]
    assert decide(step, g(first=True), [0.0], None) == "step leader"
    assert decide(block, g(first=True), [0.0], None) == [True]
    assert decide(step, g(), [0.05], None) == [True]  # the probe decides as a block would
    assert decide(step, g(), [0.5], None) == [False]


def test_nonfinite_cache_or_score_computes_after_the_guards():
    cfg = AdaCorrConfig(policy="adacorr", reuse_threshold=0.1, warmup_steps=2)
    assert decide(cfg, g(), [0.0], None, valid=False) == "non-finite cache"
    assert decide(cfg, g(), [0.0], None, score_finite=False) == "non-finite input"
    assert decide(cfg, g(step=1), [0.0], None, valid=False) == "warm-up"  # a guard names the reason first
    assert decide(cfg, g(), [0.0, 0.5], None) == [True, False]


def test_host_and_graph_decisions_are_one_definition():
    """decide and decide_tensor take their guards, schedule and lambda gate from the same
    functions: each guard's tensor condition holds exactly where the host names it."""
    import torch

    from adacorr_compile.policies import STEPS_UNKNOWN, guard_checks

    cfg = AdaCorrConfig(warmup_steps=2, final_steps=1, max_consecutive_reuses=2, scope="step")
    for step, left, consecutive, has_cache, first, known in [(0, None, 0, True, False, True), (3, 0, 0, True, False, True),
                                                             (3, 5, 2, True, False, True), (3, 5, 0, False, False, True),
                                                             (3, 5, 0, True, True, True), (3, 5, 0, True, False, False),
                                                             (3, 5, 0, True, False, True)]:
        host = Guards(step=step, steps_left=left, consecutive_reuses=consecutive, has_cache=has_cache,
                      is_first_region=first, generation_known=known).forced(cfg)
        tensor = guard_checks(cfg, torch.tensor(step), torch.tensor(STEPS_UNKNOWN if left is None else left),
                              torch.tensor(consecutive), torch.tensor(has_cache), first, torch.tensor(known))
        held = [reason for reason, holds in tensor if bool(holds)]
        assert (held[0] if held else None) == host


def test_late_phase_threshold_and_cap_on_host_and_tensors():
    """late_phase: the threshold rises linearly from reuse_threshold at the phase's start to
    reuse_threshold * late_threshold_factor at its end, where the cap gains late_extra_reuses;
    the host and the tensor form (the ONNX step graph's) agree; an unknown length is early."""
    import torch

    from adacorr_compile.policies import STEPS_UNKNOWN, progress, reuse_cap, reuse_threshold_at

    cfg = AdaCorrConfig(reuse_threshold=0.08, max_consecutive_reuses=3, late_phase=(0.2, 0.5), late_threshold_factor=2.0,
                        late_extra_reuses=1)
    # 51 steps: step s is s/50 of the way
    for step, want_thr, want_cap in [(0, 0.08, 3), (10, 0.08, 3), (15, 0.08 * (1 + 1 / 3), 3), (20, 0.08 * (1 + 2 / 3), 3),
                                     (25, 0.16, 4), (50, 0.16, 4)]:
        left = 50 - step
        assert progress(step, left) == pytest.approx(step / 50)
        assert reuse_threshold_at(cfg, step, left) == pytest.approx(want_thr)
        assert reuse_cap(cfg, step, left) == want_cap
        t_step, t_left = torch.tensor(step), torch.tensor(left)
        assert float(reuse_threshold_at(cfg, t_step, t_left)) == pytest.approx(want_thr, rel=1e-6)
        assert int(reuse_cap(cfg, t_step, t_left)) == want_cap
    for step in (0, 30, 10_000):  # the length is not known: every step is early
        assert progress(step, None) == 0.0 and reuse_threshold_at(cfg, step, None) == 0.08 and reuse_cap(cfg, step, None) == 3
        assert float(reuse_threshold_at(cfg, torch.tensor(step), torch.tensor(STEPS_UNKNOWN))) == pytest.approx(0.08)
        assert int(reuse_cap(cfg, torch.tensor(step), torch.tensor(STEPS_UNKNOWN))) == 3
    assert progress(60, -10) == 1.0  # past a predicted end: late, not beyond
    off = cfg.replace(late_phase=None)
    assert reuse_threshold_at(off, 50, 0) == 0.08 and reuse_cap(off, 50, 0) == 3
    step_at = cfg.replace(late_phase=(0.5, 0.5))  # start == end: a step at the end
    assert reuse_threshold_at(step_at, 24, 26) == 0.08 and reuse_threshold_at(step_at, 25, 25) == pytest.approx(0.16)
    # the guard and the lambda gate use them: a streak of 3 is capped early, not late
    early = Guards(step=10, steps_left=40, consecutive_reuses=3, has_cache=True, is_first_region=False)
    late = Guards(step=25, steps_left=25, consecutive_reuses=3, has_cache=True, is_first_region=False)
    assert decide(cfg, early, [0.1], None) == "max consecutive reuses"
    assert decide(cfg, late, [0.1], None) == [True]
    assert decide(cfg, late.__class__(**{**late.__dict__, "consecutive_reuses": 0}), [0.17], None) == [False]
    assert decide(cfg, early.__class__(**{**early.__dict__, "consecutive_reuses": 0}), [0.1], None) == [False]


def _flow_schedule(n, shift):
    """diffusers' flow-matching timesteps: linspace(1, 1/n, n), shifted (SD3: shift 3; Flux: e^mu)."""
    sigmas = [1.0 - k * (1.0 - 1.0 / n) / (n - 1) for k in range(n)]
    return [shift * s / (1.0 + (shift - 1.0) * s) for s in sigmas]


@pytest.mark.parametrize("name, schedule", [
    *[(f"flow n={n} shift={shift:g}", _flow_schedule(n, shift)) for n in (10, 20, 28, 50) for shift in (1.0, 3.0, 3.16)],
    ("flow x1000 (SD3's timesteps)", [1000.0 * t for t in _flow_schedule(28, 3.0)]),
    ("DDIM 50", [981.0 - 20.0 * k for k in range(50)]),
])
def test_steps_left_from_a_shifted_schedule(name, schedule):
    """Without a step count, the steps left come from the timesteps: from the third step on they
    are exact on evenly spaced and shifted schedules (diffusers' SD3 and Flux pipelines pass no
    step count), so final_steps and late_phase know where a generation ends."""
    from adacorr_compile.runtime.state import GenerationState

    state, key, n = GenerationState(), ("owner", 0), len(schedule)
    for k, t in enumerate(schedule):
        assert state.begin_step(key, ("sig",), t) == k
        state.steps[key] += 1  # what the graph runtime does after the call
        if k >= 2:
            assert state.steps_left(key, k) == n - 1 - k, (name, k)


def test_steps_left_falls_back_where_no_shift_fits():
    """A schedule that is not evenly spaced under any shift of this form (Karras-like sigmas) is
    extrapolated from its last spacing, as before; a repeated timestep (a second-order solver's
    second call) neither breaks the fit nor the run."""
    from adacorr_compile.runtime.state import GenerationState, fit_shift

    assert fit_shift([1.0, 0.9]) is None and fit_shift([1.0, 1.0, 0.5]) is None
    shift, h = fit_shift(_flow_schedule(20, 3.0)[:3])
    assert shift == pytest.approx(3.0, rel=1e-6) and h == pytest.approx(1.0 / 20, rel=1e-6)
    karras = [(14.6 ** (1 / 7) + k / 19 * (0.03 ** (1 / 7) - 14.6 ** (1 / 7))) ** 7 for k in range(20)]
    state, key = GenerationState(), ("owner", 0)
    for t in karras[:12]:
        state.begin_step(key, ("sig",), t)
        state.steps[key] += 1
    spacing = karras[10] - karras[11]
    assert state.steps_left(key, 11) == math.ceil(karras[11] / spacing - 1e-3) - 1
    heun = GenerationState()
    for t in _flow_schedule(10, 3.0):
        heun.begin_step(key, ("sig",), t)
        heun.begin_step(key, ("sig",), t)  # the same timestep again
        heun.steps[key] += 1
    assert heun.generations == 0 and heun.steps_left(key, 9) == 0
