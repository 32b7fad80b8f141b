"""Regional compilation (issue 33): each block compiled alone is still a guarded region.

``transformer.compile_repeated_blocks(backend="adacorr")`` (diffusers) and ``block.compile(...)``
or ``torch.compile(block)`` by hand give one graph per block; all of them share the owner's
step (``runtime/regional.py``). Against whole-model compilation with the same options: the
same per-region decisions and outputs within round-off; ``policy="never"`` equals plain
regional compilation; no recompiles across generations; graph breaks between blocks (in the
owner's forward) leave the blocks guarded; a block whose own graph breaks is guarded at its
call; never a wrong result."""

import copy

import pytest
import torch

import adacorr_compile
from adacorr_compile.lab.tiny import (PlainDiT, _PlainBlock, tiny_hidream, tiny_hunyuan_dit, tiny_hunyuan_video, tiny_hunyuan_video15,
                                      tiny_ltx_video, tiny_mochi, tiny_plain, tiny_qwenimage)
from adacorr_compile.runtime.call_guard import guarded_at_call
from adacorr_compile.runtime.fused import RegionMath

EAGER = {"lowering": "eager", "reuse_threshold": 1.0}


def compile_blocks(model, *, container=None, **kwargs):
    """``block.compile(**kwargs)`` for every block of the model's repeated-block containers
    (what ``compile_repeated_blocks`` does, for models without ``_repeated_blocks``)."""
    for name, c in list(model.named_modules()):
        if isinstance(c, torch.nn.ModuleList) and len(c) > 1 and len({type(b) for b in c}) == 1:
            if container is None or name == container:
                for b in c:
                    b.compile(**kwargs)
    return model


def run(model, inputs, steps=6, generations=2):
    outs = []
    with torch.no_grad():
        for _ in range(generations):
            for k in range(steps):
                outs.append(model(**inputs(k, 900.0 - k * (900.0 / steps)))[0])
    return outs


def decisions(compiled):
    return [(r["path"], r["reuses"], r["computes"]) for r in adacorr_compile.stats(compiled)["regions"]]


def test_regional_equals_whole_model():
    model, inputs = tiny_plain(depth=4)
    whole = torch.compile(copy.deepcopy(model), backend="adacorr", options=EAGER)
    regional = compile_blocks(copy.deepcopy(model), backend="adacorr", options=EAGER)
    for a, b in zip(run(whole, inputs), run(regional, inputs)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    expected = decisions(whole)
    assert sum(r for _, r, _ in expected) > 0  # the comparison covers reuses
    assert decisions(regional) == expected
    s = adacorr_compile.stats(regional)
    assert s["fallbacks"] == [] and s["generations"] == 1 and s["steps"] == 6


def test_torch_compile_per_block_by_hand():
    """``torch.compile(block)`` put back into the ModuleList: the same as ``block.compile``."""
    model, inputs = tiny_plain(depth=4)
    whole = torch.compile(copy.deepcopy(model), backend="adacorr", options=EAGER)
    regional = copy.deepcopy(model)
    for i in range(len(regional.blocks)):
        regional.blocks[i] = torch.compile(regional.blocks[i], backend="adacorr", options=EAGER)
    for a, b in zip(run(whole, inputs), run(regional, inputs)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert decisions(regional) == decisions(whole)


def test_never_equals_plain_regional_compilation():
    model, inputs = tiny_plain(depth=3)
    plain = compile_blocks(copy.deepcopy(model))  # Inductor
    ours = compile_blocks(copy.deepcopy(model), backend="adacorr", options={"policy": "never"})
    for a, b in zip(run(plain, inputs, steps=3, generations=1), run(ours, inputs, steps=3, generations=1)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    s = adacorr_compile.stats(ours)
    assert s["totals"]["reuses"] == 0 and s["totals"]["computes"] == 3 * 3


def test_no_recompiles_across_generations():
    model, inputs = tiny_plain(depth=4)
    regional = compile_blocks(copy.deepcopy(model), backend="adacorr", options=EAGER)
    run(regional, inputs, generations=1)
    with torch.compiler.set_stance("fail_on_recompile"):
        run(regional, inputs, generations=2)
    s = adacorr_compile.stats(regional)
    assert s["generations"] == 2 and s["totals"]["reuses"] > 0


def test_two_models_of_one_class():
    """The second model's blocks run the graph compiled for the first (Dynamo shares it): its
    owner is found at the first call and it keeps its own state."""
    model, inputs = tiny_plain(depth=4)
    first = compile_blocks(copy.deepcopy(model), backend="adacorr", options=EAGER)
    run(first, inputs, generations=1)
    second = compile_blocks(copy.deepcopy(model), backend="adacorr", options=EAGER)
    for a, b in zip(run(first, inputs, generations=1), run(second, inputs, generations=1)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert decisions(second) == [(p, r // 2, c // 2) for p, r, c in decisions(first)]
    assert adacorr_compile.stats(second)["totals"]["reuses"] > 0


def test_min_blocks_counts_the_models_blocks():
    model, inputs = tiny_plain(depth=4)
    few = compile_blocks(copy.deepcopy(model), backend="adacorr", options={**EAGER, "min_blocks": 5})
    ref = run(model, inputs, generations=1)
    for a, b in zip(ref, run(few, inputs, generations=1)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    s = adacorr_compile.stats(few)
    assert s["totals"]["calls"] == 0
    assert any("fewer than min_blocks=5" in r for r in s["fallbacks"])
    enough = compile_blocks(copy.deepcopy(model), backend="adacorr", options={**EAGER, "min_blocks": 4})
    run(enough, inputs, generations=1)
    assert adacorr_compile.stats(enough)["totals"]["reuses"] > 0


class _BreakBetween(PlainDiT):
    """A data-dependent op (``nonzero``, as Mochi's mask handling) between the blocks."""

    def forward(self, hidden_states, timestep, return_dict=True):
        b, c, hh, ww = hidden_states.shape
        x = self.embed(hidden_states).flatten(2).transpose(1, 2)
        cond = self.t_embed(timestep.float()[:, None] / 1000.0)
        for i, block in enumerate(self.blocks):
            x = block(x, cond)
            if i == 1:
                keep = torch.nonzero(x[0, :, 0] > -1e9).flatten()  # all tokens, data-dependent shape
                x = x[:, keep]
        x = self.out(x).reshape(b, hh // self.patch, ww // self.patch, c, self.patch, self.patch)
        return (x.permute(0, 3, 1, 4, 2, 5).reshape(b, c, hh, ww),)


class _BreakInside(_PlainBlock):
    """A block whose own graph breaks (``.item()`` in its forward)."""

    def forward(self, x, c):
        scale = float(x.abs().mean().item()) * 0.0 + 1.0
        return super().forward(x * scale, c)


def _variant(cls=PlainDiT, block_cls=None):
    torch.manual_seed(0)
    model = cls(depth=4).eval()
    if block_cls is not None:
        for b in model.blocks:
            b.__class__ = block_cls
    return model


@pytest.mark.parametrize("outer", ["whole", "regional"])
def test_graph_break_between_blocks_is_guarded(outer):
    """Regionally compiled, the blocks of a model whose forward breaks between blocks are
    guarded (with whole-model compilation each graph holds two blocks: guarded as before)."""
    _, inputs = tiny_plain()
    model = _variant(_BreakBetween)
    never = compile_blocks(copy.deepcopy(model), backend="adacorr", options={"policy": "never", "lowering": "eager"})
    for a, b in zip(run(model, inputs, generations=1), run(never, inputs, generations=1)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    if outer == "whole":
        cached = torch.compile(copy.deepcopy(model), backend="adacorr", options=EAGER)
    else:
        cached = compile_blocks(copy.deepcopy(model), backend="adacorr", options=EAGER)
    run(cached, inputs)
    assert adacorr_compile.stats(cached)["totals"]["reuses"] > 0


def traces(compiled):
    return {r["path"]: r["reuse_trace"] for r in adacorr_compile.stats(compiled)["regions"]}


@pytest.mark.parametrize("outer", ["whole", "regional"])
def test_graph_break_inside_a_block_is_guarded_at_its_call(outer, monkeypatch):
    """A block whose own code breaks (``.item()``) compiles in parts: the block's whole call is
    its region (``runtime/call_guard.py``). The step in which the guards go on computes plainly;
    from the next generation on, every decision and output is that of the same model without
    the break. ``policy="never"`` equals eager; no recompiles in a third generation."""
    _, inputs = tiny_plain()
    model = _variant(block_cls=_BreakInside)
    unbroken = compile_blocks(_variant(), backend="adacorr", options=EAGER)
    never = compile_blocks(copy.deepcopy(model), backend="adacorr", options={"policy": "never", "lowering": "eager"})
    for a, b in zip(run(model, inputs, generations=1), run(never, inputs, generations=1)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    if outer == "whole":
        cached = torch.compile(copy.deepcopy(model), backend="adacorr", options=EAGER)
    else:
        cached = compile_blocks(copy.deepcopy(model), backend="adacorr", options=EAGER)
    expected, got = run(unbroken, inputs), run(cached, inputs)
    for a, b in zip(expected[6:], got[6:]):  # the second generation
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert traces(cached) == traces(unbroken)
    assert sorted(traces(cached)) == [f"blocks.{i}" for i in range(4)]
    s = adacorr_compile.stats(cached)
    assert s["fallbacks"] == [] and s["totals"]["reuses"] > 0
    assert all(guarded_at_call(b) for b in (cached._orig_mod if outer == "whole" else cached).blocks)
    measures = []  # the runtime's host reads: one OEM measurement per step (scope="step"), as unbroken
    original = RegionMath.measure
    monkeypatch.setattr(RegionMath, "measure", lambda self, *a, **k: measures.append(1) or original(self, *a, **k))
    with torch.compiler.set_stance("fail_on_recompile"):
        run(cached, inputs, generations=1)
    per_generation = len(measures)
    run(unbroken, inputs, generations=1)
    assert per_generation == len(measures) - per_generation == 5  # every step after the first


FAMILIES = {  # tiny model -> the block containers it must guard
    "mochi": (tiny_mochi, ("transformer_blocks",)),  # nonzero over the text mask in its attention
    "hidream": (tiny_hidream, ("double_stream_blocks", "single_stream_blocks")),  # MoE routing, wrapped blocks
    "hunyuan_video15": (tiny_hunyuan_video15, ("transformer_blocks",)),
    "qwenimage": (tiny_qwenimage, ("transformer_blocks",)),
    "hunyuan_dit": (tiny_hunyuan_dit, ("blocks",)),  # a skip input shaped as its stream: paired by name
    "ltx_video": (tiny_ltx_video, ("transformer_blocks",)),  # text as long as the video tokens: paired by name
}


def _regionally(model, **kwargs):
    if getattr(model, "_repeated_blocks", None):
        model.compile_repeated_blocks(**kwargs)
        return model
    return compile_blocks(model, **kwargs)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_regional_equals_whole_and_never_equals_eager(name):
    """Models whose blocks break (Mochi, HiDream) or not (HunyuanVideo 1.5, QwenImage, HunyuanDiT, LTX),
    regionally compiled (``compile_repeated_blocks`` where the class names its blocks, else
    block by block) and whole: every block of the named containers guarded, the same
    decisions and outputs both ways, caching off equal to eager."""
    build, containers = FAMILIES[name]
    model, inputs = build()

    def generation(m, steps=5):
        with torch.no_grad():
            return [m(**inputs(k, 900.0 - 150.0 * k), return_dict=False)[0] for k in range(steps)]

    never = _regionally(copy.deepcopy(model), backend="adacorr", options={"policy": "never", "lowering": "eager"})
    for a, b in zip(generation(model), generation(never)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    whole = torch.compile(copy.deepcopy(model), backend="adacorr", options=EAGER)
    regional = _regionally(copy.deepcopy(model), backend="adacorr", options=EAGER)
    a, b = generation(whole) + generation(whole), generation(regional) + generation(regional)
    for x, y in zip(a[5:], b[5:]):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5)
    assert traces(regional) == traces(whole)
    paths = sorted(traces(regional))
    blocks = sorted(f"{c}.{i}" for c in containers for i in range(len(model.get_submodule(c))))
    assert paths == blocks
    assert adacorr_compile.stats(regional)["totals"]["reuses"] > 0


class _Reorder(PlainDiT):
    """Calls its blocks in reverse order while ``reverse`` is set."""

    reverse = False

    def forward(self, hidden_states, timestep, return_dict=True):
        b, c, hh, ww = hidden_states.shape
        x = self.embed(hidden_states).flatten(2).transpose(1, 2)
        cond = self.t_embed(timestep.float()[:, None] / 1000.0)
        for block in (reversed(self.blocks) if self.reverse else self.blocks):
            x = block(x, cond)
        x = self.out(x).reshape(b, hh // self.patch, ww // self.patch, c, self.patch, self.patch)
        return (x.permute(0, 3, 1, 4, 2, 5).reshape(b, c, hh, ww),)


def test_out_of_order_step_computes_everything():
    _, inputs = tiny_plain()
    model = _variant(_Reorder)
    ours = compile_blocks(copy.deepcopy(model), backend="adacorr", options=EAGER)
    run(ours, inputs, steps=6, generations=1)
    before = adacorr_compile.stats(ours)["totals"]
    assert before["reuses"] > 0
    ours.reverse = model.reverse = True
    with torch.no_grad():
        kw = inputs(6, 50.0)
        torch.testing.assert_close(ours(**kw)[0], model(**kw)[0], rtol=1e-5, atol=1e-5)  # no block reused in that step
    after = adacorr_compile.stats(ours)
    assert after["totals"]["calls"] == before["calls"]  # the step ran unguarded
    assert any("out of their learned order" in r for r in after["fallbacks"])


def test_hunyuan_video_regional_reuses_and_never_equals_eager():
    model, inputs = tiny_hunyuan_video()
    never = copy.deepcopy(model)
    never.compile_repeated_blocks(backend="adacorr", options={"policy": "never", "lowering": "eager"})
    cached = copy.deepcopy(model)
    cached.compile_repeated_blocks(backend="adacorr", options=EAGER)
    with torch.no_grad():
        for k in range(6):
            kw = inputs(k, 900.0 - 150.0 * k)
            assert torch.equal(never(**kw, return_dict=False)[0], model(**kw, return_dict=False)[0])
            cached(**kw, return_dict=False)
    assert adacorr_compile.stats(cached)["totals"]["reuses"] > 0


@pytest.mark.parametrize("name", ["flux", "wan", "sd3"])
def test_pipeline_compile_repeated_blocks_caches_like_whole_model(name):
    """``pipe.transformer.compile_repeated_blocks(backend="adacorr")`` on a tiny diffusers
    pipeline (Flux; Wan and SD3: CFG as two calls in ``cache_context``, and as one batch), two
    generations."""
    from pipelines import build_flux, build_sd3, build_wan

    build = {"flux": build_flux, "wan": build_wan, "sd3": build_sd3}[name]
    options = {"lowering": "eager", "reuse_threshold": 0.5}
    whole, regional = build(0), build(0)
    whole.pipe.transformer = torch.compile(whole.pipe.transformer, backend="adacorr", options=options)
    _regionally(regional.pipe.transformer, backend="adacorr", options=options)  # SD3's class names no repeated blocks
    with torch.no_grad():
        for _ in range(2):
            a = whole.pipe(**whole.kwargs(steps=6))[0]
            b = regional.pipe(**regional.kwargs(steps=6))[0]
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    expected = decisions(whole.pipe.transformer)
    assert sum(r for _, r, _ in expected) > 0
    assert decisions(regional.pipe.transformer) == expected
    assert adacorr_compile.stats(regional.pipe.transformer)["steps"] == 6


@pytest.mark.parametrize("block_cls", [None, _BreakInside], ids=["whole_blocks", "break_inside"])
def test_dynamic_shapes_two_resolutions(block_cls):
    """``dynamic=True``: one graph per block class (or per part of it) for both resolutions (no
    recompile in the second), a new generation at the new size, the same decisions as
    whole-model compilation; also for blocks guarded at their calls."""
    model = _variant(block_cls=block_cls)

    def inputs(size):
        def make(step, t, batch=2):
            g = torch.Generator().manual_seed(1)
            return dict(hidden_states=torch.randn(batch, 4, size, size, generator=g) + 0.01 * step,
                        timestep=torch.full((batch,), t))
        return make

    whole = torch.compile(copy.deepcopy(model), backend="adacorr", dynamic=True, options=EAGER)
    regional = compile_blocks(copy.deepcopy(model), backend="adacorr", dynamic=True, options=EAGER)
    for fn in (whole, regional):
        run(fn, inputs(8), generations=1)
    with torch.compiler.set_stance("fail_on_recompile"):
        a = run(regional, inputs(12), generations=1)
    b = run(whole, inputs(12), generations=1)
    for x, y in zip(b, a):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)
    assert decisions(regional) == decisions(whole)
    s = adacorr_compile.stats(regional)
    assert s["generations"] == 1 and s["totals"]["reuses"] > 0


def test_api_before_the_first_call():
    """``stats``/``generation`` on a regionally compiled model before any block compiled in it
    (the hooks go on now); a ``generation(num_steps=...)`` context covers its blocks."""
    model, inputs = tiny_plain(depth=4)
    whole = torch.compile(copy.deepcopy(model), backend="adacorr", options=EAGER)
    regional = compile_blocks(copy.deepcopy(model), backend="adacorr", options=EAGER)
    assert adacorr_compile.stats(regional)["totals"]["calls"] == 0
    seen = []
    for fn in (whole, regional):
        with adacorr_compile.generation(fn, num_steps=10):  # stats() inside: the context's own state
            run(fn, inputs, steps=10, generations=1)
            seen.append(decisions(fn))
    assert seen[1] == seen[0]
    assert sum(r for _, r, _ in seen[1]) > 0
    with pytest.raises(TypeError, match="not a model compiled"):
        adacorr_compile.stats(compile_blocks(copy.deepcopy(model)))  # Inductor blocks: no adacorr state


def test_reference_dit_regional_equals_whole_with_the_forecast_gate():
    """With the default forecast (``forecast="linear"`` and its slope gate), the blocks after the
    leader are one span in the whole-model graph, gated on their summed residuals; regionally,
    each block keeps its own cache and their gates wait to be judged on the same sums
    (``step.settle_joint_gates``): the same decisions and images as whole-model compilation on
    the reference DiT, where judging each block alone changes them."""
    from adacorr_compile.lab import methods
    from adacorr_compile.lab.reference import load_reference
    from adacorr_compile.lab.sampling import reference_sampler

    model, sampler = load_reference("dit"), reference_sampler("dit")
    whole = torch.compile(copy.deepcopy(model), backend="adacorr", options={"lowering": "eager"})
    regional = copy.deepcopy(model)
    transformer = methods.transformer_of(regional)
    for block in methods.block_modules(transformer):
        block.compile(backend="adacorr", options={"lowering": "eager"})
    with torch.no_grad():
        a, b = sampler(whole, [0, 1], num_steps=20), sampler(regional, [0, 1], num_steps=20)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    expected = {r["path"].rpartition("transformer_blocks.")[2]: r["reuse_trace"] for r in adacorr_compile.stats(whole)["regions"]}
    got = {r["path"].rpartition("transformer_blocks.")[2]: r["reuse_trace"] for r in adacorr_compile.stats(transformer)["regions"]}
    assert got == expected and sum(map(sum, got.values())) > 0
