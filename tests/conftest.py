"""Shared fixtures: the digits set is rendered once per test session and shared read-only."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_pipeline.digits import render_digits


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete digits render, shared by every test that only reads it."""
    return render_digits(tmp_path_factory.mktemp("data") / "digits")
