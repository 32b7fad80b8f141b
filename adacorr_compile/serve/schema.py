"""schema: the service's request format and its validation, as pure functions.

A request body is one JSON object::

    {"class_labels": [3, 7], "seed": 0, "steps": 20, "guidance": 1.5, "size": 32,
     "output": "png", "options": {"reuse_threshold": 0.1}}

Only ``class_labels`` is required. :func:`parse_request` turns the raw body into a
:class:`GenerateRequest` or raises :class:`InvalidRequest` naming the field, its problem and
the HTTP status (413: body too large, 400: not a JSON object, 422: a field). It runs before
anything touches the model: nothing here imports torch.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

OUTPUTS = ("png", "latents", "both")
FIELDS = ("class_labels", "seed", "steps", "guidance", "size", "output", "options")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")

# options a request may set for itself: decision values that the compiled model reads at every
# call (no recompile; adacorr_compile.calibrate.RUNTIME_FIELDS) and that keep a batched row equal
# to its solo run. name -> (type, lowest, highest)
SAFE_OPTIONS: dict[str, tuple[type, float, float]] = {
    "reuse_threshold": (float, 0.0, 1.0),
    "warmup_steps": (int, 0, 1000),
    "final_steps": (int, 0, 1000),
    "max_consecutive_reuses": (int, 0, 16),
}


class InvalidRequest(ValueError):
    """A request the service refuses: ``status`` (4xx), the ``field`` at fault, a message."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status

    def to_json(self) -> dict[str, Any]:
        return {"error": "invalid_request", "field": self.field, "detail": self.message}


@dataclass(frozen=True)
class Limits:
    """What the service accepts (the model's classes and sizes, the operator's caps)."""

    num_classes: int = 10
    sizes: tuple[int, ...] = (32,)
    max_images: int = 4
    max_steps: int = 50
    default_steps: int = 20
    default_guidance: float = 1.5
    max_guidance: float = 20.0
    max_body_bytes: int = 4096
    max_seed: int = 2**32 - 1
    safe_options: tuple[str, ...] = tuple(SAFE_OPTIONS)

    def __post_init__(self) -> None:
        if not self.sizes or any(not isinstance(s, int) or s < 1 for s in self.sizes):
            raise ValueError(f"Limits.sizes: expected positive ints, got {self.sizes!r}")
        if not 1 <= self.default_steps <= self.max_steps:
            raise ValueError(f"Limits.default_steps: expected 1..max_steps ({self.max_steps}), got {self.default_steps}")
        if not 0 <= self.default_guidance <= self.max_guidance:
            raise ValueError(f"Limits.default_guidance: expected 0..{self.max_guidance}, got {self.default_guidance}")
        unknown = sorted(set(self.safe_options) - set(SAFE_OPTIONS))
        if unknown:
            raise ValueError(f"Limits.safe_options: {unknown} cannot be set per request; allowed: {sorted(SAFE_OPTIONS)}")


@dataclass(frozen=True)
class GenerateRequest:
    """One validated request. ``options`` as sorted ``(name, value)`` pairs (hashable)."""

    class_labels: tuple[int, ...]
    seed: int = 0
    steps: int = 20
    guidance: float = 1.5
    size: int = 32
    output: str = "png"
    options: tuple[tuple[str, Any], ...] = ()
    request_id: str = field(default="", compare=False)

    @property
    def images(self) -> int:
        return len(self.class_labels)

    def share_key(self) -> tuple[Any, ...]:
        """What requests must have in common to share one generation (one batched sampling loop)."""
        return (self.steps, self.size, self.guidance, self.options)


def _reject_constant(name: str) -> float:
    return float(name)  # NaN / Infinity parse as floats; the field's check names them


def decode_body(body: bytes, limits: Limits) -> dict[str, Any]:
    """The JSON object in ``body``; 413 when it is larger than ``limits.max_body_bytes``,
    400 when it is not UTF-8 JSON or not an object."""
    if len(body) > limits.max_body_bytes:
        raise InvalidRequest("body", f"{len(body)} bytes; at most {limits.max_body_bytes} are accepted", 413)
    try:
        doc = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest("body", f"not valid JSON ({exc})", 400) from None
    if not isinstance(doc, dict):
        raise InvalidRequest("body", f"expected a JSON object, got {type(doc).__name__}", 400)
    return doc


def _int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(name, f"expected an integer, got {type(value).__name__} {value!r}")
    if not lo <= value <= hi:
        raise InvalidRequest(name, f"{value} is out of range; allowed {lo}..{hi}")
    return value


def _float(name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(name, f"expected a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidRequest(name, f"{value} is not a finite number")
    if not lo <= value <= hi:
        raise InvalidRequest(name, f"{value} is out of range; allowed {lo}..{hi}")
    return value


def _labels(value: Any, limits: Limits) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise InvalidRequest("class_labels", f"expected a list of integers, got {type(value).__name__}")
    if not 1 <= len(value) <= limits.max_images:
        raise InvalidRequest("class_labels", f"{len(value)} labels; allowed 1..{limits.max_images} (one image each)")
    return tuple(_int(f"class_labels[{i}]", v, 0, limits.num_classes - 1) for i, v in enumerate(value))


def _options(value: Any, limits: Limits) -> tuple[tuple[str, Any], ...]:
    if not isinstance(value, dict):
        raise InvalidRequest("options", f"expected an object of options, got {type(value).__name__}")
    out = []
    for key in sorted(value):
        if key not in limits.safe_options:
            raise InvalidRequest(f"options.{key}", f"not an option a request may set; allowed: {', '.join(limits.safe_options)}")
        kind, lo, hi = SAFE_OPTIONS[key]
        check = _int if kind is int else _float
        out.append((key, check(f"options.{key}", value[key], lo, hi)))
    return tuple(out)


def validate_request(doc: Mapping[str, Any], limits: Limits, request_id: str = "") -> GenerateRequest:
    """A :class:`GenerateRequest` from a decoded JSON object, or :class:`InvalidRequest`
    (422) naming the first field at fault (unknown fields too)."""
    unknown = sorted(set(doc) - set(FIELDS))
    if unknown:
        raise InvalidRequest(unknown[0], f"unknown field; allowed: {', '.join(FIELDS)}")
    if "class_labels" not in doc:
        raise InvalidRequest("class_labels", "required (a list of class indices, one image each)")
    size = _int("size", doc.get("size", limits.sizes[0]), 1, max(limits.sizes))
    if size not in limits.sizes:
        raise InvalidRequest("size", f"{size} is not served; allowed: {', '.join(map(str, limits.sizes))}")
    output = doc.get("output", "png")
    if output not in OUTPUTS:
        raise InvalidRequest("output", f"{output!r}; allowed: {', '.join(OUTPUTS)}")
    return GenerateRequest(
        class_labels=_labels(doc["class_labels"], limits),
        seed=_int("seed", doc.get("seed", 0), 0, limits.max_seed),
        steps=_int("steps", doc.get("steps", limits.default_steps), 1, limits.max_steps),
        guidance=_float("guidance", doc.get("guidance", limits.default_guidance), 0.0, limits.max_guidance),
        size=size,
        output=output,
        options=_options(doc.get("options", {}), limits),
        request_id=request_id,
    )


def parse_request(body: bytes, limits: Limits, request_id: str = "") -> GenerateRequest:
    """Raw body -> :class:`GenerateRequest`: :func:`decode_body`, then :func:`validate_request`."""
    return validate_request(decode_body(body, limits), limits, request_id)


def clean_request_id(header: str | None, fallback: str) -> str:
    """The client's ``X-Request-Id`` if it is 1-64 characters of ``[A-Za-z0-9._:-]``, else ``fallback``."""
    return header if header and REQUEST_ID.match(header) else fallback
