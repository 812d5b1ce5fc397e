"""Loading both layouts strictly; every failure names the file and the key."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dcar.model.config import GeneratorConfig, TextEncoderConfig
from dcar.model.inspect import verify_official
from dcar.model.loading import LoadError, read_state_dict
from dcar.model.pipeline import Pipeline
from dcar.model.text_encoder import TextEncoder


class _Payload:
    """Any importable class: weights_only unpickling must refuse to build it."""


@pytest.fixture()
def saved(tiny_pipe, tmp_path):
    path = tmp_path / "tiny"
    tiny_pipe.save_pretrained(path, name="tiny-test")
    return path


def test_our_layout_round_trips(tiny_pipe, saved):
    loaded = Pipeline.from_pretrained(saved)
    assert loaded.name == "tiny-test"
    params = tiny_pipe.params("a red circle", seed=3)
    a, b = tiny_pipe.generate([params])[0], loaded.generate([params])[0]
    assert torch.equal(a.tokens, b.tokens) and (a.image - b.image).abs().max() < 1e-6


def test_missing_weights_file_is_named(saved):
    (saved / "generator" / "model.safetensors").unlink()
    with pytest.raises(LoadError, match=r"generator.*no weights file"):
        Pipeline.from_pretrained(saved)


def test_truncated_file_is_named(saved):
    f = saved / "tokenizer" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(LoadError, match=r"tokenizer/model\.safetensors.*truncated or corrupt"):
        Pipeline.from_pretrained(saved)


def test_wrong_shape_is_named(tiny_pipe, saved):
    f = saved / "generator" / "model.safetensors"
    state = load_file(str(f))
    n = tiny_pipe.config.generator.codebook_size
    state["final_layer.linear.bias"] = torch.zeros(n + 1)
    save_file(state, str(f))
    with pytest.raises(LoadError, match=rf"final_layer\.linear\.bias: file \({n + 1},\) vs model \({n},\)"):
        Pipeline.from_pretrained(saved)


def test_missing_and_unexpected_keys_are_named(saved):
    f = saved / "tokenizer" / "model.safetensors"
    state = load_file(str(f))
    del state["quantize.embedding.weight"]
    state["module.extra"] = torch.zeros(1)
    save_file(state, str(f))
    with pytest.raises(LoadError) as err:
        Pipeline.from_pretrained(saved)
    msg = str(err.value)
    assert "tokenizer/model.safetensors" in msg
    assert "1 missing keys: quantize.embedding.weight" in msg and "1 unexpected keys: module.extra" in msg


def test_pickle_with_objects_is_refused(tmp_path):
    f = tmp_path / "evil.bin"
    torch.save({"weight": torch.zeros(1), "obj": _Payload()}, f)
    with pytest.raises(
        LoadError, match=r"evil\.bin: refused: the pickle holds objects other than plain tensors"
    ):
        read_state_dict(f)


def test_wrapped_state_dict_is_refused(tmp_path):
    f = tmp_path / "wrapped.bin"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, f)
    with pytest.raises(LoadError, match=r"key 'state_dict' holds a dict, not a tensor \(a wrapper"):
        read_state_dict(f)


def test_missing_and_truncated_pickles_are_named(tmp_path):
    with pytest.raises(LoadError, match=r"nope\.bin: file not found"):
        read_state_dict(tmp_path / "nope.bin")
    f = tmp_path / "cut.bin"
    torch.save({"w": torch.zeros(1000)}, f)
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(LoadError, match=r"cut\.bin: not a readable checkpoint"):
        read_state_dict(f)


def test_missing_directory_and_unknown_layout(tmp_path):
    with pytest.raises(LoadError, match="weights directory not found"):
        Pipeline.from_pretrained(tmp_path / "absent")
    with pytest.raises(LoadError, match="neither model_index.json"):
        Pipeline.from_pretrained(tmp_path)


def _official_dir(golden_dir, tmp_path):
    """The golden small models in the official layout: dc-ht/ (config.json + safetensors),
    dc-ar-512/pytorch_model.bin (a bare pickled state dict) and a T5 directory."""
    root = tmp_path / "official"
    cfg = json.loads((golden_dir / "tokenizer_config.json").read_text())
    (root / "dc-ht").mkdir(parents=True)
    (root / "dc-ht" / "config.json").write_text(json.dumps({"model_type": "dc_ht", **cfg["dcht_config"]}))
    shutil.copy(golden_dir / "tokenizer_state_dict.safetensors", root / "dc-ht" / "model.safetensors")
    (root / "dc-ar-512").mkdir()
    torch.save(
        load_file(str(golden_dir / "generator_state_dict.safetensors")),
        root / "dc-ar-512" / "pytorch_model.bin",
    )
    gcfg = GeneratorConfig.from_official(json.loads((golden_dir / "generator_config.json").read_text()))
    # The golden set stubs T5 out; a one-layer byte-level encoder of the generator's caption width stands in.
    text = TextEncoder.from_config(
        TextEncoderConfig(
            tokenizer="byt5",
            max_length=gcfg.text_token_length,
            d_model=gcfg.context_dim,
            num_layers=1,
            num_heads=2,
            d_kv=16,
            d_ff=64,
            vocab_size=384,
        )
    )
    text.save_pretrained(root / "t5-base")
    return root, gcfg, cfg["dc_ae"]


def test_official_layout_loads_and_generates(golden_dir, tmp_path):
    root, gcfg, dc_ae = _official_dir(golden_dir, tmp_path)
    pipe = Pipeline.from_pretrained(root, official_generator=gcfg, official_autoencoder=dc_ae)
    side = gcfg.grid_size * pipe.config.tokenizer.spatial_compression  # the native size of the position table
    assert pipe.config.sampling.size == side
    out = pipe.generate([pipe.params("a prompt", seed=0)])[0]
    assert out.image.shape == (3, side, side)
    assert verify_official(root, generator=gcfg, autoencoder=dc_ae)[0].startswith("ok")


def test_official_layout_is_strict(golden_dir, tmp_path):
    root, gcfg, dc_ae = _official_dir(golden_dir, tmp_path)
    state = torch.load(root / "dc-ar-512" / "pytorch_model.bin", weights_only=True)
    state = {f"module.{k}": v for k, v in state.items()}  # a prefixed checkpoint: every key "missing"
    torch.save(state, root / "dc-ar-512" / "pytorch_model.bin")
    with pytest.raises(
        LoadError, match=r"dc-ar-512/pytorch_model\.bin: does not match the model: \d+ missing keys"
    ):
        Pipeline.from_pretrained(root, official_generator=gcfg, official_autoencoder=dc_ae)
    with pytest.raises(LoadError, match="missing keys"):
        verify_official(root, generator=gcfg, autoencoder=dc_ae)


def test_official_tokenizer_config_must_name_an_f32_model(golden_dir, tmp_path):
    root, gcfg, dc_ae = _official_dir(golden_dir, tmp_path)
    cfg = json.loads((root / "dc-ht" / "config.json").read_text())
    cfg["model_name"] = "dc-ae-f32-proxy-in-1.0"
    (root / "dc-ht" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_name='dc-ae-f32-proxy-in-1.0' is not supported"):
        Pipeline.from_pretrained(root, official_generator=gcfg, official_autoencoder=dc_ae)


def _edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("file", "change", "message"),
    [
        ("generator/config.json", lambda c: c.pop("head"), r"generator/config\.json: missing key 'head'"),
        (
            "generator/config.json",
            lambda c: c.update(hidden_size="64"),
            r"generator/config\.json: hidden_size must be an integer, got '64'",
        ),
        (
            "generator/config.json",
            lambda c: c.update(num_layers=2.5),
            r"generator/config\.json: num_layers must be an integer, got 2\.5",
        ),
        ("generator/config.json", lambda c: c.update(hiden_size=64), r"unknown key 'hiden_size'"),
        (
            "tokenizer/config.json",
            lambda c: c["encoder"].update(width_list=8),
            r"tokenizer/config\.json: encoder\.width_list must be a list of integers, got 8",
        ),
        (
            "model_index.json",
            lambda c: c.pop("generator"),
            r"model_index\.json: generator must name a subfolder",
        ),
        (
            "model_index.json",
            lambda c: c.pop("text_encoder_config"),
            r"model_index\.json: missing key 'text_encoder_config'",
        ),
        (
            "model_index.json",
            lambda c: c["sampling"].update(steps="12"),
            r"model_index\.json: sampling\.steps must be an integer, got '12'",
        ),
    ],
    ids=[
        "missing-head",
        "str-int",
        "float-int",
        "unknown-key",
        "bad-list",
        "no-subfolder",
        "no-t5",
        "str-knob",
    ],
)
def test_a_malformed_config_names_the_file_and_the_key(saved, file, change, message):
    """Was a KeyError, a TypeError ('not all arguments converted during string formatting') or a crash in
    the model's constructor, naming no file; `dcar serve` and `dcar generate` showed it as a traceback."""
    _edit_json(saved / file, change)
    with pytest.raises(LoadError, match=message):
        Pipeline.from_pretrained(saved)


def test_a_config_that_is_not_an_object_is_named(saved):
    (saved / "generator" / "config.json").write_text("[1, 2]")
    with pytest.raises(LoadError, match=r"generator/config\.json: expected a JSON object, found list"):
        Pipeline.from_pretrained(saved)


def test_a_truncated_or_missing_text_encoder_is_named(saved):
    f = saved / "text_encoder" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(LoadError, match=r"text_encoder: not loadable \(truncated or corrupt\?\)"):
        Pipeline.from_pretrained(saved)
    shutil.rmtree(saved / "text_encoder")
    with pytest.raises(LoadError, match=r"text_encoder has no config\.json"):
        Pipeline.from_pretrained(saved)


def test_a_text_encoder_missing_a_weight_is_refused_not_filled_at_random(saved):
    """transformers fills a key its file lacks with random values and only logs it; the pipeline then
    encoded every prompt with a random layer. The refusal names the directory and the key."""
    f = saved / "text_encoder" / "model.safetensors"
    state = load_file(str(f))
    dropped = next(k for k in state if k.endswith("SelfAttention.q.weight"))
    del state[dropped]
    save_file(state, str(f), metadata={"format": "pt"})
    with pytest.raises(LoadError, match=rf"text_encoder: its weights lack 1 keys of the model: {dropped}"):
        Pipeline.from_pretrained(saved)


def test_a_whole_t5_checkpoint_loads_into_the_text_encoder(saved):
    """The official text encoder comes from a whole T5 (encoder, decoder, lm_head, and the input embedding
    saved as encoder.embed_tokens.weight beside shared.weight): its extra keys are not a refusal, and the
    embedding, tied to shared.weight, is not reported missing."""
    f = saved / "text_encoder" / "model.safetensors"
    state = load_file(str(f))
    before = TextEncoder.from_pretrained(saved / "text_encoder", max_length=16)
    state["encoder.embed_tokens.weight"] = state["shared.weight"].clone()
    state["lm_head.weight"] = torch.zeros_like(state["shared.weight"])
    state["decoder.final_layer_norm.weight"] = torch.ones(state["shared.weight"].shape[1])
    save_file(state, str(f), metadata={"format": "pt"})
    after = TextEncoder.from_pretrained(saved / "text_encoder", max_length=16)
    a, _ = before(["a red circle"])
    b, _ = after(["a red circle"])
    assert torch.equal(a, b)
