"""What the loss-against-bits figures share: a log axis of bits, labels, a grid, the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any


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
