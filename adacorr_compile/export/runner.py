"""OnnxRunner: run an exported step graph with onnxruntime, threading the cache state.

``runner(**inputs)`` runs one denoising step: it feeds the model inputs plus the state
of the previous step and keeps the new state for the next call. A new generation
starts (state back to an empty cache) the way the backend decides it
(:class:`adacorr_compile.runtime.graph.GraphRuntime`): the timestep went up, or the
shapes or dtypes of the model inputs changed; or explicitly with :meth:`reset`.

On CUDA (onnxruntime-gpu with the CUDA provider), the step runs through IOBinding:
the state lives in device ``OrtValue`` buffers that onnxruntime allocates for each
step's outputs, so it never crosses to the host and no buffer is both input and output
of one step (each state input is a distinct buffer: aliasing two state inputs, or an
input with an output, is avoided by construction). On CPU a plain ``run`` is used.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..policies import STEPS_UNKNOWN
from ..runtime.state import GenerationState, summarize
from .onnx import StateSpec, initial_state, read_metadata

logger = logging.getLogger("adacorr_compile")

_GRAPH = 0  # the exported step graph is one graph: its id in GenerationState's per-graph maps


def _to_numpy(v: Any) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().numpy()
    return np.asarray(v)


class OnnxRunner:
    """Run an :func:`~adacorr_compile.export.to_onnx` export step by step (see module docstring).

    ``providers``: onnxruntime execution providers (default: CUDA when available, else CPU).
    ``num_steps``: the generation's length, for the ``final_steps`` guard (like
    ``adacorr_compile.reset(model, num_steps=N)``); otherwise the steps left are
    extrapolated from the timestep spacing or taken from the previous generation's
    length, exactly as the backend does (:meth:`GenerationState.steps_left`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        providers: Sequence[Any] | None = None,
        num_steps: int | None = None,
        session_options: Any = None,
    ) -> None:
        import onnxruntime as ort

        self.path = os.fspath(path)
        self.metadata = read_metadata(self.path)
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.session = ort.InferenceSession(self.path, sess_options=session_options, providers=list(providers))
        self.on_cuda = self.session.get_providers()[0] == "CUDAExecutionProvider"
        self.model_inputs: list[str] = list(self.metadata["model_inputs"])
        self.model_outputs: list[str] = list(self.metadata["model_outputs"])
        self.states = [StateSpec(**s) for s in self.metadata["states"]]
        self.regions: list[str] = list(self.metadata["regions"])
        self.stats_outputs: list[str] = list(self.metadata["stats_outputs"])
        self.timestep_arg: str = self.metadata["timestep_arg"]
        graph_inputs = {i.name for i in self.session.get_inputs()}
        self._steps_left_input = self.metadata.get("steps_left_input")
        if self._steps_left_input not in graph_inputs:
            self._steps_left_input = None  # not used by the graph (final_steps=0)
        self._output_names = self.model_outputs + [s.output for s in self.states] + self.stats_outputs
        # the backend's own per-generation bookkeeping (steps, timesteps, statistics), one graph
        self._gen = GenerationState(num_steps)
        self._state: dict[str, Any] | None = None

    # -- generations -----------------------------------------------------------------

    @property
    def steps(self) -> int:
        """Steps run in the current generation."""
        return self._gen.steps.get(_GRAPH, 0)

    def reset(self, num_steps: int | None = None) -> None:
        """Start afresh: empty cache, counters and statistics. ``num_steps`` tells the
        ``final_steps`` guard where the generation ends, as ``adacorr_compile.reset`` does."""
        self._gen.reset(num_steps)
        self._state = None

    def _begin_step(self, feeds: Mapping[str, np.ndarray]) -> None:
        """What :meth:`GraphRuntime._begin_step` does: a new generation when the input
        shapes or dtypes change or the timestep goes up; the timestep spacing is kept for
        the ``final_steps`` extrapolation."""
        gen = self._gen
        signature = tuple((name, feeds[name].shape, feeds[name].dtype.str) for name in self.model_inputs)
        previous = gen.signature.get(_GRAPH)
        if previous is not None and previous != signature:
            logger.info("adacorr onnx: input shapes or dtypes changed: new generation")
            gen.new_generation("input shapes changed")
        gen.signature[_GRAPH] = signature
        if self.timestep_arg in feeds:
            t = feeds[self.timestep_arg]
            value = float(np.max(t.astype(np.float32))) if t.size else 0.0
            last = gen.last_t.get(_GRAPH)
            if last is not None and value > last + 1e-6 * max(1.0, abs(last)):
                gen.new_generation(f"timestep went up ({last:g} -> {value:g})")
                gen.signature[_GRAPH] = signature
            elif last is not None and value < last:
                gen.t_spacing[_GRAPH] = last - value
            gen.last_t[_GRAPH] = value
        gen.steps.setdefault(_GRAPH, 0)
        if gen.steps[_GRAPH] == 0:
            self._state = None  # a new generation starts from an empty cache

    # -- one step --------------------------------------------------------------------

    def __call__(self, **inputs: Any) -> tuple[Any, ...]:
        """One step; returns the model outputs as a tuple (torch tensors when the inputs
        were torch tensors, numpy arrays otherwise), like ``model(..., return_dict=False)``."""
        missing = [n for n in self.model_inputs if n not in inputs]
        if missing:
            raise TypeError(f"missing model inputs {missing}; the exported graph takes {self.model_inputs}")
        as_torch = any(isinstance(v, torch.Tensor) for v in inputs.values())
        device = next((v.device for v in inputs.values() if isinstance(v, torch.Tensor)), None)
        feeds = {n: _to_numpy(inputs[n]) for n in self.model_inputs}
        self._begin_step(feeds)
        if self._state is None and self.states:
            shapes = {n: a.shape for n, a in feeds.items()}
            self._state = self._device_state(initial_state(self.states, shapes))
        if self.on_cuda:
            results = self._run_iobinding(feeds)
        else:
            results = self._run_plain(feeds)
        outs = results[: len(self.model_outputs)]
        n_state = len(self.states)
        if self.states:
            new = results[len(self.model_outputs) : len(self.model_outputs) + n_state]
            self._state = {s.name: v for s, v in zip(self.states, new)}
        self._record([_host(v) for v in results[len(self.model_outputs) + n_state :]])
        self._gen.steps[_GRAPH] += 1
        outs = [_host(o) for o in outs]
        if as_torch:
            return tuple(torch.from_numpy(np.ascontiguousarray(o)).to(device) for o in outs)
        return tuple(outs)

    def _feeds_with_steps_left(self, feeds: dict[str, Any]) -> dict[str, Any]:
        if self._steps_left_input is not None:
            left = self._gen.steps_left(_GRAPH, self.steps)
            feeds[self._steps_left_input] = np.array(STEPS_UNKNOWN if left is None else left, dtype=np.int64)
        return feeds

    def _run_plain(self, feeds: dict[str, np.ndarray]) -> list[Any]:
        run_feeds = dict(feeds)
        if self._state:
            run_feeds.update(self._state)
        return self.session.run(self._output_names, self._feeds_with_steps_left(run_feeds))

    def _device_state(self, state: dict[str, np.ndarray]) -> dict[str, Any]:
        if not self.on_cuda:
            return state
        import onnxruntime as ort

        # one device buffer per state input: none aliases another
        return {k: ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0) for k, v in state.items()}

    def _run_iobinding(self, feeds: dict[str, np.ndarray]) -> list[Any]:
        io = self.session.io_binding()
        for name, value in self._feeds_with_steps_left(dict(feeds)).items():
            io.bind_cpu_input(name, value)
        for name, value in (self._state or {}).items():
            io.bind_ortvalue_input(name, value)
        state_outputs = {s.output for s in self.states}
        for name in self._output_names:
            # state stays on the device; fresh buffers each step, so inputs and outputs never alias
            io.bind_output(name, "cuda" if name in state_outputs else "cpu")
        self.session.run_with_iobinding(io)
        return list(io.get_outputs())

    def _record(self, stats: list[np.ndarray]) -> None:
        if not self.stats_outputs:
            return
        values = dict(zip(self.stats_outputs, stats))
        reused, nonfinite = values["adacorr_reused"], values["adacorr_nonfinite"]
        lam, score = values["adacorr_lambda"], values["adacorr_score"]
        for k, path in enumerate(self.regions):
            rs = self._gen.region_stats(path)
            r = bool(reused[k])
            if np.isnan(lam[k]):
                rs.record(self.steps, None, None, float(r))
            else:
                rs.record(self.steps, torch.tensor(float(lam[k])), torch.tensor(float(score[k])), float(r))
            if r:
                rs.reuses += 1
            else:
                rs.computes += 1
            rs.nonfinite += int(bool(nonfinite[k]))

    # -- statistics ------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Per-region statistics with the keys of :func:`adacorr_compile.stats`."""
        return {
            **summarize(self._gen, list(self.regions)),
            "steps": self.steps,
            "generations": self._gen.generations,
        }

    def state(self) -> dict[str, np.ndarray]:
        """The current cache state (host copies), by ONNX input name."""
        return {k: _host(v) for k, v in (self._state or {}).items()}


def _host(v: Any) -> np.ndarray:
    return v.numpy() if hasattr(v, "numpy") and not isinstance(v, np.ndarray) else np.asarray(v)


def bench_onnxruntime(
    path_uncached: str | os.PathLike[str],
    path_cached: str | os.PathLike[str],
    inputs_fn: Callable[..., Mapping[str, Any]],
    steps: int,
    *,
    repeats: int = 3,
    start: float = 900.0,
    providers: Sequence[Any] | None = None,
    session_options: Any = None,
) -> dict[str, Any]:
    """Per-step times of the uncached and the cached ONNX export in this process.

    ``inputs_fn(step, t)`` gives one step's inputs (``t`` from ``start`` down by
    ``start/steps``, as in the tests' sampling loop). Each runner samples ``repeats``
    generations of ``steps`` steps after one warm-up generation; inputs are prepared
    before timing. Returns per-variant ``median_ms`` and ``mean_ms`` per step and the
    ``speedup`` (uncached mean / cached mean, i.e. per generation) and
    ``speedup_median``, plus the cached runner's ``reuse_fraction``.
    """
    ts = [start - k * (start / steps) for k in range(steps)]
    prepared = [{k: _to_numpy(v) for k, v in inputs_fn(k, t).items() if isinstance(v, (torch.Tensor, np.ndarray))} for k, t in enumerate(ts)]
    result: dict[str, Any] = {"steps": steps, "repeats": repeats}
    for label, path in (("uncached", path_uncached), ("cached", path_cached)):
        runner = OnnxRunner(path, providers=providers, num_steps=steps, session_options=session_options)
        feeds_per_step = [{n: kw[n] for n in runner.model_inputs} for kw in prepared]
        times: list[float] = []
        for rep in range(repeats + 1):
            runner.reset(num_steps=steps)
            for kw in feeds_per_step:
                t0 = time.perf_counter()
                runner(**kw)
                if rep:  # the first generation warms up
                    times.append(time.perf_counter() - t0)
        result[label] = {
            "median_ms": 1e3 * statistics.median(times),
            "mean_ms": 1e3 * statistics.fmean(times),
            "provider": runner.session.get_providers()[0],
        }
        if label == "cached":
            result["reuse_fraction"] = runner.stats()["totals"]["reuse_fraction"]
    result["speedup"] = result["uncached"]["mean_ms"] / result["cached"]["mean_ms"]
    result["speedup_median"] = result["uncached"]["median_ms"] / result["cached"]["median_ms"]
    return result
