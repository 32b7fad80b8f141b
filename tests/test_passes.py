"""Structure: which regions the passes find, and what they leave out (with reasons)."""

import logging

import pytest
import torch

import adacorr_compile
from adacorr_compile.lab.tiny import FAMILIES


def compile_and_step(model, inputs, **options):
    compiled = torch.compile(model, backend="adacorr", options={"lowering": "eager", **options})
    with torch.no_grad():
        compiled(**inputs(0, 500.0))
    return compiled


@pytest.mark.parametrize("family", list(FAMILIES))
def test_regions_found(family):
    make, paths = FAMILIES[family]
    model, inputs = make()
    compiled = compile_and_step(model, inputs)
    assert [r.spec.path for r in adacorr_compile.regions(compiled)] == paths
    rep = adacorr_compile.report(compiled)
    assert rep["fallbacks"] == [] and len(rep["graphs"]) == 1
    for region in rep["graphs"][0]["regions"]:
        assert region["streams"], region
        for s in region["streams"]:
            assert len(s["shape"]) == 3  # [B, tokens, channels]


def test_dual_stream_blocks_pair_both_streams():
    model, inputs = FAMILIES["flux"][0]()
    compiled = compile_and_step(model, inputs)
    regions = adacorr_compile.regions(compiled)
    double = regions[0]
    assert len(double.spec.stream_pairs) == 2
    rep = adacorr_compile.report(compiled)["graphs"][0]["regions"][0]
    shapes = sorted(tuple(s["shape"]) for s in rep["streams"])
    assert shapes == [(2, 6, 16), (2, 16, 16)]  # text stream and image stream
    assert {"conditioning"} <= {s["name"] for s in rep["side_inputs"]}


def test_identical_blocks_share_one_body(adacorr_log):
    model, inputs = FAMILIES["dit"][0]()
    compiled = compile_and_step(model, inputs)
    keys = {r.spec.key for r in adacorr_compile.regions(compiled)}
    assert len(keys) == 1
    assert adacorr_compile.stats(compiled)["totals"]["bodies_compiled"] == 1
    assert "1 distinct block bodies compiled" in adacorr_log.text


class NoBlocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_model_without_blocks_falls_back_with_reason(adacorr_log):
    model = NoBlocks().eval()
    x = torch.randn(2, 8)
    compiled = torch.compile(model, backend="adacorr")
    with torch.no_grad():
        out = compiled(x)
        assert torch.allclose(out, model(x), atol=1e-6)
    assert "compiling without cache guards" in adacorr_log.text
    assert "no repeated sibling modules" in adacorr_compile.stats(compiled)["fallbacks"][0]


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, h):
        return h + torch.tanh(self.lin(h))


class SharedBlock(torch.nn.Module):
    """blocks.0 runs twice with other code in between: not one convex region."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block() for _ in range(3)])

    def forward(self, h):
        h = self.blocks[0](h)
        h = h * 2
        h = self.blocks[0](h)
        h = self.blocks[1](h)
        return self.blocks[2](h)


def test_non_isolable_block_left_unguarded_with_reason(adacorr_log):
    model = SharedBlock().eval()
    x = torch.randn(2, 5, 8)
    compiled = torch.compile(model, backend="adacorr", options={"lowering": "eager"})
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-6)
    paths = [r.spec.path for r in adacorr_compile.regions(compiled)]
    assert paths == ["blocks.1", "blocks.2"]
    assert "blocks.0: its nodes interleave" in adacorr_log.text


def test_gradients_enabled_falls_back(adacorr_log):
    model, inputs = FAMILIES["dit"][0]()
    compiled = torch.compile(model, backend="adacorr", options={"lowering": "eager"})
    compiled(**inputs(0, 500.0))
    assert "gradients are enabled" in adacorr_compile.stats(compiled)["fallbacks"][0]


def test_dump_graphs_logs_each_pass(adacorr_log):
    model, inputs = FAMILIES["dit"][0](num_layers=2)
    compile_and_step(model, inputs, dump_graphs=True)
    for name in ("find_blocks", "outline_blocks", "guard_blocks", "lower"):
        assert f"adacorr graph before {name}" in adacorr_log.text
        assert f"adacorr graph after {name}" in adacorr_log.text
