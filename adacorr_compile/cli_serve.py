"""``adacorr serve``: an HTTP inference service for a reference model on Ray Serve.

::

    adacorr serve --model reference-dit --port 8000
    adacorr serve --model reference-dit --options calib.json --option reuse_threshold=0.1 --replicas 2
    curl -s localhost:8000/v1/generate -d '{"class_labels": [3], "steps": 20}'

Runs until SIGINT / SIGTERM, then shuts down gracefully (Serve drains the replicas). Needs the
``serve`` extra (Ray Serve, prometheus_client and the lab); :mod:`adacorr_compile.serve.app`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from typing import Any

from .cli_common import CliError, parse_option, positive_int

logger = logging.getLogger("adacorr_compile.serve")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve a reference model over HTTP on Ray Serve (compiled, warmed up, batched, "
                                     "with Prometheus metrics)")
    p.add_argument("--model", default="reference-dit", help="reference-dit | reference-flux (default: %(default)s)")
    p.add_argument("--backend", default="adacorr", choices=("adacorr", "inductor"),
                   help="torch.compile backend (inductor: plain, no caching) (default: %(default)s)")
    p.add_argument("--options", default=None, metavar="FILE",
                   help="backend options from a file (adacorr calibrate --out, or a JSON object of options), over the "
                        "service's batch-exact defaults (decision=sample, scope=block, forecast=none)")
    p.add_argument("--option", action="append", default=[], type=parse_option, metavar="KEY=VALUE",
                   help="a backend option over --options (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    p.add_argument("--replicas", type=positive_int, default=1, help="replicas, each compiled and warmed up (default: 1)")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs reserved per replica (default: 1)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads per replica (default: 1)")
    p.add_argument("--max-batch-size", type=positive_int, default=8, help="requests per @serve.batch call (default: 8)")
    p.add_argument("--batch-wait", type=float, default=0.05, help="seconds a batch waits to fill (default: 0.05)")
    p.add_argument("--no-batching", action="store_true", help="one generation per request")
    p.add_argument("--max-steps", type=positive_int, default=50, help="most denoising steps a request may ask (default: 50)")
    p.add_argument("--default-steps", type=positive_int, default=20, help="steps when a request names none (default: 20)")
    p.add_argument("--max-images", type=positive_int, default=4, help="most images (class labels) per request (default: 4)")
    p.add_argument("--warmup-steps", type=positive_int, default=4, help="steps of each warm-up generation (default: 4)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs given to a local Ray (default: all)")
    p.set_defaults(func=cmd_serve)


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~adacorr_compile.serve.config.ServeConfig` the flags describe (ValueError naming a bad one)."""
    from .serve.config import make_config

    return make_config(
        model=args.model, backend=args.backend, options_file=args.options, options=dict(args.option),
        limits={"max_steps": args.max_steps, "default_steps": min(args.default_steps, args.max_steps),
                "max_images": args.max_images},
        max_batch_size=args.max_batch_size, batch_wait_s=args.batch_wait, batching=not args.no_batching,
        max_rows=max(8, args.max_images), replicas=args.replicas, replica_cpus=args.replica_cpus, threads=args.threads,
        warmup_steps=args.warmup_steps,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    """Start the service, block until SIGINT / SIGTERM, shut it down."""
    from .serve import require_serve

    require_serve("adacorr serve")
    config = config_from_args(args)
    from .serve import app
    from .serve.logs import configure

    configure()
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    try:
        url = app.start(config, host=args.host, port=args.port, num_cpus=args.num_cpus)
    except Exception as exc:  # noqa: BLE001 - a replica failed to compile or warm up: one line, then stop Ray
        app.stop()
        raise CliError(f"adacorr serve: the service did not start: {type(exc).__name__}: {exc}") from None
    logger.info("serving; stop with Ctrl-C", extra={"url": url, "generate": f"{url}/v1/generate"})
    stopping.wait()
    logger.info("shutting down")
    app.stop()
    return 0
