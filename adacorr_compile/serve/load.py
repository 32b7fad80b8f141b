"""load: a bounded, seeded open-loop (Poisson) load generator for the service (stdlib HTTP).

:func:`poisson_load` sends ``n`` requests whose arrival gaps are exponential with mean
``1 / rate`` (seeded), each on its own thread, and returns one :class:`Sample` per request;
:func:`summarize` turns them into throughput, latency percentiles, errors and skipped share.
Used by ``benchmarks/serve_load.py`` and the slow load test.
"""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class Sample:
    status: int  # HTTP status, 0: no answer (timeout, connection error)
    seconds: float
    skipped_share: float | None = None
    batch_requests: int | None = None
    error: str | None = None


def post_json(url: str, body: dict[str, Any], timeout: float = 60.0, headers: dict[str, str] | None = None
              ) -> tuple[int, dict[str, Any], dict[str, str]]:
    """POST ``body`` as JSON; returns (status, JSON answer, headers); an HTTP error is a status, not an exception."""
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}"), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            doc = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            doc = {"raw": raw.decode("utf-8", "replace")[:200]}
        return exc.code, doc, dict(exc.headers or {})


def _one(url: str, body: dict[str, Any], timeout: float, out: list[Sample], k: int) -> None:
    t0 = time.perf_counter()
    try:
        status, doc, _ = post_json(url, body, timeout)
    except Exception as exc:  # noqa: BLE001 - a lost request is a measured error, not a crash of the load test
        out[k] = Sample(0, time.perf_counter() - t0, error=f"{type(exc).__name__}: {exc}")
        return
    stats = doc.get("stats", {}) if status == 200 else {}
    out[k] = Sample(status, time.perf_counter() - t0, stats.get("skipped_share"), stats.get("batch_requests"),
                    None if status == 200 else str(doc)[:200])


def poisson_load(url: str, rate: float, n: int, make_body: Callable[[int], dict[str, Any]], seed: int = 0,
                 timeout: float = 120.0) -> tuple[list[Sample], float]:
    """``n`` requests to ``url`` at Poisson arrivals of ``rate`` per second (seeded); request
    ``k``'s body is ``make_body(k)``. Returns the samples and the wall time until the last answer."""
    rng = random.Random(seed)
    out: list[Sample] = [Sample(0, 0.0, error="not sent")] * n
    threads = []
    t0 = time.perf_counter()
    due = 0.0
    for k in range(n):
        due += rng.expovariate(rate)
        time.sleep(max(0.0, t0 + due - time.perf_counter()))
        th = threading.Thread(target=_one, args=(url, make_body(k), timeout, out, k), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join(timeout + 5)
    return out, time.perf_counter() - t0


def percentile(values: list[float], q: float) -> float:
    """The ``q`` percentile (0-100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(samples: list[Sample], wall: float) -> dict[str, Any]:
    """Throughput (answered 200 per second of wall time), latency p50/p95/p99 (s), errors, skipped share."""
    ok = [s for s in samples if s.status == 200]
    lat = [s.seconds for s in ok]
    skipped = [s.skipped_share for s in ok if s.skipped_share is not None]
    batches = [s.batch_requests for s in ok if s.batch_requests is not None]
    return {
        "requests": len(samples), "ok": len(ok), "errors": len(samples) - len(ok),
        "throughput_rps": len(ok) / wall if wall > 0 else 0.0,
        "p50_s": percentile(lat, 50), "p95_s": percentile(lat, 95), "p99_s": percentile(lat, 99),
        "skipped_share": sum(skipped) / len(skipped) if skipped else None,
        "mean_batch": sum(batches) / len(batches) if batches else None,
        "first_error": next((s.error for s in samples if s.status != 200), None),
    }
