"""Real servers for data sets and checkpoints at URLs: an HTTP server (`python -m http.server`) over a local
folder, an S3-compatible server (moto's), and a TCP proxy that drops connections mid-transfer."""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from launch.bench.streaming import wait_for_port
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
        wait_for_port(port, server, "http.server")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


class ResettingProxy:
    """A TCP proxy on 127.0.0.1 in front of `upstream` (host, port) that, when armed, resets (TCP RST) the next
    `times` connections once the server has sent each more than `after_bytes`: connections dropped
    mid-download. `resets` counts the connections it reset."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.after_bytes: int | None = None
        self.times = 0
        self.resets = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, after_bytes: int, times: int = 1) -> None:
        with self.lock:
            self.after_bytes, self.times = after_bytes, times

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_server: bool) -> None:
        sent = 0
        try:
            while data := source.recv(65536):
                sink.sendall(data)
                sent += len(data)
                with self.lock:
                    cut = from_server and self.times > 0 and self.after_bytes is not None and sent > self.after_bytes
                    if cut:
                        self.times -= 1
                        self.resets += 1
                if cut:
                    for end in (source, sink):  # linger 0: closing sends RST, not FIN
                        end.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        end.shutdown(socket.SHUT_RDWR)  # wakes the other direction's thread, blocked in recv
                        end.close()
                    return
        except OSError:
            pass
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()
