"""Full-size presets built on the meta device match the official checkpoints' key lists exactly."""

from __future__ import annotations

import json

import pytest

from dcar.cli.main import main
from dcar.model.config import preset
from dcar.model.inspect import build_on_meta, preset_entries


def read_tsv(path):
    rows = [line.rstrip("\n").split("\t") for line in path.read_text().splitlines()]
    assert rows[0][:2] == ["name", "shape"]
    return rows[1:]


@pytest.mark.parametrize("name", ["dc-ht", "dc-ar-512"])
def test_state_dict_equals_official_key_list(keys_dir, name):
    expected = [(r[0], r[1]) for r in read_tsv(keys_dir / f"{name}.tsv")]
    ours = preset_entries(name)
    assert {k for k, _ in ours} == {k for k, _ in expected}, "key sets differ"
    assert ours == expected  # same shapes, and the same order as the official state_dict()


@pytest.mark.parametrize("name", ["dc-ht", "dc-ar-512"])
def test_parameter_kinds_match(keys_dir, name):
    module = build_on_meta(preset(name))
    params = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    for key, _, kind, _ in read_tsv(keys_dir / f"{name}.tsv"):
        if kind.startswith("parameter"):
            assert key in params, key
            assert params[key].requires_grad == (kind == "parameter"), key
        else:
            assert key in buffers, key


def _count(module, prefix=""):
    return sum(p.numel() for n, p in module.named_parameters() if n.startswith(prefix))


def test_dc_ht_parameter_counts(keys_dir):
    ref = json.loads((keys_dir / "param-counts.json").read_text())["dc-ht"]
    m = build_on_meta(preset("dc-ht"))
    assert _count(m) == ref["total"]
    assert _count(m, "encoder.") == ref["encoder"]
    assert _count(m, "decoder.") == ref["decoder"]
    assert _count(m, "quantize.") == ref["quantizer"]
    for side in ("encoder", "decoder"):
        for i in range(6):
            assert _count(m, f"{side}.stages.{i}.") == ref[f"{side}_stage{i}"], (side, i)
        for part in ("project_in", "project_out"):
            assert _count(m, f"{side}.{part}.") == ref[f"{side}_{part}"]
    assert sum(b.numel() for b in m.buffers()) == ref["buffers_numel"]


def test_dc_ar_parameter_counts(keys_dir):
    ref = json.loads((keys_dir / "param-counts.json").read_text())["dc-ar-512"]
    m = build_on_meta(preset("dc-ar-512"))
    assert _count(m) == ref["total_parameters"]
    assert sum(v.numel() for v in m.state_dict().values()) == ref["total_state_dict_numel"]
    assert _count(m, "blocks.") == ref["blocks_total"]
    assert _count(m, "blocks.0.") == ref["per_block"]
    assert _count(m, "blocks.0.attn.") == ref["per_block_self_attn"]
    assert _count(m, "blocks.0.cross_attn.") == ref["per_block_cross_attn"]
    assert _count(m, "blocks.0.mlp.") == ref["per_block_mlp"]
    assert _count(m, "diffloss.net.") == ref["diffloss_net"]
    assert _count(m) - _count(m, "diffloss.") == ref["transformer_without_diffhead"]
    assert _count(m, "final_layer.") == ref["final_layer"]


@pytest.mark.parametrize("name", ["dc-ht", "dc-ar-512"])
def test_inspect_preset_prints_the_key_list(keys_dir, capsys, name):
    assert main(["inspect", "--preset", name]) == 0
    out = capsys.readouterr().out.splitlines()
    expected = [
        "\t".join(line.split("\t")[:2]) for line in (keys_dir / f"{name}.tsv").read_text().splitlines()
    ]
    assert out == expected
