"""Open an HTML report in a real headless Chromium, offline, and read back what it rendered.

The page's own script marks each inlined figure as decoded or not (``data-figures-rendered="n/m"``
on ``<body>``); Chromium prints every console message (errors, uncaught exceptions) to stderr as
``...:CONSOLE...`` lines when logging is on. The network is cut by resolving every host to nothing,
and the page source is checked for anything it would fetch (``src``/``href``/``url()`` to a host).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def chromium() -> str:
    """The browser's path, or skip the test with the reason (``make test`` installs it where it can)."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no headless browser (chromium) on PATH: `apt-get install -y chromium`; `make test` installs it "
                "where it runs as root")


@dataclass
class Page:
    dom: str  # document after the load event, as Chromium serialises it
    console: list[str]  # console messages: a clean page has none
    screenshot: Path | None

    @property
    def figures_rendered(self) -> tuple[int, int]:
        m = re.search(r'data-figures-rendered="(\d+)/(\d+)"', self.dom)
        assert m, "the page's load handler never ran"
        return int(m.group(1)), int(m.group(2))


def open_page(html: Path, workdir: Path, screenshot: Path | None = None, height: int = 2400) -> Page:
    """Load ``html`` in headless Chromium (no network, fresh profile); dump the DOM, optionally screenshot."""
    args = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
            f"--user-data-dir={workdir / 'chromium-profile'}", "--host-resolver-rules=MAP * ~NOTFOUND",
            "--enable-logging=stderr", "--v=0", f"--window-size=1280,{height}", "--hide-scrollbars", "--dump-dom"]
    if screenshot is not None:
        args.append(f"--screenshot={screenshot}")
    proc = subprocess.run([*args, html.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return Page(proc.stdout, console, screenshot if screenshot is not None and screenshot.exists() else None)


def check_report(html: Path, workdir: Path, *, tables: int, figures: int, texts: tuple[str, ...] = (),
                 screenshot: Path | None = None) -> Page:
    """The report renders offline: no console message, every figure decoded, its tables and texts there."""
    source = html.read_text()
    remote = re.search(r"""(?:\b(?:src|href)\s*=\s*["']?|url\(\s*["']?|@import\s+["'])(?:https?:)?//""", source)
    assert remote is None, f"the report loads something from the network: {remote and remote.group(0)}"
    page = open_page(html, workdir, screenshot)
    assert page.console == [], page.console
    assert page.figures_rendered == (figures, figures)
    assert page.dom.count('<table class="data"') == tables
    for text in texts:
        assert text in page.dom, text
    if screenshot is not None:
        assert page.screenshot is not None and not blank(page.screenshot)
    return page


def blank(png: Path) -> bool:
    """True when a screenshot is (nearly) one colour: nothing was painted."""
    with Image.open(png) as im:
        colours = im.convert("L").getcolors(maxcolors=1 << 16)
    return colours is not None and max(n for n, _ in colours) > 0.99 * sum(n for n, _ in colours)
