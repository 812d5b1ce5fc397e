"""Provenance: every response carries the resolved sampling parameters and a weights digest, and every image
file carries the same plus IPTC DigitalSourceType trainedAlgorithmicMedia (PNG tEXt and XMP, JPEG and WebP
XMP), read back here with Pillow; ``mark_output=False`` leaves the files bare."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import subprocess

import httpx
import pytest
from PIL import Image
from server_harness import serve, settings, wait_ready

from dcar.model.params import SamplingParams
from dcar.server.app import create_app

pytestmark = pytest.mark.anyio
TRAINED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"


def xmp_of(image: Image.Image) -> dict:
    """The dcar/IPTC properties of the image's XMP packet, as Pillow reads them."""
    return image.getxmp()["xmpmeta"]["RDF"]["Description"]


async def test_response_and_files_carry_parameters_digest_and_source_type(pipe):
    async with serve(pipe) as client:
        request = {"prompt": "a green star", "n": 2, "seed": 5, "steps": 3, "guidance_scale": 2.5}
        body = (await client.post("/v1/generate", json=request)).json()
        params = body["parameters"]
        names = {f.name for f in dataclasses.fields(SamplingParams)}
        assert set(params) == names - {"prompt", "seed"}  # every resolved knob; seeds are per image
        defaults = pipe.params("x")
        assert params["steps"] == 3 and params["guidance_scale"] == 2.5  # the request's
        assert params["residual_steps"] == defaults.residual_steps  # the model's
        assert (params["width"], params["height"]) == (128, 128)
        digest = body["weights_digest"]
        assert digest.startswith("sha256:") and len(digest) == 7 + 64

        for entry in body["images"]:
            png = Image.open(io.BytesIO(base64.b64decode(entry["b64_json"])))
            expected = {**params, "seed": entry["seed"]}
            assert json.loads(png.text["dcar:parameters"]) == expected
            assert png.text["dcar:weights_digest"] == digest
            assert png.text["DigitalSourceType"] == TRAINED and png.text["Source"] == "tiny-random"
            xmp = xmp_of(png)
            assert xmp["DigitalSourceType"] == TRAINED and xmp["weightsDigest"] == digest
            assert json.loads(xmp["parameters"]) == expected and "a green star" not in png.text.values()

        for fmt in ("jpeg", "webp"):
            r = await client.post("/v1/generate", json={**request, "n": 1, "output_format": fmt})
            image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]["b64_json"])))
            assert image.format == fmt.upper()
            xmp = xmp_of(image)
            assert xmp["DigitalSourceType"] == TRAINED and xmp["weightsDigest"] == digest
            assert json.loads(xmp["parameters"]) == {**params, "seed": 5} and xmp["model"] == "tiny-random"

        raw = await client.post("/v1/generate", json={**request, "n": 1}, headers={"Accept": "image/png"})
        assert Image.open(io.BytesIO(raw.content)).text["DigitalSourceType"] == TRAINED

        openai = (
            await client.post(
                "/v1/images/generations",
                json={"prompt": "a green star", "seed": 5, "steps": 3, "guidance_scale": 2.5},
            )
        ).json()
        assert openai["parameters"] == params and openai["weights_digest"] == digest
        png = Image.open(io.BytesIO(base64.b64decode(openai["data"][0]["b64_json"])))
        assert json.loads(png.text["dcar:parameters"]) == {**params, "seed": 5}


async def test_mark_output_off_leaves_files_bare(pipe):
    async with serve(pipe, mark_output=False) as client:
        for fmt in ("png", "jpeg", "webp"):
            r = (
                await client.post("/v1/generate", json={"prompt": "plain", "seed": 1, "output_format": fmt})
            ).json()
            assert r["parameters"]["steps"] == 12 and r["weights_digest"].startswith(
                "sha256:"
            )  # still answered
            image = Image.open(io.BytesIO(base64.b64decode(r["images"][0]["b64_json"])))
            assert "xmp" not in image.info and "XML:com.adobe.xmp" not in image.info
            assert not getattr(image, "text", {})


async def test_weights_digest_of_a_directory_is_sha256sum_of_its_files(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "weights", name="saved-tiny")
    by_hand = subprocess.run(
        "find . -type f -printf '%P\\n' | LC_ALL=C sort | xargs -d '\\n' sha256sum | sha256sum",
        shell=True,
        cwd=tmp_path / "weights",
        capture_output=True,
        text=True,
        check=True,
    )
    expected = "sha256:" + by_hand.stdout.split()[0]  # the recipe docs/api.md gives
    app = create_app(settings(weights=str(tmp_path / "weights"), warmup=False))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://dcar.test", timeout=60
        ) as client:
            await wait_ready(client)
            body = (await client.post("/v1/generate", json={"prompt": "x", "steps": 2})).json()
    assert body["model"] == "saved-tiny" and body["weights_digest"] == expected
    async with serve(pipe) as client:  # the same weights, not loaded from files: the modules' digest
        other = (await client.post("/v1/generate", json={"prompt": "x", "steps": 2})).json()["weights_digest"]
    assert other.startswith("sha256:") and other != expected
