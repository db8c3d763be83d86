"""A real HTTP server (`python -m http.server`) over a local folder, for data sets at http:// URLs."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tests.multiproc import free_port


@contextlib.contextmanager
def http_server(folder: Path, log: Path | None = None) -> Iterator[str]:
    """Serve `folder` on 127.0.0.1 until the block ends; yields the base URL. With `log`, the server's
    request lines (one per request: `"GET /path HTTP/1.1" 200`) go to that file."""
    port = free_port()
    with (log.open("wb") if log is not None else open("/dev/null", "wb")) as requests:
        server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                   "--directory", str(folder)], stdout=subprocess.DEVNULL, stderr=requests)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "http.server did not start"
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)
