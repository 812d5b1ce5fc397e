"""The official ``openai`` package, unchanged, generates and edits against a live uvicorn."""

from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image
from server_harness import StepHook, decode, live_server, metric, png_bytes, same_image

KEY = "sk-local-test-key"


def test_openai_client_generates_and_edits(pipe):
    with live_server(pipe, api_keys=KEY) as (url, app):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)

        result = client.images.generate(
            model="tiny-random",
            prompt="a red circle",
            n=2,
            size="128x128",
            response_format="b64_json",
            extra_body={"seed": 3, "steps": 4},
        )
        assert result.created > 0 and len(result.data) == 2
        images = [decode(d.b64_json) for d in result.data]
        assert all(im.shape == (128, 128, 3) for im in images)
        native = httpx.post(
            f"{url}/v1/generate",
            json={"prompt": "a red circle", "n": 2, "seed": 3, "steps": 4},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=60,
        ).json()
        for image, mine in zip(images, native["images"]):
            assert same_image(image, decode(mine["b64_json"]))  # the extension fields took effect

        default = client.images.generate(prompt="whatever size")  # no model, size or format: defaults
        assert decode(default.data[0].b64_json).shape == (128, 128, 3)

        source = np.zeros((128, 128, 3), np.uint8)
        source[:, 64:] = (30, 200, 90)
        mask = Image.new("RGBA", (128, 128), (0, 0, 0, 255))
        mask.paste((0, 0, 0, 0), (0, 0, 64, 64))  # transparent = regenerate
        edited = client.images.edit(
            image=("image.png", png_bytes(Image.fromarray(source)), "image/png"),
            mask=("mask.png", png_bytes(mask), "image/png"),
            prompt="a blue square",
            n=1,
            size="128x128",
            response_format="b64_json",
            extra_body={"seed": 5, "guidance_scale": 3.0, "steps": 4},
        )
        out = decode(edited.data[0].b64_json)
        assert np.array_equal(out[64:, :], source[64:, :])  # outside the transparent area: kept
        direct = httpx.post(
            f"{url}/v1/images/edits",
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=60,
            data={"prompt": "a blue square", "seed": "5", "guidance_scale": "3.0", "steps": "4"},
            files={
                "image": ("i.png", png_bytes(Image.fromarray(source)), "image/png"),
                "mask": ("m.png", png_bytes(mask), "image/png"),
            },
        )
        assert same_image(out, decode(direct.json()["data"][0]["b64_json"]))  # extra_body reached the form
        with pytest.raises(openai.UnprocessableEntityError, match="stepz is not a known field"):
            client.images.edit(
                image=("image.png", png_bytes(Image.fromarray(source)), "image/png"),
                prompt="x",
                extra_body={"stepz": 4},
            )

        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong-key", max_retries=0).images.generate(
                prompt="x"
            )
        with pytest.raises(openai.BadRequestError, match="response_format"):
            client.images.generate(prompt="x", response_format="url")

        models = client.models.list()
        assert [m.id for m in models.data] == ["tiny-random"]


def requests_seen(url: str, status: int) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return metric(text, "dcar_requests_total", endpoint="/v1/images/generations", status=str(status))


def test_openai_fields_presets_usage_aliases_and_errors(pipe, monkeypatch):
    def out_of_memory(state):
        if any(r.params.prompt == "too big" for r in state.rows):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    hook = StepHook(pipe, monkeypatch, fail=out_of_memory)
    with live_server(pipe, api_keys=KEY, model_aliases="gpt-image-1", max_wait_ms=0) as (url, app):
        # max_retries=2, as the SDK's default: the errors below must still reach the server once each
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=2, timeout=60)
        native = {}
        for steps in (4, 8, 12):
            r = httpx.post(
                f"{url}/v1/generate",
                json={"prompt": "a blue square", "seed": 7, "steps": steps},
                headers={"Authorization": f"Bearer {KEY}"},
                timeout=60,
            ).json()
            native[steps] = decode(r["images"][0]["b64_json"])
        for quality, steps in (("low", 4), ("medium", 8), ("high", 12), ("auto", 12)):
            result = client.images.generate(
                model="gpt-image-1",
                prompt="a blue square",
                quality=quality,
                moderation="low",
                user="user-42",
                extra_body={"seed": 7},
            )
            assert result.quality == ("high" if quality == "auto" else quality)
            extra = result.to_dict()
            assert extra["parameters"]["steps"] == steps and extra["data"][0]["seed"] == 7
            assert extra["weights_digest"].startswith("sha256:") and extra["model"] == "tiny-random"
            assert same_image(decode(result.data[0].b64_json), native[steps])  # the preset took effect
            assert result.safety_identifier == "user-42" and result.background == "opaque"
            usage = result.usage
            assert usage.output_tokens == 16 and usage.output_tokens_details.image_tokens == 16  # 4x4 tokens
            assert usage.input_tokens == usage.input_tokens_details.text_tokens > 0
            assert usage.input_tokens_details.image_tokens == 0
            assert usage.total_tokens == usage.input_tokens + usage.output_tokens
        explicit = client.images.generate(
            prompt="a blue square", quality="low", extra_body={"seed": 7, "steps": 12}
        )
        assert same_image(
            decode(explicit.data[0].b64_json), native[12]
        )  # an explicit knob wins over the preset

        with pytest.raises(openai.UnprocessableEntityError) as caught:  # a typo in extra_body
            client.images.generate(prompt="x", extra_body={"step": 4})
        assert caught.value.param == "step" and "step is not a known field" in caught.value.message
        assert caught.value.type == "invalid_request_error"
        with pytest.raises(openai.UnprocessableEntityError, match="quality"):
            client.images.generate(prompt="x", extra_body={"quality": "ultra"})

        refused = {
            "background": {"background": "transparent"},
            "output_format": {"output_format": "gif"},
            "style": {"style": "vivid"},
            "quality": {"quality": "hd"},
            "n": {"n": 0},
            "response_format": {"response_format": "url"},
            "model": {"model": "dall-e-3"},
        }
        for param, fields in refused.items():
            with pytest.raises(openai.BadRequestError) as caught:
                client.images.generate(prompt="x", **fields)
            err = caught.value
            assert err.param == param and err.type == "invalid_request_error", (param, err.body)
            assert err.response.headers["x-should-retry"] == "false"
            assert err.body["request_id"] == err.response.headers["x-request-id"]

        hook.delay = 0.2  # warm-up measured fast steps, so the request is admitted; its deadline then passes
        with pytest.raises(openai.InternalServerError) as caught:
            client.images.generate(prompt="slow", extra_body={"steps": 12, "timeout": 0.6})
        assert caught.value.status_code == 504 and caught.value.code == "deadline_exceeded"
        assert caught.value.type == "server_error" and caught.value.body["request_id"]
        assert requests_seen(url, 504) == 1  # the SDK did not retry (x-should-retry: false)
        hook.delay = 0.0

        with pytest.raises(openai.InternalServerError) as caught:
            client.images.generate(prompt="too big", extra_body={"steps": 2})
        assert caught.value.status_code == 500 and caught.value.code == "out_of_memory"
        assert requests_seen(url, 500) == 1


@pytest.mark.parametrize("field", ["user", "safety_identifier"])
def test_an_end_user_id_that_is_not_unicode_is_refused_before_generating(pipe, field):
    """JSON may carry a lone surrogate (``\\ud800``); the id is echoed in the response, which UTF-8 cannot
    hold: a 400 naming the field, not a 500 after the image was drawn."""
    body = b'{"prompt": "a blue square", "steps": 2, "%s": "id \\ud800"}' % field.encode()
    with live_server(pipe) as (url, app):
        r = httpx.post(
            f"{url}/v1/images/generations",
            content=body,
            headers={"Content-Type": "application/json"},
            timeout=60,
        )
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "invalid_encoding" and err["param"] == field
        assert field in err["message"] and "U+D800" in err["message"]
        assert requests_seen(url, 500) == 0
