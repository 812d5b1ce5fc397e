"""dcar inspect, fetch-weights and bench: what they print, and bad input refused with status 2 and one line
naming the argument (as generate, edit and eval do); failures of the work itself are status 1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dcar.cli.main import main


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
