"""The reliability benchmarks run end to end at toy sizes (the tiny random model, seconds of load): every
table is printed and its numbers add up. They assert nothing about speed."""

from __future__ import annotations

import re

from tests.benchmarks.test_scripts import run_script


def test_soak_prints_outcomes_latency_rss_and_recovery():
    out = run_script(
        "soak",
        "--weights",
        "preset:tiny",
        "--k",
        "2",
        "--duration",
        "6",
        "--capacity-s",
        "3",
        "--set",
        "max_queue_delay_s",
        "0.5",
    )
    assert re.search(r"capacity: [0-9.]+ images/s with 16 closed-loop clients", out)
    counts = {m[0]: int(m[1]) for m in re.findall(r"^\| ([^|*]+?) \| (\d+) \| [0-9.]+% \|$", out, re.M)}
    total = int(re.search(r"^\| \*\*all\*\* \| (\d+) \|", out, re.M).group(1))
    assert counts.get("accepted, 200", 0) > 0 and sum(counts.values()) == total
    for part in (
        "latency \\(client\\)",
        "queue wait \\(limit max_queue_delay_s = 0.5\\)",
        "the rest: in the batch",
    ):
        assert re.search(rf"^\| {part}[^|]* \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \|$", out, re.M), part
    assert re.search(
        r"bound: max_queue_delay_s \+ one image .* = 0.5 \+ [0-9.]+ = [0-9.]+ s; p99 latency", out
    )
    over_time = re.findall(r"^\| \d+ \| \d+ \| \d+ \| \d+ \| (\d+\.\d\d) \|$", out, re.M)
    assert len(over_time) >= 3  # RSS, queue and the admission margin over time
    served = re.search(
        r"served (\d+) images for 6 s of load: ([0-9.]+) images/s, (\d+)% of the measured", out
    )
    assert int(served.group(1)) == counts["accepted, 200"]
    assert float(served.group(2)) == round(counts["accepted, 200"] / 6, 2)
    assert re.search(
        r"recovery: the first request after the load stopped had its image \(200\) [0-9.]+ s later", out
    )


def test_memory_prints_rss_per_burst_with_and_without_the_trim():
    out = run_script("memory", "--weights", "preset:tiny", "--shapes", "1,2", "--rounds", "1", "--steps", "2")
    rows = re.findall(r"^\| (start-up|round 1) \| (\d*) \| (\d+) \| (\d+) \|$", out, re.M)
    assert [(r[0], r[1]) for r in rows] == [("start-up", ""), ("round 1", "1"), ("round 1", "2")]
    assert re.search(r"DCAR_TRIM_HEAP=true: start-up \d+ MiB, peak \d+ MiB", out)
