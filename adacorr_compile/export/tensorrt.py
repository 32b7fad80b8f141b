"""TensorRT: engines from the exported ONNX step graph, and torch-tensorrt block bodies.

Two routes, both needing NVIDIA packages that are imported only when called:

* :func:`to_tensorrt` builds one engine from the ONNX step graph of
  :func:`adacorr_compile.export.to_onnx` with TensorRT's ONNX parser, which turns each
  region's ``If`` into an ``IIfConditional``: the decision stays on the device. Needs the
  ``tensorrt`` Python package (``pip install tensorrt``) and a GPU.
* The fallback, one engine per block body with the host deciding, is the backend's
  ``lowering="tensorrt"``: ``torch.compile(model, backend="adacorr",
  options={"lowering": "tensorrt"})`` compiles each distinct block body with
  :func:`~adacorr_compile.compilers.compile_with_torch_tensorrt` (glue with Inductor) and the
  :class:`~adacorr_compile.runtime.region.GuardedRegion` decides on the host. Needs
  ``torch-tensorrt``.

:func:`check_tensorrt_patterns` needs neither: it checks an ONNX graph for what
TensorRT's parser is known to reject (opset 23 ``Attention``, ``If`` branches whose
outputs differ in count, rank or type or share names, sequence/optional types).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Sequence

# the torch-tensorrt route lives with the other compilers (a leaf module the passes can
# import without the exporters); re-exported here, where it has always been importable
from ..compilers import TORCH_TENSORRT_HINT, TensorRTUnavailable, compile_with_torch_tensorrt  # noqa: F401
from .dims import eval_dim

logger = logging.getLogger("adacorr_compile")

TENSORRT_HINT = "to_tensorrt needs TensorRT's Python package: pip install tensorrt (and a CUDA GPU)"

# ops TensorRT's ONNX parser does not take (sequence and optional types) or fails on in
# an If (opset 23 Attention on some TensorRT versions)
_REJECTED_OPS = {
    "Attention": "opset-23 Attention (export at opset <= 22 so attention is decomposed)",
    "SequenceConstruct": "sequence type",
    "SequenceAt": "sequence type",
    "SequenceEmpty": "sequence type",
    "SequenceInsert": "sequence type",
    "SplitToSequence": "sequence type",
    "ConcatFromSequence": "sequence type",
    "Optional": "optional type",
    "OptionalGetElement": "optional type",
    "OptionalHasElement": "optional type",
}


def tensorrt_available() -> bool:
    """Whether the ``tensorrt`` package imports (does not check for a GPU)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def torch_tensorrt_available() -> bool:
    try:
        import torch_tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def _import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTUnavailable(TENSORRT_HINT) from exc
    return trt


# --------------------------------------------------------------------------- checks without TensorRT


def _value_types(graph: Any) -> dict[str, tuple[int, int | None]]:
    """name -> (elem_type, rank or None) for the values a graph declares."""
    out = {}
    for v in list(graph.input) + list(graph.output) + list(graph.value_info):
        t = v.type.tensor_type
        rank = len(t.shape.dim) if t.HasField("shape") else None
        out[v.name] = (t.elem_type, rank)
    for init in graph.initializer:
        out[init.name] = (init.data_type, len(init.dims))
    return out


def _walk(graph: Any, where: str = "main") -> Any:
    for node in graph.node:
        yield node, where, graph
        for attr in node.attribute:
            if attr.type == attr.GRAPH:
                yield from _walk(attr.g, f"{where}/{node.name or node.op_type}.{attr.name}")
            for i, g in enumerate(attr.graphs):
                yield from _walk(g, f"{where}/{node.name or node.op_type}.{attr.name}[{i}]")


def check_tensorrt_patterns(model: Any, expect_if: int | None = None) -> dict[str, Any]:
    """Check an ``onnx.ModelProto`` for what TensorRT's ONNX parser rejects.

    Returns ``{"if_nodes", "ops", "opset", "problems"}``; ``problems`` lists every
    violation (empty when the graph passes): a rejected op, an ``If`` whose branches
    differ in output count, element type or rank, or whose branch outputs share a
    name, and (with ``expect_if``) a number of ``If`` nodes other than expected.
    Shape inference runs first so that branch output ranks are known.
    """
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as exc:  # noqa: BLE001 - inference is a best effort for the rank check
        logger.debug("shape inference failed: %s", exc)
        inferred = model
    problems: list[str] = []
    ops: set[str] = set()
    if_nodes = 0
    for node, where, _ in _walk(inferred.graph):
        ops.add(node.op_type)
        if node.op_type in _REJECTED_OPS:
            problems.append(f"{where}: {node.op_type} ({_REJECTED_OPS[node.op_type]})")
        if node.op_type != "If":
            continue
        if_nodes += 1
        branches = {a.name: a.g for a in node.attribute if a.type == a.GRAPH}
        then_g, else_g = branches.get("then_branch"), branches.get("else_branch")
        if then_g is None or else_g is None:
            problems.append(f"{where}: If {node.name} lacks a branch")
            continue
        if len(then_g.output) != len(else_g.output):
            problems.append(f"{where}: If {node.name}: branches have {len(then_g.output)} and {len(else_g.output)} outputs")
            continue
        t_types, e_types = _value_types(then_g), _value_types(else_g)
        names_t = [o.name for o in then_g.output]
        names_e = [o.name for o in else_g.output]
        if len(set(names_t)) != len(names_t) or len(set(names_e)) != len(names_e) or set(names_t) & set(names_e):
            problems.append(f"{where}: If {node.name}: branch output names are not distinct")
        for i, (a, b) in enumerate(zip(then_g.output, else_g.output)):
            ta, tb = t_types.get(a.name), e_types.get(b.name)
            if ta is None or tb is None:
                continue
            if ta[0] and tb[0] and ta[0] != tb[0]:
                problems.append(f"{where}: If {node.name} output {i}: element types {ta[0]} vs {tb[0]}")
            if ta[1] is not None and tb[1] is not None and ta[1] != tb[1]:
                problems.append(f"{where}: If {node.name} output {i}: ranks {ta[1]} vs {tb[1]}")
    if expect_if is not None and if_nodes != expect_if:
        problems.append(f"expected {expect_if} If nodes (one per guarded region), found {if_nodes}")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"if_nodes": if_nodes, "ops": sorted(ops), "opset": opset, "problems": problems}


# --------------------------------------------------------------------------- ONNX -> engine


def to_tensorrt(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str],
    profiles: Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]] | None = None,
    *,
    fp16: bool = False,
    workspace_bytes: int = 4 << 30,
) -> str:
    """Build a TensorRT engine from an ONNX step graph (``If`` -> ``IIfConditional``).

    ``profiles``: ``{input name: (min, opt, max)}`` shapes for every input with a dynamic
    dimension (model inputs and state inputs alike; state shapes follow the inputs, see
    :func:`adacorr_compile.export.onnx.initial_state`). The engine has the same inputs and
    outputs as the ONNX graph, so a runner threads the state the same way. Raises
    :class:`TensorRTUnavailable` without the ``tensorrt`` package and ``RuntimeError``
    with the parser's errors when the graph does not parse; then use the fallback
    (``lowering="tensorrt"``, one engine per block body, host decides).
    """
    trt = _import_tensorrt()
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    flags = 0
    if hasattr(trt, "NetworkDefinitionCreationFlag") and hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)  # TensorRT < 10
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(os.fspath(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    dynamic = [network.get_input(i) for i in range(network.num_inputs) if any(d < 0 for d in network.get_input(i).shape)]
    if dynamic:
        missing = [t.name for t in dynamic if not profiles or t.name not in profiles]
        if missing:
            raise ValueError(f"inputs with dynamic dimensions need (min, opt, max) shapes in profiles: {missing}")
        profile = builder.create_optimization_profile()
        for t in dynamic:
            lo, opt, hi = profiles[t.name]
            profile.set_shape(t.name, tuple(lo), tuple(opt), tuple(hi))
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}; see the TensorRT log")
    engine_path = os.fspath(engine_path)
    with open(engine_path, "wb") as f:
        f.write(serialized)
    logger.info("adacorr export: wrote TensorRT engine %s", engine_path)
    return engine_path


def profiles_for(metadata: Mapping[str, Any], min_shapes: Mapping[str, Sequence[int]], opt_shapes: Mapping[str, Sequence[int]],
                 max_shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[list[int], list[int], list[int]]]:
    """(min, opt, max) profiles for every input of an exported step graph, from the model
    inputs' shapes at the three points (state shapes are derived from them)."""
    out: dict[str, tuple[list[int], list[int], list[int]]] = {}
    for name in metadata["model_inputs"]:
        out[name] = (list(min_shapes[name]), list(opt_shapes[name]), list(max_shapes[name]))
    for s in metadata["states"]:
        out[s["name"]] = tuple([eval_dim(d, shapes) for d in s["dims"]] for shapes in (min_shapes, opt_shapes, max_shapes))  # type: ignore[assignment]
    return out
