"""The inference service (adacorr_compile.serve, issue 30).

Pure tests of request validation, grouping, logs and config; one engine test (batched rows
against solo runs, no Ray); and the real service: Ray Serve on 127.0.0.1 with a local Ray (2
CPUs), the reference DiT compiled with backend="adacorr" (lowering=eager: a short compile),
started once for the module and shut down at its end. Every network call has a timeout.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from adacorr_compile.serve.engine import BATCH_EXACT_OPTIONS, batch_exactness, group_requests
from adacorr_compile.serve.schema import (GenerateRequest, InvalidRequest, Limits, clean_request_id, decode_body,
                                          parse_request, validate_request)

ROOT = Path(__file__).resolve().parents[1]
LIMITS = Limits(max_steps=8, default_steps=4, max_images=3, max_body_bytes=2048)
TIMEOUT = 60  # seconds, any one HTTP call


# ----------------------------------------------------------------------------- validation (pure)


def test_a_minimal_request_takes_the_defaults():
    req = parse_request(b'{"class_labels": [3, 9]}', LIMITS, "rid-1")
    assert req == GenerateRequest((3, 9), seed=0, steps=4, guidance=1.5, size=32, output="png", options=())
    assert req.request_id == "rid-1" and req.images == 2
    full = validate_request({"class_labels": [0], "seed": 7, "steps": 8, "guidance": 2, "size": 32, "output": "both",
                             "options": {"reuse_threshold": 0.1, "warmup_steps": 2}}, LIMITS)
    assert full.options == (("reuse_threshold", 0.1), ("warmup_steps", 2)) and full.guidance == 2.0


BAD = [  # (body, field named, status)
    ({"class_labels": "3"}, "class_labels", 422),
    ({"class_labels": []}, "class_labels", 422),
    ({"class_labels": [1, 2, 3, 4]}, "class_labels", 422),  # more images than max_images
    ({"class_labels": [10]}, "class_labels[0]", 422),  # the null class is not a class
    ({"class_labels": [1.5]}, "class_labels[0]", 422),
    ({"class_labels": [True]}, "class_labels[0]", 422),
    ({"seed": 1}, "class_labels", 422),  # missing
    ({"class_labels": [1], "seed": -1}, "seed", 422),
    ({"class_labels": [1], "seed": "7"}, "seed", 422),
    ({"class_labels": [1], "steps": 9}, "steps", 422),  # too many steps
    ({"class_labels": [1], "steps": 0}, "steps", 422),
    ({"class_labels": [1], "steps": 4.0}, "steps", 422),
    ({"class_labels": [1], "guidance": "high"}, "guidance", 422),
    ({"class_labels": [1], "guidance": 21}, "guidance", 422),
    ({"class_labels": [1], "size": 64}, "size", 422),  # beyond the served sizes
    ({"class_labels": [1], "size": 16}, "size", 422),
    ({"class_labels": [1], "output": "jpeg"}, "output", 422),
    ({"class_labels": [1], "prompt": "a cat"}, "prompt", 422),  # unknown field
    ({"class_labels": [1], "options": {"lowering": "eager"}}, "options.lowering", 422),  # not per request
    ({"class_labels": [1], "options": {"reuse_threshold": 2}}, "options.reuse_threshold", 422),
    ({"class_labels": [1], "options": [1]}, "options", 422),
]


@pytest.mark.parametrize("doc,field,status", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_a_bad_field_is_refused_by_name(doc, field, status):
    with pytest.raises(InvalidRequest) as info:
        parse_request(json.dumps(doc).encode(), LIMITS)
    assert (info.value.field, info.value.status) == (field, status)
    assert info.value.to_json()["field"] == field and info.value.message


@pytest.mark.parametrize("raw,field", [
    (b'{"class_labels": [1], "guidance": NaN}', "guidance"),
    (b'{"class_labels": [1], "guidance": Infinity}', "guidance"),
    (b'{"class_labels": [1], "options": {"reuse_threshold": NaN}}', "options.reuse_threshold"),
])
def test_nan_and_infinity_are_refused_by_name(raw, field):
    with pytest.raises(InvalidRequest) as info:
        parse_request(raw, LIMITS)
    assert (info.value.field, info.value.status) == (field, 422)


@pytest.mark.parametrize("raw,status", [(b"x" * 2049, 413), (b"{not json", 400), (b"[1, 2]", 400), (b"\xff\xfe", 400)])
def test_the_body_itself_is_checked_first(raw, status):
    with pytest.raises(InvalidRequest) as info:
        decode_body(raw, LIMITS)
    assert (info.value.field, info.value.status) == ("body", status)


def test_request_ids_are_the_clients_when_safe():
    assert clean_request_id("abc-123_x.y:z", "fb") == "abc-123_x.y:z"
    assert clean_request_id("a b", "fb") == "fb" and clean_request_id("x" * 65, "fb") == "fb"
    assert clean_request_id(None, "fb") == "fb"


def test_limits_refuse_unsafe_request_options():
    with pytest.raises(ValueError, match="Limits.safe_options.*lowering"):
        Limits(safe_options=("reuse_threshold", "lowering"))


# ----------------------------------------------------------------------------- the batching layer (pure)


def _req(labels=(1,), steps=4, guidance=1.5, options=()):
    return GenerateRequest(tuple(labels), steps=steps, guidance=guidance, options=options)


def test_requests_share_a_generation_only_with_the_same_key_and_within_the_row_cap():
    reqs = [_req(), _req(steps=6), _req(labels=(1, 2)), _req(guidance=3.0), _req(options=(("reuse_threshold", 0.1),)),
            _req(labels=(1, 2, 3)), _req()]
    assert group_requests(reqs, batch_exact=True, max_rows=4) == [[0, 2], [1], [3], [4], [5, 6]]  # 3 + 1 rows fit
    assert group_requests(reqs, batch_exact=True, max_rows=8) == [[0, 2, 5, 6], [1], [3], [4]]
    assert group_requests(reqs, batch_exact=False, max_rows=8) == [[i] for i in range(7)]


def test_batch_exactness_names_what_breaks_row_equality():
    assert batch_exactness("adacorr", BATCH_EXACT_OPTIONS) is None
    assert batch_exactness("inductor", {}) is None
    assert batch_exactness("adacorr", {"policy": "never"}) is None
    reason = batch_exactness("adacorr", {})  # the backend's own defaults
    assert "decision='batch'" in reason and "scope='step'" in reason and "forecast='linear'" in reason


# ----------------------------------------------------------------------------- config, logs, metrics, CLI


def test_options_come_from_a_file_then_flags(tmp_path):
    from adacorr_compile.serve.config import make_config

    path = tmp_path / "calib.json"
    path.write_text(json.dumps({"format": "adacorr-calibration/1", "options": {"reuse_threshold": 0.12, "scope": "step"}}))
    cfg = make_config(options_file=path, options={"warmup_steps": 3})
    assert cfg.resolved_options() == {**BATCH_EXACT_OPTIONS, "reuse_threshold": 0.12, "scope": "step", "warmup_steps": 3}
    assert make_config().resolved_options() == BATCH_EXACT_OPTIONS
    assert make_config(backend="inductor", options={"reuse_threshold": 0.1}).resolved_options() == {}
    with pytest.raises(ValueError, match="reuse_threshold"):
        make_config(options={"reuse_threshold": "high"})
    with pytest.raises(ValueError, match="model 'reference-sdxl'"):
        make_config(model="reference-sdxl")


def test_json_logs_carry_the_request_id():
    from adacorr_compile.serve.logs import JsonFormatter

    record = logging.LogRecord("adacorr_compile.serve", logging.INFO, __file__, 1, "request served %s", ("ok",), None)
    record.request_id, record.status = "rid-9", 200
    doc = json.loads(JsonFormatter().format(record))
    assert doc["message"] == "request served ok" and doc["request_id"] == "rid-9" and doc["status"] == 200
    assert doc["level"] == "INFO" and doc["time"].endswith("Z")


def test_metrics_render_in_prometheus_format():
    pytest.importorskip("prometheus_client")
    from adacorr_compile.serve.engine import Outcome
    from adacorr_compile.serve.metrics import ServiceMetrics

    m = ServiceMetrics(replica="r1", model="reference-dit", backend="adacorr")
    m.answered(200, 0.3)
    m.answered(422)
    m.generated(Outcome(_req(labels=(1, 2), steps=4), skipped_share=0.25, mean_lambda=0.1, batch_requests=2), blocks=8)
    m.compiled("warmup", 2, 7.5)
    text = m.render().decode()
    assert _sample(text, "adacorr_serve_requests_total", code="200") == 1.0
    assert _sample(text, "adacorr_serve_requests_total", code="422") == 1.0
    assert _sample(text, "adacorr_serve_request_seconds_count") == 1.0
    assert _sample(text, "adacorr_serve_blocks_total") == 2 * 2 * 4 * 8  # images x CFG x steps x blocks
    assert _sample(text, "adacorr_serve_blocks_skipped_total") == 0.25 * 128
    assert _sample(text, "adacorr_serve_compile_events_total", phase="warmup") == 2.0
    assert _sample(text, "adacorr_serve_warmup_seconds") == 7.5


def test_the_core_and_the_cli_import_without_ray():
    """``import adacorr_compile`` and ``adacorr --help`` work where Ray and prometheus_client are missing."""
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('ray', 'prometheus_client'):\n"
            "            raise ImportError('blocked: ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import adacorr_compile, adacorr_compile.serve, adacorr_compile.serve.schema\n"
            "from adacorr_compile.cli import main\n"
            "from adacorr_compile.serve import require_serve\n"
            "try:\n"
            "    main(['serve', '--help'])\n"
            "except SystemExit as e:\n"
            "    assert e.code == 0\n"
            "assert not any(m.split('.')[0] == 'ray' for m in sys.modules)\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of the series ``name`` whose labels include ``labels`` (summed over the rest)."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total, found = total + float(value), True
    assert found, f"no series {name} {labels} in the scrape"
    return total


# ----------------------------------------------------------------------------- the engine (no Ray)

FAST = {**BATCH_EXACT_OPTIONS, "lowering": "eager"}  # the service's options; eager block bodies compile fast


def test_engine_rows_equal_their_solo_runs_and_a_failed_generation_touches_no_other():
    from adacorr_compile.serve.engine import Engine

    torch.set_num_threads(1)
    engine = Engine("reference-dit", "adacorr", FAST, LIMITS)
    assert engine.batch_exact and engine.blocks == 8
    report = engine.warmup(2)
    assert report["compiles"] >= 1 and report["seconds"] > 0
    a, b, c = (GenerateRequest((3,), seed=1, steps=6), GenerateRequest((4,), seed=2, steps=6),
               GenerateRequest((9,), seed=7, steps=6))
    ab, ac = engine.generate([a, b]), engine.generate([a, c])
    assert [o.batch_requests for o in ab] == [2, 2] and all(o.error is None and o.compiles == 0 for o in ab + ac)
    solo = engine.generate([a])[0]
    # the same row of a batch of the same shape, with other companions: bit-for-bit (no state crosses rows)
    assert torch.equal(ab[0].samples, ac[0].samples)
    # against its solo run (another batch size: float32 round-off of the GEMMs, amplified by DDIM)
    assert (ab[0].samples - solo.samples).abs().max().item() <= 1e-4
    # each request's lambda is its own rows' (per-sample decisions), whoever shares its batch
    assert math.isclose(ab[0].mean_lambda, solo.mean_lambda, rel_tol=1e-4)
    assert not math.isclose(ab[0].mean_lambda, ab[1].mean_lambda, rel_tol=1e-3)  # not a batch mean
    assert 0.0 < solo.skipped_share < 1.0
    # a generation that fails answers its own requests with the error; the others are served, the next call too
    loop = engine.family.loop

    def failing(model, x, labels, *args):
        if (labels == 9).any():
            raise RuntimeError("boom in a block")
        return loop(model, x, labels, *args)

    engine.family.loop = failing
    mixed = engine.generate([a, GenerateRequest((9,), seed=7, steps=5)])
    assert mixed[0].error is None and mixed[1].error == "RuntimeError: boom in a block"
    assert torch.equal(mixed[0].samples, solo.samples)
    engine.family.loop = loop
    assert torch.equal(engine.generate([a])[0].samples, solo.samples)


def test_flux_rows_equal_their_solo_runs():
    from adacorr_compile.serve.engine import Engine

    torch.set_num_threads(1)
    engine = Engine("reference-flux", "adacorr", FAST)
    assert engine.limits.default_guidance == 4.0 and engine.blocks == 8  # 2 double + 6 single blocks
    engine.warmup(2, batches=[1, 2, 1])
    a, b = GenerateRequest((3,), seed=1, steps=6, guidance=4.0), GenerateRequest((4,), seed=2, steps=6, guidance=4.0)
    batched, solo = engine.generate([a, b])[0], engine.generate([a])[0]
    assert batched.batch_requests == 2 and batched.samples.shape == (1, 3, 32, 32)
    assert (batched.samples - solo.samples).abs().max().item() <= 1e-4
    assert math.isclose(batched.mean_lambda, solo.mean_lambda, rel_tol=1e-4)


# ----------------------------------------------------------------------------- the real service


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service():
    pytest.importorskip("ray.serve")
    pytest.importorskip("prometheus_client")
    from adacorr_compile.serve import app
    from adacorr_compile.serve.config import ServeConfig

    config = ServeConfig(options=FAST, limits=LIMITS, max_batch_size=4, batch_wait_s=0.3, warmup_steps=2)
    try:
        url = app.start(config, port=_free_port(), num_cpus=2)
        yield url
    finally:
        app.stop()


def _get(url: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _post(url: str, body, headers=None):
    from adacorr_compile.serve.load import post_json

    return post_json(url + "/v1/generate", body, TIMEOUT, headers)


def _latents(doc) -> torch.Tensor:
    lat = doc["latents"]
    assert lat["dtype"] == "float32"
    return torch.frombuffer(bytearray(base64.b64decode(lat["data"])), dtype=torch.float32).reshape(lat["shape"])


def test_health_and_info(service):
    status, text = _get(service + "/healthz")
    assert status == 200 and json.loads(text)["status"] == "ok"
    info = json.loads(_get(service + "/v1/info")[1])
    assert info["batching"] is True and info["batching_off_reason"] is None
    assert info["config"]["options"]["decision"] == "sample" and info["warmup"]["batch"] == "dynamic"
    assert info["fallbacks"] == []


def test_round_trip_returns_pngs_of_the_right_size(service):
    from PIL import Image

    status, doc, headers = _post(service, {"class_labels": [3, 5], "seed": 11, "steps": 4, "output": "both"},
                                 {"X-Request-Id": "round-trip-1"})
    assert status == 200, doc
    assert doc["request_id"] == "round-trip-1" and {k.lower(): v for k, v in headers.items()}["x-request-id"] == "round-trip-1"
    assert len(doc["images"]) == 2
    latents = _latents(doc)
    assert latents.shape == (2, 3, 32, 32) and torch.isfinite(latents).all()
    for k, b64 in enumerate(doc["images"]):
        img = Image.open(io.BytesIO(base64.b64decode(b64)))
        assert (img.format, img.size, img.mode) == ("PNG", (32, 32), "RGB")
        expect = ((latents[k].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)
        assert torch.equal(torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(32, 32, 3), expect)
    assert 0.0 <= doc["stats"]["skipped_share"] <= 1.0 and doc["stats"]["compiles"] == 0


def test_concurrent_requests_are_batched_and_each_equals_its_solo_run(service):
    bodies = [{"class_labels": [k % 10], "seed": 100 + k, "steps": 6, "output": "latents"} for k in range(4)]
    answers: list = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def send(k):
        barrier.wait(timeout=TIMEOUT)
        answers[k] = _post(service, bodies[k])

    threads = [threading.Thread(target=send, args=(k,)) for k in range(len(bodies))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(TIMEOUT * 2)
    assert all(a is not None and a[0] == 200 for a in answers), answers
    assert max(a[1]["stats"]["batch_requests"] for a in answers) >= 2  # they did share a generation
    for body, (_, batched, _) in zip(bodies, answers):
        status, solo, _ = _post(service, body)  # alone: one at a time
        assert status == 200 and solo["stats"]["batch_requests"] == 1
        # the float32 round-off of another batch size, grown over 6 DDIM steps (the uncached model
        # shows the same; a shared decision or cache differs by 3e-2 or more)
        assert (_latents(batched) - _latents(solo)).abs().max().item() <= 2e-3
        assert math.isclose(batched["stats"]["mean_lambda"], solo["stats"]["mean_lambda"], rel_tol=1e-4)


def _bad_requests(base: str):
    import urllib.request

    def raw(data: bytes, method="POST", path="/v1/generate"):
        return urllib.request.Request(base + path, data=data, method=method, headers={"Content-Type": "application/json"})

    yield raw(b'{"class_labels": [1], "guidance": NaN}'), 422, "guidance"
    yield raw(b'{"class_labels": [1], "steps": 9}'), 422, "steps"
    yield raw(b'{"class_labels": ["cat"]}'), 422, "class_labels[0]"
    yield raw(b'{"class_labels": [1], "size": 1024}'), 422, "size"
    yield raw(b'{"class_labels": [1], "options": {"scope": "step"}}'), 422, "options.scope"
    yield raw(b'{"class_labels": [1], "negative_prompt": "x"}'), 422, "negative_prompt"
    yield raw(b'{"class_labels": [1], "seed": ' + b"9" * 3000 + b"}"), 413, "body"
    yield raw(b"{class_labels: 1}"), 400, "body"
    yield raw(None, method="GET"), 405, "method"
    yield raw(b"{}", path="/v2/paint"), 404, "path"


def test_bad_input_gets_a_4xx_naming_the_field_and_the_service_keeps_serving(service):
    import urllib.error
    import urllib.request

    for req, status, field in _bad_requests(service):
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
                got, doc = resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            got, doc = exc.code, json.loads(exc.read())
        assert (got, doc.get("field")) == (status, field), doc
        assert doc["detail"]
    status, doc, _ = _post(service, {"class_labels": [2], "steps": 4})
    assert status == 200 and len(doc["images"]) == 1


def test_metrics_are_scraped_and_move(service):
    before = _get(service + "/metrics")[1]
    status, doc, _ = _post(service, {"class_labels": [6], "steps": 4, "options": {"reuse_threshold": 0.3}})
    assert status == 200 and doc["options"] == {"reuse_threshold": 0.3}
    assert _post(service, {"class_labels": [6], "steps": 99})[0] == 422
    after = _get(service + "/metrics")[1]

    def moved(name, **labels):
        return _sample(after, name, **labels) - (_sample(before, name, **labels) if f"{name}{{" in before and all(
            f'{k}="{v}"' in before for k, v in labels.items()) else 0.0)

    assert moved("adacorr_serve_requests_total", code="200") == 1.0
    assert moved("adacorr_serve_requests_total", code="422") == 1.0
    assert moved("adacorr_serve_request_seconds_count") == 1.0
    assert moved("adacorr_serve_skipped_share_count") == 1.0
    assert moved("adacorr_serve_blocks_total") == 1 * 2 * 4 * 8
    assert moved("adacorr_serve_mean_lambda_count") == 1.0
    assert _sample(after, "adacorr_serve_compile_events_total", phase="warmup") >= 1.0
    assert "phase=\"serving\"" not in after  # no compile after warm-up
    assert _sample(after, "adacorr_serve_ready") == 1.0 and _sample(after, "adacorr_serve_fallbacks") == 0.0
    assert _sample(after, "adacorr_serve_warmup_seconds") > 0.0


@pytest.mark.slow
def test_a_bounded_poisson_load_is_served_without_errors(service):
    from adacorr_compile.serve.load import poisson_load, summarize

    samples, wall = poisson_load(service + "/v1/generate", rate=4.0, n=40, seed=0, timeout=TIMEOUT,
                                 make_body=lambda k: {"class_labels": [k % 10], "seed": k, "steps": 6})
    summary = summarize(samples, wall)
    assert summary["errors"] == 0, summary["first_error"]
    assert summary["mean_batch"] > 1.0 and summary["p99_s"] < TIMEOUT


def test_graceful_shutdown_finishes_the_request_in_flight(service):
    """Last in the module: deleting the application drains the replica; the request already in
    it is answered, then nothing is served."""
    import time

    from ray import serve

    from adacorr_compile.serve.app import APP_NAME

    result = {}
    th = threading.Thread(target=lambda: result.update(answer=_post(service, {"class_labels": [1], "steps": 8})))
    th.start()
    time.sleep(0.15)  # routed to the replica, waiting in its batch queue (batch_wait_s=0.3)
    serve.delete(APP_NAME)  # blocks until the replica has stopped
    th.join(TIMEOUT)
    assert result["answer"][0] == 200 and len(result["answer"][1]["images"]) == 1
    assert _get(service + "/healthz")[0] != 200
