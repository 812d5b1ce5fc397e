"""``torchrun --nproc_per_node=2`` (gloo on 127.0.0.1) runs the unchanged ``dcar train`` commands."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from dcar.training.runlog import load_checkpoint

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str) -> None:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(REPO), GLOO_SOCKET_IFNAME="lo")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "-m",
        "dcar.cli.main",
        "train",
        *args,
        "--preset",
        "ci",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--precision",
        "fp32",
        "--no-progress",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_two_process_gloo_runs(tmp_path, ci_tokenizer_run):
    tok = tmp_path / "tok"
    _torchrun("tokenizer", "--out", str(tok), "--stop-at", "8")  # through stage 1 and stage 2
    ranks = load_checkpoint(tok)["ranks"]
    assert len(ranks) == 2
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # DDP kept the replicas identical
    assert ranks[0]["data"]["scenes"] != ranks[1]["data"]["scenes"]  # each rank drew its own scenes
    assert len((tok / "losses.csv").read_text().splitlines()) == 9  # header + 8 steps, written once

    gen, data = tmp_path / "gen", tmp_path / "tokens"
    _torchrun(
        "generator",
        "--tokenizer",
        str(ci_tokenizer_run),
        "--data",
        str(data),
        "--out",
        str(gen),
        "--stop-at",
        "3",
    )
    assert sorted(p.name for p in data.glob("shard-*.pt")) == ["shard-00000.pt", "shard-00001.pt"]
    ranks = load_checkpoint(gen)["ranks"]
    assert len(ranks) == 2 and ranks[0]["checksum"] == ranks[1]["checksum"]
