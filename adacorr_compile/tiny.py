"""Tiny configs of the supported model families (random weights): for `adacorr inspect` and the tests.

Each factory returns ``(model, inputs)`` where ``inputs(step, t, batch=2)`` gives the forward
keyword arguments of one denoising step (inputs drift slowly with ``step``)."""

from __future__ import annotations

import torch


def tiny_dit(num_layers: int = 4):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=num_layers,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10,
    ).eval()

    def inputs(step: int, t: float, batch: int = 2):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(batch, 4, 8, 8, generator=g) + 0.01 * step
        return dict(hidden_states=x, timestep=torch.full((batch,), t), class_labels=torch.arange(batch) % 10)

    return model, inputs


def tiny_pixart(num_layers: int = 3):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=num_layers,
        sample_size=8, patch_size=2, cross_attention_dim=16, caption_channels=12, use_additional_conditions=False,
    ).eval()

    def inputs(step: int, t: float, batch: int = 2):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(batch, 4, 8, 8, generator=g) + 0.01 * step
        text = torch.randn(batch, 5, 12, generator=g)
        return dict(hidden_states=x, encoder_hidden_states=text, timestep=torch.full((batch,), t))

    return model, inputs


def tiny_sd3(num_layers: int = 3):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=num_layers, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10, out_channels=4, pos_embed_max_size=16,
    ).eval()

    def inputs(step: int, t: float, batch: int = 2):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(batch, 4, 8, 8, generator=g) + 0.01 * step
        return dict(
            hidden_states=x,
            encoder_hidden_states=torch.randn(batch, 7, 12, generator=g),
            pooled_projections=torch.randn(batch, 10, generator=g),
            timestep=torch.full((batch,), t),
        )

    return model, inputs


def tiny_flux(num_layers: int = 2, num_single_layers: int = 3):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=num_layers, num_single_layers=num_single_layers, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10, axes_dims_rope=(2, 2, 4),
    ).eval()

    def inputs(step: int, t: float, batch: int = 2):
        g = torch.Generator().manual_seed(1)
        tokens, text = 16, 6
        x = torch.randn(batch, tokens, 8, generator=g) + 0.01 * step
        img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(tokens, 3)
        return dict(
            hidden_states=x,
            encoder_hidden_states=torch.randn(batch, text, 12, generator=g),
            pooled_projections=torch.randn(batch, 10, generator=g),
            timestep=torch.full((batch,), t / 1000.0),
            img_ids=img_ids,
            txt_ids=torch.zeros(text, 3),
        )

    return model, inputs


FAMILIES = {
    "dit": (tiny_dit, ["transformer_blocks.%d" % i for i in range(4)]),
    "pixart": (tiny_pixart, ["transformer_blocks.%d" % i for i in range(3)]),
    "sd3": (tiny_sd3, ["transformer_blocks.%d" % i for i in range(3)]),
    "flux": (tiny_flux, ["transformer_blocks.0", "transformer_blocks.1"] + ["single_transformer_blocks.%d" % i for i in range(3)]),
}
