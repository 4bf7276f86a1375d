"""Figures as objects: made from the metrics a run has, checked for data, then saved or inlined.

A plotting function returns :class:`Plot` objects instead of writing files, so that the PNG folder,
the HTML report and W&B all show the same figures, and tests can look inside them. A plot that the
run's metrics cannot fill (TTFT of a decode-only trace, latency against capacity with one capacity)
is a :class:`Plot` without a figure and with a one-line note saying why: never an empty chart.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure
from PIL import Image

DPI = 110


@dataclass
class Plot:
    """One figure of a report, or the reason it could not be drawn."""

    name: str  # file stem: <name>.png, the W&B key
    title: str  # heading in the HTML report
    figure: Figure | None  # None: nothing to draw from this run; ``note`` says why
    note: str = ""  # one line: why there is no figure, or what the figure leaves out
    caption: str = ""  # how to read the figure


def new_figure(width: float, height: float, panels: int = 1, columns: int = 2) -> tuple[Figure, list[Axes]]:
    """A figure of ``panels`` axes, ``columns`` per row (fewer when there are fewer panels).

    Built without pyplot: no global state, so figures are freed like any object and nothing needs
    a display.
    """
    cols = max(1, min(columns, panels))
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[panels:]:
        fig.delaxes(ax)
    return fig, axes[:panels]


def _finite(values: Iterable[Any]) -> bool:
    for v in values:
        try:
            if math.isfinite(float(v)):
                return True
        except (TypeError, ValueError):
            continue
    return False


def axes_has_data(ax: Axes) -> bool:
    """True when the axes draws at least one finite data point, a bar of non-zero size or an image
    with a finite value; a zero-height bar chart (what a missing metric read as 0 gives) is empty."""
    for line in ax.get_lines():
        x, y = np.asarray(line.get_xdata(), dtype=float), np.asarray(line.get_ydata(), dtype=float)
        if x.size and y.size and bool(np.isfinite(x).any() and np.isfinite(y).any()):
            return True
    for patch in ax.patches:
        w, h = getattr(patch, "get_width", lambda: 0)(), getattr(patch, "get_height", lambda: 0)()
        if _finite([w]) and _finite([h]) and w != 0 and h != 0:
            return True
    for image in ax.get_images():
        if bool(np.isfinite(np.ma.filled(np.ma.asarray(image.get_array(), dtype=float), np.nan)).any()):
            return True
    for coll in ax.collections:
        if not isinstance(coll, PathCollection):  # scatter points; a shaded band alone is no data
            continue
        offsets = np.asarray(coll.get_offsets(), dtype=float)
        if offsets.size and bool(np.isfinite(offsets).all(axis=-1).any()):
            return True
    return False


def empty_panels(fig: Figure) -> list[str]:
    """Titles (or positions) of the data axes of ``fig`` that draw nothing; colour bars do not count."""
    empty = []
    for i, ax in enumerate(fig.axes):
        if ax.get_label() == "<colorbar>":
            continue
        if not axes_has_data(ax):
            empty.append(ax.get_title() or f"panel {i + 1}")
    return empty


def checked(plot: Plot) -> Plot:
    """The plot itself, or, if any of its panels would come out empty, a note naming them instead:
    an empty chart reads as "zero", which is a claim the run never made."""
    if plot.figure is None:
        return plot
    empty = empty_panels(plot.figure)
    if not empty and plot.figure.axes:
        return plot
    what = ", ".join(empty) or "the figure"
    note = f"nothing to draw in {what}" + (f"; {plot.note}" if plot.note else "")
    return Plot(plot.name, plot.title, None, note=note, caption=plot.caption)


def png_bytes(fig: Figure, dpi: int = DPI) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def save_pngs(plots: list[Plot], folder: str | Path) -> list[Path]:
    """Write every drawn plot as ``folder/<name>.png``; returns the paths (notes write nothing)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for plot in plots:
        if plot.figure is not None:
            path = folder / f"{plot.name}.png"
            path.write_bytes(png_bytes(plot.figure))
            written.append(path)
    return written


def notes(plots: list[Plot]) -> list[str]:
    """One line per plot that carries a note (for the terminal)."""
    return [f"{p.title}: {p.note}" for p in plots if p.note]


def wandb_images(plots: list[Plot]) -> dict[str, Any]:
    """``{name: wandb.Image}`` of every drawn plot, from the same PNG the report inlines."""
    import wandb  # wandb: ~0.5 s to import; only when a run logs figures

    return {p.name: wandb.Image(Image.open(io.BytesIO(png_bytes(p.figure))), caption=p.title)
            for p in plots if p.figure is not None}
