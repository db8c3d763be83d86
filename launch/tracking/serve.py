"""`python -m launch serve`: MLflow's scoring server for a registered model, started from this interpreter.

`mlflow models serve` starts `uvicorn` by name, so it fails (exit 127) unless the virtual environment is
activated. This starts the same server (the command MLflow builds, `scoring_server.get_cmd`) as
`<this python> -m uvicorn ...`: no activation, no PATH. It downloads the model once, waits until the server
answers /ping, prints the URL and a request that works, and stops the server on Ctrl-C (SIGINT) or SIGTERM.
"""

from __future__ import annotations

import base64
import io
import json
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from types import FrameType

from configs.extras import import_extra

START_TIMEOUT_S = 300
"""How long the server may take to load the model and answer /ping."""


def example_body() -> str:
    """A JSON request body the served models of this project answer: one small encoded JPEG, top 3."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (128, 128, 128)).save(buffer, format="JPEG", quality=50)
    return json.dumps({"inputs": {"image": [base64.b64encode(buffer.getvalue()).decode()]}, "params": {"top_k": 3}})


def serve(model_uri: str, *, tracking_uri: str, host: str, port: int) -> int:
    """Serve `model_uri` (models:/NAME@ALIAS, models:/NAME/VERSION or a logged model's URI) on host:port until
    interrupted; the server's exit status (0 after Ctrl-C or SIGTERM)."""
    mlflow = import_extra("mlflow")
    scoring_server = import_extra("mlflow.pyfunc.scoring_server")
    with tempfile.TemporaryDirectory(prefix="serve-") as scratch:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=scratch)
        command, env = scoring_server.get_cmd(model_uri=local, port=port, host=host)
        words = shlex.split(command)
        if words[0] != "uvicorn":
            raise RuntimeError(f"MLflow's serving command changed: {command!r}")
        server = subprocess.Popen([sys.executable, "-m", *words], env=env)
        stopping = False

        def stop(signum: int, frame: FrameType | None) -> None:
            nonlocal stopping
            stopping = True
            server.send_signal(signal.SIGINT)  # uvicorn's own clean shutdown

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            url = f"http://{host}:{port}"
            _wait_for_ping(server, url)
            print(f"serving {model_uri} at {url}/invocations (Ctrl-C stops it)\nexample request:\n"
                  f"  curl -s {url}/invocations -H 'Content-Type: application/json' -d '{example_body()}'",
                  flush=True)
            status = server.wait()
        finally:
            if server.poll() is None:
                server.terminate()
                server.wait(timeout=30)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    if stopping:
        print("server stopped", flush=True)
        return 0
    return status


def _wait_for_ping(server: subprocess.Popen[bytes], url: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if server.poll() is not None:
            raise RuntimeError(f"the scoring server exited with status {server.returncode} before it answered "
                               f"{url}/ping (see its output above)")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the scoring server did not answer {url}/ping within {START_TIMEOUT_S} s")
        time.sleep(0.5)
