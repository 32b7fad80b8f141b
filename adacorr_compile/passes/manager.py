"""The pass manager: runs an ordered pass list over one Dynamo graph.

Each pass is a function ``(gm, config) -> gm`` wrapped in a :class:`Pass` that declares
what it *requires* and what it *provides*: names of
:class:`~adacorr_compile.passes.common.Analysis` fields (``blocks``, ``regions``) or of
stages of the graph (``bodies``: the blocks are outlined submodules; ``lowered``: the
graph is split and compiled). The manager

- checks, before each pass, that every name it requires was provided by the setup
  (``example_inputs``) or by a pass before it, and raises :class:`PassPreconditionError`
  naming the pass and the missing name otherwise: an order mistake in the list is a
  programming error, found at import (:func:`check_order`) and again at run time;
- stops after a pass that recorded :meth:`Analysis.stop <adacorr_compile.passes.common.Analysis.stop>`
  (nothing is left to guard), logging why; no pass is recognized by its name;
- stops once a name given as ``until`` is provided, where a caller wants the analysis
  but not the rest (``until="regions"``: the guarded regions, not the lowering);
- logs each pass (its time, at DEBUG) and dumps the graph before and after each pass
  when the config's ``dump_graphs`` is set (``ADACORR_DUMP_GRAPHS=1``, ``--dump-graphs``).

A plain function in the list (a test's stand-in for a pass) is a pass that declares
nothing.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterable, Sequence

import torch.fx as fx

from ..config import AdaCorrConfig
from .common import Analysis, analysis, dump

logger = logging.getLogger("adacorr_compile")

PassFn = Callable[[fx.GraphModule, AdaCorrConfig], fx.GraphModule]

# what the manager provides itself before the first pass
SETUP_PROVIDES = ("example_inputs",)


class PassPreconditionError(RuntimeError):
    """A pass runs before what it requires was provided (an order mistake in the list)."""


class Pass:
    """One pass of the list: the function and its declared preconditions and results.

    Called like the function it wraps, and named like it (``__name__``), so a list of
    passes reads, dumps and logs as a list of functions."""

    def __init__(self, fn: PassFn, requires: Iterable[str] = (), provides: Iterable[str] = ()) -> None:
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)
        self.requires = tuple(requires)
        self.provides = tuple(provides)

    def __call__(self, gm: fx.GraphModule, config: AdaCorrConfig) -> fx.GraphModule:
        return self.fn(gm, config)

    def __repr__(self) -> str:
        return f"Pass({self.__name__}, requires={self.requires}, provides={self.provides})"


def as_pass(step: Pass | PassFn) -> Pass:
    """``step`` itself if it is a :class:`Pass`, else a pass that declares nothing."""
    return step if isinstance(step, Pass) else Pass(step)


def _check(step: Pass, provided: set[str]) -> None:
    """Raise :class:`PassPreconditionError` where ``step`` requires a name not in ``provided``."""
    missing = [name for name in step.requires if name not in provided]
    if missing:
        raise PassPreconditionError(
            f"pass {step.__name__!r} requires {', '.join(repr(m) for m in missing)}, which no pass before it "
            f"provides (provided so far: {', '.join(sorted(provided)) or 'nothing'})"
        )


def check_order(passes: Sequence[Pass | PassFn]) -> None:
    """Check the whole list's order without running it: every pass's requirements are
    provided before it. Raises :class:`PassPreconditionError` naming the first pass that
    would run too early and what it misses."""
    provided = set(SETUP_PROVIDES)
    for step in map(as_pass, passes):
        _check(step, provided)
        provided.update(step.provides)


def stop_reason(info: Analysis) -> str:
    """The reason a stopped pass list gives: what the passes left unguarded, and why."""
    return "; ".join(f"{where}: {reason}" for where, reason in info.skipped) or "no reason recorded"


def run_passes(
    gm: fx.GraphModule,
    example_inputs: list[Any],
    config: AdaCorrConfig,
    passes: Sequence[Pass | PassFn],
    until: str | None = None,
) -> tuple[fx.GraphModule, Analysis]:
    """Run ``passes`` in their order over ``gm`` (see module docstring).

    Returns the last pass's graph and the analysis (``gm.meta["adacorr"]``, carried to the
    lowered graph by ``lower``). ``until`` is a name a pass provides: the list stops after
    the pass that provides it (a ``ValueError`` where no pass of the list does).
    Exceptions of a pass propagate."""
    steps = [as_pass(p) for p in passes]
    if until is not None and not any(until in s.provides for s in steps):
        names = sorted({name for s in steps for name in s.provides})
        raise ValueError(f"until={until!r} is provided by no pass of the list (they provide {', '.join(names)})")
    info = analysis(gm)
    info.example_inputs = list(example_inputs)
    provided = set(SETUP_PROVIDES)
    for step in steps:
        _check(step, provided)
        gm = _run_one(step, gm, config)
        info.passes_run.append(step.__name__)
        provided.update(step.provides)
        if info.stopped:
            logger.info("adacorr: pass list stopped after %s: %s", step.__name__, stop_reason(info))
            break
        if until in step.provides:
            logger.debug("adacorr: pass list stopped after %s: %r is provided, as asked", step.__name__, until)
            break
    return gm, info


def _run_one(step: Pass, gm: fx.GraphModule, config: AdaCorrConfig) -> fx.GraphModule:
    """Run one pass with its graph dumps and its time in the log."""
    dump(gm, f"before {step.__name__}", config.dump_graphs)
    start = time.perf_counter()
    gm = step(gm, config)
    logger.debug("adacorr: pass %s took %.1f ms", step.__name__, 1000 * (time.perf_counter() - start))
    dump(gm, f"after {step.__name__}", config.dump_graphs)
    return gm


__all__ = ["Pass", "PassPreconditionError", "as_pass", "check_order", "run_passes", "stop_reason"]
