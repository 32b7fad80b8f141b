"""Several processes: one decision on every rank (gloo on the CPU, spawned on loopback).

Each test spawns 2 ranks (4 in the slow set) under a watchdog (tests/distributed_harness.py:
collectives time out in seconds, the run is killed after a few minutes), shards a tiny
diffusers model as users do, compiles it with ``backend="adacorr"`` and samples. What must
hold (issue "Multi-GPU"):

* every rank takes the same branch at every step, also when only one rank's shard moves so
  much that its local score alone would flip the decision (with ``decision_group="none"``,
  each rank deciding alone as before, that run hangs: the test below shows it);
* the output equals the same options in one process (float32 round-off), and
  ``policy="never"`` equals plain ``torch.compile`` under the same parallelism;
* one all-reduce per step, no recompiles over generations.
"""

from __future__ import annotations

import numpy as np
import pytest

from distributed_harness import RanksFailed, run_ranks
from distributed_workers import run_requests, run_sharded

pytest.importorskip("diffusers")

# reuse is likely at this threshold on the tiny models; the first step only is warm-up
OPTIONS = {"reuse_threshold": 0.3, "warmup_steps": 1}
STEPS = 8
# the second half of the tokens jumps by this after step 1: rank 1's local score alone would
# compute at step 2 while rank 0's would reuse (decision_group="none" below hangs there)
PERTURB = 0.4


def _same_everywhere(results: list[dict], steps: int = STEPS, generations: int = 2, ignore_fallbacks: bool = False) -> None:
    first = results[0]
    for rank, r in enumerate(results[1:], 1):
        assert r["traces"] == first["traces"], f"rank {rank} took other decisions than rank 0"
        np.testing.assert_array_equal(r["out"], first["out"], err_msg=f"rank {rank}'s output differs from rank 0's")
    for r in results:
        assert ignore_fallbacks or r["fallbacks"] == []
        group = r["group"]
        assert group is not None and group["size"] == len(results)
        # one all-reduce per step with a cache to score (every step but the first), per generation
        assert group["all_reduces"] == (steps - 1) * generations
        assert r["graphs"][0] == r["graphs"][-1], "the later generations recompiled"
        np.testing.assert_allclose(r["out"], r["first"], rtol=0, atol=1e-6)
    assert sum(sum(t) for t in first["traces"]) > 0, "nothing reused: the test checks nothing"


def _equals_single_process(results: list[dict]) -> None:
    r0 = results[0]
    assert r0["single_group"] is None  # one process: nothing to vote with
    assert r0["traces"] == r0["single_traces"], "the sharded run decided otherwise than one process"
    np.testing.assert_allclose(r0["out"], r0["single"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("lowering", ["inductor"])
def test_context_parallel_flux_one_decision_on_a_perturbed_shard(lowering):
    """diffusers' Ulysses context parallelism on Flux: rank 1's shard jumps, every rank still
    takes one decision (found on the model: decision_group="auto"), the output is the one
    process's."""
    results = run_ranks(run_sharded, 2, model="flux", layout="context", options={**OPTIONS, "lowering": lowering},
                        steps=STEPS, perturb=PERTURB)
    _same_everywhere(results)
    _equals_single_process(results)
    # the jump was seen: the step after it computed
    assert results[0]["traces"][1][2] == 0.0
    assert "context parallelism" in results[0]["group"]["source"]


def test_ranks_deciding_alone_hang_on_a_perturbed_shard():
    """The same run with each rank deciding on its own shard (what the backend did before
    decision groups): rank 1 computes the block while rank 0 reuses it, and rank 1 waits in
    the block's all-to-all forever. The watchdog turns the hang into this failure."""
    with pytest.raises(RanksFailed) as failed:
        run_ranks(run_sharded, 2, collective_timeout=8.0, model="flux", layout="context",
                  options={**OPTIONS, "lowering": "eager", "decision_group": "none"}, steps=STEPS, perturb=PERTURB,
                  reference=False, generations=1)
    assert failed.value.hung, str(failed.value)


def test_policy_never_equals_plain_compile_under_context_parallelism():
    results = run_ranks(run_sharded, 2, model="flux", layout="context", options={"policy": "never"}, steps=4,
                        reference=False, generations=1, plain=True)
    for r in results:
        assert sum(sum(t) for t in r["traces"]) == 0
        np.testing.assert_allclose(r["out"], r["plain"], rtol=0, atol=1e-5)


def test_context_parallel_wan_one_decision_across_graph_breaks():
    """Wan under diffusers' context parallelism: Dynamo breaks the graph in diffusers' own CP
    hook (``hooks/context_parallel.py``, a variadic call) and compiles the blocks one frame at
    a time; those blocks are guarded as regional compilation guards them, and the decision is
    still one per step on every rank (the group is found on the attention processors).
    Not the same as one process: the last block's frame is not guarded under the split (one
    process guards all three), so only the ranks are compared with each other here."""
    results = run_ranks(run_sharded, 2, model="wan", layout="context", options={**OPTIONS, "lowering": "eager"},
                        steps=STEPS, perturb=PERTURB, reference=False)
    _same_everywhere(results, ignore_fallbacks=True)


def test_tensor_parallel_dtensor_blocks_one_decision():
    """DTensor tensor parallelism of the blocks' feed-forwards: the group is the mesh the
    parameters are sharded over."""
    results = run_ranks(run_sharded, 2, model="flux", layout="tensor", options={**OPTIONS, "lowering": "eager"},
                        steps=STEPS, perturb=PERTURB)
    _same_everywhere(results)
    _equals_single_process(results)
    assert "DTensor" in results[0]["group"]["source"]


def test_cfg_ranks_decide_alone_by_default_and_together_with_world():
    """CFG parallelism (cond on rank 0, uncond on rank 1, nothing sharded): by default each
    rank decides for its branch as one process does in its cache context, with no
    collective; decision_group="world" makes them vote jointly: one decision on both."""
    alone = run_ranks(run_sharded, 2, model="flux", layout="cfg", options={**OPTIONS, "lowering": "eager"},
                      steps=STEPS, generations=1)
    assert [r["group"] for r in alone] == [None, None]
    assert alone[0]["traces"] == alone[0]["single_traces"]
    np.testing.assert_allclose(alone[0]["out"], alone[0]["single"], rtol=0, atol=1e-6)
    joint = run_ranks(run_sharded, 2, model="flux", layout="cfg",
                      options={**OPTIONS, "lowering": "eager", "decision_group": "world"}, steps=STEPS, reference=False,
                      generations=1)
    assert joint[0]["traces"] == joint[1]["traces"]
    assert [r["group"]["all_reduces"] for r in joint] == [STEPS - 1] * 2
    assert sum(sum(t) for t in joint[0]["traces"]) > 0


def test_requests_in_one_call_under_context_parallelism():
    """Two requests batched in one call (``requests()``) on Flux under Ulysses context
    parallelism, request b's shard on rank 1 perturbed: each request's decisions are votes of
    the ranks (the same on both) and equal its decisions in one process; each rank deciding
    alone (decision_group="none") hangs there."""
    options = {**OPTIONS, "lowering": "eager"}
    r0, r1 = run_ranks(run_requests, 2, options=options, steps=STEPS, perturb=PERTURB)
    assert r0["traces"] == r1["traces"], "the ranks decided otherwise for a request"
    np.testing.assert_array_equal(r0["out"], r1["out"])
    assert r0["traces"] == r0["single_traces"], "the sharded requests decided otherwise than one process"
    np.testing.assert_allclose(r0["out"], r0["single"], rtol=0, atol=1e-4)
    assert sum(sum(t) for t in r0["traces"]["b"]) > 0
    with pytest.raises(RanksFailed) as failed:
        run_ranks(run_requests, 2, collective_timeout=8.0, options={**options, "decision_group": "none"},
                  steps=STEPS, perturb=PERTURB)
    assert failed.value.hung


@pytest.mark.slow
def test_context_parallel_four_ranks():
    results = run_ranks(run_sharded, 4, timeout=480.0, model="flux4", layout="context",
                        options={**OPTIONS, "lowering": "eager"}, steps=STEPS, perturb=PERTURB)
    _same_everywhere(results)
    _equals_single_process(results)
