"""The latency / throughput figure every benchmark writes (matplotlib, headless)."""

from __future__ import annotations


def latency_throughput_plot(series: dict[str, dict[int, float]], path: str, title: str = "") -> None:
    """``series``: name -> {batch size: seconds per batch}; left panel latency, right panel images/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    batches = sorted({b for r in series.values() for b in r})
    for name, r in series.items():
        bs = sorted(r)
        ax1.plot(bs, [r[b] for b in bs], marker="o", label=name)
        ax2.plot(bs, [b / r[b] for b in bs], marker="o", label=name)
    ax1.set(xlabel="batch size", ylabel="seconds per batch", title="latency", xscale="log", yscale="log")
    ax2.set(xlabel="batch size", ylabel="images / s", title="throughput", xscale="log")
    for ax in (ax1, ax2):
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.grid(True, alpha=0.3)
    ax2.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")
