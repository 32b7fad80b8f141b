"""Export: AdaCorrection's guarded regions as one ONNX step graph (run by onnxruntime)
and as TensorRT engines. See :mod:`adacorr_compile.export.onnx`."""

from .onnx import ExportError, ExportResult, initial_state, read_metadata, to_onnx
from .runner import OnnxRunner, bench_onnxruntime
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
