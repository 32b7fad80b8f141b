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


def tiny_sana(num_layers: int = 3):
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(0)
    model = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=num_layers,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=12,
        sample_size=8, patch_size=1,
    ).eval()

    def inputs(step: int, t: float, batch: int = 2):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(batch, 4, 8, 8, generator=g) + 0.01 * step
        return dict(hidden_states=x, encoder_hidden_states=torch.randn(batch, 5, 12, generator=g), timestep=torch.full((batch,), t))

    return model, inputs


def tiny_hunyuan_dit(num_layers: int = 4):
    from diffusers import HunyuanDiT2DModel
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    torch.manual_seed(0)
    model = HunyuanDiT2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2, sample_size=8, hidden_size=16,
        num_layers=num_layers, cross_attention_dim=16, cross_attention_dim_t5=16, pooled_projection_dim=16, text_len=5,
        text_len_t5=6, use_style_cond_and_image_meta_size=False,
    ).eval()
    rope = get_2d_rotary_pos_embed(8, ((0, 0), (4, 4)), (4, 4), use_real=True)

    def inputs(step: int, t: float, batch: int = 2):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(batch, 4, 8, 8, generator=g) + 0.01 * step
        return dict(
            hidden_states=x, timestep=torch.full((batch,), t),
            encoder_hidden_states=torch.randn(batch, 5, 16, generator=g), text_embedding_mask=torch.ones(batch, 5),
            encoder_hidden_states_t5=torch.randn(batch, 6, 16, generator=g), text_embedding_mask_t5=torch.ones(batch, 6),
            image_rotary_emb=rope,
        )

    return model, inputs


def tiny_cogvideox(num_layers: int = 3):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=16, text_embed_dim=12,
        num_layers=num_layers, sample_width=8, sample_height=8, sample_frames=5, patch_size=2, max_text_seq_length=6,
    ).eval()

    def inputs(step: int, t: float, batch: int = 2):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(batch, 2, 4, 8, 8, generator=g) + 0.01 * step
        return dict(hidden_states=x, encoder_hidden_states=torch.randn(batch, 6, 12, generator=g), timestep=torch.full((batch,), t))

    return model, inputs


def tiny_wan(num_layers: int = 3):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=12,
        freq_dim=16, ffn_dim=32, num_layers=num_layers, rope_max_seq_len=32,
    ).eval()

    def inputs(step: int, t: float, batch: int = 2):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(batch, 4, 2, 8, 8, generator=g) + 0.01 * step
        return dict(hidden_states=x, timestep=torch.full((batch,), t), encoder_hidden_states=torch.randn(batch, 6, 12, generator=g))

    return model, inputs


def tiny_hunyuan_video(num_layers: int = 2, num_single_layers: int = 2):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=num_layers,
        num_single_layers=num_single_layers, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=False,
        text_embed_dim=12, pooled_projection_dim=10, rope_axes_dim=(2, 2, 4),
    ).eval()

    def inputs(step: int, t: float, batch: int = 2):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(batch, 4, 1, 8, 8, generator=g) + 0.01 * step
        return dict(
            hidden_states=x, timestep=torch.full((batch,), t), encoder_hidden_states=torch.randn(batch, 6, 12, generator=g),
            encoder_attention_mask=torch.ones(batch, 6), pooled_projections=torch.randn(batch, 10, generator=g),
        )

    return model, inputs


def tiny_ltx_video(num_layers: int = 3):
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    model = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=num_layers, caption_channels=12,
    ).eval()

    def inputs(step: int, t: float, batch: int = 2):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(batch, 2 * 4 * 4, 8, generator=g) + 0.01 * step
        return dict(
            hidden_states=x, encoder_hidden_states=torch.randn(batch, 6, 12, generator=g), timestep=torch.full((batch,), t),
            encoder_attention_mask=torch.ones(batch, 6), num_frames=2, height=4, width=4,
        )

    return model, inputs


class _PlainBlock(torch.nn.Module):
    """An adaLN-Zero DiT block written with plain torch (no diffusers)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = torch.nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(4 * dim, dim))
        self.ada = torch.nn.Linear(dim, 6 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        s1, b1, g1, s2, b2, g2 = self.ada(torch.nn.functional.silu(c)).unsqueeze(1).chunk(6, dim=-1)
        h = self.norm1(x) * (1 + s1) + b1
        x = x + g1 * self.attn(h, h, h, need_weights=False)[0]
        h = self.norm2(x) * (1 + s2) + b2
        return x + g2 * self.mlp(h)


class PlainDiT(torch.nn.Module):
    """A minimal DiT in plain torch: patchify, timestep embedding, N blocks, unpatchify."""

    def __init__(self, dim: int = 32, depth: int = 4, heads: int = 2, channels: int = 4, patch: int = 2) -> None:
        super().__init__()
        self.patch = patch
        self.embed = torch.nn.Conv2d(channels, dim, patch, patch)
        self.t_embed = torch.nn.Sequential(torch.nn.Linear(1, dim), torch.nn.SiLU(), torch.nn.Linear(dim, dim))
        self.blocks = torch.nn.ModuleList([_PlainBlock(dim, heads) for _ in range(depth)])
        self.out = torch.nn.Linear(dim, channels * patch * patch)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, return_dict: bool = True):
        b, c, hh, ww = hidden_states.shape
        x = self.embed(hidden_states).flatten(2).transpose(1, 2)
        cond = self.t_embed(timestep.float()[:, None] / 1000.0)
        for block in self.blocks:
            x = block(x, cond)
        x = self.out(x).reshape(b, hh // self.patch, ww // self.patch, c, self.patch, self.patch)
        out = x.permute(0, 3, 1, 4, 2, 5).reshape(b, c, hh, ww)
        return (out,)


def _plain_inputs(step: int, t: float, batch: int = 2):
    """Forward kwargs of the plain-torch DiTs: 4x8x8 latents drifting with ``step``, a ``[B]`` timestep."""
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g) + 0.01 * step, timestep=torch.full((batch,), t))


def tiny_plain(depth: int = 4):
    torch.manual_seed(0)
    model = PlainDiT(depth=depth).eval()

    return model, _plain_inputs


class _NestedBlock(_PlainBlock):
    forward = torch.compiler.nested_compile_region(_PlainBlock.forward)


def tiny_nested_region(depth: int = 4):
    """PlainDiT whose blocks' forward is a ``torch.compiler.nested_compile_region``."""
    model, inputs = tiny_plain(depth)
    for block in model.blocks:
        block.__class__ = _NestedBlock
    return model, inputs


EXTRA_FAMILIES = {
    "sana": (tiny_sana, ["transformer_blocks.%d" % i for i in range(3)]),
    "hunyuan_dit": (tiny_hunyuan_dit, ["blocks.%d" % i for i in range(4)]),
    "cogvideox": (tiny_cogvideox, ["transformer_blocks.%d" % i for i in range(3)]),
    "wan": (tiny_wan, ["blocks.%d" % i for i in range(3)]),
    "hunyuan_video": (tiny_hunyuan_video, ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.1"]),
    "ltx_video": (tiny_ltx_video, ["transformer_blocks.%d" % i for i in range(3)]),
    "plain": (tiny_plain, ["blocks.%d" % i for i in range(4)]),
    "nested_region": (tiny_nested_region, ["blocks.%d" % i for i in range(4)]),
}
ALL_FAMILIES = {**FAMILIES, **EXTRA_FAMILIES}


# --- trust suite: families with in-place writes, graph breaks and joint sequences --------------


def tiny_lumina2(num_layers: int = 3, num_refiner_layers: int = 2):
    """Lumina2: refiner blocks, then image and text tokens written in place into a joint sequence."""
    from diffusers import Lumina2Transformer2DModel

    torch.manual_seed(0)
    model = Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=num_layers, num_refiner_layers=num_refiner_layers,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 6, 6), axes_lens=(32, 32, 32),
        cap_feat_dim=16,
    ).eval()

    def inputs(step: int, t: float, batch: int = 2):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(batch, 4, 8, 8, generator=g) + 0.01 * step
        return dict(
            hidden_states=x, timestep=torch.full((batch,), t / 1000.0), encoder_hidden_states=torch.randn(batch, 5, 16, generator=g),
            encoder_attention_mask=torch.ones(batch, 5, dtype=torch.bool),
        )

    return model, inputs


def tiny_omnigen(num_layers: int = 3):
    """OmniGen: text condition tokens, a time token and image tokens in one sequence (no input images)."""
    from diffusers import OmniGenTransformer2DModel

    torch.manual_seed(0)
    heads, dim = 2, 32
    half = dim // heads // 2
    model = OmniGenTransformer2DModel(
        in_channels=4, patch_size=2, hidden_size=dim, num_attention_heads=heads, num_key_value_heads=heads,
        intermediate_size=64, num_layers=num_layers, pad_token_id=0, vocab_size=50, max_position_embeddings=64,
        original_max_position_embeddings=64, rope_scaling={"short_factor": [1.0] * half, "long_factor": [1.0] * half},
        pos_embed_max_size=8, time_step_dim=16,
    ).eval()
    text = 4

    def inputs(step: int, t: float, batch: int = 2):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(batch, 4, 8, 8, generator=g) + 0.01 * step
        seq = text + 1 + 16  # condition tokens, time token, image tokens
        return dict(
            hidden_states=x, timestep=torch.full((batch,), t / 1000.0),
            input_ids=torch.randint(1, 50, (batch, text), generator=g), input_img_latents=[], input_image_sizes={},
            attention_mask=torch.ones(batch, seq, seq), position_ids=torch.arange(seq).expand(batch, seq),
        )

    return model, inputs


def tiny_mochi(num_layers: int = 3):
    """Mochi: dual-stream blocks (the last one context_pre_only), text attention mask."""
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(0)
    model = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=num_layers, pooled_projection_dim=16,
        in_channels=4, text_embed_dim=16, time_embed_dim=16, max_sequence_length=6,  # text_embed_dim: 8 pooling heads
    ).eval()

    def inputs(step: int, t: float, batch: int = 2):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(batch, 4, 2, 8, 8, generator=g) + 0.01 * step
        return dict(
            hidden_states=x, encoder_hidden_states=torch.randn(batch, 6, 16, generator=g), timestep=torch.full((batch,), t),
            encoder_attention_mask=torch.ones(batch, 6, dtype=torch.bool),
        )

    return model, inputs


class InplaceDiT(torch.nn.Module):
    """A plain-torch DiT that writes its tokens into slices of a joint sequence buffer before
    its blocks, as Lumina2 does: register tokens by ``copy_`` into a slice view, image tokens
    by slice assignment (``operator.setitem``). The image tokens pass through a few more ops
    than the timestep embedding, so a topological re-sort that ignores in-place writes runs
    the first block before the image tokens are written."""

    def __init__(self, dim: int = 32, depth: int = 3, heads: int = 2, channels: int = 4, patch: int = 2, registers: int = 3) -> None:
        super().__init__()
        self.patch, self.registers = patch, registers
        self.embed = torch.nn.Conv2d(channels, dim, patch, patch)
        self.x_norm = torch.nn.LayerNorm(dim)
        self.x_proj = torch.nn.Linear(dim, dim)
        self.register_tokens = torch.nn.Parameter(torch.randn(1, registers, dim))
        self.t_in = torch.nn.Linear(1, dim)
        self.t_out = torch.nn.Linear(dim, dim)
        self.blocks = torch.nn.ModuleList([_PlainBlock(dim, heads) for _ in range(depth)])
        self.out = torch.nn.Linear(dim, channels * patch * patch)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, return_dict: bool = True):
        b, c, hh, ww = hidden_states.shape
        cond = self.t_out(torch.nn.functional.silu(self.t_in(timestep.float()[:, None] / 1000.0)))
        x = self.embed(hidden_states).flatten(2).transpose(1, 2)
        x = x + torch.tanh(self.x_proj(self.x_norm(x)))
        r = self.registers
        seq = torch.zeros(b, r + x.shape[1], x.shape[2], dtype=x.dtype, device=x.device)
        seq[:, :r].copy_(self.register_tokens.expand(b, -1, -1))
        seq[:, r:] = x
        for block in self.blocks:
            seq = block(seq, cond)
        x = self.out(seq[:, r:]).reshape(b, hh // self.patch, ww // self.patch, c, self.patch, self.patch)
        return (x.permute(0, 3, 1, 4, 2, 5).reshape(b, c, hh, ww),)


def tiny_plain_inplace(depth: int = 3):
    torch.manual_seed(0)
    model = InplaceDiT(depth=depth).eval()

    return model, _plain_inputs


# {name: (factory, expected region paths)}; an empty list: the family falls back with a reason
TRUST_FAMILIES = {
    "lumina2": (tiny_lumina2, ["context_refiner.0", "context_refiner.1", "noise_refiner.0", "noise_refiner.1", "layers.0", "layers.1", "layers.2"]),
    "omnigen": (tiny_omnigen, ["layers.%d" % i for i in range(3)]),
    # Mochi's attention processor picks each sample's valid text tokens with torch.nonzero: a graph
    # break inside every block, so no graph holds a whole block and the model compiles unguarded
    "mochi": (tiny_mochi, []),
    "plain_inplace": (tiny_plain_inplace, ["blocks.%d" % i for i in range(3)]),
}


def tiny_hidream(num_layers: int = 2, num_single_layers: int = 2):
    """HiDream-I1: dual- then single-stream blocks, each wrapped (``HiDreamBlock``), with a
    mixture-of-experts feed-forward whose data-dependent routing breaks the block's graph."""
    from diffusers import HiDreamImageTransformer2DModel

    torch.manual_seed(0)
    blocks = num_layers + num_single_layers
    model = HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=8, num_attention_heads=2, caption_channels=[12, 20], text_emb_dim=16,
        num_routed_experts=4, num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(16, 16),
        llama_layers=list(range(blocks)),
    ).eval()

    def inputs(step: int, t: float, batch: int = 2):
        g = torch.Generator().manual_seed(1)
        return dict(
            hidden_states=torch.randn(batch, 4, 8, 8, generator=g) + 0.01 * step, timesteps=torch.full((batch,), t),
            encoder_hidden_states_t5=torch.randn(batch, 6, 12, generator=g),
            encoder_hidden_states_llama3=torch.randn(blocks, batch, 6, 20, generator=g),
            pooled_embeds=torch.randn(batch, 16, generator=g),
        )

    return model, inputs


def tiny_hunyuan_video15(num_layers: int = 3):
    """HunyuanVideo 1.5: dual-stream blocks over video tokens, with a token refiner and
    three text/image condition streams joined before the blocks."""
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=num_layers,
        num_refiner_layers=1, mlp_ratio=2.0, text_embed_dim=16, text_embed_2_dim=12, image_embed_dim=20,
        rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v",
    ).eval()

    def inputs(step: int, t: float, batch: int = 2):
        g = torch.Generator().manual_seed(1)
        return dict(
            hidden_states=torch.randn(batch, 4, 2, 8, 8, generator=g) + 0.01 * step, timestep=torch.full((batch,), t),
            encoder_hidden_states=torch.randn(batch, 6, 16, generator=g),
            encoder_attention_mask=torch.ones(batch, 6, dtype=torch.bool),
            encoder_hidden_states_2=torch.randn(batch, 4, 12, generator=g),
            encoder_attention_mask_2=torch.ones(batch, 4, dtype=torch.bool),
            image_embeds=torch.zeros(batch, 3, 20),
        )

    return model, inputs


def tiny_qwenimage(num_layers: int = 3):
    """QwenImage: dual-stream MMDiT blocks with a text mask and 3-axis rotary embeddings."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=num_layers, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4),
    ).eval()

    def inputs(step: int, t: float, batch: int = 2):
        g = torch.Generator().manual_seed(1)
        return dict(
            hidden_states=torch.randn(batch, 16, 16, generator=g) + 0.01 * step, timestep=torch.full((batch,), t / 1000.0),
            encoder_hidden_states=torch.randn(batch, 6, 16, generator=g),
            encoder_hidden_states_mask=torch.ones(batch, 6, dtype=torch.bool), img_shapes=[[(1, 4, 4)]] * batch,
        )

    return model, inputs
