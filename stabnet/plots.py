"""Shared matplotlib helpers for the experiment figures (Agg backend, no display needed).

Used by ``experiments/figures.py`` (Figures 4.3–4.4, 5.1, 5.3–5.4 of the paper) and
``experiments/growth.py`` (the feature-growth remark of Section 3.1). Every figure is saved
atomically: written to a temporary file in the target folder, then renamed over the target with
:func:`os.replace`, so a reader never sees a half-written PNG.
"""

from __future__ import annotations

import os
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless, deterministic

import matplotlib.pyplot as plt  # noqa: E402

from stabnet import logbook, variants  # noqa: E402

# One colour and label per variant, the same in every figure: its record's (stabnet.variants);
# names that are not in the table (an old run's) keep their name and take a fallback colour.
_FALLBACK_COLORS = ("#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
DPI = 120
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

plt.rcParams.update(
    {
        "figure.dpi": DPI,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "font.size": 9,
        "legend.fontsize": 8,
        "legend.frameon": False,
    }
)


def variant_label(variant: str) -> str:
    """The paper's name of a variant (``resnet_d`` → ``ResNet-D``); unknown names unchanged."""
    record = variants.VARIANTS.get(variant)
    return record.label if record else variant


def variant_color(variant: str, index: int = 0) -> str:
    """The colour of ``variant``; unknown variants cycle through a fallback palette."""
    record = variants.VARIANTS.get(variant)
    return record.color if record else _FALLBACK_COLORS[index % len(_FALLBACK_COLORS)]


def save_figure(fig: matplotlib.figure.Figure, path: str, *, dpi: int = DPI) -> str:
    """Save ``fig`` as PNG at ``path`` atomically (temp file + :func:`os.replace`), close it.

    Returns the path. The parent folder is created when missing.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        logbook.write_atomic(
            path, lambda f: fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight"),
            binary=True,
        )  # fmt: skip
    finally:
        plt.close(fig)
    return path


def write_text_atomic(path: str, text: str) -> str:
    """Write ``text`` (Markdown, CSV, …) to ``path`` atomically; returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    logbook.write_text_atomic(path, text)
    return path


def is_png(path: str, min_bytes: int = 1024) -> bool:
    """Whether ``path`` starts with the PNG signature and has at least ``min_bytes`` bytes."""
    if not os.path.isfile(path) or os.path.getsize(path) < min_bytes:
        return False
    with open(path, "rb") as f:
        return f.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE


def image_for_display(image: Any) -> tuple[Any, str | None]:
    """An ``[H, W, C]`` image in [0, 1] as ``imshow`` wants it: grey images squeezed with the
    ``gray`` colour map, colour images as they are (clipped to [0, 1])."""
    import numpy as np

    x = np.clip(np.asarray(image, np.float32), 0.0, 1.0)
    if x.ndim == 3 and x.shape[-1] == 1:
        return x[..., 0], "gray"
    return x, None
