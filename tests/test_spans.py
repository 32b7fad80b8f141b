"""Span caches (issue 13): chained regions under scope="step" share one cache.

Differential: the same model with spans and with one cache per region (``spans_apply``
patched off) gives the same reuse verdicts and the same outputs to float32 round-off; the
cache holds a few block inputs whatever the depth; spans split where something else reads
a block's output (a skip connection)."""

import importlib

import pytest
import torch

import adacorr_compile
from adacorr_compile.lab import tiny
from adacorr_compile.lab.tiny import ALL_FAMILIES

chain = importlib.import_module("adacorr_compile.passes.chain_regions")

FAMILIES = {
    "dit": lambda depth: tiny.tiny_dit(num_layers=depth),
    "sd3": lambda depth: tiny.tiny_sd3(num_layers=depth),
    "flux": lambda depth: tiny.tiny_flux(num_layers=depth // 2, num_single_layers=depth - depth // 2),
    "wan": lambda depth: tiny.tiny_wan(num_layers=depth),
}


def _sample(model, inputs, options, steps=12):
    """(compiled model, outputs per step, bytes of the largest block input)."""
    torch._dynamo.reset()
    fast = torch.compile(model, backend="adacorr", options={"lowering": "eager", **options})
    outs, block_input = [], [0]
    with torch.no_grad():
        for k in range(steps):
            out = fast(**inputs(k, 1000.0 - k * 1000.0 / steps))
            out = out[0] if isinstance(out, tuple) else out.sample
            outs.append(out.clone())
            if k == 0:
                for region in adacorr_compile.regions(fast):
                    pairs = region.spec.stream_pairs
                    region.register_forward_pre_hook(lambda m, a, pairs=pairs: block_input.__setitem__(
                        0, max(block_input[0], sum(a[i].numel() * a[i].element_size() for i, _ in pairs))))
    return fast, outs, block_input[0]


SLOW = pytest.mark.slow  # the same mechanism on another family: benchmarks/validate_trust.py runs them


@pytest.mark.parametrize("family, forecast", [
    ("dit", "linear"), pytest.param("dit", "none", marks=SLOW), ("flux", "linear"), pytest.param("flux", "none", marks=SLOW),
    pytest.param("sd3", "linear", marks=SLOW), pytest.param("sd3", "none", marks=SLOW),
    pytest.param("wan", "linear", marks=SLOW), pytest.param("wan", "none", marks=SLOW)])
def test_span_equals_one_cache_per_block(family, forecast, monkeypatch):
    torch.manual_seed(0)
    model, inputs = FAMILIES[family](6)
    options = {"reuse_threshold": 0.5, "forecast": forecast}
    fast, spans, _ = _sample(model, inputs, options)
    regions = adacorr_compile.regions(fast)
    # the leader alone, every later block in one span (Flux: double and single blocks
    # chain; the last block of SD3 and Flux reads the text stream as a side input)
    assert [r.span.size for r in regions] == [1] + [len(regions) - 1] * (len(regions) - 1)
    assert [r.span.position for r in regions[1:]] == list(range(len(regions) - 1))
    s_span = adacorr_compile.stats(fast)
    with monkeypatch.context() as m:
        m.setattr(chain, "spans_apply", lambda config: False)
        fast_pb, per_block, _ = _sample(model, inputs, options)
    assert all(r.span.size == 1 for r in adacorr_compile.regions(fast_pb))
    s_pb = adacorr_compile.stats(fast_pb)
    assert [r["reuse_trace"] for r in s_span["regions"]] == [r["reuse_trace"] for r in s_pb["regions"]]
    assert 0 < s_span["totals"]["reuses"] == s_pb["totals"]["reuses"]
    for k, (a, b) in enumerate(zip(spans, per_block)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"step {k}")
    assert s_span["cache_bytes"] < s_pb["cache_bytes"] / 2


@pytest.mark.parametrize("family", ["dit", "flux", pytest.param("sd3", marks=SLOW), pytest.param("wan", marks=SLOW)])
def test_cache_memory_does_not_grow_with_depth(family):
    """Default options: at most 4 block inputs of cache per model at depth 4 and 10 (the
    probe's reference residual, the span's residual and its previous value for the forecast;
    benchmarks/cache_memory.py measures 4 and 16)."""
    held = {}
    for depth in (4, 10):
        torch.manual_seed(0)
        model, inputs = FAMILIES[family](depth)
        # the bytes kept do not depend on the lowering: eager keeps CI quick
        fast, _, block_input = _sample(model, inputs, {"lowering": "eager"}, steps=6)
        held[depth] = adacorr_compile.stats(fast)["cache_bytes"] / block_input
    assert held[4] <= 4.0 and held[10] <= 4.0, held
    assert abs(held[10] - held[4]) < 0.1, held


def test_reuse_step_runs_no_block_and_adds_once():
    """On a reuse step no block of the span runs; the span's output is its input plus the
    stored span residual (the last block's output at the last compute minus the span's input)."""
    torch.manual_seed(0)
    model, inputs = tiny.tiny_plain(depth=5)
    fast = torch.compile(model, backend="adacorr", options={
        "lowering": "eager", "reuse_threshold": 1.0, "forecast": "none", "final_steps": 0, "max_consecutive_reuses": 9})
    seen = {}
    with torch.no_grad():
        fast(**inputs(0, 900.0))
        regions = adacorr_compile.regions(fast)
        head, tail = regions[1], regions[-1]
        assert head.span.size == tail.span.size == 4
        (i, _), (_, j) = head.spec.stream_pairs[0], tail.spec.stream_pairs[0]
        head.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[i].clone()))
        tail.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out[j].clone()))
        fast(**inputs(1, 800.0))  # warm-up: computes, the span stores out - in
        residual = seen["out"] - seen["in"]
        executed = [r.executions for r in regions]
        fast(**inputs(2, 700.0))  # threshold 1: reuses
    assert [r.executions - e for r, e in zip(regions, executed)] == [1, 0, 0, 0, 0]  # only the leader ran
    torch.testing.assert_close(seen["out"], seen["in"] + residual, rtol=0, atol=1e-6)
    assert [r["reuses"] for r in adacorr_compile.stats(fast)["regions"]] == [0, 1, 1, 1, 1]


class _SkipBlock(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.lin = torch.nn.Linear(dim, dim)
        self.t = torch.nn.Linear(dim, dim)

    def forward(self, x, c):
        return x + torch.tanh(self.lin(x) + self.t(c).unsqueeze(1))


class _UViT(torch.nn.Module):
    """Long skip connections (U-ViT, HunyuanDiT): block 1's output is also added to block 4's
    input, and a side computation reads block 2's output: spans must split there."""

    def __init__(self, dim=16, depth=6):
        super().__init__()
        self.inp = torch.nn.Linear(4, dim)
        self.temb = torch.nn.Linear(1, dim)
        self.blocks = torch.nn.ModuleList([_SkipBlock(dim) for _ in range(depth)])
        self.out = torch.nn.Linear(dim, 4)

    def forward(self, hidden_states, timestep, return_dict=True):
        x = self.inp(hidden_states)
        c = self.temb(timestep.float()[:, None] / 1000.0)
        skip = aux = None
        for k, block in enumerate(self.blocks):
            if k == 4:
                x = x + skip
            x = block(x, c)
            if k == 1:
                skip = x
            if k == 2:
                aux = x.mean()
        return (self.out(x) + aux,)


def test_spans_split_where_something_else_reads_a_block_output(monkeypatch):
    torch.manual_seed(0)
    model = _UViT().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 4, generator=g)

    def inputs(k, t):
        return dict(hidden_states=x + 0.01 * k, timestep=torch.full((2,), t))

    options = {"reuse_threshold": 1.0, "max_consecutive_reuses": 2}
    fast, outs, _ = _sample(model, inputs, options)
    spans = [(r.spec.path, r.span.size, r.span.position) for r in adacorr_compile.regions(fast)]
    # leader; block 1 alone (its output is the skip); block 2 alone (the side reduction reads
    # it); block 3 alone (block 4's input is x + skip, not block 3's output); blocks 4-5 chained
    assert spans == [("blocks.0", 1, 0), ("blocks.1", 1, 0), ("blocks.2", 1, 0), ("blocks.3", 1, 0),
                     ("blocks.4", 2, 0), ("blocks.5", 2, 1)]
    with monkeypatch.context() as m:
        m.setattr(chain, "spans_apply", lambda config: False)
        fast_pb, per_block, _ = _sample(model, inputs, options)
    assert adacorr_compile.stats(fast)["totals"]["reuses"] == adacorr_compile.stats(fast_pb)["totals"]["reuses"] > 0
    for a, b in zip(outs, per_block):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", [{"decision": "sample"}, {"blend": True}, {"scope": "block"}, {"correction": False}])
def test_no_spans_where_blocks_need_their_own_cache(options):
    """A per-sample mask, a blend, per-block decisions and cached outputs (no residual) need
    each block's own cache: every region is a span of one."""
    model, inputs = tiny.tiny_dit(num_layers=4)
    fast = torch.compile(model, backend="adacorr", options={"lowering": "eager", **options})
    with torch.no_grad():
        fast(**inputs(0, 900.0))
    assert [r.span.size for r in adacorr_compile.regions(fast)] == [1, 1, 1, 1]


@pytest.mark.parametrize("family", ["hunyuan_dit", pytest.param("hunyuan_video", marks=SLOW),
                                    pytest.param("ltx_video", marks=SLOW), pytest.param("cogvideox", marks=SLOW)])
def test_other_families_never_equals_and_caching_runs(family):
    """Spans on the other families: with caching off the output is the uncached one; with a
    loose threshold the spans reuse and stay finite."""
    torch.manual_seed(0)
    model, inputs = ALL_FAMILIES[family][0]()
    plain = []
    with torch.no_grad():
        for k in range(6):
            out = model(**inputs(k, 1000.0 - k * 1000.0 / 6))
            plain.append((out[0] if isinstance(out, tuple) else out.sample).clone())
    _, never, _ = _sample(model, inputs, {"policy": "never"}, steps=6)
    for a, b in zip(never, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    fast, outs, _ = _sample(model, inputs, {"reuse_threshold": 1.0}, steps=6)
    assert adacorr_compile.stats(fast)["totals"]["reuses"] > 0
    assert all(torch.isfinite(o).all() for o in outs)


lower = importlib.import_module("adacorr_compile.passes.lower")


def _span_calls(fast):
    from adacorr_compile.api import _model_state
    from adacorr_compile.runtime.region import SpanCall

    runners = [g.runner for g in _model_state(fast).graphs]
    return [m for r in runners for m in r.children() if isinstance(m, SpanCall)]


@pytest.mark.parametrize("family, options", [
    ("dit", {}), ("flux", {}), ("flux", {"reuse_threshold": 1.0, "max_consecutive_reuses": 100, "final_steps": 0}),
    pytest.param("sd3", {}, marks=SLOW), pytest.param("wan", {}, marks=SLOW)])
def test_span_runs_as_one_call_and_decides_as_per_block_calls(family, options, monkeypatch):
    """A span's regions run as one SpanCall (the regions between its first and last cost no
    module call of their own on a reuse step), with the same outputs, bit for bit, and the
    same per-region statistics as one call per region (``fuse_spans`` patched off)."""
    torch.manual_seed(0)
    model, inputs = FAMILIES[family](6)
    options = {"reuse_threshold": 0.5, **options}
    fast, fused, _ = _sample(model, inputs, options, steps=16)
    calls = _span_calls(fast)
    regions = adacorr_compile.regions(fast)
    assert len(calls) == 1 and list(calls[0].regions) == regions[1:]
    assert calls[0].skip_plan is not None
    s_fused = adacorr_compile.stats(fast)
    with monkeypatch.context() as m:
        m.setattr(lower, "fuse_spans", lambda split: 0)
        fast_pr, per_region, _ = _sample(model, inputs, options, steps=16)
    assert _span_calls(fast_pr) == []
    s_pr = adacorr_compile.stats(fast_pr)
    assert s_fused["totals"]["reuses"] > 0 and s_fused["totals"] == s_pr["totals"]
    for a, b in zip(s_fused["regions"], s_pr["regions"]):
        for key in ("path", "calls", "reuses", "computes", "reuse_trace"):
            assert a[key] == b[key], (a["path"], key)
        torch.testing.assert_close(torch.tensor(a["lambda_trace"]), torch.tensor(b["lambda_trace"]), rtol=0, atol=0,
                                   equal_nan=True)
    for k, (a, b) in enumerate(zip(fused, per_region)):
        assert torch.equal(a, b), f"step {k}"
