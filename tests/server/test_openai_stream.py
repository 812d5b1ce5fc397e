"""OpenAI streaming with the unmodified ``openai`` SDK against a live uvicorn: ``stream=True`` with
``partial_images`` gives ``image_generation.partial_image`` events (decodes of the token map at evenly
spaced unmasking steps) and then ``image_generation.completed``; edits give the ``image_edit.*`` twins."""

from __future__ import annotations

import base64
import io
import time

import httpx
import numpy as np
import openai
import pytest
from openai.types import ImageEditCompletedEvent, ImageGenCompletedEvent, ImageGenPartialImageEvent
from PIL import Image
from server_harness import StepHook, decode, live_server, png_bytes, same_image
from test_stream import parse_sse

KEY = "sk-stream-test-key"


def native_previews(url: str, request: dict) -> dict[int, np.ndarray]:
    """step -> the native SSE preview of image 0 (full size: the tests serve with preview_size=128)."""
    r = httpx.post(
        f"{url}/v1/generate",
        json={**request, "stream": True, "preview": True},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    return {
        d["step"]: decode(d["preview"]) for k, d in parse_sse(r.text) if k == "progress" and d["index"] == 0
    }


def test_generate_streams_partial_images_at_evenly_spaced_steps(pipe):
    with live_server(pipe, api_keys=KEY, preview_size=128) as (url, app):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
        stream = client.images.generate(
            prompt="a red circle",
            stream=True,
            partial_images=2,
            size="128x128",
            quality="high",
            extra_body={"seed": 11, "steps": 12},
        )
        events = list(stream)
        assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + [
            "image_generation.completed"
        ]
        partials, done = events[:2], events[2]
        assert all(isinstance(e, ImageGenPartialImageEvent) for e in partials)
        assert isinstance(done, ImageGenCompletedEvent)
        assert [e.partial_image_index for e in partials] == [0, 1]
        for e in events:
            assert (e.size, e.quality, e.background, e.output_format) == ("128x128", "high", "opaque", "png")
            assert e.created_at > 0

        # 12 steps, 2 partial images: steps 4 and 8, the same decodes the native stream previews
        previews = native_previews(url, {"prompt": "a red circle", "seed": 11, "steps": 12})
        for e, step in zip(partials, (4, 8)):
            image = decode(e.b64_json)
            assert image.shape == (128, 128, 3)
            assert same_image(image, previews[step])
            assert not same_image(image, previews[step + 1])  # a different step would not match

        plain = client.images.generate(
            prompt="a red circle", size="128x128", extra_body={"seed": 11, "steps": 12}
        )
        assert same_image(decode(done.b64_json), decode(plain.data[0].b64_json))
        assert done.usage.output_tokens == 16 and done.usage.input_tokens == plain.usage.input_tokens > 0
        assert done.usage.total_tokens == done.usage.input_tokens + 16


def test_stream_options_several_images_formats_and_errors(pipe, monkeypatch):
    with live_server(pipe, api_keys=KEY, preview_size=128) as (url, app):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
        # partial_images=0: one completed event per image, nothing else
        events = list(
            client.images.generate(
                prompt="two", n=2, stream=True, partial_images=0, extra_body={"seed": 3, "steps": 4}
            )
        )
        assert [e.type for e in events] == ["image_generation.completed"] * 2
        assert not same_image(decode(events[0].b64_json), decode(events[1].b64_json))  # seeds 3 and 4

        # n=2, 3 partial images of 6 steps (at steps 2, 3 and 5): each index for image 0, then image 1
        events = list(
            client.images.generate(
                prompt="two",
                n=2,
                stream=True,
                partial_images=3,
                output_format="jpeg",
                output_compression=80,
                extra_body={"seed": 3, "steps": 6},
            )
        )
        kinds = [e.type for e in events]
        assert kinds == ["image_generation.partial_image"] * 6 + ["image_generation.completed"] * 2
        assert [e.partial_image_index for e in events[:6]] == [0, 0, 1, 1, 2, 2]
        for e in events:
            assert e.output_format == "jpeg"
            assert Image.open(io.BytesIO(base64.b64decode(e.b64_json))).format == "JPEG"

        # a failure mid-stream arrives as an error event, which the SDK raises
        def explode(state):
            if state.rows[0].params.prompt == "fragile" and state.rows[0].step == 2:
                raise RuntimeError("broke at step 3")

        StepHook(pipe, monkeypatch, fail=explode)
        with pytest.raises(openai.APIError, match="broke at step 3") as caught:
            list(
                client.images.generate(
                    prompt="fragile", stream=True, partial_images=1, extra_body={"steps": 6}
                )
            )
        assert caught.value.body["code"] == "internal_error" and caught.value.body["type"] == "server_error"

        with pytest.raises(openai.BadRequestError, match="partial_images") as caught:
            client.images.generate(prompt="x", partial_images=2)  # without stream: refused, not ignored
        assert caught.value.param == "partial_images"
        with pytest.raises(openai.BadRequestError, match="partial_images"):
            client.images.generate(prompt="x", stream=True, partial_images=4)


def test_edit_streams_image_edit_events(pipe):
    source = np.zeros((128, 128, 3), np.uint8)
    source[:, 64:] = (30, 200, 90)
    mask = Image.new("RGBA", (128, 128), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 64, 64))  # transparent = regenerate
    with live_server(pipe, api_keys=KEY) as (url, app):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
        events = list(
            client.images.edit(
                image=("image.png", png_bytes(Image.fromarray(source)), "image/png"),
                mask=("mask.png", png_bytes(mask), "image/png"),
                prompt="a blue square",
                stream=True,
                partial_images=1,
                extra_body={"seed": 5, "steps": 4},
            )
        )
        assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
        assert isinstance(events[1], ImageEditCompletedEvent)
        out = decode(events[1].b64_json)
        assert np.array_equal(out[64:, :], source[64:, :])  # outside the transparent area: kept
        assert events[1].usage.input_tokens_details.image_tokens == 16  # the edited image's tokens


def test_a_running_stream_without_partial_images_still_sends_keep_alive_comments(pipe, monkeypatch):
    """Progress of steps that carry no partial image is not sent; the connection must not fall silent for
    longer than sse_keepalive_s meanwhile, or a proxy's idle timeout cuts a long generation."""
    hook = StepHook(pipe, monkeypatch)
    with live_server(pipe, max_wait_ms=0, sse_keepalive_s=0.2) as (url, app):
        hook.delay = 0.1  # 20 steps of 0.1 s: about 2 s of unmasking, with a progress event at each step
        request = {"prompt": "quiet", "steps": 20, "stream": True}
        with httpx.stream("POST", f"{url}/v1/images/generations", json=request, timeout=60) as r:
            arrivals, lines = [time.monotonic()], []
            for line in r.iter_lines():
                arrivals.append(time.monotonic())
                lines.append(line)
        assert lines[-2].startswith("data: ") and "image_generation.completed" in lines[-3]
        assert lines.count(": keep-alive") >= 4
        gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
        assert max(gaps) < 1.0, gaps  # not 2 s of silence
