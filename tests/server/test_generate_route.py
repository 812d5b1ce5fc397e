"""/v1/generate, /v1/models and the health endpoints, through the app."""

from __future__ import annotations

import asyncio
import base64
import io
import threading

import httpx
import numpy as np
import pytest
from PIL import Image
from server_harness import StepHook, decode, same_image, serve, settings, wait_ready

from dcar.server.app import create_app

pytestmark = pytest.mark.anyio


async def test_generate_returns_images_seeds_and_stage_timings(pipe):
    async with serve(pipe) as client:
        r = await client.post("/v1/generate", json={"prompt": "a red circle", "n": 2, "seed": 7, "steps": 4})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["id"] == r.headers["x-request-id"]
        assert body["model"] == "tiny-random" and body["size"] == "128x128" and body["output_format"] == "png"
        assert [im["seed"] for im in body["images"]] == [7, 8]
        for im in body["images"]:
            assert decode(im["b64_json"]).shape == (128, 128, 3)
            assert set(im["timings"]) == {
                "text_encode",
                "unmask",
                "residual",
                "decode",
                "image_encode",
                "queue_wait",
            }
        assert body["timings"]["total"] >= body["timings"]["queue_wait"] >= 0
        a, b = (decode(im["b64_json"]) for im in body["images"])
        assert not np.array_equal(a, b)  # different seeds


async def test_same_seed_same_image_and_random_seed_is_echoed(pipe):
    async with serve(pipe) as client:
        req = {"prompt": "blue square", "seed": 3, "steps": 3}
        a, b = [(await client.post("/v1/generate", json=req)).json()["images"][0] for _ in range(2)]
        assert same_image(decode(a["b64_json"]), decode(b["b64_json"]))
        r = await client.post("/v1/generate", json={"prompt": "blue square", "steps": 3})
        seed = r.json()["images"][0]["seed"]
        again = await client.post("/v1/generate", json={"prompt": "blue square", "steps": 3, "seed": seed})
        assert same_image(
            decode(r.json()["images"][0]["b64_json"]), decode(again.json()["images"][0]["b64_json"])
        )


@pytest.mark.parametrize("fmt,magic", [("png", b"\x89PNG"), ("jpeg", b"\xff\xd8\xff"), ("webp", b"RIFF")])
async def test_output_formats_and_raw_image_with_accept(pipe, fmt, magic):
    async with serve(pipe) as client:
        r = await client.post(
            "/v1/generate", json={"prompt": "x", "steps": 2, "seed": 1, "output_format": fmt, "quality": 80}
        )
        assert r.status_code == 200
        assert base64.b64decode(r.json()["images"][0]["b64_json"]).startswith(magic)
        raw = await client.post(
            "/v1/generate", json={"prompt": "x", "steps": 2, "seed": 1}, headers={"Accept": f"image/{fmt}"}
        )
        assert raw.status_code == 200
        assert raw.headers["content-type"] == f"image/{fmt}"
        assert raw.headers["x-seed"] == "1"
        assert raw.content.startswith(magic)
        assert Image.open(io.BytesIO(raw.content)).size == (128, 128)


async def test_allowed_sizes_other_than_native(pipe):
    async with serve(pipe, allowed_sizes="128x128,64x128") as client:
        r = await client.post("/v1/generate", json={"prompt": "wide", "size": "64x128", "steps": 2})
        assert r.status_code == 200, r.text
        assert decode(r.json()["images"][0]["b64_json"]).shape == (128, 64, 3)  # H x W
        models = (await client.get("/v1/models")).json()["data"][0]
        assert models["id"] == "tiny-random" and models["sizes"] == ["128x128", "64x128"]
        assert models["native_size"] == "128x128"


async def test_health_and_readiness_while_warming_up(pipe, monkeypatch):
    gate = threading.Event()

    def hold(state):
        gate.wait(30)

    StepHook(pipe, monkeypatch, fail=hold)  # the warm-up generation blocks until released
    async with serve(pipe, ready=False) as client:
        assert (await client.get("/healthz")).status_code == 200
        r = await client.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] in ("loading", "warming")
        refused = await client.post("/v1/generate", json={"prompt": "too early"})
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "not_ready" and refused.headers["retry-after"] == "1"
        gate.set()
        await wait_ready(client)
        assert (await client.get("/readyz")).json()["status"] == "ready"
        assert (await client.post("/v1/generate", json={"prompt": "now", "steps": 2})).status_code == 200


async def test_weights_that_do_not_load_fail_readiness(tmp_path):
    app = create_app(settings(weights=str(tmp_path / "missing")))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            while app.state.runtime.booting:
                await asyncio.sleep(0.01)
            r = await client.get("/readyz")
            assert r.status_code == 503 and r.json()["status"] == "failed"
            assert "weights directory not found" in r.json()["error"]
            g = await client.post("/v1/generate", json={"prompt": "x"})
            assert g.status_code == 503 and g.json()["error"]["code"] == "engine_failed"


async def test_api_keys_guard_inference_but_not_operations(pipe):
    async with serve(pipe, api_keys="key-one-123,key-two-456") as client:
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await client.get(path)).status_code == 200
        assert (await client.get("/v1/models")).status_code == 401
        r = await client.post(
            "/v1/generate", json={"prompt": "x", "steps": 2}, headers={"Authorization": "Bearer key-two-456"}
        )
        assert r.status_code == 200
        r = await client.get("/v1/models", headers={"Authorization": "bearer key-one-123"})
        assert r.status_code == 200


async def test_an_allowed_size_the_tokenizer_cannot_serve_fails_startup(pipe):
    async with serve(pipe, ready=False, allowed_sizes="128x128,100x100") as client:
        while client.app.state.runtime.booting:
            await asyncio.sleep(0.01)
        r = await client.get("/readyz")
        assert r.status_code == 503 and "100x100 is not a positive multiple of 32" in r.json()["error"]


async def test_the_step_caps_bound_the_defaults_a_request_did_not_set(pipe):
    """max_steps / max_residual_steps below the model's defaults (12 and 8): a request that sets no steps runs
    at most the caps, an OpenAI quality preset is lowered to them (not refused for steps it never sent), and a
    request that asks for more is still refused."""
    async with serve(pipe, max_steps=6, max_residual_steps=4) as client:
        r = await client.post("/v1/generate", json={"prompt": "a red circle", "seed": 1})
        assert r.status_code == 200, r.text
        assert (r.json()["parameters"]["steps"], r.json()["parameters"]["residual_steps"]) == (6, 4)
        for quality, steps in (("low", 4), ("medium", 6), ("high", 6)):
            r = await client.post(
                "/v1/images/generations", json={"prompt": "a red circle", "quality": quality}
            )
            assert r.status_code == 200, (quality, r.text)
            assert (r.json()["parameters"]["steps"], r.json()["parameters"]["residual_steps"]) == (steps, 4)
        r = await client.post("/v1/generate", json={"prompt": "a red circle", "steps": 8})
        assert r.status_code == 400 and "between 1 and 6, got 8" in r.json()["error"]["message"]
