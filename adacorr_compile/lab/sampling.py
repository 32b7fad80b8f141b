"""Standard sampling loops for the reference models (demo, benchmark, tests).

Both samplers work with any callable model: an eager module, a
``torch.compile``'d module, or a wrapper. Conventions the caching backend relies
on:

* classifier-free guidance is one batched call per denoising step on
  ``cat([x, x])`` with labels ``cat([y, null])`` (``cfg_calls=1``, the default), or
  two calls per step as many diffusers pipelines make them (``cfg_calls=2``: Wan,
  Flux with ``true_cfg_scale``), the conditional one in
  ``cache_context("cond", step_index=i, num_inference_steps=n, timestep=t)`` and the
  unconditional one in ``cache_context("uncond", ...)`` of the diffusers model;
* the timestep handed to the model strictly decreases within a generation (a
  timestep that goes back up marks a new generation);
* when a diffusers cache is enabled on the model (``enable_cache``), each call
  runs inside ``cache_context("cond", ...)`` and the cache state is reset at the
  start and end of every generation, as diffusers' pipelines do;
* when cache-dit's cache is enabled on the bare transformer (``cache_dit.enable_cache``,
  whose context persists across calls), every generation starts with
  ``cache_dit.refresh_context(transformer, num_inference_steps=num_steps)``: a fresh
  context (warmup, empty buffers) that knows the number of steps.

DiT call: ``model(x_in, timestep=t_batch, class_labels=labels)`` returning an
object with ``.sample`` (a ``Transformer2DModelOutput``), a tuple, or a tensor.
Flux and SD3 call: ``wrapper(x_in, timestep=t_batch, class_labels=labels)`` returning a
tensor (the velocity), see :class:`adacorr_compile.lab.reference.models.ClassConditionedFlux`
and :class:`~adacorr_compile.lab.reference.models.ClassConditionedSD3` (both sampled by
:func:`sample_flux`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..calibrate import output_tensor

logger = logging.getLogger("adacorr_compile.reference")

StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]

# Default classifier-free guidance scale of each sampler, chosen on the reference
# models by benchmarks/guidance_sweep.py. DiT: 1.5, the DiT paper's setting for FID; at
# 4.0 the reference DiT's 50-step DDIM samples are worse and its trajectories chaotic.
# Flux: 4.0, the reference Flux's best class accuracy. The measurements are in
# benchmarks/results/guidance_sweep.md (discussed in benchmarks/results/README.md, "Guidance").
# SD3 (the held-out reference, trained as the Flux one) takes Flux's scale, not a tuned one.
DIT_GUIDANCE_SCALE = 1.5
FLUX_GUIDANCE_SCALE = 4.0
DEFAULT_GUIDANCE = {"dit": DIT_GUIDANCE_SCALE, "flux": FLUX_GUIDANCE_SCALE, "sd3": FLUX_GUIDANCE_SCALE}  # by reference model


def _as_labels(class_labels: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
    if labels.numel() == 0:
        raise ValueError("class_labels is empty")
    return labels.to(device)


def _model_device_dtype(model: Any) -> tuple[torch.device, torch.dtype]:
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def _dit_geometry(model: Any) -> tuple[int, int, int]:
    """(null_class, channels, size) of a DiT or of what it wraps."""
    from adacorr_compile.lab.reference.models import NUM_CLASSES, _find_config

    cfg = _find_config(model) or {}
    null = int(cfg["num_embeds_ada_norm"]) - 1 if "num_embeds_ada_norm" in cfg else NUM_CLASSES
    return null, int(cfg.get("in_channels", 3)), int(cfg.get("sample_size", 32))


def _find_attr(model: Any, name: str, default: Any) -> Any:
    """``model.<name>``, looking through ``torch.compile``'s ``_orig_mod`` wrapper."""
    obj = model
    for _ in range(4):
        if obj is None:
            break
        val = getattr(obj, name, None)
        if val is not None:
            return val
        obj = getattr(obj, "_orig_mod", None)
    return default


def _find_wrapped(model: Any, match: Callable[[Any], bool]) -> Any:
    """The first object ``match`` accepts among ``model``, ``torch.compile``'s
    ``_orig_mod`` and a ``.transformer`` attribute (:class:`ClassConditionedFlux`),
    searched breadth-first (a few levels), or None."""
    todo, seen = [model], 0
    while todo and seen < 8:
        obj = todo.pop(0)
        seen += 1
        if obj is None:
            continue
        if match(obj):
            return obj
        todo += [getattr(obj, "_orig_mod", None), getattr(obj, "transformer", None)]
    return None


def _cache_owner(model: Any) -> Any:
    """The diffusers model under ``model`` with a diffusers cache enabled, or None."""
    return _find_wrapped(model, lambda obj: getattr(obj, "is_cache_enabled", False) is True
                         and hasattr(obj, "cache_context"))


def _cache_dit_owner(model: Any) -> Any:
    """The transformer under ``model`` that cache-dit cached transformer-only (a persistent
    cache context, refreshed by ``cache_dit.refresh_context``), or None."""
    return _find_wrapped(model, lambda obj: (
        isinstance(obj, torch.nn.Module) and getattr(obj, "_is_cached", False) is True
        and bool(getattr(obj, "_context_names", None))
        and getattr(getattr(obj, "_context_manager", None), "persistent_context", False) is True))


class _BackendContexts:
    """``adacorr_compile.cache_context`` for a model without diffusers' ``cache_context``."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def cache_context(self, name: str, **kwargs: Any):
        from ..api import cache_context

        return cache_context(self.model, name, **kwargs)


class _DiffusersCacheSteps:
    """Per-generation bookkeeping for diffusers' own cache hooks
    (``transformer.enable_cache(...)``): resets their state at the start and end
    of a generation and wraps each model call in ``cache_context``; and for
    cache-dit on a bare transformer: a fresh cache context at the start of each
    generation. A no-op when neither is enabled."""

    def __init__(self, model: Any, num_steps: int, cfg_calls: int = 1):
        self.owner = _cache_owner(model)
        self.cache_dit_owner = _cache_dit_owner(model)
        self.num_steps = num_steps
        # with CFG as two calls, every diffusers model gets the pipeline's cond/uncond contexts
        self.context_owner = self.owner
        if self.owner is None and cfg_calls == 2:  # the model's diffusers contexts, else the backend's own
            self.context_owner = _find_wrapped(model, lambda obj: hasattr(obj, "cache_context")) or _BackendContexts(model)

    def __enter__(self) -> "_DiffusersCacheSteps":
        if self.owner is not None:
            self.owner._reset_stateful_cache()
        if self.cache_dit_owner is not None:
            import cache_dit

            cache_dit.refresh_context(self.cache_dit_owner, num_inference_steps=self.num_steps)
        return self

    def __exit__(self, *exc) -> None:
        if self.owner is not None:
            self.owner._reset_stateful_cache()

    def step(self, index: int, timestep: Any, name: str = "cond"):
        if self.context_owner is None:
            return contextlib.nullcontext()
        return self.context_owner.cache_context(name, step_index=index, num_inference_steps=self.num_steps,
                                                timestep=float(timestep))

    def guided(self, call: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any], x: torch.Tensor,
               t_batch: torch.Tensor, labels: torch.Tensor, null_class: int, index: int, timestep: Any,
               cfg_calls: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditional, unconditional) model outputs of one step: one batched call on
        ``cat([x, x])``, or two calls in the pipeline's ``cond`` / ``uncond`` contexts."""
        null = torch.full_like(labels, null_class)
        if cfg_calls == 1:
            with self.step(index, timestep):
                out = output_tensor(call(torch.cat([x, x]), torch.cat([t_batch, t_batch]), torch.cat([labels, null])))
            return out.float().chunk(2)
        outs = []
        for name, lab in (("cond", labels), ("uncond", null)):
            with self.step(index, timestep, name):
                outs.append(output_tensor(call(x, t_batch, lab)).float())
        return outs[0], outs[1]


def make_dit_scheduler(scheduler: str = "ddim"):
    """A fresh diffusers scheduler matching the DiT's training noise schedule."""
    from diffusers import DDIMScheduler

    from adacorr_compile.lab.reference.models import DIT_SCHEDULER_CONFIG

    if scheduler != "ddim":
        raise ValueError(f"unknown scheduler {scheduler!r}; supported: 'ddim'")
    return DDIMScheduler(**DIT_SCHEDULER_CONFIG)


def check_guidance_scale(guidance_scale: float) -> float:
    """``guidance_scale`` if it is a finite number >= 0 (1 = no guidance), else ValueError."""
    if not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0 (1 = no guidance), got {guidance_scale}")
    return guidance_scale


def check_cfg_calls(cfg_calls: int) -> int:
    """``cfg_calls`` if it is 1 (batched CFG) or 2 (two calls per step), else ValueError."""
    if cfg_calls not in (1, 2) or isinstance(cfg_calls, bool):
        raise ValueError(f"cfg_calls must be 1 (one batched CFG call per step) or 2 (cond and uncond calls), got {cfg_calls!r}")
    return cfg_calls


def _check_steps_and_guidance(num_steps: int, guidance_scale: float) -> None:
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    check_guidance_scale(guidance_scale)


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)


@torch.no_grad()
def sample_dit(
    model: Any,
    class_labels: Sequence[int] | torch.Tensor,
    num_steps: int = 50,
    guidance_scale: float = DIT_GUIDANCE_SCALE,
    seed: int = 0,
    scheduler: str = "ddim",
    progress: bool = False,
    callback: StepCallback | None = None,
    *,
    cfg_calls: int = 1,
    null_class: int | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """DDIM (eta=0) sampling of a class-conditional DiT with batched CFG.

    Returns images [B, C, H, W] in [-1, 1] (float32, on the model's device).
    The initial noise is drawn on the CPU from ``seed``. ``callback(step_index, t, x)``
    is called after each step with the updated sample. Geometry and the null
    class are read from the model's diffusers config when not given. ``cfg_calls=2``:
    CFG as two calls per step (see the module docstring).
    """
    _check_steps_and_guidance(num_steps, guidance_scale)
    check_cfg_calls(cfg_calls)
    null_default, c_default, s_default = _dit_geometry(model)
    null_class = null_default if null_class is None else int(null_class)
    channels = c_default if channels is None else int(channels)
    image_size = s_default if image_size is None else int(image_size)
    p_device, p_dtype = _model_device_dtype(model)
    device = torch.device(device) if device is not None else p_device
    dtype = dtype or p_dtype

    labels = _as_labels(class_labels, device)
    b = labels.shape[0]

    sched = make_dit_scheduler(scheduler)
    sched.set_timesteps(num_steps, device=device)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    x = torch.randn((b, channels, image_size, image_size), generator=gen, dtype=torch.float32)
    x = (x * sched.init_noise_sigma).to(device=device, dtype=dtype)

    def call(x_in: torch.Tensor, t_in: torch.Tensor, y_in: torch.Tensor) -> Any:
        return model(x_in, timestep=t_in, class_labels=y_in)

    with _DiffusersCacheSteps(model, num_steps, cfg_calls) as cache:
        for i, t in enumerate(_progress(sched.timesteps, progress, "DiT DDIM")):
            t_batch = torch.full((b,), int(t), dtype=torch.long, device=device)
            eps_cond, eps_uncond = cache.guided(call, x, t_batch, labels, null_class, i, t, cfg_calls)
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            x = sched.step(eps, t, x.float(), eta=0.0).prev_sample.to(dtype)
            if callback is not None:
                callback(i, t, x)
    return x.float().clamp(-1.0, 1.0)


def flux_timesteps(num_steps: int) -> torch.Tensor:
    """Flow times 1 -> 0 (``num_steps + 1`` values, uniform)."""
    return torch.linspace(1.0, 0.0, num_steps + 1)


@torch.no_grad()
def sample_flux(
    wrapper: Any,
    class_labels: Sequence[int] | torch.Tensor,
    num_steps: int = 50,
    guidance_scale: float = FLUX_GUIDANCE_SCALE,
    seed: int = 0,
    progress: bool = False,
    callback: StepCallback | None = None,
    *,
    cfg_calls: int = 1,
    null_class: int | None = None,
    image_size: int | None = None,
    channels: int = 3,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Euler rectified-flow sampling (noise at t=1 to data at t=0) with batched CFG.

    The model is called once per step as ``wrapper(x_in, timestep=t_batch,
    class_labels=labels)`` with ``t_batch`` a float tensor [2B] holding the
    current flow time, and must return the velocity ``noise - data`` in the
    layout of ``x_in`` ([2B, C, H, W]). Returns images in [-1, 1]. ``cfg_calls=2``: CFG
    as two calls per step on [B] (see the module docstring).
    """
    _check_steps_and_guidance(num_steps, guidance_scale)
    check_cfg_calls(cfg_calls)
    from adacorr_compile.lab.reference.models import NUM_CLASSES

    if null_class is None:
        null_class = int(_find_attr(wrapper, "num_classes", NUM_CLASSES))
    if image_size is None:
        image_size = int(_find_attr(wrapper, "image_size", 32))
    p_device, p_dtype = _model_device_dtype(wrapper)
    device = torch.device(device) if device is not None else p_device
    dtype = dtype or p_dtype

    labels = _as_labels(class_labels, device)
    b = labels.shape[0]

    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    x = torch.randn((b, channels, image_size, image_size), generator=gen, dtype=torch.float32)
    x = x.to(device=device, dtype=dtype)
    ts = flux_timesteps(num_steps)

    def call(x_in: torch.Tensor, t_in: torch.Tensor, y_in: torch.Tensor) -> Any:
        return wrapper(x_in, timestep=t_in, class_labels=y_in)

    with _DiffusersCacheSteps(wrapper, num_steps, cfg_calls) as cache:
        for i in _progress(range(num_steps), progress, "Flux Euler"):
            t, t_next = float(ts[i]), float(ts[i + 1])
            t_batch = torch.full((b,), t, dtype=dtype, device=device)
            v_cond, v_uncond = cache.guided(call, x, t_batch, labels, null_class, i, t, cfg_calls)
            v = v_uncond + guidance_scale * (v_cond - v_uncond)
            x = (x.float() + (t_next - t) * v).to(dtype)
            if callback is not None:
                callback(i, ts[i], x)
    return x.float().clamp(-1.0, 1.0)


def reference_sampler(kind: str) -> Callable[..., torch.Tensor]:
    """The sampler of reference model ``kind``: :func:`sample_dit` for ``dit``, :func:`sample_flux`
    for the rectified-flow models ``flux`` and ``sd3``, with the model's default guidance
    (:data:`DEFAULT_GUIDANCE`; a ``guidance_scale`` given to the call overrides it)."""
    import functools

    if kind not in DEFAULT_GUIDANCE:
        raise ValueError(f"unknown reference model {kind!r}; expected one of {', '.join(DEFAULT_GUIDANCE)}")
    sampler = sample_dit if kind == "dit" else sample_flux
    return functools.partial(sampler, guidance_scale=DEFAULT_GUIDANCE[kind])


def image_grid(images: torch.Tensor, nrow: int, pad: int = 2, pad_value: float = 1.0) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> HxWx3 (or HxW) float array in [0, 1]."""
    imgs = ((images.detach().float().cpu().clamp(-1, 1) + 1.0) / 2.0).numpy()
    n, c, h, w = imgs.shape
    nrow = max(1, min(int(nrow), n))
    ncol_rows = (n + nrow - 1) // nrow
    grid = np.full((c, ncol_rows * (h + pad) + pad, nrow * (w + pad) + pad), pad_value, dtype=np.float32)
    for k in range(n):
        r, col = divmod(k, nrow)
        y0, x0 = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, y0:y0 + h, x0:x0 + w] = imgs[k]
    grid = grid.transpose(1, 2, 0)
    return grid[..., 0] if c == 1 else grid


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, scale: int = 1) -> Path:
    """Save images ([N, C, H, W] in [-1, 1]) as a PNG grid with ``nrow`` images per row."""
    from matplotlib.image import imsave

    grid = image_grid(images, nrow)
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imsave(str(path), grid, cmap="gray" if grid.ndim == 2 else None, vmin=0.0, vmax=1.0)
    logger.info("saved %d images to %s", images.shape[0], path)
    return path
