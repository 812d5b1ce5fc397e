"""The benchmark scripts run end to end at tiny sizes on CPU (how the GPU script is tested here).

They print tables and assert nothing about speed; these tests check that they run, that every row of
the table is there with finite numbers, and that the plot is written.

The scripts that measure a model in their own process run inside the test's (``run_in_process``: as
``python benchmarks/NAME.py``, with the script's folder on ``sys.path``), which saves each one a fresh
import of torch and transformers (5-10 s on 2 cores); the load test starts the script as a user does.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def run_script(name: str, *args: str) -> str:
    env = dict(
        os.environ, OMP_WAIT_POLICY="PASSIVE"
    )  # from the repo root, no extra path: as a user runs them
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / f"{name}.py"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def run_in_process(name: str, *args: str) -> str:
    """``python benchmarks/NAME.py ARGS`` inside this process; its stdout. A non-zero exit fails the test."""
    path = REPO / "benchmarks" / f"{name}.py"
    out, err = io.StringIO(), io.StringIO()
    # what a script may set for its whole process (e.g. set_grad_enabled(False)), put back for the next test
    argv, sys_path, threads = sys.argv, list(sys.path), torch.get_num_threads()
    grad, rng, dtype = torch.is_grad_enabled(), torch.get_rng_state(), torch.get_default_dtype()
    sys.argv, sys.path[:0] = [str(path), *args], [str(path.parent)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(path), run_name="__main__")
    except SystemExit as e:
        assert e.code in (0, None), err.getvalue()[-3000:]
    finally:
        sys.argv, sys.path[:] = argv, sys_path
        torch.set_num_threads(threads)
        torch.set_grad_enabled(grad)
        torch.set_rng_state(rng)
        torch.set_default_dtype(dtype)
    return out.getvalue()


def test_a_script_run_in_process_leaves_the_process_as_it_found_it(tmp_path):
    """gpu.py (like sampler.py, peers.py and device_check.py) turns autograd off for its process: in the
    test's process that broke every training test run after it ("does not require grad")."""
    rng = torch.get_rng_state()
    args = ["--tiny", "--device", "cpu", "--batches", "1", "--modes", "eager", "--repeat", "1"]
    run_in_process("gpu", *args, "--plot", str(tmp_path / "gpu.png"))
    assert torch.is_grad_enabled() and torch.equal(torch.get_rng_state(), rng)


def table_rows(out: str, first_cell: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip("|").split("|")]
        for line in out.splitlines()
        if line.startswith(f"| {first_cell}")
    ]


def test_gpu_script_on_cpu_with_the_tiny_preset(tmp_path):
    plot = tmp_path / "gpu.png"
    out = run_in_process(
        "gpu",
        "--tiny",
        "--device",
        "cpu",
        "--batches",
        "1,2",
        "--modes",
        "eager",
        "--repeat",
        "1",
        "--plot",
        str(plot),
    )  # the compiled modes run at toy size in the device-check test
    assert re.search(r"matmul ceiling \(256\^3, float32\): [0-9.]+ TFLOP/s", out)
    assert re.search(r"FLOPs per image: unmask [0-9.]+ G, head [0-9.]+ G, decode [0-9.]+ G", out)
    rows = table_rows(out, "eager")
    assert [(r[0], r[1]) for r in rows] == [("eager", "1"), ("eager", "2")]
    for r in rows:
        assert r[-1] == "yes"  # every output finite
        values = [float(v) for v in r[2:-1]]
        assert all(v >= 0 and v == v for v in values)
        assert float(r[3]) > 0  # images/s
    assert plot.stat().st_size > 1000


def test_peers_script_at_toy_sizes(tmp_path):
    plot = tmp_path / "peers.png"
    out = run_in_process(
        "peers",
        "--width",
        "64",
        "--depth",
        "1",
        "--heads",
        "2",
        "--codebook",
        "256",
        "--context",
        "32",
        "--head-depth",
        "1",
        "--decoder-div",
        "16",
        "--size",
        "64",
        "--batches",
        "1,2",
        "--repeat",
        "1",
        "--plot",
        str(plot),
    )
    names = ["DC-AR (12 + head)", "Sana-style (20 steps)", "MAR-style (64 + head each)"]
    for name in names:
        row = table_rows(out, name)[0]
        assert len(row) == 5 and all(float(v) > 0 for v in row[1:])
    assert re.search(r"DC-AR latency at batch 1 = [0-9.]+ x Sana-style", out)
    assert plot.stat().st_size > 1000


def test_sampler_script_prints_every_row():
    out = run_in_process("sampler", "--no-full", "--repeat", "1")
    rows = table_rows(out, "tiny")
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("tiny", "256", "1"),
        ("tiny", "256", "8"),
        ("tiny", "512", "1"),
        ("tiny", "512", "8"),
        ("tiny (CL)", "512", "8"),
    ]
    for r in rows:
        stages, total, rate = [float(v) for v in r[3:7]], float(r[7]), float(r[8])
        assert all(v > 0 for v in stages) and total >= max(stages) and rate > 0


def test_sampler_script_measures_trained_weights_side_by_side():
    weights = str(REPO / "weights" / "dcar-tiny-shapes")
    out = run_in_process(
        "sampler",
        "--no-presets",
        "--repeat",
        "1",
        "--batches",
        "1,2",
        "--weights",
        f"old={weights}",
        "--weights",
        f"new={weights}",
    )
    rows = [r for r in table_rows(out, "") if r[0] in ("old", "new", "tiny")]
    # the weights' default size (256 px), the batches asked for, labels as given, and no preset rows
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("old", "256", "1"),
        ("old", "256", "2"),
        ("new", "256", "1"),
        ("new", "256", "2"),
    ]
    assert all(float(r[7]) > 0 and float(r[8]) > 0 for r in rows)


def test_load_script_over_real_http():
    out = run_script(
        "load", "--concurrency", "1,2", "--requests", "4", "--steps", "2", "--direct-images", "4"
    )
    rows = [r for r in table_rows(out, "") if r[0].isdigit()]
    assert [(r[0], r[1]) for r in rows] == [("1", "4"), ("2", "4")]
    for r in rows:
        assert float(r[2]) > 0 and float(r[6]) >= 1  # images/s, mean forward batch
        assert r[-1] == "0"  # no failed requests
    assert float(rows[0][7]) == 1.0  # the concurrency-1 row is the sequential baseline


def test_device_check_end_to_end_at_toy_size(tmp_path):
    # "compiled" is left out: inductor's first compilation costs ~70 s on 2 cores, and the compiled
    # sampler's outputs are tested in tests/model/test_optimisations.py. "cuda_graphs" compiles too on
    # CUDA only, so on the CPU it checks that --modes is honoured and a second mode gets its row.
    out = run_in_process(
        "device_check", "--toy", "--device", "cpu", "--out", str(tmp_path), "--batches", "1", "--repeat", "1",
        "--modes", "eager,cuda_graphs",
    )  # fmt: skip
    fin = table_rows(out, "float")  # float32, float16 (bfloat16 starts with b)
    assert [r[0] for r in fin] == ["float32", "float16"] and all(r[2] == "0" for r in fin)
    assert table_rows(out, "bfloat16")[0][2] == "0"
    stages = {r[0]: r for r in table_rows(out, "")}
    assert stages["one unmasking step"][2] == "1"  # the revealed counts, nothing else
    assert stages["head loop (all steps)"][2] == "0"
    assert int(stages["finish (head + decode + copy out)"][2]) >= 1
    assert re.search(r"Launches per unmasking step: \d+ aten operators", out)
    speed = [r for mode in ("eager", "compiled", "cuda_graphs") for r in table_rows(out, mode)]
    assert [(r[0], r[1]) for r in speed] == [("eager", "1"), ("cuda_graphs", "1")]
    assert all(float(r[3]) > 0 and r[7] == "yes" for r in speed)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["toy"] and len(results["speed"]) == 2
    assert (tmp_path / "report.md").read_text().count("|") > 40 and (
        tmp_path / "latency.png"
    ).stat().st_size > 1000


def test_precision_script_prints_a_row_per_dtype():
    out = run_in_process("precision", "--size", "64", "--prompts", "2", "--dtypes", "float32,bfloat16")
    rows = {r[0]: r for r in table_rows(out, "")}
    assert rows["float32"][1:4] == ["0", "1.000", "0.0000"]  # the reference row compares with itself
    assert rows["bfloat16"][1] == "0" and 0 <= float(rows["bfloat16"][3]) < 0.2
