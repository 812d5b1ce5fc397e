"""The dcar command-line entry points, run in-process through ``server.cli.main``."""

from __future__ import annotations

import pytest
from PIL import Image

from dcar.cli.main import main


def test_generate_writes_a_png_of_the_requested_size(tmp_path, capsys):
    out = tmp_path / "out.png"
    assert main(["generate", "a red circle", "--weights", "preset:tiny", "-o", str(out), "--seed", "3",
                 "--size", "96x64", "--steps", "6"]) == 0
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (96, 64) and img.mode == "RGB"
    assert "seed 3" in capsys.readouterr().out


def test_generate_n_images_numbers_the_files(tmp_path):
    assert main(["generate", "x", "--weights", "preset:tiny", "-o", str(tmp_path / "a.png"), "-n", "2"]) == 0
    assert (tmp_path / "a-0.png").is_file() and (tmp_path / "a-1.png").is_file()


def test_edit_keeps_unmasked_pixels(tmp_path):
    src, mask, out = tmp_path / "in.png", tmp_path / "mask.png", tmp_path / "out.png"
    main(["generate", "x", "--weights", "preset:tiny", "-o", str(src)])
    m = Image.new("L", (128, 128), 0)
    m.paste(255, (0, 0, 64, 128))
    m.save(mask)
    assert main(["edit", "--image", str(src), "--mask", str(mask), "y", "--weights", "preset:tiny",
                 "-o", str(out), "--seed", "9"]) == 0
    a, b = Image.open(src), Image.open(out)
    assert a.crop((64, 0, 128, 128)).tobytes() == b.crop((64, 0, 128, 128)).tobytes()


def test_inspect_a_saved_directory(tiny_pipe, tmp_path, capsys):
    tiny_pipe.save_pretrained(tmp_path / "w")
    assert main(["inspect", str(tmp_path / "w" / "generator" / "model.safetensors")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "name\tshape" and "pos_embed\t1x16x64" in lines


def test_inspect_a_bad_file_exits_with_the_reason(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match=r"x\.safetensors: not a readable safetensors file"):
        main(["inspect", str(bad)])


def test_fetch_weights_verify_only_reports_what_is_missing(tmp_path):
    (tmp_path / "dc-ht").mkdir()
    with pytest.raises(SystemExit, match="verification failed"):
        main(["fetch-weights", str(tmp_path), "--verify-only"])
