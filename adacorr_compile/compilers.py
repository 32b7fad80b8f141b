"""compilers: the one place that turns an FX graph into a compiled callable.

:func:`compile_graph` lowers a graph the way ``config.lowering`` says (the graph
itself for ``"eager"``, Inductor's ``compile_fx`` behind a :class:`CompiledPart`
for ``"inductor"``, :func:`compile_with_torch_tensorrt` for ``"tensorrt"``);
:func:`inductor_patches` gives the Inductor config patches of
``config.inductor_mode``. The lowering pass (:mod:`adacorr_compile.passes.lower`:
glue and block bodies), the regions' fused math
(:mod:`adacorr_compile.runtime.fused`), the backend's fallback
(:mod:`adacorr_compile.backend`) and the TensorRT export
(:mod:`adacorr_compile.export.tensorrt`) all compile through here.

This module is a leaf: it imports only :mod:`adacorr_compile.config`, torch and the
standard library, never ``passes``, ``runtime`` or ``export``. Those layers sit
above it and import it, so keeping it free of them is what keeps the package's
import graph acyclic (``runtime.fused`` compiles its math without importing the
passes, and the passes reach torch-tensorrt without importing the exporters).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from .config import AdaCorrConfig

logger = logging.getLogger("adacorr_compile")

TORCH_TENSORRT_HINT = "lowering='tensorrt' needs torch-tensorrt: pip install torch-tensorrt (and a CUDA GPU)"


class TensorRTUnavailable(ImportError):
    """A TensorRT package this route needs is not installed."""


# --------------------------------------------------------------------------- Inductor


class CompiledPart(torch.nn.Module):
    """A compiled piece of graph behind a module call (boxed calling convention handled)."""

    def __init__(self, fn: Callable[..., Any], boxed: bool, name: str) -> None:
        super().__init__()
        self.fn = fn
        self.boxed = boxed
        self.part_name = name
        self.activations: list[int] | None = None  # argument positions that may be non-contiguous

    def forward(self, *args: Any) -> Any:
        # compiled for contiguous inputs (see compile_graph); parameters always are, so
        # only the other tensor positions (found on the first call) are checked
        if self.activations is None:
            self.activations = [i for i, a in enumerate(args)
                                if isinstance(a, torch.Tensor) and not isinstance(a, torch.nn.Parameter)]
        strided = [i for i in self.activations if not args[i].is_contiguous()]
        if strided:  # those alone: a call per parameter is measurable on a per-step path
            args = list(args)
            for i in strided:
                args[i] = args[i].contiguous()
        return self.fn(list(args)) if self.boxed else self.fn(*args)

    def extra_repr(self) -> str:
        return self.part_name


def inductor_patches(config: AdaCorrConfig) -> dict[str, Any]:
    """Inductor config patches of ``config.inductor_mode`` (as ``torch.compile(mode=...)``)."""
    return dict(torch._inductor.list_mode_options(config.inductor_mode)) if config.inductor_mode != "default" else {}


def cuda_graphed(config: AdaCorrConfig) -> bool:
    """Whether ``config``'s compiled parts run as CUDA graphs (``inductor_mode``
    ``"reduce-overhead"`` or ``"max-autotune"`` on a CUDA device). A graphed part returns
    its graph's static output buffers, which its next replay overwrites: a tensor the
    runtime keeps from one model call to the next must then be a copy."""
    return config.lowering != "eager" and bool(inductor_patches(config).get("triton.cudagraphs", False))


def without_cuda_graphs(config: AdaCorrConfig) -> AdaCorrConfig:
    """``config`` with Inductor's CUDA graphs off and its other mode options kept (for the
    regions' per-step math, whose outputs are the caches: they must be allocations of their
    own, not static graph buffers)."""
    modes = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}
    return config.replace(inductor_mode=modes.get(config.inductor_mode, config.inductor_mode))


def compile_graph(gm: fx.GraphModule, example_inputs: list[Any], config: AdaCorrConfig, name: str) -> torch.nn.Module:
    """Lower one FX graph the way ``config.lowering`` says; the one place that picks a compiler.

    ``example_inputs`` are fake tensors (Dynamo's, possibly of symbolic shapes, with
    the SymInts of the symbols they use) or real tensors."""
    if config.lowering == "eager":
        return gm
    if config.lowering == "tensorrt":
        return compile_with_torch_tensorrt(gm, example_inputs, name)
    from torch._guards import TracingContext, tracing
    from torch._inductor.compile_fx import compile_fx
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    fake_mode = next((x.fake_mode for x in example_inputs if hasattr(x, "fake_mode")), None)
    if fake_mode is None:  # SymInt inputs alone still name their shape environment
        shape_env = next((x.node.shape_env for x in example_inputs if isinstance(x, torch.SymInt)), None)
        if shape_env is not None:
            from torch._subclasses.fake_tensor import FakeTensorMode

            fake_mode = FakeTensorMode(shape_env=shape_env)
    # Compiled pieces exchange tensors whose layout Inductor chose, which need not be
    # the layout eager propagation predicted: compile for contiguous inputs and let
    # CompiledPart make its inputs contiguous.
    if fake_mode is not None:
        with fake_mode:
            example_inputs = [x.contiguous() if isinstance(x, torch.Tensor) else x for x in example_inputs]
    else:
        example_inputs = [x.contiguous() if isinstance(x, torch.Tensor) else x for x in example_inputs]
    # compile under a tracing context of the inputs' own fake mode (its shape environment
    # is Dynamo's: guards Inductor adds become guards of the user's graph, as for plain Inductor)
    with unset_fake_temporarily(), tracing(TracingContext(fake_mode) if fake_mode is not None else None):
        fn = compile_fx(gm, example_inputs, config_patches=inductor_patches(config))
    return CompiledPart(fn, _is_boxed(fn), name)


def _is_boxed(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` takes its inputs as one list. ``_boxed_call`` alone is not
    trustworthy: AOTAutograd's unboxed wrapper copies it from the boxed function it wraps."""
    code = getattr(fn, "__code__", None)
    if code is not None:
        return code.co_argcount == 1 and not code.co_flags & inspect.CO_VARARGS
    return bool(getattr(fn, "_boxed_call", False))


# --------------------------------------------------------------------------- torch-tensorrt bodies


def compile_with_torch_tensorrt(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], name: str) -> torch.nn.Module:
    """Compile one block body (an FX graph from the backend; parameters are inputs, so the
    engine takes the weights as inputs) with torch-tensorrt for ``lowering="tensorrt"``.
    Symbolic dimensions get a TensorRT profile from 1 to 8x the example size. Raises
    :class:`TensorRTUnavailable` naming the package. Not run here (no GPU, no
    torch-tensorrt): written against torch-tensorrt's documented ``compile(ir="dynamo")``.

    Note: :func:`compile_graph` also sends glue pieces here when ``lowering="tensorrt"``."""
    try:
        import torch_tensorrt
    except ImportError as exc:
        raise TensorRTUnavailable(TORCH_TENSORRT_HINT) from exc
    inputs = []
    for x in example_inputs:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: torch-tensorrt bodies take tensors only, got {type(x).__name__}")
        dims = list(x.shape)
        if any(isinstance(d, torch.SymInt) for d in dims):
            opt = [int(d.node.hint) if isinstance(d, torch.SymInt) else int(d) for d in dims]
            lo = [1 if isinstance(d, torch.SymInt) else int(d) for d in dims]
            hi = [8 * o if isinstance(d, torch.SymInt) else o for d, o in zip(dims, opt)]
            inputs.append(torch_tensorrt.Input(min_shape=lo, opt_shape=opt, max_shape=hi, dtype=x.dtype))
        else:
            inputs.append(torch_tensorrt.Input(shape=[int(d) for d in dims], dtype=x.dtype))
    logger.info("adacorr: compiling %s with torch-tensorrt", name)
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    # the backend lowers under Dynamo's fake mode; torch-tensorrt traces with its own
    with unset_fake_temporarily():
        compiled = torch_tensorrt.compile(gm, ir="dynamo", inputs=inputs, min_block_size=1)
    return _TensorRTPart(compiled, name)


class _TensorRTPart(torch.nn.Module):
    def __init__(self, fn: Any, name: str) -> None:
        super().__init__()
        self.fn = fn
        self.part_name = name

    def forward(self, *args: Any) -> Any:
        args = tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)
        out = self.fn(*args)
        return tuple(out) if isinstance(out, (list, tuple)) else (out,)

    def extra_repr(self) -> str:
        return self.part_name
