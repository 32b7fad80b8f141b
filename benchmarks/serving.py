"""Serving many requests: step-level continuous batching with per-request caches (issue 29).

    python benchmarks/serving.py --requests 16 --rate 40 --steps 20 30 --max-batch 8 --rounds 5 --threads 1
    python benchmarks/serving.py --model flux --requests 16 --rate 40 --steps 20 30 --guidance 4 --rounds 5 --threads 1

Seeded Poisson arrivals of class-conditional requests for the reference DiT (DDIM) or Flux
(Euler on flow times; batched CFG: two rows per request per call; each request its own step count, guidance, label and
noise), served by one loop on a virtual clock that advances by the CPU time of each step
(process time: on a shared machine other processes' load is not counted; no sleeping, and
every variant sees the same arrival times):

* ``plain-static``: plain ``torch.compile``, static batching (a batch of up to ``--max-batch``
  waiting requests runs to its end; arrivals wait for the next batch);
* ``plain-continuous``: plain ``torch.compile``, step-level continuous batching (every step
  calls the model once for all live requests; arrivals join at the next step);
* ``ours-single``: ``backend="adacorr"``, one request at a time, each in its own
  ``generation(num_steps=...)``;
* ``ours-batch``: ``backend="adacorr"``, static batching, the batch one generation (batch-level
  decisions; a batch that shrinks as its requests finish starts new generations);
* ``ours-requests``: ``backend="adacorr"``, continuous batching under
  ``adacorr_compile.requests``: per-request clocks, caches and decisions, the block run on
  the computing rows only.

Per variant: requests/s (requests over the time from the first arrival to the last
completion), latency p50/p95/p99 (completion - arrival), block evaluations skipped (rows x
blocks that took their cache, of all asked for) and PSNR of each request's image against the
same request sampled alone by plain ``torch.compile``. Rounds run every variant once on the
same schedule, in a rotated order; throughput ratios against ``plain-static`` are per round,
reported as median (min-max). Results in ``benchmarks/results/serving_<model>.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import adacorr_compile
from adacorr_compile.lab.reference import load_reference
from adacorr_compile.lab.sampling import flux_timesteps, make_dit_scheduler

RESULTS = Path(__file__).resolve().parent / "results"
logger = logging.getLogger("adacorr_compile.benchmarks")
CLOCK = time.process_time  # the step's CPU time (1 thread): what other processes on a shared machine take is not counted
VARIANTS = ("plain-static", "plain-continuous", "ours-single", "ours-batch", "ours-requests")


@dataclass
class Request:
    """One request and its sampling state (a DDIM scheduler of its own; ``flow``: the Flux
    sampler's Euler steps on its own flow times)."""

    id: str
    arrival: float
    steps: int
    guidance: float
    label: int
    seed: int
    sched: Any = None
    x: torch.Tensor | None = None
    done: int = 0
    finish: float | None = None
    flow: bool = False

    def start(self, shape: tuple[int, ...]) -> None:
        g = torch.Generator().manual_seed(self.seed)
        if self.flow:
            self.sched = flux_timesteps(self.steps)
            self.x = torch.randn((1, *shape), generator=g)
        else:
            self.sched = make_dit_scheduler()
            self.sched.set_timesteps(self.steps)
            self.x = torch.randn((1, *shape), generator=g) * self.sched.init_noise_sigma
        self.done, self.finish = 0, None

    def rows(self, null: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.flow:
            t = torch.full((2,), float(self.sched[self.done]))
        else:
            t = torch.full((2,), int(self.sched.timesteps[self.done]), dtype=torch.long)
        return torch.cat([self.x, self.x]), t, torch.tensor([self.label, null])

    def advance(self, eps: torch.Tensor) -> None:
        cond, uncond = eps[0:1].float(), eps[1:2].float()
        guided = uncond + self.guidance * (cond - uncond)
        if self.flow:
            self.x = self.x + (float(self.sched[self.done + 1]) - float(self.sched[self.done])) * guided
        else:
            t = self.sched.timesteps[self.done]
            self.x = self.sched.step(guided, t, self.x, eta=0.0).prev_sample
        self.done += 1


def schedule(seed: int, count: int, rate: float, steps: list[int], guidance: list[float], classes: int,
             flow: bool = False) -> list[Request]:
    """Poisson arrivals at ``rate`` per second; steps, guidance, label drawn per request."""
    g = torch.Generator().manual_seed(seed)
    out, clock = [], 0.0
    for i in range(count):
        clock += float(torch.empty(1).exponential_(rate, generator=g))
        pick = lambda seq: seq[int(torch.randint(len(seq), (1,), generator=g))]  # noqa: E731
        out.append(Request(f"r{i}", clock, pick(steps), pick(guidance), int(torch.randint(classes, (1,), generator=g)), 1000 + i,
                           flow=flow))
    return out


class Server:
    """One variant's model and batching rule, served on a virtual clock."""

    def __init__(self, variant: str, model: Any, shape: tuple[int, ...], null: int, max_batch: int) -> None:
        self.variant, self.model, self.shape, self.null, self.max_batch = variant, model, shape, null, max_batch
        self.continuous = variant in ("plain-continuous", "ours-requests")
        self.limit = 1 if variant == "ours-single" else max_batch
        self.asked = self.skipped = 0
        self.traces: dict[str, Any] | None = None  # per request id: its reuse decisions, region by region
        self.blocks = len(adacorr_compile.regions(model)) if variant.startswith("ours") else 0

    def _call(self, batch: list[Request], state: Any) -> torch.Tensor:
        parts = [r.rows(self.null) for r in batch]
        xs, ts, ys = (torch.cat([p[k] for p in parts]) for k in range(3))
        with torch.no_grad():
            if self.variant != "ours-requests":
                before = _reuses(state)
                out = _output(self.model(xs, timestep=ts, class_labels=ys))
                if state is not None:
                    self.blocks = self.blocks or len(adacorr_compile.regions(self.model))
                    self.asked += len(xs) * self.blocks
                    self.skipped += (_reuses(state) - before) * len(xs)
                return out
            ids = [r.id for r in batch for _ in range(2)]
            with adacorr_compile.requests(self.model, ids, num_steps={r.id: r.steps for r in batch}):
                out = _output(self.model(xs, timestep=ts, class_labels=ys))
                if self.traces is not None:  # a request's decisions, read before its last call frees its slot
                    for r in batch:
                        if r.done + 1 == r.steps:
                            self.traces[r.id] = _decisions(adacorr_compile.request_stats(self.model, r.id))
                return out

    def run(self, reqs: list[Request]) -> dict[str, Any]:
        """Serve ``reqs`` (fresh copies); returns finish times and images by id."""
        waiting = sorted((copy.copy(r) for r in reqs), key=lambda r: r.arrival)
        before = self._totals()
        live: list[Request] = []
        now, state_cm, state, finished = 0.0, None, None, []
        while waiting or live:
            if not live and waiting and waiting[0].arrival > now:
                now = waiting[0].arrival
            if self.continuous or not live:
                while waiting and waiting[0].arrival <= now and len(live) < self.limit:
                    r = waiting.pop(0)
                    r.start(self.shape)
                    live.append(r)
                if not self.continuous and self.variant != "plain-static":
                    state_cm = adacorr_compile.generation(self.model, num_steps=max(r.steps for r in live))
                    state = state_cm.__enter__()
            start = CLOCK()
            eps = self._call(live, state)
            for i, r in enumerate(live):
                r.advance(eps[2 * i:2 * i + 2])
            now += CLOCK() - start
            for r in [r for r in live if r.done == r.steps]:
                r.finish = now
                finished.append(r)
                live.remove(r)
            if not live and state_cm is not None:
                if self.traces is not None and self.limit == 1:
                    self.traces[finished[-1].id] = _decisions(adacorr_compile.stats(self.model))
                state_cm.__exit__(None, None, None)
                state_cm = state = None
        if self.variant == "ours-requests":
            after = self._totals()
            self.asked, self.skipped, self.run_rows = (a - b for a, b in zip(after, before))
        else:
            self.run_rows = self.asked - self.skipped
        return {r.id: r for r in finished}

    def _totals(self) -> tuple[int, int, int]:
        """(row evaluations, rows skipped, rows the block bodies ran on) of the requests served
        so far by this model."""
        if self.variant != "ours-requests":
            return 0, 0, 0
        totals = adacorr_compile.stats(self.model).get("requests", {})
        return totals.get("row_evaluations", 0), totals.get("rows_skipped", 0), totals.get("body_rows", 0)


def _output(out: Any) -> torch.Tensor:
    return out.sample if hasattr(out, "sample") else out


def _decisions(report: dict[str, Any]) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(r["reuse_trace"]) for r in report["regions"])


def check_decisions(compiled: dict[str, Any], reqs: list[Request], shape: tuple[int, ...], null: int,
                    max_batch: int) -> dict[str, Any]:
    """Each request's reuse decisions (every region, every step) served alone and under
    requests(): the mechanism behind "equals its solo run", free of round-off amplification."""
    single = Server("ours-single", compiled["ours-single"], shape, null, max_batch)
    batched = Server("ours-requests", compiled["ours-requests"], shape, null, max_batch)
    single.traces, batched.traces = {}, {}
    single.run(reqs)
    batched.run(reqs)
    same = [r.id for r in reqs if single.traces.get(r.id) == batched.traces.get(r.id)]
    return {"requests": len(reqs), "same_decisions": len(same),
            "differ": [r.id for r in reqs if r.id not in same]}


def _reuses(state: Any) -> int:
    return 0 if state is None else sum(s.reuses for s in state.stats.values())


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.clamp(-1, 1) - b.clamp(-1, 1)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def build(model: torch.nn.Module, options: dict[str, Any]) -> dict[str, Any]:
    """The compiled model of each variant (a copy each; batch sizes vary: dynamic=True)."""
    plain = torch.compile(copy.deepcopy(model), dynamic=True)
    out = {"plain-static": plain, "plain-continuous": plain}
    for v in ("ours-single", "ours-batch", "ours-requests"):
        out[v] = torch.compile(copy.deepcopy(model), backend="adacorr", options=options, dynamic=True)
    return out


def measure(args: argparse.Namespace) -> dict[str, Any]:
    model = load_reference(args.model).eval()
    flow = args.model == "flux"
    if flow:
        shape, null = (3, model.image_size, model.image_size), model.num_classes
    else:
        cfg = model.config
        shape, null = (cfg.in_channels, cfg.sample_size, cfg.sample_size), cfg.num_embeds_ada_norm - 1
    options = dict(args.option)
    compiled = build(model, options)
    reqs = schedule(args.seed, args.requests, args.rate, args.steps, args.guidance, null, flow)
    servers = {v: Server(v, compiled[v], shape, null, args.max_batch) for v in VARIANTS}
    warm = schedule(args.seed + 1, min(args.requests, 6), args.rate * 4, [min(args.steps)], args.guidance, null, flow)
    for v in VARIANTS:  # compile (every batch size shape class) before timing
        logger.info("warming up %s", v)
        servers[v].run(warm)
    solo = Server("plain-static", compiled["plain-static"], shape, null, 1).run(reqs)
    rounds: list[dict[str, Any]] = []
    for k in range(args.rounds):
        order = VARIANTS[k % len(VARIANTS):] + VARIANTS[:k % len(VARIANTS)]
        row: dict[str, Any] = {}
        for v in order:
            server = Server(v, compiled[v], shape, null, args.max_batch)
            done = server.run(reqs)
            first, last = min(r.arrival for r in reqs), max(r.finish for r in done.values())
            lat = [done[r.id].finish - r.arrival for r in reqs]
            row[v] = {"requests_per_s": len(reqs) / (last - first), "latency": lat,
                      "skipped": server.skipped / server.asked if server.asked else 0.0,
                      "block_rows_run": server.run_rows if v.startswith("ours") else None,
                      "psnr": [psnr(done[r.id].x, solo[r.id].x) for r in reqs],
                      "images": {r.id: done[r.id].x for r in reqs}}
            logger.info("round %d %s: %.2f req/s, p50 %.3f s", k, v, row[v]["requests_per_s"], percentile(lat, 0.5))
        single = row["ours-single"]["images"]
        for v in VARIANTS:  # how far each request's image is from the same request served alone by ours
            images = row[v].pop("images")
            alone = single if v.startswith("ours") else {i: solo[i].x for i in single}
            diffs = [float((images[i] - alone[i]).abs().max()) for i in single]
            row[v]["max_diff_vs_ours_single"] = max(diffs)
            row[v]["requests_off_ours_single"] = sum(d > 1e-3 for d in diffs)
        rounds.append(row)
    result = summarize(args, rounds)
    result["decisions"] = check_decisions(compiled, reqs, shape, null, args.max_batch)
    return result


def summarize(args: argparse.Namespace, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"command": " ".join(sys.argv), "torch": torch.__version__, "machine": platform.machine(),
                           "threads": torch.get_num_threads(), "options": dict(args.option), "variants": {}}
    for v in VARIANTS:
        lat = [x for r in rounds for x in r[v]["latency"]]
        ratios = [r[v]["requests_per_s"] / r["plain-static"]["requests_per_s"] for r in rounds]
        psnrs = rounds[-1][v]["psnr"]
        finite = [p for p in psnrs if p != float("inf")]
        out["variants"][v] = {
            "requests_per_s": statistics.median(r[v]["requests_per_s"] for r in rounds),
            "vs_plain_static": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
            "latency_s": {q: percentile(lat, p) for q, p in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))},
            "skipped": statistics.median(r[v]["skipped"] for r in rounds),
            "psnr_mean": statistics.mean(finite) if finite else float("inf"),
            "psnr_worst": min(psnrs), "psnr_per_request": psnrs,
            "block_rows_run": rounds[-1][v]["block_rows_run"],
            "max_diff_vs_ours_single": max(r[v]["max_diff_vs_ours_single"] for r in rounds),
            "requests_off_ours_single": max(r[v]["requests_off_ours_single"] for r in rounds),
        }
    out["rounds"] = [{v: {k: r[v][k] for k in ("requests_per_s", "skipped", "block_rows_run")} for v in VARIANTS}
                     for r in rounds]
    return out


def markdown(result: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"# Serving: continuous batching with per-request caches (reference {args.model})", "",
        f"`{result['command']}`  ", f"torch {result['torch']}, {result['machine']}, {result['threads']} thread(s); "
        f"{args.requests} requests, Poisson rate {args.rate}/s, steps {args.steps}, guidance {args.guidance}, "
        f"max batch {args.max_batch} requests, {args.rounds} rounds (rotated order).", "",
        "| variant | requests/s (median) | vs plain-static, median (min-max) | latency p50 / p95 / p99 (s) "
        "| blocks skipped | block rows run | PSNR vs solo uncached, mean / worst (dB) | max abs diff vs alone (requests > 1e-3) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for v, s in result["variants"].items():
        r, lat = s["vs_plain_static"], s["latency_s"]
        lines.append(f"| {v} | {s['requests_per_s']:.2f} | {r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f}) | "
                     f"{lat['p50']:.3f} / {lat['p95']:.3f} / {lat['p99']:.3f} | {100 * s['skipped']:.1f}% | "
                     f"{s['block_rows_run'] if s['block_rows_run'] is not None else '-'} | "
                     f"{s['psnr_mean']:.1f} / {s['psnr_worst']:.1f} | {s['max_diff_vs_ours_single']:.2g} ({s['requests_off_ours_single']}/{args.requests}) |")
    d = result["decisions"]
    lines += ["", f"Decisions: {d['same_decisions']} of {d['requests']} requests took the same reuse decisions, at "
              f"every region and step, under requests() as served alone (ours-single){'' if not d['differ'] else ': not ' + ', '.join(d['differ'])}.",
              "", NOTES]
    return "\n".join(lines) + "\n"


NOTES = """Requests/s and latency come from the CPU time of each step (process time, 1 thread: what other processes on
a shared machine take is not counted) on a virtual clock (arrivals are not waited for);
ratios against plain-static are per round (each round runs every variant on the same schedule, in a rotated
order), so they are comparable where the absolute numbers drift with the machine's load. Blocks skipped: rows x
blocks that took their cache, of all asked for; block rows run: rows the block bodies actually ran on (padding
included; ours-requests runs bodies on the computing rows only, the others on whole batches; for ours-single and
ours-batch it is asked minus skipped). PSNR: each request's image against the same request sampled alone by plain
torch.compile (plain variants differ only by round-off). Max abs diff vs alone: how far each request's image is from
the same request served alone by the same compiled kind (plain: plain torch.compile; ours: ours-single, same
options, dynamic=True), and how many requests are off by more than 1e-3. This model amplifies round-off (batched
kernels of other sizes) over a sampling run to about 1e-3 even uncached (the plain rows); caching carries it
further (forecasts extrapolate it). Whether ours-requests treats each request as served alone is the decisions
line: same reuse decisions at every region and step; ours-batch shares decisions and caches within a batch and does not."""


def _option(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    return key, json.loads(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--rate", type=float, default=6.0, help="Poisson arrivals per second")
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 30])
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.5, 3.0])
    parser.add_argument("--max-batch", type=int, default=8, help="most requests per call (2 rows each)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--option", type=_option, action="append", default=[], help="adacorr option KEY=JSON")
    parser.add_argument("--model", choices=["dit", "flux"], default="dit")
    parser.add_argument("--out", default=None, help="results name (default serving_<model>)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("adacorr_compile").setLevel(logging.WARNING)
    logger.setLevel(logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args)
    RESULTS.mkdir(exist_ok=True)
    args.out = args.out or f"serving_{args.model}"
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"{args.out}.md").write_text(markdown(result, args))
    logger.info("%s", markdown(result, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
