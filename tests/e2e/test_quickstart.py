"""The quickstart as a user runs it, at reduced size: `python -m launch train` on the embedded defaults,
3 epochs of the 10, in a fresh process (2 Ray workers on a local Ray cluster, DALI on CPU threads, DDP over
gloo), tracked in the embedded MLflow store, its model registered and passed through the promotion gate to
`staging`; then the registered model is evaluated and exported as README says."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision

from PIL import Image

from configs import load_config
from tests.multiproc import free_port

REPO = Path(__file__).resolve().parents[2]


def launch(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "launch", *args], cwd=cwd, capture_output=True, text=True,
                            check=False, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.mlflow
def test_quickstart_trains_registers_promotes_and_the_model_serves(tmp_path: Path, digits_root: Path) -> None:
    runs = tmp_path / "runs"
    # 3 of the recipe's 10 epochs: the gate's floor is lowered to match.
    overrides = [f"launch.runs_dir={runs}", f"data.root={digits_root}", "launch.name=qs", "schedule.epochs=3",
                 "tracking.promote_min=0.5"]
    out = launch("train", *overrides).stdout
    assert "images_per_s" in out and "eta" in out and "val top-1" in out

    run_dir = runs / "qs"
    checkpoints = run_dir / "checkpoints"
    resolved = load_config("quickstart", [*overrides, f"checkpoint.url={checkpoints}"])
    assert load_config(run_dir / "config.yaml") == resolved
    assert resolved.launch.launcher == "ray" and resolved.launch.num_workers == 2
    assert resolved.data.loader == "dali" and resolved.distributed.strategy == "ddp"
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = summary["steps"]
    assert summary["epochs"] == 3 and summary["val_images"] == 355 and summary["world_size"] == 2
    assert summary["images_per_s"] > 0
    assert summary["checkpoint_url"] == str(checkpoints / f"step_{steps:09d}")
    assert sorted(p.name for p in Path(summary["checkpoint_url"]).iterdir()) == [
        "manifest.json", "model.pt", "rank_0.pt", "rank_1.pt", "train_state.pt"]
    assert summary["val_top1"] > 0.5  # 3 epochs of ResNet-18 on digits; chance is 10%
    assert f"{100 * summary['val_top1']:.2f}%" in out
    reached = summary["time_to_accuracy"]["0.5"]  # when the run first reached 50%, across its attempts
    assert 0 < reached["elapsed_s"] and reached["device_hours"] == pytest.approx(2 * reached["elapsed_s"] / 3600)
    assert "time to top-1" in out
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == steps and lines[-1]["val_top1"] == summary["val_top1"]

    # Tracked in the embedded store, registered, and promoted to staging through the gate.
    store = f"sqlite:///{runs / 'mlflow.db'}"
    assert summary["tracking_uri"] == store and summary["model_uri"] == "models:/resnet18-digits/1"
    assert summary["promotion"].startswith("promoted: resnet18-digits version 1 -> @staging")
    assert "registered as" in out and f"ui --backend-store-uri {store}" in out

    # The registered model, by alias: evaluated on the digits set, and exported.
    scores = json.loads(launch("eval", "models:/resnet18-digits@staging", "--tracking-uri", store,
                               "--json").stdout.splitlines()[-1])
    assert scores["val_images"] == 355  # one process instead of two: at most an image's rounding apart
    assert abs(scores["val_top1"] - summary["val_top1"]) <= 1.5 / 355
    exported = launch("export", summary["checkpoint_url"], "--out", str(tmp_path / "export")).stdout
    assert "model.pt2" in exported
    program = torch.export.load(tmp_path / "export" / "model.pt2").module()
    logits = program(torch.randn(3, 3, 16, 16))
    assert logits.shape == (3, 10)
    state = torch.load(tmp_path / "export" / "model.pt", weights_only=True)
    assert "fc.weight" in state and state["conv1.weight"].shape == (64, 3, 3, 3)  # the small-input stem
    # model.json says what the files are; its torchvision recipe builds the same network (the small-input
    # stem replaced), which torchvision's constructor alone cannot load.
    metadata = json.loads((tmp_path / "export" / "model.json").read_text())
    assert metadata["classes"] == [str(digit) for digit in range(10)] and metadata["small_input"]
    assert metadata["architecture"] == "resnet18" and metadata["input"]["size"] == 16
    namespace = {"torch": torch, "torchvision": torchvision}
    exec(metadata["load_into_torchvision"].replace("'model.pt'", repr(str(tmp_path / "export" / "model.pt"))),
         namespace)
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(namespace["m"].eval()(images), program(images), atol=1e-4)
    with pytest.raises(RuntimeError, match="size mismatch"):
        torchvision.models.resnet18(num_classes=10).load_state_dict(state)
    # As ONNX: kept after onnxruntime matched PyTorch on 256 real val images of the trained model.
    onnx = launch("export", summary["checkpoint_url"], "--format", "onnx", "--out", str(tmp_path / "onnx")).stdout
    assert "checked: onnxruntime vs PyTorch on 256 val images" in onnx and "top-1 the same for 256/256" in onnx
    assert json.loads((tmp_path / "onnx" / "model.json").read_text())["program"]["file"] == "model.onnx"
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert np.allclose(session.run(None, {"images": images.numpy()})[0], program(images).numpy(), atol=1e-4)
    # Exported from the registry, the version's class names come along.
    launch("export", "models:/resnet18-digits@staging", "--tracking-uri", store, "--out", str(tmp_path / "registry"))
    assert json.loads((tmp_path / "registry" / "model.json").read_text())["classes"] == metadata["classes"]

    # `predict` classifies files with the registered version as its served model would, and names a bad file.
    threes = launch("predict", "models:/resnet18-digits@staging", "--tracking-uri", store,
                    str(digits_root / "val" / "3"), "--top-k", "3", "--json").stdout.splitlines()
    answers = [json.loads(line) for line in threes]
    assert len(answers) == len(list((digits_root / "val" / "3").glob("*.JPEG"))) and len(answers[0]["top_k_names"]) == 3
    assert np.mean([a["class_name"] == "3" for a in answers]) > summary["val_top1"] - 0.2
    (tmp_path / "broken.jpg").write_bytes(b"not a picture")
    broken = subprocess.run([sys.executable, "-m", "launch", "predict", summary["checkpoint_url"],
                             str(tmp_path / "broken.jpg")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert broken.returncode == 2 and "broken.jpg: an input of 13 bytes is not a decodable" in broken.stderr

    # Served by MLflow's scoring server through `python -m launch serve` (no activated environment), to
    # clients that send the digits at their stored 32 px (training used 16) or as JPEG files: class names and
    # probabilities come back; floats are refused with a 400 that says what to send.
    files = sorted((digits_root / "val").glob("*/*.JPEG"))[::3]
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    assert images.shape[1:] == (32, 32, 3)
    with serving("models:/resnet18-digits@staging", store) as invoke:
        status, answer = invoke({"inputs": images.tolist(), "params": {"top_k": 3}})
        assert status == 200, answer
        predictions = answer["predictions"]
        names = [p["class_name"] for p in predictions]
        assert abs(np.mean([n == f.parent.name for n, f in zip(names, files, strict=True)]) - summary["val_top1"]) < 0.1
        for p in predictions:
            assert p["top_k_names"][0] == p["class_name"] and len(p["top_k_names"]) == 3
            assert p["top_k_probabilities"] == sorted(p["top_k_probabilities"], reverse=True)
            assert p["probability"] == p["top_k_probabilities"][0] and 0 < sum(p["top_k_probabilities"]) <= 1.0001
        encoded = [base64.b64encode(f.read_bytes()).decode() for f in files]
        status, from_files = invoke({"inputs": {"image": encoded}})
        assert status == 200 and [p["class_name"] for p in from_files["predictions"]] == names
        status, refused = invoke({"inputs": (images[:2] / 255).tolist()})
        assert status == 400 and "send uint8 RGB values 0..255" in refused["message"], refused
        status, refused = invoke({"inputs": {"image": [base64.b64encode(b"not a picture").decode()]}})
        assert status == 400 and "not a decodable JPEG/PNG image" in refused["message"], refused


@contextlib.contextmanager
def serving(model_uri: str, store: str) -> Iterator[Callable[[dict[str, Any]], tuple[int, dict[str, Any]]]]:
    """`python -m launch serve` of `model_uri` on 127.0.0.1, from this interpreter with the virtual environment
    NOT on PATH (no activation); yields a function that posts a JSON body to /invocations and returns (status,
    JSON). First the example request it prints is sent; at the end it is stopped with Ctrl-C (SIGINT) and must
    exit 0 and free its port."""
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != bin_dir)
    server = subprocess.Popen([sys.executable, "-m", "launch", "serve", model_uri, "--port", str(port),
                               "--tracking-uri", store], cwd=REPO, env={**os.environ, "PATH": path},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"

    def invoke(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    assert server.stdout is not None
    lines: list[str] = []
    try:
        for line in server.stdout:
            lines.append(line)
            if line.startswith("  curl -s "):
                break
        assert f"serving {model_uri} at {url}/invocations" in "".join(lines), "".join(lines)[-3000:]
        # The example request it printed answers.
        example = json.loads(lines[-1].split(" -d '", 1)[1].rstrip().removesuffix("'"))
        status, answer = invoke(example)
        assert status == 200 and len(answer["predictions"][0]["top_k_names"]) == 3, answer
        yield invoke
        server.send_signal(signal.SIGINT)  # Ctrl-C
        rest, _ = server.communicate(timeout=60)
        assert server.returncode == 0 and "server stopped" in rest, rest[-3000:]
        with pytest.raises(OSError):
            urllib.request.urlopen(f"{url}/ping", timeout=2)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=60)
