"""Many requests in one batched call (issue 29): per-request state, rows that compute alone.

In serving, the rows of one batch belong to requests that joined at different times: each
has its own clock (steps done, step count, timesteps), reuse streak, caches, span caches and
forecast points. Here a request's state is a :class:`~.state.GenerationState` of its own, held
in a slot keyed by the id the caller gives (:class:`RequestSlots`, one per compiled model),
so everything the single-generation runtime does for a batch it does for each request's rows:

* :func:`run_graph` (called by :class:`~.graph.GraphRuntime` inside
  :func:`adacorr_compile.requests`) begins the step of each request on its own state (its
  rows' shapes and timesteps, its own step count), then runs the graph with a
  :class:`RowsActive` as the active step.
* :meth:`RowsActive.run` is a guarded region's call over the batch: each request's decider
  decides on that request's rows alone, with its own cache and guards; the requests that
  reuse take their own (forecast) corrected cache; the rows of the requests that compute are
  gathered, the compiled block body runs once on that sub-batch, and each request's share of
  the fresh output goes through the ordinary compute path (blend, refresh). The outputs are
  scattered back into the batch's row order.

The body runs on a sub-batch only where the graph was compiled with a symbolic batch size
(``dynamic=True``, or Dynamo's automatic dynamic shapes after the batch size changed once):
:func:`row_plan` finds, from the body's fake inputs, which arguments carry the batch rows and
which size arguments carry the batch size. A body compiled for a static batch runs on all
rows and the computing requests take their rows of it (same results, no saving), as does a
body whose inputs use the batch size other than as a leading dimension. A one-row sub-batch
of a symbolic body is padded to two rows (Dynamo specialises sizes 0 and 1). Rows are assumed
independent in a block, as in every Transformer block (no batch statistics).
"""

from __future__ import annotations

import contextvars
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Hashable, Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .region import ACTIVE, Active, GuardedRegion, _compute, _reuse
from .state import GenerationState, ModelState, summarize

logger = logging.getLogger("adacorr_compile")


# ------------------------------------------------------------------ slots
@dataclass
class Request:
    """One live request: its id, generation state (clock, caches, stats) and shape."""

    id: Hashable
    state: GenerationState
    num_steps: int | None
    rows: int
    busy: bool = False  # inside a requests() call now

    def finished(self) -> bool:
        """Its ``num_steps`` are done in every graph it ran."""
        graphs = self.state.graphs.values()
        return self.num_steps is not None and bool(graphs) and all(g.steps >= self.num_steps for g in graphs)


@dataclass
class RequestTotals:
    """Counters over all requests of a model since it was compiled (or :meth:`RequestSlots.clear`)."""

    started: int = 0
    finished: int = 0
    released: int = 0
    row_evaluations: int = 0  # block evaluations asked for: rows x region calls
    rows_skipped: int = 0  # of those, rows that took their cache
    body_calls: int = 0  # compiled block body runs
    body_rows: int = 0  # rows they ran on (padding included)


class RequestSlots:
    """The live requests of one compiled model, keyed by id (see module docstring)."""

    def __init__(self) -> None:
        self.live: dict[Hashable, Request] = {}
        self.totals = RequestTotals()
        self.lock = threading.Lock()

    def take(self, ids: Sequence[Hashable], steps: dict[Hashable, int | None], rows: dict[Hashable, int],
             limit: int) -> list[Request]:
        """The requests of one call, made where new, marked busy. An id still running must come
        with its own step count and rows (else an error names it: release it first or use a new
        id); an id in another call now is refused; more than ``limit`` live requests too."""
        with self.lock:
            for rid in ids:
                known = self.live.get(rid)
                if known is None:
                    continue
                if known.busy:
                    raise RuntimeError(f"request id {rid!r} is already in another call of this model (ids must be "
                                       "unique among the requests running at once)")
                if steps[rid] is not None and steps[rid] != known.num_steps:
                    raise ValueError(f"request id {rid!r} is still running (num_steps={known.num_steps}, "
                                     f"{_done(known)} step(s) done) and got num_steps={steps[rid]}: release({rid!r}) it "
                                     "first, or give the new request another id")
                if rows[rid] != known.rows:
                    raise ValueError(f"request id {rid!r} is still running with {known.rows} row(s) and got "
                                     f"{rows[rid]}: release({rid!r}) it first, or give the new request another id")
            new = [rid for rid in ids if rid not in self.live]
            if len(self.live) + len(new) > limit:
                raise RuntimeError(f"{len(self.live) + len(new)} live requests exceed the option max_requests={limit}: "
                                   "release() finished or cancelled ones, or raise max_requests")
            for rid in new:
                self.live[rid] = Request(rid, GenerationState(num_steps=steps[rid], private=True), steps[rid], rows[rid])
                self.totals.started += 1
            taken = [self.live[rid] for rid in ids]
            for request in taken:
                request.busy = True
            return taken

    def give_back(self, taken: Sequence[Request], failed: bool) -> list[Hashable]:
        """After a call: its requests are free again; the finished ones (and, after a failure,
        all of them: their state is half a step) leave their slots. Returns the ids that left."""
        left = []
        with self.lock:
            for request in taken:
                request.busy = False
                if failed or request.finished():
                    self._drop(request, finished=not failed)
                    left.append(request.id)
        return left

    def release(self, rid: Hashable) -> bool:
        """Cancel a request: its slot is freed. False where the id is not live."""
        with self.lock:
            request = self.live.get(rid)
            if request is None:
                return False
            if request.busy:
                raise RuntimeError(f"request id {rid!r} cannot be released inside its own call")
            self._drop(request, finished=False)
            return True

    def _drop(self, request: Request, finished: bool) -> None:
        del self.live[request.id]
        if finished:
            self.totals.finished += 1
        else:
            self.totals.released += 1

    def summary(self) -> dict[str, Any]:
        t = self.totals
        return {
            "live": sorted(map(str, self.live)), "started": t.started, "finished": t.finished, "released": t.released,
            "row_evaluations": t.row_evaluations, "rows_skipped": t.rows_skipped,
            "skip_fraction": t.rows_skipped / t.row_evaluations if t.row_evaluations else 0.0,
            "body_calls": t.body_calls, "body_rows": t.body_rows,
        }


def _done(request: Request) -> int:
    return max((g.steps for g in request.state.graphs.values()), default=0)


_SLOTS: WeakIdKeyDictionary = WeakIdKeyDictionary()
_SLOTS_LOCK = threading.Lock()


def slots_of(model: ModelState, create: bool = True) -> RequestSlots | None:
    """The request slots of a compiled model's state (made on first use)."""
    slots = _SLOTS.get(model)
    if slots is None and create:
        with _SLOTS_LOCK:
            slots = _SLOTS.get(model)
            if slots is None:
                slots = _SLOTS[model] = RequestSlots()
    return slots


def request_stats(model: ModelState, rid: Hashable) -> dict[str, Any] | None:
    """Per-region statistics of one live request (``stats()``'s shape), or None."""
    slots = slots_of(model, create=False)
    request = None if slots is None else slots.live.get(rid)
    if request is None:
        return None
    report = summarize(request.state, [r.spec.path for r in model.regions()])
    report["steps"] = _done(request)
    return report


# ------------------------------------------------------------------ one call's rows
@dataclass(frozen=True)
class RowGroup:
    """The rows of one request in the batch: a range (``start``) where they are adjacent, else
    an index tensor."""

    request: Request
    rows: tuple[int, ...]
    start: int | None
    index: torch.Tensor

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """This request's rows of a batch-major tensor."""
        if self.start is not None:
            return t.narrow(0, self.start, len(self.rows))
        return t.index_select(0, self.index.to(t.device))


@dataclass
class RequestBatch:
    """What one :func:`adacorr_compile.requests` call holds: its model, row groups and slots."""

    model: ModelState
    slots: RequestSlots
    groups: tuple[RowGroup, ...]
    rows: int
    inverse: torch.Tensor | None  # per batch row, its place in group order (None: group order is row order)
    left: list[Hashable] = field(default_factory=list)  # ids whose slots were freed when the call ended


# the requests calls open in this thread or task, innermost last (one per compiled model that runs one: a
# pipeline with two compiled transformers may hold a requests() context for each)
BATCH: contextvars.ContextVar[tuple[RequestBatch, ...]] = contextvars.ContextVar("adacorr_requests", default=())


def row_groups(ids: Sequence[Hashable], requests: dict[Hashable, Request]) -> tuple[tuple[RowGroup, ...], torch.Tensor | None]:
    """The rows of each request (in order of first appearance), and the permutation that puts
    rows in group order back into batch order (None where it is the identity)."""
    order: dict[Hashable, list[int]] = {}
    for row, rid in enumerate(ids):
        order.setdefault(rid, []).append(row)
    groups = []
    for rid, rows in order.items():
        adjacent = rows == list(range(rows[0], rows[0] + len(rows)))
        groups.append(RowGroup(requests[rid], tuple(rows), rows[0] if adjacent else None, torch.tensor(rows)))
    flat = [r for g in groups for r in g.rows]
    if flat == list(range(len(ids))):
        return tuple(groups), None
    inverse = torch.empty(len(flat), dtype=torch.long)
    inverse[torch.tensor(flat)] = torch.arange(len(flat))
    return tuple(groups), inverse


def active_batch(model: ModelState) -> RequestBatch | None:
    """The requests call running on ``model`` in this thread or task, if any."""
    return next((batch for batch in reversed(BATCH.get()) if batch.model is model), None)


# ------------------------------------------------------------------ a graph call
def _batch_major(value: Any, rows: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == rows


def run_graph(graph: Any, batch: RequestBatch, key: Any, context: Any, args: Sequence[Any]) -> Any:
    """One call of a graph runtime for a batch of requests (see module docstring): each
    request's step begins on its own state, then the graph runs with a :class:`RowsActive`."""
    if context is not None and (context.step_index is not None or context.num_steps is not None):
        raise ValueError("requests(): a cache_context with step_index or num_inference_steps gives the whole batch "
                         "one clock; inside requests() each request keeps its own (give num_steps to requests())")
    inputs = [args[i] for i in graph.input_indices]
    if not any(_batch_major(t, batch.rows) for t in inputs):
        raise ValueError(f"requests(): {batch.rows} ids were given, but no tensor input of the model has "
                         f"{batch.rows} rows (inputs: {[tuple(t.shape) for t in inputs]})")
    stamp = args[graph.timestep_index] if graph.timestep_index is not None else None
    actives = []
    for group in batch.groups:
        signature = tuple(((len(group.rows), *t.shape[1:]) if _batch_major(t, batch.rows) else tuple(t.shape), t.dtype)
                          for t in inputs)
        timestep = None
        if isinstance(stamp, torch.Tensor):
            own = group.take(stamp) if _batch_major(stamp, batch.rows) else stamp
            timestep = float(own.detach().float().max())
        elif stamp is not None:
            timestep = float(stamp)
        state = group.request.state
        # under a decision group (runtime/distributed.py) each request's decision is one vote of
        # the group's ranks: every rank holds the same requests in the same order
        actives.append(Active(state, key, state.begin_step(key, signature, timestep), True, batch.model.group))
    token = ACTIVE.set(RowsActive(batch, tuple(actives)))
    try:
        out = graph.runner(*args)
    finally:
        ACTIVE.reset(token)
    for active in actives:
        active.state.graph(key).steps += 1
    return out


# ------------------------------------------------------------------ which arguments carry rows
@dataclass(frozen=True)
class RowPlan:
    """How a region's body runs on a sub-batch: the argument positions that carry the batch's
    rows (leading dimension) and those that carry its size (a symbolic size input); or why it
    cannot (``reason``: it then runs on all rows)."""

    rows: tuple[int, ...] = ()
    sizes: tuple[int, ...] = ()
    reason: str | None = None


_PLANS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def row_plan(region: GuardedRegion) -> RowPlan:
    """The region's :class:`RowPlan`, read once from its body's fake inputs."""
    plan = _PLANS.get(region)
    if plan is None:
        plan = _PLANS[region] = _read_plan(region)
        if plan.reason is not None:
            logger.info("adacorr: requests: %s runs on all rows when some compute: %s", region.spec.path, plan.reason)
    return plan


def _symbols(size: Any) -> set[Any]:
    return set(size.node.expr.free_symbols) if isinstance(size, torch.SymInt) else set()


def _read_plan(region: GuardedRegion) -> RowPlan:
    values = [n.meta.get("example_value", n.meta.get("val")) for n in region.body.graph.nodes if n.op == "placeholder"]
    pairs = region.spec.stream_pairs
    lead = values[pairs[0][0]] if pairs and pairs[0][0] < len(values) else None
    if not isinstance(lead, torch.Tensor) or lead.dim() == 0:
        return RowPlan(reason="its stream input has no batch dimension")
    size = lead.shape[0]
    if not isinstance(size, torch.SymInt):
        return RowPlan(reason=f"it was compiled for a static batch of {size} rows (compile with dynamic=True, or "
                              "call once with another batch size)")
    symbol = size.node.expr
    if len(_symbols(size)) != 1 or symbol not in _symbols(size):
        return RowPlan(reason=f"its batch size is {symbol}, not a size of its own")
    rows, sizes = [], []
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor):
            dims = [_symbols(d) for d in v.shape]
            if dims and isinstance(v.shape[0], torch.SymInt) and v.shape[0].node.expr == symbol and not any(
                    symbol in d for d in dims[1:]):
                rows.append(i)
            elif any(symbol in d for d in dims):
                return RowPlan(reason=f"its input {i} of shape {tuple(v.shape)} uses the batch size {symbol} "
                                      "other than as its first dimension")
        elif isinstance(v, torch.SymInt):
            if v.node.expr == symbol:
                sizes.append(i)
            elif symbol in _symbols(v):
                return RowPlan(reason=f"its size input {i} ({v.node.expr}) depends on the batch size")
    return RowPlan(tuple(rows), tuple(sizes))


# ------------------------------------------------------------------ a region call
@dataclass
class _Decided:
    group: RowGroup
    active: Active
    args: list[Any]
    observed: list[torch.Tensor]
    cache: Any
    shared: Any
    taken: Any

    @property
    def reuses(self) -> bool:
        mask = self.taken.mask
        return mask is not None and all(mask)


class RowsActive:
    """The active step of a requests call (what :data:`~.region.ACTIVE` holds): a region
    called under it runs :meth:`run` instead of its single-generation path."""

    def __init__(self, batch: RequestBatch, actives: tuple[Active, ...]) -> None:
        self.batch = batch
        self.actives = actives

    def run(self, region: GuardedRegion, args: Sequence[Any]) -> tuple[Any, ...]:
        """Decide per request, reuse per request, compute the computing requests' rows in one
        body call, scatter back into row order (see module docstring)."""
        batch, spec = self.batch, region.spec
        first = args[spec.stream_pairs[0][0]] if spec.stream_pairs else None
        if not _batch_major(first, batch.rows):
            raise ValueError(f"requests(): region {spec.path} got a stream of shape "
                             f"{None if first is None else tuple(first.shape)}, but {batch.rows} ids were given: "
                             "a model that changes its batch size inside cannot run requests")
        decided = [self._decide(region, args, group, active) for group, active in zip(batch.groups, self.actives)]
        computing = [d for d in decided if not d.reuses]
        fresh = self._fresh(region, args, [d.group for d in computing]) if computing else []
        role = region.decider.role
        outs, k = [], 0
        for d in decided:
            if d.reuses:
                outs.append(_reuse(region, d.args, d.observed, d.active, d.cache, d.shared, d.taken, role))
            else:
                outs.append(_compute(region, d.args, d.observed, d.active, d.cache, d.shared, d.taken, role, fresh[k]))
                k += 1
        totals = batch.slots.totals
        totals.row_evaluations += batch.rows
        totals.rows_skipped += sum(len(d.group.rows) for d in decided if d.reuses)
        return self._scatter(outs)

    def _decide(self, region: GuardedRegion, args: Sequence[Any], group: RowGroup, active: Active) -> _Decided:
        """One request's decision on its rows, from its own state (as ``_guarded_call``)."""
        spec, span, rows = region.spec, region.span, self.batch.rows
        own = list(args)
        sources = set(span.sources) if span.position == 0 else set()  # the span's input, held by its first region
        for i in {i for i, _ in spec.stream_pairs} | set(spec.observed) | sources:
            if _batch_major(args[i], rows):
                own[i] = group.take(args[i])
        observed = [own[i] for i in spec.observed]
        state = active.state
        cache = state.cache((active.graph_id[0], span.key))
        if span.position == 0:
            cache.check_signature((span.size, tuple((tuple(t.shape), t.dtype, t.device) for t in observed)))
        shared = state.signals(active.graph_id)
        taken = region.decider.decide(region, observed, active, cache, shared)
        return _Decided(group, active, own, observed, cache, shared, taken)

    def _fresh(self, region: GuardedRegion, args: Sequence[Any], groups: list[RowGroup]) -> list[list[Any]]:
        """The body's outputs for the rows of ``groups`` (one list per group, stream outputs
        only): one body call on their rows, or on all rows where it must (:func:`row_plan`)."""
        plan, rows = row_plan(region), self.batch.rows
        wanted = sum(len(g.rows) for g in groups)
        totals = self.batch.slots.totals
        region.executions += 1
        totals.body_calls += 1
        if wanted == rows or plan.reason is not None:
            totals.body_rows += rows
            out = list(region.body_fn(*args))
            return [_stream_outputs(region, out, g.take) for g in groups]
        index = torch.tensor([r for g in groups for r in g.rows])
        if len(index) == 1:  # a symbolic batch size is never 1: pad with a copy of the row
            index = index.repeat(2)
        sub = list(args)
        for i in plan.rows:
            sub[i] = args[i].index_select(0, index.to(args[i].device))
        for i in plan.sizes:
            sub[i] = len(index)
        totals.body_rows += len(index)
        out = list(region.body_fn(*sub))
        shares, start = [], 0
        for g in groups:
            n = len(g.rows)
            shares.append(_stream_outputs(region, out, lambda t, s=start, n=n: t.narrow(0, s, n)))
            start += n
        return shares

    def _scatter(self, outs: list[tuple[Any, ...]]) -> tuple[Any, ...]:
        """Each output's per-request parts, back in the batch's row order."""
        if len(outs) == 1:
            return tuple(outs[0])
        inverse = self.batch.inverse
        merged = []
        for parts in zip(*outs):
            if any(p is None for p in parts):
                merged.append(None)
                continue
            value = torch.cat(parts)
            merged.append(value if inverse is None else value.index_select(0, inverse.to(value.device)))
        return tuple(merged)


def _stream_outputs(region: GuardedRegion, out: list[Any], take: Any) -> list[Any]:
    """``out`` with its stream outputs cut to one request's rows (others None: unused)."""
    streams = {j for _, j in region.spec.stream_pairs}
    return [take(v) if j in streams else None for j, v in enumerate(out)]
