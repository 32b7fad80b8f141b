"""Runtime state, apart from config: cache tensors, step counters and statistics.

One :class:`ModelState` per compiled model (per ``torch.compile`` call, whatever
graphs Dynamo shares between calls: :mod:`.owners`). Inside it, the active
:class:`GenerationState` is the one of the innermost
:func:`adacorr_compile.generation` context (a ``contextvars.ContextVar``: private to
its thread or asyncio task), else the calling thread's default one: two threads
sampling with one compiled model never see each other's cache. Within a generation,
caches and step counters are kept per module instance (an owner token from the
graph's first parameter) and per block path, so two models of one class run by one
compiled function never share a cache, and a recompilation (new graph, same blocks)
finds the caches of its blocks.
"""

from __future__ import annotations

import contextvars
import itertools
import math
import logging
import threading
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..config import AdaCorrConfig
from ..policies import ConfigHome, HomeConfig
from ..step import RegionCache, StepSignals  # noqa: F401 - the cache's one definition (re-exported)

logger = logging.getLogger("adacorr_compile")


_NAN = torch.tensor(float("nan"))  # trace entry of a call that measured nothing (never written to)


@dataclass
class RegionStats:
    """Counters of one region since the last reset, and its trace in the current generation."""

    path: str
    calls: int = 0
    reuses: int = 0
    computes: int = 0
    partial: int = 0  # per-sample decisions: calls where some samples reused
    nonfinite: int = 0  # computes forced or cache refreshes refused because of NaN/inf
    lam_trace: list[torch.Tensor] = field(default_factory=list)  # per call (scalar or [B])
    score_trace: list[torch.Tensor] = field(default_factory=list)
    reuse_trace: list[float] = field(default_factory=list)  # fraction of samples reused per call
    step_trace: list[int] = field(default_factory=list)
    # sums of the per-call means of finished generations since the last reset (folded in
    # by new_generation: constant memory however many generations run without a reset)
    lam_sum: torch.Tensor | None = None
    score_sum: torch.Tensor | None = None
    measured: int = 0

    def record(self, step: int, lam: torch.Tensor | None, score: torch.Tensor | None, reused: float) -> None:
        """Append one call to the trace (no tensor work: the means are folded in per generation)."""
        self.calls += 1
        self.step_trace.append(step)
        self.reuse_trace.append(reused)
        if lam is not None and score is not None:
            self.lam_trace.append(lam.detach())
            self.score_trace.append(score.detach())
        else:
            self.lam_trace.append(_NAN)
            self.score_trace.append(_NAN)

    def count_reuse(self, step: int, lam: torch.Tensor | None, score: torch.Tensor | None) -> None:
        """A call that reused for all its samples: counted and traced."""
        self.reuses += 1
        self.record(step, lam, score, 1.0)

    def _measured(self) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
        """(sum of lambda means, sum of score means, count) over the current trace."""
        idx = [i for i, v in enumerate(self.lam_trace) if v is not _NAN]
        if not idx:
            return None, None, 0
        lam = torch.stack([self.lam_trace[i].float().mean().cpu() for i in idx]).sum()
        score = torch.stack([self.score_trace[i].float().mean().cpu() for i in idx]).sum()
        return lam, score, len(idx)

    def new_generation(self) -> None:
        lam, score, n = self._measured()
        if n:
            self.lam_sum = lam if self.lam_sum is None else self.lam_sum + lam
            self.score_sum = score if self.score_sum is None else self.score_sum + score
            self.measured += n
        self.lam_trace.clear()
        self.score_trace.clear()
        self.reuse_trace.clear()
        self.step_trace.clear()

    def summary(self) -> dict[str, Any]:
        def last(trace: list[torch.Tensor]) -> float | None:
            for v in reversed(trace):
                x = float(v.float().mean())
                if x == x:
                    return x
            return None

        lam_now, score_now, n_now = self._measured()
        count = self.measured + n_now

        def mean(total: torch.Tensor | None, now: torch.Tensor | None) -> float | None:
            parts = [float(x) for x in (total, now) if x is not None]
            return sum(parts) / count if parts and count else None

        return {
            "path": self.path,
            "calls": self.calls,
            "reuses": self.reuses,
            "computes": self.computes,
            "partial": self.partial,
            "nonfinite": self.nonfinite,
            "last_lambda": last(self.lam_trace),
            "mean_lambda": mean(self.lam_sum, lam_now),
            "last_score": last(self.score_trace),
            "mean_score": mean(self.score_sum, score_now),
            "lambda_trace": [float(v.float().mean()) for v in self.lam_trace],
            "score_trace": [float(v.float().mean()) for v in self.score_trace],
            "reuse_trace": list(self.reuse_trace),
        }


def storage_bytes(*values: Any) -> int:
    """Bytes of the storages of the tensors in ``values`` (nested in lists, tuples and dicts),
    each storage counted once: views and aliases (``ref_in`` is often ``prev_in``) add nothing."""
    seen: dict[int, int] = {}

    def add(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        elif isinstance(value, (list, tuple)):
            for v in value:
                add(v)
        elif isinstance(value, dict):
            for v in value.values():
                add(v)

    add(values)
    return sum(seen.values())


def unshift(u: float, shift: float) -> float:
    """The evenly spaced time ``sigma`` behind a shifted one ``u = shift * sigma / (1 + (shift -
    1) * sigma)`` (SD3's and Wan's ``shift``; Flux's exponential time shift with ``shift =
    e^mu``); ``shift=1`` is the identity."""
    return u / (shift - (shift - 1.0) * u)


def fit_shift(first: list[float]) -> tuple[float, float] | None:
    """``(shift, h)``: the shift under which a falling schedule's first three timesteps, as shares
    of the first, are evenly spaced (by ``h``) in unshifted time, or None (fewer than three, not
    falling, no shift in [e^-6, e^6] fits). An evenly spaced schedule (DDIM, an unshifted
    flow) fits with shift 1."""
    if len(first) < 3 or not first[0] > first[1] > first[2] > 0:
        return None
    u1, u2 = first[1] / first[0], first[2] / first[0]

    def gap(log_shift: float) -> float:
        shift = math.exp(log_shift)
        return 2.0 * (1.0 - unshift(u1, shift)) - (1.0 - unshift(u2, shift))

    lo, hi = -6.0, 6.0
    if gap(lo) * gap(hi) > 0:
        return None
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if gap(lo) * gap(mid) <= 0:
            hi = mid
        else:
            lo = mid
    shift = math.exp(0.5 * (lo + hi))
    h = 1.0 - unshift(u1, shift)
    return (shift, h) if h > 0 else None


GraphKey = Any  # (owner token, graph id): one module instance running one compiled graph


@dataclass
class GraphProgress:
    """Where one graph (one module instance running one compiled graph) is in the generation:
    its step counter, the timesteps seen, the pipeline's step index and count, and what its
    regions pass each other within a step. One per graph key; all dropped at a new generation."""

    steps: int = 0  # calls in this generation
    last_t: float | None = None
    t_spacing: float | None = None  # last timestep change (absolute)
    t_direction: int | None = None  # +1 rising, -1 falling, within this generation
    t_first: list[float] = field(default_factory=list)  # the generation's first three distinct timesteps
    t_fit: tuple[float, float] | None = None  # fit_shift of those three, once they are in
    signature: tuple | None = None
    index: int | None = None  # the pipeline's step index of the last call (cache_context)
    total: int | None = None  # the pipeline's number of steps (cache_context)
    signals: StepSignals = field(default_factory=StepSignals)


class StepCounts(MutableMapping):
    """``GenerationState.steps``: the graphs' step counters as a mapping (graph key -> calls in
    this generation), read and written through the per-graph records."""

    def __init__(self, graphs: dict[GraphKey, GraphProgress]) -> None:
        self._graphs = graphs

    def __getitem__(self, key: GraphKey) -> int:
        return self._graphs[key].steps

    def __setitem__(self, key: GraphKey, value: int) -> None:
        record = self._graphs.get(key)
        if record is None:
            record = self._graphs[key] = GraphProgress()
        record.steps = value

    def __delitem__(self, key: GraphKey) -> None:
        del self._graphs[key]

    def __iter__(self) -> Iterator[GraphKey]:
        return iter(self._graphs)

    def __len__(self) -> int:
        return len(self._graphs)


class GenerationState:
    """Everything that changes while sampling; one per generation context."""

    def __init__(self, num_steps: int | None = None, private: bool = False) -> None:
        self.num_steps = num_steps  # told by the user
        self.private = private  # a generation() context: its end is a generation boundary
        self.learned_steps: int | None = None  # length of the previous generation
        self.graphs: dict[GraphKey, GraphProgress] = {}  # per graph key, for this generation
        self.caches: dict[Any, RegionCache] = {}  # (owner token, block path or span key) -> cache
        self.stats: dict[str, RegionStats] = {}
        self.generations = 0
        self.lock = threading.RLock()

    @property
    def steps(self) -> StepCounts:
        """Calls in this generation, per graph key (a view of :attr:`graphs`)."""
        return StepCounts(self.graphs)

    def graph(self, key: GraphKey) -> GraphProgress:
        """The record of graph ``key`` in this generation (made on first use)."""
        record = self.graphs.get(key)
        if record is None:
            record = self.graphs[key] = GraphProgress()
        return record

    def signals(self, key: GraphKey) -> StepSignals:
        """What the regions of graph ``key`` pass each other within a step."""
        return self.graph(key).signals

    def cache(self, key: Any) -> RegionCache:
        c = self.caches.get(key)
        if c is None:
            c = self.caches[key] = RegionCache()
        return c

    def region_stats(self, path: str) -> RegionStats:
        s = self.stats.get(path)
        if s is None:
            s = self.stats[path] = RegionStats(path)
        return s

    def cache_bytes(self) -> int:
        """Bytes of the tensors the caches of this generation hold now (inputs, residuals or
        outputs, forecast values, the step's shared values), each storage counted once."""
        held = [getattr(c, name) for c in self.caches.values() for name in ("prev_in", "ref_in", "ref_res", "ref_out", "prev_val", "span_in")]
        # the step's shared values, the probe's verdict's lambda among them (a device tensor)
        shared = [(vars(g.signals), None if g.signals.verdict is None else g.signals.verdict.lam) for g in self.graphs.values()]
        return storage_bytes(held, shared)

    def has_boundaries(self) -> bool:
        """The user marks where generations end: a ``generation()`` context or a step count."""
        return self.private or self.num_steps is not None

    def begin_step(
        self,
        key: GraphKey,
        signature: tuple,
        timestep: float | None,
        step_index: int | None = None,
        total: int | None = None,
    ) -> int:
        """Before a call of graph ``key``: start a new generation where one begins, and
        return the call's step (the pipeline's ``step_index`` when it gives one, else
        the number of calls so far in this generation).

        A generation is a monotone run of timesteps, falling (DDPM/DDIM, most
        flow-matching pipelines) or rising (pipelines that pass ``1 - sigma``); a step
        against the run's direction starts a new one, as do changed input shapes or
        dtypes, a pipeline step index that goes back (or repeats 0) and, when
        ``num_steps`` is known, a call after the last step. A repeated timestep
        (second-order solvers) continues the run."""
        known = self.graphs.get(key)
        if step_index is not None:
            last_index = None if known is None else known.index
            if last_index is not None and (step_index < last_index or step_index == last_index == 0):
                self.new_generation(f"step index went back ({last_index} -> {step_index})")
        elif self.num_steps is not None and known is not None and known.steps >= self.num_steps:
            self.new_generation(f"{self.num_steps} steps done")
        g = self.graph(key)  # a fresh record where a new generation began
        previous = g.signature
        if previous is not None and previous != signature:
            logger.info("adacorr: input shapes or dtypes changed (%s -> %s): new generation", previous, signature)
            self.new_generation("input shapes changed")
            g = self.graph(key)
        if timestep is not None:
            g = self._see_timestep(key, g, timestep)
        g.signature = signature
        if step_index is not None:
            g.index = step_index
        if total is not None:
            g.total = total
        return g.steps if step_index is None else step_index

    def _see_timestep(self, key: GraphKey, g: GraphProgress, timestep: float) -> GraphProgress:
        """:meth:`begin_step`'s timestep: the run's direction and spacing, its first three
        distinct timesteps (and their shift fit); a step against the run's direction starts a
        new generation. Returns the graph's record (a fresh one after a new generation)."""
        last = g.last_t
        delta = 0.0 if last is None else timestep - last
        if last is not None and abs(delta) > 1e-6 * max(1.0, abs(last)):
            direction = 1 if delta > 0 else -1
            run = g.t_direction
            if run is not None and run != direction:
                self.new_generation(f"timestep turned back ({last:g} -> {timestep:g})")
                g = self.graph(key)
            else:
                g.t_direction = direction
                g.t_spacing = abs(delta)
        first = g.t_first
        if len(first) < 3 and (not first or abs(delta) > 1e-6 * max(1.0, abs(last))):  # type: ignore[arg-type]
            first.append(timestep)
            if len(first) == 3:  # fitted once per generation, not at every region's guard
                g.t_fit = fit_shift(first)
        g.last_t = timestep
        return g

    def steps_left(self, key: GraphKey, step: int) -> int | None:
        """Steps after ``step`` in this generation: from ``num_steps`` if the user gave it;
        else extrapolated from a falling timestep: where the generation's first three
        timesteps are evenly spaced under a shift (:func:`fit_shift`: DDIM, unshifted and
        shifted flow matching, SD3's and Flux's schedules) and this step's still fits, the
        steps left in that unshifted time (the last step is one spacing above 0); else as if
        it falls by about the same amount each step (``ceil(t / spacing) - 1`` steps remain;
        DDIM's last call is at t=1 with spacing 20, a flow-matching Euler sampler's at t=1/N
        with spacing 1/N), or from a rising one in [0, 1] (it ends
        below 1); else from the length of the previous generation; else unknown. A
        pipeline's step count (``cache_context(num_inference_steps=...)``) comes first."""
        g = self.graphs.get(key)
        if g is not None and g.total is not None:
            return g.total - 1 - step
        if self.num_steps is not None:
            return self.num_steps - 1 - step
        t, dt, direction = (None, None, None) if g is None else (g.last_t, g.t_spacing, g.t_direction)
        fit = g.t_fit if g is not None and direction == -1 and t is not None and t >= 0 else None
        if fit is not None:
            shift, h = fit
            sigma = unshift(t / g.t_first[0], shift)  # type: ignore[union-attr]
            if abs(sigma - (1.0 - step * h)) <= 0.3 * h:  # the fit holds at this step: the schedule is of this form
                return math.ceil(sigma / h - 1e-3) - 1
        if t is not None and dt is not None and dt > 0:
            remaining = t if direction == -1 else (1.0 - t if 0.0 <= t <= 1.0 else None)
            if remaining is not None and remaining >= 0 and remaining / dt < 1e6:
                return math.ceil(remaining / dt - 1e-3) - 1
        if self.learned_steps is not None:
            return self.learned_steps - 1 - step
        return None

    def new_generation(self, reason: str) -> None:
        """Drop caches and counters of the generation; keep cumulative stats."""
        done = max(self.steps.values(), default=0)
        if done:
            self.learned_steps = done
            self.generations += 1
        logger.debug("adacorr: new generation (%s) after %d steps", reason, done)
        for c in self.caches.values():
            c.clear()
        for s in self.stats.values():
            s.new_generation()
        self.graphs.clear()

    def reset(self, num_steps: int | None = None) -> None:
        """Start afresh: caches, counters and statistics."""
        self.new_generation("reset")
        self.stats.clear()
        self.learned_steps = None
        self.generations = 0
        self.num_steps = num_steps


def summarize(state: GenerationState, paths: list[str]) -> dict[str, Any]:
    """Per-region summaries (in ``paths`` order) and totals: the core of ``stats()``,
    shared by the compiled model and the ONNX runner."""
    regions = [state.stats[p].summary() for p in paths if p in state.stats]
    calls = sum(r["calls"] for r in regions)
    reuses = sum(r["reuses"] for r in regions)
    return {
        "regions": regions,
        "totals": {
            "regions": len(paths),
            "calls": calls,
            "reuses": reuses,
            "computes": sum(r["computes"] for r in regions),
            "reuse_fraction": reuses / calls if calls else 0.0,
        },
    }


class ModelState:
    """State of one compiled model: its config's home, graph runtimes and generation states.

    The config lives in one :class:`~adacorr_compile.policies.ConfigHome` (with its decision
    plan), which the regions of the graphs compiled for this model and their RegionMath share
    (:meth:`adopt`); ``config`` reads and writes it there. The default generation state is per
    thread; a ``generation()`` context is private to its thread or task. A copy
    (``copy.deepcopy``, ``pickle``) of a compiled model is a new compiled model: it gets a
    fresh state with the same config."""

    def __init__(self, config: AdaCorrConfig) -> None:
        self.home = ConfigHome(config)
        self._thread = threading.local()
        self.active: contextvars.ContextVar[GenerationState | None] = contextvars.ContextVar(
            f"adacorr_generation_{id(self)}", default=None
        )
        self.graphs: list[Any] = []  # GraphRuntime objects this model has run or compiled, in that order
        self.fallbacks: list[str] = []  # reasons of graphs compiled without regions (or caching)
        self._owners = WeakIdKeyDictionary()  # first parameter -> owner token
        # the ranks that decide together (runtime/distributed.py), found at the first compile
        self.group: Any = None
        self._group_resolved = False
        self._tokens = itertools.count(1)
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (ModelState, (self.config,))

    # the model's config; setting it reaches the live regions too (calibration swaps run-time options so)
    config = HomeConfig()

    def adopt(self, regions: Any) -> None:
        """The regions of a graph just compiled for this model read the model's config home from
        now on, where they were compiled with the options the model was (a recompile: new shapes,
        a failed guard), so a config swapped in for calibration covers them too. A graph compiled
        with other options keeps its own home: it never changes the config that the regions
        already running use (logged)."""
        for region in regions:
            if region.home is self.home:
                continue
            if region.home.compiled == self.home.compiled:
                region.rehome(self.home)
            else:
                logger.info("adacorr: %s was compiled with other options than the model's first graph; "
                            "it keeps its own config", region.spec.path)

    @property
    def default(self) -> GenerationState:
        """The calling thread's default generation state."""
        state = getattr(self._thread, "state", None)
        if state is None:
            state = self._thread.state = GenerationState()
        return state

    def current(self) -> GenerationState:
        state = self.active.get()
        return self.default if state is None else state

    def attach(self, graph: Any) -> None:
        """Record a graph runtime this model runs (Dynamo may share one between models)."""
        if not any(g is graph for g in self.graphs):
            with self._lock:
                if not any(g is graph for g in self.graphs):
                    self.graphs.append(graph)

    def resolve_group(self, module: Any) -> None:
        """The decision group, from the ``decision_group`` option and the model being compiled
        (once: every graph of the model votes in the same group)."""
        if self._group_resolved:
            return
        from .distributed import resolve

        self.group = resolve(self.config.decision_group, module)
        self._group_resolved = True

    def note(self, reason: str) -> None:
        """Record why something runs without caching (``stats()["fallbacks"]``), once."""
        with self._lock:
            if reason not in self.fallbacks:
                self.fallbacks.append(reason)

    def owner_token(self, first_param: Any) -> int:
        """A small int per module instance, from the identity of its first parameter."""
        token = self._owners.get(first_param)
        if token is None:
            with self._lock:
                token = self._owners.get(first_param)
                if token is None:
                    token = self._owners[first_param] = next(self._tokens)
        return token

    def regions(self) -> list[Any]:
        seen: dict[str, Any] = {}
        for g in self.graphs:
            for r in g.regions:
                seen.setdefault(r.spec.path, r)
        return list(seen.values())
