"""engine: the compiled model, its warm-up, and generation for groups of requests (no Ray here).

:class:`Engine` loads a reference model, compiles its transformer (``backend="adacorr"`` with
the service's options, or plain ``"inductor"`` for comparison), warms it up, and answers a list
of validated requests (:class:`~adacorr_compile.serve.schema.GenerateRequest`) with one
:class:`Outcome` each. Which requests share one sampling loop is decided in one place,
:func:`group_requests`: today requests with the same steps, size, guidance and options share
one generation when the backend's options keep every row of a batch equal to its solo run
(:func:`batch_exactness`), otherwise each request runs alone. When per-request caches land
(one generation per batch row), only that function changes.

Shapes: each served size is its own static shape (a bucket, compiled at warm-up); the batch
dimension is dynamic (Dynamo's automatic dynamic shapes from the second batch size on). The
warm-up runs every batch the service can form (1 to ``max_rows`` images, then 1 again), long
enough for reuses to happen, so that the runtime's fused kernels are compiled too and no
request waits for a compile (``compiles`` counts both). The step count changes no shape.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from ..config import AdaCorrConfig
from .schema import GenerateRequest, Limits

logger = logging.getLogger("adacorr_compile.serve")

# options under which each row of a batched generation equals its solo run (float32 round-off),
# checked by tests/test_serve.py: per-sample decisions, each region deciding from its own rows'
# scores, reuses returning the cache as stored. The service's defaults.
BATCH_EXACT_OPTIONS: dict[str, Any] = {"decision": "sample", "scope": "block", "forecast": "none"}
BACKENDS = ("adacorr", "inductor")


def batch_exactness(backend: str, options: Mapping[str, Any]) -> str | None:
    """None when a batched generation's rows equal their solo runs under these options, else
    why not (measured on the reference DiT, tests/test_serve.py and the report of issue 30)."""
    if backend != "adacorr":
        return None  # no cache: every row is computed on its own
    cfg = AdaCorrConfig.from_options(dict(options))
    if cfg.policy == "never":
        return None
    reasons = []
    if cfg.decision != "sample":
        reasons.append("decision='batch' takes one decision for all rows")
    if cfg.scope != "block":
        reasons.append("scope='step' shares the probe's reference and the span caches across the batch")
    if cfg.forecast != "none":
        reasons.append("forecast='linear' extrapolates from compute steps shared by the batch")
    return "; ".join(reasons) or None


def group_requests(requests: Sequence[GenerateRequest], batch_exact: bool, max_rows: int) -> list[list[int]]:
    """The batching layer: indices of ``requests`` grouped into generations, in arrival order.
    With ``batch_exact`` requests of one :meth:`~GenerateRequest.share_key` share a generation
    (at most ``max_rows`` images), otherwise every request is a generation of its own."""
    if not batch_exact:
        return [[i] for i in range(len(requests))]
    groups: dict[Any, list[list[int]]] = {}
    order: list[list[int]] = []
    for i, req in enumerate(requests):
        bins = groups.setdefault(req.share_key(), [])
        if not bins or sum(requests[j].images for j in bins[-1]) + req.images > max_rows:
            bins.append([])
            order.append(bins[-1])
        bins[-1].append(i)
    return order


@dataclass
class Outcome:
    """One request's answer: the final samples ``[n, C, H, W]`` (float32, before clamping) and
    its caching statistics, or the error that stopped its generation."""

    request: GenerateRequest
    samples: torch.Tensor | None = None
    skipped_share: float | None = None  # share of block evaluations reused (of its generation)
    mean_lambda: float | None = None  # mean lambda over its own rows
    batch_requests: int = 1  # requests in its generation
    seconds: float = 0.0
    compiles: int = 0  # graphs compiled during its generation (0 after warm-up), counted on its first request
    error: str | None = None


@dataclass
class Family:
    """How to load, compile and sample one reference model."""

    name: str
    load: Callable[[], torch.nn.Module]  # the whole model the sampler calls
    channels: int
    native_size: int
    null_class: int
    guidance: float
    loop: Callable[..., torch.Tensor] = field(repr=False)


def _dit_loop(model: Any, x: torch.Tensor, labels: torch.Tensor, steps: int, guidance: float, null: int) -> torch.Tensor:
    """DDIM (eta=0) with batched classifier-free guidance, as lab.sampling.sample_dit steps."""
    from ..lab.sampling import make_dit_scheduler

    sched = make_dit_scheduler()
    sched.set_timesteps(steps)
    x = x * sched.init_noise_sigma
    y = torch.cat([labels, torch.full_like(labels, null)])
    for t in sched.timesteps:
        t_batch = torch.full((y.shape[0],), int(t), dtype=torch.long)
        out = model(torch.cat([x, x]), timestep=t_batch, class_labels=y).sample
        cond, uncond = out[:, : x.shape[1]].float().chunk(2)
        x = sched.step(uncond + guidance * (cond - uncond), t, x).prev_sample
    return x


def _flux_loop(model: Any, x: torch.Tensor, labels: torch.Tensor, steps: int, guidance: float, null: int) -> torch.Tensor:
    """Euler rectified flow (t: 1 -> 0) with batched CFG, as lab.sampling.sample_flux steps."""
    from ..lab.sampling import flux_timesteps

    ts = flux_timesteps(steps)
    y = torch.cat([labels, torch.full_like(labels, null)])
    for i in range(steps):
        t, t_next = float(ts[i]), float(ts[i + 1])
        v_cond, v_uncond = model(torch.cat([x, x]), timestep=torch.full((y.shape[0],), t), class_labels=y).float().chunk(2)
        x = x + (t_next - t) * (v_uncond + guidance * (v_cond - v_uncond))
    return x


def _families() -> dict[str, Family]:
    from ..lab.reference import NUM_CLASSES, load_reference_dit, load_reference_flux
    from ..lab.sampling import DEFAULT_GUIDANCE

    return {
        "reference-dit": Family("reference-dit", load_reference_dit, 3, 32, NUM_CLASSES, DEFAULT_GUIDANCE["dit"], _dit_loop),
        "reference-flux": Family("reference-flux", load_reference_flux, 3, 32, NUM_CLASSES, DEFAULT_GUIDANCE["flux"],
                                 _flux_loop),
    }


MODELS = ("reference-dit", "reference-flux")


def default_limits(model: str, **changes: Any) -> Limits:
    """The service's :class:`Limits` for a reference model (its classes, size and guidance)."""
    if model not in MODELS:
        raise ValueError(f"model {model!r}: expected one of {', '.join(MODELS)}")
    guidance = 1.5 if model == "reference-dit" else 4.0
    return Limits(**{"num_classes": 10, "sizes": (32,), "default_guidance": guidance, **changes})


def dynamo_compiles() -> int:
    """Graphs Dynamo has compiled in this process (its ``unique_graphs`` counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def kernels_compiled(compiled: Any) -> int:
    """Kernels the adacorr runtime compiled at run time for ``compiled`` (its regions' fused
    score / reuse / refresh math, compiled for each new signature; a Dynamo counter misses them)."""
    from ..api import _model_state

    try:
        graphs = _model_state(compiled).graphs  # every graph Dynamo compiled for it (static and dynamic batch)
    except TypeError:  # not an adacorr model
        return 0
    maths = {id(r.math): r.math for g in graphs for r in g.regions}
    return sum(int(getattr(m, "compiled_kernels", 0)) for m in maths.values())


def _request_lambda(state: Any, rows: list[int]) -> float | None:
    """Mean lambda of ``rows`` over the generation's measured calls (per-sample lambdas)."""
    total, count = 0.0, 0
    for region in state.stats.values():
        for lam in region.lam_trace:
            if lam.ndim == 1 and lam.numel() > max(rows):
                vals = lam.float()[rows]
            elif lam.numel() == 1:
                vals = lam.float().reshape(1)
            else:
                continue
            if torch.isfinite(vals).all():
                total += float(vals.sum())
                count += vals.numel()
    return total / count if count else None


def _noise(req: GenerateRequest, channels: int) -> torch.Tensor:
    """The request's initial noise, drawn on the CPU from its seed alone (so it does not depend
    on the batch it lands in)."""
    gen = torch.Generator(device="cpu").manual_seed(req.seed)
    return torch.randn((req.images, channels, req.size, req.size), generator=gen, dtype=torch.float32)


class Engine:
    """A reference model compiled for serving: :meth:`warmup` once, then :meth:`generate`.

    One generation runs at a time (a lock); each runs in its own private
    ``adacorr_compile.generation`` so that nothing of one request's caches is seen by another,
    and a failing generation leaves no state behind."""

    def __init__(self, model: str = "reference-dit", backend: str = "adacorr", options: Mapping[str, Any] | None = None,
                 limits: Limits | None = None, max_rows: int = 8, batching: bool = True) -> None:
        from ..lab.methods import block_modules, transformer_of, with_transformer

        families = _families()
        if model not in families:
            raise ValueError(f"model {model!r}: expected one of {', '.join(families)}")
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
        self.family = families[model]
        self.backend = backend
        self.limits = limits or default_limits(model)
        self.max_rows = int(max_rows)
        self.options = dict(BATCH_EXACT_OPTIONS if options is None else options) if backend == "adacorr" else {}
        if backend == "adacorr":
            AdaCorrConfig.from_options(self.options)  # a bad option: ValueError naming it, before any load
        self.inexact = batch_exactness(backend, self.options) if batching else "batching turned off"
        if self.inexact:
            logger.warning("serve: one generation per request (batched rows would not equal solo runs: %s)", self.inexact)
        wrapper = self.family.load()
        self.blocks = len(block_modules(transformer_of(wrapper)))  # block evaluations per row and step
        kwargs = {"options": self.options} if backend == "adacorr" else {}
        self.compiled = torch.compile(transformer_of(wrapper), backend=backend, **kwargs)
        self.model = with_transformer(wrapper, self.compiled)
        self._lock = threading.Lock()
        self.warmup_report: dict[str, Any] | None = None

    @property
    def batch_exact(self) -> bool:
        return self.inexact is None

    def compiles(self) -> int:
        """Graphs (Dynamo) and run-time kernels (adacorr's region math) compiled so far."""
        return dynamo_compiles() + (kernels_compiled(self.compiled) if self.backend == "adacorr" else 0)

    def warmup(self, steps: int | None = None, batches: Sequence[int] | None = None) -> dict[str, Any]:
        """Compile and run every served size with every batch the service can form (1 to
        ``max_rows`` images; static size, the batch turns dynamic at the second), ``steps``
        steps each (default: the default step count, so that reuses and partial reuses run
        too: the runtime compiles their kernels on first use), so that a request never waits
        for a compile; returns seconds and graphs / kernels compiled."""
        steps = steps or self.limits.default_steps
        # the first batch again at the end: once the batch is dynamic, Dynamo serves it with the
        # dynamic graph, whose regions compile their kernels for that shape on first use
        batches = list(batches or [*range(1, self.max_rows + 1), 1])
        t0, c0 = time.perf_counter(), self.compiles()
        for size in self.limits.sizes:
            for n in batches:
                reqs = [GenerateRequest((k % self.limits.num_classes,), seed=k, steps=steps, size=size,
                                        guidance=self.limits.default_guidance, request_id=f"warmup-{size}-{n}-{k}")
                        for k in range(n)]
                for out in self.generate(reqs, group=False):
                    if out.error:
                        raise RuntimeError(f"warm-up failed at size {size}, {n} request(s): {out.error}")
        self.warmup_report = {"seconds": time.perf_counter() - t0, "compiles": self.compiles() - c0,
                              "sizes": list(self.limits.sizes), "batch": "dynamic", "batches": list(batches), "steps": steps}
        logger.info("serve: warm-up of %s (backend=%s) took %.1f s, %d graphs compiled", self.family.name, self.backend,
                    self.warmup_report["seconds"], self.warmup_report["compiles"])
        return self.warmup_report

    def check(self, req: GenerateRequest) -> None:
        """Refuse what this engine cannot honour (before queuing): per-request options without caching."""
        from .schema import InvalidRequest

        if req.options and self.backend != "adacorr":
            raise InvalidRequest("options", f"this service runs backend={self.backend!r} (no caching options)")

    def generate(self, requests: Sequence[GenerateRequest], group: bool = True) -> list[Outcome]:
        """One :class:`Outcome` per request, in order; a generation that fails answers its own
        requests with the error and the others are served. ``group=False``: the requests
        given form one generation (warm-up)."""
        groups = group_requests(requests, self.batch_exact, self.max_rows) if group else [list(range(len(requests)))]
        outcomes: list[Outcome | None] = [None] * len(requests)
        for idx in groups:
            members = [requests[i] for i in idx]
            try:
                results = self._run_group(members)
            except Exception as exc:  # noqa: BLE001 - one generation's failure must not touch the others
                logger.exception("serve: generation of %s failed", [r.request_id for r in members])
                results = [Outcome(r, error=f"{type(exc).__name__}: {exc}", batch_requests=len(members)) for r in members]
            for i, res in zip(idx, results):
                outcomes[i] = res
        return [o for o in outcomes if o is not None]

    def _enter_generation(self, stack: contextlib.ExitStack, req: GenerateRequest) -> Any:
        """Enter the request's options (swapped in at run time) and a private generation on
        ``stack``; returns the generation's state (None without caching)."""
        from ..api import generation
        from ..calibrate import swapped_config

        if self.backend != "adacorr":
            return None
        if req.options:
            stack.enter_context(swapped_config(self.compiled, dict(req.options)))
        return stack.enter_context(generation(self.compiled, num_steps=req.steps))

    def _run_group(self, reqs: list[GenerateRequest]) -> list[Outcome]:
        first = reqs[0]
        x = torch.cat([_noise(r, self.family.channels) for r in reqs])
        labels = torch.tensor([c for r in reqs for c in r.class_labels], dtype=torch.long)
        with self._lock, torch.no_grad(), contextlib.ExitStack() as stack:
            t0, c0 = time.perf_counter(), self.compiles()
            state = self._enter_generation(stack, first)
            out = self.family.loop(self.model, x, labels, first.steps, first.guidance, self.family.null_class)
            seconds, compiles = time.perf_counter() - t0, self.compiles() - c0
            skipped = _skipped_share(self.compiled) if state is not None else None
            lambdas = _split_lambda(state, reqs, x.shape[0]) if state is not None else [None] * len(reqs)
        results, offset = [], 0
        for k, (r, lam) in enumerate(zip(reqs, lambdas)):
            results.append(Outcome(r, out[offset: offset + r.images].clone(), skipped, lam, len(reqs), seconds,
                                   compiles if k == 0 else 0))
            offset += r.images
        return results

    def fallbacks(self) -> list[str]:
        """Reasons of graphs the backend compiled without caching (empty for plain inductor)."""
        if self.backend != "adacorr":
            return []
        from ..api import stats

        return list(stats(self.compiled)["fallbacks"])


def _skipped_share(compiled: Any) -> float | None:
    """Share of the generation's block evaluations (regions x calls x rows) that reused."""
    from ..api import stats

    trace = [v for region in stats(compiled)["regions"] for v in region["reuse_trace"]]
    return sum(trace) / len(trace) if trace else None


def _split_lambda(state: Any, reqs: list[GenerateRequest], rows: int) -> list[float | None]:
    """Each request's mean lambda over its own rows (conditional and unconditional halves)."""
    out, offset = [], 0
    for r in reqs:
        mine = list(range(offset, offset + r.images))
        out.append(_request_lambda(state, mine + [rows + i for i in mine]))
        offset += r.images
    return out


def response_body(outcome: Outcome, model: str, backend: str) -> dict[str, Any]:
    """The JSON answer of a served request: PNG images (base64) and/or the final samples
    (``latents``: little-endian float32, base64, with their shape), and its statistics."""
    import base64

    req, samples = outcome.request, outcome.samples
    assert samples is not None
    body: dict[str, Any] = {
        "request_id": req.request_id, "model": model, "backend": backend, "class_labels": list(req.class_labels),
        "seed": req.seed, "steps": req.steps, "guidance": req.guidance, "size": req.size, "options": dict(req.options),
        "stats": {"skipped_share": outcome.skipped_share, "skipped_share_of": "generation", "mean_lambda": outcome.mean_lambda,
                  "batch_requests": outcome.batch_requests, "generation_seconds": round(outcome.seconds, 4),
                  "compiles": outcome.compiles},
    }
    if req.output in ("png", "both"):
        body["images"] = [base64.b64encode(png_bytes(img)).decode("ascii") for img in samples]
    if req.output in ("latents", "both"):
        data = samples.detach().to(torch.float32).contiguous().numpy().astype("<f4").tobytes()
        body["latents"] = {"dtype": "float32", "shape": list(samples.shape), "data": base64.b64encode(data).decode("ascii")}
    return body


def png_bytes(image: torch.Tensor) -> bytes:
    """One image ``[C, H, W]`` in [-1, 1] as PNG bytes (RGB, or grey for one channel)."""
    import io

    from PIL import Image

    pixels = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buf, format="PNG")
    return buf.getvalue()
