"""Export a Diffusion Transformer with AdaCorrection's guarded regions as one ONNX step graph.

The artifact is one denoising step: its inputs are the model's tensor inputs plus the
cache state, its outputs the model's outputs plus the new state (and per-region
statistics). The runner (:class:`adacorr_compile.export.runner.OnnxRunner`) threads the
state from one call to the next. Each guarded region is an ONNX ``If`` whose
``then`` branch reuses the offset-corrected cache and whose ``else`` branch runs the block
and refreshes the cache.

How it is built, from the same passes as the compile path:

1. ``torch.export`` traces the model (batch dimension dynamic, optionally token axes);
   the unlifted graph (parameters as ``get_attr``) keeps ``nn_module_stack`` with paths
   already in normalized form (``transformer_blocks.3``).
2. :func:`~adacorr_compile.passes.find_blocks` and
   :func:`~adacorr_compile.passes.outline_blocks` find and outline the repeated blocks,
   exactly as for ``torch.compile(backend="adacorr")``.
3. Each ``adacorr_body_<k>`` call is replaced by a :class:`CondRegion` whose predicate is
   computed in-graph by the OEM (:mod:`adacorr_compile.oem`), the ACM
   (:mod:`adacorr_compile.acm`) and :func:`adacorr_compile.policies.decide_tensor` (the
   tensor twin of the host decision), and whose two branches are ``torch.cond`` branches.
4. ``torch.export`` traces that step module (state dims follow the input dims) and
   ``torch.onnx.export(..., dynamo=True)`` converts it (``torch.cond`` -> ``If``), at an
   opset below 23 by default so that attention is decomposed (opset 23's ``Attention``
   op inside an ``If`` does not build with TensorRT's parser on some versions).

The state tensors and how their shapes follow the inputs are written into the model's
metadata (key ``adacorr``) so the runner can create them without PyTorch tracing.

Modules: :mod:`.plan` (the state layout per region), :mod:`.cond` (:class:`CondRegion`, the
region step of :mod:`adacorr_compile.step` under ``torch.cond``), :mod:`.graph` (the step
graph), :mod:`.sizes` (graph surgery around the blocks), this one (tracing, dynamic shapes,
:func:`to_onnx`).

State per region ``k`` (names as ONNX inputs; outputs carry the suffix ``_next``), as the
runtime keeps it: only what the decision needs. Under ``scope="step"`` the leader keeps
nothing (except under ``first_block``), no region keeps inputs, and a span of chained
regions (:mod:`adacorr_compile.passes.chain_regions`) keeps one cache, held by its last
region (the residual from the span's input to its output); its first region, if it is the
probe, keeps only ``adacorr_r<k>_consecutive``:

* ``adacorr_r<k>_ref_in_<i>`` (``drift_reference="cached"``) or ``adacorr_r<k>_prev_in_<i>``
  (``"previous"``), ``scope="block"`` only: the observed inputs the OEM compares with;
* ``adacorr_r<k>_ref_res_<j>`` (``correction=True`` or ``policy="first_block"``): the
  residual ``output - input`` at the last compute, or ``adacorr_r<k>_ref_out_<j>``
  (otherwise): the output itself;
* ``adacorr_r<k>_valid`` (bool): the last compute was finite;
* ``adacorr_r<k>_consecutive`` (int64): reuses in a row;
* ``forecast="linear"`` only: ``adacorr_r<k>_prev_res_<j>`` / ``adacorr_r<k>_prev_out_<j>``
  (the cached values of the compute before the last), ``adacorr_r<k>_prev_valid`` (bool:
  they were finite and the change since them steady, ``acm.steady``),
  ``adacorr_r<k>_ref_step`` and ``adacorr_r<k>_prev_step`` (int64: the steps of the last two
  computes; equal until the region has computed twice).

Shared: ``adacorr_step`` (int64, steps done in this generation; 0 means empty cache),
``adacorr_steps_left`` (int64 input only: steps after this one, as the host computes it
for the ``final_steps`` guard, :data:`~adacorr_compile.policies.STEPS_UNKNOWN` when
unknown), ``adacorr_fb_ref`` (``first_block`` only: the first
block's residual at the last step it was not similar), ``adacorr_probe_ref_<j>``
(``scope="step"`` only: the first block's residuals when the probe last computed), with
``probe_forecast`` also ``adacorr_probe_prev_<j>`` (the reference before it) and
``adacorr_probe_ref_step``, ``adacorr_probe_prev_step`` (int64: their steps). Statistics outputs (one entry per
region): ``adacorr_reused``, ``adacorr_nonfinite`` (bool), ``adacorr_lambda``,
``adacorr_score`` (float, NaN while the cache is empty).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.utils._pytree as pytree

from ..config import AdaCorrConfig
from ..passes import find_blocks, outline_blocks
from ..passes.common import analysis
from ..policies import STEPS_UNKNOWN, first_region_computes_always
from .cond import CondRegion, RegionSignals, TensorVerdict  # noqa: F401 - re-exported
from .dims import ExportError, _expr_ast, eval_dim  # noqa: F401 - eval_dim and ExportError also re-exported from here
from .graph import StepGraph, _build_step_graph, _user_placeholders
from .plan import STATS_OUTPUTS, RegionPlan, StateSpec, _plan_regions  # noqa: F401 - re-exported
from .sizes import _aliasing_outputs, _bindings, _drop_noop_squeezes, _hoist_sizes, _sizes_from_tensors  # noqa: F401

logger = logging.getLogger("adacorr_compile")

METADATA_KEY = "adacorr"
DEFAULT_OPSET = 18  # < 23: no fused ``Attention`` op (see module docstring)
DYNAMIC_MODES = ("static", "batch", "tokens", "all")


# --------------------------------------------------------------------------- dynamic shapes


def _batch_size(kwargs: Mapping[str, Any]) -> int | None:
    for v in kwargs.values():
        if isinstance(v, torch.Tensor) and v.dim() >= 3:
            return int(v.shape[0])
    return None


def model_dynamic_shapes(kwargs: Mapping[str, Any], dynamic: str | Mapping[str, Mapping[int, Any]]) -> dict[str, Any]:
    """``torch.export`` dynamic shapes for the model's keyword inputs.

    ``"static"``: none. ``"batch"``: axis 0 of every tensor whose leading size equals the
    batch (that of the first input with 3 or more dimensions), one shared dimension.
    ``"tokens"``: also the sequence axis (1) of 3-d inputs ``[B, N, C]`` and axis 0 of
    2-d inputs that are not batched (Flux's ``img_ids``/``txt_ids``). ``"all"``: also
    the spatial axes of 4-d latents ``[B, C, H, W]``. Only use ``"tokens"``/``"all"``
    where the model computes with the token count symbolically (see the README: DiT and
    PixArt compare the latent size with their configuration in Python, so their image
    token count is fixed at export). A mapping is taken as ``{input: {axis: Dim}}``.
    """
    from torch.export import Dim

    if not isinstance(dynamic, str):
        return {k: dict(dynamic.get(k, {})) or None for k in kwargs}
    if dynamic not in DYNAMIC_MODES:
        raise ValueError(f"dynamic={dynamic!r}; expected one of {', '.join(DYNAMIC_MODES)} or a mapping")
    batch = Dim("batch", min=1, max=1 << 20)
    bsz = _batch_size(kwargs)
    if dynamic != "static" and bsz is not None and bsz < 2:
        raise ValueError("export with example inputs of batch >= 2: torch.export fixes dimensions of size 1")
    shapes: dict[str, Any] = {}
    for name, v in kwargs.items():
        if not isinstance(v, torch.Tensor):
            shapes[name] = None
            continue
        spec: dict[int, Any] = {}
        if dynamic != "static":
            batched = v.dim() >= 1 and bsz is not None and int(v.shape[0]) == bsz
            if batched:
                spec[0] = batch
            if dynamic in ("tokens", "all"):
                if v.dim() == 3 and batched:
                    spec[1] = Dim.DYNAMIC
                elif v.dim() == 2 and not batched:
                    spec[0] = Dim.DYNAMIC
            if dynamic == "all" and v.dim() == 4 and batched:
                spec[2] = spec[3] = Dim.DYNAMIC
        shapes[name] = spec or None
    return shapes



def _state_dynamic_shapes(states: list[StateSpec], model_shapes: Mapping[str, Any]) -> list[Any]:
    """State dims that are a model-input dim with a named ``Dim`` reuse it; other symbolic
    dims are ``Dim.AUTO`` (tracing unifies them with the inputs' dims)."""
    from torch.export import Dim

    out = []
    for s in states:
        spec: dict[int, Any] = {}
        for axis, d in enumerate(s.dims):
            if isinstance(d, int):
                continue
            named = None
            if isinstance(d, dict):
                named = (model_shapes.get(d["input"]) or {}).get(d["axis"])
            spec[axis] = named if named is not None and not isinstance(named, type(Dim.AUTO)) else Dim.AUTO
        out.append(spec or None)
    return out


def initial_state(states: Sequence[StateSpec], shapes: Mapping[str, Sequence[int]], like: str = "numpy") -> dict[str, Any]:
    """Zero state (empty cache) for the given model-input shapes; distinct buffers per state."""
    import numpy as np

    out: dict[str, Any] = {}
    for s in states:
        dims = [eval_dim(d, shapes) for d in s.dims]
        if like == "torch":
            out[s.name] = torch.zeros(dims, dtype=getattr(torch, s.dtype))
        else:
            out[s.name] = np.zeros(dims, dtype=np.dtype(s.dtype))
    return out


# --------------------------------------------------------------------------- entry point


@dataclass
class ExportResult:
    """What :func:`to_onnx` wrote, and what it checked."""

    path: str
    regions: list[str]
    states: list[str]
    dynamic: dict[str, Any]
    checks: dict[str, Any]
    metadata: dict[str, Any]


def _with_return_dict(model: torch.nn.Module, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    kw = dict(kwargs)
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if "return_dict" in params and "return_dict" not in kw:
        kw["return_dict"] = False
    return kw



def _export_model(model: torch.nn.Module, kwargs: dict[str, Any], dynamic: Any) -> tuple[Any, dict[str, Any]]:
    for name, value in kwargs.items():  # the step graph and its runner take flat tensor inputs
        if not isinstance(value, torch.Tensor) and any(isinstance(x, torch.Tensor) for x in pytree.tree_leaves(value)):
            raise ExportError(
                f"model input {name!r} is a {type(value).__name__} of tensors; the export takes tensors (and fixed "
                "non-tensor values) as keyword inputs: wrap the model to take its tensors as separate inputs"
            )
    shapes = model_dynamic_shapes(kwargs, dynamic)
    with torch.no_grad():
        ep = torch.export.export(model, (), kwargs, dynamic_shapes=shapes, strict=False)
    if _drop_noop_squeezes(ep.graph_module):
        logger.debug("adacorr export: removed no-op squeezes")
    return ep, shapes


def build_step_module(
    model: torch.nn.Module, example_inputs: Mapping[str, Any], config: Any = None, dynamic: Any = "batch"
) -> tuple[StepGraph, dict[str, Any], dict[str, Any]]:
    """Trace ``model``, find and outline its blocks, and build the step module.

    Returns ``(step_graph, model_kwargs, model_dynamic_shapes)``. Raises
    :class:`ExportError` when no block can be guarded (the reasons the passes logged).
    """
    cfg = AdaCorrConfig.from_options(config)
    model = model.eval()
    kwargs = _with_return_dict(model, example_inputs)
    ep, shapes = _export_model(model, kwargs, dynamic)
    gm = ep.module()
    bindings = _bindings(gm)
    _hoist_sizes(gm)
    gm = find_blocks(gm, cfg)
    info = analysis(gm)
    if not info.blocks:
        reasons = "; ".join(f"{w}: {r}" for w, r in info.skipped) or "no blocks found"
        raise ExportError(f"no guardable blocks in the exported graph: {reasons}")
    for where, reason in info.skipped:
        logger.info("adacorr export: left unguarded: %s: %s", where, reason)
    gm = outline_blocks(gm, cfg)
    plans = _plan_regions(gm, cfg, bindings)
    return _build_step_graph(gm, plans, cfg, bindings), kwargs, shapes


def _example_state(states: Sequence[StateSpec], kwargs: Mapping[str, Any]) -> list[torch.Tensor]:
    shapes = {k: tuple(v.shape) for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    init = initial_state(states, shapes, like="torch")
    return [init[s.name] for s in states]



@dataclass
class _Traced:
    """What :func:`to_onnx` converts: the exported program and its names."""

    program: Any
    kwargs: dict[str, Any]
    shapes: dict[str, Any]
    input_names: list[str]
    output_names: list[str]
    model_inputs: list[str]
    model_outputs: list[str]
    regions: list[str]
    states: list[StateSpec]


def _trace_step(model: torch.nn.Module, example_inputs: Mapping[str, Any], cfg: AdaCorrConfig, dynamic: Any) -> _Traced:
    """``torch.export`` of the step module (model inputs, state, ``adacorr_steps_left``)."""
    step, kwargs, shapes = build_step_module(model, example_inputs, cfg, dynamic)
    state_examples = _example_state(step.states, kwargs)
    user = [kwargs[n] for n in step.model_inputs]
    args = (*user, *state_examples, torch.tensor(STEPS_UNKNOWN, dtype=torch.int64))
    ds = [shapes.get(n) for n in step.model_inputs] + _state_dynamic_shapes(step.states, shapes) + [None]
    # torch.cond traces its branches with Dynamo; without this, the parameters it gets
    # as operands turn dynamic after the first region (automatic dynamic shapes)
    with torch.no_grad(), torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        ep = torch.export.export(step.module, tuple(args), dynamic_shapes=tuple(ds), strict=True)
    return _Traced(ep, kwargs, shapes, step.input_names, step.output_names, step.model_inputs, step.model_outputs,
                   [p.path for p in step.regions], step.states)


def _trace_plain(model: torch.nn.Module, example_inputs: Mapping[str, Any], dynamic: Any) -> _Traced:
    """``torch.export`` of the model as it is (``cache=False``: the uncached baseline)."""
    kwargs = _with_return_dict(model, example_inputs)
    ep, shapes = _export_model(model, kwargs, dynamic)
    model_inputs = [n.name for n in _user_placeholders(ep.module())]
    model_outputs = [f"output_{i}" for i in range(len(ep.graph_signature.user_outputs))]
    return _Traced(ep, kwargs, shapes, model_inputs, model_outputs, model_inputs, model_outputs, [], [])


def _config_metadata(cfg: AdaCorrConfig) -> dict[str, Any]:
    """The options as JSON values: a process group or device mesh (``decision_group``) is
    named, not stored; an exported model decides in one process."""
    group = cfg.decision_group
    named = cfg if isinstance(group, str) else dataclasses.replace(cfg, decision_group="none")
    out = dataclasses.asdict(named)
    if not isinstance(group, str):
        out["decision_group"] = type(group).__name__
    return out


def _metadata(traced: _Traced, cfg: AdaCorrConfig, cache: bool, opset: int) -> dict[str, Any]:
    """The model's ``adacorr`` metadata: what the runner needs to thread the state."""
    model_inputs = traced.model_inputs
    return {
        "format": 1,
        "cached": bool(cache),
        "config": _config_metadata(cfg),
        "regions": traced.regions,
        "model_inputs": model_inputs,
        # non-tensor inputs, fixed at export: the runner accepts them with these values only
        "fixed_inputs": {k: v for k, v in traced.kwargs.items()
                         if k not in model_inputs and k != "return_dict" and isinstance(v, (bool, int, float, str, type(None)))},
        "model_outputs": traced.model_outputs,
        "states": [dataclasses.asdict(s) for s in traced.states],
        "stats_outputs": list(STATS_OUTPUTS) if cache else [],
        "steps_left_input": "adacorr_steps_left" if cache else None,
        "timestep_arg": cfg.timestep_arg,
        "opset": opset,
        "dynamic": {k: sorted(v) if isinstance(v, dict) else None for k, v in traced.shapes.items() if k in model_inputs},
    }


def to_onnx(
    model: torch.nn.Module,
    example_inputs: Mapping[str, Any],
    path: str | os.PathLike[str],
    config: Any = None,
    *,
    dynamic: str | Mapping[str, Mapping[int, Any]] = "batch",
    opset: int = DEFAULT_OPSET,
    cache: bool = True,
    check: bool = True,
) -> ExportResult:
    """Export ``model`` (called as ``model(**example_inputs)``) as one ONNX step graph.

    ``config``: an :class:`~adacorr_compile.AdaCorrConfig` or an options dict, as for
    ``torch.compile(..., backend="adacorr", options=...)`` (``lowering`` and
    ``inductor_mode`` are irrelevant here; ``decision`` must be ``"batch"``).
    ``dynamic``: which input axes stay dynamic (:func:`model_dynamic_shapes`).
    ``opset``: ONNX opset; below 23 attention is decomposed (see module docstring).
    ``cache=False`` exports the plain model (no regions, no state): the uncached baseline.
    ``check``: run ``onnx.checker`` and the TensorRT-parser pattern checks
    (:func:`adacorr_compile.export.tensorrt.check_tensorrt_patterns`) and raise on failure.

    Non-tensor keyword inputs (``return_dict=False`` is added when the forward takes it)
    are fixed at export. The ONNX model's metadata (key ``adacorr``) describes the state.
    """
    import onnx

    from ..runtime.requests import BATCH
    from .tensorrt import check_tensorrt_patterns

    if BATCH.get():
        raise NotImplementedError("to_onnx: per-request state (adacorr_compile.requests) is not exported yet: the "
                                  "ONNX step graph holds one generation's cache; export outside requests()")
    cfg = AdaCorrConfig.from_options(config)
    path = os.fspath(path)
    model = model.eval()
    if opset >= 23:
        logger.warning("adacorr export: opset %d may emit the fused Attention op, which TensorRT fails to build inside If", opset)
    traced = _trace_step(model, example_inputs, cfg, dynamic) if cache else _trace_plain(model, example_inputs, dynamic)
    with torch.no_grad():
        program = torch.onnx.export(traced.program, dynamo=True, opset_version=opset, input_names=traced.input_names,
                                    output_names=traced.output_names, verbose=False)
    program.save(path)
    proto = onnx.load(path, load_external_data=False)
    metadata = _metadata(traced, cfg, cache, opset)
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    onnx.save(proto, path)
    checks: dict[str, Any] = {}
    regions, states = traced.regions, traced.states
    if check:
        onnx.checker.check_model(path, full_check=True)
        checks = check_tensorrt_patterns(onnx.load(path, load_external_data=False), expect_if=expected_if_nodes(cfg, len(regions)) if cache else 0)
        if checks["problems"]:
            raise ExportError(f"{path}: exported graph has patterns TensorRT's ONNX parser rejects: {checks['problems']}")
    logger.info("adacorr export: wrote %s (%d regions, %d state tensors, opset %d)", path, len(regions), len(states), opset)
    return ExportResult(path, regions, [s.name for s in states], metadata["dynamic"], checks, metadata)


def expected_if_nodes(config: AdaCorrConfig, regions: int) -> int:
    """``If`` nodes an export has: one per region whose decision is not known statically.
    ``never`` always computes (its predicate is constant and folded away); under
    ``first_block`` or ``scope="step"`` the first region always computes, so it has no ``If``."""
    if config.policy == "never":
        return 0
    return regions - 1 if first_region_computes_always(config) else regions


def read_metadata(path_or_proto: Any) -> dict[str, Any]:
    """The ``adacorr`` metadata of an exported model (path or ``onnx.ModelProto``)."""
    import onnx

    proto = path_or_proto if isinstance(path_or_proto, onnx.ModelProto) else onnx.load(os.fspath(path_or_proto), load_external_data=False)
    for entry in proto.metadata_props:
        if entry.key == METADATA_KEY:
            return json.loads(entry.value)
    raise ValueError("not an adacorr export: no 'adacorr' metadata")
