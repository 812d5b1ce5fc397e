"""The dcar command-line entry points, run in-process through ``dcar.cli.main`` (and as a process where the
exit status and stderr are the point)."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

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


def test_inspect_a_saved_directory(tiny_pipe, tmp_path, capsys):
    tiny_pipe.save_pretrained(tmp_path / "w")
    assert main(["inspect", str(tmp_path / "w" / "generator" / "model.safetensors")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "name\tshape" and "pos_embed\t1x16x64" in lines


def test_inspect_a_bad_file_exits_with_the_reason(tmp_path, capsys):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as exit_:
        main(["inspect", str(bad)])
    [line] = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2
    assert line.startswith(f"dcar inspect: error: PATH: {bad}: not a readable safetensors file"), line


def test_fetch_weights_verify_only_reports_what_is_missing(tmp_path, capsys):
    (tmp_path / "dc-ht").mkdir()
    with pytest.raises(SystemExit) as exit_:
        main(["fetch-weights", str(tmp_path), "--verify-only"])
    [line] = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2
    assert line == (
        f"dcar fetch-weights: error: DIR: verification failed: {tmp_path}/dc-ht/config.json: file not found"
    )


# --- inspect, fetch-weights and bench: bad input is status 2 and one line naming the argument, as in generate


def official_folder(root, config: str):
    """An official-layout folder whose dc-ht/config.json holds ``config`` (the checkpoints are never reached)."""
    (root / "dc-ht").mkdir(parents=True)
    (root / "dc-ht" / "config.json").write_text(config)
    return root


@pytest.fixture
def no_hub(monkeypatch):
    """Nothing may reach the network: huggingface_hub's download is replaced (and the Hub set offline)."""
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls: list[dict] = []

    def refuse(**kwargs):
        calls.append(kwargs)
        pytest.fail(f"snapshot_download was called: {kwargs}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    return calls


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inspect", "{tmp}/absent"], "dcar inspect: error: PATH: {tmp}/absent: no such file or directory"),
        (
            ["inspect", "{tmp}/empty"],
            "dcar inspect: error: PATH: {tmp}/empty: no checkpoint files found",
        ),
        (
            ["inspect", "--preset", "nope"],
            "dcar inspect: error: --preset: unknown preset 'nope'; expected one",
        ),
        (
            ["fetch-weights", "{tmp}/absent", "--verify-only"],
            "dcar fetch-weights: error: DIR: {tmp}/absent: no such folder",
        ),
        (
            ["fetch-weights", "{tmp}/file.txt"],
            "dcar fetch-weights: error: DIR: {tmp}/file.txt is not a folder",
        ),
        (
            ["fetch-weights", "{tmp}/file.txt/sub"],
            "dcar fetch-weights: error: DIR: cannot create {tmp}/file.txt/sub: ",
        ),
        (
            ["fetch-weights", "{tmp}/broken", "--verify-only"],
            "dcar fetch-weights: error: DIR: verification failed: {tmp}/broken/dc-ht/config.json: not valid JSON",
        ),
        (
            ["fetch-weights", "{tmp}/list", "--verify-only"],
            "DIR: verification failed: {tmp}/list/dc-ht/config.json: expected a JSON object, found list",
        ),
        (
            ["fetch-weights", "{tmp}/other", "--verify-only"],
            "DIR: verification failed: {tmp}/other/dc-ht/config.json: model_type='t5', expected 'dc_ht'",
        ),
        (
            ["bench", "nope", "--dir", "{tmp}/benchmarks"],
            "dcar bench: error: NAME: no benchmark 'nope' in {tmp}/benchmarks; available: echo",
        ),
        (
            ["bench", "shared", "--dir", "{tmp}/benchmarks"],
            "dcar bench: error: NAME: {tmp}/benchmarks/shared.py is a helper of the benchmarks "
            "(no __main__ block); available: echo",
        ),
        (
            ["bench", "echo", "--dir", "{tmp}/absent"],
            "dcar bench: error: --dir: {tmp}/absent is not a folder",
        ),
        (
            ["bench", "--dir", "{tmp}/file.txt", "echo"],
            "dcar bench: error: --dir: {tmp}/file.txt is not a folder",
        ),
        (["bench", "echo", "--dir"], "dcar bench: error: argument --dir: expected one argument"),
    ],
    ids=[
        "inspect-absent",
        "inspect-empty",
        "inspect-preset",
        "fetch-absent",
        "fetch-file",
        "fetch-uncreatable",
        "fetch-not-json",
        "fetch-list",
        "fetch-model-type",
        "bench-name",
        "bench-helper-module",
        "bench-dir-after",
        "bench-dir-before",
        "bench-dir-no-value",
    ],
)
def test_inspect_fetch_and_bench_refuse_bad_input_with_status_2(argv, message, tmp_path, capsys, no_hub):
    """Each was status 1 (a SystemExit message or a traceback: the JSONDecodeError of a broken config.json,
    naming no file), where generate, edit and eval give 2 and the flag's name."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("a file")
    official_folder(tmp_path / "broken", '{"model_type": "dc_ht", ')
    official_folder(tmp_path / "list", "[]")
    official_folder(tmp_path / "other", '{"model_type": "t5"}')
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "echo.py").write_text("if __name__ == '__main__':\n    print('ran')\n")
    (tmp_path / "benchmarks" / "shared.py").write_text("print('ran')\n")  # a helper module, no __main__
    with pytest.raises(SystemExit) as exit_:
        main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and "Traceback" not in err and "ran" not in out
    [line] = err.strip().splitlines()
    assert message.replace("{tmp}", str(tmp_path)) in line, line


def test_a_bad_inspect_path_is_status_2_as_a_process(tmp_path):
    """The exit status the shell sees, and no traceback."""
    out = subprocess.run(
        [sys.executable, "-m", "dcar.cli.main", "inspect", str(tmp_path / "absent")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr, out
    assert out.stderr.strip() == f"dcar inspect: error: PATH: {tmp_path}/absent: no such file or directory"


def test_output_into_a_pipe_closed_early_ends_quietly():
    """`dcar inspect --preset dc-ar-512 | head -2` ended in a BrokenPipeError traceback, or, for output still
    buffered at exit, "Exception ignored ... BrokenPipeError" and status 120. The reader here leaves before
    the command writes, so any output size meets it."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write now fails with EPIPE, whatever the output's size
    proc = subprocess.Popen(
        [sys.executable, "-m", "dcar.cli.main", "inspect", "--preset", "tiny-ht"],
        stdout=write_end,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(write_end)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 141 and err == "", (proc.returncode, err)


def test_fetch_weights_failures_of_the_download_itself_stay_status_1(tmp_path, capsys, monkeypatch, no_hub):
    """A download that breaks off, or a download whose config.json is broken, is the work failing (status
    1), in one line that names the repository or the file; an unknown --revision is the user's (status 2)."""
    import httpx
    import huggingface_hub
    from huggingface_hub.errors import RevisionNotFoundError

    def offline(repo_id, local_dir, allow_patterns, revision):
        raise OSError("network is unreachable")

    def broken(repo_id, local_dir, allow_patterns, revision):  # "downloads" a dc-ht that is not JSON
        if Path(local_dir).name == "dc-ht":
            official_folder(Path(local_dir).parent, "not json")

    def no_revision(repo_id, local_dir, allow_patterns, revision):
        response = httpx.Response(404, request=httpx.Request("GET", f"https://huggingface.co/{repo_id}"))
        raise RevisionNotFoundError("404 Client Error. Revision Not Found", response=response)

    for fake, argv, code, message in (
        (
            offline,
            [],
            1,
            "dcar fetch-weights: downloading mit-han-lab/dc-ht failed: OSError: network is unreachable",
        ),
        (
            broken,
            [],
            1,
            "dcar fetch-weights: verification of the download failed: {out}/dc-ht/config.json: not valid JSON",
        ),
        (
            no_revision,
            ["--revision", "v9"],
            2,
            "dcar fetch-weights: error: --revision: mit-han-lab/dc-ht has no",
        ),
    ):
        out = tmp_path / fake.__name__
        monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
        with pytest.raises(SystemExit) as exit_:
            main(["fetch-weights", str(out), *argv])
        if code == 1:  # a SystemExit(message): Python prints it on stderr and exits 1
            assert isinstance(exit_.value.code, str)
            line = exit_.value.code
        else:
            assert exit_.value.code == 2
            [line] = capsys.readouterr().err.strip().splitlines()
        assert "\n" not in line and message.replace("{out}", str(out)) in line, line


def test_bench_takes_dir_after_the_name_and_passes_the_rest_to_the_script(tmp_path, capsys, monkeypatch):
    """``dcar bench NAME --dir X`` passed --dir X to the script and looked for NAME in ./benchmarks."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # the command sets both, as `python NAME.py` would
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)  # no ./benchmarks here
    bench = tmp_path / "mine"
    bench.mkdir()
    (bench / "echo.py").write_text(
        "import sys\nif __name__ == '__main__':\n    print('argv', sys.argv[1:])\n"
        "    if '--fail' in sys.argv:\n        sys.exit(3)\n"
    )
    for argv in (
        ["bench", "echo", "--dir", str(bench), "--steps", "2"],
        ["bench", "echo", "--steps", "2", f"--dir={bench}"],
        ["bench", "--dir", str(tmp_path / "elsewhere"), "echo", "--steps", "2", "--dir", str(bench)],
    ):
        assert main(argv) == 0, argv
        assert capsys.readouterr().out == "argv ['--steps', '2']\n", argv
    with pytest.raises(SystemExit) as exit_:  # the script's own status is the command's
        main(["bench", "echo", "--dir", str(bench), "--fail"])
    assert exit_.value.code == 3


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
    ],
    ids=["weights", "ceiling", "sweep", "device", "seeds", "json", "explain-cut", "explain-list"],
)
def test_eval_refuses_what_it_cannot_use_with_one_line(argv, message, tmp_path, capsys):
    """Each was a traceback with status 1 (--json's only after the whole evaluation had run)."""
    (tmp_path / "cut.json").write_text('{"shapes_eval": {')
    (tmp_path / "list.json").write_text("[]")
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
