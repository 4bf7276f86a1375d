"""One self-contained HTML page per run: setup and split, figures inline, tables, provenance.

Rendered with Jinja2 (autoescaped: labels, paths and notes are user text) from
``templates/report.html.j2``; figures are inlined as base64 PNG, the style sheet is in the page, and
nothing is fetched from the network, so the file opens offline and can be mailed or archived as is.
"""

from __future__ import annotations

import base64
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from reporting.figures import Plot, png_bytes
from reporting.provenance import timestamp

TEMPLATES = Path(__file__).resolve().parent / "templates"
#: where reports go when a run writes no JSON to put them beside (``reports/`` by default)
REPORTS_DIR_ENV = "MOE_LOOKAHEAD_REPORTS"


@dataclass
class Table:
    """A table as the terminal shows it: formatted cells; ``row_kinds`` marks reference / limit rows."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""
    row_kinds: list[str] | None = None  # per row: "" | "reference" | "limit"
    left: int = 1  # the first ``left`` columns are labels (left-aligned); the rest are numbers


@dataclass
class Report:
    """Everything one page shows. ``plots[0]`` is the headline figure, shown first and full width."""

    title: str
    command: str
    versions: dict[str, str]
    setup: list[str]  # what ran: model, trace, cache, link, ...
    split: str  # what the learned parts trained on and what the numbers count
    tables: list[Table]
    plots: list[Plot]
    created: str = field(default_factory=timestamp)


def _environment() -> Environment:
    return Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=True, undefined=StrictUndefined,
                       trim_blocks=True, lstrip_blocks=True)


def render(report: Report) -> str:
    """The page as text."""
    figures = [{"plot": p, "src": "data:image/png;base64," + base64.b64encode(png_bytes(p.figure)).decode("ascii")
                if p.figure is not None else None} for p in report.plots]
    return _environment().get_template("report.html.j2").render(report=report, figures=figures)


def write(report: Report, path: str | os.PathLike[str]) -> Path:
    """Render and write atomically (a temporary name, then a rename): a killed run leaves no half page."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render(report), encoding="utf-8")
    os.replace(tmp, path)
    return path


def default_path(json_path: str | os.PathLike[str] | None, stem: str) -> Path:
    """Beside the run's JSON (``out.json`` -> ``out.html``), else ``reports/<stem>-<time>.html``."""
    if json_path:
        return Path(json_path).with_suffix(".html")
    folder = Path(os.environ.get(REPORTS_DIR_ENV) or "reports")
    return folder / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}.html"


def report_path(flag: str | None, json_path: str | os.PathLike[str] | None, stem: str) -> Path | None:
    """The ``--report`` flag resolved: a path, the default (flag not given), or None for ``--report none``."""
    if flag is not None and flag.strip().lower() in ("none", "off", "no"):
        return None
    return Path(flag) if flag else default_path(json_path, stem)
