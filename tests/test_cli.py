"""The registered backend in a fresh interpreter, and the `adacorr inspect` command."""

import subprocess
import sys

import pytest

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


def test_demo_writes_table_grids_and_json(tmp_path, capsys):
    import json

    import pytest

    out = tmp_path / "demo"
    assert main(["demo", "--steps", "8", "--images", "3", "--reps", "2", "--lowering", "eager", "--threads", "1",
                 "--option", "policy=adacorr", "--option", "reuse_threshold=1.0", "--option", "warmup_steps=1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "uncached eager" in text and "adacorr" in text and "blocks skipped" in text
    assert "speedup (min-max)" in text and "median of 2 per-pair ratios" in text and "1 threads" in text
    for name in ("uncached.png", "adacorr.png", "difference.png", "lambda_heatmap.png"):
        assert (out / name).stat().st_size > 0, name
    result = json.loads((out / "demo.json").read_text())
    assert result["options"]["reuse_threshold"] == 1.0 and result["steps"] == 8
    assert result["labels"] == [0, 1, 2] and result["guidance"] == 1.5  # the DiT sampler's default
    # lambda <= 1 always: every block reuses whenever the guards allow it. Of 8 steps,
    # step 0 (warm-up) and step 7 (final) compute; of steps 1-6, the 4th in a row computes
    # (max_consecutive_reuses=3): 5 of 8 steps reuse, in every block but the first, which
    # computes every step (the default scope="step": its residual is the step's signal)
    assert result["blocks_skipped"] == pytest.approx(5 / 8 * 7 / 8)
    assert result["speedup"] > 0 and 0.0 <= result["quality"]["ssim_mean"] <= 1.0
    # timed interleaved: 2 pairs (uncached, cached), the speedup is the median of their ratios
    pairs = result["speedup_pairs"]
    assert len(pairs) == 2 and len(result["uncached_seconds_all"]) == len(result["adacorr_seconds_all"]) == 2
    assert pairs == pytest.approx([u / c for u, c in zip(result["uncached_seconds_all"], result["adacorr_seconds_all"])])
    assert result["speedup"] == pytest.approx(sum(pairs) / 2)
    assert result["speedup_min"] == min(pairs) and result["speedup_max"] == max(pairs)
    assert result["threads"] == 1
    # caching changed the images (finite PSNR against the uncached ones of the same seed)
    assert 0 < result["quality"]["psnr_mean"] < float("inf")


def test_demo_writes_outside_the_checkout_by_default(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--steps", "3", "--images", "1", "--reps", "1", "--lowering", "eager", "--threads", "1"]) == 0
    out = tmp_path / "cache" / "adacorr" / "demo"
    assert f"wrote {out}/uncached.png" in capsys.readouterr().out
    assert (out / "demo.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # nothing in the working directory


def test_demo_rejects_bad_option_by_name(capsys):
    import pytest

    with pytest.raises(SystemExit) as exc:
        main(["demo", "--option", "reuse_threshold=7", "--steps", "2"])
    assert exc.value.code == 2
    assert "reuse_threshold" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--guidance", "-2", "--steps", "2"])
    assert exc.value.code == 2
    assert "--guidance" in capsys.readouterr().err


def test_inspect_shows_step_roles_and_rejects_bad_option(capsys):
    assert main(["inspect", "--model", "flux", "--option", "scope=step"]) == 0
    text = capsys.readouterr().out
    assert "[step leader]" in text and "[step probe]" in text and text.count("[step follower]") == 3
    # the probe and the followers chain (double blocks into single blocks): one cache for them
    assert "one cache for the span transformer_blocks.1 .. single_transformer_blocks.2 (4 chained regions)" in text
    assert main(["inspect", "--model", "flux", "--option", "scope=block"]) == 0
    assert "one cache for the span" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["inspect", "--model", "flux", "--option", "scope=layer"])
    assert "'scope' got 'layer'" in capsys.readouterr().err


FACTORIES = '''
import torch

NOT_CALLABLE = 3


def boom():
    raise RuntimeError("kaput")


def not_a_pair():
    return torch.nn.Linear(2, 2)


def no_inputs():
    return torch.nn.Linear(2, 2), 5
'''


@pytest.mark.parametrize(
    "spec,problem",
    [
        ("dti", "expected one of dit, "),
        ("adacorr_no_such_module:make", "cannot import module 'adacorr_no_such_module'"),
        ("adacorr_compile.lab.tiny:tiny_nope", "module 'adacorr_compile.lab.tiny' has no attribute 'tiny_nope'"),
        ("adacorr_factories:NOT_CALLABLE", "'NOT_CALLABLE' is a int, not a callable factory"),
        ("adacorr_factories:boom", "the factory raised RuntimeError: kaput"),
        ("adacorr_factories:not_a_pair", "the factory returned Linear; expected (model, inputs)"),
        ("adacorr_factories:no_inputs", "the factory returned (Linear, int); expected (model, inputs)"),
    ],
)
@pytest.mark.parametrize("command", [["inspect"], ["export", "onnx", "--out", "unused.onnx"]])
def test_bad_model_factory_is_one_line_exit_2(spec, problem, command, tmp_path, monkeypatch, capsys):
    (tmp_path / "adacorr_factories.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SystemExit) as exc:
        main([*command, "--model", spec])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("adacorr: error: --model ") and problem in last, err
