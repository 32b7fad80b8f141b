"""CUDA-graph safety: caches survive compiled parts that hand out static output buffers.

Under ``inductor_mode="reduce-overhead"`` (or ``"max-autotune"``) on a GPU, Inductor runs
each compiled part as a CUDA graph: a replay writes its outputs into the same static
buffers as the recording, so a tensor returned by one model call is overwritten by the
next. No GPU here, so a stand-in does the same on the CPU: every compiled glue piece and
block body copies its results into buffers of its own, one set per call position within a
model call (as a CUDA-graph tree records one node per position), and returns those
buffers. A runtime that keeps such a tensor across calls without a copy reads the next
call's values: its outputs then differ from the same model without the stand-in.
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import torch

import adacorr_compile
from adacorr_compile import compilers
from adacorr_compile.lab.tiny import tiny_dit

lower_mod = importlib.import_module("adacorr_compile.passes.lower")
STEPS = 8


class _Replays:
    """Stand-in CUDA-graph replays: ``mark_step_begin`` starts a model call."""

    def __init__(self) -> None:
        self.overwrites = 0
        self._positions: dict[int, int] = {}

    def mark_step_begin(self) -> None:
        self._positions.clear()

    def wrap(self, fn: Any) -> Any:
        buffers: dict[int, list[Any]] = {}
        replays = self

        class Graphed(torch.nn.Module):
            def forward(self, *args: Any) -> Any:
                out = fn(*args)
                position = replays._positions.get(id(self), 0)
                replays._positions[id(self)] = position + 1
                values = list(out) if isinstance(out, (list, tuple)) else [out]
                static = buffers.get(position)
                if static is None or any(
                    isinstance(v, torch.Tensor) and (s.shape != v.shape or s.dtype != v.dtype)
                    for s, v in zip(static, values)
                ):
                    static = buffers[position] = [v.clone() if isinstance(v, torch.Tensor) else v for v in values]
                else:
                    replays.overwrites += 1
                    for s, v in zip(static, values):
                        if isinstance(v, torch.Tensor):
                            s.copy_(v)  # the replay: same buffers, new values
                result = [s if isinstance(v, torch.Tensor) else v for s, v in zip(static, values)]
                return type(out)(result) if isinstance(out, (list, tuple)) else result[0]

        return Graphed()


def _sample(options: dict[str, Any], replays: _Replays | None, monkeypatch, steps: int = STEPS) -> tuple[torch.Tensor, dict]:
    model, inputs = tiny_dit(3)
    if replays is not None:
        real = lower_mod.compile_graph
        monkeypatch.setattr(lower_mod, "compile_graph", lambda *a, **k: replays.wrap(real(*a, **k)))
    compiled = torch.compile(model, backend="adacorr", options=options)
    outs = []
    with torch.no_grad(), adacorr_compile.generation(compiled, num_steps=steps):
        for step in range(steps):
            if replays is not None:
                replays.mark_step_begin()
            t = 1000.0 * (1 - step / steps)
            out = compiled(**inputs(step, t)).sample
            outs.append(out.clone())  # as a user of CUDA graphs must, before the next call
        report = adacorr_compile.stats(compiled)
    monkeypatch.undo()
    torch._dynamo.reset()
    return torch.stack(outs), report


GRAPHED = {"inductor_mode": "reduce-overhead", "warmup_steps": 1, "final_steps": 0, "reuse_threshold": 0.5}


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="default"),
        pytest.param({"scope": "block", "drift_reference": "previous", "reuse_threshold": 0.5}, id="block-scope-prev-input"),
    ],
)
def test_caches_survive_parts_that_overwrite_their_outputs(options, monkeypatch):
    options = {**GRAPHED, **options}
    expected, plain = _sample(options, None, monkeypatch)
    replays = _Replays()
    got, graphed = _sample(options, replays, monkeypatch)
    assert replays.overwrites > 0  # the stand-in did replay into its buffers
    assert graphed["totals"]["reuses"] == plain["totals"]["reuses"] > 0
    torch.testing.assert_close(_scores(graphed), _scores(plain), rtol=1e-4, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _scores(report: dict) -> torch.Tensor:
    """The OEM scores every region measured, per call (NaN where it measured nothing)."""
    return torch.tensor([[float("nan") if v is None else float(v) for v in r["score_trace"]] for r in report["regions"]])


def test_without_the_copies_a_kept_input_is_overwritten(monkeypatch):
    """The stand-in is strong enough to catch the bug: with the copies switched off, the
    block-scope reference inputs are overwritten by the next call's values, and the regions
    measure their drift against the wrong input."""
    options = {**GRAPHED, "scope": "block", "reuse_threshold": 0.5}
    expected, plain = _sample(options, None, monkeypatch)
    replays = _Replays()
    real = lower_mod.compile_graph
    model, inputs = tiny_dit(3)
    monkeypatch.setattr(lower_mod, "cuda_graphed", lambda config: False)
    monkeypatch.setattr(lower_mod, "compile_graph", lambda *a, **k: replays.wrap(real(*a, **k)))
    compiled = torch.compile(model, backend="adacorr", options=options)
    outs = []
    with torch.no_grad(), adacorr_compile.generation(compiled, num_steps=STEPS):
        for step in range(STEPS):
            replays.mark_step_begin()
            outs.append(compiled(**inputs(step, 1000.0 * (1 - step / STEPS))).sample.clone())
        broken = adacorr_compile.stats(compiled)
    assert all(not r.copy_kept for r in adacorr_compile.regions(compiled))
    assert not torch.allclose(_scores(broken), _scores(plain), rtol=1e-4, atol=1e-6, equal_nan=True)


def test_cuda_graph_modes_copy_kept_inputs_and_never_graph_the_math(monkeypatch):
    seen: list[Any] = []
    real = compilers.compile_graph

    def spy(gm, example_inputs, config, name):
        seen.append((name, config))
        return real(gm, example_inputs, config.replace(inductor_mode="default"), name)  # no CPU autotuning here

    monkeypatch.setattr(compilers, "compile_graph", spy)
    model, inputs = tiny_dit(2)
    compiled = torch.compile(model, backend="adacorr", options={"inductor_mode": "max-autotune", "scope": "block",
                                                                "warmup_steps": 0})
    with torch.no_grad():
        for step in range(3):
            compiled(**inputs(step, 900.0 - 100 * step))
    regions = adacorr_compile.regions(compiled)
    assert regions and all(r.copy_kept for r in regions)
    math = [(name, cfg) for name, cfg in seen if name.startswith("region ")]
    assert math, "the region math was not compiled"
    assert all(not compilers.cuda_graphed(cfg) and cfg.inductor_mode == "max-autotune-no-cudagraphs" for _, cfg in math)
    # the default mode keeps the tensors themselves: no copy
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="adacorr")
    with torch.no_grad():
        compiled(**inputs(0, 900.0))
    assert not any(r.copy_kept for r in adacorr_compile.regions(compiled))


def test_cuda_graphed_follows_the_mode():
    cfg = adacorr_compile.AdaCorrConfig
    assert compilers.cuda_graphed(cfg(inductor_mode="reduce-overhead"))
    assert compilers.cuda_graphed(cfg(inductor_mode="max-autotune"))
    assert not compilers.cuda_graphed(cfg(inductor_mode="max-autotune-no-cudagraphs"))
    assert not compilers.cuda_graphed(cfg())
    assert not compilers.cuda_graphed(cfg(inductor_mode="reduce-overhead", lowering="eager"))
    assert compilers.without_cuda_graphs(cfg(inductor_mode="reduce-overhead")).inductor_mode == "default"
