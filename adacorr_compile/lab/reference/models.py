"""Small reference Diffusion Transformers trained on the synthetic glyph data.

Three models, all real diffusers classes so that diffusers' own caching hooks and
``torch.compile`` apply to them unchanged:

* :func:`load_reference_dit` -- a class-conditional ``DiTTransformer2DModel``
  (adaLN-Zero), pixel space 3x32x32, patch 4 (64 tokens), epsilon prediction,
  trained with the DDPM objective under :data:`DIT_SCHEDULER_CONFIG`. Class
  index ``num_classes`` is the null (unconditional) class for CFG.
* :func:`load_reference_flux` -- a small ``FluxTransformer2DModel`` trained with
  rectified flow (velocity prediction), wrapped in :class:`ClassConditionedFlux`
  which turns a class label into ``encoder_hidden_states`` (learned text tokens)
  and ``pooled_projections`` (learned pooled vector).
* :func:`load_reference_sd3` -- a small ``SD3Transformer2DModel`` (MMDiT: joint
  attention of image and text tokens, QK RMS-norm as SD3.5), trained as the Flux
  one (rectified flow, velocity), wrapped in :class:`ClassConditionedSD3` (the same
  class conditioning). The backend's defaults were not tuned on it: it is the
  held-out family.

Weights and configs live in ``adacorr_compile/lab/reference/weights/`` (package
data, produced by ``benchmarks/train_reference.py``); nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

logger = logging.getLogger("adacorr_compile.reference")

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

NUM_CLASSES = 10

# Noise schedule shared by DiT training and the DDIM sampler
# (:func:`adacorr_compile.lab.sampling.sample_dit`).
DIT_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "timestep_spacing": "trailing",
}


# --------------------------------------------------------------------------- DiT


def dit_config(num_classes: int = NUM_CLASSES) -> dict[str, Any]:
    """Config of the reference DiT: 8 blocks, hidden 128 (4 heads x 32), patch 4 (64 tokens).

    256 tokens (patch 2) would be closer to a real DiT, but on 2 CPU cores it
    trained much slower per sample and did not learn the classes in the first
    attempt's budget (benchmarks/results/README.md, "Reference models")."""
    return {
        "num_attention_heads": 4,
        "attention_head_dim": 32,
        "in_channels": 3,
        "out_channels": 3,
        "num_layers": 8,
        "sample_size": 32,
        "patch_size": 4,
        "num_embeds_ada_norm": num_classes + 1,  # last index = null class
        "norm_type": "ada_norm_zero",
        "activation_fn": "gelu",
        "attention_bias": True,
        "norm_elementwise_affine": False,
        "dropout": 0.0,
    }


def tiny_dit_config(num_classes: int = NUM_CLASSES) -> dict[str, Any]:
    """A much smaller DiT with the same interface (for fast tests)."""
    cfg = dit_config(num_classes)
    cfg.update(num_attention_heads=2, attention_head_dim=16, num_layers=2, sample_size=16)
    return cfg


def build_dit(config: dict[str, Any]):
    """Instantiate a ``DiTTransformer2DModel`` from ``config`` (random init).

    diffusers' label embedders drop labels to index ``num_embeds_ada_norm``
    at random in train mode; CFG label dropout is done by the training loop
    instead (to the null class ``num_embeds_ada_norm - 1``), so that internal
    dropout is switched off here.
    """
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(**config)
    for module in model.modules():
        if type(module).__name__ == "LabelEmbedding":
            module.dropout_prob = 0.0
    return model


def dit_null_class(model) -> int:
    """The null (unconditional) class index of a DiT (or a wrapper around one)."""
    cfg = _find_config(model)
    if cfg is None or "num_embeds_ada_norm" not in cfg:
        return NUM_CLASSES
    return int(cfg["num_embeds_ada_norm"]) - 1


# -------------------------------------------------------------------------- Flux

# Side of the square RGB patches packed into one Flux token (outside the transformer).
FLUX_PACK = 4


def flux_config() -> dict[str, Any]:
    """Config of the reference Flux transformer: 2 double + 6 single blocks, hidden 128."""
    return {
        "patch_size": 1,
        "in_channels": 3 * FLUX_PACK * FLUX_PACK,  # 4x4 patches of RGB, packed outside the transformer
        "out_channels": None,
        "num_layers": 2,
        "num_single_layers": 6,
        "attention_head_dim": 32,
        "num_attention_heads": 4,
        "joint_attention_dim": 64,
        "pooled_projection_dim": 64,
        "guidance_embeds": False,
        "axes_dims_rope": [8, 12, 12],
    }


def tiny_flux_config() -> dict[str, Any]:
    """A much smaller Flux transformer with the same interface (for fast tests)."""
    cfg = flux_config()
    cfg.update(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
               axes_dims_rope=[4, 6, 6])
    return cfg


def pack_patches(images: torch.Tensor, patch: int = FLUX_PACK) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)*(W/p), C*p*p] (row-major tokens)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    x = x.permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpack_patches(tokens: torch.Tensor, height: int, width: int, patch: int = FLUX_PACK) -> torch.Tensor:
    """Inverse of :func:`pack_patches`."""
    b, n, d = tokens.shape
    c = d // (patch * patch)
    hp, wp = height // patch, width // patch
    x = tokens.reshape(b, hp, wp, c, patch, patch)
    x = x.permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def image_position_ids(height_tokens: int, width_tokens: int) -> torch.Tensor:
    """2-D ``img_ids`` [h*w, 3] = (0, row, col), as diffusers' Flux pipeline makes."""
    ids = torch.zeros(height_tokens, width_tokens, 3)
    ids[..., 1] = torch.arange(height_tokens)[:, None]
    ids[..., 2] = torch.arange(width_tokens)[None, :]
    return ids.reshape(height_tokens * width_tokens, 3)


class ClassConditioned(nn.Module):
    """Class-label conditioning around a diffusers transformer that attends to text tokens.

    Each class (and the null class ``num_classes``, for CFG) has learned text tokens
    (the transformer's ``encoder_hidden_states``, ``[num_text_tokens, joint_attention_dim]``)
    and a learned pooled vector (its ``pooled_projections``). ``forward(x, timestep,
    class_labels)`` of a subclass returns the velocity of rectified flow; ``timestep`` is
    the flow time in [0, 1] (1 = noise, 0 = data), a float tensor [B] or a scalar.
    """

    def __init__(self, transformer, num_classes: int = NUM_CLASSES, num_text_tokens: int = 4,
                 image_size: int = 32):
        super().__init__()
        cfg = transformer.config
        self.transformer = transformer
        self.num_classes = int(num_classes)
        self.num_text_tokens = int(num_text_tokens)
        self.image_size = int(image_size)
        self.text_tokens = nn.Parameter(
            torch.randn(num_classes + 1, num_text_tokens, cfg.joint_attention_dim) * 0.02)
        self.pooled = nn.Parameter(torch.randn(num_classes + 1, cfg.pooled_projection_dim) * 0.02)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def condition(self, class_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoder_hidden_states [B, T, D], pooled_projections [B, P]) for labels."""
        return self.text_tokens[class_labels], self.pooled[class_labels]

    def conditioning(self, x: torch.Tensor, timestep: torch.Tensor | float,
                     class_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(flow time [B], encoder_hidden_states, pooled_projections) in ``x``'s dtype and device."""
        b = x.shape[0]
        timestep = torch.as_tensor(timestep, dtype=x.dtype, device=x.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(b)
        encoder_hidden_states, pooled = self.condition(class_labels.to(x.device))
        return timestep, encoder_hidden_states.to(x.dtype), pooled.to(x.dtype)


class ClassConditionedFlux(ClassConditioned):
    """Class-label conditioning (:class:`ClassConditioned`) around a ``FluxTransformer2DModel``.

    ``forward(x, timestep, class_labels) -> velocity`` where ``x`` is either an
    image batch [B, 3, H, W] (the velocity comes back as an image batch) or
    packed tokens [B, N, 3 * patch * patch] (velocity comes back packed). ``timestep`` is the
    flow time in [0, 1] (1 = noise, 0 = data), a float tensor [B] or a scalar;
    Flux multiplies it by 1000 internally. Class ``num_classes`` is the null
    class. The transformer is called with plain keyword arguments so that
    ``wrapper.transformer.enable_cache(...)`` and ``torch.compile(wrapper.transformer)``
    work on it directly.
    """

    def __init__(self, transformer, num_classes: int = NUM_CLASSES, num_text_tokens: int = 4,
                 image_size: int = 32, patch: int = FLUX_PACK):
        super().__init__(transformer, num_classes, num_text_tokens, image_size)
        self.patch = int(patch)
        side = image_size // patch
        self.register_buffer("img_ids", image_position_ids(side, side), persistent=False)
        self.register_buffer("txt_ids", torch.zeros(num_text_tokens, 3), persistent=False)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor | float,
                class_labels: torch.Tensor) -> torch.Tensor:
        is_image = x.ndim == 4
        if is_image:
            h, w = x.shape[-2:]
            tokens = pack_patches(x, self.patch)
        else:
            tokens = x
        timestep, encoder_hidden_states, pooled = self.conditioning(tokens, timestep, class_labels)
        out = self.transformer(
            hidden_states=tokens,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled,
            timestep=timestep,
            img_ids=self.img_ids.to(tokens.dtype),
            txt_ids=self.txt_ids.to(tokens.dtype),
            return_dict=False,
        )[0]
        if is_image:
            return unpack_patches(out, h, w, self.patch)
        return out


def build_flux(config: dict[str, Any], num_classes: int = NUM_CLASSES, num_text_tokens: int = 4,
               image_size: int = 32, patch: int = FLUX_PACK) -> ClassConditionedFlux:
    """Instantiate a :class:`ClassConditionedFlux` from a transformer ``config`` (random init)."""
    from diffusers import FluxTransformer2DModel

    cfg = dict(config)
    cfg["axes_dims_rope"] = tuple(cfg["axes_dims_rope"])
    transformer = FluxTransformer2DModel(**cfg)
    return ClassConditionedFlux(transformer, num_classes=num_classes,
                                num_text_tokens=num_text_tokens, image_size=image_size, patch=patch)


# --------------------------------------------------------------------------- SD3


def sd3_config() -> dict[str, Any]:
    """Config of the reference SD3 transformer: 6 joint (MMDiT) blocks, hidden 128 (4 heads x 32),
    patch 4 on 3x32x32 pixels (64 image tokens), QK RMS-norm (as SD3.5).

    The Flux reference sees the same 64 image tokens and 4 text tokens. Eager fp32 forward of a
    CFG batch of 16 on one CPU thread: 104 ms against the Flux reference's 147 ms, 3.48M
    parameters against its 2.80M (each joint block carries a text stream whose weights are as
    large as the image stream's, for 4 tokens); 8 blocks: 136 ms but 4.67M parameters, and fewer
    training steps in the same time budget. Patch 2 (256 tokens) would cost 4-5x more per step,
    too much to train on one CPU thread."""
    return {
        "sample_size": 32,
        "patch_size": 4,
        "in_channels": 3,
        "out_channels": 3,
        "num_layers": 6,
        "attention_head_dim": 32,
        "num_attention_heads": 4,
        "joint_attention_dim": 64,
        "caption_projection_dim": 128,  # = hidden: the text stream of a joint block works at the model's width
        "pooled_projection_dim": 64,
        "pos_embed_max_size": 8,  # 32 / 4: the position grid is exactly the token grid
        "qk_norm": "rms_norm",
    }


def tiny_sd3_config() -> dict[str, Any]:
    """A much smaller SD3 transformer with the same interface (for fast tests; 16x16 images)."""
    cfg = sd3_config()
    cfg.update(sample_size=16, num_layers=2, attention_head_dim=16, num_attention_heads=2, caption_projection_dim=32,
               pos_embed_max_size=4)
    return cfg


class ClassConditionedSD3(ClassConditioned):
    """Class-label conditioning (:class:`ClassConditioned`) around an ``SD3Transformer2DModel``.

    ``forward(x, timestep, class_labels) -> velocity``: ``x`` an image batch [B, 3, H, W]
    (the transformer patchifies it itself), the velocity ``noise - data`` as an image batch.
    ``timestep`` is the flow time in [0, 1]; the transformer gets ``1000 * t`` (SD3 takes the
    timestep on the 0-1000 scale its pipeline passes, where Flux multiplies by 1000 itself:
    both transformers see the same numbers). Class ``num_classes`` is the null class. The
    transformer is called with plain keyword arguments, as in :class:`ClassConditionedFlux`.
    """

    def forward(self, x: torch.Tensor, timestep: torch.Tensor | float,
                class_labels: torch.Tensor) -> torch.Tensor:
        timestep, encoder_hidden_states, pooled = self.conditioning(x, timestep, class_labels)
        return self.transformer(
            hidden_states=x,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled,
            timestep=timestep * 1000.0,
            return_dict=False,
        )[0]


def build_sd3(config: dict[str, Any], num_classes: int = NUM_CLASSES, num_text_tokens: int = 4,
              image_size: int | None = None) -> ClassConditionedSD3:
    """Instantiate a :class:`ClassConditionedSD3` from a transformer ``config`` (random init);
    ``image_size`` defaults to the config's ``sample_size``."""
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel(**config)
    size = int(config["sample_size"]) if image_size is None else image_size
    return ClassConditionedSD3(transformer, num_classes=num_classes, num_text_tokens=num_text_tokens, image_size=size)


# ------------------------------------------------------------------------ loading


def _find_config(model) -> dict[str, Any] | None:
    """Best-effort diffusers config of ``model`` or of what it wraps."""
    seen = 0
    obj = model
    while obj is not None and seen < 4:
        cfg = getattr(obj, "config", None)
        if cfg is not None:
            try:
                return dict(cfg)
            except (TypeError, ValueError):
                pass
        nxt = getattr(obj, "_orig_mod", None)
        obj = nxt if nxt is not None else getattr(obj, "transformer", None)
        seen += 1
    return None


def _read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.exists():
        raise FileNotFoundError(
            f"reference weights {path} are missing; run "
            "`python benchmarks/train_reference.py --out adacorr_compile/lab/reference/weights`")
    return {k: v.float() for k, v in load_file(str(path)).items()}


def load_reference_dit(weights_dir: str | Path | None = None):
    """The trained reference ``DiTTransformer2DModel`` (eval, float32, CPU)."""
    d = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    meta = _read_json(d / "dit_config.json")
    model = build_dit(meta["model"])
    model.load_state_dict(_load_state(d / "dit.safetensors"), strict=True)
    logger.debug("loaded reference DiT from %s", d)
    return model.float().eval()


def load_reference_flux(weights_dir: str | Path | None = None) -> ClassConditionedFlux:
    """The trained reference :class:`ClassConditionedFlux` (eval, float32, CPU)."""
    d = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    meta = _read_json(d / "flux_config.json")
    model = build_flux(meta["model"], num_classes=meta["num_classes"],
                       num_text_tokens=meta["num_text_tokens"], image_size=meta["image_size"],
                       patch=meta.get("patch", FLUX_PACK))
    model.load_state_dict(_load_state(d / "flux.safetensors"), strict=True)
    logger.debug("loaded reference Flux from %s", d)
    return model.float().eval()


def load_reference_sd3(weights_dir: str | Path | None = None) -> ClassConditionedSD3:
    """The trained reference :class:`ClassConditionedSD3` (eval, float32, CPU)."""
    d = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    meta = _read_json(d / "sd3_config.json")
    model = build_sd3(meta["model"], num_classes=meta["num_classes"], num_text_tokens=meta["num_text_tokens"],
                      image_size=meta["image_size"])
    model.load_state_dict(_load_state(d / "sd3.safetensors"), strict=True)
    logger.debug("loaded reference SD3 from %s", d)
    return model.float().eval()


# the trained reference models by name (benchmarks' ``--model``)
REFERENCE_LOADERS = {"dit": load_reference_dit, "flux": load_reference_flux, "sd3": load_reference_sd3}


def load_reference(kind: str, weights_dir: str | Path | None = None):
    """The trained reference model ``kind`` (``dit``, ``flux`` or ``sd3``)."""
    if kind not in REFERENCE_LOADERS:
        raise ValueError(f"unknown reference model {kind!r}; expected one of {', '.join(REFERENCE_LOADERS)}")
    return REFERENCE_LOADERS[kind](weights_dir)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
