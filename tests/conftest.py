"""Shared fixtures: the digits set is rendered once per test session and shared read-only.

Checkpoints of the ResNet-18 the tests train are about 90 MB a step, so the suite keeps its disk use small:
a passing test's `tmp_path` is removed when the test ends (pyproject.toml: tmp_path_retention_policy), and
fixtures shared by a module keep their files in `module_tmp`, removed when the module's tests are done.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from data_pipeline.digits import render_digits


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete digits render, shared by every test that only reads it."""
    return render_digits(tmp_path_factory.mktemp("data") / "digits")


@pytest.fixture(scope="module")
def module_tmp(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder for the fixtures one test module shares, deleted after the module's last test."""
    folder = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    yield folder
    shutil.rmtree(folder, ignore_errors=True)
