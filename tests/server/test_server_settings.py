"""Settings from the environment (prefix DCAR_) and their validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from dcar.model.loading import parse_dtype
from dcar.server.settings import DEFAULT_WEIGHTS, DTYPES, Settings, parse_size


def test_defaults_point_at_the_embedded_weights():
    s = Settings()
    assert s.weights == str(DEFAULT_WEIGHTS) and (DEFAULT_WEIGHTS / "model_index.json").is_file()
    assert (s.host, s.port, s.api_keys, s.allowed_sizes) == ("127.0.0.1", 8000, [], [])


def test_environment_lists_and_numbers(monkeypatch):
    monkeypatch.setenv("DCAR_API_KEYS", "first-key-123, second-key-456")
    monkeypatch.setenv("DCAR_ALLOWED_SIZES", '["512x512", "256X512"]')
    monkeypatch.setenv("DCAR_MAX_BATCH_SIZE", "32")
    monkeypatch.setenv("DCAR_WEIGHTS", "preset:tiny")
    s = Settings()
    assert s.api_keys == ["first-key-123", "second-key-456"]
    assert s.allowed_sizes == ["512x512", "256x512"]
    assert s.max_batch_size == 32 and s.weights == "preset:tiny"


@pytest.mark.parametrize(
    "field,value,text",
    [
        ("max_batch_size", 0, "max_batch_size"),
        ("allowed_sizes", "512*512", "WIDTHxHEIGHT"),
        ("api_keys", "short", "at least 8"),
        ("weights", "preset:", "preset name"),
        ("weights", "preset:nope", "unknown pipeline preset 'nope'"),
        ("max_queue", 2, "max_queue=2 is below max_n=8"),
        ("unknown_knob", 1, "unknown_knob"),
        ("dtype", "float8", "dtype 'float8' is not supported; expected one of float32, fp32, float16"),
    ],
)
def test_invalid_settings_name_the_field(field, value, text):
    with pytest.raises(ValidationError, match=text):
        Settings(**{field: value})


def test_the_dtypes_settings_accept_are_the_ones_the_loader_reads():
    """The settings check dtype without importing torch; the two lists must not drift apart."""
    for name in (*DTYPES, "float8", "half", "FP16", "int8", "float64"):
        try:
            parse_dtype(name)
        except ValueError:
            with pytest.raises(ValidationError, match="dtype"):
                Settings(dtype=name)
        else:
            assert Settings(dtype=name).dtype == name


def test_parse_size():
    """One grammar for settings, the HTTP size field and the CLI's --size: WIDTHxHEIGHT or one side."""
    assert parse_size(" 512x256 ") == (512, 256)
    assert parse_size("256") == (256, 256)
    assert Settings(allowed_sizes="256, 512x256").allowed_sizes == ["256x256", "512x256"]
    for bad in ("512*256", "0x512", "x512", "512x", "-512", ""):
        with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
            parse_size(bad)


def test_every_setting_is_documented_in_docs_serving():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "serving.md").read_text()
    missing = [name for name in Settings.model_fields if f"`DCAR_{name.upper()}`" not in doc]
    assert not missing, f"docs/serving.md does not document {missing}"
