"""One-shot device benchmark: every compilation method on DiT-XL/2- and Flux-shaped models.

    python benchmarks/gpu_bench.py                       # CUDA, bf16, both models, ~7 min on an H200
    python benchmarks/gpu_bench.py --models dit --methods "eager,inductor,adacorr default"
    python benchmarks/gpu_bench.py --smoke --threads 1   # tiny models on the CPU (fp32), about a minute
    benchmarks/gpu_run.sh                                # the same on the device machine (installs .whl/ first)

Models (random weights; bf16 on CUDA, float32 on the CPU):

* ``dit``: ``diffusers.DiTTransformer2DModel`` shaped as DiT-XL/2 (28 blocks, 16 heads x 72 =
  1152 wide, 32x32x4 latent, patch 2: 256 tokens, 1000 classes), a classifier-free-guidance
  batch of 2 (class label + null class);
* ``flux``: ``diffusers.FluxTransformer2DModel`` at Flux.1's full width (24 heads x 128 = 3072,
  text 4096 -> 512 tokens, pooled 768, rope axes 16/56/56, no guidance embedding) with 4 double
  and 8 single blocks (Flux.1 has 19 + 38: the same 1:2 mix), a 1024x1024 image (64x64 packed
  latent patches: 4096 image tokens), batch 1. ms per block-step extrapolates to 57 blocks.

A generation ("loop") is ``--steps`` model calls, timestep falling from 999 to about 0 (Flux:
from 1 to 1/steps), the latent updated Euler-style ``x = x - dt * v`` (``v``: the model
output, for DiT the guided ``eps_u + g (eps_c - eps_u)`` of its first 4 channels, clamped to
+-20 so that random bf16 weights cannot blow it up; the same update for every method), with
the conditioning fixed. Each method is compiled on the same weights and warmed up (compile
and at least one full loop); the methods are then timed interleaved (A, B, C, A, B, C, ...)
for ``--rounds`` rounds, a CUDA event pair (CPU: ``time.perf_counter``) around each loop.
Methods of the adacorr backend start each loop with ``adacorr_compile.reset(model,
num_steps=steps)``: every loop is one generation. Methods with CUDA graphs
(``reduce-overhead``) call ``torch.compiler.cudagraph_mark_step_begin()`` before each model
call and clone its output, as their users must.

Writes ``benchmarks/results/gpu_<date>.json`` and ``.md`` (``--out DIR``, ``--name STEM``) after
each model, prints the tables, and exits 1 when a method failed, a method's output is not
finite, or ``adacorr never`` differs from ``inductor`` beyond ``--tol``. ``--time-budget``
seconds (compile, warm-up and rounds of all models): a method whose warm-up would start
after its model's share of the budget is skipped and rounds that would not fit are dropped
(the Markdown says so).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import logging
import math
import platform
import re
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

logger = logging.getLogger("gpu_bench")

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent

# velocity clamp of the latent update (random bf16 weights may give large outputs)
CLAMP = 20.0
DIT_GUIDANCE = 4.0
DIT_CLASS = 207


# --------------------------------------------------------------------------- methods

def _interval(n: int) -> dict[str, Any]:
    # correction=False: the interval policy alone (no lambda veto), so the skipped share is
    # fixed by the schedule (warm-up, final steps, the step leader) and realised / ideal is exact
    return {"policy": "interval", "interval": n, "correction": False}


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "eager" | "inductor" | "adacorr"
    mode: str | None = None  # torch.compile(mode=...) for "inductor"
    options: dict[str, Any] | None = None  # torch.compile(options=...) for "adacorr"

    @property
    def cudagraphs(self) -> bool:
        """Compiled with CUDA graphs (on a CUDA device): outputs are static buffers."""
        return self.mode == "reduce-overhead" or (self.options or {}).get("inductor_mode") == "reduce-overhead"

    def build(self, model: torch.nn.Module) -> Callable[..., Any]:
        if self.kind == "eager":
            return model
        if self.kind == "inductor":
            return torch.compile(model, mode=self.mode)
        return torch.compile(model, backend="adacorr", options=dict(self.options or {}))


METHODS: list[Method] = [
    Method("eager", "eager"),
    Method("inductor", "inductor"),
    Method("inductor max-autotune-no-cudagraphs", "inductor", mode="max-autotune-no-cudagraphs"),
    Method("inductor reduce-overhead", "inductor", mode="reduce-overhead"),
    Method("adacorr never", "adacorr", options={"policy": "never"}),
    Method("adacorr interval 2", "adacorr", options=_interval(2)),
    Method("adacorr interval 3", "adacorr", options=_interval(3)),
    Method("adacorr default", "adacorr", options={}),
    Method("adacorr default + reduce-overhead", "adacorr", options={"inductor_mode": "reduce-overhead"}),
    Method("adacorr interval 2 + reduce-overhead", "adacorr", options={**_interval(2), "inductor_mode": "reduce-overhead"}),
]
# warm-up order (the budget may cut the tail): the references first, the slow autotuning last
PRIORITY = ["eager", "inductor", "adacorr never", "adacorr default", "adacorr interval 2", "adacorr interval 3",
            "inductor reduce-overhead", "adacorr default + reduce-overhead", "adacorr interval 2 + reduce-overhead",
            "inductor max-autotune-no-cudagraphs"]


def _key(name: str) -> str:
    return re.sub(r"[\s_+\-]", "", name.lower())


def select_methods(spec: str | None) -> list[Method]:
    if not spec:
        return list(METHODS)
    by_key = {_key(m.name): m for m in METHODS}
    wanted = set()
    for part in spec.split(","):
        if not part.strip():
            continue
        m = by_key.get(_key(part))
        if m is None:
            raise SystemExit(f"unknown method {part.strip()!r}; known: {', '.join(m.name for m in METHODS)}")
        wanted.add(m.name)
    return [m for m in METHODS if m.name in wanted]


# --------------------------------------------------------------------------- models

def model_sizes(name: str, smoke: bool) -> dict[str, Any]:
    """Constructor config and workload sizes of a model."""
    if name == "dit":
        if smoke:
            config = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=3,
                          sample_size=8, patch_size=2, num_embeds_ada_norm=10)
        else:  # DiT-XL/2 at 256x256
            config = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                          sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
        tokens = (config["sample_size"] // config["patch_size"]) ** 2
        return {"class": "DiTTransformer2DModel", "config": config, "blocks": config["num_layers"], "batch": 2,
                "tokens": tokens, "width": config["num_attention_heads"] * config["attention_head_dim"],
                "extrapolate_blocks": None}
    if name == "flux":
        if smoke:
            config = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                          num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12, axes_dims_rope=(4, 6, 6),
                          guidance_embeds=False)
            grid, text = 4, 8
        else:  # Flux.1 width, 4 + 8 blocks, 1024x1024 image
            config = dict(patch_size=1, in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=128,
                          num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                          axes_dims_rope=(16, 56, 56), guidance_embeds=False)
            grid, text = 64, 512
        return {"class": "FluxTransformer2DModel", "config": config, "blocks": config["num_layers"] + config["num_single_layers"],
                "batch": 1, "tokens": grid * grid, "text_tokens": text, "grid": grid,
                "width": config["num_attention_heads"] * config["attention_head_dim"], "extrapolate_blocks": 57}
    raise SystemExit(f"unknown model {name!r}; known: dit, flux")


class Workload:
    """A model with random weights, its fixed conditioning and the step loop's inputs."""

    def __init__(self, name: str, sizes: dict[str, Any], steps: int, device: torch.device, dtype: torch.dtype) -> None:
        import diffusers

        self.name, self.sizes, self.steps, self.device, self.dtype = name, sizes, steps, device, dtype
        torch.manual_seed(0)
        with torch.device(device):  # parameters made on the device: no host copy of 5 GB
            model = getattr(diffusers, sizes["class"])(**sizes["config"])
        # .to(device) too: buffers made from numpy (DiT's position table) are on the CPU
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.params = sum(p.numel() for p in self.model.parameters())
        g = torch.Generator(device="cpu").manual_seed(1)
        self.dt = 1.0 / steps
        if name == "dit":
            c, s = sizes["config"]["in_channels"], sizes["config"]["sample_size"]
            self.channels = c
            self.x0 = torch.randn(1, c, s, s, generator=g).to(device)
            classes = sizes["config"]["num_embeds_ada_norm"]
            # CFG batch: [class, null class] (the label table has num_classes + 1 rows)
            self.labels = torch.tensor([DIT_CLASS % classes, classes], device=device)
            self.t = [torch.full((2,), float(round(999 * (1 - i / steps))), device=device) for i in range(steps)]
        else:
            cfg, n, text = sizes["config"], sizes["tokens"], sizes["text_tokens"]
            self.x0 = torch.randn(1, n, cfg["in_channels"], generator=g).to(device)
            self.text = torch.randn(1, text, cfg["joint_attention_dim"], generator=g).to(device, dtype)
            self.pooled = torch.randn(1, cfg["pooled_projection_dim"], generator=g).to(device, dtype)
            grid = sizes["grid"]
            ids = torch.zeros(grid, grid, 3)
            ids[..., 1] = torch.arange(grid)[:, None]
            ids[..., 2] = torch.arange(grid)[None, :]
            self.img_ids = ids.reshape(n, 3).to(device, dtype)
            self.txt_ids = torch.zeros(text, 3, device=device, dtype=dtype)
            self.t = [torch.full((1,), 1.0 - i / steps, device=device) for i in range(steps)]

    def inputs(self, x: torch.Tensor, i: int) -> dict[str, Any]:
        if self.name == "dit":
            return dict(hidden_states=torch.cat([x, x]).to(self.dtype), timestep=self.t[i], class_labels=self.labels,
                        return_dict=False)
        return dict(hidden_states=x.to(self.dtype), encoder_hidden_states=self.text, pooled_projections=self.pooled,
                    timestep=self.t[i], img_ids=self.img_ids, txt_ids=self.txt_ids, return_dict=False)

    def update(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        out = out.float()
        if self.name == "dit":
            eps = out[:, : self.channels]
            v = eps[1:] + DIT_GUIDANCE * (eps[:1] - eps[1:])
        else:
            v = out
        return x - self.dt * v.clamp(-CLAMP, CLAMP)


# --------------------------------------------------------------------------- measuring

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_loop(wl: Workload, fn: Callable[..., Any], method: Method) -> torch.Tensor:
    """One generation: ``wl.steps`` model calls and latent updates (no reset, no timing)."""
    graphs = method.cudagraphs and wl.device.type == "cuda"
    x = wl.x0.clone()
    for i in range(wl.steps):
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        out = fn(**wl.inputs(x, i))[0]
        if graphs:
            out = out.clone()  # the next replay overwrites the static output buffer
        x = wl.update(x, out)
    return x


def timed_loop(wl: Workload, fn: Callable[..., Any], method: Method) -> tuple[float, torch.Tensor, dict[str, Any]]:
    """(ms of the whole loop, final latent, memory figures); adacorr: one generation."""
    import adacorr_compile

    if method.kind == "adacorr":
        adacorr_compile.reset(fn, num_steps=wl.steps)
    mem: dict[str, Any] = {"peak_bytes": None, "peak_over_start_bytes": None}
    cuda = wl.device.type == "cuda"
    if cuda:
        sync(wl.device)
        start_bytes = torch.cuda.memory_allocated(wl.device)
        torch.cuda.reset_peak_memory_stats(wl.device)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        x = run_loop(wl, fn, method)
        end.record()
        end.synchronize()
        ms = begin.elapsed_time(end)
        peak = torch.cuda.max_memory_allocated(wl.device)
        mem = {"peak_bytes": peak, "peak_over_start_bytes": peak - start_bytes}
    else:
        t0 = time.perf_counter()
        x = run_loop(wl, fn, method)
        ms = 1e3 * (time.perf_counter() - t0)
    return ms, x, mem


_READS = ("tolist", "item", "__float__", "__int__", "__bool__")


@contextlib.contextmanager
def count_host_reads(device_type: str):
    """Count device-to-host reads (``tolist``, ``item``, ``float()``, ``int()``, ``bool()`` of a
    tensor on ``device_type``) made from Python while the block runs."""
    counter = {"reads": 0}
    saved = {name: torch.Tensor.__dict__.get(name) for name in _READS}

    def counting(name: str) -> Callable[..., Any]:
        original = getattr(torch.Tensor, name)

        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self.device.type == device_type:
                counter["reads"] += 1
            return original(self, *args, **kwargs)

        return read

    patched = {name: counting(name) for name in _READS}
    for name, fn in patched.items():
        setattr(torch.Tensor, name, fn)
    try:
        yield counter
    finally:
        for name, original in saved.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)


def read_latency_us(device: torch.device, n: int = 200) -> float:
    """Median wall time of one host read (``tolist()`` of a 3-element tensor) right after a
    tiny kernel wrote it: launch to host value, the round trip of a decision read."""
    packed = torch.zeros(3, device=device)
    times = []
    for i in range(n + 20):
        packed.add_(1.0)
        t0 = time.perf_counter()
        packed.tolist()
        if i >= 20:
            times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def compare(a: torch.Tensor, b: torch.Tensor, x0: torch.Tensor) -> dict[str, float]:
    """Final latents a vs b: max abs difference, and the relative L2 difference of the
    updates the loops made (x_T - x_0), which the shared start does not dilute."""
    da, db = (a - x0).double(), (b - x0).double()
    return {"max_abs": float((a - b).abs().max()),
            "rel_l2": float((da - db).norm() / db.norm().clamp_min(1e-30)),
            "rel_max": float((da - db).abs().max() / db.abs().max().clamp_min(1e-30))}


# --------------------------------------------------------------------------- one model

@dataclass
class Row:
    method: str
    status: str = "ok"  # ok | error | skipped
    error: str | None = None
    warmup_s: float | None = None  # compile + warm-up loops
    loop_ms: list[float] = field(default_factory=list)  # per round, whole loop
    stats: list[dict[str, Any]] = field(default_factory=list)  # per round (adacorr)
    peak_bytes: int | None = None
    peak_over_start_bytes: int | None = None
    host_reads: int | None = None
    final: torch.Tensor | None = None


def _fail(row: Row, exc: BaseException, what: str) -> None:
    row.status, row.error = "error", f"{what}: {type(exc).__name__}: {exc}".strip()[:600]
    logger.error("%s %s failed:\n%s", row.method, what, traceback.format_exc())


def bench_model(wl: Workload, methods: list[Method], args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    import adacorr_compile

    rows = {m.name: Row(m.name) for m in methods}
    by_name = {m.name: m for m in methods}
    built: dict[str, Callable[..., Any]] = {}
    notes: list[str] = []
    est_loop: dict[str, float] = {}
    with torch.no_grad():
        for name in sorted(by_name, key=lambda n: PRIORITY.index(n) if n in PRIORITY else len(PRIORITY)):
            m, row = by_name[name], rows[name]
            if built and time.monotonic() > deadline:
                row.status, row.error = "skipped", "time budget spent before its warm-up"
                notes.append(f"`{name}` skipped: the time budget was spent before its warm-up.")
                logger.warning("%s: %s: skipped (time budget)", wl.name, name)
                continue
            logger.info("%s: %s: compile + warm-up", wl.name, name)
            t0 = time.perf_counter()
            try:
                fn = m.build(wl.model)
                for k in range(args.warmup):
                    if m.kind == "adacorr":
                        adacorr_compile.reset(fn, num_steps=wl.steps)
                    t1 = time.perf_counter()
                    x = run_loop(wl, fn, m)
                    sync(wl.device)
                    est_loop[name] = time.perf_counter() - t1
                    if k + 1 < args.warmup and time.monotonic() > deadline:
                        break
                if not bool(torch.isfinite(x).all()):
                    logger.warning("%s: %s: warm-up output is not finite", wl.name, name)
            except Exception as exc:  # noqa: BLE001 - a failed method gets a row, the run goes on
                _fail(row, exc, "compile/warm-up")
                continue
            row.warmup_s = time.perf_counter() - t0
            built[name] = fn
            logger.info("%s: %s: ready in %.1f s (last warm-up loop %.0f ms)", wl.name, name, row.warmup_s,
                        1e3 * est_loop[name])

        rounds_done = 0
        order = [m.name for m in methods if m.name in built]
        for r in range(args.rounds):
            estimate = sum(est_loop[n] for n in order if rows[n].status == "ok")
            if r > 0 and time.monotonic() + estimate > deadline:
                notes.append(f"time budget: {args.rounds - r} of {args.rounds} rounds dropped (ran {r}).")
                logger.warning("%s: time budget: dropping rounds %d-%d", wl.name, r + 1, args.rounds)
                break
            for name in order:
                m, row, fn = by_name[name], rows[name], built[name]
                if row.status != "ok":
                    continue
                try:
                    ms, x, mem = timed_loop(wl, fn, m)
                except Exception as exc:  # noqa: BLE001
                    _fail(row, exc, f"round {r + 1}")
                    continue
                row.loop_ms.append(ms)
                if row.final is None:
                    row.final = x.detach().clone()
                for key in ("peak_bytes", "peak_over_start_bytes"):
                    if mem[key] is not None:
                        setattr(row, key, max(getattr(row, key) or 0, mem[key]))
                if m.kind == "adacorr":
                    s = adacorr_compile.stats(fn)
                    row.stats.append({"totals": s["totals"], "cache_bytes": s["cache_bytes"], "steps": s["steps"],
                                      "fallbacks": s["fallbacks"],
                                      "reuse_trace": [r_["reuse_trace"] for r_ in s["regions"][:2]]})
                    adacorr_compile.reset(fn, num_steps=wl.steps)  # free the caches before the next method runs
            rounds_done = r + 1
            logger.info("%s: round %d/%d done", wl.name, r + 1, args.rounds)

        # host reads of one more (untimed) loop per method; no recompile may happen under the patch
        for name in order:
            m, row, fn = by_name[name], rows[name], built[name]
            if row.status != "ok":
                continue
            try:
                if m.kind == "adacorr":
                    adacorr_compile.reset(fn, num_steps=wl.steps)
                with torch.compiler.set_stance("fail_on_recompile"), count_host_reads(wl.device.type) as counter:
                    run_loop(wl, fn, m)
                    sync(wl.device)
                row.host_reads = counter["reads"]
                if m.kind == "adacorr":
                    adacorr_compile.reset(fn, num_steps=wl.steps)
            except Exception as exc:  # noqa: BLE001 - a count is a side figure: note it, keep the timings
                notes.append(f"`{name}`: host reads not counted ({type(exc).__name__}: {str(exc)[:200]}).")
                logger.warning("%s: %s: host-read count failed: %s", wl.name, name, exc)
    return {"rows": rows, "notes": notes, "rounds_done": rounds_done, "built": built}


def summarize(wl: Workload, result: dict[str, Any], args: argparse.Namespace, read_us: float) -> dict[str, Any]:
    """Rows of figures (JSON-ready) and the checks of one model."""
    rows: dict[str, Row] = result["rows"]
    notes: list[str] = list(result["notes"])
    failures: list[str] = []
    steps, blocks = wl.steps, wl.sizes["blocks"]

    def per_step(row: Row) -> list[float]:
        return [ms / steps for ms in row.loop_ms]

    def median(row: Row | None) -> float | None:
        return statistics.median(per_step(row)) if row is not None and row.loop_ms else None

    def ratio(base: Row | None, row: Row) -> tuple[float | None, list[float] | None]:
        b = median(base)
        if b is None or not row.loop_ms:
            return None, None
        pairs = [x / y for x, y in zip(per_step(base), per_step(row))]
        return b / median(row), [min(pairs), max(pairs)] if pairs else None

    eager, inductor = rows.get("eager"), rows.get("inductor")
    out_rows = []
    for name, row in rows.items():
        rec: dict[str, Any] = {"method": name, "status": row.status, "error": row.error, "warmup_s": row.warmup_s,
                               "rounds": len(row.loop_ms)}
        if row.status == "ok" and not row.loop_ms:
            row.status, row.error = "error", "no timed round"
            rec.update(status=row.status, error=row.error)
        if row.final is not None and not bool(torch.isfinite(row.final).all()):
            row.status, row.error = "error", "non-finite output (NaN or inf in the final latent)"
            rec.update(status=row.status, error=row.error)
        if row.status == "error":
            failures.append(f"{name}: {row.error}")
        t = per_step(row)
        if t:
            rec.update(ms_per_step=statistics.median(t), ms_per_step_min=min(t), ms_per_step_max=max(t),
                       ms_per_step_rounds=t, ms_per_block_step=statistics.median(t) / blocks)
            if wl.sizes["extrapolate_blocks"]:
                rec["ms_per_step_extrapolated"] = rec["ms_per_block_step"] * wl.sizes["extrapolate_blocks"]
        for base_name, base in (("eager", eager), ("inductor", inductor)):
            s, spread = ratio(base, row)
            rec[f"speedup_vs_{base_name}"], rec[f"speedup_vs_{base_name}_spread"] = s, spread
        if row.stats:
            last = row.stats[-1]
            totals = last["totals"]
            shares = [s["totals"]["reuses"] / s["totals"]["calls"] if s["totals"]["calls"] else 0.0 for s in row.stats]
            share = shares[-1]
            ideal = 1.0 / (1.0 - share) if share < 1 else math.inf
            rec.update(regions=totals["regions"], calls=totals["calls"], reuses=totals["reuses"],
                       computes=totals["computes"], skipped_share=share, skipped_share_rounds=shares, ideal_speedup=ideal,
                       cache_bytes=last["cache_bytes"], fallbacks=last["fallbacks"], adacorr_steps=last["steps"],
                       probe_reuse_trace=last["reuse_trace"][-1] if last["reuse_trace"] else None)
            if rec.get("speedup_vs_inductor") is not None:
                rec["realised_over_ideal"] = rec["speedup_vs_inductor"] / ideal
            if last["fallbacks"]:
                notes.append(f"`{name}` compiled (partly) without cache guards: {'; '.join(last['fallbacks'])}")
        rec["peak_bytes"], rec["peak_over_start_bytes"] = row.peak_bytes, row.peak_over_start_bytes
        rec["host_reads_per_step"] = None if row.host_reads is None else row.host_reads / steps
        if rec["host_reads_per_step"] is not None and rec.get("ms_per_step"):
            rec["host_read_share"] = rec["host_reads_per_step"] * read_us / (1e3 * rec["ms_per_step"])
        if row.final is not None and inductor is not None and inductor.final is not None:
            rec["diff_vs_inductor"] = compare(row.final, inductor.final, wl.x0)
        out_rows.append(rec)

    tol = args.tol if args.tol is not None else (2e-2 if wl.dtype == torch.bfloat16 else 1e-4)
    check: dict[str, Any] = {"tolerance_rel_l2": tol, "checked": False}
    never = rows.get("adacorr never")
    if never is not None and inductor is not None and never.final is not None and inductor.final is not None:
        d = compare(never.final, inductor.final, wl.x0)
        check.update(checked=True, **d, passed=d["rel_l2"] <= tol)
        if not check["passed"]:
            failures.append(f"adacorr never vs inductor: relative L2 difference {d['rel_l2']:.2e} > {tol:.0e}")
    else:
        notes.append("correctness check not run (needs `adacorr never` and `inductor` timed).")
    if eager is not None and inductor is not None and eager.final is not None and inductor.final is not None:
        check["noise_floor_eager_vs_inductor"] = compare(eager.final, inductor.final, wl.x0)
    return {"rows": out_rows, "check": check, "notes": notes, "failures": failures, "rounds_done": result["rounds_done"]}


# --------------------------------------------------------------------------- report

def _f(x: Any, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def _mb(x: Any) -> str:
    return "-" if x is None else f"{x / 2**20:.0f}"


def markdown_model(name: str, wl_info: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    sizes = wl_info["sizes"]
    extra = sizes.get("extrapolate_blocks")
    head = (f"## {name}: {sizes['class']}, {sizes['blocks']} blocks, width {sizes['width']}, {sizes['tokens']} image tokens"
            + (f" + {sizes['text_tokens']} text" if "text_tokens" in sizes else "")
            + f", batch {sizes['batch']}, {wl_info['params'] / 1e6:.1f} M parameters, {wl_info['dtype']}, "
            f"{wl_info['steps']} steps, {summary['rounds_done']} round(s)")
    cols = ["method", "ms/step median (min-max)", "ms/block-step"]
    if extra:
        cols.append(f"ms/step at {extra} blocks")
    cols += ["vs eager", "vs inductor (per-round min-max)", "skipped share", "ideal", "realised/ideal",
             "peak MB (over start)", "cache MB", "host reads/step (share)", "rel diff vs inductor", "warm-up s", "status"]
    lines = [head, "", "| " + " | ".join(cols) + " |", "| --- |" + " ---: |" * (len(cols) - 2) + " --- |"]
    for r in summary["rows"]:
        cells = [r["method"]]
        if r.get("ms_per_step") is not None:
            cells.append(f"{r['ms_per_step']:.2f} ({r['ms_per_step_min']:.2f}-{r['ms_per_step_max']:.2f})")
        else:
            cells.append("-")
        cells.append(_f(r.get("ms_per_block_step"), "{:.3f}"))
        if extra:
            cells.append(_f(r.get("ms_per_step_extrapolated")))
        cells.append(_f(r.get("speedup_vs_eager"), "{:.2f}x"))
        s, spread = r.get("speedup_vs_inductor"), r.get("speedup_vs_inductor_spread")
        cells.append("-" if s is None else f"{s:.3f}x" + (f" ({spread[0]:.3f}-{spread[1]:.3f})" if spread else ""))
        share = r.get("skipped_share")
        cells.append("-" if share is None else f"{share:.3f} ({r['reuses']}/{r['calls']})")
        cells.append(_f(r.get("ideal_speedup"), "{:.2f}x"))
        cells.append(_f(r.get("realised_over_ideal"), "{:.2f}"))
        peak = r.get("peak_bytes")
        cells.append("-" if peak is None else f"{_mb(peak)} ({_mb(r.get('peak_over_start_bytes'))})")
        cells.append(_mb(r.get("cache_bytes")) if r.get("cache_bytes") is None or r["cache_bytes"] >= 2**20
                     else f"{r['cache_bytes'] / 2**20:.3f}")
        reads = r.get("host_reads_per_step")
        cells.append("-" if reads is None else f"{reads:.2f}" + (f" ({100 * r['host_read_share']:.2f}%)"
                                                               if r.get("host_read_share") is not None else ""))
        d = r.get("diff_vs_inductor")
        cells.append("-" if d is None else f"{d['rel_l2']:.1e}")
        cells.append(_f(r.get("warmup_s"), "{:.0f}"))
        cells.append(r["status"] if r["status"] == "ok" else f"**{r['status'].upper()}**: {r['error']}")
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    c = summary["check"]
    lines.append("")
    if c["checked"]:
        floor = c.get("noise_floor_eager_vs_inductor")
        lines.append(f"Correctness: `adacorr never` vs `inductor`, same loop from the same start: max abs difference "
                     f"{c['max_abs']:.2e}, relative L2 difference of the update {c['rel_l2']:.2e} (max-norm {c['rel_max']:.2e}); "
                     f"tolerance {c['tolerance_rel_l2']:.0e}: **{'PASS' if c['passed'] else 'FAIL'}**"
                     + (f". Noise floor, `eager` vs `inductor`: relative L2 {floor['rel_l2']:.2e}, max abs {floor['max_abs']:.2e}."
                        if floor else "."))
    for note in summary["notes"]:
        lines.append(f"- {note}")
    return lines


EXPLAIN = """\
How to read this:

- ms/step: one whole generation (all steps, the latent update included) timed with a CUDA event pair
  (CPU: `time.perf_counter`), divided by the steps; median over rounds, min-max in brackets. The methods are
  timed interleaved, one generation each per round. ms/block-step = ms/step / blocks (the non-block part,
  embedders and final layer, is spread over the blocks; the Flux extrapolation to 57 blocks therefore counts
  it 57/12 times: a slight overestimate).
- vs eager / vs inductor: ratio of medians; in brackets the min-max of the per-round ratios.
- skipped share: guarded block calls that reused their cache / all guarded block calls, from
  `adacorr_compile.stats(model)["totals"]` (reuses / calls) of the last timed generation. ideal = 1 / (1 - share):
  the speedup if a skipped block cost nothing and the rest cost what it does under plain Inductor.
  realised/ideal = (speedup vs inductor) / ideal. The interval methods use `correction=False` (no lambda veto),
  so their share is fixed by the schedule: warm-up steps, final steps and, under `scope="step"`, the first
  block (the step leader) always compute.
- peak MB: `torch.cuda.max_memory_allocated` during the method's generations (reset before each), and in
  brackets the peak over what was allocated when the generation started (weights, other methods' CUDA-graph pools).
  cache MB: `adacorr_compile.stats(model)["cache_bytes"]` at the end of the generation.
- host reads/step: `tolist()`, `item()`, `float()`, `int()`, `bool()` of a device tensor made from Python during one
  extra untimed generation (counted by patching those `torch.Tensor` methods), divided by the steps. The share in
  brackets is reads/step x the measured latency of one read / ms per step, where the latency of one read is the
  median wall time of `tolist()` on a 3-element device tensor right after a tiny kernel wrote it ({read_us:.1f} us
  here): the round trip alone. It does not include the stall a read causes (the GPU idles while the host
  launches the kernels after it); that cost is in the `adacorr never` row against `inductor`, with everything
  else the guarded regions add.
- rel diff vs inductor: relative L2 difference of the update the generation made (x_T - x_0) against `inductor`'s
  from the same start (the `adacorr` rows reuse caches, so only `adacorr never` must match).
"""


def environment(device: torch.device, dtype: torch.dtype, argv: list[str]) -> dict[str, Any]:
    import adacorr_compile

    env: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
                           "device": str(device), "dtype": str(dtype).replace("torch.", ""),
                           "adacorr_compile": getattr(adacorr_compile, "__version__", None),
                           "command": " ".join(["python", "benchmarks/gpu_bench.py", *argv]),
                           "date": datetime.datetime.now().isoformat(timespec="seconds"), "threads": torch.get_num_threads()}
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except Exception as exc:  # noqa: BLE001
        env["diffusers"] = f"unavailable: {exc}"
    if device.type == "cuda":
        env.update(device_name=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   device_memory_bytes=torch.cuda.get_device_properties(device).total_memory)
    else:
        env["device_name"] = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    return env


def write(out: Path, stem: str, report: dict[str, Any], md: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str))
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")


def ensure_backend() -> None:
    """``backend="adacorr"`` without an installed package (its entry point): register it."""
    import torch._dynamo

    from adacorr_compile import adacorr_backend

    if "adacorr" not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(adacorr_backend, name="adacorr")


def raise_recompile_limits() -> None:
    cfg = torch._dynamo.config
    # ten methods compile the same forward: each is a cache entry of the same code object
    for name, value in (("recompile_limit", 64), ("cache_size_limit", 64), ("accumulated_recompile_limit", 1024),
                        ("accumulated_cache_size_limit", 1024)):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), value))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="dit,flux", help="comma-separated: dit, flux")
    p.add_argument("--methods", default=None, help="comma-separated method names (default: all): "
                   + ", ".join(m.name for m in METHODS))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 3; --smoke 1)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up loops per method, compile included (default 2; --smoke 1)")
    p.add_argument("--smoke", action="store_true", help="tiny models on the CPU in float32")
    p.add_argument("--device", default="auto", help="auto (cuda if available; cpu with --smoke), cuda, cpu")
    p.add_argument("--time-budget", type=float, default=420.0, help="seconds for compile, warm-up and rounds of all models")
    p.add_argument("--tol", type=float, default=None, help="relative L2 tolerance of adacorr never vs inductor "
                   "(default 2e-2 in bf16, 1e-4 in float32)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    p.add_argument("--out", type=Path, default=RESULTS, help="output directory")
    p.add_argument("--name", default=None, help="file stem (default gpu_<YYYY-MM-DD>)")
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.smoke else 3
    if args.warmup is None:
        args.warmup = 1 if args.smoke else 2
    if args.steps < 1 or args.rounds < 1 or args.warmup < 1:
        p.error("--steps, --rounds and --warmup must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    start = time.monotonic()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logger.setLevel(logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    else:
        device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    sizes = {m: model_sizes(m, args.smoke) for m in models}
    methods = select_methods(args.methods)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    ensure_backend()
    raise_recompile_limits()

    read_us = read_latency_us(device)
    stem = args.name or f"gpu_{datetime.date.today().isoformat()}"
    report: dict[str, Any] = {"environment": environment(device, dtype, argv),
                              "settings": {"models": models, "methods": [m.name for m in methods], "steps": args.steps,
                                           "rounds": args.rounds, "warmup_loops": args.warmup, "smoke": args.smoke,
                                           "time_budget_s": args.time_budget, "velocity_clamp": CLAMP,
                                           "dit_guidance": DIT_GUIDANCE,
                                           "method_options": {m.name: {"kind": m.kind, "mode": m.mode, "options": m.options}
                                                              for m in methods}},
                              "read_latency_us": read_us, "models": {}, "failures": []}
    env = report["environment"]
    md = [f"# Device benchmark, {env['date'][:10]}: {env['device_name']}, torch {env['torch']}, {env['dtype']}", "",
          f"Command: `{env['command']}`", "", EXPLAIN.format(read_us=read_us),
          "Methods: " + "; ".join(f"`{m.name}` = " + (f"torch.compile(mode={m.mode!r})" if m.kind == "inductor" else
                                    f"options={m.options!r}" if m.kind == "adacorr" else "the model itself")
                                 for m in methods) + ".", ""]
    deadline = start + args.time_budget
    failures: list[str] = []
    for k, name in enumerate(models):
        share = (deadline - time.monotonic()) / (len(models) - k)  # what is left, split over the models left
        model_deadline = time.monotonic() + max(share, 0.0)
        logger.info("%s: building the model (%s on %s)", name, report["environment"]["dtype"], device)
        try:
            wl = Workload(name, sizes[name], args.steps, device, dtype)
        except Exception as exc:  # noqa: BLE001
            logger.error("%s: model construction failed:\n%s", name, traceback.format_exc())
            failures.append(f"{name}: model construction failed: {type(exc).__name__}: {exc}")
            report["models"][name] = {"error": failures[-1]}
            md += [f"## {name}", "", f"**ERROR**: {failures[-1]}", ""]
            continue
        result = bench_model(wl, methods, args, model_deadline)
        summary = summarize(wl, result, args, read_us)
        info = {"sizes": sizes[name], "params": wl.params, "dtype": str(dtype).replace("torch.", ""), "steps": args.steps}
        report["models"][name] = {**info, **{k_: v for k_, v in summary.items()}}
        failures += [f"{name}: {f}" for f in summary["failures"]]
        lines = markdown_model(name, info, summary)
        md += lines + [""]
        report["failures"] = failures
        report["ok"] = not failures
        write(args.out, stem, report, md)
        sys.stdout.write("\n".join(lines) + "\n\n")
        sys.stdout.flush()
        # free this model's compiled code, CUDA graphs and weights before the next
        del wl, result
        torch._dynamo.reset()
        with contextlib.suppress(Exception):  # CUDA-graph pools of the reduce-overhead methods
            from torch._inductor.cudagraph_trees import reset_cudagraph_trees

            reset_cudagraph_trees()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["failures"], report["ok"] = failures, not failures
    report["elapsed_s"] = time.monotonic() - start
    md += ["## Result", "", "All methods ran and the checks passed." if not failures
           else "Failures:\n\n" + "\n".join(f"- {f}" for f in failures), "",
           f"Elapsed {report['elapsed_s']:.0f} s (time budget {args.time_budget:.0f} s).", ""]
    write(args.out, stem, report, md)
    logger.info("wrote %s/%s.{json,md} (%.0f s)%s", args.out, stem, report["elapsed_s"],
                "" if not failures else f"; {len(failures)} failure(s)")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
