"""OpenAI Images API shapes: the requests of ``images.generate`` / ``images.edit`` and what comes back.

Every field of the openai SDK's ``ImageGenerateParams`` / ``ImageEditParams`` is declared, with OpenAI's
own value sets, so a value outside them is a 422 naming the field and a field that exists nowhere (a typo
in ``extra_body``) is a 422 too (``extra="forbid"``). Values OpenAI defines but this model cannot honour
(``background: transparent``, GIF or SVG output, ``style``, ...) are refused with a 400 that says why
(server/routes_openai.py). dcar's sampling knobs (``seed``, ``steps``, ...) are extensions, sent through the
SDK's ``extra_body``. Responses and stream events follow the SDK's ``ImagesResponse``,
``ImageGenPartialImageEvent`` / ``ImageGenCompletedEvent`` (and the ``image_edit.*`` twins), plus dcar's
provenance fields, which the SDK keeps as extras.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dcar.server.schemas import Integer, Number, SamplingFields

OpenAIQuality = Literal["auto", "low", "medium", "high", "xhigh", "max", "standard", "hd"]
Quality = Literal["low", "medium", "high"]
OpenAIOutputFormat = Literal["png", "jpeg", "webp", "gif", "svg"]

# quality -> (unmasking steps, diffusion-head steps), each capped at the model's own default. "high" and
# "auto" are the model's defaults (the official recipe: 12 and 32). A request's own steps/residual_steps win.
QUALITY_PRESETS: dict[str, tuple[int, int] | None] = {"low": (4, 8), "medium": (8, 16), "high": None}


class OpenAIImageRequest(SamplingFields):
    """POST /v1/images/generations (JSON) and the text fields of /v1/images/edits (multipart)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = Field(None, description="the served model's id, 'dcar', or a DCAR_MODEL_ALIASES name")
    n: Integer = Field(1, description="images to generate (1..max_n)")
    size: str | None = Field(
        None, description="WIDTHxHEIGHT, one of the allowed sizes; auto: the native size"
    )
    quality: OpenAIQuality | None = Field(
        None, description="low, medium, high (step presets) or auto (= high)"
    )
    background: Literal["transparent", "opaque", "auto"] | None = Field(
        None, description="opaque or auto; transparent is refused (the model draws opaque RGB)"
    )
    moderation: Literal["low", "auto"] | None = Field(
        None, description="accepted; this server filters nothing"
    )
    output_format: OpenAIOutputFormat | None = Field(None, description="png, jpeg or webp (gif, svg refused)")
    output_compression: Integer | None = Field(None, description="0..100: JPEG/WebP quality")
    response_format: Literal["url", "b64_json"] | None = Field(None, description="b64_json only")
    stream: bool | None = Field(None, description="Server-Sent Events: partial images, then the images")
    partial_images: Integer | None = Field(None, description="0..3 partial images per image, with stream")
    user: str | None = Field(None, description="end-user id: logged, echoed as safety_identifier")
    safety_identifier: str | None = Field(None, description="end-user id; wins over user")
    style: Literal["vivid", "natural"] | None = Field(None, description="refused (DALL-E 3 only)")
    complexity: Literal["low", "medium", "high"] | None = Field(None, description="refused")
    frame_count: Integer | None = Field(None, description="refused (GIF output only)")
    frame_duration_ms: Integer | None = Field(None, description="refused (GIF output only)")
    svg: dict | None = Field(None, description="refused (SVG output only)")
    # extensions: the sampling knobs of /v1/generate come from SamplingFields (server/schemas.py)
    seed: Integer | None = None
    timeout: Number | None = None
    priority: Integer | None = None

    @field_validator("n", mode="before")
    @classmethod
    def _n(cls, value):
        return 1 if value is None else value  # OpenAI accepts n: null


class OpenAIEditFields(OpenAIImageRequest):
    """The text fields of POST /v1/images/edits (files ``image``/``image[]`` and ``mask`` come beside them)."""

    input_fidelity: Literal["high", "low"] | None = Field(
        None, description="accepted: unmasked pixels are always kept exactly"
    )


# --- responses -----------------------------------------------------------------------------------------


class TokenDetails(BaseModel):
    image_tokens: int
    text_tokens: int


class Usage(BaseModel):
    """Tokens as OpenAI counts them: input = prompt tokens (+ the edited image's tokens), output = image tokens."""

    input_tokens: int
    input_tokens_details: TokenDetails
    output_tokens: int
    output_tokens_details: TokenDetails
    total_tokens: int


class OpenAIImage(BaseModel):
    b64_json: str
    revised_prompt: str | None = None
    seed: int = Field(description="dcar extension: this image's seed")


class OpenAIImagesResponse(BaseModel):
    created: int
    data: list[OpenAIImage]
    background: Literal["opaque"] = "opaque"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    quality: Quality
    size: str
    usage: Usage
    safety_identifier: str | None = None
    # dcar extensions: provenance
    model: str
    parameters: dict = Field(description="every resolved sampling parameter but the per-image seed")
    weights_digest: str


class PartialImageEvent(BaseModel):
    """``image_generation.partial_image`` / ``image_edit.partial_image``."""

    type: Literal["image_generation.partial_image", "image_edit.partial_image"]
    b64_json: str
    background: Literal["opaque"] = "opaque"
    created_at: int
    output_format: Literal["png", "jpeg", "webp"]
    partial_image_index: int
    quality: Quality
    size: str


class CompletedEvent(BaseModel):
    """``image_generation.completed`` / ``image_edit.completed``: one per image, usage of that image."""

    type: Literal["image_generation.completed", "image_edit.completed"]
    b64_json: str
    background: Literal["opaque"] = "opaque"
    created_at: int
    output_format: Literal["png", "jpeg", "webp"]
    quality: Quality
    size: str
    usage: Usage
    safety_identifier: str | None = None
    # dcar extensions: provenance
    seed: int
    model: str
    parameters: dict
    weights_digest: str
