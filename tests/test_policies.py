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
