"""What the loss-against-bits figures share: a log axis of bits, labels, a grid, the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def panels(n: int, families: list[str], size: tuple[float, float]) -> tuple[Any, Any, dict[str, Any]]:
    """A figure of ``n`` panels side by side (each ``size`` inches, headless backend), its
    axes row, and a tab10 colour per name of ``families``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {f: plt.get_cmap("tab10")(i % 10) for i, f in enumerate(families)}
    fig, axes = plt.subplots(1, n, figsize=(size[0] * n, size[1]), squeeze=False)
    return fig, axes[0], colors


def bits_axis(ax: Any, *, xlabel: str, ylabel: str, title: str) -> None:
    """A log x axis of bits per parameter, plain numbers on it, the labels and a light grid."""
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)


def save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
