"""Tiny real diffusers pipelines, built offline, for differential tests of whole generations.

The model-level tests drive a transformer with hand-made per-step inputs
(``adacorr_compile.lab.tiny``); these builders wrap such tiny random-weight transformers in the real
diffusers pipelines (DiT, PixArt-Sigma, SD3, Flux, Wan) with tiny random VAEs and real schedulers,
so a test can run a complete denoising loop eagerly and then compiled and compare the outputs
exactly: the pipeline decides the timesteps, the CFG batching or the separate cond/uncond calls
in ``cache_context``, the padding masks and the number of images. Nothing is downloaded: there
are no text encoders or tokenizers (each pipeline accepts ``None`` for them when it is given
precomputed ``prompt_embeds``), and every weight and embedding is drawn from a seeded generator.
The transformers come from ``adacorr_compile.lab.tiny`` where its configs fit the pipeline (those
factories seed their own weights with 0, so ``seed`` then varies only the VAE and the embeds);
DiT's is configured here (DiTPipeline needs 1000 classes).

Each ``build_<name>(seed)`` returns a :class:`TinyPipeline`; ``tiny.kwargs(steps, images, size,
seed)`` gives the full keyword arguments of one call, ``tiny.pipe(**tiny.kwargs())[0]`` the output
tensor. The same kwargs give a bitwise identical output on every call, and a 4-step call runs in
about 30-100 ms on one CPU thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLWan,
    DDIMScheduler,
    DiffusionPipeline,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    PixArtSigmaPipeline,
    StableDiffusion3Pipeline,
    WanPipeline,
)

from adacorr_compile.lab.tiny import tiny_flux, tiny_pixart, tiny_sd3, tiny_wan

Size = tuple[int, int]


@dataclass
class TinyPipeline:
    """A tiny pipeline and how to call it.

    ``inputs`` holds the batch-1 conditioning (embeds, masks, guidance settings) that every call
    shares; :meth:`kwargs` adds the per-call arguments. ``cfg_calls`` is how many times the
    pipeline calls its transformer per denoising step with the default guidance: 2 where the
    conditional and unconditional passes are separate calls (Flux true CFG, Wan), 1 where they
    are one batched call (DiT, PixArt, SD3) or there is no CFG.
    """

    name: str
    pipe: DiffusionPipeline
    default_size: Size  # (height, width) in pixels
    other_size: Size  # a second valid (height, width)
    cfg_calls: int
    inputs: dict[str, Any] = field(default_factory=dict)
    # how ``images`` reaches the call: "num_images_per_prompt" (the pipeline repeats the embeds),
    # "class_labels" (DiT: one label per image), or None: the ``*embeds*`` inputs are repeated to
    # ``images`` rows here (SD3, Flux and Wan repeat only embeds they encode themselves)
    images_arg: str | None = "num_images_per_prompt"
    labels: list[int] = field(default_factory=list)  # DiT: class labels, cycled over the images

    def kwargs(self, steps: int = 4, images: int = 1, size: int | Size | None = None, seed: int = 0, **overrides: Any) -> dict[str, Any]:
        """The keyword arguments of ``pipe(**kwargs)``: ``steps`` denoising steps, ``images`` outputs
        per prompt, ``size`` (an int for a square, or (height, width); ``default_size`` when None),
        the noise from ``torch.Generator().manual_seed(seed)``, output as a float tensor
        (``output_type="pt"``, ``return_dict=False``: the output is ``pipe(**kwargs)[0]``).
        ``overrides`` replace or add arguments, e.g. ``true_cfg_scale=1.0`` (Flux without CFG)
        or ``guidance_scale=1.0``; ``cfg_calls`` then no longer applies."""
        height, width = self.default_size if size is None else (size, size) if isinstance(size, int) else size
        kw: dict[str, Any] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in self.inputs.items()}
        if self.images_arg is None:
            kw.update({k: v.repeat(images, *[1] * (v.dim() - 1)) for k, v in kw.items() if "embeds" in k})
        elif self.images_arg == "class_labels":
            kw["class_labels"] = [self.labels[i % len(self.labels)] for i in range(images)]
        else:
            kw[self.images_arg] = images
        kw.update(
            num_inference_steps=steps, height=height, width=width, generator=torch.Generator().manual_seed(seed),
            output_type="pt", return_dict=False,
        )
        kw.update(overrides)
        return kw


def _vae(seed: int, latent_channels: int, **config: Any) -> AutoencoderKL:
    """A tiny 2-level AutoencoderKL: spatial factor 2, 16x16 pixels <-> 8x8 latents."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4, sample_size=16,
        **config,
    ).eval()


def _finish(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """The components are built on the CPU in float32 already (``pipe.to(dtype)`` would only warn)."""
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def _pooled_embeds(seed: int, tokens: int, **guidance: Any) -> dict[str, Any]:
    """Prompt and negative embeds (``[1, tokens, 12]``) with pooled ones (``[1, 10]``), as
    SD3's and Flux's pipelines take them, plus the guidance settings."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        prompt_embeds=_randn(g, 1, tokens, 12), pooled_prompt_embeds=_randn(g, 1, 10),
        negative_prompt_embeds=_randn(g, 1, tokens, 12), negative_pooled_prompt_embeds=_randn(g, 1, 10), **guidance,
    )


class SizedDiTPipeline(DiTPipeline):
    """``DiTPipeline`` whose call also takes ``height``/``width`` (pixels, square).

    DiTPipeline has no size argument: it draws latents of ``transformer.config.sample_size``. This
    subclass sets that config value for the duration of one call (the transformer itself reads the
    size from its input and recomputes its sin-cos position embedding for a new size), so calls of
    one pipe at different sizes must not run concurrently."""

    def __call__(self, *args: Any, height: int | None = None, width: int | None = None, **kwargs: Any):
        if height is None and width is None:
            return super().__call__(*args, **kwargs)
        if height != width:
            raise ValueError(f"DiTPipeline generates square images only, got height={height}, width={width}")
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if height % (factor * self.transformer.config.patch_size):
            raise ValueError(f"height {height} is not a multiple of {factor * self.transformer.config.patch_size}")
        sample_size = self.transformer.config.sample_size
        self.transformer.register_to_config(sample_size=height // factor)
        try:
            return super().__call__(*args, **kwargs)
        finally:
            self.transformer.register_to_config(sample_size=sample_size)


def build_dit(seed: int = 0) -> TinyPipeline:
    """DiT (class-conditional): 3 DiT blocks, a DDIM scheduler, 4 labelled classes, batched CFG
    (``guidance_scale=4``: one transformer call on [cond; null-class] per step)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # DiTPipeline uses class 1000 as the null class: the label table needs 1000 classes (+1 for CFG);
        # adacorr_compile.lab.tiny.tiny_dit has 10, so the transformer is configured here
        transformer = DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=3, sample_size=8,
            patch_size=2, num_embeds_ada_norm=1000,
        ).eval()
        vae = _vae(seed + 1, 4)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    id2label = {0: "tench", 1: "goldfish", 2: "white shark", 3: "tiger shark"}
    pipe = _finish(SizedDiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label))
    return TinyPipeline(
        "dit", pipe, (16, 16), (24, 24), cfg_calls=1, inputs=dict(guidance_scale=4.0), images_arg="class_labels",
        labels=[1, 3, 0, 2],
    )


def build_pixart(seed: int = 0) -> TinyPipeline:
    """PixArt-Sigma: ``tiny_pixart`` (3 blocks, cross-attention to 12-dim captions), a DPM-Solver++
    scheduler, batched CFG (``guidance_scale=4.5``) on 8-token prompts padded by their attention
    masks (3 valid tokens in the prompt, 2 in the negative prompt); no resolution binning."""
    with torch.random.fork_rng(devices=[]):
        transformer, _ = tiny_pixart()
        vae = _vae(seed + 1, 4)
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear")
    pipe = _finish(PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=scheduler))
    g = torch.Generator().manual_seed(seed)
    inputs = dict(
        prompt_embeds=_randn(g, 1, 8, 12), prompt_attention_mask=torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0]]),
        negative_prompt_embeds=_randn(g, 1, 8, 12), negative_prompt_attention_mask=torch.tensor([[1, 1, 0, 0, 0, 0, 0, 0]]),
        negative_prompt=None,  # its default "" may not be given together with negative_prompt_embeds
        guidance_scale=4.5, use_resolution_binning=False,
    )
    return TinyPipeline("pixart", pipe, (16, 16), (24, 16), cfg_calls=1, inputs=inputs)


def build_sd3(seed: int = 0) -> TinyPipeline:
    """Stable Diffusion 3: ``tiny_sd3`` (3 joint blocks), a flow-matching Euler scheduler (shift 3),
    batched CFG (``guidance_scale=5``) on 7-token prompt embeds and 10-dim pooled embeds."""
    with torch.random.fork_rng(devices=[]):
        transformer, _ = tiny_sd3()
        vae = _vae(seed + 1, 4, shift_factor=0.0625, scaling_factor=1.5)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = _finish(StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
        tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    ))
    inputs = _pooled_embeds(seed, tokens=7, guidance_scale=5.0)
    return TinyPipeline("sd3", pipe, (16, 16), (24, 16), cfg_calls=1, inputs=inputs, images_arg=None)


def build_flux(seed: int = 0) -> TinyPipeline:
    """Flux: ``tiny_flux`` (2 dual-stream + 3 single-stream blocks, no guidance embedding), a
    flow-matching Euler scheduler with dynamic shifting, true CFG (``true_cfg_scale=4``): two
    transformer calls per step, in ``cache_context("cond")`` and ``cache_context("uncond")``.
    ``kwargs(true_cfg_scale=1.0)`` runs without CFG (one call per step)."""
    with torch.random.fork_rng(devices=[]):
        transformer, _ = tiny_flux()
        vae = _vae(seed + 1, transformer.config.in_channels // 4, shift_factor=0.0625, scaling_factor=1.5, use_quant_conv=False,
                   use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256, base_shift=0.5, max_shift=1.15,
    )
    pipe = _finish(FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        transformer=transformer,
    ))
    inputs = _pooled_embeds(seed, tokens=6, true_cfg_scale=4.0)
    return TinyPipeline("flux", pipe, (16, 16), (24, 16), cfg_calls=2, inputs=inputs, images_arg=None)


def build_wan(seed: int = 0) -> TinyPipeline:
    """Wan 2.1 text-to-video: ``tiny_wan`` (3 blocks), a tiny causal 3D VAE (spatial factor 8,
    temporal 4: 5 frames -> 2 latent frames), a flow-matching Euler scheduler, CFG
    (``guidance_scale=5``) as two transformer calls per step in ``cache_context("cond")`` /
    ``cache_context("uncond")`` (with step_index, sigma, num_inference_steps)."""
    with torch.random.fork_rng(devices=[]):
        transformer, _ = tiny_wan()
        torch.manual_seed(seed + 1)
        z = transformer.config.in_channels
        vae = AutoencoderKLWan(
            base_dim=4, z_dim=z, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
            latents_mean=[0.0] * z, latents_std=[1.0] * z,
        ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = _finish(WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler, transformer=transformer))
    g = torch.Generator().manual_seed(seed)
    inputs = dict(
        prompt_embeds=_randn(g, 1, 6, 12), negative_prompt_embeds=_randn(g, 1, 6, 12), guidance_scale=5.0, num_frames=5,
    )
    return TinyPipeline("wan", pipe, (32, 32), (48, 32), cfg_calls=2, inputs=inputs, images_arg=None)


BUILDERS: dict[str, Callable[..., TinyPipeline]] = {
    "dit": build_dit,
    "pixart": build_pixart,
    "sd3": build_sd3,
    "flux": build_flux,
    "wan": build_wan,
}
