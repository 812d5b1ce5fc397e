"""The Python API refuses, before any work and with an error naming what is wrong, what it would misuse.

Each case here once ran: silently (rows dropped, an edit laid out in the wrong grid, pixels far outside
[0, 1]) or into an error from deep inside torch that named no argument.
"""

from __future__ import annotations

import pytest
import torch

from dcar.model.loading import find_weights, read_state_dict
from dcar.model.pipeline import Pipeline

SIDE = 64  # 2x2 tokens of the tiny preset: nothing here needs more


def _params(pipe, **kw):
    return pipe.params(
        "a red circle", **{"steps": 1, "residual_steps": 1, "height": SIDE, "width": SIDE, **kw}
    )


def test_edits_or_tags_of_another_length_than_the_rows_are_refused(tiny_pipe):
    """zip() dropped the rows past the shorter list: two params and one edit gave one image."""
    rows = [_params(tiny_pipe, seed=0), _params(tiny_pipe, seed=1)]
    with pytest.raises(ValueError, match="edits has 1 entries for 2 rows"):
        tiny_pipe.generate(rows, [None])
    with pytest.raises(ValueError, match="tags has 3 entries for 2 rows"):
        tiny_pipe.sampler.start(rows, tags=["a", "b", "c"])


@pytest.mark.parametrize(
    "params,error,text",
    [
        ("one", TypeError, "params must be a list of SamplingParams .*got SamplingParams"),
        ("str", TypeError, r"params\[0\] must be a SamplingParams .*got str"),
        ("empty", ValueError, "params is empty"),
    ],
)
def test_generate_says_what_it_got_instead_of_a_list_of_params(tiny_pipe, params, error, text):
    """A lone SamplingParams failed with "has no len()", a list of prompts with an AttributeError."""
    given = {"one": _params(tiny_pipe), "str": ["a red circle"], "empty": []}[params]
    with pytest.raises(error, match=text):
        tiny_pipe.generate(given)


@pytest.mark.parametrize("blend", [True, False])
def test_an_edit_of_another_grid_with_as_many_tokens_is_refused_before_sampling(tiny_pipe, blend):
    """A 64 wide x 96 high edit on a 96x64 row has 6 tokens either way: it passed the token count, then
    the blend failed after every step (blend on) or the tokens were silently laid out 3x2 (blend off)."""
    image = torch.zeros(3, 96, 64)
    edit = tiny_pipe.prepare_edit(image, torch.ones(1, 96, 64), blend=blend)
    row = _params(tiny_pipe, height=64, width=96)
    with pytest.raises(ValueError, match=r"edits\[0\] was prepared from a 64x96 image, but its row is 96x64"):
        tiny_pipe.generate([row], [edit])


@pytest.mark.parametrize(
    "image,mask,error,text",
    [
        # a 0/255 mask blended as 255 * generated - 254 * input: pixels from -253 to 222
        (None, torch.full((1, SIDE, SIDE), 255.0), ValueError, r"mask tensor values must lie in \[0, 1\]"),
        (None, torch.ones(3, SIDE, SIDE), ValueError, r"mask tensor must have shape \(H, W\) or \(1, H, W\)"),
        (torch.zeros(3, SIDE, SIDE, dtype=torch.uint8), None, ValueError, "must hold floats in .*uint8"),
        (torch.full((3, SIDE, SIDE), 2.0), None, ValueError, r"image tensor values must lie in \[-1, 1\]"),
        (torch.zeros(1, 3, SIDE, SIDE), None, ValueError, r"image tensor must have shape \(3, H, W\)"),
        ("in.png", None, TypeError, "image must be a PIL image or a tensor"),
    ],
)
def test_prepare_edit_refuses_tensors_it_would_misread(tiny_pipe, image, mask, error, text):
    image = torch.zeros(3, SIDE, SIDE) if image is None else image
    mask = torch.ones(1, SIDE, SIDE) if mask is None else mask
    with pytest.raises(error, match=text):
        tiny_pipe.prepare_edit(image, mask)


def test_a_soft_or_two_dimensional_tensor_mask_is_taken(tiny_pipe):
    """What the checks above let through: a soft mask in [0, 1] and a (H, W) one."""
    image = torch.zeros(3, SIDE, SIDE)
    edit = tiny_pipe.prepare_edit(image, torch.full((SIDE, SIDE), 0.5))
    assert edit.pixel_mask.shape == (1, SIDE, SIDE) and edit.token_mask.all()


@pytest.mark.parametrize(
    "kwargs,text",
    [
        ({"device": "gpu"}, "device='gpu' is not a device; expected auto, cpu, cuda, cuda:N or mps"),
        ({"dtype": torch.int8}, "dtype=torch.int8 is not supported"),
        ({"dtype": torch.float64}, "dtype=torch.float64 is not supported"),
    ],
)
def test_a_device_or_dtype_it_cannot_use_is_refused_naming_it(kwargs, text):
    """torch answered "gpu" with a RuntimeError listing its internal device types, torch.int8 with a
    TypeError from nn.Module.to; torch.float64 ran although only three dtypes are supported."""
    with pytest.raises(ValueError, match=text):
        Pipeline.load("preset:tiny", **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_refused_and_auto_means_cpu():
    """ "cuda" on a CPU-only torch raised AssertionError("Torch not compiled with CUDA enabled");
    "auto", which the CLI and the server take, was no device at all for Pipeline.load."""
    with pytest.raises(ValueError, match="device='cuda': cuda is not available"):
        Pipeline.load("preset:tiny", device="cuda")
    assert Pipeline.load("preset:tiny", device="auto").device == torch.device("cpu")


def test_save_pretrained_leaves_a_half_precision_pipeline_as_it_was(tmp_path):
    """save_pretrained wrote the text encoder with an in-place .float(): a bfloat16 pipeline went on with
    a float32 T5 after saving, and its caption states (so its images) changed for the same seed."""
    pipe = Pipeline.load("preset:tiny", dtype="bfloat16")
    before = pipe.text_encoder(["a red circle"])[0]
    pipe.save_pretrained(tmp_path / "m")
    after = pipe.text_encoder(["a red circle"])[0]
    assert after.dtype == torch.bfloat16 and torch.equal(before, after)
    saved = read_state_dict(find_weights(tmp_path / "m" / "text_encoder"))
    assert {v.dtype for v in saved.values()} == {torch.float32}  # still written in float32
