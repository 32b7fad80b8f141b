"""``adacorr export onnx|tensorrt``: export a model with its guarded regions.

::

    adacorr export onnx --model dit --out dit.onnx --option reuse_threshold=0.1
    adacorr export onnx --model dit --out dit.onnx --options calib.json   # adacorr calibrate's choice
    adacorr export onnx --model mypkg.models:make --out m.onnx --dynamic tokens
    adacorr export tensorrt --model flux --out flux.engine --min-batch 1 --max-batch 4

``--model`` is a tiny family (``dit``, ``pixart``, ``sd3``, ``flux``, ...) or
``package.module:factory`` returning ``(model, inputs)`` with ``inputs(step, t)`` (and
optionally ``batch=``) giving one step's forward keyword arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from typing import Any, Callable, Iterator

from .cli_common import CliError, load_factory, parse_option

logger = logging.getLogger("adacorr_compile")


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """``--options FILE`` (a calibration file or a JSON object of options), then each
    ``--option KEY=VALUE`` over it."""
    from .calibrate import load_options
    from .config import AdaCorrConfig

    options = load_options(args.options) if args.options else {}  # a bad file: a ValueError naming it
    options.update(dict(args.option or []))
    AdaCorrConfig.from_options(options)  # a bad option: a ValueError naming it (usage, exit code 2)
    return options


def _make_inputs(inputs: Callable[..., dict[str, Any]], t: float, batch: int | None) -> dict[str, Any]:
    if batch is None:
        return inputs(0, t)
    try:
        return inputs(0, t, batch=batch)
    except TypeError as exc:
        raise ValueError(f"the model's inputs() takes no batch= argument ({exc})") from None


@contextlib.contextmanager
def _refusals() -> Iterator[None]:
    """An export the exporter refuses (:class:`ExportError`, its message says why): one line, exit code 2."""
    from .export.onnx import ExportError

    try:
        yield
    except ExportError as exc:
        logger.debug("adacorr export refused", exc_info=True)
        raise CliError(f"adacorr export: {exc}") from None


def cmd_export_onnx(args: argparse.Namespace) -> int:
    import torch

    from .export import to_onnx

    options = _options(args)
    model, inputs = load_factory(args.model)()
    example = _make_inputs(inputs, args.t, args.batch)
    with torch.no_grad(), _refusals():
        result = to_onnx(model, example, args.out, config=options, dynamic=args.dynamic, opset=args.opset,
                         cache=not args.no_cache)
    summary = {
        "path": result.path,
        "regions": result.regions,
        "state_inputs": len(result.states),
        "dynamic_axes": result.dynamic,
        "if_nodes": result.checks.get("if_nodes"),
        "opset": args.opset,
        "tensorrt_pattern_problems": result.checks.get("problems"),
    }
    print(json.dumps(summary, indent=2))
    return 0


def cmd_export_tensorrt(args: argparse.Namespace) -> int:
    import os

    import torch

    from .export import read_metadata, to_onnx
    from .export.tensorrt import TensorRTUnavailable, profiles_for, tensorrt_available, to_tensorrt

    if not tensorrt_available():
        print("adacorr export tensorrt: TensorRT's Python package is not installed (pip install tensorrt; needs a CUDA GPU). "
              "The ONNX export (adacorr export onnx) works without it.", file=sys.stderr)
        return 2
    options = _options(args)
    model, inputs = load_factory(args.model)()
    onnx_path = args.onnx or os.path.splitext(args.out)[0] + ".onnx"
    if not (args.onnx and os.path.exists(args.onnx)):
        with torch.no_grad(), _refusals():
            to_onnx(model, _make_inputs(inputs, args.t, args.opt_batch), onnx_path, config=options, dynamic=args.dynamic,
                    opset=args.opset)
    meta = read_metadata(onnx_path)

    def shapes(batch: int) -> dict[str, list[int]]:
        kw = _make_inputs(inputs, args.t, batch)
        return {n: list(kw[n].shape) for n in meta["model_inputs"]}

    profiles = profiles_for(meta, shapes(args.min_batch), shapes(args.opt_batch), shapes(args.max_batch))
    try:
        engine = to_tensorrt(onnx_path, args.out, profiles, fp16=args.fp16)
    except TensorRTUnavailable as exc:
        print(f"adacorr export tensorrt: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"onnx": onnx_path, "engine": engine, "regions": meta["regions"]}, indent=2))
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    from .export.onnx import DEFAULT_OPSET, DYNAMIC_MODES

    p.add_argument("--model", default="dit", help="dit | pixart | sd3 | flux (tiny configs) or package.module:factory "
                   "(returns (model, inputs) with inputs(step, t[, batch]) -> forward kwargs)")
    p.add_argument("--option", action="append", type=parse_option, metavar="KEY=VALUE",
                   help="an adacorr option (repeatable), e.g. --option reuse_threshold=0.1 --option policy=interval; "
                        "overrides --options")
    p.add_argument("--options", default=None, metavar="FILE",
                   help="a JSON file of adacorr options: adacorr calibrate's output (its chosen options) or a plain object")
    p.add_argument("--dynamic", default="batch", choices=DYNAMIC_MODES,
                   help="input axes left dynamic: batch (default), tokens (also sequence axes), all (also latent H/W), static")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET}; < 23 avoids the fused Attention op)")
    p.add_argument("--t", type=float, default=900.0, help="timestep of the example inputs")


def add_parser(subparsers: Any) -> None:
    """Register ``adacorr export`` with its ``onnx`` and ``tensorrt`` subcommands."""
    export = subparsers.add_parser("export", help="export the cache-guarded model as ONNX (onnxruntime) or a TensorRT engine")
    sub = export.add_subparsers(dest="export_format", required=True)
    p = sub.add_parser("onnx", help="one ONNX step graph: model inputs + cache state in, outputs + new state out; one If per region")
    _common(p)
    p.add_argument("--out", required=True, help="path of the .onnx file")
    p.add_argument("--batch", type=int, default=None, help="batch size of the example inputs (the batch axis stays dynamic)")
    p.add_argument("--no-cache", action="store_true", help="export the plain model (no regions, no state): the uncached baseline")
    p.set_defaults(func=cmd_export_onnx)
    p = sub.add_parser("tensorrt", help="a TensorRT engine built from the ONNX step graph (If -> IIfConditional); needs tensorrt")
    _common(p)
    p.add_argument("--out", required=True, help="path of the engine file")
    p.add_argument("--onnx", default=None, help="an existing ONNX export to build from (otherwise exported next to --out)")
    p.add_argument("--min-batch", type=int, default=1)
    p.add_argument("--opt-batch", type=int, default=2)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--fp16", action="store_true", help="allow FP16 kernels")
    p.set_defaults(func=cmd_export_tensorrt)
