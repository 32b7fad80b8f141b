"""Graph patterns of real diffusers models that used to fall back to plain Inductor
(issue 31): blocks inside ``torch.autocast`` regions (``split_module`` refused the
partitions, Helios; or the bodies, compiled outside the autocast, ran at full
precision), and cut-out blocks whose token count is a sum of sizes (text + image) under
``dynamic=True`` (a size symbol Dynamo had replaced by another was bound, Krea2). Each
pattern must be guarded (regions found, ``stats()["fallbacks"]`` empty), equal plain
``torch.compile`` with ``policy="never"``, reuse blocks over a multi-step loop, and work
at a second sequence length."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import adacorr_compile
from test_dynamic import run_both  # ours and plain torch.compile, each on a fresh Dynamo

NEVER = {"policy": "never"}
REUSE = {"reuse_threshold": 1.0}  # permissive: every step after the warm-up may reuse
TOL = dict(rtol=1e-5, atol=1e-5)


def assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, **TOL)


def assert_guarded(compiled, count):
    stats = adacorr_compile.stats(compiled)
    assert stats["fallbacks"] == []
    assert len(adacorr_compile.regions(compiled)) == count, [r.spec.path for r in adacorr_compile.regions(compiled)]


# ----------------------------------------------------------------- autocast, plain modules
class Block(nn.Module):
    """A modulated residual MLP block; ``mode="inner"`` runs it under bf16 autocast,
    ``mode="switch"`` runs only its norm with autocast disabled (a switch inside it)."""

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.norm, self.fc1, self.fc2, self.mode = nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim), mode

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(h)))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.mode == "inner":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return x + self.mlp(self.norm(x) * (1 + c))
        if self.mode == "switch":
            with torch.autocast("cpu", enabled=False):
                h = self.norm(x.float())
            return x + self.mlp(h * (1 + c)).to(x.dtype)
        return x + self.mlp(self.norm(x) * (1 + c))


class AutocastDiT(nn.Module):
    """Four blocks; ``outer``: the block loop runs under bf16 autocast (the whole stream is
    bf16 inside it), ``inner``/``switch``: see :class:`Block`. The glue computes a table
    with autocast disabled (Helios' rotary) and reads a slice of a glue tensor after the
    blocks (a tensor ``getitem`` placed after the regions)."""

    def __init__(self, mode: str, dim: int = 16, depth: int = 4, glue_table: bool = True) -> None:
        super().__init__()
        self.mode, self.glue_table = mode, glue_table
        self.blocks = nn.ModuleList([Block(dim, mode) for _ in range(depth)])
        self.emb, self.out = nn.Linear(1, dim), nn.Linear(dim, dim)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        c = self.emb(timestep[:, None, None].float())
        x = hidden_states
        if self.glue_table:
            with torch.autocast("cpu", enabled=False):
                table = torch.arange(hidden_states.shape[1], dtype=torch.float32)[None, :, None] * c
            x = x + table
        if self.mode == "outer":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                for block in self.blocks:
                    x = block(x, c)
        else:
            for block in self.blocks:
                x = block(x, c)
        if not self.glue_table:
            return self.out(x.float())
        return self.out(x.float() + table[:, -x.shape[1]:])


def autocast_call(i: int, tokens: int = 8) -> dict:
    g = torch.Generator().manual_seed(i)
    return {"hidden_states": torch.randn(2, tokens, 16, generator=g), "timestep": torch.tensor([0.9 - 0.1 * i] * 2)}


def autocast_model(mode: str, glue_table: bool = True) -> AutocastDiT:
    torch.manual_seed(0)
    return AutocastDiT(mode, glue_table=glue_table).eval()


@pytest.mark.parametrize("mode", ["outer", "inner"])
@pytest.mark.parametrize("glue_table", [True, False], ids=["glue-table", "blocks-only"])
def test_blocks_under_autocast_cast_as_in_eager(mode, glue_table):
    """Bodies enter the autocast state themselves: with policy="never" the output equals
    plain torch.compile, also at a second sequence length. ``blocks-only`` (no autocast
    in the glue) was guarded before, but its bodies, compiled outside autocast, ran at
    full precision: off from eager by bf16 round-off."""
    model = autocast_model(mode, glue_table)
    calls = [autocast_call(0), autocast_call(1), autocast_call(2, tokens=12)]
    compiled, got, want = run_both(model, calls)
    assert_same(got, want)
    assert_guarded(compiled, 4)
    with torch.no_grad():
        eager = model(**calls[0])
    torch.testing.assert_close(got[0], eager, rtol=1e-2, atol=1e-2)  # bf16 matmuls, as in eager


def test_blocks_under_autocast_dynamic_true():
    model = autocast_model("outer")
    calls = [autocast_call(0), autocast_call(1, tokens=12), autocast_call(2, tokens=6)]
    compiled, got, want = run_both(model, calls, dynamic=True)
    assert_same(got, want)
    assert_guarded(compiled, 4)


def test_blocks_under_autocast_reuse():
    """Caching reuses blocks traced under autocast; the warm-up steps equal plain compile."""
    model = autocast_model("outer")
    calls = [autocast_call(i) for i in range(6)]
    compiled, got, want = run_both(model, calls, options=REUSE)
    assert_same(got[:2], want[:2])
    assert all(torch.isfinite(g).all() for g in got)
    stats = adacorr_compile.stats(compiled)
    assert stats["fallbacks"] == [] and stats["totals"]["reuses"] > 0


def test_autocast_switch_inside_block_is_left_unguarded_with_reason():
    """A block that switches autocast for part of its nodes is not guarded (its body could
    not tell which nodes ran under which state): a logged fallback, equal to plain compile."""
    model = autocast_model("switch")
    compiled, got, want = run_both(model, [autocast_call(0), autocast_call(1)])
    assert_same(got, want)
    fallbacks = adacorr_compile.stats(compiled)["fallbacks"]
    assert len(fallbacks) == 1 and "the autocast state changes inside the block" in fallbacks[0]


# ----------------------------------------------------------------- text + image tokens
class TextImageDiT(nn.Module):
    """Krea2's layout: text and image tokens concatenated (``T + N`` tokens), the text
    length read off both the mask and the text states, a key-padding mask over the joint
    sequence, and the image tokens sliced back out after the blocks."""

    def __init__(self, dim: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.img_in, self.txt_in, self.emb, self.out = nn.Linear(8, dim), nn.Linear(dim, dim), nn.Linear(1, dim), nn.Linear(dim, 8)
        self.blocks = nn.ModuleList([AttnBlock(dim) for _ in range(depth)])

    def forward(self, hidden_states, encoder_hidden_states, encoder_attention_mask, timestep):
        batch, image_len, _ = hidden_states.shape
        text_len = encoder_hidden_states.shape[1]
        mask = torch.cat([encoder_attention_mask, encoder_attention_mask.new_ones((batch, image_len))], dim=1)
        bias = torch.zeros(mask.shape, dtype=hidden_states.dtype).masked_fill(~mask, -1e4)[:, None, None, :]
        x = torch.cat([self.txt_in(encoder_hidden_states), self.img_in(hidden_states)], dim=1)
        pos = torch.arange(text_len + image_len, dtype=x.dtype)[None, :, None] / (text_len + image_len)
        c = self.emb(timestep[:, None, None])
        for block in self.blocks:
            x = block(x, c, pos, bias)
        return self.out(x[:, text_len:])


class AttnBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv, self.proj, self.norm = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.LayerNorm(dim)

    def forward(self, x, c, pos, bias):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm(x) * (1 + c) + pos).reshape(b, n, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
        h = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return x + self.proj(h.transpose(1, 2).reshape(b, n, d))


def text_image_call(i: int, text: int = 5, image: int = 16) -> dict:
    g = torch.Generator().manual_seed(i)
    mask = torch.ones(1, text, dtype=torch.bool)
    mask[:, -1] = False
    return {
        "hidden_states": torch.randn(1, image, 8, generator=g),
        "encoder_hidden_states": torch.randn(1, text, 16, generator=g),
        "encoder_attention_mask": mask,
        "timestep": torch.tensor([0.9 - 0.1 * i]),
    }


def test_text_image_tokens_dynamic_true():
    torch.manual_seed(0)
    model = TextImageDiT().eval()
    calls = [text_image_call(0), text_image_call(1, text=7, image=24), text_image_call(2, text=6, image=20)]
    compiled, got, want = run_both(model, calls, dynamic=True)
    assert_same(got, want)
    assert_guarded(compiled, 3)


# ----------------------------------------------------------------- tiny diffusers models
def tiny_krea2():
    from diffusers.models.transformers.transformer_krea2 import Krea2Transformer2DModel

    torch.manual_seed(0)
    model = Krea2Transformer2DModel(
        in_channels=8, num_layers=3, attention_head_dim=8, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, timestep_embed_dim=16, text_hidden_dim=16, num_text_layers=2,
        text_num_attention_heads=2, text_num_key_value_heads=2, text_intermediate_size=32,
        num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(2, 2, 4),
    ).eval()

    def call(i: int, text: int = 5, image: int = 16) -> dict:
        g = torch.Generator().manual_seed(i)
        return {
            "hidden_states": torch.randn(1, image, 8, generator=g),
            "encoder_hidden_states": torch.randn(1, text, 2, 16, generator=g),
            "timestep": torch.tensor([0.9 - 0.1 * i]),
            "position_ids": torch.randn(text + image, 3, generator=g),
            "encoder_attention_mask": torch.ones(1, text, dtype=torch.bool),
            "return_dict": False,
        }

    return model, call


def tiny_helios():
    from diffusers.models.transformers.transformer_helios import HeliosTransformer3DModel

    torch.manual_seed(0)
    model = HeliosTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=3, rope_dim=(4, 2, 2),
    ).eval()

    def call(i: int, frames: int = 2, size: int = 8) -> dict:
        g = torch.Generator().manual_seed(i)
        return {
            "hidden_states": torch.randn(1, 4, frames, size, size, generator=g),
            "timestep": torch.tensor([900.0 - 100 * i]),
            "encoder_hidden_states": torch.randn(1, 5, 16, generator=g),
            "indices_hidden_states": torch.arange(frames)[None],
            "return_dict": False,
        }

    return model, call


def test_krea2_dynamic_true_second_length():
    """Krea2's blocks take ``text + image`` tokens; a second call at other lengths
    recompiles with the text length bound twice (``s39`` replaced by ``s1``)."""
    model, call = tiny_krea2()
    calls = [call(0), call(1, text=7, image=24)]
    compiled, got, want = run_both(model, calls, dynamic=True)
    assert_same(got, want)
    assert_guarded(compiled, 3)


def test_helios_autocast_in_glue():
    """Helios computes its rotary table with autocast disabled and slices a glue tensor
    after the blocks (split_module's monotonic-partition check); and a second frame count."""
    model, call = tiny_helios()
    calls = [call(0), call(1), call(2, frames=3)]
    compiled, got, want = run_both(model, calls)
    assert_same(got, want)
    assert_guarded(compiled, 3)


@pytest.mark.parametrize("tiny", [tiny_krea2, tiny_helios], ids=["krea2", "helios"])
def test_diffusers_patterns_reuse(tiny):
    model, call = tiny()
    calls = [call(i) for i in range(6)]
    compiled, got, want = run_both(model, calls, options=REUSE)
    assert_same(got[:2], want[:2])
    assert all(torch.isfinite(g).all() for g in got)
    stats = adacorr_compile.stats(compiled)
    assert stats["fallbacks"] == [] and stats["totals"]["reuses"] > 0
