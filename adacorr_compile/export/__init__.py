"""Export: AdaCorrection's guarded regions as one ONNX step graph (run by onnxruntime)
and as TensorRT engines. See :mod:`adacorr_compile.export.onnx`."""

from typing import Any

from .onnx import ExportError, ExportResult, initial_state, read_metadata, to_onnx
from .tensorrt import TensorRTUnavailable, check_tensorrt_patterns, compile_with_torch_tensorrt, to_tensorrt

__all__ = [
    "ExportError",
    "ExportResult",
    "OnnxRunner",
    "TensorRTUnavailable",
    "bench_onnxruntime",
    "check_tensorrt_patterns",
    "compile_with_torch_tensorrt",
    "initial_state",
    "read_metadata",
    "to_onnx",
    "to_tensorrt",
]


def __getattr__(name: str) -> Any:
    """The onnxruntime runner on first use: it needs numpy (the ``export`` extra), which the core
    does not, and ``adacorr export --help`` imports this package to build its parser."""
    if name in ("OnnxRunner", "bench_onnxruntime"):
        from . import runner

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
