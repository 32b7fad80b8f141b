"""config: what one service runs (model, backend, options, limits, batching, replicas); no Ray here."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .engine import BACKENDS, BATCH_EXACT_OPTIONS, MODELS, default_limits
from .schema import Limits


@dataclass(frozen=True)
class ServeConfig:
    """A service: ``model`` compiled with ``backend`` and ``options`` (None: the service's
    batch-exact defaults, :data:`~adacorr_compile.serve.engine.BATCH_EXACT_OPTIONS`), the
    request ``limits``, ``@serve.batch`` settings (``max_batch_size`` requests waiting at most
    ``batch_wait_s``; ``max_rows`` images per generation), ``replicas`` of ``replica_cpus``
    CPUs each running torch on ``threads`` threads, and ``warmup_steps`` per warm-up generation."""

    model: str = "reference-dit"
    backend: str = "adacorr"
    options: Mapping[str, Any] | None = None
    limits: Limits = field(default_factory=Limits)
    max_batch_size: int = 8
    batch_wait_s: float = 0.05
    max_rows: int = 8
    replicas: int = 1
    replica_cpus: float = 1.0
    threads: int = 1
    warmup_steps: int = 4
    batching: bool = True

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model {self.model!r}: expected one of {', '.join(MODELS)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r}: expected one of {', '.join(BACKENDS)}")
        for name in ("max_batch_size", "max_rows", "replicas", "threads", "warmup_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {getattr(self, name)!r}")
        if self.max_rows < self.limits.max_images:
            raise ValueError(f"max_rows ({self.max_rows}) must be at least limits.max_images ({self.limits.max_images})")
        if not 0 <= self.batch_wait_s <= 10:
            raise ValueError(f"batch_wait_s: expected 0..10 seconds, got {self.batch_wait_s!r}")
        if self.backend == "adacorr":
            from ..config import AdaCorrConfig

            AdaCorrConfig.from_options(dict(self.resolved_options()))  # a bad option names itself here

    def resolved_options(self) -> dict[str, Any]:
        """The backend options the replicas compile with."""
        if self.backend != "adacorr":
            return {}
        return dict(BATCH_EXACT_OPTIONS if self.options is None else self.options)

    def describe(self) -> dict[str, Any]:
        """JSON-safe summary (``GET /v1/info``, logs)."""
        doc = dataclasses.asdict(self)
        doc["options"] = self.resolved_options()
        doc["limits"] = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.limits).items()}
        return doc


def make_config(model: str = "reference-dit", backend: str = "adacorr", options_file: str | Path | None = None,
                options: Mapping[str, Any] | None = None, limits: Mapping[str, Any] | None = None,
                **settings: Any) -> ServeConfig:
    """A :class:`ServeConfig` from what the command line gives: options read from
    ``options_file`` (``adacorr_compile.load_options``: a calibration result or a JSON object of
    options) over the service's defaults, then ``options`` (flags) over them; ``limits``
    overrides the model's default :class:`Limits`."""
    from ..calibration_file import load_options

    merged: dict[str, Any] | None = None
    if options_file is not None or options:
        merged = dict(BATCH_EXACT_OPTIONS)
        if options_file is not None:
            merged.update(load_options(options_file))
        merged.update(options or {})
    return ServeConfig(model=model, backend=backend, options=merged, limits=default_limits(model, **dict(limits or {})),
                       **settings)
