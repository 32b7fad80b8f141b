"""RegionMath: a guarded region's per-step tensor math, fused into compiled kernels.

A region does a little tensor work of its own every step, around the block:

* ``measure``: the OEM score of the block's stream input against its reference,
  lambda from the ACM, and the values the host reads for the decision (lambda, the
  cache's finiteness flag, the score's finiteness) packed into one vector, so the
  decision costs one device-to-host read;
* ``refresh`` (compute steps): the fresh residuals ``output - input`` that become
  the cache, and their finiteness flag.

Eagerly, the relative score alone is about ten reductions over the block input
(each a full read of it) and costs as much as a sizeable fraction of the block. With
``lowering="inductor"`` (and for ``"tensorrt"``'s glue) each function is traced with
``make_fx`` for the exact input signature the first time it is met and compiled by
Inductor into a few fused kernels; signatures are cached here, one object per lowered
graph (no Dynamo, so no guards and no recompiles of the user's model are involved).
Shapes that change (a new resolution, ``dynamic=True``): when a function meets a second
shape of the same ranks, dtypes and devices, it is traced once more with symbolic sizes
and compiled for any size; that kernel serves every later shape whose values pass the
guards its shape environment recorded (checked once per new shape, with static sizes
guarded too), and a shape that fails them gets a kernel of its own.
The kernels never run as CUDA graphs, whatever ``inductor_mode`` says: their outputs are
the caches, kept from one model call to the next, which a graph's next replay would
overwrite. With ``lowering="eager"`` the same functions run eagerly. The math itself is the
region step's (:mod:`adacorr_compile.step`, over :mod:`adacorr_compile.oem` and
:mod:`adacorr_compile.acm`), which the ONNX export traces too.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from .. import acm
from .. import step as rstep
from ..config import AdaCorrConfig
from ..policies import ConfigHome, HomeConfig

if TYPE_CHECKING:  # pragma: no cover - types only
    from ..step import StepSignals
    from .distributed import DecisionGroup

logger = logging.getLogger("adacorr_compile")

Signature = tuple[Any, ...]


@contextlib.contextmanager
def _compiling_at_run_time() -> Iterator[None]:
    """Compile at run time as Dynamo compiles: under its process-wide compile lock, so
    that it never overlaps a Dynamo compile in another thread, and with its "compiling"
    flag set (where this torch has it), so that a thread entering a compiled model
    meanwhile does not take the FX tracing flag, which is process-wide, for its own."""
    from torch._dynamo import convert_frame

    session = getattr(torch.compiler, "_compile_session_context", contextlib.nullcontext)
    with convert_frame.compile_lock, session():
        yield


def _signature(tensors: Sequence[torch.Tensor]) -> Signature:
    return tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)


def _kind(signature: Signature) -> tuple[Any, ...]:
    """A signature without its sizes: ranks, dtypes and devices."""
    return tuple((len(shape), dtype, device) for shape, dtype, device in signature)


def _guards_hold(shape_env: Any, fakes: list[Any], tensors: Sequence[torch.Tensor]) -> bool:
    """Whether a kernel compiled for ``fakes`` (symbolic sizes) is valid for ``tensors``:
    every guard its shape environment recorded, static sizes included, holds."""
    try:
        return bool(shape_env.evaluate_guards_for_args(fakes, list(tensors), ignore_static=False))
    except Exception:  # noqa: BLE001 - cannot tell: not valid
        return False


class RegionMath:
    """The per-step math of the regions of one lowered graph (see module docstring)."""

    def __init__(self, config: AdaCorrConfig | ConfigHome) -> None:
        # the config's one home, shared with the graph's regions (a swapped config reaches both)
        self.home = config if isinstance(config, ConfigHome) else ConfigHome(config)
        self.compiled_kernels = 0
        self._fns: dict[tuple[str, Signature], Callable[..., Any]] = {}
        # (name, n, ranks/dtypes/devices) -> [(shape env, fake inputs, kernel for any size)]
        self._dynamic: dict[tuple[Any, ...], list[tuple[Any, list[Any], Callable[..., Any]]]] = {}

    config = HomeConfig()  # the home's (the compiled model's) config

    # ---------------------------------------------------------------- the math
    def _measure(self, n: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cfg = self.config
        observed, reference, valid = list(tensors[:n]), list(tensors[n:2 * n]), tensors[2 * n]
        score, lam = rstep.measure(cfg.score, observed, reference, cfg.spatial_weight, cfg.gamma, cfg.decision == "sample")
        flags = torch.stack([valid.reshape(()).to(torch.float32), torch.isfinite(score).all().to(torch.float32)])
        host = torch.cat([lam.reshape(-1).to(torch.float32), flags])
        return score, lam, host

    def _measure_forecast(self, n: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """:meth:`_measure` against the reference's forecast (``probe_forecast``): the inputs
        are the observed values, the reference, its previous value, the cache-valid flag and
        the forecast's ``(k, gap, max_change)`` as one float32 vector (values, not constants
        of the kernel: one kernel serves every step and a swapped ``forecast_max_change``)."""
        observed, reference, previous = tensors[:n], list(tensors[n:2 * n]), list(tensors[2 * n:3 * n])
        valid, params = tensors[3 * n], tensors[3 * n + 1]
        forecast = rstep.probe_reference(reference, previous, params[0], params[1], params[2])
        return self._measure(n, *observed, *forecast, valid)

    @staticmethod
    def _partials(n: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A decision group's measure on this rank's shard: the score's partial sums."""
        return (rstep.measure_partials(tensors[:n], tensors[n:2 * n]),)

    @staticmethod
    def _partials_forecast(n: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """:meth:`_partials` against the reference as stored and against its forecast (with
        the gate held open), and the gate's sums: the group's totals pick one of the two."""
        observed, reference, previous = tensors[:n], list(tensors[n:2 * n]), list(tensors[2 * n:3 * n])
        params = tensors[3 * n]
        forecast = rstep.probe_reference(reference, previous, params[0], params[1], float("inf"))
        return (rstep.measure_partials(observed, reference), rstep.measure_partials(observed, forecast),
                acm.steady_sums(reference, previous))

    @staticmethod
    def _refresh(n: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        residuals, valid = rstep.fresh_residuals(tensors[:n], tensors[n:])
        return (*residuals, valid)

    # ----------------------------------------------------------------- calling
    def measure(
        self, observed: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(score, lambda, host vector ``[lambda..., cache valid, score finite]``)."""
        n = len(observed)
        score, lam, host = self._call("measure", self._measure, n, [*observed, *reference, valid])
        return score, lam, host

    def measure_forecast(
        self, observed: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], previous: Sequence[torch.Tensor],
        valid: torch.Tensor, k: float, gap: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`measure` against ``reference`` extrapolated ``k`` gaps past it from
        ``previous`` (``gap`` steps before it), where the change was steady
        (``probe_forecast``, :func:`adacorr_compile.acm.forecast_reference`)."""
        n = len(observed)
        # built on the device by a fill, not copied from the host: no synchronisation
        params = torch.stack([torch.full((), v, dtype=torch.float32, device=valid.device)
                              for v in (k, gap, self.config.forecast_max_change)])
        score, lam, host = self._call("measure_forecast", self._measure_forecast, n,
                                      [*observed, *reference, *previous, valid, params])
        return score, lam, host

    def measure_group(
        self, observed: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], valid: torch.Tensor,
        group: DecisionGroup, shared: StepSignals | None, previous: Sequence[torch.Tensor] | None = None,
        k: float = 0.0, gap: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`measure` (``previous`` given: :meth:`measure_forecast`) on the ranks of a
        decision group: this rank's partial sums, the cache-valid flag and the slope gates
        waiting in ``shared`` packed into one vector, one SUM all-reduce, then the score,
        lambda and the host vector from the totals: the same on every rank."""
        n = len(observed)
        if previous is None:
            (partials,) = self._call("partials", self._partials, n, [*observed, *reference])
            parts = [partials]
        else:
            params = torch.stack([torch.full((), v, dtype=torch.float32, device=valid.device) for v in (k, gap)])
            parts = list(self._call("partials_forecast", self._partials_forecast, n,
                                    [*observed, *reference, *previous, params]))
        gates = shared.take_pending_gates() if shared is not None else []
        local = [*parts, (~valid.reshape(())).to(torch.float32), *(c.gate_sums for c in gates)]  # type: ignore[misc]
        total = group.all_reduce(torch.cat([t.reshape(-1).to(torch.float32) for t in local]))
        sizes = [t.numel() for t in local]
        pieces = list(total.split(sizes))
        cfg = self.config
        for cache, sums in zip(gates, pieces[len(parts) + 1:]):
            cache.settle_gate(sums, cfg.forecast_max_change)
        partials = pieces[0].reshape(parts[0].shape)
        if previous is not None:  # the forecast where the whole sequence changed steadily
            steady = acm.steady_from_sums(pieces[2], gap, cfg.forecast_max_change)
            partials = torch.where(steady, pieces[1].reshape(parts[1].shape), partials)
        score, lam = rstep.measure_from_partials(cfg.score, partials, cfg.spatial_weight, cfg.gamma,
                                                 cfg.decision == "sample")
        valid_all = pieces[len(parts)].reshape(()) < 0.5
        flags = torch.stack([valid_all.to(torch.float32), torch.isfinite(score).all().to(torch.float32)])
        return score, lam, torch.cat([lam.reshape(-1).to(torch.float32), flags])

    def settle_gates(self, group: DecisionGroup, shared: StepSignals) -> None:
        """The slope gates still waiting in ``shared``, settled by an all-reduce of their own
        (a reuse came before any measure of the step: not the usual order)."""
        gates = shared.take_pending_gates()
        if gates:
            total = group.all_reduce(torch.cat([c.gate_sums.reshape(-1).to(torch.float32) for c in gates]))  # type: ignore[union-attr]
            for cache, sums in zip(gates, total.split([c.gate_sums.numel() for c in gates])):  # type: ignore[union-attr]
                cache.settle_gate(sums, self.config.forecast_max_change)

    def refresh(
        self, fresh: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(residuals ``fresh - inputs``, 0-d bool: all residuals finite)."""
        out = self._call("refresh", self._refresh, len(fresh), [*fresh, *inputs])
        return list(out[:-1]), out[-1]

    def _call(self, name: str, fn: Callable[..., Any], n: int, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if self.config.lowering == "eager" or torch.is_grad_enabled():
            return fn(n, *tensors)
        key = (name, n, _signature(tensors))
        compiled = self._fns.get(key)
        if compiled is None:
            # traced and compiled at run time, so under Dynamo's compile lock: FX tracing
            # patches torch.nn.Module for its duration, which a Dynamo compile running in
            # another thread would otherwise see (and build broken guards on)
            with _compiling_at_run_time():
                compiled = self._fns.get(key)
                if compiled is None:
                    compiled = self._for_new_shape(name, fn, n, tensors)
                    self._fns[key] = compiled
        return tuple(compiled(*tensors))

    def _for_new_shape(self, name: str, fn: Callable[..., Any], n: int, tensors: list[torch.Tensor]) -> Callable[..., Any]:
        """A kernel for a signature met for the first time: the symbolic one of its kind
        if its guards hold, a symbolic one compiled now if the function has met another
        shape of the same kind before, else one for this exact signature."""
        kind = (name, n, tuple((t.dim(), t.dtype, t.device) for t in tensors))
        for shape_env, fakes, compiled in self._dynamic.get(kind, ()):
            if _guards_hold(shape_env, fakes, tensors):
                return compiled
        seen_kind = any(k[0] == name and k[1] == n and _kind(k[2]) == kind[2] for k in self._fns)
        if seen_kind and len(self._dynamic.get(kind, ())) < 2:
            entry = self._compile_dynamic(name, fn, n, tensors)
            if entry is not None:
                self._dynamic.setdefault(kind, []).append(entry)
                if _guards_hold(entry[0], entry[1], tensors):
                    return entry[2]
        return self._compile(name, fn, n, tensors)

    def _compile_dynamic(self, name: str, fn: Callable[..., Any], n: int, tensors: list[torch.Tensor]) -> tuple[Any, list[Any], Callable[..., Any]] | None:
        from torch.fx.experimental.proxy_tensor import make_fx

        from ..compilers import compile_graph, without_cuda_graphs

        try:
            examples = [t.contiguous() for t in tensors]
            gm = make_fx(lambda *ts: fn(n, *ts), tracing_mode="symbolic")(*examples)
            fakes = [node.meta["val"] for node in gm.graph.nodes if node.op == "placeholder"]
            shape_env = next(f.fake_mode.shape_env for f in fakes if hasattr(f, "fake_mode"))
            compiled = compile_graph(gm, fakes, without_cuda_graphs(self.config.replace(lowering="inductor")), f"region {name} (any size)")
        except Exception as exc:  # noqa: BLE001 - a kernel per shape then, as before
            logger.info("adacorr: region %s math not compiled for symbolic sizes (%s: %s); one kernel per shape",
                        name, type(exc).__name__, exc)
            return None
        self.compiled_kernels += 1
        logger.debug("adacorr: compiled region %s math for symbolic sizes", name)
        return shape_env, fakes, compiled

    def _compile(self, name: str, fn: Callable[..., Any], n: int, tensors: list[torch.Tensor]) -> Callable[..., Any]:
        from torch.fx.experimental.proxy_tensor import make_fx

        from ..compilers import compile_graph, without_cuda_graphs

        try:
            # compiled for contiguous inputs, as every compiled part (its call makes them so)
            examples = [t.contiguous() for t in tensors]
            gm = make_fx(lambda *ts: fn(n, *ts), tracing_mode="real")(*examples)
            compiled = compile_graph(gm, examples, without_cuda_graphs(self.config.replace(lowering="inductor")), f"region {name}")
        except Exception as exc:  # never worse than eager: the math is the same
            logger.warning("adacorr: could not compile the region %s math (%s: %s); running it eagerly",
                           name, type(exc).__name__, exc)
            return lambda *ts: fn(n, *ts)
        self.compiled_kernels += 1
        logger.debug("adacorr: compiled region %s math for %d tensors of shapes %s", name, len(tensors),
                     [tuple(t.shape) for t in tensors])
        return compiled
