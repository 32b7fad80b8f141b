"""diffusers cache contexts on plain modules (issue 12): each ``cache_context`` name keeps
its own caches and counters, the pipeline's step index and step count drive the
generation and the guards, two compiled models can split a generation, the OEM
watches the streams only, and diffusers' own cache hooks are reported, not mixed in."""

import logging

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.cache_utils import CacheMixin

import adacorr_compile
from adacorr_compile.runtime import contexts
from adacorr_compile.lab.tiny import PlainDiT, _plain_inputs

REUSE = {"lowering": "eager", "reuse_threshold": 1.0}  # reuse wherever the guards allow
STEPS = 8


class CtxDiT(PlainDiT, CacheMixin):
    """The plain-torch DiT with diffusers' ``cache_context`` (no other diffusers code)."""


def _model(seed=0):
    torch.manual_seed(seed)
    return CtxDiT().eval()


def _inputs(step, branch):
    kw = _plain_inputs(step, 900.0 - step * 900.0 / STEPS)
    if branch == "uncond":
        kw["hidden_states"] = kw["hidden_states"] * 0.5 - 0.3  # another trajectory
    return kw


def _run(model, branches, contexts_on=True, steps=STEPS, step_info=True):
    """One generation; per step, one call per branch (each in its cache_context)."""
    outs = {b: [] for b in branches}
    with torch.no_grad():
        for i in range(steps):
            for b in branches:
                info = {"step_index": i, "num_inference_steps": steps} if step_info else {}
                if contexts_on:
                    with model.cache_context(b, **info):
                        outs[b].append(model(**_inputs(i, b))[0])
                else:
                    outs[b].append(model(**_inputs(i, b))[0])
    return outs


def test_cond_and_uncond_contexts_keep_their_own_caches():
    """CFG as two calls per step: each branch equals that branch sampled alone, exactly,
    reuse happens, and the stats count the pipeline's steps, not twice as many."""
    model = _model()
    fast = torch.compile(model, backend="adacorr", options=REUSE)
    both = _run(fast, ["cond", "uncond"])
    s = adacorr_compile.stats(fast)
    assert s["steps"] == STEPS
    assert s["totals"]["reuses"] > 0
    assert s["totals"]["calls"] == 2 * STEPS * len(s["regions"])
    for branch in ("cond", "uncond"):
        alone = _run(fast, [branch])  # step_index back to 0: a new generation
        for got, want in zip(both[branch], alone[branch]):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    # without contexts, the two branches share one cache and twice the steps
    adacorr_compile.reset(fast)
    _run(fast, ["cond", "uncond"], contexts_on=False)
    assert adacorr_compile.stats(fast)["steps"] == 2 * STEPS


def test_contexts_without_step_info_use_timestep_detection_per_name():
    """Flux's pipeline names its contexts but gives no step index: the timestep run of
    each name is detected on its own."""
    model = _model()
    fast = torch.compile(model, backend="adacorr", options=REUSE)
    both = _run(fast, ["cond", "uncond"], step_info=False)
    assert adacorr_compile.stats(fast)["steps"] == STEPS
    assert adacorr_compile.stats(fast)["totals"]["reuses"] > 0
    again = _run(fast, ["cond", "uncond"], step_info=False)  # timestep turns back: new generation
    assert adacorr_compile.stats(fast)["generations"] >= 1
    for branch in ("cond", "uncond"):
        for got, want in zip(again[branch], both[branch]):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_step_index_and_count_from_the_context_drive_the_guards():
    """The pipeline's step count sets the final-steps guard (no guessing from the
    timestep), and its step index going back to 0 starts a new generation; an identical
    second generation needs no recompilation."""
    model = _model()
    fast = torch.compile(model, backend="adacorr", options={**REUSE, "final_steps": 2})
    first = _run(fast, ["cond"])
    s = adacorr_compile.stats(fast)
    region = s["regions"][-1]
    assert s["steps"] == STEPS and s["generations"] == 0
    assert region["reuse_trace"][-2:] == [0.0, 0.0]  # the last two steps computed
    assert sum(region["reuse_trace"]) > 0
    with torch.compiler.set_stance("fail_on_recompile"):
        second = _run(fast, ["cond"])
    assert adacorr_compile.stats(fast)["generations"] == 1
    for got, want in zip(second["cond"], first["cond"]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_context_step_count_beats_a_misleading_timestep():
    """A timestep that says nothing about the schedule (constant): the context's step
    count alone sets where the generation ends."""
    model = _model()
    fast = torch.compile(model, backend="adacorr", options={**REUSE, "final_steps": 1})
    with torch.no_grad():
        for i in range(6):
            kw = _plain_inputs(i, 500.0)
            with fast.cache_context("cond", step_index=i, num_inference_steps=6):
                fast(**kw)
    trace = adacorr_compile.stats(fast)["regions"][-1]["reuse_trace"]
    assert trace[-1] == 0.0 and sum(trace) > 0


def test_two_compiled_models_split_a_generation_at_a_boundary():
    """Wan 2.2: ``transformer`` runs the high-noise steps, ``transformer_2`` the rest, each
    in the pipeline's contexts; a second generation gives the same outputs."""
    high = torch.compile(_model(0), backend="adacorr", options=REUSE)
    low = torch.compile(_model(1), backend="adacorr", options=REUSE)

    def generate():
        outs = []
        with torch.no_grad():
            for i in range(STEPS):
                current = high if i < 4 else low
                for b in ("cond", "uncond"):
                    with current.cache_context(b, step_index=i, num_inference_steps=STEPS):
                        outs.append(current(**_inputs(i, b))[0])
        return outs

    first = generate()
    second = generate()
    for got, want in zip(second, first):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for model in (high, low):
        s = adacorr_compile.stats(model)
        assert s["steps"] == 4 and s["generations"] == 1
        assert s["totals"]["reuses"] > 0
    # the low-noise model knows its steps are the last ones: the final step computed
    assert adacorr_compile.stats(low)["regions"][-1]["reuse_trace"][-1] == 0.0


def test_contexts_are_private_to_their_module():
    """A context set on one model says nothing about another model called inside it."""
    a, b = _model(0), _model(1)
    fa = torch.compile(a, backend="adacorr", options=REUSE)
    fb = torch.compile(b, backend="adacorr", options=REUSE)
    with torch.no_grad():
        for i in range(4):
            with fa.cache_context("cond", step_index=i, num_inference_steps=4):
                fa(**_inputs(i, "cond"))
                fb(**_inputs(i, "cond"))
    param_a, param_b = next(a.parameters()), next(b.parameters())
    with a.cache_context("x", step_index=2):
        assert contexts.context_for(param_a)[0] == contexts.CallContext("x", step_index=2)
        assert contexts.context_for(param_b) is None
    assert contexts.context_for(param_a) is None  # cleared on exit
    assert adacorr_compile.stats(fa)["steps"] == adacorr_compile.stats(fb)["steps"] == 4


# ------------------------------------------------------------------ OEM on streams only
class _MaskedBlock(torch.nn.Module):
    """Self-attention, then cross-attention to text tokens with an additive mask bias
    ``[B, 1, T]`` (0 for valid tokens, -10000 for padding, as PixArt and Sana pass it)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.q = torch.nn.Linear(dim, dim)
        self.kv = torch.nn.Linear(dim, 2 * dim)
        self.mlp = torch.nn.Linear(dim, dim)
        self.ada = torch.nn.Linear(dim, dim)

    def forward(self, x, text, bias, c):
        q, k, v = self.qkv(x).chunk(3, -1)
        x = x + F.scaled_dot_product_attention(q, k, v)
        k, v = self.kv(text).chunk(2, -1)
        x = x + F.scaled_dot_product_attention(self.q(x), k, v, attn_mask=bias)
        return x + torch.tanh(self.ada(c)).unsqueeze(1) * self.mlp(x)


class MaskedDiT(torch.nn.Module):
    def __init__(self, dim: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(4, dim)
        self.t_embed = torch.nn.Linear(1, dim)
        self.blocks = torch.nn.ModuleList([_MaskedBlock(dim) for _ in range(depth)])
        self.out = torch.nn.Linear(dim, 4)

    def forward(self, hidden_states, timestep, text, text_mask):
        bias = (1.0 - text_mask.float()).unsqueeze(1) * -10000.0  # [B, 1, T]
        x = self.embed(hidden_states)
        c = self.t_embed(timestep[:, None] / 1000.0)
        for block in self.blocks:
            x = block(x, text, bias, c)
        return self.out(x)


def test_padded_mask_leaves_lambda_unchanged():
    """The OEM watches the block's stream, not its side inputs: a padded mask (-10000
    biases) gives the first block the same lambdas as an unpadded one, while the
    output does change with the mask."""
    torch.manual_seed(0)
    model = MaskedDiT().eval()
    g = torch.Generator().manual_seed(0)
    x0, text = torch.randn(2, 12, 4, generator=g), torch.randn(2, 6, 16, generator=g)
    full, padded = torch.ones(2, 6), torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    options = {"lowering": "eager", "scope": "block", "forecast": "none", "reuse_threshold": 0.0}
    traces, outs = [], []
    for mask in (full, padded):
        torch._dynamo.reset()
        fast = torch.compile(model, backend="adacorr", options=options)
        with torch.no_grad():
            for i in range(5):
                outs.append(fast(x0 + 0.05 * i, torch.full((2,), 900.0 - 150 * i), text, mask))
        first = adacorr_compile.stats(fast)["regions"][0]
        traces.append(first["lambda_trace"])
        region = adacorr_compile.regions(fast)[0]
        assert region.spec.observed == tuple(i for i, _ in region.spec.stream_pairs)
    assert sum(v == v for v in traces[0]) >= 4  # measured at every step after the first
    torch.testing.assert_close(torch.tensor(traces[1]), torch.tensor(traces[0]), rtol=0, atol=0, equal_nan=True)
    assert not torch.allclose(outs[4], outs[9])  # the mask does reach the output


# ------------------------------------------------------------ diffusers' own cache hooks
def test_diffusers_cache_hooks_are_reported_and_left_alone(caplog):
    """``enable_cache(FirstBlockCacheConfig(...))`` on the model: a warning names the
    conflict, ``stats()["fallbacks"]`` says why, and the output is diffusers' own."""
    from diffusers import FirstBlockCacheConfig

    from adacorr_compile.lab.tiny import tiny_flux

    model, inputs = tiny_flux()
    model.enable_cache(FirstBlockCacheConfig(threshold=0.2))

    def sample(fn):
        outs = []
        with torch.no_grad():
            for i in range(4):
                with model.cache_context("cond", step_index=i, num_inference_steps=4):
                    outs.append(fn(**inputs(i, 1.0 - i / 4)).sample)
        model._reset_stateful_cache()
        return outs

    want = sample(model)
    fast = torch.compile(model, backend="adacorr")
    with caplog.at_level(logging.WARNING, logger="adacorr_compile"):
        got = sample(fast)
    assert any("diffusers cache hooks" in r.getMessage() for r in caplog.records)
    fallbacks = adacorr_compile.stats(fast)["fallbacks"]
    assert fallbacks and all("diffusers cache hooks" in f for f in fallbacks)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


class _Wrapped(torch.nn.Module):
    """A wrapper that embeds class labels around a diffusers model (the context is set
    on the inner model, the whole wrapper is compiled)."""

    def __init__(self) -> None:
        super().__init__()
        self.label_scale = torch.nn.Parameter(torch.ones(1))
        self.transformer = _model()

    def forward(self, hidden_states, timestep):
        return self.transformer(hidden_states * self.label_scale, timestep)


def test_context_set_on_an_inner_model_reaches_the_compiled_wrapper():
    wrapper = _Wrapped().eval()
    fast = torch.compile(wrapper, backend="adacorr", options=REUSE)
    with torch.no_grad():
        for i in range(STEPS):
            for b in ("cond", "uncond"):
                with wrapper.transformer.cache_context(b, step_index=i, num_inference_steps=STEPS):
                    fast(**_inputs(i, b))
    s = adacorr_compile.stats(fast)
    assert s["steps"] == STEPS and s["totals"]["reuses"] > 0


def test_backend_cache_context_for_a_plain_module():
    """``adacorr_compile.cache_context`` gives a model without diffusers' CacheMixin the
    same per-name state; bad arguments are named."""
    from adacorr_compile.lab.tiny import tiny_plain

    model, _ = tiny_plain()
    fast = torch.compile(model, backend="adacorr", options=REUSE)
    with torch.no_grad():
        for i in range(STEPS):
            for b in ("cond", "uncond"):
                with adacorr_compile.cache_context(fast, b, step_index=i, num_inference_steps=STEPS):
                    fast(**_inputs(i, b))
    s = adacorr_compile.stats(fast)
    assert s["steps"] == STEPS and s["totals"]["reuses"] > 0
    with pytest.raises(ValueError, match="step_index got -1"):
        adacorr_compile.cache_context(fast, "cond", step_index=-1)
    with pytest.raises(ValueError, match="num_inference_steps got 0"):
        adacorr_compile.cache_context(fast, "cond", num_inference_steps=0)
    with pytest.raises(TypeError, match="name must be a str"):
        adacorr_compile.cache_context(fast, 1)
    with pytest.raises(TypeError, match="must be an nn.Module"):
        adacorr_compile.cache_context(lambda x: x, "cond")
