"""benchmarks/gpu_bench.py in --smoke mode: tiny DiT on the CPU, the figures it must report."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from adacorr_compile.config import AdaCorrConfig
from adacorr_compile.policies import Guards, decide

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_bench.py"
STEPS = 8
METHODS = ["eager", "inductor", "adacorr never", "adacorr interval 2", "adacorr default"]


def _load():
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_bench():
    return _load()


@pytest.fixture(scope="module")
def smoke(gpu_bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_bench")
    threads = torch.get_num_threads()
    torch._dynamo.reset()
    try:
        code = gpu_bench.main(["--smoke", "--models", "dit", "--steps", str(STEPS), "--rounds", "1", "--threads", "1",
                               "--methods", ",".join(METHODS), "--out", str(out), "--name", "smoke"])
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()
    report = json.loads((out / "smoke.json").read_text())
    md = (out / "smoke.md").read_text()
    return code, report, md, {r["method"]: r for r in report["models"]["dit"]["rows"]}


def expected_share(options: dict, steps: int, regions: int) -> float:
    """Skipped share of a policy that needs no lambda, from its definition: per region and
    step the guards and the policy's verdict (region 0 is the first region)."""
    config = AdaCorrConfig.from_options(options)
    reuses = 0
    for order in range(regions):
        consecutive = 0
        for step in range(steps):
            guards = Guards(step=step, steps_left=steps - 1 - step, consecutive_reuses=consecutive, has_cache=step > 0,
                            is_first_region=order == 0)
            verdict = decide(config, guards, None, None)
            if isinstance(verdict, list) and all(verdict):
                reuses, consecutive = reuses + 1, consecutive + 1
            else:
                consecutive = 0
    return reuses / (regions * steps)


def test_files_and_rows(smoke):
    code, report, md, rows = smoke
    assert code == 0, report["failures"]
    assert report["ok"] and not report["failures"]
    assert list(rows) == METHODS
    for name, row in rows.items():
        assert row["status"] == "ok" and row["error"] is None, (name, row["error"])
        assert row["rounds"] == 1 and row["ms_per_step"] > 0
        assert row["ms_per_step_min"] <= row["ms_per_step"] <= row["ms_per_step_max"]
        assert row["peak_bytes"] is None  # CPU
        assert f"| {name} |" in md
    assert rows["eager"]["speedup_vs_eager"] == pytest.approx(1.0)
    assert rows["inductor"]["speedup_vs_inductor"] == pytest.approx(1.0)
    env = report["environment"]
    for key in ("torch", "device", "device_name", "dtype", "command", "date", "diffusers"):
        assert env[key]
    assert env["dtype"] == "float32" and env["device"] == "cpu"
    settings = report["settings"]
    assert settings["steps"] == STEPS and settings["rounds"] == 1 and settings["smoke"]
    assert report["models"]["dit"]["sizes"]["blocks"] == 3
    assert "## dit" in md and "PASS" in md


def test_never_matches_inductor(smoke):
    _, report, _, rows = smoke
    check = report["models"]["dit"]["check"]
    assert check["checked"] and check["passed"]
    assert check["tolerance_rel_l2"] == 1e-4
    assert check["rel_l2"] <= 1e-4 and check["max_abs"] < 1e-3
    assert rows["adacorr never"]["diff_vs_inductor"]["rel_l2"] == check["rel_l2"]
    assert rows["adacorr never"]["skipped_share"] == 0.0 and rows["adacorr never"]["reuses"] == 0


def test_interval_share_and_ideal(smoke, gpu_bench):
    _, _, _, rows = smoke
    row = rows["adacorr interval 2"]
    options = next(m.options for m in gpu_bench.METHODS if m.name == "adacorr interval 2")
    assert options["policy"] == "interval" and options["interval"] == 2
    regions = row["regions"]
    assert regions == 3  # every block of the smoke DiT is guarded
    assert row["calls"] == regions * STEPS
    share = expected_share(options, STEPS, regions)
    assert share > 0
    assert row["skipped_share"] == pytest.approx(share)
    assert row["ideal_speedup"] == pytest.approx(1.0 / (1.0 - share))
    assert row["realised_over_ideal"] == pytest.approx(row["speedup_vs_inductor"] / row["ideal_speedup"])
    assert row["fallbacks"] == []
    for name in ("adacorr never", "adacorr interval 2", "adacorr default"):
        r = rows[name]
        assert r["ideal_speedup"] == pytest.approx(1.0 / (1.0 - r["skipped_share"]))


def test_adacorr_figures(smoke):
    _, report, _, rows = smoke
    assert rows["adacorr default"]["cache_bytes"] > 0
    for name in ("adacorr never", "adacorr interval 2", "adacorr default"):
        assert rows[name]["host_reads_per_step"] is not None and rows[name]["host_reads_per_step"] > 0
        assert 0 <= rows[name]["host_read_share"] < 1
    assert rows["eager"]["host_reads_per_step"] == 0
    assert report["read_latency_us"] > 0
    for row in rows.values():
        assert row["ms_per_block_step"] == pytest.approx(row["ms_per_step"] / 3)
        assert math.isfinite(row["diff_vs_inductor"]["rel_l2"])


def test_budget_skips_and_unknown_method(gpu_bench, tmp_path):
    code = gpu_bench.main(["--smoke", "--models", "dit", "--steps", "2", "--threads", "1", "--methods", "eager,inductor",
                           "--time-budget", "0", "--out", str(tmp_path), "--name", "budget"])
    assert code == 0  # a skip is reported, not a failure
    report = json.loads((tmp_path / "budget.json").read_text())
    rows = {r["method"]: r for r in report["models"]["dit"]["rows"]}
    assert rows["eager"]["status"] == "ok" and rows["inductor"]["status"] == "skipped"
    assert "skipped" in (tmp_path / "budget.md").read_text()
    with pytest.raises(SystemExit):
        gpu_bench.select_methods("eager,no such method")
    assert [m.name for m in gpu_bench.select_methods("adacorr_interval_2, EAGER")] == ["eager", "adacorr interval 2"]


def test_failed_method_gets_a_row(gpu_bench, tmp_path, monkeypatch):
    broken = gpu_bench.Method("adacorr broken", "adacorr", options={"policy": "no such policy"})
    monkeypatch.setattr(gpu_bench, "METHODS", [*gpu_bench.METHODS, broken])
    code = gpu_bench.main(["--smoke", "--models", "dit", "--steps", "2", "--threads", "1", "--methods", "eager,adacorr broken",
                           "--out", str(tmp_path), "--name", "broken"])
    assert code == 1
    report = json.loads((tmp_path / "broken.json").read_text())
    rows = {r["method"]: r for r in report["models"]["dit"]["rows"]}
    assert rows["eager"]["status"] == "ok"
    assert rows["adacorr broken"]["status"] == "error" and "no such policy" in rows["adacorr broken"]["error"]
    assert not report["ok"] and any("adacorr broken" in f for f in report["failures"])
    assert "**ERROR**" in (tmp_path / "broken.md").read_text()


def test_host_read_counter_restores_tensor(gpu_bench):
    before = {name: torch.Tensor.__dict__.get(name) for name in gpu_bench._READS}
    t = torch.ones(3)
    with gpu_bench.count_host_reads("cpu") as counter:
        t.tolist()
        float(t[0])
        t.sum().item()
    assert counter["reads"] == 3
    assert {name: torch.Tensor.__dict__.get(name) for name in gpu_bench._READS} == before
