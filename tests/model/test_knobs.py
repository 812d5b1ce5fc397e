"""The sampling knobs are defined once (model/knobs.py); every place that takes them derives from that."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from dcar.model.config import SamplingDefaults
from dcar.model.knobs import (
    KNOB_NAMES,
    KNOBS,
    KnobError,
    SamplingKnobs,
    check_knobs,
    knob_values,
    parse_knob,
)
from dcar.model.params import SamplingParams
from dcar.model.pipeline import Pipeline


def test_params_and_model_defaults_carry_every_knob_with_the_official_default():
    official = {k.name: k.default for k in KNOBS}
    assert knob_values(SamplingParams("x")) == official
    assert knob_values(SamplingDefaults()) == official
    names = {f.name for f in dataclasses.fields(SamplingParams)}
    assert set(KNOB_NAMES) <= names and names - set(KNOB_NAMES) == {"prompt", "seed", "height", "width"}


def test_a_models_stored_defaults_reach_its_params(tiny_pipe, tmp_path):
    """Every knob a weights directory stores comes back through Pipeline.params; a request's value wins."""
    stored = SamplingDefaults(
        steps=5,
        guidance_scale=2.0,
        guidance_decay="linear",
        randomize_temperature=0.5,
        softmax_temperature_annealing=False,
        residual_steps=4,
        residual_temperature=0.5,
        use_residuals=False,
        size=tiny_pipe.config.sampling.size,
    )
    assert all(getattr(stored, k.name) != k.default for k in KNOBS)  # each knob really differs
    pipe = Pipeline(
        dataclasses.replace(tiny_pipe.config, sampling=stored),
        tiny_pipe.tokenizer,
        tiny_pipe.generator,
        tiny_pipe.text_encoder,
    )
    pipe.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "model_index.json").read_text())["sampling"] == dataclasses.asdict(
        stored
    )
    loaded = Pipeline.from_pretrained(tmp_path / "m")
    assert knob_values(loaded.params("x")) == knob_values(stored)
    assert loaded.params("x", steps=7).steps == 7


@pytest.mark.parametrize(
    "values,field,text",
    [
        ({"steps": 0}, "steps", "steps must be at least 1, got 0"),
        ({"guidance_scale": -1.0}, "guidance_scale", "at least 0"),
        ({"guidance_scale": math.nan}, "guidance_scale", "guidance_scale must be a finite number, got nan"),
        ({"guidance_scale": math.inf}, "guidance_scale", "guidance_scale must be a finite number, got inf"),
        ({"residual_temperature": -math.inf}, "residual_temperature", "a finite number, got -inf"),
        ({"randomize_temperature": 11.0}, "randomize_temperature", "between 0 and 10, got 11.0"),
        (
            {"guidance_decay": "cosine"},
            "guidance_decay",
            "one of constant, linear, power-cosine; got 'cosine'",
        ),
        ({"use_residuals": 1}, "use_residuals", "true or false"),
        ({"steps": 2.5}, "steps", "an integer"),
        ({"residual_steps": "8"}, "residual_steps", "an integer, got '8'"),
        ({"guidance_scale": "4"}, "guidance_scale", "a number"),
    ],
)
def test_bad_values_name_the_field_and_the_limit(values, field, text):
    with pytest.raises(KnobError, match=text) as err:
        check_knobs(values)
    assert err.value.field == field
    with pytest.raises(KnobError) as err:
        SamplingParams("x", **values)
    assert err.value.field == field


@pytest.mark.parametrize(
    "kwargs,field,text",
    [
        ({"prompt": None}, "prompt", "prompt must be a string, got NoneType"),
        ({"prompt": 5}, "prompt", "prompt must be a string, got int"),
        ({"seed": 1.5}, "seed", "seed must be an integer between 0 and"),
        ({"seed": True}, "seed", "seed must be an integer between 0 and .*, got True"),
        ({"seed": -1}, "seed", "seed must be an integer between 0 and .*, got -1"),
        ({"height": 64.0}, "height", r"height must be a positive integer \(pixels\), got 64.0"),
        ({"width": 0}, "width", "width must be a positive integer"),
        ({"width": False}, "width", "width must be a positive integer"),
    ],
)
def test_pipeline_params_refuse_a_prompt_seed_or_size_of_the_wrong_kind(tiny_pipe, kwargs, field, text):
    """A prompt of 5 and a seed of 1.5 were drawn silently; a height of 64.0 failed deep in torch.full."""
    kwargs = {"prompt": "a red circle", **kwargs}
    prompt = kwargs.pop("prompt")
    with pytest.raises(KnobError, match=text) as err:
        tiny_pipe.params(prompt, **kwargs)
    assert err.value.field == field


def test_numpy_numbers_are_taken_and_every_number_is_stored_as_its_knobs_type(tiny_pipe):
    """A seed or step count drawn with NumPy was refused as "must be an integer, got np.int64(3)";
    steps=2.0 was taken but stayed a float in the params."""
    p = tiny_pipe.params(
        "x",
        seed=np.int64(3),
        steps=2.0,
        residual_steps=np.int32(4),
        guidance_scale=np.float32(2),
        height=np.int64(64),
    )
    got = {k: getattr(p, k) for k in ("seed", "steps", "residual_steps", "guidance_scale", "height")}
    assert got == {"seed": 3, "steps": 2, "residual_steps": 4, "guidance_scale": 2.0, "height": 64}
    assert [type(v) for v in got.values()] == [int, int, int, float, int]


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_an_integer_knob_that_is_not_finite_is_a_knob_error(tiny_pipe, value):
    """int(inf) raised OverflowError and int(nan) a ValueError that named no knob."""
    with pytest.raises(KnobError, match="steps must be a finite number") as err:
        tiny_pipe.params("x", steps=value)
    assert err.value.field == "steps"


def test_knob_text_is_parsed_by_the_knobs_type_then_checked():
    assert parse_knob("steps", "8") == 8 and isinstance(parse_knob("steps", "8"), int)
    assert parse_knob("guidance_scale", " 1.5 ") == 1.5
    assert parse_knob("use_residuals", "Off") is False and parse_knob("use_residuals", "yes") is True
    assert parse_knob("guidance_decay", "linear") == "linear"
    for name, text, words in [
        ("steps", "8.0", "steps must be an integer, got '8.0'"),
        ("steps", "0", "steps must be at least 1, got 0"),
        ("guidance_scale", "strong", "guidance_scale must be a number, got 'strong'"),
        ("guidance_scale", "nan", "guidance_scale must be a finite number, got nan"),
        ("guidance_scale", "inf", "guidance_scale must be a finite number, got inf"),
        ("use_residuals", "maybe", "use_residuals must be true or false, got 'maybe'"),
        ("guidance_decay", "cosine", "guidance_decay must be one of constant, linear, power-cosine"),
    ]:
        with pytest.raises(KnobError, match=words) as err:
            parse_knob(name, text)
        assert err.value.field == name


def test_a_servers_cap_lowers_the_bound():
    check_knobs({"steps": 80})
    with pytest.raises(KnobError, match="steps must be between 1 and 50, got 80"):
        check_knobs({"steps": 80}, caps={"steps": 50})
    with pytest.raises(KnobError, match="between 0 and 2, got 3.0"):
        check_knobs({"randomize_temperature": 3.0}, caps={"randomize_temperature": 2})


def test_every_knob_describes_itself_and_is_keyword_only():
    for k in KNOBS:
        assert k.help and str(k.default).lower() in k.describe().lower(), k.name
    with pytest.raises(TypeError):
        SamplingKnobs(12)  # type: ignore[misc]


def test_http_requests_take_every_knob_with_its_description():
    from dcar.server.schemas import EditFields, GenerateRequest
    from dcar.server.schemas_openai import OpenAIEditFields, OpenAIImageRequest

    for model in (GenerateRequest, EditFields, OpenAIImageRequest, OpenAIEditFields):
        props = model.model_json_schema()["properties"]
        for k in KNOBS:
            assert props[k.name]["description"].startswith(k.help), (model.__name__, k.name)
            assert model.model_fields[k.name].default is None  # unset: the served model's default


def _generate_args(*argv):
    from dcar.cli.main import build_parser

    return build_parser("generate").parse_args(["generate", "a prompt", "--weights", "preset:tiny", *argv])


def test_cli_has_a_flag_for_every_knob_and_passes_each_to_the_params(tiny_pipe):
    from dcar.cli.common import sampling_params

    args = _generate_args(
        "--steps",
        "5",
        "--guidance-scale",
        "2",
        "--guidance-decay",
        "linear",
        "--randomize-temperature",
        "0.5",
        "--no-softmax-temperature-annealing",
        "--residual-steps",
        "4",
        "--residual-temperature",
        "0.5",
        "--no-use-residuals",
        "--size",
        "64",
        "-n",
        "2",
    )
    params = sampling_params(tiny_pipe, args)
    assert [p.seed for p in params] == [0, 1] and (params[0].width, params[0].height) == (64, 64)
    given = {
        "steps": 5,
        "guidance_scale": 2.0,
        "guidance_decay": "linear",
        "randomize_temperature": 0.5,
        "softmax_temperature_annealing": False,
        "residual_steps": 4,
        "residual_temperature": 0.5,
        "use_residuals": False,
    }
    assert set(given) == set(KNOB_NAMES)
    assert knob_values(params[0]) == given
    # unset flags take the model's defaults; the old spellings still work
    assert knob_values(sampling_params(tiny_pipe, _generate_args())[0]) == knob_values(
        tiny_pipe.config.sampling
    )
    old = sampling_params(tiny_pipe, _generate_args("--guidance", "3", "--no-residuals"))[0]
    assert old.guidance_scale == 3.0 and old.use_residuals is False


@pytest.mark.parametrize(
    "argv,text",
    [
        (["--steps", "0"], "argument --steps: steps must be at least 1, got 0"),
        (["--randomize-temperature", "11"], "randomize_temperature must be between 0 and 10, got 11.0"),
        (["--residual-steps", "2.5"], "--residual-steps: residual_steps must be an integer, got '2.5'"),
        (["--guidance-decay", "cosine"], "--guidance-decay: invalid choice: 'cosine'"),
    ],
)
def test_cli_refuses_a_bad_knob_with_one_line_naming_it(argv, text, capsys):
    with pytest.raises(SystemExit) as exit_:
        _generate_args(*argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and text in err[-1], err


def test_every_knob_is_documented_with_its_official_default():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "serving.md").read_text()
    for k in KNOBS:
        default = (
            str(k.default).lower() if k.type is bool else f"`{k.default}`" if k.choices else str(k.default)
        )
        assert f"| `{k.name}` | {default} |" in doc, k.name
