"""OnnxRunner: run an exported step graph with onnxruntime, threading the cache state.

``runner(**inputs)`` runs one denoising step: it feeds the model inputs plus the state
of the previous step and keeps the new state for the next call. A new generation
starts (state back to an empty cache) the way the backend decides it
(:meth:`adacorr_compile.runtime.state.GenerationState.begin_step`): the timestep turned
back, the shapes or dtypes of the model inputs changed, ``num_steps`` steps are done;
or explicitly with :meth:`OnnxRunner.reset`.

Inputs are checked before anything runs: unknown or missing names, dtypes, ranks and
the fixed and shared dimensions the graph declares, each error naming the input. A step
is a transaction: the state and statistics change only when onnxruntime succeeded, so a
failed call leaves the runner exactly as it was.

On CUDA (onnxruntime-gpu with the CUDA provider), the step runs through IOBinding:
the state lives in device ``OrtValue`` buffers that onnxruntime allocates for each
step's outputs, so it never crosses to the host and no buffer is both input and output
of one step (each state input is a distinct buffer: aliasing two state inputs, or an
input with an output, is avoided by construction). On CPU a plain ``run`` is used.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import statistics
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from ..api import check_num_steps
from ..policies import STEPS_UNKNOWN
from ..runtime.state import GenerationState, summarize
from .onnx import StateSpec, initial_state, read_metadata

logger = logging.getLogger("adacorr_compile")

_GRAPH = 0  # the exported step graph is one graph: its id in GenerationState's per-graph maps

# onnxruntime's input type strings -> dtype names (numpy's, which are torch's without "torch.")
_ORT_DTYPES = {
    "tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int16)": "int16", "tensor(int8)": "int8",
    "tensor(uint8)": "uint8", "tensor(uint16)": "uint16", "tensor(uint32)": "uint32", "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}


def _to_numpy(v: Any) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().numpy()
    return np.asarray(v)


def _same_fixed(value: Any, fixed: Any) -> bool:
    """``value`` is the scalar ``fixed`` at export (JSON's round trip keeps int, float, str, None)."""
    scalars = (bool, int, float, str, type(None))
    return isinstance(value, scalars) and isinstance(value, bool) == isinstance(fixed, bool) and value == fixed


def _dtype_name(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return str(v.dtype).removeprefix("torch.")
    return np.asarray(v).dtype.name


class _Context:
    """One generation context of a runner: the backend's bookkeeping and the cache state."""

    __slots__ = ("gen", "state", "lock")

    def __init__(self, num_steps: int | None) -> None:
        self.gen = GenerationState(num_steps)
        self.state: dict[str, Any] | None = None  # by ONNX input name; None: empty cache
        self.lock = threading.Lock()  # a step is atomic, even in a context shared with copy_context()


class OnnxRunner:
    """Run an :func:`~adacorr_compile.export.to_onnx` export step by step (see module docstring).

    ``providers``: onnxruntime execution providers (default: CUDA when available, else CPU).
    ``num_steps``: the generation's length, for the ``final_steps`` guard (like
    ``adacorr_compile.reset(model, num_steps=N)``); otherwise the steps left are
    extrapolated from the timestep spacing or taken from the previous generation's
    length, exactly as the backend does (:meth:`GenerationState.steps_left`).

    Threads: one runner may be shared. Like a compiled model, each thread has its own
    generation (cache state, step counter, statistics: :meth:`reset`, :meth:`stats`,
    :meth:`state` and :attr:`steps` are the calling thread's), and
    :meth:`generation` gives a block its own private one; the onnxruntime session is
    shared (its ``run`` is thread-safe). Two threads never see each other's cache, so
    each samples as if it ran alone.

    Keyword inputs are the export's model inputs (:attr:`model_inputs`), plus the
    non-tensor inputs fixed at export with their exported values and
    ``return_dict=False``; anything else is refused, naming it.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        providers: Sequence[Any] | None = None,
        num_steps: int | None = None,
        session_options: Any = None,
    ) -> None:
        import onnxruntime as ort

        self.num_steps = check_num_steps(num_steps)
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
        # non-tensor inputs fixed at export (older exports do not record them)
        self.fixed_inputs: dict[str, Any] = dict(self.metadata.get("fixed_inputs") or {})
        graph_inputs = {i.name: i for i in self.session.get_inputs()}
        # what the graph declares of each model input, for the up-front checks: (dtype name
        # or None, shape: ints, dimension names (str) and None, or None when unknown)
        self._specs = {
            n: (_ORT_DTYPES.get(graph_inputs[n].type), None if graph_inputs[n].shape is None else list(graph_inputs[n].shape))
            for n in self.model_inputs
            if n in graph_inputs
        }
        self._steps_left_input = self.metadata.get("steps_left_input")
        if self._steps_left_input not in graph_inputs:
            self._steps_left_input = None  # not used by the graph (final_steps=0)
        self._output_names = self.model_outputs + [s.output for s in self.states] + self.stats_outputs
        # per-thread default generations, and the generation() context that overrides them
        self._thread = threading.local()
        self._active: contextvars.ContextVar[_Context | None] = contextvars.ContextVar(f"adacorr_onnx_{id(self)}", default=None)

    # -- generations -----------------------------------------------------------------

    def _current(self) -> _Context:
        ctx = self._active.get()
        if ctx is None:
            ctx = getattr(self._thread, "ctx", None)
            if ctx is None:
                ctx = self._thread.ctx = _Context(self.num_steps)
        return ctx

    @property
    def _gen(self) -> GenerationState:
        return self._current().gen

    @property
    def steps(self) -> int:
        """Steps run in the current generation (of the calling thread or context)."""
        return self._gen.steps.get(_GRAPH, 0)

    def reset(self, num_steps: int | None = None) -> None:
        """Start afresh: empty cache, counters and statistics. ``num_steps`` tells the
        ``final_steps`` guard where the generation ends, as ``adacorr_compile.reset`` does."""
        num_steps = check_num_steps(num_steps)
        ctx = self._current()
        ctx.gen.reset(num_steps)
        ctx.state = None

    def generation(self, num_steps: int | None = None) -> contextlib.AbstractContextManager[GenerationState]:
        """A private generation for the block, as ``adacorr_compile.generation(model)``:
        its own cache, counters and statistics, invisible to other threads and to code
        outside the block. ``num_steps`` (None or an int >= 1) is checked at the call."""
        return self._generation(_Context(check_num_steps(num_steps)))

    @contextlib.contextmanager
    def _generation(self, ctx: _Context) -> Iterator[GenerationState]:
        token = self._active.set(ctx)
        try:
            yield ctx.gen
        finally:
            self._active.reset(token)

    # -- inputs ----------------------------------------------------------------------

    def _check_inputs(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The feeds of the model inputs, or an error naming the input: unknown and missing
        names, dtypes, ranks, fixed dimensions and dimensions two inputs share."""
        unknown = [n for n in inputs if n not in self.model_inputs and n not in self.fixed_inputs and n != "return_dict"]
        if unknown:
            raise TypeError(f"unknown inputs {unknown}; the exported graph takes {self.model_inputs}"
                            + (f" (and, fixed at export, {sorted(self.fixed_inputs)})" if self.fixed_inputs else ""))
        missing = [n for n in self.model_inputs if n not in inputs]
        if missing:
            raise TypeError(f"missing model inputs {missing}; the exported graph takes {self.model_inputs}")
        for name, fixed in self.fixed_inputs.items():
            if name in inputs and not _same_fixed(inputs[name], fixed):
                raise ValueError(f"input {name!r} was fixed at export to {fixed!r}, got {inputs[name]!r}: export again for another value")
        if inputs.get("return_dict", False) is not False:
            raise ValueError("return_dict: the runner returns a tuple, as model(..., return_dict=False); got return_dict=True")
        feeds: dict[str, np.ndarray] = {}
        dims: dict[str, tuple[str, int]] = {}  # dimension name -> (input, size) where first seen
        for name in self.model_inputs:
            value = inputs[name]
            want, shape = self._specs.get(name, (None, None))
            if not isinstance(value, (torch.Tensor, np.ndarray, np.generic)) and want is not None and want != "bfloat16":
                try:  # a Python number or list: take the graph's dtype
                    value = np.asarray(value, dtype=want)
                except (TypeError, ValueError) as exc:
                    raise TypeError(f"input {name!r}: expected a {want} tensor, got {type(value).__name__} ({exc})") from None
            got = _dtype_name(value)
            if want is not None and got != want:
                raise TypeError(f"input {name!r}: expected dtype {want}, got {got}")
            array = _to_numpy(value)
            if shape is not None:
                expected = "(" + ", ".join(str(d) if isinstance(d, int) else "?" for d in shape) + ")"  # ?: dynamic
                if array.ndim != len(shape):
                    raise ValueError(f"input {name!r}: expected rank {len(shape)} {expected}, got shape {tuple(array.shape)}")
                for axis, (d, size) in enumerate(zip(shape, array.shape)):
                    if isinstance(d, int) and d != size:
                        raise ValueError(f"input {name!r}: expected shape {expected}, got {tuple(array.shape)} (axis {axis})")
                    if isinstance(d, str) and d:
                        seen = dims.setdefault(d, (name, size))
                        if seen[1] != size:
                            raise ValueError(f"input {name!r}: axis {axis} is {size} but the same dynamic dimension of "
                                             f"{seen[0]!r} is {seen[1]}; the exported graph needs them equal")
            feeds[name] = array
        return feeds

    # -- one step --------------------------------------------------------------------

    def _begin_step(self, gen: GenerationState, feeds: Mapping[str, np.ndarray]) -> None:
        """What :meth:`GraphRuntime._begin_step` does: the backend's generation boundaries."""
        signature = tuple((name, feeds[name].shape, feeds[name].dtype.str) for name in self.model_inputs)
        timestep = None
        if self.timestep_arg in feeds:
            t = feeds[self.timestep_arg]
            timestep = float(np.max(t.astype(np.float32))) if t.size else 0.0
        gen.begin_step(_GRAPH, signature, timestep)

    def __call__(self, **inputs: Any) -> tuple[Any, ...]:
        """One step; returns the model outputs as a tuple (torch tensors when the inputs
        were torch tensors, numpy arrays otherwise), like ``model(..., return_dict=False)``.

        A call that raises (a bad input, an onnxruntime error) changes nothing: the next
        call continues the generation as if it had not happened."""
        feeds = self._check_inputs(inputs)
        # torch in, torch out (on the first tensor input's device); numpy otherwise
        device = next((v.device for v in inputs.values() if isinstance(v, torch.Tensor)), None)
        ctx = self._current()
        with ctx.lock:
            return self._step(ctx, feeds, device)

    def _step(self, ctx: _Context, feeds: dict[str, np.ndarray], device: Any) -> tuple[Any, ...]:
        gen = ctx.gen
        # the step is a transaction: begin_step runs on the bookkeeping with the statistics
        # set aside (their traces are folded only once the step succeeded), and everything
        # it changes is put back if the step fails
        saved = {k: (dict(v) if isinstance(v, dict) else v) for k, v in vars(gen).items() if k not in ("stats", "caches")}
        stats, gen.stats = gen.stats, {}
        generations = gen.generations
        try:
            self._begin_step(gen, feeds)
            state = ctx.state if gen.steps[_GRAPH] > 0 else None  # a new generation starts from an empty cache
            if state is None and self.states:
                state = self._device_state(initial_state(self.states, {n: a.shape for n, a in feeds.items()}))
            steps_left = gen.steps_left(_GRAPH, gen.steps[_GRAPH])
            if self.on_cuda:
                results = self._run_iobinding(feeds, state, steps_left)
            else:
                results = self._run_plain(feeds, state, steps_left)
            n_out, n_state = len(self.model_outputs), len(self.states)
            outs = [_host(o) for o in results[:n_out]]
            recorded = [_host(v) for v in results[n_out + n_state :]]
        except BaseException:
            gen.stats = stats
            vars(gen).update(saved)
            raise
        # commit
        gen.stats = stats
        if gen.generations != generations:  # the step began a new generation: fold the old one's traces
            for s in stats.values():
                s.new_generation()
        ctx.state = {s.name: v for s, v in zip(self.states, results[n_out : n_out + n_state])} if self.states else None
        self._record(gen, recorded)
        gen.steps[_GRAPH] += 1
        if device is not None:
            return tuple(torch.from_numpy(np.ascontiguousarray(o)).to(device) for o in outs)
        return tuple(outs)

    def _steps_left_feed(self, steps_left: int | None) -> dict[str, np.ndarray]:
        if self._steps_left_input is None:
            return {}
        return {self._steps_left_input: np.array(STEPS_UNKNOWN if steps_left is None else steps_left, dtype=np.int64)}

    def _run_plain(self, feeds: dict[str, np.ndarray], state: dict[str, Any] | None, steps_left: int | None) -> list[Any]:
        run_feeds = {**feeds, **(state or {}), **self._steps_left_feed(steps_left)}
        return self.session.run(self._output_names, run_feeds)

    def _device_state(self, state: dict[str, np.ndarray]) -> dict[str, Any]:
        if not self.on_cuda:
            return state
        import onnxruntime as ort

        # one device buffer per state input: none aliases another
        return {k: ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0) for k, v in state.items()}

    def _run_iobinding(self, feeds: dict[str, np.ndarray], state: dict[str, Any] | None, steps_left: int | None) -> list[Any]:
        io = self.session.io_binding()
        for name, value in {**feeds, **self._steps_left_feed(steps_left)}.items():
            io.bind_cpu_input(name, value)
        for name, value in (state or {}).items():
            io.bind_ortvalue_input(name, value)
        state_outputs = {s.output for s in self.states}
        for name in self._output_names:
            # state stays on the device; fresh buffers each step, so inputs and outputs never alias
            io.bind_output(name, "cuda" if name in state_outputs else "cpu")
        self.session.run_with_iobinding(io)
        return list(io.get_outputs())

    def _record(self, gen: GenerationState, stats: list[np.ndarray]) -> None:
        if not self.stats_outputs:
            return
        values = dict(zip(self.stats_outputs, stats))
        reused, nonfinite = values["adacorr_reused"], values["adacorr_nonfinite"]
        lam, score = values["adacorr_lambda"], values["adacorr_score"]
        step = gen.steps.get(_GRAPH, 0)
        for k, path in enumerate(self.regions):
            rs = gen.region_stats(path)
            share = float(reused[k])  # of the samples that reused: 0 or 1 with one decision for the batch
            if np.isnan(lam[k]):
                rs.record(step, None, None, share)
            else:
                rs.record(step, torch.tensor(float(lam[k])), torch.tensor(float(score[k])), share)
            if share >= 1.0:
                rs.reuses += 1
            else:
                rs.computes += 1
                rs.partial += int(share > 0.0)  # decision="sample": some samples reused
            rs.nonfinite += int(bool(nonfinite[k]))

    # -- statistics ------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Per-region statistics with the keys of :func:`adacorr_compile.stats` (the
        calling thread's or ``generation()`` context's)."""
        gen = self._gen
        return {
            **summarize(gen, list(self.regions)),
            "steps": gen.steps.get(_GRAPH, 0),
            "generations": gen.generations,
        }

    def state(self) -> dict[str, np.ndarray]:
        """The current cache state (host copies), by ONNX input name."""
        return {k: _host(v) for k, v in (self._current().state or {}).items()}


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
