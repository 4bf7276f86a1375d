"""Shared test set-up: offline hubs, W&B disabled, and the real traces in ../shared (skip without)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from data_pipeline.import_routes import import_routes
from reporting.html import REPORTS_DIR_ENV

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_TRACES = REPO.parent / "shared" / "traces"
GEMMA_CSV = SHARED_TRACES / "gemma4-26b-a4b.route.csv"


@pytest.fixture(autouse=True, scope="session")
def _reports_outside_the_checkout(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A run without --json writes its HTML report under ./reports (reporting.html.default_path); tests run
    from the checkout, so theirs go to a temporary folder instead."""
    os.environ.setdefault(REPORTS_DIR_ENV, str(tmp_path_factory.mktemp("reports")))


@pytest.fixture(scope="session")
def gemma_csv() -> Path:
    """The real gemma-4 routing log; a user's clone has no ../shared, so the test skips there."""
    if not GEMMA_CSV.exists():
        pytest.skip(f"real trace not found at {GEMMA_CSV} (../shared/traces is only in the dev workspace)")
    return GEMMA_CSV


@pytest.fixture(scope="session")
def gemma_store(gemma_csv: Path, tmp_path_factory: pytest.TempPathFactory):
    """The gemma routing log imported into a trace store (read-only: do not write to it)."""
    return import_routes(gemma_csv, tmp_path_factory.mktemp("gemma") / "store")
