"""Quality/speed benchmark of every caching method on the reference models.

    python benchmarks/run_benchmark.py                 # both reference models, full sweep
    python benchmarks/run_benchmark.py --model dit --quick
    python benchmarks/run_benchmark.py --model sd3     # the held-out reference (defaults not tuned on it)

For each method (same model, seeds, classes and steps): the fraction of block
evaluations skipped (counted), the wall-clock speedup against the uncached run of
the same lowering (timed interleaved in this process: --reps pairs, each an uncached
generation then the method's; the median of the per-pair ratios and their min-max
spread, so that machine load lands on both sides), PSNR/SSIM against
the uncached images of the same seeds, and the Frechet distance (FID proxy) and
class accuracy from the reference classifier. Writes
benchmarks/results/benchmark_<model>.{json,md}, pareto_<model>.png and
lambda_heatmap_<model>.png (or into the folder given with --out).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from adacorr_compile.lab import bench, methods, metrics, peer_caches, plots
from adacorr_compile.lab.reference import HELDOUT_SEED, load_reference, load_reference_classifier, make_dataset
from adacorr_compile.lab.reference.classifier import extract_features
from adacorr_compile.lab.sampling import DEFAULT_GUIDANCE, reference_sampler

RESULTS = Path(__file__).resolve().parent / "results"
logger = logging.getLogger("adacorr_compile.bench")


# Every row names the options it depends on (defaults change with what this benchmark finds,
# see config.py): per-block decisions, reuse of the cache as stored, unless a row says otherwise.
BLOCK = {"scope": "block", "forecast": "none"}
# per-block AdaCorrection: lambda decides per block, offset-corrected reuse (the paper's decision
# per block, with our scale-free score, cached drift reference and correction: not the paper's
# method, which is the "paper" preset below)
ADACORR = {"policy": "adacorr", "correction": True, **BLOCK}


def methods_for(model_name: str, quick: bool, lowering: str, workdir: str) -> list[methods.Method]:
    """Every method on the same model. Our policies are lowered with ``lowering`` (default
    Inductor, so their speedup is against uncached ``torch.compile``); with ``--lowering
    eager`` the sweep is cheaper to run and its speed reference is the uncached eager model.
    diffusers' hooks run eagerly (speed reference: uncached eager)."""
    ours = partial(methods.ours, lowering=lowering)
    m: list[methods.Method] = [methods.eager_baseline(), methods.inductor_baseline(), ours("ours caching off", {"policy": "never"}),
                             ours("default", {})]  # the backend's defaults (config.py)
    # CFG as two calls per step, cond and uncond in diffusers' cache_context (Wan, Flux true CFG):
    # the same images as batched CFG with caching off, and each branch keeps its own cache
    m += [ours("ours caching off, CFG as two calls", {"policy": "never"}, cfg_calls=2),
          ours("default, CFG as two calls", {}, cfg_calls=2)]
    # the paper's method exactly (every block computes, blended by lambda: nothing skipped), and
    # its signal turned into a skip (gamma scaled so that lambda spans [0, 1] on these models)
    m += [ours("the paper's method (preset paper)", {"preset": "paper"}),
          ours("paper-skip gamma=0.01 thr=0.05", {"preset": "paper-skip", "gamma": 0.01, "reuse_threshold": 0.05}, 0.05)]
    veto = 0.08  # lambda above which "X + AdaCorrection" vetoes a reuse
    for thr in ([0.03, 0.08] if quick else [0.02, 0.03, 0.05, 0.08, 0.12]):
        m.append(ours(f"adacorr thr={thr}", {**ADACORR, "reuse_threshold": thr}, thr))
    # one lambda-driven decision per step for all blocks (scope="step"), as FBCache decides
    for thr in ([0.03, 0.08] if quick else [0.02, 0.03, 0.05, 0.08, 0.1, 0.12]):
        for corr in (True, False):
            label = "adacorr step" + ("" if corr else " (no correction)")
            m.append(ours(f"{label} thr={thr}", {**ADACORR, "scope": "step", "reuse_threshold": thr, "correction": corr}, thr))
    for thr in ([] if quick else [0.15, 0.25]):  # no cap on reuses in a row, as FBCache (reaches its higher skip rates)
        for corr in (True, False):
            label = "adacorr step uncapped" + ("" if corr else " (no correction)")
            m.append(ours(f"{label} thr={thr}", {**ADACORR, "scope": "step", "reuse_threshold": thr, "correction": corr,
                                                 "max_consecutive_reuses": 50}, thr))
    # forecast="linear": a reuse extrapolates the cached residual from the region's last two
    # computes (first-order, as TaylorSeer / cache-dit's calibrator) instead of reusing it as is
    for thr, cap in ([(0.1, 3)] if quick else [(0.08, 3), (0.1, 3), (0.12, 3), (0.15, 50), (0.25, 50)]):
        label = "adacorr step forecast" + (" uncapped" if cap > 3 else "")
        m.append(ours(f"{label} thr={thr}", {**ADACORR, "scope": "step", "reuse_threshold": thr, "forecast": "linear",
                                             "max_consecutive_reuses": cap}, thr))
    # the same extrapolating the cached outputs (correction=False) instead of the residuals
    for thr in ([] if quick else [0.08, 0.1]):
        m.append(ours(f"adacorr step forecast (no correction) thr={thr}",
                      {**ADACORR, "scope": "step", "reuse_threshold": thr, "forecast": "linear", "correction": False}, thr))
    for n in ([] if quick else [3, 4]):
        m.append(ours(f"interval forecast N={n}", {**BLOCK, "policy": "interval", "interval": n, "correction": True,
                                                    "reuse_threshold": 1.0, "max_consecutive_reuses": n,
                                                    "forecast": "linear"}, n))
    for thr in ([] if quick else [0.2, 0.3]):
        m.append(ours(f"first_block forecast thr={thr}", {**BLOCK, "policy": "first_block", "first_block_threshold": thr,
                                                          "correction": False, "max_consecutive_reuses": 50,
                                                          "forecast": "linear"}, thr))
    for thr in ([0.05] if quick else [0.03, 0.08]):
        m.append(ours(f"adacorr (no correction) thr={thr}", {**ADACORR, "reuse_threshold": thr, "correction": False}, thr))
    if not quick:
        m.append(ours("adacorr blend thr=0.05", {**ADACORR, "reuse_threshold": 0.05, "blend": True}, 0.05))
        m.append(ours("adacorr (paper's score) gamma=0.01 thr=0.05",
                      {**ADACORR, "score": "paper", "gamma": 0.01, "reuse_threshold": 0.05}, 0.01))
    for n in ([2, 4] if quick else [2, 3, 4]):
        for corr in (False, True):
            label = "interval" + (" + AdaCorrection" if corr else "")
            m.append(ours(f"{label} N={n}", {**BLOCK, "policy": "interval", "interval": n, "correction": corr,
                                                    "reuse_threshold": veto, "max_consecutive_reuses": n}, n))
    for thr in ([0.1, 0.3] if quick else [0.1, 0.2, 0.3]):
        for corr in (False, True):
            label = "first_block" + (" + AdaCorrection" if corr else "")
            m.append(ours(f"{label} thr={thr}", {**BLOCK, "policy": "first_block", "first_block_threshold": thr, "correction": corr,
                                                        "reuse_threshold": veto, "max_consecutive_reuses": 50}, thr))
    if model_name != "dit":  # the ONNX rows export the DiT
        m += peer_methods(quick)
    else:
        m.append(methods.onnx_dit("onnxruntime uncached", None, workdir))
        m.append(methods.onnx_dit("onnxruntime adacorr thr=0.05", {**ADACORR, "reuse_threshold": 0.05}, workdir, 0.05))
        m.append(methods.onnx_dit("onnxruntime interval N=2", {**BLOCK, "policy": "interval", "interval": 2, "correction": False},
                                workdir, 2))
        m.append(methods.onnx_dit("onnxruntime default", {}, workdir))
    return m


def peer_methods(quick: bool) -> list[methods.Method]:
    """diffusers' own cache hooks and cache-dit's DBCache, on the same Flux or SD3 transformer (eager;
    diffusers' FirstBlockCache cannot run SD3: its rows are reported as failed)."""
    out: list[methods.Method] = []
    try:
        from diffusers import FirstBlockCacheConfig

        for thr in ([0.1, 0.3] if quick else [0.1, 0.2, 0.3]):
            out.append(peer_caches.diffusers_cache(f"diffusers FirstBlockCache thr={thr}", partial(FirstBlockCacheConfig, threshold=thr), thr))
    except ImportError as exc:  # pragma: no cover - depends on the installed diffusers
        logger.warning("diffusers FirstBlockCacheConfig unavailable: %s", exc)
    try:
        from diffusers import TaylorSeerCacheConfig

        for interval in ([3] if quick else [2, 4]):
            out.append(peer_caches.diffusers_cache(
                f"diffusers TaylorSeer interval={interval}",
                partial(TaylorSeerCacheConfig, cache_interval=interval, disable_cache_before_step=2), interval))
    except (ImportError, TypeError) as exc:  # pragma: no cover
        logger.warning("diffusers TaylorSeerCacheConfig unavailable: %s", exc)
    # cache-dit's DBCache on the whole block sequence: F1B0 (first block computes, its residual
    # decides, no trailing blocks) is the FBCache equivalent; warmup 2 steps as ours, otherwise
    # cache-dit's defaults (no cap on cached steps)
    try:
        for thr in ([0.12] if quick else [0.08, 0.12, 0.2]):
            out.append(peer_caches.cache_dit_cache(
                f"cache-dit DBCache F1B0 W2 thr={thr}",
                {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "max_warmup_steps": 2, "residual_diff_threshold": thr}, thr))
        out.append(peer_caches.cache_dit_cache(
            "cache-dit DBCache F1B0 W2 + TaylorSeer O1 thr=0.12",
            {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "max_warmup_steps": 2, "residual_diff_threshold": 0.12}, 0.12,
            taylorseer={"taylorseer_order": 1}))
    except ImportError as exc:  # cache-dit is optional (extra "bench")
        logger.warning("cache-dit unavailable: %s", exc)
    return out


def real_features(classifier, n: int = 500):
    images, _ = make_dataset(n, seed=HELDOUT_SEED)
    return extract_features(classifier, images)


def run(model_name: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    model = load_reference(model_name)
    guidance = DEFAULT_GUIDANCE[model_name] if args.guidance is None else args.guidance
    sampler = partial(reference_sampler(model_name), guidance_scale=guidance)
    classifier = load_reference_classifier()
    feats = real_features(classifier)
    labels = [i % 10 for i in range(args.images)]
    workdir = tempfile.mkdtemp(prefix="adacorr_bench_")
    methods = methods_for(model_name, args.quick, args.lowering, workdir)
    if args.only:
        methods = [m for m in methods if m.kind == "baseline" or any(s in m.name for s in args.only)]
    # each method is timed against the uncached run of its lowering, interleaved (bench.run_method)
    baselines = {m.lowering: m for m in methods if m.kind == "baseline"}
    runs: list[bench.Run] = []
    for k, method in enumerate(methods):
        t0 = time.perf_counter()
        baseline = None if method.kind == "baseline" else baselines.get(method.lowering)
        try:
            runs.append(bench.run_method(method, model, sampler, labels, args.steps, args.seed, reps=args.reps,
                                         baseline=baseline))
        except Exception as exc:  # a peer that cannot run is reported, not fatal
            logger.warning("%s failed: %s: %s", method.name, type(exc).__name__, exc)
            continue
        logger.warning("[%d/%d] %s: %.1f s", k + 1, len(methods), method.name, time.perf_counter() - t0)
    reference = runs[0].images  # uncached eager, same seeds
    base_time = {r.method.lowering: r.median_seconds for r in runs if r.method.kind == "baseline"}
    rows = []
    for r in runs:
        q = metrics.quality(r.images, reference, labels, classifier, feats)
        rows.append({
            "method": r.method.name, "kind": r.method.kind, "policy": r.method.policy, "correction": r.method.correction,
            "setting": r.method.setting, "lowering": r.method.lowering, "options": r.method.options,
            "seconds": r.seconds, "median_seconds": r.median_seconds,
            # paired: median of per-pair ratios (uncached / method, interleaved); a baseline: 1
            "speedup": r.speedup if r.ratios else base_time[r.method.lowering] / r.median_seconds,
            "speedup_min": r.speedup_spread[0] if r.ratios else None,
            "speedup_max": r.speedup_spread[1] if r.ratios else None,
            "speedup_pairs": r.ratios, "baseline_seconds": r.baseline_seconds,
            # across runs (medians of separate runs, not interleaved)
            "speedup_vs_eager": base_time["eager"] / r.median_seconds,
            "skipped": r.skipped_fraction, "block_calls": r.block_calls, "block_evals": r.block_evals,
            "compile_seconds": r.compile_seconds, **q,
        })
    heat = next((r for r in runs if r.method.name == args.heatmap_method), None)
    if heat is not None and heat.stats is not None:
        plots.lambda_heatmap(heat.stats, str(args.out / f"lambda_heatmap_{model_name}.png"),
                             f"reference {model_name}: {heat.method.name}, {args.steps} steps")
    return {
        "model": model_name, "steps": args.steps, "images": len(labels), "labels": labels, "seed": args.seed,
        "guidance": guidance, "reps": args.reps, "threads": torch.get_num_threads(),
        "device": f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads",
        "torch": torch.__version__, "command": " ".join(sys.argv), "lowering": args.lowering, "rows": rows,
    }


def markdown(result: dict) -> str:
    lines = [
        f"### Reference {result['model']}: {result['images']} images, {result['steps']} steps, CFG {result['guidance']}, "
        f"{result['device']}, median of {result['reps']}",
        "",
        f"Command: `{result['command']}`",
        "",
        "Speedup (same lowering): median of per-pair ratios, each pair an uncached generation then the method's, "
        "timed interleaved in one process (min-max of the pairs in brackets). Speedup vs eager: ratio of the medians of "
        "separate runs.",
        "",
        "| method | lowering | blocks skipped | speedup (same lowering) | speedup vs eager | PSNR mean / worst (dB) | SSIM mean / worst | FID proxy | class acc |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        psnr = "exact" if r["psnr_min"] == float("inf") else f"{r['psnr_mean']:.1f} / {r['psnr_min']:.1f}"
        speed = f"{r['speedup']:.2f}x" + (f" ({r['speedup_min']:.2f}-{r['speedup_max']:.2f})" if r.get("speedup_min") else "")
        lines.append(
            f"| {r['method']} | {r['lowering']} | {r['skipped']:.1%} | {speed} | {r['speedup_vs_eager']:.2f}x | {psnr} | "
            f"{r['ssim_mean']:.3f} / {r['ssim_min']:.3f} | {r.get('fid_proxy', float('nan')):.2f} | {r.get('class_accuracy', float('nan')):.2f} |"
        )
    return "\n".join(lines) + "\n"


def pareto(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[dict]] = {}
    for r in result["rows"]:
        if r["kind"] == "baseline" or "caching off" in r["method"] or "(inductor)" in r["method"]:
            key = r["method"]
        else:
            key = r["method"].rsplit(" ", 1)[0] if r["setting"] is not None else r["method"]
        groups.setdefault(key, []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(15, 6), constrained_layout=True)
    for ax, metric, label in ((axes[0], "psnr_mean", "PSNR vs uncached (dB), higher is better"),
                              (axes[1], "fid_proxy", "FID proxy vs real data, lower is better")):
        for key, rows in groups.items():
            rows = sorted(rows, key=lambda r: r["skipped"])
            xs = [r["skipped"] for r in rows]
            ys = [min(r[metric], 60.0) for r in rows]
            marker = "s" if rows[0]["kind"] == "ours" and rows[0]["correction"] else ("^" if rows[0]["kind"] == "peer" else "o")
            ax.plot(xs, ys, marker=marker, linestyle="-" if len(rows) > 1 else "none", label=key)
        ax.set_xlabel("fraction of block evaluations skipped (counted)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(f"reference {result['model']}: quality vs work saved ({result['steps']} steps)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 6), constrained_layout=True)
    for key, rows in groups.items():
        rows = sorted(rows, key=lambda r: r["speedup"])
        marker = "s" if rows[0]["kind"] == "ours" and rows[0]["correction"] else ("^" if rows[0]["kind"] == "peer" else "o")
        ax.plot([r["speedup"] for r in rows], [min(r["psnr_mean"], 60.0) for r in rows], marker=marker,
                linestyle="-" if len(rows) > 1 else "none", label=key)
    ax.set_xlabel("wall-clock speedup vs uncached run of the same lowering (same process)")
    ax.set_ylabel("PSNR vs uncached (dB), capped at 60")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path.with_name(path.stem + "_speed.png"), dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["dit", "flux", "sd3", "both"], default="both",
                        help="a reference model; both: dit and flux (the models the defaults were tuned on)")
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (default: the sampler's, DiT 1.5, Flux and SD3 4.0)")
    parser.add_argument("--quick", action="store_true", help="fewer settings per policy")
    parser.add_argument("--lowering", choices=["inductor", "eager"], default="inductor",
                        help="lowering of our methods (default: %(default)s)")
    parser.add_argument("--only", nargs="*", help="run only methods whose name contains one of these (plus baselines)")
    parser.add_argument("--heatmap-method", default="adacorr thr=0.05")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--tag", default="", help="suffix for the result files")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the result files (default: %(default)s)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")  # read when cache-dit is imported
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in (["dit", "flux"] if args.model == "both" else [args.model]):
        result = run(name, args)
        stem = f"benchmark_{name}{args.tag}"
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
        md = markdown(result)
        (args.out / f"{stem}.md").write_text(md)
        pareto(result, args.out / f"pareto_{name}{args.tag}.png")
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
