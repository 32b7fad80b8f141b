"""Load test of the inference service: adacorr against plain Inductor, Poisson arrivals, local Ray Serve.

    python benchmarks/serve_load.py --rates 1 2 4 --requests 30 --steps 20

Two applications of ``adacorr serve`` run side by side in one local Ray (one replica each, one
torch thread, one CPU reserved each): the reference DiT compiled with ``backend="adacorr"``
(the service's batch-exact options, Inductor lowering) at ``/adacorr`` and with plain
``backend="inductor"`` at ``/inductor``, both warmed up before the clock starts and both with
the same ``@serve.batch`` settings. For each request rate, a seeded open-loop Poisson load of
``--requests`` requests (one image each, classes 0..9, ``--steps`` DDIM steps, CFG 1.5) is sent
to each service in turn (adacorr, inductor, alternating by rate so that both see the same
background load). Reported per service and rate: throughput (answered requests per second of
wall time), latency p50 / p95 / p99 (s, client side), errors (must be 0), the mean share of
block evaluations reused and the mean number of requests per generation. Results go to
``benchmarks/results/serve_load_dit.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
logger = logging.getLogger("adacorr_compile.benchmarks")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from adacorr_compile.serve import app
    from adacorr_compile.serve.config import make_config
    from adacorr_compile.serve.load import poisson_load, summarize

    port = _free_port()
    settings = dict(max_batch_size=args.max_batch_size, batch_wait_s=args.batch_wait, warmup_steps=2,
                    limits={"max_steps": max(50, args.steps), "default_steps": args.steps})
    urls, startup = {}, {}
    try:
        for backend in ("adacorr", "inductor"):
            t0 = time.perf_counter()
            cfg = make_config(backend=backend, options=dict(args.option) or None, **settings)
            urls[backend] = app.start(cfg, port=port, num_cpus=args.num_cpus, name=backend, route_prefix=f"/{backend}")
            startup[backend] = time.perf_counter() - t0
            logger.info("%s service ready in %.1f s", backend, startup[backend])
        rows = []
        for i, rate in enumerate(args.rates):
            order = ("adacorr", "inductor") if i % 2 == 0 else ("inductor", "adacorr")
            for backend in order:
                samples, wall = poisson_load(
                    urls[backend] + "/v1/generate", rate=rate, n=args.requests, seed=args.seed + i, timeout=args.timeout,
                    make_body=lambda k: {"class_labels": [k % 10], "seed": k, "steps": args.steps, "output": "latents"})
                row = {"backend": backend, "rate_rps": rate, **summarize(samples, wall), "wall_s": wall}
                logger.info("%s at %.1f req/s: %s", backend, rate, row)
                rows.append(row)
    finally:
        app.stop()
    return {"rows": rows, "startup_s": startup}


def markdown(doc: dict[str, Any]) -> str:
    def fmt(v: Any, spec: str = ".2f") -> str:
        return "-" if v is None else format(v, spec)

    lines = [
        "# Serving load test: reference DiT, adacorr vs plain Inductor (Ray Serve, local)",
        "",
        f"`{doc['command']}`",
        "",
        f"{doc['requests']} requests per service and rate, Poisson arrivals (seeded), one image each, {doc['steps']} DDIM "
        f"steps, CFG 1.5; one replica per service (1 CPU, {doc['threads']} torch thread), `@serve.batch` up to "
        f"{doc['max_batch_size']} requests, {doc['batch_wait_s']} s wait. adacorr options: `{doc['options']}`. "
        f"Startup (compile + warm-up) s: adacorr {doc['startup_s']['adacorr']:.1f}, inductor {doc['startup_s']['inductor']:.1f}.",
        "",
        "| service | offered req/s | throughput req/s | p50 s | p95 s | p99 s | errors | skipped share | requests / generation |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in doc["rows"]:
        lines.append(f"| {r['backend']} | {r['rate_rps']:g} | {fmt(r['throughput_rps'])} | {fmt(r['p50_s'], '.3f')} | "
                     f"{fmt(r['p95_s'], '.3f')} | {fmt(r['p99_s'], '.3f')} | {r['errors']} | {fmt(r['skipped_share'], '.3f')} | "
                     f"{fmt(r['mean_batch'])} |")
    lines += ["", f"Machine: {doc['environment']['platform']}, torch {doc['environment']['torch']}, "
              f"ray {doc['environment']['ray']}; shared CPU cores, so absolute numbers are noisy.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from adacorr_compile.cli_common import parse_option
    from adacorr_compile.serve.engine import BATCH_EXACT_OPTIONS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", type=float, nargs="+", default=[1.0, 2.0, 4.0], help="offered requests per second")
    p.add_argument("--requests", type=int, default=30, help="requests per service and rate")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps per request")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--batch-wait", type=float, default=0.05)
    p.add_argument("--option", action="append", default=[], type=parse_option, metavar="KEY=VALUE",
                   help="adacorr options instead of the service's defaults (repeatable)")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--out", default=str(RESULTS / "serve_load_dit"), help="results path without suffix")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import ray

    doc = {
        "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "requests": args.requests, "steps": args.steps, "max_batch_size": args.max_batch_size,
        "batch_wait_s": args.batch_wait, "threads": 1, "options": dict(args.option) or BATCH_EXACT_OPTIONS,
        "environment": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                        "ray": ray.__version__},
        **run(args),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2))
    table = markdown(doc)
    out.with_suffix(".md").write_text(table)
    print(table)
    errors = sum(r["errors"] for r in doc["rows"])
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
