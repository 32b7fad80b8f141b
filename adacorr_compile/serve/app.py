"""app: the Ray Serve deployment (HTTP routes, ``@serve.batch``) and starting / stopping it.

Routes (all JSON except ``/metrics``):

* ``POST /v1/generate``: a request (:mod:`.schema`), answered with PNG images and/or latents;
  a bad request is a 4xx ``{"error": "invalid_request", "field": ..., "detail": ...}``.
* ``GET /healthz``: ``{"status": "ok"}`` once the replica is compiled and warm (503 while it shuts down).
* ``GET /metrics``: Prometheus text (:mod:`.metrics`).
* ``GET /v1/info``: the service's model, backend, options, limits and warm-up report.

A replica compiles and warms up in its constructor, so Ray Serve reports it ready only then.
Requests are validated before they are queued; valid ones are batched by ``@serve.batch`` and
handed to :meth:`Engine.generate <adacorr_compile.serve.engine.Engine.generate>` on one worker
thread (the event loop keeps answering health checks and scrapes while a batch runs).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .config import ServeConfig
from .engine import Engine, Outcome, response_body
from .logs import configure
from .metrics import CONTENT_TYPE, ServiceMetrics
from .schema import GenerateRequest, InvalidRequest, clean_request_id, parse_request

logger = logging.getLogger("adacorr_compile.serve")
APP_NAME = "adacorr"


class AdaCorrService:
    """One replica: the compiled, warmed-up :class:`Engine`, its metrics and its routes."""

    def __init__(self, config: ServeConfig) -> None:
        import torch

        configure()
        torch.set_num_threads(config.threads)
        self.config = config
        try:
            replica = serve.get_replica_context().replica_tag
        except Exception:  # noqa: BLE001 - outside a Serve replica (a test calling the class directly)
            replica = "local"
        self.metrics = ServiceMetrics(replica=str(replica), model=config.model, backend=config.backend)
        self.metrics.set_ready(False)
        self.engine = Engine(config.model, config.backend, config.resolved_options(), config.limits,
                             config.max_rows, config.batching)
        report = self.engine.warmup(config.warmup_steps)
        self.metrics.compiled("warmup", report["compiles"], report["seconds"])
        self.metrics.set_fallbacks(len(self.engine.fallbacks()))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adacorr-generate")
        self.generate_batch.set_max_batch_size(config.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(config.batch_wait_s)
        self._closing = False
        self.metrics.set_ready(True)
        logger.info("replica ready", extra={"replica": str(replica), "warmup_seconds": round(report["seconds"], 3),
                                            "compiles": report["compiles"], "batching": self.engine.batch_exact,
                                            "batching_off_reason": self.engine.inexact or ""})

    async def __call__(self, request: Request) -> Response:
        path, method = request.url.path, request.method
        prefix = request.scope.get("root_path", "")  # the application's route prefix, when not "/"
        if prefix and path.startswith(prefix):
            path = path[len(prefix):]
        path = path.rstrip("/") or "/"
        routes = {"/v1/generate": ("POST", self._generate), "/healthz": ("GET", self._health),
                  "/metrics": ("GET", self._metrics), "/v1/info": ("GET", self._info)}
        if path not in routes:
            return JSONResponse({"error": "not_found", "field": "path", "detail": f"no route {path}; "
                                 f"routes: {', '.join(routes)}"}, status_code=404)
        allowed, handler = routes[path]
        if method != allowed:
            return JSONResponse({"error": "method_not_allowed", "field": "method",
                                 "detail": f"{path} takes {allowed}, got {method}"}, status_code=405)
        return await handler(request)

    async def _health(self, request: Request) -> Response:
        if self._closing:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return JSONResponse({"status": "ok", "model": self.config.model, "backend": self.config.backend})

    async def _metrics(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def _info(self, request: Request) -> Response:
        return JSONResponse({"config": self.config.describe(), "warmup": self.engine.warmup_report,
                             "batching": self.engine.batch_exact, "batching_off_reason": self.engine.inexact,
                             "fallbacks": self.engine.fallbacks()})

    async def _read(self, request: Request, rid: str) -> GenerateRequest:
        """The validated request, or :class:`InvalidRequest` (nothing of the model touched)."""
        limit = self.config.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise InvalidRequest("body", f"{declared} bytes; at most {limit} are accepted", 413)
        req = parse_request(await request.body(), self.config.limits, rid)
        self.engine.check(req)
        return req

    async def _generate(self, request: Request) -> Response:
        rid = clean_request_id(request.headers.get("x-request-id"), uuid.uuid4().hex)
        t0 = time.perf_counter()
        headers = {"x-request-id": rid}
        try:
            req = await self._read(request, rid)
        except InvalidRequest as exc:
            self.metrics.answered(exc.status)
            logger.info("request refused", extra={"request_id": rid, "status": exc.status, "field": exc.field})
            return JSONResponse({**exc.to_json(), "request_id": rid}, status_code=exc.status, headers=headers)
        if self._closing:
            self.metrics.answered(503)
            return JSONResponse({"error": "shutting_down", "request_id": rid}, status_code=503, headers=headers)
        outcome: Outcome = await self.generate_batch(req)
        seconds = time.perf_counter() - t0
        if outcome.error is not None:
            self.metrics.failed()
            self.metrics.answered(500)
            logger.error("generation failed", extra={"request_id": rid, "status": 500, "error": outcome.error})
            return JSONResponse({"error": "generation_failed", "detail": outcome.error, "request_id": rid},
                                status_code=500, headers=headers)
        self.metrics.generated(outcome, self.engine.blocks)
        self.metrics.compiled("serving", outcome.compiles)
        self.metrics.answered(200, seconds)
        logger.info("request served", extra={"request_id": rid, "status": 200, "seconds": round(seconds, 4),
                                             "batch_requests": outcome.batch_requests, "steps": req.steps,
                                             "skipped_share": outcome.skipped_share, "compiles": outcome.compiles})
        return JSONResponse(response_body(outcome, self.config.model, self.config.backend), headers=headers)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def generate_batch(self, requests: list[GenerateRequest]) -> list[Outcome]:
        """Concurrent valid requests, batched by Ray Serve; grouped into generations by the engine."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.engine.generate, requests)

    def check_health(self) -> None:
        """Ray Serve's periodic health check: the generation thread must be alive."""
        if self._executor._shutdown and not self._closing:  # noqa: SLF001 - no public flag
            raise RuntimeError("the generation thread is gone")

    def __del__(self) -> None:
        """Graceful shutdown (Ray Serve stops routing first): refuse new work, finish the running one."""
        self._closing = True
        executor = getattr(self, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=True)
            logger.info("replica stopped")


def build_app(config: ServeConfig) -> Any:
    """The Ray Serve application of ``config`` (pass it to ``serve.run``)."""
    deployment = serve.deployment(
        name="AdaCorrService",
        num_replicas=config.replicas,
        ray_actor_options={"num_cpus": config.replica_cpus},
        max_ongoing_requests=max(16, 4 * config.max_batch_size),
        graceful_shutdown_wait_loop_s=1.0,
        graceful_shutdown_timeout_s=60.0,
        health_check_period_s=5.0,
    )(AdaCorrService)
    return deployment.bind(config)


def package_root() -> str:
    """The directory holding this ``adacorr_compile`` (so Ray's workers import the same one)."""
    return str(Path(__file__).resolve().parents[2])


def start(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, num_cpus: int | None = None,
          name: str = APP_NAME, route_prefix: str = "/") -> str:
    """Start Ray (locally, unless it is already initialized), Serve's HTTP proxy on
    ``host:port`` (the first call's) and the application ``name`` at ``route_prefix``; returns
    its URL once every replica is compiled and warm."""
    import ray

    if not ray.is_initialized():
        path = os.pathsep.join(p for p in (package_root(), os.environ.get("PYTHONPATH", "")) if p)
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {"PYTHONPATH": path}})
    serve.start(http_options={"host": host, "port": port})
    t0 = time.perf_counter()
    serve.run(build_app(config), name=name, route_prefix=route_prefix)
    url = f"http://{host}:{port}{route_prefix.rstrip('/')}"
    logger.info("service ready", extra={"url": url, "startup_seconds": round(time.perf_counter() - t0, 3),
                                        "model": config.model, "backend": config.backend})
    return url


def stop() -> None:
    """Graceful shutdown: Serve drains and deletes the application, then Ray stops."""
    import ray

    try:
        serve.shutdown()
    finally:
        if ray.is_initialized():
            ray.shutdown()
