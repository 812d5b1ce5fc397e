"""The dcar command-line entry points, run in-process through ``dcar.cli.main`` (and as a process where the
exit status and stderr are the point)."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys

import pytest
from PIL import Image

import dcar
from dcar.cli.main import COMMANDS, build_parser, main
from dcar.model.pipeline import Pipeline
from dcar.server.settings import Settings


def test_generate_writes_a_png_of_the_requested_size(tmp_path, capsys):
    out = tmp_path / "out.png"
    assert (
        main(
            [
                "generate",
                "a red circle",
                "--weights",
                "preset:tiny",
                "-o",
                str(out),
                "--seed",
                "3",
                "--size",
                "96x64",
                "--steps",
                "6",
            ]
        )
        == 0
    )
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
    assert (
        main(
            [
                "edit",
                "--image",
                str(src),
                "--mask",
                str(mask),
                "y",
                "--weights",
                "preset:tiny",
                "-o",
                str(out),
                "--seed",
                "9",
            ]
        )
        == 0
    )
    a, b = Image.open(src), Image.open(out)
    assert a.crop((64, 0, 128, 128)).tobytes() == b.crop((64, 0, 128, 128)).tobytes()


def test_edit_reads_a_palette_mask_s_transparency(tmp_path):
    """A palette PNG (mode P) keeps its transparency in a tRNS chunk, not in an A band: white-but-transparent
    palette pixels were marked, so the whole image was regenerated; now they are not, as in an RGBA mask."""
    src, mask, out = tmp_path / "in.png", tmp_path / "mask.png", tmp_path / "out.png"
    main(["generate", "x", "--weights", "preset:tiny", "-o", str(src)])
    m = Image.new("P", (128, 128), 0)
    m.putpalette([255, 255, 255] * 2)  # both entries white; entry 0 is transparent
    m.paste(1, (0, 0, 64, 128))
    m.save(mask, transparency=0)
    with Image.open(mask) as saved:
        assert saved.mode == "P" and saved.getbands() == ("P",) and saved.info["transparency"] == 0
    argv = ["edit", "--image", str(src), "--mask", str(mask), "y", "--weights", "preset:tiny"]
    assert main([*argv, "-o", str(out), "--seed", "9"]) == 0
    a, b = Image.open(src), Image.open(out)
    assert a.crop((64, 0, 128, 128)).tobytes() == b.crop((64, 0, 128, 128)).tobytes()
    assert a.crop((0, 0, 64, 128)).tobytes() != b.crop((0, 0, 64, 128)).tobytes()


# --- conventions of every subcommand: --version, defaults and env names in --help, one-line errors ----------

SUBCOMMANDS = [[name] for name in COMMANDS if name != "train"] + [
    ["train", w] for w in ("tokenizer", "generator", "export")
]


def help_text(argv: list[str], capsys, monkeypatch) -> str:
    """``dcar ARGV --help`` as one line per option (a wide terminal, so nothing wraps)."""
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def option_help(text: str, flag: str) -> str:
    """The help block of ``flag`` in a --help text: its line and the indented lines after it, joined."""
    lines = text.splitlines()
    starts = [
        i
        for i, ln in enumerate(lines)
        if ln.strip().startswith((flag + " ", flag + ",")) or ln.strip() == flag
    ]
    assert len(starts) == 1, (flag, starts)
    block = [lines[starts[0]]]
    for ln in lines[starts[0] + 1 :]:
        if not ln.startswith(" " * 6) or ln.strip().startswith("-"):
            break
        block.append(ln)
    return " ".join(" ".join(block).split())


def test_version_prints_the_installed_version():
    out = subprocess.run(
        [sys.executable, "-m", "dcar.cli.main", "--version"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == f"dcar {dcar.__version__}", out
    assert dcar.__version__ == importlib.metadata.version("dcar")


@pytest.mark.parametrize("argv", SUBCOMMANDS, ids=" ".join)
def test_every_option_with_a_default_shows_it(argv, capsys, monkeypatch):
    monkeypatch.delenv("DCAR_DEVICE", raising=False)
    text = help_text(argv, capsys, monkeypatch)
    parser = build_parser(argv[0]).commands[argv[0]]
    if len(argv) > 1:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[
            argv[1]
        ]
    checked = 0
    for action in parser._actions:
        if (
            not action.option_strings
            or action.default in (None, False, argparse.SUPPRESS)
            or action.nargs == 0
        ):
            continue
        line = option_help(text, action.option_strings[0])
        assert "default" in line, f"dcar {' '.join(argv)}: {line!r} does not state its default"
        checked += 1
    if argv[0] in ("generate", "edit", "eval"):
        assert checked >= 2  # at least --weights/--device or --size/--device


def test_serve_help_names_every_variable_and_its_default(capsys, monkeypatch):
    text = help_text(["serve"], capsys, monkeypatch)
    flags = {
        a.dest: a for a in build_parser("serve").commands["serve"]._actions if a.dest in Settings.model_fields
    }
    assert len(flags) >= 14, sorted(flags)
    defaults = Settings.model_construct()  # the built-in defaults, whatever DCAR_* this process has
    for field, action in flags.items():
        line = option_help(text, action.option_strings[0])
        assert f"env DCAR_{field.upper()};" in line, line
        value = getattr(defaults, field)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            assert f"default: {value}]" in line, line
    assert "default: auto]" in option_help(text, "--device")


def test_device_defaults_to_auto_everywhere(monkeypatch):
    monkeypatch.delenv("DCAR_DEVICE", raising=False)
    for argv in (
        ["generate", "x"],
        ["edit", "--image", "a.png", "--mask", "m.png", "x"],
        ["eval", "w"],
        ["train", "tokenizer", "--out", "o"],
        ["train", "generator", "--tokenizer", "t", "--data", "d", "--out", "o"],
    ):
        assert build_parser(argv[0]).parse_args(argv).device == "auto", argv
    assert Settings.model_fields["device"].default == "auto"  # dcar serve
    monkeypatch.setenv("DCAR_DEVICE", "cpu")  # the variable still chooses, as for dcar serve
    assert build_parser("generate").parse_args(["generate", "x"]).device == "cpu"


def test_generate_on_the_default_device(tmp_path, monkeypatch):
    monkeypatch.delenv("DCAR_DEVICE", raising=False)
    assert (
        main(["generate", "x", "--weights", "preset:tiny", "-o", str(tmp_path / "o.png"), "--steps", "2"])
        == 0
    )
    assert (tmp_path / "o.png").is_file()


@pytest.mark.parametrize(
    ("argv", "env", "names"),
    [
        (["serve", "--log-level", "foo"], {}, "--log-level"),
        (["serve"], {"DCAR_LOG_LEVEL": "foo"}, "DCAR_LOG_LEVEL"),
        (["serve", "--max-queue", "2"], {}, "max_queue=2 is below max_n=8"),
        (["serve", "--device", "gpu"], {}, "--device"),
        (["serve", "--port", "http"], {}, "--port"),
        (["serve", "--ray", "--replicas", "0"], {}, "replicas must be at least 1"),
        (["generate", "x", "-n", "0"], {}, "-n: must be at least 1, got 0"),
        (["generate", "x", "--size", "big"], {}, "--size"),
        (["generate", "x", "--dtype", "fp8"], {}, "--dtype"),
        (["edit", "x", "--device", "gpu"], {}, "--device"),
        (["train", "tokenizer", "--out", "o", "--device", "tpu"], {}, "--device"),
        (
            ["train", "tokenizer", "--out", "o", "--draw-workers", "-1"],
            {},
            "--draw-workers: must be at least 0",
        ),
        (
            ["train", "generator", "--tokenizer", "t", "--data", "d", "--out", "o", "--draw-workers", "two"],
            {},
            "--draw-workers: must be a whole number, got 'two'",
        ),
        (["nonsense"], {}, "invalid choice"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_invalid_values_exit_2_with_one_line(argv, env, names, capsys, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert len(err.strip().splitlines()) == 1 and names in err and "error" in err, err


def test_a_bad_log_level_is_one_line_without_traceback():
    """The reported case, end to end: the command's entry point, its own process, its own stderr; refused
    before torch, the app and the model are imported (they took ~9.5 s of a 10 s refusal)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCAR_")}
    code = (
        "import sys\n"
        "from dcar.cli.main import main\n"
        "try:\n"
        "    main(['serve', '--log-level', 'foo'])\n"
        "except SystemExit as e:\n"
        "    loaded = [m for m in ('torch', 'dcar.server.app', 'dcar.model.pipeline') if m in sys.modules]\n"
        "    print(e.code, loaded)\n"
        "    sys.exit(e.code)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stdout.strip() == "2 []"
    [line] = out.stderr.strip().splitlines()
    assert line.startswith("dcar serve: error: --log-level:") and "'foo'" in line and "'debug'" in line, line


@pytest.mark.parametrize("how", ["flag", "env"])
def test_serve_refuses_a_device_this_machine_lacks_before_the_port_opens(how, capsys, monkeypatch):
    """It used to open the port, then fail the model load with a traceback and exit 1."""
    for k in [k for k in os.environ if k.startswith("DCAR_")]:
        monkeypatch.delenv(k)
    argv = ["serve", "--port", "1"]  # a port it may not bind: reaching uvicorn would fail differently
    if how == "flag":
        argv += ["--device", "cuda:99"]
    else:
        monkeypatch.setenv("DCAR_DEVICE", "cuda:99")
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    [line] = err.strip().splitlines()
    where = "--device" if how == "flag" else "DCAR_DEVICE"
    assert line.startswith(f"dcar serve: error: {where}: cuda:99 "), line
    assert "Uvicorn" not in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["generate", "x", "--weights", "{tmp}/absent"],
            "--weights: {tmp}/absent: weights directory not found",
        ),
        (["generate", "x", "--weights", "preset:nope"], "--weights: unknown pipeline preset 'nope'"),
        (
            ["generate", "x", "--weights", "{tmp}/cut"],
            "--weights: {tmp}/cut/generator/model.safetensors: not a",
        ),
        (["generate", "x", "--weights", "preset:tiny", "--device", "cuda:99"], "--device: cuda:99 "),
        (
            ["generate", "x", "--weights", "preset:tiny", "--size", "100"],
            "--size: size 100x100 must be positive",
        ),
        (
            ["edit", "--image", "{tmp}/absent.png", "--mask", "{tmp}/m.png", "x"],
            "--image: cannot read {tmp}/absent",
        ),
        (
            ["edit", "--image", "{tmp}/text.png", "--mask", "{tmp}/m.png", "x"],
            "--image: cannot read {tmp}/text.png",
        ),
        (
            ["edit", "--image", "{tmp}/m.png", "--mask", "{tmp}/text.png", "x"],
            "--mask: cannot read {tmp}/text.png",
        ),
        (
            ["edit", "--image", "{tmp}/m.png", "--mask", "{tmp}/m.png", "x", "--weights", "{tmp}/absent"],
            "--weights",
        ),
    ],
    ids=[
        "no-dir",
        "bad-preset",
        "truncated",
        "no-device",
        "size",
        "no-image",
        "not-image",
        "not-mask",
        "edit-weights",
    ],
)
def test_unusable_inputs_exit_2_with_one_line(argv, message, tiny_pipe, tmp_path, capsys):
    """Each was a traceback (status 1): LoadError, FileNotFoundError, UnidentifiedImageError, torch's
    'Torch not compiled with CUDA enabled', the sampler's size check after the text encoder ran."""
    tiny_pipe.save_pretrained(tmp_path / "cut")
    f = tmp_path / "cut" / "generator" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    Image.new("L", (128, 128)).save(tmp_path / "m.png")
    (tmp_path / "text.png").write_text("not an image")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv] + ["-o", str(tmp_path / "out.png")]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    [line] = err.strip().splitlines()
    assert line.startswith(f"dcar {argv[0]}: error: ") and message.replace("{tmp}", str(tmp_path)) in line, (
        line
    )
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("out.txt", "argument -o/--output: the extension picks the image format"),
        ("out", "argument -o/--output: the extension picks the image format"),
        ("out.xbm", "cannot write mode RGB as XBM"),
        ("folder.png", "-o: {tmp}/folder.png is a directory"),
        ("file.png/out.png", "-o: cannot create the folder {tmp}/file.png"),
    ],
)
def test_an_unwritable_output_exits_2_before_any_work(output, message, tmp_path, capsys, monkeypatch):
    """Was a traceback (ValueError 'unknown file extension', IsADirectoryError, ...) after every image had
    been drawn; now refused before the model is loaded."""
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "file.png").write_bytes(b"")
    monkeypatch.setattr(Pipeline, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "x", "--weights", "preset:tiny", "-o", str(tmp_path / output)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    [line] = err.strip().splitlines()
    assert line.startswith("dcar generate: error: ") and message.replace("{tmp}", str(tmp_path)) in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.png", "folder.png"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "{tmp}/absent"], "dcar eval: error: WEIGHTS: {tmp}/absent: weights directory not found"),
        (
            ["eval", "{tmp}/absent", "--tokenizer-ceiling"],
            "WEIGHTS: {tmp}/absent: weights directory not found",
        ),
        (
            ["eval", "{tmp}/absent", "--sweep", "steps=2"],
            "WEIGHTS: {tmp}/absent: weights directory not found",
        ),
        (["eval", "{tmp}/absent", "--device", "cuda:99"], "dcar eval: error: --device: cuda:99 "),
        (["eval", "{tmp}/absent", "--seeds", "0,one"], "--seeds: a comma list of whole numbers"),
        (["eval", "{tmp}/absent", "--json", "{tmp}/no/r.json"], "--json: the folder of {tmp}/no/r.json"),
        (["eval", "{tmp}/cut.json", "--explain"], "{tmp}/cut.json: not a results file (not valid JSON"),
        (["eval", "{tmp}/list.json", "--explain"], "{tmp}/list.json: no per-image ShapesEval results"),
        (
            ["eval", "{tmp}/absent", "--sweep", "temperature=1"],
            "dcar eval: error: --sweep 'temperature=1': unknown knob",
        ),
        (
            ["eval", "{tmp}/absent", "--sweep", "steps=2", "--write-card"],
            "dcar eval: error: --write-card: a --sweep writes no card",
        ),
        (
            ["eval", "{tmp}/run", "--tokenizer-ceiling", "--write-card"],
            "dcar eval: error: --write-card: needs a weights directory, and {tmp}/run is a tokenizer run",
        ),
    ],
    ids=[
        "weights",
        "ceiling",
        "sweep",
        "device",
        "seeds",
        "json",
        "explain-cut",
        "explain-list",
        "sweep-knob",
        "sweep-card",
        "run-card",
    ],
)
def test_eval_refuses_what_it_cannot_use_with_one_line(argv, message, tmp_path, capsys):
    """Each was a traceback with status 1 (--json's only after the whole evaluation had run)."""
    (tmp_path / "cut.json").write_text('{"shapes_eval": {')
    (tmp_path / "list.json").write_text("[]")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"")  # refused before it is read
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert message.replace("{tmp}", str(tmp_path)) in line, line


def test_edit_refuses_a_size_other_than_the_images(tmp_path, capsys):
    """--size was accepted and silently replaced by the input image's size."""
    Image.new("RGB", (128, 128)).save(tmp_path / "in.png")
    Image.new("L", (128, 128)).save(tmp_path / "m.png")
    argv = ["edit", "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "m.png"), "x"]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--size", "64", "-o", str(tmp_path / "out.png"), "--weights", "preset:tiny"])
    [line] = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and "--size: an edit keeps the size of --image (128x128); got 64x64" in line
    assert main([*argv, "--size", "128", "-o", str(tmp_path / "out.png"), "--weights", "preset:tiny"]) == 0
