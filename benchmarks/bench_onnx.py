"""onnxruntime: per-step time of the uncached vs the cached (AdaCorrection) ONNX export.

    python benchmarks/bench_onnx.py                         # tiny DiT (adacorr_compile.lab.tiny)
    python benchmarks/bench_onnx.py --layers 12 --heads 6 --head-dim 64 --sample-size 32

Exports a DiT both ways (``to_onnx(..., cache=False)`` and ``to_onnx(..., config)``),
samples ``--steps`` steps with slowly drifting inputs (the tests' loop) through
:func:`adacorr_compile.export.bench_onnxruntime` in one process, prints the result and
writes it to benchmarks/results/onnx_<name>.json (``onnx_tiny.json`` for the default).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from adacorr_compile.export import bench_onnxruntime, to_onnx

RESULTS = Path(__file__).resolve().parent / "results"


def make_dit(layers: int, heads: int, head_dim: int, sample_size: int):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8, num_layers=layers,
        sample_size=sample_size, patch_size=2, num_embeds_ada_norm=10,
    ).eval()

    def inputs(step: int, t: float, batch: int = 2):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(batch, 4, sample_size, sample_size, generator=g) + 0.01 * step
        return dict(hidden_states=x, timestep=torch.full((batch,), t), class_labels=torch.arange(batch) % 10)

    return model, inputs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=8)
    p.add_argument("--sample-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="adacorr option of the cached export")
    p.add_argument("--name", default=None, help="result name (default: tiny for the default size, else from the size)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from adacorr_compile.cli_export import parse_option

    options = dict(parse_option(o) for o in args.option)
    tiny = (args.layers, args.heads, args.head_dim, args.sample_size) == (4, 2, 8, 8)
    name = args.name or ("tiny" if tiny else f"dit_L{args.layers}_D{args.heads * args.head_dim}_S{args.sample_size}")
    model, inputs = make_dit(args.layers, args.heads, args.head_dim, args.sample_size)
    session_options = None
    if args.threads:
        import onnxruntime as ort

        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = args.threads
    with tempfile.TemporaryDirectory() as tmp:
        plain, cached = os.path.join(tmp, "plain.onnx"), os.path.join(tmp, "cached.onnx")
        t0 = time.perf_counter()
        with torch.no_grad():
            to_onnx(model, inputs(0, 900.0), plain, cache=False)
            to_onnx(model, inputs(0, 900.0), cached, config=options)
        export_s = time.perf_counter() - t0
        result = bench_onnxruntime(plain, cached, inputs, args.steps, repeats=args.repeats, session_options=session_options)
    result.update(
        model={"family": "DiTTransformer2DModel", "layers": args.layers, "heads": args.heads, "head_dim": args.head_dim,
               "sample_size": args.sample_size, "batch": 2},
        options=options,
        export_seconds=round(export_s, 1),
        machine={"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
    )
    import onnxruntime

    result["machine"]["onnxruntime"] = onnxruntime.__version__
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"onnx_{name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"onnxruntime {result['cached']['provider']}: uncached {result['uncached']['median_ms']:.2f} ms/step (median), "
        f"cached {result['cached']['median_ms']:.2f} ms/step; mean per step {result['uncached']['mean_ms']:.2f} vs "
        f"{result['cached']['mean_ms']:.2f} ms: speedup {result['speedup']:.2f}x at reuse fraction {result['reuse_fraction']:.2f}"
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
