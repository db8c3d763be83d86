"""Shared fixtures: the digits set is rendered once per test session and shared read-only; a real S3 server
runs for the session once a test asks for a bucket.

Checkpoints of the ResNet-18 the tests train are about 90 MB a step, so the suite keeps its disk use small:
a passing test's `tmp_path` is removed when the test ends (pyproject.toml: tmp_path_retention_policy), and
fixtures shared by a module keep their files in `module_tmp`, removed when the module's tests are done.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from data_pipeline.digits import render_digits
from launch.bench.streaming import local_s3_server, s3_environment
from tests.multiproc import free_port


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


S3_PORT = free_port()
"""The port of the session's S3 server, chosen when the session starts."""


def pytest_configure(config: pytest.Config) -> None:
    # The AWS settings are in the environment from the start: processes started before the server (a DataLoader's
    # forkserver, whose children inherit its environment, not ours) must reach it too.
    os.environ.update(s3_environment(f"http://127.0.0.1:{S3_PORT}"))


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 server for the session, reached by s3:// URLs as on a cluster: through s3fs, with the endpoint
    and credentials in the standard AWS environment variables (which subprocesses and Ray workers inherit)."""
    with local_s3_server(S3_PORT) as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A new, empty bucket on the session's S3 server: `s3://<name>`."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(name)
    return f"s3://{name}"
