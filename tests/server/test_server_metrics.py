"""After known traffic, /metrics holds every metric of server/metrics.py with the expected counts,
and ``promtool check metrics`` (Debian's prometheus package) reports nothing."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from PIL import Image
from server_harness import metric, metrics_text, png_bytes, samples, serve

pytestmark = pytest.mark.anyio

STAGES = ("text_encode", "unmask", "residual", "decode", "image_encode")


async def test_metrics_after_traffic(pipe):
    image = png_bytes(Image.new("RGB", (128, 128), (90, 90, 200)))
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (0, 0, 32, 32))
    async with serve(pipe) as client:
        assert (await client.post("/v1/generate", json={"prompt": "one", "steps": 3})).status_code == 200
        assert (
            await client.post("/v1/generate", json={"prompt": "two", "n": 2, "steps": 3})
        ).status_code == 200
        r = await client.post(
            "/v1/edit",
            data={"prompt": "three", "steps": "3"},
            files={"image": ("i.png", image, "image/png"), "mask": ("m.png", png_bytes(mask), "image/png")},
        )
        assert r.status_code == 200
        assert (await client.post("/v1/generate", json={"prompt": "x", "steps": 99})).status_code == 400
        # shorter than one image on an idle server: 400 timeout_too_short (no retry can help)
        assert (await client.post("/v1/generate", json={"prompt": "x", "timeout": 1e-4})).status_code == 400
        text = await metrics_text(client)

    def m(metric_name, **labels):
        return metric(text, metric_name, **labels)

    assert m("dcar_requests_total", endpoint="/v1/generate", status="200") == 2
    assert m("dcar_requests_total", endpoint="/v1/edit", status="200") == 1
    assert m("dcar_requests_total", endpoint="/v1/generate", status="400") == 2
    assert m("dcar_request_duration_seconds_count", endpoint="/v1/generate") == 4
    assert m("dcar_images_generated_total", task="generate") == 3
    assert m("dcar_images_generated_total", task="edit") == 1
    assert m("dcar_queue_wait_seconds_count") == 4
    for stage in STAGES:
        assert m("dcar_stage_duration_seconds_count", stage=stage) == 4, stage
        assert m("dcar_stage_duration_seconds_sum", stage=stage) > 0, stage
    assert m("dcar_batch_size_count") == m("dcar_batch_duration_seconds_count") >= 9  # 3 batches x 3 steps
    assert m("dcar_batch_size_sum") == 3 * 1 + 3 * 2 + 3 * 1  # rows x steps, whatever the grouping
    assert m("dcar_rejections_total", reason="invalid") == 2
    assert m("dcar_rejections_total", reason="deadline") == 0
    assert m("dcar_queue_size") == 0 and m("dcar_rows_running") == 0
    assert m("dcar_batch_size_limit") == 16
    assert m("dcar_ready") == 1
    assert (
        m(
            "dcar_model_info",
            name="tiny-random",
            device="cpu",
            dtype="float32",
            native_size="128x128",
            sizes="128x128",
        )
        == 1
    )
    names = {name for name, _ in samples(text)}
    # every documented reason exists from the start (zeros, not gaps), although none happened here
    for reason in ("error", "out_of_memory", "non_finite_output"):
        assert ("dcar_failed_rows_total", (("reason", reason),)) in samples(text), reason
    for name in (
        "dcar_dropped_rows_total",
        "dcar_wasted_seconds_total",
        "dcar_failed_rows_total",
        "dcar_oom_total",
        "dcar_batch_splits_total",
    ):
        assert name in names, name
    assert not any(n.startswith("dcar_gpu_memory") for n in names)  # CUDA only
    assert "prompt" not in text and "req-" not in text  # no unbounded labels

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: install Debian's prometheus package (apt-get install -y prometheus)")
    check = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0 and check.stdout.strip() == "" and check.stderr.strip() == "", (
        check.stdout + check.stderr
    )
