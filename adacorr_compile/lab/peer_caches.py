"""Peer caches as lab :class:`~adacorr_compile.lab.methods.Method` s: diffusers' own cache hooks
(FirstBlockCache, TaylorSeer) and cache-dit's DBCache, enabled on a reference model and taken
off again after the run, for ``benchmarks/run_benchmark.py`` and ``benchmarks/peers.py``.
"""

from __future__ import annotations

import logging
import re
import types
from typing import Any, Callable

import torch

from .methods import Method, _peer_compiled, block_modules, transformer_of

logger = logging.getLogger("adacorr_compile.bench")


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
    calibrator: str = "TaylorSeer",
) -> Method:
    """cache-dit's DBCache (``cache_dit.enable_cache``, https://github.com/vipshop/cache-dit) on the
    DiT, SD3 or Flux transformer, eager or (``compiled``) under ``torch.compile`` as its guide runs it
    (the caller applies ``cache_dit.set_compile_configs()`` once per process). ``cache_options`` are ``cache_dit.DBCacheConfig`` fields
    (``Fn_compute_blocks``, ``Bn_compute_blocks``, ``residual_diff_threshold``, ``max_warmup_steps``,
    ...); ``taylorseer``: ``cache_dit.TaylorSeerCalibratorConfig`` fields to add its TaylorSeer
    calibrator (``{}`` for its defaults; on SD3 without its encoder calibrator, see
    :func:`_encoder_calibrator_off`), None for plain residual reuse. ``calibrator``: which of
    cache-dit's calibrators those fields configure (``cache_dit.<calibrator>CalibratorConfig``:
    ``"TaylorSeer"``, ``"FoCa"``, ``"DMD"``).

    cache-dit keeps one persistent cache context per transformer that it would carry from one
    generation into the next (no warmup, stale residuals); the samplers in
    :mod:`adacorr_compile.lab.sampling` start every generation with
    ``cache_dit.refresh_context(transformer, num_inference_steps=num_steps)``, which rebuilds it.
    Blocks cache-dit skips are never called, so the runner's hooks on the blocks count them.
    Raises ImportError (naming ``pip install cache-dit``) when cache-dit is not installed."""
    cache_dit = _import_cache_dit()
    # the sampler runs CFG as one batched call: one transformer call per step
    options = {"enable_separate_cfg": False, **cache_options}
    cache_dit.DBCacheConfig(**options)  # unknown fields fail here, not in the middle of a benchmark
    calibrator_config = getattr(cache_dit, f"{calibrator}CalibratorConfig")
    if taylorseer is not None:
        calibrator_config(**taylorseer)
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
        enabled = None
        if taylorseer is not None:
            enabled = calibrator_config(**_encoder_calibrator_off(transformer, taylorseer))
        cache_dit.enable_cache(adapter, cache_config=cache_dit.DBCacheConfig(**options), calibrator_config=enabled)
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

    recorded = dict(options, **({"taylorseer": dict(taylorseer)} if taylorseer is not None else {}),
                    **({"calibrator": calibrator} if calibrator != "TaylorSeer" else {}))
    return Method(name, "peer", build, "inductor" if compiled else "eager", "cache-dit", None, setting, recorded,
                  cleanup=cleanup)
