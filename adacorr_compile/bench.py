"""Measurement harness for the reference models: used by ``adacorr demo`` and
``benchmarks/run_benchmark.py``.

A :class:`Method` turns the reference model into the callable a sampler runs
(uncached eager, uncached Inductor, our backend with some options, or a peer:
diffusers' own cache hooks, cache-dit's DBCache). :func:`run_method` samples a fixed batch
with it, counts the block evaluations that really ran, and times repeated
generations; :func:`quality` compares images with the uncached output of the
same seeds (PSNR, SSIM) and with held-out real data (Frechet distance in the
reference classifier's feature space, class accuracy).
"""

from __future__ import annotations

import copy
import logging
import re
import statistics
import time
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

import adacorr_compile

logger = logging.getLogger("adacorr_compile.bench")


@dataclass
class Method:
    name: str
    kind: str  # "baseline" | "ours" | "peer" | "onnx"
    build: Callable[[Any], Any]  # reference model -> callable for the sampler
    lowering: str  # "eager", "inductor" or "onnxruntime": the uncached run of the same lowering is its speed reference
    policy: str | None = None
    correction: bool | None = None
    setting: float | None = None  # the swept value (threshold, interval)
    options: dict[str, Any] = field(default_factory=dict)
    cleanup: Callable[[Any], None] | None = None
    sampler_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. cfg_calls=2: CFG as two calls per step


@dataclass
class Run:
    method: Method
    images: torch.Tensor
    seconds: list[float]
    block_calls: int
    block_evals: int
    stats: dict[str, Any] | None
    compile_seconds: float
    # with a baseline (run_method(..., baseline=...)): its times and images, timed interleaved
    # with the method's (baseline, method, baseline, method, ...), and the per-pair ratios
    # baseline seconds / method seconds
    baseline_seconds: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    baseline_images: torch.Tensor | None = None

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds)

    @property
    def skipped_fraction(self) -> float:
        return 1.0 - self.block_evals / self.block_calls if self.block_calls else 0.0

    @property
    def speedup(self) -> float | None:
        """Median of the per-pair ratios baseline / method (None: not timed against a baseline)."""
        return statistics.median(self.ratios) if self.ratios else None

    @property
    def speedup_spread(self) -> tuple[float, float] | None:
        """(min, max) of the per-pair ratios."""
        return (min(self.ratios), max(self.ratios)) if self.ratios else None


def _fresh_function(f: Any) -> Any:
    """A copy of ``f`` with new code objects, and of the function it wraps (``__wrapped__``, held
    in a closure cell of the decorator's wrapper)."""
    inner = getattr(f, "__wrapped__", None)
    new_inner = _fresh_function(inner) if inner is not None else None
    closure = None
    if f.__closure__:
        closure = tuple(types.CellType(new_inner) if inner is not None and c.cell_contents is inner else c
                        for c in f.__closure__)
    g = types.FunctionType(f.__code__.replace(co_name=f.__code__.co_name), f.__globals__, f.__name__, f.__defaults__,
                           closure)
    g.__kwdefaults__, g.__qualname__ = f.__kwdefaults__, f.__qualname__
    g.__dict__.update(f.__dict__)
    if new_inner is not None:
        g.__wrapped__ = new_inner
    return g


def own_forward(module: torch.nn.Module) -> None:
    """Give ``module`` a forward with code objects of its own. Dynamo keeps its compiled code per
    code object, so two ``torch.compile`` of copies of one model class in one process can share
    (or spoil) each other's graphs; a forward of its own gives each copy its own compile."""
    module.forward = types.MethodType(_fresh_function(type(module).forward), module)


def transformer_of(model: Any) -> torch.nn.Module:
    """The diffusers transformer inside a reference model (itself for DiT)."""
    return getattr(model, "transformer", model)


def with_transformer(model: Any, transformer: Any) -> Any:
    """A shallow copy of a wrapper model whose ``transformer`` is replaced (DiT: the new model)."""
    if not hasattr(model, "transformer"):
        return transformer
    new = copy.copy(model)
    new._modules = dict(model._modules)
    new._modules["transformer"] = transformer
    return new


def block_modules(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The Transformer blocks (children of ModuleLists named *blocks) in order."""
    blocks = []
    for name, child in transformer.named_children():
        if isinstance(child, torch.nn.ModuleList) and name.endswith("blocks"):
            blocks.extend(child)
    return blocks


class BlockCounter:
    """Counts block evaluations that really ran in eager code: a forward hook on each
    block's first submodule (a skipped block never reaches its submodules, even when
    a cache hook wraps the block's own forward)."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.count = 0
        self.handles = []
        for block in block_modules(transformer):
            first = next(block.children())
            self.handles.append(first.register_forward_hook(self._hook))

    def _hook(self, *_: Any) -> None:
        self.count += 1

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def ours(name: str, options: dict[str, Any], setting: float | None = None, lowering: str = "inductor",
         cfg_calls: int = 1) -> Method:
    """Our backend with ``options``; ``cfg_calls=2`` samples with CFG as two calls per step
    (cond and uncond in diffusers' ``cache_context``, as Wan's or Flux's true-CFG pipeline)."""
    options = {"lowering": lowering, **options}

    def build(model: Any) -> Any:
        compiled = torch.compile(transformer_of(model), backend="adacorr", options=options)
        return with_transformer(model, compiled)

    cfg = adacorr_compile.AdaCorrConfig.from_options(options)  # labels from the config's own defaults
    return Method(name, "ours", build, cfg.lowering, cfg.policy, cfg.correction, setting, options,
                  sampler_kwargs={"cfg_calls": cfg_calls} if cfg_calls != 1 else {})


def eager_baseline() -> Method:
    return Method("uncached eager", "baseline", lambda m: m, "eager")


def inductor_baseline() -> Method:
    return Method("uncached inductor", "baseline", lambda m: with_transformer(m, torch.compile(transformer_of(m))), "inductor")


def _peer_compiled(model: Any, compiled: bool) -> Any:
    """The model as a peer's user runs it: with ``compiled``, its transformer under
    ``torch.compile`` (Inductor) after the peer's cache is enabled on it, as the peers' guides say."""
    return with_transformer(model, torch.compile(transformer_of(model))) if compiled else model


def _attention_identifiers(transformer: torch.nn.Module) -> list[str]:
    """Name patterns (``re.fullmatch``) of the attention modules directly inside the transformer's
    blocks (diffusers ``Attention`` modules), e.g. ``^transformer_blocks\\.\\d+\\.attn1$`` for the DiT."""
    from diffusers.models.attention_processor import Attention

    patterns = []
    for list_name, child in transformer.named_children():
        if not (isinstance(child, torch.nn.ModuleList) and list_name.endswith("blocks")):
            continue
        for block in child:
            for attr, sub in block.named_children():
                pattern = rf"^{re.escape(list_name)}\.\d+\.{re.escape(attr)}$"
                if isinstance(sub, Attention) and pattern not in patterns:
                    patterns.append(pattern)
    return patterns


def diffusers_cache_config(transformer: torch.nn.Module, config: Any) -> Any:
    """``config`` as it must be given for ``transformer``. diffusers' TaylorSeer hooks "all
    attention-like modules" when no identifiers are given, found by names ending in ``attn``
    (``^transformer_blocks.*attn``, ...): the DiT's ``BasicTransformerBlock`` names its attention
    ``attn1``, so on the DiT those defaults hook nothing and nothing is cached. When the defaults
    match no module, the config names the blocks' attention modules (``cache_identifiers``),
    which is what the defaults hook on Flux. Other configs (and Flux's) are returned as they are."""
    import dataclasses

    from diffusers.hooks import TaylorSeerCacheConfig
    from diffusers.hooks import taylorseer_cache

    if (not isinstance(config, TaylorSeerCacheConfig) or config.use_lite_mode
            or config.cache_identifiers is not None or config.skip_predict_identifiers is not None):
        return config
    defaults = taylorseer_cache._TRANSFORMER_BLOCK_IDENTIFIERS
    names = [name for name, _ in transformer.named_modules()]
    if any(re.fullmatch(p, n) for p in defaults for n in names):
        return config
    patterns = _attention_identifiers(transformer)
    if not patterns:
        raise ValueError(f"diffusers TaylorSeer: no attention module of {type(transformer).__name__} matches its "
                         f"default identifiers {defaults} and none was found in its blocks: give cache_identifiers")
    return dataclasses.replace(config, cache_identifiers=patterns)


def _text_stream_dropped(transformer: torch.nn.Module) -> bool:
    """Whether the transformer's last block drops the text stream (``context_pre_only``: SD3's last
    ``JointTransformerBlock`` returns ``None`` for ``encoder_hidden_states``)."""
    blocks = block_modules(transformer)
    return bool(blocks) and getattr(blocks[-1], "context_pre_only", False) is True


class PeerUnsupported(NotImplementedError):
    """A peer's cache cannot run this model: raised when the cache is enabled, before the model
    is changed or called."""


def _check_first_block_cache(transformer: torch.nn.Module, config: Any) -> None:
    """:class:`PeerUnsupported`, before any hook is applied, for diffusers' FirstBlockCache on a model
    whose last block drops the text stream (SD3): its tail hook subtracts the first block's text
    output from the last block's, which is ``None`` there (a TypeError at the first step)."""
    from diffusers.hooks import FirstBlockCacheConfig

    if isinstance(config, FirstBlockCacheConfig) and _text_stream_dropped(transformer):
        raise PeerUnsupported(
            f"diffusers FirstBlockCache cannot run {type(transformer).__name__}: its last block is context_pre_only "
            "(returns None for encoder_hidden_states), which FirstBlockCache's tail hook subtracts from")


def enable_diffusers_cache(transformer: torch.nn.Module, config: Any) -> None:
    """diffusers' cache ``config`` (``FirstBlockCacheConfig``, ``TaylorSeerCacheConfig``) on
    ``transformer``: ``transformer.enable_cache(config)`` for a model with diffusers'
    ``CacheMixin`` (Flux). A model without it (``DiTTransformer2DModel``; ``SD3Transformer2DModel``,
    whose ``JointTransformerBlock`` is registered too) gets the same hooks
    from ``diffusers.hooks.apply_first_block_cache`` / ``apply_taylorseer_cache`` (what
    ``enable_cache`` calls; the DiT's ``BasicTransformerBlock`` is in diffusers'
    ``TransformerBlockRegistry``: it returns ``hidden_states`` alone) and ``CacheMixin``'s
    ``cache_context`` / ``_reset_stateful_cache`` bound to the instance: the hooks keep their
    state per cache context, which a caller must open around each model call (the samplers do,
    as diffusers' pipelines do), and reset between generations. Undo with
    :func:`disable_diffusers_cache`. FirstBlockCache on SD3 raises :class:`PeerUnsupported`
    (:func:`_check_first_block_cache`)."""
    from diffusers.models.cache_utils import CacheMixin

    config = diffusers_cache_config(transformer, config)
    _check_first_block_cache(transformer, config)
    if isinstance(transformer, CacheMixin):
        transformer.enable_cache(config)
        return
    from diffusers.hooks import (FirstBlockCacheConfig, HookRegistry, TaylorSeerCacheConfig, apply_first_block_cache,
                                 apply_taylorseer_cache)

    appliers = {FirstBlockCacheConfig: apply_first_block_cache, TaylorSeerCacheConfig: apply_taylorseer_cache}
    apply = appliers.get(type(config))
    if apply is None:
        raise TypeError(f"{type(transformer).__name__} has no diffusers CacheMixin; applying {type(config).__name__} "
                        f"directly is done for {sorted(c.__name__ for c in appliers)} only")
    if getattr(transformer, "_cache_config", None) is not None:
        raise ValueError(f"a diffusers cache is already enabled on {type(transformer).__name__}: disable it first")
    apply(transformer, config)
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
    transformer.cache_context = types.MethodType(CacheMixin.cache_context, transformer)
    transformer._reset_stateful_cache = types.MethodType(CacheMixin._reset_stateful_cache, transformer)
    transformer._cache_config = config
    transformer.is_cache_enabled = True


_MIXIN_ATTRS = ("cache_context", "_reset_stateful_cache", "_cache_config", "is_cache_enabled")


def disable_diffusers_cache(transformer: torch.nn.Module) -> None:
    """Undo :func:`enable_diffusers_cache`: the hooks removed (``CacheMixin.disable_cache``)
    and, on a model without ``CacheMixin``, the bound context methods dropped."""
    from diffusers.models.cache_utils import CacheMixin

    if isinstance(transformer, CacheMixin):
        transformer.disable_cache()
        return
    if transformer.__dict__.get("_cache_config") is not None:
        CacheMixin.disable_cache(transformer)  # removes the hooks of the config's kind
    for attr in _MIXIN_ATTRS:
        transformer.__dict__.pop(attr, None)


def diffusers_cache(name: str, make_config: Callable[[], Any], setting: float | None = None, compiled: bool = False) -> Method:
    """A diffusers cache hook (``transformer.enable_cache(config)``, or on a model without
    diffusers' ``CacheMixin`` such as the DiT the same hooks applied directly: see
    :func:`enable_diffusers_cache`), eager or (``compiled``) under ``torch.compile``."""

    def build(model: Any) -> Any:
        enable_diffusers_cache(transformer_of(model), make_config())
        return _peer_compiled(model, compiled)

    def cleanup(model: Any) -> None:
        disable_diffusers_cache(transformer_of(model))

    return Method(name, "peer", build, "inductor" if compiled else "eager", name.split(" ")[0], None, setting, cleanup=cleanup)


CACHE_DIT_MISSING = "cache-dit is not installed: pip install cache-dit (or pip install 'adacorr_compile[bench]')"


def _import_cache_dit() -> Any:
    try:
        import cache_dit
    except ImportError as exc:
        raise ImportError(f"{CACHE_DIT_MISSING} ({exc})") from exc
    return cache_dit


def cache_dit_adapter(transformer: torch.nn.Module) -> Any:
    """A cache-dit ``BlockAdapter`` for a bare diffusers ``DiTTransformer2DModel``,
    ``SD3Transformer2DModel`` or ``FluxTransformer2DModel`` (other models: their
    ``transformer_blocks`` as Pattern_3).

    DiT: its ``transformer_blocks`` (``BasicTransformerBlock``: ``hidden_states`` in, ``hidden_states``
    alone out, ``timestep`` / ``class_labels`` as keyword arguments: cache-dit's Pattern_3) with
    cache-dit's ``DiTPatchFunctor``, as cache-dit's own registered "DiT" adapter has it: cache-dit
    replaces ``transformer_blocks`` during a forward by one ``CachedBlocks`` module, and the DiT's
    forward reads ``self.transformer_blocks[0].norm1.emb`` after the blocks (the final AdaLN's
    conditioning), which that module does not have; the functor gives the transformer a forward
    that reads the embedding from ``_norm1_emb`` (block 0's ``norm1.emb``, kept before caching).
    The functor's changes outlive ``disable_cache``: :func:`cache_dit_cache`'s cleanup removes them.

    SD3: its ``transformer_blocks`` (``JointTransformerBlock``: ``(hidden_states, encoder_hidden_states)``
    in, ``(encoder_hidden_states, hidden_states)`` out, the last one ``context_pre_only`` with
    ``None`` for the text stream: cache-dit's Pattern_1), as cache-dit's own registered
    "StableDiffusion3" adapter has it; no patch functor.

    Flux: one cached sequence of all blocks (double-stream then single-stream), so ``Fn``/``Bn``
    count over the whole model as FBCache does. This is cache-dit's own registered Flux layout
    (``transformer_blocks`` stands for the joined list during a forward, ``single_transformer_blocks``
    for an empty one) without its ``FluxPatchFunctor``: that functor replaces the transformer's
    ``forward`` for good (``disable_cache`` does not undo it), and diffusers >= 0.35's own Flux
    forward already calls both block lists the way the joined list needs (Pattern_1 blocks:
    ``(hidden_states, encoder_hidden_states) -> (encoder_hidden_states, hidden_states)``)."""
    cache_dit = _import_cache_dit()
    if not hasattr(transformer, "single_transformer_blocks"):
        from diffusers import DiTTransformer2DModel, SD3Transformer2DModel

        functor, pattern = None, cache_dit.ForwardPattern.Pattern_3
        if isinstance(transformer, DiTTransformer2DModel):
            from cache_dit.caching.patch_functors import DiTPatchFunctor

            functor = DiTPatchFunctor()
        elif isinstance(transformer, SD3Transformer2DModel):
            pattern = cache_dit.ForwardPattern.Pattern_1
        return cache_dit.BlockAdapter(transformer=transformer, blocks=transformer.transformer_blocks,
                                      forward_pattern=pattern, patch_functor=functor, check_forward_pattern=True)
    blocks = torch.nn.ModuleList([*transformer.transformer_blocks, *transformer.single_transformer_blocks])
    return cache_dit.BlockAdapter(
        transformer=transformer, blocks=blocks, blocks_name="transformer_blocks",
        dummy_blocks_names=["single_transformer_blocks"], forward_pattern=cache_dit.ForwardPattern.Pattern_1,
        check_forward_pattern=True,
    )


def _encoder_calibrator_off(transformer: torch.nn.Module, taylorseer: dict[str, Any]) -> dict[str, Any]:
    """cache-dit's TaylorSeer options for ``transformer``: on a model whose last block drops the text
    stream (SD3), the encoder calibrator is switched off unless the options name it. The blocks'
    text output is ``None`` there, so cache-dit never stores an encoder residual, and its TaylorSeer
    encoder calibrator (on by default) fails its first cached step ("State
    'transformer_blocks_Bn_residual' not found"); the model's output does not depend on that
    stream after the last block anyway."""
    if "enable_encoder_calibrator" in taylorseer or not _text_stream_dropped(transformer):
        return dict(taylorseer)
    return {**taylorseer, "enable_encoder_calibrator": False}


def cache_dit_cache(
    name: str,
    cache_options: dict[str, Any],
    setting: float | None = None,
    taylorseer: dict[str, Any] | None = None,
    compiled: bool = False,
) -> Method:
    """cache-dit's DBCache (``cache_dit.enable_cache``, https://github.com/vipshop/cache-dit) on the
    DiT, SD3 or Flux transformer, eager or (``compiled``) under ``torch.compile`` as its guide runs it
    (the caller applies ``cache_dit.set_compile_configs()`` once per process). ``cache_options`` are ``cache_dit.DBCacheConfig`` fields
    (``Fn_compute_blocks``, ``Bn_compute_blocks``, ``residual_diff_threshold``, ``max_warmup_steps``,
    ...); ``taylorseer``: ``cache_dit.TaylorSeerCalibratorConfig`` fields to add its TaylorSeer
    calibrator (``{}`` for its defaults; on SD3 without its encoder calibrator, see
    :func:`_encoder_calibrator_off`), None for plain residual reuse.

    cache-dit keeps one persistent cache context per transformer that it would carry from one
    generation into the next (no warmup, stale residuals); the samplers in
    :mod:`adacorr_compile.sampling` start every generation with
    ``cache_dit.refresh_context(transformer, num_inference_steps=num_steps)``, which rebuilds it.
    Blocks cache-dit skips are never called, so the runner's hooks on the blocks count them.
    Raises ImportError (naming ``pip install cache-dit``) when cache-dit is not installed."""
    cache_dit = _import_cache_dit()
    # the sampler runs CFG as one batched call: one transformer call per step
    options = {"enable_separate_cfg": False, **cache_options}
    cache_dit.DBCacheConfig(**options)  # unknown fields fail here, not in the middle of a benchmark
    if taylorseer is not None:
        cache_dit.TaylorSeerCalibratorConfig(**taylorseer)
    adapters: dict[int, Any] = {}
    patched: dict[int, tuple[dict[str, Any], list[str], list[str]]] = {}

    def build(model: Any) -> Any:
        transformer = transformer_of(model)
        attrs, modules = dict(transformer.__dict__), set(transformer._modules)
        adapter = cache_dit_adapter(transformer)  # a patch functor (DiT) patches the transformer here
        if adapter.patch_functor is not None:
            # what the functor added (DiT: forward, _is_patched; the module _norm1_emb)
            patched[id(transformer)] = (attrs, [k for k in transformer.__dict__ if k not in attrs],
                                        [k for k in transformer._modules if k not in modules])
        calibrator = None
        if taylorseer is not None:
            calibrator = cache_dit.TaylorSeerCalibratorConfig(**_encoder_calibrator_off(transformer, taylorseer))
        cache_dit.enable_cache(adapter, cache_config=cache_dit.DBCacheConfig(**options), calibrator_config=calibrator)
        adapters[id(transformer)] = adapter
        return _peer_compiled(model, compiled)

    def cleanup(model: Any) -> None:
        transformer = transformer_of(model)
        adapter = adapters.pop(id(transformer), None)
        cache_dit.disable_cache(adapter if adapter is not None else transformer)
        # disable_cache puts the class's forward back as an instance attribute: drop it so the
        # module is as it was (later methods, e.g. diffusers' hooks, wrap the plain forward)
        fwd = transformer.__dict__.get("forward")
        if fwd is not None and getattr(fwd, "__func__", None) is type(transformer).forward:
            del transformer.__dict__["forward"]
        patch = patched.pop(id(transformer), None)
        if patch is not None:
            # the patch functor's forward and attributes outlive disable_cache: remove them
            attrs, added_attrs, added_modules = patch
            for key in added_modules:
                transformer._modules.pop(key, None)
            for key in added_attrs:
                transformer.__dict__.pop(key, None)
            if "forward" in attrs:  # the forward it replaced was the instance's own
                transformer.__dict__["forward"] = attrs["forward"]

    recorded = dict(options, **({"taylorseer": dict(taylorseer)} if taylorseer is not None else {}))
    return Method(name, "peer", build, "inductor" if compiled else "eager", "cache-dit", None, setting, recorded,
                  cleanup=cleanup)


class OnnxDiT:
    """A DiT exported to ONNX and run by onnxruntime, callable like the DiT by the sampler
    (``model(x, timestep=t, class_labels=y)``); ``stats()``/``reset()`` are the runner's."""

    def __init__(self, runner: Any, config: Any) -> None:
        self.runner = runner
        self.config = config  # the DiT's diffusers config: the sampler reads its geometry

    def __call__(self, hidden_states: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        return self.runner(hidden_states=hidden_states, timestep=timestep, class_labels=class_labels)[0]

    def stats(self) -> dict[str, Any]:
        return self.runner.stats()

    def reset(self) -> None:
        self.runner.reset()


def onnx_dit(name: str, options: dict[str, Any] | None, workdir: str, setting: float | None = None) -> Method:
    """The reference DiT exported with :func:`adacorr_compile.export.to_onnx` (``options=None``:
    the uncached export) and run by onnxruntime on the CPU; its speed reference is the
    uncached onnxruntime run."""

    def build(model: Any) -> Any:
        import os

        from .export import OnnxRunner, to_onnx

        size, channels = model.config.sample_size, model.config.in_channels
        example = {"hidden_states": torch.randn(2, channels, size, size), "timestep": torch.tensor([999, 999]),
                   "class_labels": torch.tensor([0, 1])}
        path = os.path.join(workdir, f"{abs(hash(name))}.onnx")
        with torch.no_grad():
            to_onnx(model, example, path, config=options, cache=options is not None)
        return OnnxDiT(OnnxRunner(path, providers=["CPUExecutionProvider"]), model.config)

    if options is None:
        return Method(name, "baseline", build, "onnxruntime")
    cfg = adacorr_compile.AdaCorrConfig.from_options(options)
    return Method(name, "onnx", build, "onnxruntime", cfg.policy, cfg.correction, setting, dict(options))


def _stats_of(fn: Any) -> dict[str, Any] | None:
    if isinstance(fn, OnnxDiT):
        return fn.stats()
    target = transformer_of(fn)
    try:
        return adacorr_compile.stats(target)
    except TypeError:
        return None


def _reset(fn: Any) -> None:
    if isinstance(fn, OnnxDiT):
        fn.reset()
    else:
        adacorr_compile.reset(transformer_of(fn))


def run_method(
    method: Method,
    model: Any,
    sampler: Callable[..., torch.Tensor],
    labels: list[int],
    steps: int,
    seed: int,
    reps: int = 1,
    progress: bool = False,
    baseline: Method | None = None,
) -> Run:
    """Sample ``labels`` once for quality and work counts, then ``reps - 1`` more
    times for timing (the first generation after a compile is timed only if it is
    not the one that compiled).

    With ``baseline`` (the uncached run of the same lowering), the method is timed against it
    **interleaved**: ``reps`` pairs, each a baseline generation then a method generation of the
    same batch in this process (the first pair's method generation is the quality one), so
    that machine load lands on both sides; ``Run.ratios`` holds the per-pair ratios baseline /
    method, ``Run.speedup`` their median. The baseline runs on a deep copy of the model (made
    before the method is built: a peer's cache hooks change the model itself)."""
    # every method compiles the same forward anew: without a reset Dynamo would hit
    # its recompile limit after a few methods and silently run the rest eagerly
    torch._dynamo.reset()
    base_fn = baseline.build(copy.deepcopy(model)) if baseline is not None else None
    fn = method.build(model)
    # hooks only on uncompiled runs (eager baseline, diffusers' hooks): Dynamo would trace
    # them and guard on their counter, recompiling every step; compiled runs are counted
    # by the adacorr runtime
    counter = BlockCounter(transformer_of(model)) if method.lowering == "eager" and method.kind != "ours" else None
    base_seconds: list[float] = []
    base_images = None

    def timed_baseline() -> None:
        nonlocal base_images
        if base_fn is None:
            return
        t0 = time.perf_counter()
        out = sampler(base_fn, labels, num_steps=steps, seed=seed, **baseline.sampler_kwargs)
        base_seconds.append(time.perf_counter() - t0)
        if base_images is None:
            base_images = out.detach().float().cpu()

    try:
        t0 = time.perf_counter()
        if method.kind == "ours" or method.lowering != "eager":
            # compile outside the timed runs, for the batch size the timed runs use
            sampler(fn, labels, num_steps=2, seed=seed, **method.sampler_kwargs)
        compile_seconds = time.perf_counter() - t0
        if base_fn is not None and baseline.lowering != "eager":
            sampler(base_fn, labels, num_steps=2, seed=seed, **baseline.sampler_kwargs)
        stats_target = _stats_of(fn)
        if stats_target is not None:
            if method.kind == "ours" and (stats_target["fallbacks"] or not stats_target["totals"]["regions"]):
                raise RuntimeError(f"{method.name}: compiled without guards: {stats_target['fallbacks']}")
            _reset(fn)
        if counter is not None:
            counter.count = 0
        seconds = []
        timed_baseline()
        t0 = time.perf_counter()
        images = sampler(fn, labels, num_steps=steps, seed=seed, progress=progress, **method.sampler_kwargs)
        seconds.append(time.perf_counter() - t0)
        eager_evals = counter.count if counter is not None else None
        stats = _stats_of(fn)
        for _ in range(reps - 1):
            timed_baseline()
            t0 = time.perf_counter()
            sampler(fn, labels, num_steps=steps, seed=seed, **method.sampler_kwargs)
            seconds.append(time.perf_counter() - t0)
    finally:
        if counter is not None:
            counter.close()
        if method.cleanup is not None:
            method.cleanup(model)
    n_blocks = len(block_modules(transformer_of(model)))
    calls = n_blocks * steps * method.sampler_kwargs.get("cfg_calls", 1)
    if stats is not None and stats["totals"]["calls"]:
        # compiled code runs no Python hooks: count from the runtime; the
        # calls must add up to one per block per step
        totals = stats["totals"]
        evals = totals["computes"]
        assert totals["calls"] == calls, (totals["calls"], calls)
    else:
        evals = eager_evals if eager_evals is not None else calls
    ratios = [b / m for b, m in zip(base_seconds, seconds)]
    return Run(method, images.detach().float().cpu(), seconds, calls, evals, stats, compile_seconds,
               base_seconds, ratios, base_images)


def psnr_ssim(images: torch.Tensor, reference: torch.Tensor,
              value_range: tuple[float, float] = (-1.0, 1.0)) -> tuple[list[float], list[float]]:
    """Per-image PSNR (dB) and SSIM of images against the reference (scikit-image), both
    clamped to ``value_range`` (default: images in [-1, 1]), whose width is the data range.
    Any ``[N, ...]`` tensor works: its first axis counts the images, the second is taken as
    channels; SSIM is NaN for an image too small for its 7x7 window."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    lo, hi = float(value_range[0]), float(value_range[1])
    data_range = hi - lo
    psnr, ssim = [], []
    for a, b in zip(images.clamp(lo, hi).numpy(), reference.clamp(lo, hi).numpy()):
        a_hwc, b_hwc = (np.moveaxis(a, 0, -1), np.moveaxis(b, 0, -1)) if a.ndim >= 3 else (a, b)
        if np.array_equal(a_hwc, b_hwc):
            psnr.append(float("inf"))
        else:
            psnr.append(float(peak_signal_noise_ratio(b_hwc, a_hwc, data_range=data_range)))
        if a.ndim < 2 or min(a_hwc.shape[:-1] if a.ndim >= 3 else a_hwc.shape) < 7:
            ssim.append(float("nan"))
        else:
            ssim.append(float(structural_similarity(b_hwc, a_hwc, data_range=data_range,
                                                    channel_axis=-1 if a.ndim >= 3 else None)))
    return psnr, ssim


def quality(
    images: torch.Tensor,
    reference: torch.Tensor,
    labels: list[int],
    classifier: Any = None,
    real_features: torch.Tensor | None = None,
) -> dict[str, float]:
    """Fidelity to the uncached output (PSNR, SSIM: mean and worst) and, given the
    reference classifier, class accuracy and the Frechet distance to real data."""
    psnr, ssim = psnr_ssim(images, reference)
    finite = [p for p in psnr if np.isfinite(p)]
    out = {
        "psnr_mean": float(np.mean(finite)) if finite else float("inf"),
        "psnr_min": float(min(psnr)),
        "ssim_mean": float(np.mean(ssim)),
        "ssim_min": float(min(ssim)),
    }
    if classifier is not None:
        from .reference.classifier import class_accuracy, extract_features, frechet_distance

        out["class_accuracy"] = float(class_accuracy(classifier, images, torch.tensor(labels)))
        if real_features is not None:
            out["fid_proxy"] = float(frechet_distance(extract_features(classifier, images), real_features))
    return out


def lambda_heatmap(stats: dict[str, Any], path: str, title: str) -> None:
    """Layer x step heatmaps of lambda and of the offset score, with reuse marks (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regions = stats["regions"]
    lam = np.array([r["lambda_trace"] for r in regions], dtype=float)
    score = np.array([r["score_trace"] for r in regions], dtype=float)
    reuse = np.array([r["reuse_trace"] for r in regions], dtype=float)
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.35 * len(regions) + 2.2), constrained_layout=True)
    measured = int(np.isfinite(lam).any(axis=1).sum())
    # scope="step": one region (the probe) measures for the whole step, the others follow it
    note = ("\none decision per step: lambda and S are measured by the probe (one row); the later blocks follow "
            "its verdict" if measured == 1 < len(regions) else "")
    for ax, data, name, cmap in (
        (axes[0], lam, "lambda = clip(gamma * S, 0, 1)", "magma"),
        (axes[1], score, "offset score S", "viridis"),
        (axes[2], reuse, "reused (1) / computed (0)", "Greys"),
    ):
        im = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap=cmap, interpolation="nearest")
        ax.set_title(name)
        ax.set_xlabel("denoising step")
        ax.set_yticks(range(len(regions)))
        ax.set_yticklabels([r["path"] for r in regions], fontsize=7)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(title + note)
    fig.savefig(path, dpi=110)
    plt.close(fig)
