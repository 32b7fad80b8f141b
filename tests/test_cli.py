"""The registered backend in a fresh interpreter, and the `adacorr inspect` command."""

import subprocess
import sys

from adacorr_compile.cli import main


def test_backend_registered_without_import():
    code = (
        "import torch, sys\n"
        "class B(torch.nn.Module):\n"
        "    def __init__(s): super().__init__(); s.l = torch.nn.Linear(8, 8)\n"
        "    def forward(s, h): return h + torch.tanh(s.l(h))\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(s): super().__init__(); s.blocks = torch.nn.ModuleList([B() for _ in range(3)])\n"
        "    def forward(s, h):\n"
        "        for b in s.blocks: h = b(h)\n"
        "        return h\n"
        "m = M().eval(); x = torch.randn(2, 5, 8)\n"
        "f = torch.compile(m, backend='adacorr', options={'lowering': 'eager'})\n"
        "with torch.no_grad(): y = f(x)\n"
        "assert 'adacorr_compile' in sys.modules  # loaded through the entry point\n"
        "import adacorr_compile\n"
        "print(len(adacorr_compile.regions(f)), float((y - m(x)).abs().max()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    regions, err = out.stdout.split()
    assert regions == "3" and float(err) < 1e-6


def test_inspect_prints_regions_and_reasons(capsys):
    assert main(["inspect", "--model", "flux"]) == 0
    text = capsys.readouterr().out
    assert "5 guarded regions" in text
    assert "transformer_blocks.0" in text and "single_transformer_blocks.2" in text
    assert "streams: hidden_states[2, 16, 16], encoder_hidden_states[2, 6, 16]" in text


def test_inspect_shows_unguarded_reason(capsys):
    assert main(["inspect", "--model", "hunyuan_video"]) == 0
    text = capsys.readouterr().out
    assert "unguarded context_embedder.token_refiner.refiner_blocks.0: family" in text
