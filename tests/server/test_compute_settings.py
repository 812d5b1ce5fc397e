"""The DCAR_ compute settings reach the sampler, and change how it computes, never what it returns."""

from __future__ import annotations

import pytest
from server_harness import decode, same_image, wait_ready

from dcar.server.runtime import load_pipeline
from dcar.server.settings import Settings

pytestmark = pytest.mark.anyio


def test_per_device_defaults_on_cpu():
    pipe = load_pipeline(Settings(weights="preset:tiny", device="cpu"))
    assert pipe.info()["compute"] == {
        "compile": False,
        "cuda_graphs": False,
        "pad_buckets": False,
        "channels_last_decoder": False,
    }
    half = load_pipeline(Settings(weights="preset:tiny", device="cpu", dtype="bfloat16"))
    assert half.info()["compute"]["channels_last_decoder"] is True  # 8x faster half convolutions on CPU


async def test_env_settings_turn_buckets_and_channels_last_on_with_the_same_images(monkeypatch):
    import httpx

    from dcar.server.app import create_app

    request = {"prompt": "a red circle", "seed": 5, "steps": 4, "n": 3}
    images = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("DCAR_PAD_BUCKETS", flag)
        monkeypatch.setenv("DCAR_CHANNELS_LAST", flag)
        app = create_app(Settings(weights="preset:tiny", max_wait_ms=0))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://dcar.test", timeout=120
            ) as client:
                await wait_ready(client)
                status = (await client.get("/v1/status")).json()
                assert status["compute"]["pad_buckets"] is (flag == "1")
                assert status["compute"]["channels_last_decoder"] is (flag == "1")
                r = await client.post("/v1/generate", json=request)
                assert r.status_code == 200, r.text
                images[flag] = [decode(im["b64_json"]) for im in r.json()["images"]]
    assert all(same_image(a, b) for a, b in zip(images["0"], images["1"]))
