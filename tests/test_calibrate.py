"""adacorr_compile.calibrate, load_options and the `adacorr calibrate` command, on a tiny model.

The workload is a plain-torch DiT (``tiny_plain``, 4 blocks, eager lowering for speed) in a
10-step sampling loop whose noise comes from the seed and whose outputs feed back into the
next step's input, so a reused block changes the result as in a real sampler.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

import adacorr_compile
from adacorr_compile.calibrate import (RUNTIME_FIELDS, _swap_config, choose, choose_at_speed, fitted_speeds,
                                       swapped_config)
from adacorr_compile.cli import main
from adacorr_compile.lab.tiny import PlainDiT, tiny_plain

STEPS = 10
THRESHOLDS = [0.0, 0.1, 1.0]
EAGER = {"lowering": "eager"}


def sample(compiled, seed: int, steps: int = STEPS, batch: int = 2) -> torch.Tensor:
    """A tiny deterministic sampler: noise from ``seed``, a falling timestep, x -= 0.1 * eps."""
    x = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for k in range(steps):
            eps = compiled(hidden_states=x, timestep=torch.full((batch,), 1000.0 * (1 - k / steps)))[0]
            x = x - 0.1 * eps
    return x


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: timings on a shared 2-core machine are not worth oversubscribing it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, _one_thread):
    torch._dynamo.reset()
    model, _ = tiny_plain(4)
    out = tmp_path_factory.mktemp("calib") / "calib.json"
    result = adacorr_compile.calibrate(sample, model, target_psnr=30.0, seeds=[0, 1], thresholds=THRESHOLDS,
                                       options=EAGER, out=out, progress=False, command="pytest")
    return model, result, out


def test_sweep_measures_each_threshold_without_recompiles(calibrated):
    _, result, _ = calibrated
    assert result.compiles_in_sweep == 0  # and it ran under fail_on_recompile (next test)
    assert [row["reuse_threshold"] for row in result.table] == THRESHOLDS
    skipped = [row["skipped"] for row in result.table]
    assert skipped[0] == 0.0  # lambda <= 0 never holds on a drifting input
    assert skipped[0] < skipped[1] < skipped[2], skipped
    # thr=1: every step reuses where the guards allow: 2 warm-up steps and the last compute, the
    # reuse cap (3) forces a compute after 3 reuses (steps 2-4 reuse, 5 computes, 6-8 reuse), and
    # under scope="step" the first block computes at every step: 6 of 10 steps x 3 of 4 blocks
    assert skipped[2] == pytest.approx(6 / 10 * 3 / 4)
    for row in result.table:
        assert len(row["per_seed"]) == 2 and len(row["speedup_pairs"]) == 2
        assert row["speedup_min"] <= row["speedup"] <= row["speedup_max"]
        assert row["psnr_worst_seed"] <= row["psnr_mean"] and row["psnr_worst_image"] <= row["psnr_worst_seed"]
    # more skipping, more error: PSNR falls as the threshold rises
    psnr = [row["psnr_mean"] for row in result.table]
    assert psnr[0] > psnr[1] > psnr[2]
    # the two seeds draw different noise: their PSNRs differ
    seeds = result.table[2]["per_seed"]
    assert seeds[0]["psnr"] != seeds[1]["psnr"]


def test_choice_skips_most_among_settings_that_meet_the_target(calibrated):
    _, result, _ = calibrated
    meeting = [row for row in result.table if row["psnr_mean"] >= 30.0]
    assert result.met and result.chosen is not None and result.chosen["meets"]
    assert result.chosen is max(meeting, key=lambda r: r["skipped"])
    assert result.options == {**EAGER, "reuse_threshold": result.chosen["reuse_threshold"]}
    # a target between two rows' PSNR picks the last row that still meets it
    table = [dict(row) for row in result.table]
    for k in range(len(table) - 1):
        target = (table[k]["psnr_mean"] + table[k + 1]["psnr_mean"]) / 2
        assert choose(table, target, "mean")["reuse_threshold"] == THRESHOLDS[k]
    # "worst": the worst seed must meet it
    target = (table[2]["psnr_worst_seed"] + table[2]["psnr_mean"]) / 2
    assert choose(table, target, "mean")["reuse_threshold"] == 1.0
    assert choose(table, target, "worst")["reuse_threshold"] != 1.0
    assert choose(table, 1e9, "mean") is None
    with pytest.raises(ValueError, match="rule"):
        choose(table, 30.0, "median")


def _row(setting, speedup, psnr_mean, psnr_worst_seed, skipped=0.5):
    return {"setting": setting, "speedup": speedup, "speed_fitted": speedup, "psnr_mean": psnr_mean,
            "psnr_worst_seed": psnr_worst_seed, "skipped": skipped}


def test_choice_at_a_target_speed_is_the_best_psnr_among_the_fast_enough():
    table = [_row("slow", 1.4, 45.0, 44.0), _row("mid", 2.1, 38.0, 30.0), _row("mid2", 2.3, 36.0, 35.0),
             _row("fast", 3.2, 28.0, 27.0)]
    # the slow row has the best PSNR but is not fast enough: among >= 2x, mid wins in the mean, mid2 in the worst seed
    assert choose_at_speed(table, 2.0)["setting"] == "mid"
    assert [r["meets"] for r in table] == [False, True, True, True]
    assert choose_at_speed(table, 2.0, "worst")["setting"] == "mid2"
    assert choose_at_speed(table, 2.2)["setting"] == "mid2"
    assert choose_at_speed(table, 3.2)["setting"] == "fast"  # at least: equal counts
    assert choose_at_speed(table, 3.3) is None and not any(r["meets"] for r in table)
    # ties in PSNR: the faster
    assert choose_at_speed([_row("a", 2.0, 30.0, 30.0), _row("b", 2.5, 30.0, 30.0)], 1.5)["setting"] == "b"
    for bad in (1.0, 0.5, float("nan"), float("inf"), "2", True):
        with pytest.raises(ValueError, match="target_speed got"):
            choose_at_speed(table, bad)
    # "median" reads each row's own median, "fitted" the cost model's speed
    table[1]["speed_fitted"] = 1.9
    assert choose_at_speed(table, 2.0)["setting"] == "mid2"
    assert choose_at_speed(table, 2.0, speed_measure="median")["setting"] == "mid"
    with pytest.raises(ValueError, match="speed_measure got 'mean'"):
        choose_at_speed(table, 2.0, speed_measure="mean")


def test_fitted_speeds_pool_every_pair_and_shrug_off_a_slowed_one():
    # time ratio cached / uncached = 0.1 + 0.9 * computed share, exactly, except one pair slowed by load
    def pairs(skipped):
        return [1.0 / (0.1 + 0.9 * (1.0 - skipped))] * 3

    table = [{"skipped": k, "speedup_pairs": pairs(k), "speedup": pairs(k)[0]} for k in (0.0, 0.3, 0.5, 0.6, 0.7)]
    table[3]["speedup_pairs"][0] = 1.2  # one pair of 0.6 skipped measured at 1.2x instead of 2.17x
    expected = [1.0 / (0.1 + 0.9 * (1.0 - row["skipped"])) for row in table]
    assert fitted_speeds(table) == pytest.approx(expected, rel=1e-9)
    # one computed share only: no fit, each row's own median
    flat = [{"skipped": 0.5, "speedup_pairs": [1.5, 2.5], "speedup": 2.0}, {"skipped": 0.5, "speedup": 1.8}]
    assert fitted_speeds(flat) == [2.0, 1.8]


def test_calibrate_by_speed_records_the_target_and_falls_back_to_caching_off(tmp_path, caplog):
    model, _ = tiny_plain(4)
    result = adacorr_compile.calibrate(sample, model, target_speed=1000.0, seeds=[0], thresholds=[0.5], options=EAGER,
                                       out=tmp_path / "c.json", plot=False, progress=False)
    assert not result.met and result.options == {"lowering": "eager", "policy": "never"}
    assert "no setting reached a speed >= 1000x (fitted;" in caplog.text
    doc = json.loads((tmp_path / "c.json").read_text())
    assert doc["target_speed"] == 1000.0 and doc["target_psnr"] is None
    assert "meets speed >= 1000x (fitted)" in result.format_table()
    assert doc["speed_measure"] == "fitted" and doc["table"][0]["speed_fitted"] == doc["table"][0]["speedup"]

    def never(compiled, seed):  # pragma: no cover - must not be called
        raise AssertionError("ran")

    with pytest.raises(ValueError, match="target_speed got 1"):
        adacorr_compile.calibrate(never, model, target_speed=1)


def test_json_and_plot_written_and_options_load_into_torch_compile(calibrated):
    model, result, out = calibrated
    doc = json.loads(out.read_text())
    assert doc["format"] == "adacorr-calibration/1" and doc["command"] == "pytest"
    assert doc["target_psnr"] == 30.0 and doc["rule"] == "mean" and doc["met"] is True
    assert doc["options"] == result.options and doc["chosen"] == result.chosen["setting"]
    assert len(doc["table"]) == 3 and doc["environment"]["torch"] == torch.__version__
    assert out.with_suffix(".png").stat().st_size > 10_000
    options = adacorr_compile.load_options(out)
    assert options == result.options
    fast = torch.compile(model, backend="adacorr", options=options)
    y = sample(fast, seed=5)
    assert adacorr_compile.stats(fast)["totals"]["reuses"] > 0
    assert torch.isfinite(y).all()


def test_swapped_config_decides_as_a_fresh_compile_and_refuses_structural_options():
    model, _ = tiny_plain(4)
    fresh = torch.compile(model, backend="adacorr", options={**EAGER, "reuse_threshold": 1.0})
    expected = sample(fresh, 0)
    torch._dynamo.reset()
    swapped = torch.compile(model, backend="adacorr", options={**EAGER, "reuse_threshold": 0.0})
    sample(swapped, 0)
    assert adacorr_compile.stats(swapped)["totals"]["reuses"] == 0
    with torch.compiler.set_stance("fail_on_recompile"), swapped_config(swapped, {"reuse_threshold": 1.0}):
        adacorr_compile.reset(swapped)
        assert torch.equal(sample(swapped, 0), expected)
        assert all(r.config.reuse_threshold == 1.0 for r in adacorr_compile.regions(swapped))
    # restored after the block
    assert all(r.config.reuse_threshold == 0.0 for r in adacorr_compile.regions(swapped))
    adacorr_compile.reset(swapped)
    sample(swapped, 0)
    assert adacorr_compile.stats(swapped)["totals"]["reuses"] == 0
    for name in ("scope", "policy", "correction", "blend", "decision", "gamma", "lowering"):
        assert name not in RUNTIME_FIELDS
        with pytest.raises(ValueError, match=f"'{name}' shape the compiled graph"):
            _swap_config(swapped, {name: None})


def test_swapped_forecast_gate_decides_as_a_fresh_compile():
    """forecast_max_change is read at run time (a calibrate variant needs no recompile)."""
    model, _ = tiny_plain(4)
    options = {**EAGER, "reuse_threshold": 1.0, "warmup_steps": 1}
    fresh = torch.compile(model, backend="adacorr", options={**options, "forecast_max_change": float("inf")})
    expected = sample(fresh, 0)
    torch._dynamo.reset()
    swapped = torch.compile(model, backend="adacorr", options={**options, "forecast_max_change": 0.0})
    gated = sample(swapped, 0)
    assert not torch.equal(gated, expected)  # the gate changed what the reuses returned
    with torch.compiler.set_stance("fail_on_recompile"), swapped_config(swapped, {"forecast_max_change": float("inf")}):
        adacorr_compile.reset(swapped)
        assert torch.equal(sample(swapped, 0), expected)


def test_swapped_probe_forecast_decides_as_a_fresh_compile():
    """probe_forecast and the gate of its forecast are read at run time, by the compiled OEM
    kernel too (Inductor lowering: the gate is a value of the kernel, not a constant): a
    variant needs no recompile. On the tiny model the forecast-aware probe reuses at a
    threshold where the stored reference never does; with forecast_max_change=0 no forecast
    applies and the probe decides as without it."""
    model, _ = tiny_plain(4)
    options = {"reuse_threshold": 0.05, "late_phase": None}  # one threshold: the stored reference never reuses
    fresh = torch.compile(model, backend="adacorr", options={**options, "probe_forecast": True})
    expected = sample(fresh, 0)
    forecast_trace = adacorr_compile.stats(fresh)["regions"][1]["reuse_trace"]
    assert sum(forecast_trace) >= 3
    with torch.compiler.set_stance("fail_on_recompile"), swapped_config(fresh, {"forecast_max_change": 0.0}):
        adacorr_compile.reset(fresh)
        sample(fresh, 0)
        assert adacorr_compile.stats(fresh)["regions"][1]["reuse_trace"] == [0.0] * STEPS
    torch._dynamo.reset()
    swapped = torch.compile(model, backend="adacorr", options=options)
    sample(swapped, 0)
    assert adacorr_compile.stats(swapped)["regions"][1]["reuse_trace"] == [0.0] * STEPS
    with torch.compiler.set_stance("fail_on_recompile"), swapped_config(swapped, {"probe_forecast": True}):
        adacorr_compile.reset(swapped)
        assert torch.equal(sample(swapped, 0), expected)
        assert adacorr_compile.stats(swapped)["regions"][1]["reuse_trace"] == forecast_trace


def test_swapped_late_phase_decides_as_a_fresh_compile():
    """late_phase, its factor and its extra reuses are read at run time (Inductor lowering):
    a calibrate variant of them needs no recompile, and decides as a compile with them."""
    model, _ = tiny_plain(4)
    late = {"late_phase": (0.0, 0.3), "late_threshold_factor": 3.0, "late_extra_reuses": 2}
    fresh = torch.compile(model, backend="adacorr", options={"reuse_threshold": 0.05, **late})
    expected = sample(fresh, 0)
    late_trace = adacorr_compile.stats(fresh)["regions"][1]["reuse_trace"]
    torch._dynamo.reset()
    swapped = torch.compile(model, backend="adacorr", options={"reuse_threshold": 0.05, "late_phase": None})
    sample(swapped, 0)
    flat_trace = adacorr_compile.stats(swapped)["regions"][1]["reuse_trace"]
    assert sum(late_trace) > sum(flat_trace)  # the variant changes the decisions
    with torch.compiler.set_stance("fail_on_recompile"), swapped_config(swapped, late):
        adacorr_compile.reset(swapped)
        assert torch.equal(sample(swapped, 0), expected)
        assert adacorr_compile.stats(swapped)["regions"][1]["reuse_trace"] == late_trace


def test_infinite_option_round_trips_through_the_calibration_file(tmp_path):
    """JSON has no infinity: forecast_max_change=inf is written as "inf" and read back as a float
    (a string option that happens to read "inf" stays a string)."""
    from adacorr_compile.calibration_file import _options_json

    doc = {"format": "adacorr-calibration/1",
           "options": _options_json({"forecast_max_change": float("inf"), "timestep_arg": "inf", "reuse_threshold": 0.1})}
    path = tmp_path / "calib.json"
    path.write_text(json.dumps(doc))
    assert json.loads(path.read_text())["options"]["forecast_max_change"] == "inf"
    assert adacorr_compile.load_options(path) == {"forecast_max_change": float("inf"), "timestep_arg": "inf",
                                                  "reuse_threshold": 0.1}


class _Flippable(PlainDiT):
    def forward(self, hidden_states, timestep, flip: bool = False):
        out = super().forward(hidden_states, timestep)[0]
        return (-out if flip else out,)


def test_a_run_that_recompiles_during_the_sweep_fails_loudly():
    torch.manual_seed(0)
    model = _Flippable(depth=3).eval()
    calls = {"n": 0}

    def guard_changing(compiled, seed):
        # calls 1-3 (uncached reference, warm-up) with flip=False, then flip=True: a constant
        # Dynamo guards on, so the sweep's first cached call would recompile
        calls["n"] += 1
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            for k in range(4):
                x = x - 0.1 * compiled(x, torch.full((2,), 1000.0 - 250 * k), flip=calls["n"] > 3)[0]
        return x

    with pytest.raises(Exception, match="(?i)recompile"):
        adacorr_compile.calibrate(guard_changing, model, seeds=[0], thresholds=[0.1], options=EAGER, progress=False)
    assert calls["n"] == 5  # reference, 2 warm-up generations, the sweep's uncached one, then the cached one failed


def test_unmet_target_returns_caching_off(tmp_path, caplog):
    model, _ = tiny_plain(4)
    result = adacorr_compile.calibrate(sample, model, target_psnr=1000.0, seeds=[0], thresholds=[0.5], options=EAGER,
                                       out=tmp_path / "c.json", plot=False, progress=False)
    assert not result.met and result.chosen is None
    assert result.options == {"lowering": "eager", "policy": "never"}
    assert "no setting reached PSNR mean >= 1000 dB" in caplog.text
    assert json.loads((tmp_path / "c.json").read_text())["met"] is False
    assert not (tmp_path / "c.png").exists()
    fast = torch.compile(model, backend="adacorr", options=adacorr_compile.load_options(tmp_path / "c.json"))
    sample(fast, 0)
    assert adacorr_compile.stats(fast)["totals"]["reuses"] == 0


def test_calibrate_rejects_bad_arguments_before_any_work():
    model, _ = tiny_plain(2)

    def never(compiled, seed):  # pragma: no cover - must not be called
        raise AssertionError("ran")

    with pytest.raises(ValueError, match="'reuse_threshold' got 2"):
        adacorr_compile.calibrate(never, model, thresholds=[2.0])
    with pytest.raises(ValueError, match="rule"):
        adacorr_compile.calibrate(never, model, rule="best")
    with pytest.raises(ValueError, match="seeds"):
        adacorr_compile.calibrate(never, model, seeds=[1, 1])
    with pytest.raises(ValueError, match="unknown adacorr option 'sope'"):
        adacorr_compile.calibrate(never, model, variants=[{"sope": "block"}])


def test_load_options_names_the_file(tmp_path):
    good = tmp_path / "plain.json"
    good.write_text(json.dumps({"reuse_threshold": 0.1, "scope": "block"}))
    assert adacorr_compile.load_options(good) == {"reuse_threshold": 0.1, "scope": "block"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "adacorr-calibration/1", "options": {"reuse_threshold": 5}}))
    with pytest.raises(ValueError, match=r"bad\.json.*'reuse_threshold' got 5"):
        adacorr_compile.load_options(bad)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match=r"broken\.json.*not JSON"):
        adacorr_compile.load_options(broken)
    with pytest.raises(ValueError, match=r"missing\.json.*cannot read"):
        adacorr_compile.load_options(tmp_path / "missing.json")
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"list\.json.*JSON object"):
        adacorr_compile.load_options(listed)


def _tiny_dit_pipeline_workload():
    """A tiny offline DiT pipeline (tests/pipelines.py), 6 steps, 2 images, and its workload."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    try:
        from pipelines import build_dit
    finally:
        sys.path.pop(0)
    from adacorr_compile.calibrate import pipeline_workload

    tiny = build_dit()
    kwargs = {k: v for k, v in tiny.kwargs(steps=6, images=2).items() if k not in ("generator", "output_type")}
    return tiny, pipeline_workload(tiny.pipe, output_type="pt", **kwargs)


def test_pipeline_workload_swaps_the_transformer_for_the_call():
    tiny, work = _tiny_dit_pipeline_workload()
    assert work.model is tiny.pipe.transformer and work.value_range == (0.0, 1.0)
    seen = []

    class Recorder(torch.nn.Module):  # stands for the compiled model: records that the pipeline calls it
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.inner, name)

        def forward(self, *args, **kw):
            seen.append(tiny.pipe.transformer is self)
            return self.inner(*args, **kw)

    work.run(Recorder(work.model), 3)
    assert len(seen) == 6 and all(seen)  # one batched CFG call per step, with the stand-in in place
    assert tiny.pipe.transformer is work.model  # put back after the call
    out = work.run(work.model, 3)
    assert out.dtype == torch.float32 and out.shape[:2] == (2, 3)
    assert torch.equal(work.run(work.model, 3), out) and not torch.equal(work.run(work.model, 4), out)


@pytest.mark.slow
def test_calibrate_on_a_diffusers_pipeline():
    tiny, work = _tiny_dit_pipeline_workload()
    result = adacorr_compile.calibrate(*work, seeds=[0], thresholds=[0.0, 1.0], options=EAGER, progress=False)
    assert result.table[0]["skipped"] == 0.0 < result.table[1]["skipped"]
    assert result.compiles_in_sweep == 0 and tiny.pipe.transformer is work.model


FACTORY = '''
import torch
from adacorr_compile.lab.tiny import PlainDiT


def make():
    torch.manual_seed(0)
    model = PlainDiT(depth=4).eval()

    def inputs(step, t):
        # noise from torch's generator: calibrate seeds it per generation
        return dict(hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.full((2,), t))

    return model, inputs
'''


def test_cli_calibrate_end_to_end(tmp_path, monkeypatch, capsys):
    (tmp_path / "adacorr_calib_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run" / "calib.json"
    argv = ["calibrate", "--model", "adacorr_calib_factory:make", "--seeds", "2", "--thresholds", "0", "0.1", "1",
            "--steps", "8", "--option", "lowering=eager", "--target-psnr", "20", "--out", str(out), "--threads", "1"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "calibrating adacorr_calib_factory:make: 8 calls per generation" in text
    assert "thr=0.1" in text and "speedup (min-max)" in text and "chosen: thr=" in text
    doc = json.loads(out.read_text())
    assert f'options: {json.dumps(doc["options"])}' in text
    assert doc["command"] == "adacorr " + " ".join(argv)
    assert [row["reuse_threshold"] for row in doc["table"]] == [0.0, 0.1, 1.0]
    assert doc["table"][0]["skipped"] == 0.0 < doc["table"][2]["skipped"]
    assert doc["seeds"] == [0, 1] and doc["environment"]["threads"] == 1
    assert out.with_suffix(".png").exists()
    chosen = next(row for row in doc["table"] if row["setting"] == doc["chosen"])
    assert chosen["psnr_mean"] >= 20 and chosen["skipped"] == max(r["skipped"] for r in doc["table"] if r["meets"])
    assert adacorr_compile.load_options(out) == {"lowering": "eager", "reuse_threshold": chosen["reuse_threshold"]}
    # a target nothing meets: exit code 1, caching off in the file
    assert main([*argv[:-6], "--target-psnr", "1000", "--out", str(out), "--no-plot", "--seeds", "1"]) == 1
    assert "NO SETTING MET THE TARGET" in capsys.readouterr().out
    assert adacorr_compile.load_options(out)["policy"] == "never"


def test_cli_calibrate_rejects_bad_input(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "--model", "plain", "--option", "reuse_threshold=3"])
    assert exc.value.code == 2 and "reuse_threshold" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "--seeds", "0"])
    assert exc.value.code == 2 and "--seeds" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--target-speed", "1"], "argument --target-speed: expected a speed factor > 1 (e.g. 2.5), got 1"),
    (["--target-speed", "fast"], "argument --target-speed: expected a speed factor > 1 (e.g. 2.5), got 'fast'"),
    (["--target-speed", "2", "--target-psnr", "30"], "argument --target-psnr: not allowed with argument --target-speed"),
])
def test_cli_calibrate_rejects_a_bad_speed_target(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "--model", "plain", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_cli_calibrate_by_speed_end_to_end(tmp_path, monkeypatch, capsys):
    """A speed target on a factory model: whatever the machine's load makes of the measured speeds,
    the chosen row is at least that fast and the best in PSNR among those that are."""
    (tmp_path / "adacorr_calib_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "calib.json"
    code = main(["calibrate", "--model", "adacorr_calib_factory:make", "--seeds", "1", "--thresholds", "0.1", "1",
                 "--steps", "8", "--option", "lowering=eager", "--target-speed", "1.05", "--out", str(out), "--no-plot",
                 "--threads", "1"])
    text = capsys.readouterr().out
    assert "target speed 1.05x (fitted; highest PSNR mean)" in text
    doc = json.loads(out.read_text())
    assert doc["target_speed"] == 1.05 and doc["speed_measure"] == "fitted"
    fast = [row for row in doc["table"] if row["speed_fitted"] >= 1.05]
    if fast:
        assert code == 0 and doc["chosen"] == max(fast, key=lambda r: (r["psnr_mean"], r["speed_fitted"]))["setting"]
        assert "x fitted)" in text
    else:
        assert code == 1 and "NO SETTING MET THE TARGET (speed >= 1.05x (fitted)" in text


def test_export_options_file_with_option_overrides(tmp_path, capsys):
    from adacorr_compile.cli_export import _options

    calib = tmp_path / "calib.json"
    calib.write_text(json.dumps({"format": "adacorr-calibration/1", "options": {"reuse_threshold": 0.15, "warmup_steps": 3}}))
    parse = lambda *a: __import__("argparse").Namespace(options=a[0], option=list(a[1:]))  # noqa: E731
    assert _options(parse(str(calib))) == {"reuse_threshold": 0.15, "warmup_steps": 3}
    assert _options(parse(str(calib), ("warmup_steps", 1))) == {"reuse_threshold": 0.15, "warmup_steps": 1}
    assert _options(parse(None, ("warmup_steps", 1))) == {"warmup_steps": 1}
    with pytest.raises(SystemExit) as exc:
        main(["export", "onnx", "--model", "plain", "--out", str(tmp_path / "m.onnx"), "--options", str(tmp_path / "no.json")])
    assert exc.value.code == 2 and "no.json" in capsys.readouterr().err


@pytest.mark.slow
def test_export_onnx_reads_options_file(tmp_path, capsys):
    from adacorr_compile.export import read_metadata

    calib = tmp_path / "calib.json"
    calib.write_text(json.dumps({"format": "adacorr-calibration/1", "options": {"reuse_threshold": 0.15, "warmup_steps": 3}}))
    path = tmp_path / "m.onnx"
    assert main(["export", "onnx", "--model", "plain", "--out", str(path), "--options", str(calib),
                 "--option", "warmup_steps=1"]) == 0
    config = read_metadata(path)["config"]
    assert config["reuse_threshold"] == 0.15 and config["warmup_steps"] == 1
    assert json.loads(capsys.readouterr().out)["regions"]


def test_front_grid_is_runtime_options_only_and_each_setting_is_valid():
    """The front grid runs on two compiles (every option swapped at run time but the FBCache rule's
    policy) and every entry is a valid, distinct setting of the backend."""
    from adacorr_compile.calibrate import FRONT_SETTINGS, RUNTIME_FIELDS, _settings, front_variants

    variants = front_variants()
    assert len(variants) == len(FRONT_SETTINGS) and FRONT_SETTINGS[0][1] == {}
    assert all(set(v) - {"policy"} <= RUNTIME_FIELDS for v in variants)
    settings = _settings({}, [0.5], variants)  # the thresholds are the variants' own, not 0.5
    assert len(settings) == len(variants) and len({s.structural for s in settings}) == 2
    assert settings[0].options == {"reuse_threshold": adacorr_compile.AdaCorrConfig().reuse_threshold}
    assert len({tuple(sorted(s.options.items(), key=str)) for s in settings}) == len(settings)


def test_cli_target_speed_alone_sweeps_the_front_grid_on_two_compiles(tmp_path, monkeypatch, capsys):
    from adacorr_compile.calibrate import FRONT_SETTINGS

    (tmp_path / "adacorr_calib_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "calib.json"
    code = main(["calibrate", "--model", "adacorr_calib_factory:make", "--seeds", "1", "--steps", "12", "--option",
                 "lowering=eager", "--target-speed", "1.05", "--out", str(out), "--no-plot", "--threads", "1"])
    text = capsys.readouterr().out
    assert f"{len(FRONT_SETTINGS)} settings (the front grid)" in text
    doc = json.loads(out.read_text())
    assert len(doc["table"]) == len(FRONT_SETTINGS) and doc["compiles_in_sweep"] <= 2
    settings = [row["setting"] for row in doc["table"]]
    assert "thr=0.25, final_steps=0, max_consecutive_reuses=16" in settings
    # the aggressive end of the grid skips more than the default on this model too
    skipped = {row["setting"]: row["skipped"] for row in doc["table"]}
    assert skipped["thr=1, final_steps=0, max_consecutive_reuses=16"] > skipped["thr=0.08"]
    fast = [row for row in doc["table"] if row["speed_fitted"] >= 1.05]
    assert code == (0 if fast else 1)
    if fast:
        assert doc["chosen"] == max(fast, key=lambda r: (r["psnr_mean"], r["speed_fitted"]))["setting"]


@pytest.mark.parametrize("extra", [["--thresholds", "0.1"], ["--variant", "forecast=none"]])
def test_cli_front_refuses_thresholds_and_variants(capsys, extra):
    assert main(["calibrate", "--model", "plain", "--front", "--target-speed", "2", *extra]) == 2
    assert "argument --front: it sweeps its own grid of settings; drop --thresholds and --variant" in \
        capsys.readouterr().err
