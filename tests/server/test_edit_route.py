"""/v1/edit and /v1/images/edits: both body kinds, the mask conventions and the token-patch rule."""

from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
import pytest
from PIL import Image
from server_harness import decode, png_bytes, same_image, serve

pytestmark = pytest.mark.anyio

STRIPES = np.zeros((128, 128, 3), np.uint8)
STRIPES[:, ::8] = (250, 200, 20)
STRIPES[::16, :] = (20, 60, 240)
IMAGE = png_bytes(Image.fromarray(STRIPES))


def mask(box=None, pixel=None, mode="L") -> bytes:
    """White = regenerate; ``box`` (x0, y0, x1, y1) or a single ``pixel`` (x, y)."""
    m = Image.new(mode, (128, 128), 0)
    if box is not None:
        m.paste(255, box)
    if pixel is not None:
        m.putpixel(pixel, 255)
    return png_bytes(m)


async def edit(client, mask_bytes: bytes, **fields):
    data = {"prompt": "a yellow star", "seed": "9", "steps": "4", **{k: str(v) for k, v in fields.items()}}
    r = await client.post(
        "/v1/edit",
        data=data,
        files={"image": ("in.png", IMAGE, "image/png"), "mask": ("mask.png", mask_bytes, "image/png")},
    )
    assert r.status_code == 200, r.text
    return decode(r.json()["images"][0]["b64_json"])


async def test_pixels_outside_the_mask_are_kept(pipe):
    async with serve(pipe) as client:
        out = await edit(client, mask(box=(32, 32, 96, 96)))
        outside = np.ones((128, 128), bool)
        outside[32:96, 32:96] = False
        assert np.array_equal(out[outside], STRIPES[outside])
        assert not np.array_equal(out[32:96, 32:96], STRIPES[32:96, 32:96])


async def test_a_token_is_regenerated_when_any_pixel_of_its_patch_is_marked(pipe):
    async with serve(pipe) as client:
        one_pixel = await edit(client, mask(pixel=(40, 70)), blend="false")  # patch (row 2, col 1)
        whole_patch = await edit(client, mask(box=(32, 64, 64, 96)), blend="false")
        nothing = await edit(client, mask(), blend="false")
        assert same_image(one_pixel, whole_patch)
        assert not same_image(one_pixel, nothing)


async def test_json_edit_with_base64_and_data_url_equals_multipart(pipe):
    m = mask(box=(0, 0, 64, 64))
    async with serve(pipe) as client:
        multipart = await edit(client, m)
        body = {
            "prompt": "a yellow star",
            "seed": 9,
            "steps": 4,
            "image": "data:image/png;base64," + base64.b64encode(IMAGE).decode(),
            "mask": base64.b64encode(m).decode(),
        }
        r = await client.post("/v1/edit", json=body)
        assert r.status_code == 200, r.text
        assert same_image(decode(r.json()["images"][0]["b64_json"]), multipart)


async def test_white_on_transparent_mask_marks_only_opaque_white(pipe):
    rgba = Image.new("RGBA", (128, 128), (255, 255, 255, 0))  # white but transparent: not marked
    rgba.paste((255, 255, 255, 255), (0, 0, 64, 64))
    async with serve(pipe) as client:
        assert same_image(await edit(client, png_bytes(rgba)), await edit(client, mask(box=(0, 0, 64, 64))))


async def test_openai_edit_uses_transparent_as_regenerate(pipe):
    openai_mask = Image.new("RGBA", (128, 128), (0, 0, 0, 255))
    openai_mask.paste((0, 0, 0, 0), (0, 0, 64, 64))  # transparent = regenerate
    with_alpha = Image.fromarray(STRIPES).convert("RGBA")
    with_alpha.paste((0, 0, 0, 0), (0, 0, 64, 64))
    async with serve(pipe) as client:
        native = await edit(client, mask(box=(0, 0, 64, 64)))
        fields = {"prompt": "a yellow star", "seed": "9", "steps": "4", "response_format": "b64_json"}
        r = await client.post(
            "/v1/images/edits",
            data=fields,
            files={
                "image": ("in.png", IMAGE, "image/png"),
                "mask": ("mask.png", png_bytes(openai_mask), "image/png"),
            },
        )
        assert r.status_code == 200, r.text
        assert same_image(decode(r.json()["data"][0]["b64_json"]), native)
        # Without a mask, the image's own transparency is the mask (OpenAI's rule); image[] is accepted.
        r = await client.post(
            "/v1/images/edits", data=fields, files={"image[]": ("in.png", png_bytes(with_alpha), "image/png")}
        )
        assert r.status_code == 200, r.text
        out = decode(r.json()["data"][0]["b64_json"])
        assert np.array_equal(out[64:, 64:], STRIPES[64:, 64:])


@pytest.mark.parametrize("route", ["/v1/edit", "/v1/images/edits"])
async def test_both_apis_refuse_a_size_other_than_the_images(pipe, route):
    """One edit check for both APIs: a requested size must be the input's; 'auto' and the input's own pass."""
    if route == "/v1/edit":  # white = regenerate
        the_mask = mask(box=(0, 0, 32, 32))
    else:  # OpenAI: transparent = regenerate
        rgba = Image.new("RGBA", (128, 128), (0, 0, 0, 255))
        rgba.paste((0, 0, 0, 0), (0, 0, 32, 32))
        the_mask = png_bytes(rgba)
    files = {"image": ("in.png", IMAGE, "image/png"), "mask": ("mask.png", the_mask, "image/png")}
    async with serve(pipe, allowed_sizes="128x128,256x256") as client:
        for size, status in (("256x256", 400), ("auto", 200), ("128x128", 200)):
            r = await client.post(route, data={"prompt": "p", "steps": "2", "size": size}, files=files)
            assert r.status_code == status, (size, r.text)
            if status == 400:
                error = r.json()["error"]
                assert error["param"] == "size"
                assert (
                    error["message"]
                    == "size 256x256 differs from the image's 128x128; an edit keeps the input size"
                )


async def test_concurrent_edits_with_one_request_id_each_edit_their_own_image(pipe):
    """The worker caches an edit's prepared input per job; a client's X-Request-Id is not unique, so two
    edits sharing one (retries, a gateway's fixed id) must not share the first one's image and mask."""
    m = mask(box=(0, 0, 64, 64))
    colours = [(200, 30, 30), (30, 200, 30)]

    def post(client, colour):
        image = png_bytes(Image.new("RGB", (128, 128), colour))
        return client.post(
            "/v1/edit",
            data={"prompt": "a yellow star", "seed": "1", "steps": "2"},
            files={"image": ("in.png", image, "image/png"), "mask": ("mask.png", m, "image/png")},
            headers={"X-Request-Id": "one-id"},
        )

    async with serve(pipe, max_batch_size=4, max_wait_ms=1000) as client:  # both admitted in one plan
        responses = await asyncio.gather(*(post(client, c) for c in colours))
    for r, colour in zip(responses, colours):
        assert r.status_code == 200, r.text
        assert tuple(decode(r.json()["images"][0]["b64_json"])[100, 100]) == colour  # outside the mask


def palette_mask(box, inside: tuple[int, int], outside: tuple[int, int]) -> bytes:
    """A palette (mode P) PNG, as image editors save masks: two entries, (grey, alpha) each, ``inside``
    painted in ``box``; an entry with alpha 0 is written to the tRNS chunk."""
    m = Image.new("P", (128, 128), 0)
    m.putpalette([outside[0]] * 3 + [inside[0]] * 3)
    m.paste(1, box)
    return png_bytes_with(m, transparency=bytes([outside[1], inside[1]]))


def png_bytes_with(image: Image.Image, **params) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", **params)
    return out.getvalue()


def rgba_mask(box, inside: tuple[int, int], outside: tuple[int, int]) -> bytes:
    m = Image.new("RGBA", (128, 128), (outside[0],) * 3 + (outside[1],))
    m.paste((inside[0],) * 3 + (inside[1],), box)
    return png_bytes(m)


async def openai_edit(client, files: dict) -> np.ndarray:
    fields = {"prompt": "a yellow star", "seed": "9", "steps": "4"}
    r = await client.post("/v1/images/edits", data=fields, files=files)
    assert r.status_code == 200, r.text
    return decode(r.json()["data"][0]["b64_json"])


async def test_palette_and_other_mask_modes_mark_what_their_rgba_twin_marks(pipe):
    """A palette PNG's transparency lives in its tRNS chunk, not in an A band: the native route counted
    white-but-transparent palette pixels as marked (the whole image regenerated), and the OpenAI route
    refused a palette mask or image ('no alpha channel'). LA and bilevel masks are held to the same rule."""
    box = (0, 0, 64, 64)
    bilevel = Image.new("1", (128, 128), 0)
    bilevel.paste(1, box)
    la = Image.new("LA", (128, 128), (0, 255))
    la.paste((0, 0), box)
    async with serve(pipe) as client:
        # native: white and opaque = regenerate; white but transparent is not marked
        want = await edit(client, rgba_mask(box, inside=(255, 255), outside=(255, 0)))
        assert same_image(await edit(client, palette_mask(box, inside=(255, 255), outside=(255, 0))), want)
        assert same_image(await edit(client, png_bytes(bilevel)), want)
        # OpenAI: transparent = regenerate, as a mask and as the image's own transparency
        want = await openai_edit(
            client,
            {
                "image": ("in.png", IMAGE, "image/png"),
                "mask": ("m.png", rgba_mask(box, inside=(0, 0), outside=(0, 255)), "image/png"),
            },
        )
        for mask_bytes in (palette_mask(box, inside=(0, 0), outside=(0, 255)), png_bytes(la)):
            files = {"image": ("in.png", IMAGE, "image/png"), "mask": ("m.png", mask_bytes, "image/png")}
            assert same_image(await openai_edit(client, files), want)
        palette_image = Image.fromarray(STRIPES).quantize(64)  # a P image, its transparency in tRNS
        transparent = len(palette_image.getpalette()) // 3
        palette_image.putpalette(palette_image.getpalette() + [0, 0, 0])
        palette_image.paste(transparent, box)
        own = await openai_edit(
            client,
            {"image": ("in.png", png_bytes_with(palette_image, transparency=transparent), "image/png")},
        )
        kept = np.ones((128, 128), bool)
        kept[:64, :64] = False
        assert np.array_equal(own[kept], np.asarray(palette_image.convert("RGB"))[kept])


@pytest.mark.parametrize("route", ["/v1/edit", "/v1/images/edits"])
async def test_numbers_in_a_multipart_form_are_text_and_still_read(pipe, route):
    """Every multipart value is a string: refusing JSON's true/false in number fields must not refuse these."""
    if route == "/v1/edit":
        the_mask = mask(box=(0, 0, 32, 32))
    else:
        the_mask = rgba_mask((0, 0, 32, 32), inside=(0, 0), outside=(0, 255))
    fields = {
        "prompt": "p",
        "n": "1",
        "seed": "3",
        "steps": "2",
        "residual_steps": "4",
        "guidance_scale": "1.5",
        "residual_temperature": "0.5",
        "timeout": "60",
        "use_residuals": "true",
    }
    files = {"image": ("in.png", IMAGE, "image/png"), "mask": ("mask.png", the_mask, "image/png")}
    async with serve(pipe) as client:
        r = await client.post(route, data=fields, files=files)
    assert r.status_code == 200, r.text
    assert r.json()["parameters"]["guidance_scale"] == 1.5 and r.json()["parameters"]["residual_steps"] == 4
