"""The official ``openai`` package, unchanged, generates and edits against a live uvicorn."""

from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from server_harness import decode, live_server, png_bytes, same_image

KEY = "sk-local-test-key"


def test_openai_client_generates_and_edits(pipe):
    with live_server(pipe, api_keys=KEY) as (url, app):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)

        result = client.images.generate(model="tiny-random", prompt="a red circle", n=2, size="128x128",
                                        response_format="b64_json", extra_body={"seed": 3, "steps": 4})
        assert result.created > 0 and len(result.data) == 2
        images = [decode(d.b64_json) for d in result.data]
        assert all(im.shape == (128, 128, 3) for im in images)
        native = httpx.post(f"{url}/v1/generate", json={"prompt": "a red circle", "n": 2, "seed": 3, "steps": 4},
                            headers={"Authorization": f"Bearer {KEY}"}, timeout=60).json()
        for image, mine in zip(images, native["images"]):
            assert same_image(image, decode(mine["b64_json"]))  # the extension fields took effect

        default = client.images.generate(prompt="whatever size")  # no model, size or format: defaults
        assert decode(default.data[0].b64_json).shape == (128, 128, 3)

        source = np.zeros((128, 128, 3), np.uint8)
        source[:, 64:] = (30, 200, 90)
        mask = Image.new("RGBA", (128, 128), (0, 0, 0, 255))
        mask.paste((0, 0, 0, 0), (0, 0, 64, 64))  # transparent = regenerate
        edited = client.images.edit(image=("image.png", png_bytes(Image.fromarray(source)), "image/png"),
                                    mask=("mask.png", png_bytes(mask), "image/png"), prompt="a blue square",
                                    n=1, size="128x128", response_format="b64_json",
                                    extra_body={"seed": 5, "guidance_scale": 3.0, "steps": 4})
        out = decode(edited.data[0].b64_json)
        assert np.array_equal(out[64:, :], source[64:, :])  # outside the transparent area: kept
        direct = httpx.post(f"{url}/v1/images/edits", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                            data={"prompt": "a blue square", "seed": "5", "guidance_scale": "3.0", "steps": "4"},
                            files={"image": ("i.png", png_bytes(Image.fromarray(source)), "image/png"),
                                   "mask": ("m.png", png_bytes(mask), "image/png")})
        assert same_image(out, decode(direct.json()["data"][0]["b64_json"]))  # extra_body reached the form

        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong-key", max_retries=0).images.generate(prompt="x")
        with pytest.raises(openai.BadRequestError, match="response_format"):
            client.images.generate(prompt="x", response_format="url")

        models = client.models.list()
        assert [m.id for m in models.data] == ["tiny-random"]
